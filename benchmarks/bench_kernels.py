"""Benchmark our Triton WKV-7 against flash-linear-attention's ``chunk_rwkv7`` (GPU only).

For each shape (B, T, H, N), bf16 inputs drawn like a real RWKV-7 layer (log decay in
[-0.6065, 0), ``a = -kk``, ``b = kk * iclr``) and an fp32 initial state that needs a gradient:

* forward ms and forward+backward ms (``triton.testing.do_bench``, median), for us and for fla
  ``chunk_rwkv7(..., scale=1.0, safe_gate=True, lower_bound=-0.6065306597, chunk_size=64)``;
* achieved GB/s, counting the fewest bytes the op must move (inputs read once, outputs written once;
  for forward+backward also ``do`` read and every gradient written);
* the relative error ||x - ref|| / ||ref|| of ``o`` and ``dh0`` against an fp32 reference (our
  chunk-parallel PyTorch path run in fp32 on the same bf16-valued inputs).

It also checks correctness on small shapes against the sequential reference first, and times a
decode step (T = 1) against fla's fused recurrent kernels. Writes
``benchmarks/results/bench_kernels.json`` and ``.png``.

    python benchmarks/bench_kernels.py [--chunks 32] [--out benchmarks/results]
    python benchmarks/bench_kernels.py --plot-only      # redraw the png from the json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from common import RESULTS, restrict_fla_autotune

SHAPES = [(8, 4096, 12, 64), (4, 4096, 32, 64), (1, 16384, 32, 64)]
LOWER_BOUND = -0.6065306597


def rwkv_inputs(B, T, H, N, dtype, device, seed=0):
    """Inputs distributed like those of a real RWKV-7 time-mix (fla layout, log decay)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    w = LOWER_BOUND * torch.sigmoid(rnd(B, T, H, N) * 2 - 1)
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(rnd(B, T, H, N))
    h0 = rnd(B, H, N, N) * 0.3
    xs = [x.to(device=device, dtype=dtype) for x in (r, w, k, v, -kk, kk * iclr)]
    return xs, h0.to(device), kk.to(device=device, dtype=dtype), iclr.to(device=device, dtype=dtype)


def rel(x, y):
    x, y = x.detach().double(), y.detach().double()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def fwd_bwd(fn, xs, h0, do, dht=None):
    """Run fn with grads; return o, ht and the grads of (r, w, k, v, a, b, h0)."""
    ins = [x.detach().clone().requires_grad_() for x in xs]
    hh = h0.detach().clone().requires_grad_()
    o, ht = fn(*ins, hh)
    loss = (o.float() * do).sum()
    if dht is not None:
        loss = loss + (ht * dht).sum()
    loss.backward()
    return o, ht, [x.grad for x in ins] + [hh.grad]


# ------------------------------------------------------------------------------------------------
# correctness on small shapes (GPU), against the sequential reference
# ------------------------------------------------------------------------------------------------


