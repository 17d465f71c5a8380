"""State-tuning train step at the 0.1B shape: ours vs flash-linear-attention's RWKV-7 vs PEFT LoRA.

B = 8, T = 4096, bf16, random weights; tokens/s and peak memory of one optimiser step. Our model runs
its blocks compiled by default on CUDA (modeling_rwkv7/compiled_blocks.py); ``ours_state_tuning_eager``
is the same step without that. Each configuration runs in a fresh process. Writes
benchmarks/results/bench_train.json and bench_train.png. Run on a GPU:
    python benchmarks/bench_train.py [--profile]     # --profile: GPU time per kernel family, per step
On a host of two GPUs, the peer (whose first step autotunes for minutes) can run beside ours and be merged:
    CUDA_VISIBLE_DEVICES=1 python <copy of benchmarks>/bench_train.py --runs fla_state_tuning &
    CUDA_VISIBLE_DEVICES=0 python benchmarks/bench_train.py --runs ours_state_tuning ...; wait
    python benchmarks/bench_train.py --add-runs benchmarks/results/bench_train.json <copy>/results/bench_train.json --runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import peft_state_tuning  # noqa: F401
from common import (
    RESULTS, cuda_kernel_ms, device_info, random_model_0_1b, restrict_fla_autotune, state_tuning_step, timed,
    write_results,
)
from peft import LoraConfig, get_peft_model


PROFILE = False  # --profile

# Variants of the default state-tuning step: the environment of their own process (see modeling_rwkv7).
RUN_ENV = {
    # other activation memory budgets of the compiled blocks (default 0.9, modeling_rwkv7/compiled_blocks.py)
    "ours_state_tuning_budget100": {"RWKV7_ACTIVATION_BUDGET": "1"},
    "ours_state_tuning_budget60": {"RWKV7_ACTIVATION_BUDGET": "0.6"},  # the default until the fourth 2026-11-26 session
    "ours_state_tuning_budget70": {"RWKV7_ACTIVATION_BUDGET": "0.7"},
    "ours_state_tuning_budget80": {"RWKV7_ACTIVATION_BUDGET": "0.8"},
    "ours_state_tuning_grad_bf16": {"RWKV7_WKV_GRAD_DOT_PREC": "bf16"},  # bf16 products in the WKV gradient
    "ours_state_tuning_grad_tf32": {"RWKV7_WKV_GRAD_DOT_PREC": "tf32"},  # no bf16 products (the default: mixed)
    "ours_state_tuning_grad_fused": {"RWKV7_WKV_GRAD_VARIANT": "fused"},  # the previous gradient kernel
}


def measure(step, tokens: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step()  # the first step compiles (Triton kernels; the blocks too where they run compiled)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    seconds = timed(step, warmup=1, repeat=5)
    return {"tokens_per_s": tokens / seconds, "step_s": seconds, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "first_step_s": first}  # fmt: skip


def kernel_breakdown(step, iters: int = 2) -> dict:
    """Where a step's GPU time goes (torch.profiler): ms per step by kernel family, and the top kernels."""
    kernels = cuda_kernel_ms(step, iters)

    def family(name: str) -> str:
        low = name.lower()
        if any(s in low for s in ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul")):
            return "matmul (cuBLAS)"
        if any(s in name for s in ("_chain_", "_bwd_", "_fwd_kernel", "chunk_rwkv7", "chunk_dplr",
                                   "chunk_fwd", "chunk_bwd", "wy_", "fused_recurrent", "prepare_wy")):
            return "WKV kernels"
        if low.startswith("triton_"):
            return "Inductor-fused elementwise"
        return "other (eager elementwise, loss, optimizer, copies)"

    families: dict[str, float] = {}
    for name, ms in kernels.items():
        families[family(name)] = families.get(family(name), 0.0) + ms
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15])
    return {"ms_per_step_by_family": families, "top_kernels_ms": top}


def ours(batch, seq, checkpointing: bool, compile_blocks: bool | None = None) -> dict:
    """``compile_blocks`` None: the default (blocks compiled on CUDA, modeling_rwkv7/compiled_blocks.py)."""
    model, step = state_tuning_step(batch, seq, checkpointing, compile_blocks)
    out = measure(step, batch * seq)
    if PROFILE:
        out["profile"] = kernel_breakdown(step)
    # Frozen weights must get no gradient at all.
    out["weight_grads_computed"] = sum(p.grad is not None for p in model.parameters())
    return out


def lora(batch, seq) -> dict:
    model, _ = random_model_0_1b()
    config = LoraConfig(r=16, target_modules=r".*\.att\.(receptance|key|value|output)")
    peft_model = get_peft_model(model, config)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 65536, (batch, seq), device="cuda")

    def step():
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = measure(step, batch * seq)
    return out


def fla_peer(batch, seq) -> dict:
    """fla 0.6.0's RWKV7ForCausalLM, frozen, with trainable states injected into chunk_rwkv7
    through its cache (the only way its HF model takes a state); no gradient checkpointing (it
    would drop the injected state)."""
    from fla.models import RWKV7Config, RWKV7ForCausalLM
    from fla.models.utils import Cache

    config = RWKV7Config(
        vocab_size=65536, hidden_size=768, num_hidden_layers=12, head_dim=64, decay_low_rank_dim=64,
        a_low_rank_dim=64, v_low_rank_dim=32, gate_low_rank_dim=128, intermediate_size=3072,
    )  # fmt: skip
    model = RWKV7ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.train()
    states = [torch.zeros(1, 12, 64, 64, device="cuda", requires_grad=True) for _ in range(12)]
    opt = torch.optim.AdamW(states, lr=1e-3)
    ids = torch.randint(0, 65536, (batch, seq), device="cuda")

    def step():
        cache = Cache.from_legacy_cache(
            [{"recurrent_state": s.expand(batch, -1, -1, -1), "attn_state": None, "conv_state": None,
              "ffn_state": None} for s in states]  # fmt: skip
        )
        loss = model(input_ids=ids, labels=ids, past_key_values=cache, use_cache=False).loss
        loss.backward()
        assert states[0].grad is not None, "fla: the injected state got no gradient"
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = measure(step, batch * seq)
    if PROFILE:
        out["profile"] = kernel_breakdown(step)
    return out


