"""Sweep our WKV-7 kernel's knobs on one shape and profile where the time goes (GPU only).

For every (chunk BT, V-block BV, scan precision, per-chunk warps, gradient-kernel variant, its V-block
and warps) it times forward+backward and measures the error of ``o`` and ``dh0`` against an fp32
reference (see ``bench_kernels.py``); then it runs the best setting (the best of each other
gradient-kernel variant too, and, with ``--fla``, the peer) under ``torch.profiler`` and lists the
CUDA time of each kernel. Writes ``benchmarks/results/tune_kernels.json``.

    python benchmarks/tune_kernels.py [--shape 8x4096x12x64] [--fla]

The default sweep compares the gradient kernels ("fused" ``_bwd_grad_kernel`` against "split"
``_bwd_dv_kernel`` + ``_bwd_kgrad_kernel``, ``RWKV7_WKV_GRAD_VARIANT``) over BT {32, 64}, gradient
V-block {16, 32, 64} and gradient warps {4, 8}, with the scan settings fixed at the best of the earlier
sweep (H100: BV 64, tf32; that sweep was ``--bvs 16,32,64 --scan-precs tf32,tf32x3,ieee``). Fused-kernel
settings that were already measured to lose are skipped unless ``--full-grid`` (see ``worth_running``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

from bench_kernels import ShapeData, bench_variant, fla_fn, ours_fn
from common import RESULTS, cuda_kernel_ms, restrict_fla_autotune


def kernel_profile(data, fn, iters: int = 5) -> dict[str, float]:
    """Mean CUDA milliseconds per forward+backward of each kernel launched by ``fn``."""
    ins = [x.detach().clone().requires_grad_() for x in data.xs]
    hh = data.h0.detach().clone().requires_grad_()
    do_b = data.do.to(torch.bfloat16)

    def step():
        o, _ = fn(*ins, hh)
        o.backward(do_b)

    step()
    torch.cuda.synchronize()
    return cuda_kernel_ms(step, iters)


def worth_running(variant: str, bt: int, gbv: int, gwarps: int) -> bool:
    """Skip settings known (or predicted) to lose. Fused (H100, 8x4096x12x64, tune_kernels.json before
    the split): its V-block 32 was slower than 64 (4.78 vs 4.37 ms), so 16 is not tried; 8 warps were
    slower at BT 32 (4.74 ms), and BT 64 with 4 warps took 7.4 ms (register spills), so BT 64 only
    with 8. Split: at BT 64 only 8 warps (ptxas, sm_90a: its K-side kernel spills ~1 KB per thread
    at 4 warps, none at 8)."""
    if variant == "split":
        return bt < 64 or gwarps >= 8
    return gbv >= 32 and gwarps == (8 if bt == 64 else 4)


def split_tiles(bt: int, n: int, kbv: int, bk: int) -> tuple[int, int]:
    """The K-side kernel's V-block and K-block that a "split" setting runs with (0: the kernel default)."""
    from rwkv7_kernels.triton_wkv7 import _split_grad_tiles

    for name in ("RWKV7_WKV_GRAD_KBV", "RWKV7_WKV_GRAD_BK"):
        os.environ.pop(name, None)
    d_kbv, d_bk = _split_grad_tiles(bt, n, n)
    return min(n, kbv or d_kbv), min(n, bk or d_bk)


