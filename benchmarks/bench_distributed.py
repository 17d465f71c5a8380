"""State tuning on several GPUs: DDP scaling at the 0.1B shape, FSDP with a sharded 1.5B-shape base.

Runs (each one a ``torchrun`` launch of this same file with ``--worker``, started by the driver):

* ``ddp_1`` / ``ddp_2``: DistributedDataParallel over the state-tuning PEFT model, 1 and 2 processes,
  0.1B shape (the model of bench_train.py), B = 8 per GPU, T = 4096, bf16 weights, fp32 states, no
  gradient checkpointing (bench_train.json: 115k tokens/s without vs 86k with, and 21 GB fits).
  Reports global tokens/s and the 2-GPU speedup (target >= 1.8x).
* ``fsdp_2``: FSDP2 (``fully_shard``) over a random 1.5B-shape base (hidden 2048, 24 layers), every
  ``Rwkv7Block`` its own unit, frozen base sharded over 2 GPUs, only the states trained; B = 4 per GPU,
  T = 4096, gradient checkpointing. Reports tokens/s, peak memory per GPU, finite state gradients and
  whether the loss went down on its fixed batch.

Usage:
    python benchmarks/bench_distributed.py --all     # 2 GPUs: results/bench_distributed.{json,png}
    python benchmarks/bench_distributed.py --smoke   # CPU + gloo, tiny shapes, a temp dir (or --out)

A run that fails or times out is recorded with its error text; the others still run and are kept.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # `common`, also when torchrun starts this file
from common import RESULTS, SHAPE_0_1B, device_info, random_model_0_1b  # noqa: E402

# Shapes for random_official_state_dict: ranks = (decay, a, value, gate) LoRA ranks.
SHAPES = {
    # = common.SHAPE_0_1B; built by common.random_model_0_1b (the model of bench_train.py).
    "0.1b": {"vocab": SHAPE_0_1B["vocab_size"], "hidden": SHAPE_0_1B["hidden_size"],
             "layers": SHAPE_0_1B["num_hidden_layers"], "ranks": (64, 64, 32, 128)},
    # RWKV-7 "G1" 1.5B: hidden 2048, 24 layers, FFN 4x, head size 64 (32 heads).
    "1.5b": {"vocab": 65536, "hidden": 2048, "layers": 24, "ranks": (96, 96, 64, 256)},
    "tiny": {"vocab": 300, "hidden": 64, "layers": 2, "ranks": (8, 8, 8, 8)},  # --smoke
}
# The machines keep NVLink multicast off (it can take a shared host's GPUs down): keep these set in
# the torchrun children too, whatever the caller's environment says.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
LR = 1e-2


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


# ---------------------------------------------------------------------------------------------
# Worker side (runs under torchrun, one process per GPU or per CPU rank)
# ---------------------------------------------------------------------------------------------


def build_model(shape: str, device: torch.device):
    """Frozen base with random weights at realistic scales, bf16; the state-tuning PEFT model on it."""
    from peft import get_peft_model

    import peft_state_tuning  # noqa: F401  (registers the STATE_TUNING peft type)
    from peft_state_tuning import StateTuningConfig

    if shape == "0.1b":
        model, _ = random_model_0_1b(dtype=torch.bfloat16, device=device)
    else:
        model = random_model(shape).to(device)
    return model, get_peft_model(model, StateTuningConfig())


def random_model(shape: str):
    """common.random_model_0_1b's recipe at another size, bf16 on the CPU. The model is made on the
    meta device and takes the state dict's tensors (assign=True), so the 1.5B shape costs one copy
    of the weights in host memory per rank instead of three."""
    sys.path.insert(0, str(REPO / "tests"))
    from checkpoints import random_official_state_dict

    from modeling_rwkv7 import Rwkv7ForCausalLM
    from modeling_rwkv7.convert import config_from_official, official_to_hf

    s = SHAPES[shape]
    sd = random_official_state_dict(vocab=s["vocab"], hidden=s["hidden"], layers=s["layers"], ranks=s["ranks"], dtype=torch.bfloat16)
    config = config_from_official(sd)
    with torch.device("meta"):
        model = Rwkv7ForCausalLM(config)
    model.load_state_dict(official_to_hf(sd, config), assign=True)
    return model


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the shard of an FSDP2 DTensor, else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def grad_check(params, sharded: bool) -> dict:
    """Finite and non-zero gradients on every rank. FSDP2 grads are shards, so their squares are
    summed over ranks; DDP grads are already all-reduced, whole on every rank."""
    import torch.distributed as dist

    dev = local(params[0]).device
    missing = sum(p.grad is None for p in params)
    sq = torch.zeros((), device=dev, dtype=torch.float64)
    finite = torch.ones((), device=dev)
    for p in params:
        if p.grad is not None:
            g = local(p.grad).double()
            sq += g.square().sum()
            finite = torch.minimum(finite, torch.isfinite(g).all().float())
    if sharded:
        dist.all_reduce(sq)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return {"grads_finite": bool(finite.item()), "grad_norm": float(sq.sqrt()), "params_without_grad": missing}


def train(model, opt, ids, warmup: int, steps: int, sync) -> tuple[list[float], list[float]]:
    """``warmup + steps`` optimiser steps on one fixed batch; losses of all, seconds of the timed ones."""
    losses, seconds = [], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()  # per step: a step's time is then its real time, and DDP ranks are in lockstep anyway
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.detach())
    return [float(x) for x in losses], seconds[warmup:]


def check_step(model, opt, ids, sharded: bool) -> dict:
    """One more step, untimed, that looks at the states' gradients before the optimiser uses them."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = grad_check(trainable(model), sharded)
    opt.step()
    opt.zero_grad(set_to_none=True)
    out["final_loss"] = float(loss.detach())
    return out