def add_ratios(runs: dict) -> None:
    """speed_vs_fla / memory_vs_fla of every run measured beside the peer: in this invocation, or merged from
    the same file as the peer (its run on the other GPU of a host at the same time). Runs merged from other
    invocations keep their numbers but get no ratio: their peer was another run."""
    peers = [r for n, r in runs.items() if n.startswith("fla_state_tuning") and "tokens_per_s" in r]
    peer = max(peers, key=lambda r: r["tokens_per_s"], default={})
    for r in runs.values():
        r.pop("speed_vs_fla", None)
        r.pop("memory_vs_fla", None)
        beside_peer = r.get("merged_from") in (None, peer.get("merged_from"))
        if "tokens_per_s" in r and "tokens_per_s" in peer and beside_peer:
            r["speed_vs_fla"] = r["tokens_per_s"] / peer["tokens_per_s"]
            r["memory_vs_fla"] = r["peak_gb"] / peer["peak_gb"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--runs", nargs="*", default=None, help="run only these (names as in the JSON)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-timeout", type=float, default=150.0, help="seconds per configuration (its own process)")
    parser.add_argument("--profile", action="store_true", help="add a per-kernel-family breakdown of one step")
    parser.add_argument("--add-runs", nargs="*", default=[], metavar="JSON",
                        help="start from the runs of these bench_train.json (same batch and length), e.g. the peer "
                             "run at the same time on another GPU of the host; `--runs` with no name then only merges")
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile
    restrict_fla_autotune()  # same reduced space as bench_kernels.py, to fit the device's time limits
    results = {"device": device_info(), "batch": args.batch, "seq": args.seq, "fla_autotune": "reduced", "runs": {}}
    for path in args.add_runs:
        other = json.loads(Path(path).read_text())
        if (other["batch"], other["seq"]) != (args.batch, args.seq):
            raise SystemExit(f"--add-runs {path}: batch/seq {other['batch']}/{other['seq']}, not {args.batch}/{args.seq}")
        if other["device"]["gpu"] != results["device"]["gpu"]:
            raise SystemExit(f"--add-runs {path}: measured on {other['device']['gpu']}, this is {results['device']['gpu']}")
        for name, r in other["runs"].items():
            results["runs"][name] = {"merged_from": str(path), **r}
    runs = {  # the peer first: a run cut by a time limit still has it to compare with
        "fla_state_tuning": lambda: fla_peer(args.batch, args.seq),
        # The peer again in a fresh process: its autotuner's choice varies from process to process (206 k and
        # 262 k tok/s in two runs on H200s); ratios use its fastest run.
        "fla_state_tuning_repeat": lambda: fla_peer(args.batch, args.seq),
        "ours_state_tuning": lambda: ours(args.batch, args.seq, checkpointing=False),
        "ours_state_tuning_ckpt": lambda: ours(args.batch, args.seq, checkpointing=True),
        "ours_state_tuning_eager": lambda: ours(args.batch, args.seq, checkpointing=False, compile_blocks=False),
        "ours_lora_r16": lambda: lora(args.batch, args.seq),
    }
    for name in RUN_ENV:  # the default step under other settings (environment variables of its process)
        runs.setdefault(name, runs["ours_state_tuning"])
    names = [n for n in runs if args.runs is None or n in args.runs]
    if args.child:  # one run in this process; the parent reads the line below
        r = runs[names[0]]()
        print("RESULT " + json.dumps(r), flush=True)
        return
    for name in names:
        # Each run in a fresh process: peak memory, allocator and compiled graphs start clean.
        cmd = [sys.executable, __file__, "--child", "--runs", name, "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--profile"] if args.profile else []
        try:
            env = {**os.environ, **RUN_ENV.get(name, {})}
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout, env=env)
        except subprocess.TimeoutExpired as err:
            results["runs"][name] = {"error": f"timed out after {args.run_timeout} s", "trace": str(err.stdout)[-3000:]}
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode == 0 and lines:
                results["runs"][name] = json.loads(lines[-1][len("RESULT ") :])
            else:
                results["runs"][name] = {"error": f"exit code {proc.returncode}", "trace": (proc.stdout + proc.stderr)[-3000:]}
            if name in RUN_ENV:
                results["runs"][name]["env"] = RUN_ENV[name]
        print(name, {k: v for k, v in results["runs"][name].items() if k != "trace"}, flush=True)
        write_results("bench_train", results)  # after every run: a cut-off job keeps what it measured
    add_ratios(results["runs"])
    print(write_results("bench_train", results))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = {k: v for k, v in results["runs"].items() if "tokens_per_s" in v}
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].bar(list(ok), [v["tokens_per_s"] / 1e3 for v in ok.values()])
        axes[0].set_ylabel("k tokens/s")
        axes[1].bar(list(ok), [v["peak_gb"] for v in ok.values()])
        axes[1].set_ylabel("peak GB")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30)
        fig.suptitle(f"state-tuning train step, 0.1B, B={args.batch} T={args.seq}, {results['device']['gpu']}")
        fig.tight_layout()
        fig.savefig(RESULTS / "bench_train.png", dpi=100)
    except Exception as err:  # noqa: BLE001
        print("plot failed:", err)


if __name__ == "__main__":
    main()