def check_correctness(log):
    from rwkv7_kernels.reference import wkv7_reference
    from rwkv7_kernels.triton_wkv7 import wkv7_decode_triton, wkv7_triton

    names = ["o", "ht", "dr", "dw", "dk", "dv", "da", "db", "dh0"]
    worst = {}
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for bt in (16, 32, 64):
            cases.append(dict(B=2, T=301, H=3, N=64, dtype=dtype, bt=bt, varlen=False))
        cases.append(dict(B=1, T=400, H=2, N=64, dtype=dtype, bt=32, varlen=True))
        cases.append(dict(B=2, T=77, H=2, N=128, dtype=dtype, bt=32, varlen=False))
    for cs in cases:
        xs, h0, _, _ = rwkv_inputs(cs["B"], cs["T"], cs["H"], cs["N"], cs["dtype"], "cuda", seed=1)
        cu = torch.tensor([0, 37, 38, 250, 400], device="cuda") if cs["varlen"] else None
        if cu is not None:
            h0 = torch.randn(4, cs["H"], cs["N"], cs["N"], device="cuda") * 0.3
        do = torch.randn(cs["B"], cs["T"], cs["H"], cs["N"], device="cuda")
        dht = torch.randn_like(h0)
        try:
            ours = fwd_bwd(lambda *x: wkv7_triton(*x[:6], initial_state=x[6], output_final_state=True, cu_seqlens=cu,
                                                  chunk_size=cs["bt"]), xs, h0, do, dht)
        except Exception as e:  # noqa: BLE001  (report and go on: one bad config must not hide the rest)
            log(f"[check] FAILED {cs}: {e!r}"[:400])
            worst["failed"] = worst.get("failed", 0) + 1
            continue
        ref = fwd_bwd(lambda *x: wkv7_reference(*[t.float() for t in x[:6]], initial_state=x[6],
                                                output_final_state=True, cu_seqlens=cu), xs, h0, do, dht)
        errs = [rel(ours[0], ref[0]), rel(ours[1], ref[1])] + [rel(g, gr) for g, gr in zip(ours[2], ref[2])]
        tag = f"{str(cs['dtype'])[6:]} BT={cs['bt']} N={cs['N']} T={cs['T']}{' varlen' if cs['varlen'] else ''}"
        log(f"[check] {tag:32s} " + " ".join(f"{n}={e:.1e}" for n, e in zip(names, errs)))
        key = str(cs["dtype"])[6:]
        worst[key] = max(worst.get(key, 0.0), max(errs))
    # decode: a few steps against the reference
    for dtype in (torch.float32, torch.bfloat16):
        xs, h0, _, _ = rwkv_inputs(3, 4, 5, 64, dtype, "cuda", seed=2)
        state = h0.clone().contiguous()
        o_ref, ht_ref = wkv7_reference(*[x.float() for x in xs], initial_state=h0, output_final_state=True)
        outs = [wkv7_decode_triton(*[x[:, t : t + 1] for x in xs], state) for t in range(4)]
        e = max(rel(torch.cat(outs, 1), o_ref), rel(state, ht_ref))
        log(f"[check] decode {str(dtype)[6:]}: max rel err {e:.1e}")
        worst["decode_" + str(dtype)[6:]] = e
    return worst


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


class ShapeData:
    """Inputs, ``do`` and the fp32 reference results of one benchmark shape (built once, shared by variants)."""

    def __init__(self, shape):
        from rwkv7_kernels.chunked_torch import wkv7_chunked_torch

        B, T, H, N = self.shape = shape
        self.xs, self.h0, _, _ = rwkv_inputs(B, T, H, N, torch.bfloat16, "cuda", seed=0)
        torch.manual_seed(0)
        self.do = torch.randn(B, T, H, N, device="cuda")
        # fp32 reference on the same bf16-valued inputs (upcast): our chunk-parallel PyTorch path
        ref = fwd_bwd(lambda *x: wkv7_chunked_torch(*[t.float() for t in x[:6]], initial_state=x[6],
                                                    output_final_state=True), self.xs, self.h0, self.do)
        self.ref_o, self.ref_ht, self.ref_grads = ref[0].float(), ref[1], ref[2]
        del ref
        torch.cuda.empty_cache()
        n_in = B * T * H * N
        s_bytes = self.h0.numel() * 4
        self.bytes_fwd = 6 * n_in * 2 + s_bytes + n_in * 2 + s_bytes  # 6 inputs + h0 read; o + ht written
        self.bytes_fb = self.bytes_fwd + n_in * 2 + 6 * n_in * 2 + s_bytes  # + do read; 6 grads + dh0 written