def set_env(cfg: dict) -> None:
    os.environ.update(RWKV7_WKV_BV=str(cfg["BV"]), RWKV7_WKV_SCAN_PREC=cfg["scan_prec"],
                      RWKV7_WKV_DOT_PREC=cfg.get("dot_prec", "tf32"),
                      RWKV7_WKV_GRAD_DOT_PREC=cfg.get("grad_dot_prec", "same").replace("same", ""),
                      RWKV7_WKV_PAR_WARPS=str(cfg["par_warps"]), RWKV7_WKV_GRAD_VARIANT=cfg["grad_variant"],
                      RWKV7_WKV_GRAD_BV=str(cfg["grad_bv"]), RWKV7_WKV_GRAD_WARPS=str(cfg["grad_warps"]))
    for name, key in (("RWKV7_WKV_GRAD_KBV", "grad_kbv"), ("RWKV7_WKV_GRAD_BK", "grad_bk")):
        if cfg.get(key):
            os.environ[name] = str(cfg[key])
        else:
            os.environ.pop(name, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8x4096x12x64")
    ap.add_argument("--chunks", default="32,64")
    ap.add_argument("--bvs", default="64", help="V-block of the serial kernels, head sizes over 64 (RWKV7_WKV_BV)")
    ap.add_argument("--scan-precs", default="tf32", help="precision of the scans' products (RWKV7_WKV_SCAN_PREC)")
    ap.add_argument("--dot-precs", default="tf32",
                    help="precision of the intra-chunk products (RWKV7_WKV_DOT_PREC): tf32, bf16, tf32x3, ieee")
    ap.add_argument("--grad-dot-precs", default="same",
                    help="precision of the gradient kernels' products only (RWKV7_WKV_GRAD_DOT_PREC: tf32, mixed, bf16, ...); "
                         "same: the variable unset (the kernels' default: mixed at TF32 products)")
    ap.add_argument("--par-warps", default="4", help="warps of the chained kernels (RWKV7_WKV_PAR_WARPS)")
    ap.add_argument("--grad-variants", default="fused,split", help="gradient kernel(s) (RWKV7_WKV_GRAD_VARIANT)")
    ap.add_argument("--grad-bvs", default="16,32,64",
                    help="V-block of the fused kernel's loop / of a split dv program (RWKV7_WKV_GRAD_BV)")
    ap.add_argument("--grad-warps", default="4,8", help="warps of the gradient kernel(s) (RWKV7_WKV_GRAD_WARPS)")
    ap.add_argument("--grad-kbvs", default="0", help="split: V-block of the K-side kernel's loop (RWKV7_WKV_GRAD_KBV; "
                    "0 = its default for the chunk size)")
    ap.add_argument("--grad-bks", default="0",
                    help="split: K-block of the K-side kernel (RWKV7_WKV_GRAD_BK; 0 = its default)")
    ap.add_argument("--full-grid", action="store_true", help="also run the settings worth_running() skips")
    ap.add_argument("--fla", action="store_true", help="also profile flash-linear-attention's chunk_rwkv7")
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split("x"))
    data = ShapeData(shape)
    log = lambda m: print(m, flush=True)  # noqa: E731
    sweep = []
    ints = lambda text: [int(c) for c in text.split(",")]  # noqa: E731
    grid = itertools.product(ints(args.chunks), ints(args.bvs), args.scan_precs.split(","), args.dot_precs.split(","),
                             args.grad_dot_precs.split(","), ints(args.par_warps),
                             args.grad_variants.split(","), ints(args.grad_bvs), ints(args.grad_warps),
                             ints(args.grad_kbvs), ints(args.grad_bks))
    seen = set()
    t_sweep = time.time()
    for bt, bv, prec, dot_prec, grad_dot_prec, warps, variant, gbv, gw, kbv, bk in grid:
        if not (args.full_grid or worth_running(variant, bt, gbv, gw)):
            continue
        # the K-side blocks exist only in the split variant: resolved to the values it runs with
        kbv, bk = split_tiles(bt, shape[3], kbv, bk) if variant == "split" else (None, None)
        cfg = dict(BT=bt, BV=bv, scan_prec=prec, dot_prec=dot_prec, grad_dot_prec=grad_dot_prec, par_warps=warps,
                   grad_variant=variant, grad_bv=gbv, grad_warps=gw, grad_kbv=kbv, grad_bk=bk)
        if tuple(cfg.values()) in seen:
            continue
        seen.add(tuple(cfg.values()))
        set_env(cfg)
        name = f"bt{bt}-bv{bv}-{prec}-dot{dot_prec}-grad{grad_dot_prec}-w{warps}-{variant}-gbv{gbv}-gw{gw}" + (f"-kbv{kbv}-bk{bk}" if kbv else "")
        try:
            row = bench_variant(data, name, ours_fn(bt), log)
        except Exception as e:  # noqa: BLE001  (a setting that does not compile is recorded, not fatal)
            row = dict(error=repr(e)[:300])
            log(f"[tune] {name} failed: {row['error']}")
        sweep.append(dict(**cfg, **row))
    log(f"[tune] sweep: {len(sweep)} settings in {time.time() - t_sweep:.0f} s")
    ok = [r for r in sweep if "fwd_bwd_ms" in r]
    best = min(ok, key=lambda r: r["fwd_bwd_ms"])
    log(f"[tune] best: {best}")
    set_env(best)
    result = dict(device=torch.cuda.get_device_name(), shape=list(shape), sweep=sweep, best=best,
                  profile_ours=kernel_profile(data, ours_fn(best["BT"])))
    # The best setting of every other gradient variant, profiled too (kernel times side by side).
    names = ["profile_ours"]
    for variant in sorted({r["grad_variant"] for r in ok} - {best["grad_variant"]}):
        other = min((r for r in ok if r["grad_variant"] == variant), key=lambda r: r["fwd_bwd_ms"])
        log(f"[tune] best {variant}: {other}")
        result[f"best_{variant}"] = other
        set_env(other)
        result[f"profile_ours_{variant}"] = kernel_profile(data, ours_fn(other["BT"]))
        names.append(f"profile_ours_{variant}")
    set_env(best)
    if args.fla:
        restrict_fla_autotune()
        result["profile_fla"] = kernel_profile(data, fla_fn())
    for name in names + ["profile_fla"]:
        for k, ms in list(result.get(name, {}).items())[:12]:
            log(f"[{name}] {ms:8.3f} ms  {k}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tune_kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
