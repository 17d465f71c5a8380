"""Long sequences with flat memory: chunked prefill on CPU, chunked (truncated-BPTT) training on GPU.

CPU mode (the default): a small random RWKV-7 (world vocabulary, fp32) reads T tokens with
``peft_state_tuning.chunked_prefill`` (state carried chunk to chunk, ``use_cache``). Every length
runs in a fresh subprocess, which reports its wall time and its peak resident memory (``ru_maxrss``)
together with the resident memory after loading the model, so the growth with T is visible::

    python benchmarks/bench_long.py --mode cpu                      # T = 16k, 128k, 1M
    python benchmarks/bench_long.py --mode cpu --lengths 16384 65536 --hidden 128 --layers 2

writes ``benchmarks/results/bench_long_cpu.json``.

GPU mode: the 0.1B shape (``common.random_model_0_1b``, bf16) with a state-tuning adapter; one
training step (forward + backward + AdamW) of a single sequence of T tokens with
``chunked_loss_backward`` (chunks of ``--chunk-len`` tokens) for T = 4k, 16k, 64k, 256k; peak
``torch.cuda.max_memory_allocated`` of the step, its time and tokens/s, and for comparison the plain
full-sequence step where it fits. Passes when every chunked peak is within 10% of T = 4k's::

    python benchmarks/bench_long.py --mode gpu

writes ``benchmarks/results/bench_long.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import RESULTS, device_info, write_results  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# ---- CPU: one length, in this process ---------------------------------------------------------------


def cpu_child(T: int, hidden: int, layers: int, vocab: int, chunk_len: int, threads: int | None) -> dict:
    import peft_state_tuning  # noqa: F401
    from checkpoints import random_official_state_dict
    from modeling_rwkv7 import Rwkv7ForCausalLM
    from modeling_rwkv7.convert import config_from_official, official_to_hf
    from peft_state_tuning import chunked_prefill

    if threads:
        torch.set_num_threads(threads)
    sd = random_official_state_dict(vocab=vocab, hidden=hidden, layers=layers, ranks=(32, 32, 16, 32))
    config = config_from_official(sd)
    model = Rwkv7ForCausalLM(config)
    model.load_state_dict(official_to_hf(sd, config))
    model.eval()
    del sd
    ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(0))
    chunked_prefill(model, ids[:, :chunk_len], chunk_len=chunk_len)  # warm-up (allocator, first calls)
    rss_loaded = _rss_mb()
    peak_before = _peak_rss_mb()
    t0 = time.perf_counter()
    cache, logits = chunked_prefill(model, ids, chunk_len=chunk_len)
    seconds = time.perf_counter() - t0
    assert cache.seen_tokens == T and torch.isfinite(logits).all()
    return {
        "T": T,
        "seconds": seconds,
        "tokens_per_s": T / seconds,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_before_prefill_mb": peak_before,
        "peak_rss_mb": _peak_rss_mb(),
        "growth_mb": _peak_rss_mb() - rss_loaded,
    }


def run_cpu(args) -> dict:
    rows = []
    for T in args.lengths:
        cmd = [sys.executable, __file__, "--child", str(T), "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--vocab", str(args.vocab), "--chunk-len", str(args.chunk_len)]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"T={T:>8}: {row['tokens_per_s']:>9.0f} tokens/s, {row['seconds']:7.1f} s, peak RSS {row['peak_rss_mb']:7.1f} MB "
              f"(after load {row['rss_after_load_mb']:.1f} MB, growth {row['growth_mb']:.1f} MB)", flush=True)  # fmt: skip
    peaks = [r["peak_rss_mb"] for r in rows]
    payload = {
        "mode": "cpu",
        "what": "chunked_prefill (use_cache, state carried between chunks), batch 1, fp32, no_grad",
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "head_dim": 64},
        "chunk_len": args.chunk_len,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": args.threads or torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},  # fmt: skip
        "results": rows,
        "peak_rss_spread_mb": max(peaks) - min(peaks),
    }
    path = RESULTS / "bench_long_cpu.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return payload


# ---- GPU: chunked training at the 0.1B shape -------------------------------------------------------


def run_gpu(args) -> dict:
    from common import random_model_0_1b
    from peft import get_peft_model

    import peft_state_tuning  # noqa: F401
    from peft_state_tuning import StateTuningConfig, chunked_loss_backward

    model, _ = random_model_0_1b()
    peft_model = get_peft_model(model, StateTuningConfig())
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def chunked_step(ids):
        loss = chunked_loss_backward(peft_model, ids, chunk_len=args.chunk_len)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def full_step(ids):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def measure(step, T):
        ids = torch.randint(0, 65536, (1, T), device="cuda")
        step(ids)  # warm-up: Triton autotuning, allocator
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = step(ids)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
        return {"T": T, "peak_gb": peak / 1e9, "peak_above_resident_gb": (peak - base) / 1e9, "step_s": seconds,
                "tokens_per_s": T / seconds, "loss": float(loss)}  # fmt: skip

    chunked, full = [], []
    for T in args.gpu_lengths:
        row = measure(chunked_step, T)
        chunked.append(row)
        print(f"chunked T={T:>7}: peak {row['peak_gb']:.3f} GB, {row['tokens_per_s']:.0f} tokens/s", flush=True)
    for T in args.full_lengths:
        try:
            row = measure(full_step, T)
        except torch.cuda.OutOfMemoryError:
            row = {"T": T, "oom": True}
        full.append(row)
        torch.cuda.empty_cache()
        print(f"full    T={T:>7}: {row}", flush=True)
    ref = chunked[0]["peak_gb"]
    ratios = {str(r["T"]): r["peak_gb"] / ref for r in chunked}
    payload = {
        "mode": "gpu",
        "what": "one state-tuning training step (fwd+bwd+AdamW) of one sequence of T tokens, 0.1B shape, bf16; "
                "chunked = truncated BPTT with chunk_len tokens per chunk (peft_state_tuning.chunked_loss_backward)",
        "chunk_len": args.chunk_len,
        "device": device_info(),
        "chunked": chunked,
        "full_sequence": full,
        "peak_ratio_to_first": ratios,
        "flat_within_10_percent": all(r <= 1.10 for r in ratios.values()),
    }
    path = write_results("bench_long", payload)
    print(json.dumps({"peak_ratio_to_first": ratios, "flat_within_10_percent": payload["flat_within_10_percent"]}))
    print(f"wrote {path}")
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 131072, 1048576], help="CPU: tokens")
    parser.add_argument("--gpu-lengths", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    parser.add_argument("--full-lengths", type=int, nargs="*", default=[4096, 16384, 65536],
                        help="GPU: also measure the unchunked step at these lengths (for comparison)")
    parser.add_argument("--chunk-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(cpu_child(args.child, args.hidden, args.layers, args.vocab, args.chunk_len, args.threads)))
        return
    if args.mode == "cpu":
        run_cpu(args)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("--mode gpu needs a CUDA GPU")
        run_gpu(args)


if __name__ == "__main__":
    main()