def states_in_sync(params) -> float:
    """Max |difference| between this rank's states and rank 0's after training (DDP: must be 0)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def setup(args) -> tuple[torch.device, int, int, object]:
    """Process group from torchrun's environment; this rank's device and a sync function."""
    import torch.distributed as dist

    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    timeout = timedelta(seconds=args.pg_timeout)  # a rank that died must not leave the others in NCCL's 10-min wait
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        sync = torch.cuda.synchronize
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
        sync = lambda: None  # noqa: E731
    torch.manual_seed(0)
    return device, rank, world, sync


def batch_ids(shape: str, batch: int, seq: int, rank: int, device) -> torch.Tensor:
    """Each rank its own fixed batch, as a data-parallel sampler would give."""
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(0, SHAPES[shape]["vocab"], (batch, seq), generator=g).to(device)


def ddp_worker(args, device, rank, world, sync) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    base, peft_model = build_model(args.shape, device)
    if args.ckpt:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    # Only the states require grad, so DDP buckets only them (2.4 MB at 0.1B). Every layer's state
    # feeds every forward, so none goes unused and find_unused_parameters can stay False (the
    # default, and cheaper); were one unused, DDP would raise in the step after, as the runs would show.
    model = DDP(peft_model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    opt = torch.optim.AdamW(trainable(model), lr=LR)
    ids = batch_ids(args.shape, args.batch, args.seq, rank, device)
    log(f"rank {rank}: ddp model ready, {sum(p.numel() for p in trainable(model))} trainable numbers; training")
    losses, seconds = train(model, opt, ids, args.warmup, args.steps, sync)
    out = check_step(model, opt, ids, sharded=False)
    out["states_max_diff_vs_rank0"] = states_in_sync(trainable(model))
    out["weight_grads_computed"] = sum(p.grad is not None for p in base.parameters() if not p.requires_grad)
    return {"losses": losses, "step_s": seconds, **out}


def fsdp_worker(args, device, rank, world, sync) -> dict:
    """FSDP2: each Rwkv7Block its own unit, the PEFT model the root unit. The states live on the
    tuner (not in a block), so they land in the root unit together with the embedding, the head and
    ln_out, gathered for the whole forward. The head must stay in the root: the chunked loss reads
    ``head.weight`` without calling the head module, so a unit of its own would never be gathered.
    FSDP2 rather than FSDP1: the root unit mixes bf16 weights and fp32 states, which FSDP2 gathers
    per parameter while FSDP1 flattens a unit into one FlatParameter of one dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from modeling_rwkv7.modeling_rwkv7 import Rwkv7Block

    base, peft_model = build_model(args.shape, torch.device("cpu"))  # fully_shard moves the shards to `device`
    if args.ckpt:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    unsharded_gb = sum(p.numel() * p.element_size() for p in peft_model.parameters()) / 1e9
    mesh = init_device_mesh(device.type, (world,))
    blocks = [m for m in peft_model.modules() if isinstance(m, Rwkv7Block)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(peft_model, mesh=mesh)
    peft_model.train()
    shard_gb = sum(local(p).numel() * p.element_size() for p in peft_model.parameters()) / 1e9
    opt = torch.optim.AdamW(trainable(peft_model), lr=LR)
    ids = batch_ids(args.shape, args.batch, args.seq, rank, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # from here on: training memory, not model building
    log(f"rank {rank}: fsdp model ready ({len(blocks)} block units, {shard_gb:.2f} of {unsharded_gb:.2f} GB params here); training")
    losses, seconds = train(peft_model, opt, ids, args.warmup, args.steps, sync)
    out = check_step(peft_model, opt, ids, sharded=True)
    weight_grads = sum(p.grad is not None for p in base.parameters() if not p.requires_grad)
    return {"losses": losses, "step_s": seconds, "fsdp_units": len(blocks) + 1, "params_gb_unsharded": unsharded_gb,
            "params_gb_this_rank": shard_gb, "weight_grads_computed": weight_grads, **out}  # fmt: skip


def worker_main(args) -> None:
    """Run one benchmark on this rank, gather every rank's numbers on rank 0, which writes --result."""
    import torch.distributed as dist

    device, rank, world, sync = setup(args)
    try:
        per_rank = (ddp_worker if args.worker == "ddp" else fsdp_worker)(args, device, rank, world, sync)
        per_rank["rank"] = rank
        per_rank["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        gathered = [None] * world
        dist.all_gather_object(gathered, per_rank)
        if rank == 0:
            result = summarize_ranks(args, world, gathered)
            Path(args.result).write_text(json.dumps(result, indent=2))
            log(f"{args.worker} x{world}: {result['tokens_per_s']:.0f} tokens/s, step {result['step_s_median']:.3f} s")
    finally:
        # The DDP/FSDP model sits in reference cycles; while it is alive at destroy time, gloo's
        # threads abort the process (seen with torch 2.13: "terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def summarize_ranks(args, world: int, ranks: list[dict]) -> dict:
    """Global tokens/s from the slowest rank's median step (each step moves world * B * T tokens)."""
    step = max(statistics.median(r["step_s"]) for r in ranks)
    r0 = ranks[0]
    return {
        "world_size": world, "shape": args.shape, "per_gpu_batch": args.batch, "seq": args.seq,
        "gradient_checkpointing": bool(args.ckpt), "warmup_steps": args.warmup, "timed_steps": args.steps,
        "lr": LR, "dtype": "bf16 weights, fp32 states",
        "tokens_per_s": world * args.batch * args.seq / step, "step_s_median": step,
        "peak_gb_per_rank": [r["peak_gb"] for r in ranks],
        "params_gb_per_rank": [r.get("params_gb_this_rank") for r in ranks],  # FSDP: this rank's shards
        "grads_finite": all(r["grads_finite"] for r in ranks), "grad_norm": r0["grad_norm"],
        "loss_first": statistics.mean(r["losses"][0] for r in ranks),
        "loss_final": statistics.mean(r["final_loss"] for r in ranks),
        "loss_decreased": statistics.mean(r["final_loss"] for r in ranks) < statistics.mean(r["losses"][0] for r in ranks),
        "device": device_info() if args.device == "cuda" else {"gpu": None, "torch": torch.__version__},
        "per_rank": ranks,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def plan(args) -> list[dict]:
    """The runs of --all (or --smoke): name, processes, worker flags, time limit."""
    if args.smoke:
        tiny = dict(device="cpu", shape="tiny", seq=64, batch=2, warmup=1, steps=2, timeout=240)
        return [
            dict(name="ddp_1", nproc=1, worker="ddp", ckpt=0, **tiny),
            dict(name="ddp_2", nproc=2, worker="ddp", ckpt=0, **tiny),
            dict(name="fsdp_2", nproc=2, worker="fsdp", ckpt=1, **tiny),
        ]
    ddp = dict(worker="ddp", device="cuda", shape="0.1b", batch=args.ddp_batch, seq=args.seq, ckpt=0, warmup=3, steps=10)
    return [
        dict(name="ddp_1", nproc=1, timeout=args.ddp_timeout, **ddp),
        dict(name="ddp_2", nproc=2, timeout=args.ddp_timeout, **ddp),
        dict(name="fsdp_2", nproc=2, worker="fsdp", device="cuda", shape="1.5b", batch=args.fsdp_batch, seq=args.seq,
             ckpt=1, warmup=2, steps=5, timeout=args.fsdp_timeout),
    ]  # fmt: skip


def torchrun_command(run: dict, result: Path) -> list[str]:
    flags = ["--worker", run["worker"], "--result", str(result), "--device", run["device"], "--shape", run["shape"],
             "--batch", str(run["batch"]), "--seq", str(run["seq"]), "--ckpt", str(run["ckpt"]),
             "--warmup", str(run["warmup"]), "--steps", str(run["steps"]), "--pg-timeout", str(run["timeout"])]  # fmt: skip
    # --standalone: a local rendezvous on a free port, so back-to-back runs never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(run["nproc"]), str(HERE), *flags]


def child_env(run: dict) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **SAFE_ENV)
    # GPU runs: torchrun would pin every worker to 1 CPU thread; building the random base on the CPU
    # (the 1.5B one takes ~30 s) is faster with the cores shared among the workers. CPU smoke runs:
    # 1 thread each, since oversubscribed OpenMP threads slow the steps down many times over.
    threads = max(1, (os.cpu_count() or 2) // run["nproc"]) if run["device"] == "cuda" else 1
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def launch(cmd: list[str], name: str, timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group, echo its output with a ``[name]`` prefix, keep the tail.
    On timeout the whole group goes (torchrun and its workers), so no GPU stays held."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO, start_new_session=True)  # fmt: skip
    tail = collections.deque(maxlen=150)  # two ranks' tracebacks and torchrun's report fit

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"[{name}] {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"{name}: timed out after {timeout:.0f} s; stopping its process group")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=15)
                break
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
        rc = None
    reader.join(timeout=5)
    return rc, "\n".join(tail)


def first_cause(tail: str) -> str:
    """The worker's exception line (``SomeError: ...``), not torchrun's ChildFailedError report."""
    for line in tail.splitlines():
        name = line.strip().split(":", 1)[0]
        if name.endswith(("Error", "Exception")) and "ChildFailedError" not in name and " " not in name:
            return line.strip()[:300]
    return "see error"


def run_one(run: dict, tmp: Path) -> dict:
    result = tmp / f"{run['name']}.json"
    cmd = torchrun_command(run, result)
    log(f"{run['name']}: starting ({run['nproc']} process(es), limit {run['timeout']} s): {shlex.join(cmd)}")
    t0 = time.perf_counter()
    rc, tail = launch(cmd, run["name"], run["timeout"], child_env(run))
    record = {"command": shlex.join(cmd), "wall_s": round(time.perf_counter() - t0, 1), "returncode": rc}
    if result.exists():  # rank 0 measured everything; a crash at teardown must not lose that
        record.update(json.loads(result.read_text()))
        if rc != 0:
            record["exit_error"] = f"exit code {rc} after the result was written; last output:\n{tail}"
    else:
        why = "timed out" if rc is None else f"exit code {rc}" if rc else "no result file"
        record["error_summary"] = f"{why}: {first_cause(tail)}"
        record["error"] = f"{why}; last output:\n{tail}"
    status = "FAILED, " + record["error_summary"] if "error" in record else "ok" + (" (non-zero exit after writing)" if rc else "")
    log(f"{run['name']}: {status} ({record['wall_s']} s)")
    return record


def ddp_scaling(runs: dict) -> dict | None:
    one, two = runs.get("ddp_1", {}), runs.get("ddp_2", {})
    if "tokens_per_s" not in one or "tokens_per_s" not in two:
        return None
    speedup = two["tokens_per_s"] / one["tokens_per_s"]
    return {"speedup_2_vs_1": speedup, "efficiency": speedup / 2, "target_speedup": 1.8, "meets_target": speedup >= 1.8}


def smoke_cross_check(runs: dict) -> dict | None:
    """In --smoke, ddp_2 and fsdp_2 train the same tiny model on the same per-rank batches with the
    same optimiser, so their losses and gradient norms must agree (checkpointing changes nothing)."""
    ddp, fsdp = runs.get("ddp_2", {}), runs.get("fsdp_2", {})
    if "per_rank" not in ddp or "per_rank" not in fsdp:
        return None
    diff = max(abs(a - b) for rd, rf in zip(ddp["per_rank"], fsdp["per_rank"]) for a, b in zip(rd["losses"], rf["losses"]))
    return {"max_loss_diff_fsdp_vs_ddp": diff, "grad_norm_ddp": ddp["grad_norm"], "grad_norm_fsdp": fsdp["grad_norm"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, (ax_ddp, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    ddp = {n: r for n, r in runs.items() if n.startswith("ddp") and "tokens_per_s" in r}
    if ddp:
        names = list(ddp)
        ax_ddp.bar(names, [r["tokens_per_s"] / 1e3 for r in ddp.values()], color="tab:blue", label="measured")
        if "ddp_1" in ddp:  # ideal linear scaling from the 1-GPU run
            ax_ddp.plot(names, [ddp["ddp_1"]["tokens_per_s"] / 1e3 * r["world_size"] for r in ddp.values()], "k--o", label="linear")
        ax_ddp.legend()
    scaling = results.get("ddp_scaling")
    title = f"DDP, {results['ddp_shape']}, B={results['ddp_per_gpu_batch']}/GPU T={results['seq']}"
    ax_ddp.set_title(title + (f"\nspeedup {scaling['speedup_2_vs_1']:.2f}x" if scaling else "\n(no scaling: a run failed)"))
    ax_ddp.set_ylabel("k tokens/s (all GPUs)")
    fsdp = runs.get("fsdp_2", {})
    if "tokens_per_s" in fsdp:
        ranks = range(len(fsdp["peak_gb_per_rank"]))
        ax_mem.bar([i - 0.2 for i in ranks], [p or 0.0 for p in fsdp["params_gb_per_rank"]], 0.4, label="params (shards)")
        ax_mem.bar([i + 0.2 for i in ranks], [p or 0.0 for p in fsdp["peak_gb_per_rank"]], 0.4, label="peak (max_memory_allocated)")
        ax_mem.set_xticks(list(ranks), [f"rank {i}" for i in ranks])
        ax_mem.set_ylabel("GB per GPU")
        ax_mem.legend()
        ax_mem.set_title(f"FSDP2, {fsdp['shape']}, B={fsdp['per_gpu_batch']}/GPU T={fsdp['seq']}\n"
                         f"{fsdp['tokens_per_s'] / 1e3:.1f}k tokens/s, grads finite: {fsdp['grads_finite']}")  # fmt: skip
    else:
        ax_mem.axis("off")
        ax_mem.text(0, 0.5, "FSDP run failed:\n" + fsdp.get("error_summary", "not run")[:200], fontsize=8, wrap=True)
    gpu = (results.get("device") or {}).get("gpu")
    fig.suptitle(f"state tuning, distributed: {gpu or ('CPU (smoke)' if 'smoke' in results['mode'] else 'no run succeeded')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def bench_train_reference() -> dict | None:
    """bench_train.py's single-GPU number for the same step (no DDP, lr 1e-3), to compare with ddp_1."""
    try:
        ref = json.loads((RESULTS / "bench_train.json").read_text())
        return {"tokens_per_s": ref["runs"]["ours_state_tuning"]["tokens_per_s"], "gpu": ref["device"]["gpu"],
                "from": "benchmarks/results/bench_train.json runs.ours_state_tuning"}  # fmt: skip
    except (OSError, KeyError, ValueError):
        return None


def driver_main(args) -> None:
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="bench_distributed_smoke_")) if args.smoke else RESULTS)
    name = "bench_distributed_smoke" if args.smoke else "bench_distributed"  # smoke never overwrites the GPU json
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    runs = plan(args)
    results = {
        "script": "benchmarks/bench_distributed.py", "command": shlex.join([sys.executable, *sys.argv]),
        "mode": "smoke (CPU, gloo, tiny shapes)" if args.smoke else "gpu (NCCL)", "torch": torch.__version__,
        "python": sys.version.split()[0], "env": {k: os.environ.get(k, v) for k, v in SAFE_ENV.items()},
        "ddp_shape": runs[0]["shape"], "ddp_per_gpu_batch": runs[0]["batch"], "seq": runs[0]["seq"],
        "ddp_gradient_checkpointing": False,
        "ddp_gradient_checkpointing_why": "bench_train.json (H100, B=8, T=4096): 115k tokens/s without vs 86k with; 21 GB peak fits",
        "fsdp_api": "FSDP2 torch.distributed.fsdp.fully_shard; units: each Rwkv7Block + the PEFT model (root: states, emb, head)",
        "single_gpu_reference": bench_train_reference(),
        "runs": {},
    }  # fmt: skip
    if not args.smoke and torch.cuda.device_count() < 2:
        log(f"warning: {torch.cuda.device_count()} GPU(s) visible; the 2-process runs will fail and be recorded")
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        for run in runs:
            results["runs"][run["name"]] = run_one(run, Path(tmp))
            results["device"] = next((r["device"] for r in results["runs"].values() if "device" in r), None)
            results["ddp_scaling"] = ddp_scaling(results["runs"])
            if args.smoke:
                results["smoke_fsdp_vs_ddp"] = smoke_cross_check(results["runs"])
            json_path.write_text(json.dumps(results, indent=2))  # after every run: a cut-off job keeps what it has
    try:
        plot(results, png_path)
    except Exception as err:  # noqa: BLE001 - the json is what matters
        log("plot failed:", err)
    summary = {n: ("error" if "error" in r else f"{r['tokens_per_s']:.0f} tok/s") for n, r in results["runs"].items()}
    log("summary:", summary, "| ddp scaling:", results["ddp_scaling"])
    if args.smoke:
        log("smoke: fsdp_2 vs ddp_2 (same model, data, optimiser):", results["smoke_fsdp_vs_ddp"])
    log(f"wrote {json_path} and {png_path}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--all", action="store_true", help="driver: DDP x1, DDP x2, FSDP x2 on GPUs")
    mode.add_argument("--smoke", action="store_true", help="driver: the same runs on CPU with gloo and tiny shapes")
    mode.add_argument("--worker", choices=["ddp", "fsdp"], help="internal: one run, under torchrun")
    p.add_argument("--out", help="output folder (default: benchmarks/results, or a temp dir with --smoke)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--ddp-batch", type=int, default=8, help="per-GPU batch of the DDP runs")
    p.add_argument("--fsdp-batch", type=int, default=4, help="per-GPU batch of the FSDP run")
    p.add_argument("--ddp-timeout", type=int, default=180, help="seconds per DDP run")
    p.add_argument("--fsdp-timeout", type=int, default=240, help="seconds for the FSDP run")
    # worker flags, set by the driver
    p.add_argument("--result")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--shape", choices=list(SHAPES), default="0.1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ckpt", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pg-timeout", type=int, default=300)
    return p.parse_args()


if __name__ == "__main__":
    cli = parse_args()
    if cli.worker:
        try:
            worker_main(cli)
        except Exception:
            traceback.print_exc()  # the driver keeps the tail of this as the run's error
            sys.exit(1)
    else:
        driver_main(cli)
