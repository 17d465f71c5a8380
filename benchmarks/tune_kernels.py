"""Sweep our WKV-7 kernel's knobs on one shape and profile where the time goes (GPU only).

For every (chunk BT, V-block BV, scan precision) it times forward+backward and measures the error of
``o`` and ``dh0`` against an fp32 reference (see ``bench_kernels.py``); then it runs the best setting
(and, with ``--fla``, the peer) under ``torch.profiler`` and lists the CUDA time of each kernel.
Writes ``benchmarks/results/tune_kernels.json``.

    python benchmarks/tune_kernels.py [--shape 8x4096x12x64] [--fla]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

from bench_kernels import ShapeData, bench_variant, fla_fn, ours_fn
from common import RESULTS, restrict_fla_autotune


def kernel_profile(data, fn, iters: int = 5) -> dict[str, float]:
    """Mean CUDA milliseconds per forward+backward of each kernel launched by ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    ins = [x.detach().clone().requires_grad_() for x in data.xs]
    hh = data.h0.detach().clone().requires_grad_()
    do_b = data.do.to(torch.bfloat16)

    def step():
        o, _ = fn(*ins, hh)
        o.backward(do_b)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t:
            rows[evt.key[:80]] = t / 1e3 / iters
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8x4096x12x64")
    ap.add_argument("--chunks", default="32,64")
    ap.add_argument("--bvs", default="16,32,64")
    ap.add_argument("--scan-precs", default="tf32,tf32x3,ieee")
    ap.add_argument("--par-warps", default="4", help="warps of the per-chunk kernels (RWKV7_WKV_PAR_WARPS)")
    ap.add_argument("--grad-bvs", default="64", help="V-block of the gradient kernel (RWKV7_WKV_GRAD_BV)")
    ap.add_argument("--fla", action="store_true", help="also profile flash-linear-attention's chunk_rwkv7")
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split("x"))
    data = ShapeData(shape)
    log = lambda m: print(m, flush=True)  # noqa: E731
    sweep = []
    ints = lambda text: [int(c) for c in text.split(",")]  # noqa: E731
    grid = itertools.product(ints(args.chunks), ints(args.bvs), args.scan_precs.split(","), ints(args.par_warps),
                             ints(args.grad_bvs))
    for bt, bv, prec, warps, gbv in grid:
        os.environ.update(RWKV7_WKV_BV=str(bv), RWKV7_WKV_SCAN_PREC=prec, RWKV7_WKV_PAR_WARPS=str(warps),
                          RWKV7_WKV_GRAD_BV=str(gbv))
        name = f"bt{bt}-bv{bv}-{prec}-w{warps}-gbv{gbv}"
        try:
            row = bench_variant(data, name, ours_fn(bt), log)
        except Exception as e:  # noqa: BLE001  (a setting that does not compile is recorded, not fatal)
            row = dict(error=repr(e)[:300])
            log(f"[tune] {name} failed: {row['error']}")
        sweep.append(dict(BT=bt, BV=bv, scan_prec=prec, par_warps=warps, grad_bv=gbv, **row))
    ok = [r for r in sweep if "fwd_bwd_ms" in r]
    best = min(ok, key=lambda r: r["fwd_bwd_ms"])
    log(f"[tune] best: {best}")
    os.environ.update(RWKV7_WKV_BV=str(best["BV"]), RWKV7_WKV_SCAN_PREC=best["scan_prec"],
                      RWKV7_WKV_PAR_WARPS=str(best["par_warps"]), RWKV7_WKV_GRAD_BV=str(best["grad_bv"]))
    result = dict(device=torch.cuda.get_device_name(), shape=list(shape), sweep=sweep, best=best,
                  profile_ours=kernel_profile(data, ours_fn(best["BT"])))
    if args.fla:
        restrict_fla_autotune()
        result["profile_fla"] = kernel_profile(data, fla_fn())
    for name in ("profile_ours", "profile_fla"):
        for k, ms in list(result.get(name, {}).items())[:12]:
            log(f"[{name}] {ms:8.3f} ms  {k}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tune_kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