def bench_variant(data, name, fn, log):
    """Errors against the fp32 reference, then forward and forward+backward medians."""
    import triton

    t0 = time.time()
    o, ht, grads = fwd_bwd(fn, data.xs, data.h0, data.do)
    row = dict(err_o=rel(o, data.ref_o), err_ht=rel(ht, data.ref_ht), err_dh0=rel(grads[-1], data.ref_grads[-1]),
               err_grads_max=max(rel(g, gr) for g, gr in zip(grads[:6], data.ref_grads[:6])))
    del o, ht, grads
    ins = [x.detach().clone().requires_grad_() for x in data.xs]
    hh = data.h0.detach().clone().requires_grad_()
    do_b = data.do.to(torch.bfloat16)
    row["fwd_ms"] = triton.testing.do_bench(lambda: fn(*ins, hh), warmup=50, rep=200, return_mode="median")

    def step():
        o, _ = fn(*ins, hh)
        o.backward(do_b)

    row["fwd_bwd_ms"] = triton.testing.do_bench(step, warmup=50, rep=200, grad_to_none=ins + [hh], return_mode="median")
    row["fwd_GBps"] = data.bytes_fwd / row["fwd_ms"] / 1e6
    row["fwd_bwd_GBps"] = data.bytes_fb / row["fwd_bwd_ms"] / 1e6
    torch.cuda.empty_cache()
    log(f"[bench] {data.shape} {name:12s} fwd {row['fwd_ms']:7.3f} ms  fwd+bwd {row['fwd_bwd_ms']:7.3f} ms  "
        f"err o {row['err_o']:.1e} ht {row['err_ht']:.1e} dh0 {row['err_dh0']:.1e} grads {row['err_grads_max']:.1e}  "
        f"({time.time() - t0:.0f}s)")
    return row


def ours_fn(bt):
    from rwkv7_kernels.triton_wkv7 import wkv7_triton

    # The same bound on w that the peer is given (RWKV-7's layers pass it too): no w.min() and device sync per call.
    return lambda *x: wkv7_triton(*x[:6], initial_state=x[6], output_final_state=True, chunk_size=bt,
                                  lower_bound=LOWER_BOUND)


def fla_fn():
    from fla.ops.rwkv7 import chunk_rwkv7

    return lambda *x: chunk_rwkv7(*x[:6], scale=1.0, initial_state=x[6], output_final_state=True,
                                  safe_gate=True, lower_bound=LOWER_BOUND, chunk_size=64)


def summarize(entry, log):
    rows = entry["variants"]
    ours_rows = [k for k in rows if k.startswith("ours")]
    entry.update(best=None, ratio_fwd=None, ratio_fwd_bwd=None)
    if ours_rows:
        entry["best"] = min(ours_rows, key=lambda k: rows[k]["fwd_bwd_ms"])
    if ours_rows and "fla_chunk64" in rows:
        best, peer = rows[entry["best"]], rows["fla_chunk64"]
        entry.update(ratio_fwd=best["fwd_ms"] / peer["fwd_ms"], ratio_fwd_bwd=best["fwd_bwd_ms"] / peer["fwd_bwd_ms"])
        log(f"[bench] {tuple(entry['shape'])} best {entry['best']}: fwd {entry['ratio_fwd']:.2f}x, "
            f"fwd+bwd {entry['ratio_fwd_bwd']:.2f}x of fla")


def bench_decode(log, with_fla=True):
    """One decode step (T = 1), ours against fla's fused recurrent kernels (forward only)."""
    import triton
    from rwkv7_kernels.triton_wkv7 import wkv7_decode_triton

    if with_fla:
        from fla.ops.rwkv7 import fused_mul_recurrent_rwkv7, fused_recurrent_rwkv7
    out = []
    for B, H, N in [(1, 32, 64), (32, 32, 64), (256, 32, 64)]:
        xs, h0, kk, iclr = rwkv_inputs(B, 1, H, N, torch.bfloat16, "cuda", seed=3)
        state = h0.clone()
        row = dict(B=B, H=H, N=N, ours_ms=triton.testing.do_bench(lambda: wkv7_decode_triton(*xs, state), return_mode="median"))
        if with_fla:
            row["fla_fused_recurrent_ms"] = triton.testing.do_bench(
                lambda: fused_recurrent_rwkv7(*xs, scale=1.0, initial_state=h0, output_final_state=True),
                return_mode="median")
            row["fla_fused_mul_recurrent_ms"] = triton.testing.do_bench(
                lambda: fused_mul_recurrent_rwkv7(xs[0], xs[1], xs[2], xs[3], kk, iclr, scale=1.0, initial_state=h0,
                                                  output_final_state=True), return_mode="median")
        out.append(row)
        log(f"[decode] " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return out


# ------------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------------


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    shapes = result["shapes"]
    names = sorted({n for s in shapes for n in s["variants"]})
    width = 0.8 / len(names)
    for ax, key, title in zip(axes, ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward + backward")):
        for i, name in enumerate(names):
            vals = [s["variants"].get(name, {}).get(key, 0.0) for s in shapes]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(shapes))]
            bars = ax.bar(xs, vals, width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(["B{} T{} H{} N{}".format(*s["shape"]) for s in shapes])
        ax.set_ylabel("ms (median)")
        ax.set_title(f"WKV-7 {title}, bf16 ({result.get('device', '?')})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="16,32,64", help="our chunk sizes to time")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results, from any cwd)")
    ap.add_argument("--shapes", default="all", help="'all' or e.g. 8x4096x12x64,1x16384x32x64")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--skip-fla", action="store_true", help="time only our kernels")
    ap.add_argument("--fla-autotune", choices=["full", "reduced"], default="full",
                    help="'reduced' restricts fla's autotuning to num_warps {4,8} x num_stages {2,3}")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    jpath, ppath = os.path.join(args.out, "bench_kernels.json"), os.path.join(args.out, "bench_kernels.png")
    if args.plot_only:
        plot(json.load(open(jpath)), ppath)
        return

    def log(msg):
        print(msg, flush=True)

    import triton

    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    try:  # the version only: importing fla now would freeze its autotuning spaces (see restrict_fla_autotune)
        from importlib.metadata import version

        result["fla"] = version("fla-core")
    except Exception as e:  # noqa: BLE001
        result["fla"] = f"unavailable: {e}"
    log(json.dumps(result))
    if not args.skip_check:
        result["correctness_max_rel_err"] = check_correctness(log)
    shapes = SHAPES if args.shapes == "all" else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    save = lambda: json.dump(result, open(jpath, "w"), indent=1)  # noqa: E731  (after every step: a cut-off run keeps its numbers)
    datas = {s: ShapeData(s) for s in shapes}
    result["shapes"] = [dict(shape=list(s), variants={}) for s in shapes]
    # ours first (cheap to compile), then the peer, whose autotuning compiles many kernels
    for entry, s in zip(result["shapes"], shapes):
        for bt in chunks:
            try:
                entry["variants"][f"ours_bt{bt}"] = bench_variant(datas[s], f"ours_bt{bt}", ours_fn(bt), log)
            except Exception as e:  # noqa: BLE001
                log(f"[bench] {s} ours_bt{bt} FAILED: {e!r}"[:400])
        summarize(entry, log)
        save()
    if not args.skip_fla:
        result["fla_autotune"] = args.fla_autotune
        if args.fla_autotune == "reduced":
            restrict_fla_autotune()
        for entry, s in zip(result["shapes"], shapes):
            try:
                entry["variants"]["fla_chunk64"] = bench_variant(datas[s], "fla_chunk64", fla_fn(), log)
            except Exception as e:  # noqa: BLE001
                log(f"[bench] {s} fla FAILED: {e!r}"[:400])
            summarize(entry, log)
            save()
    try:
        result["decode"] = bench_decode(log, with_fla=not args.skip_fla)
    except Exception as e:  # noqa: BLE001
        log(f"[decode] failed: {e!r}")
    json.dump(result, open(jpath, "w"), indent=1)
    try:
        plot(result, ppath)
    except ImportError:
        log("matplotlib missing: run with --plot-only later to draw the png")
    log("\nshape              variant        fwd ms  fwd+bwd ms  GB/s(f+b)  err_o    err_ht   err_dh0  err_grads")
    for s in result["shapes"]:
        for name, r in s["variants"].items():
            log(f"{'x'.join(map(str, s['shape'])):18s} {name:12s} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:10.3f} "
                f"{r['fwd_bwd_GBps']:9.0f}  {r['err_o']:.1e}  {r['err_ht']:.1e}  {r['err_dh0']:.1e}  "
                f"{r['err_grads_max']:.1e}")
        if s.get("ratio_fwd_bwd") is not None:
            log(f"{'':18s} ratio (best ours / fla): fwd {s['ratio_fwd']:.2f}  fwd+bwd {s['ratio_fwd_bwd']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
