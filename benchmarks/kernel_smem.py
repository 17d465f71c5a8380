"""Shared memory and register spills of every Triton WKV-7 kernel launch, compiled for sm_90 without a GPU.

    python benchmarks/kernel_smem.py [--heads 64,128,256] [--dtypes fp32,bf16] [--chunks 16,32,64]
                                     [--variants fused,split] [--limit-kb 200] [--jobs N]

Why: a kernel whose shared memory exceeds the GPU's (H100: 227 KB = 232448 bytes per block) fails at
launch with ``OutOfResources``, and that happened on an H100 for head size 256 (upscaled states). Triton
can compile for any target ahead of time (``triton.compile`` + ``GPUTarget("cuda", 90, 32)``: LLVM and
ptxas only), so the budget is checked here, on a CPU-only machine.

The launch parameters are not restated here: forward + backward of ``wkv7_triton`` run on ``meta``
tensors with every kernel replaced by a recorder, so what is compiled is exactly what the launch code
would launch (block sizes, warps, stages, constexpr flags) for each head size, dtype, chunk and
gradient variant. The default limit (200 KB) leaves a margin under 227 KB because the GPU runs an older
Triton (3.6) than this machine may have (the one case compared: 376832 bytes there, 368640 with 3.9).
Registers and spills are ptxas's report (``-v``) from the ptxas that Triton uses here; kernels that
spill a lot are sometimes reported with 32 registers. Exits 0 if every kernel fits, 1 if one is over
the limit, 77 if this Triton cannot compile for sm_90 (no NVIDIA backend or ptxas).
"""

from __future__ import annotations

import os

# The kernels must be real JIT functions, not the interpreter's stand-ins (tests set this variable).
os.environ.pop("TRITON_INTERPRET", None)
os.environ["RWKV7_WKV_TRUST_DECAY"] = "1"  # meta tensors have no values: skip the decay check

import argparse
import contextlib
import io
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
import triton.language as tl

H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
KERNELS = ("_chain_fwd_kernel", "_chain_bwd_kernel", "_fwd_kernel", "_bwd_state_kernel",
           "_bwd_grad_kernel", "_bwd_dv_kernel", "_bwd_kgrad_kernel", "_decode_kernel")  # fmt: skip
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32"}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **meta)`` records the call instead of launching."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((self.name, args, meta))


@contextlib.contextmanager
def _recording(module, calls: list):
    saved = {name: getattr(module, name) for name in KERNELS}
    for name in KERNELS:
        setattr(module, name, _Recorder(name, calls))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def record_launches(N: int, dtype: torch.dtype, chunk: int, variant: str) -> list:
    """Every kernel launch of a training step (forward + backward with initial state, final state and
    its gradient) and of a decode step, for head size ``K = V = N``. ``variant``: "default" (the
    launch code's choice for this head size and chunk), or "fused" / "split" forced."""
    from rwkv7_kernels import triton_wkv7

    calls: list = []
    if variant == "default":
        os.environ.pop("RWKV7_WKV_GRAD_VARIANT", None)
    else:
        os.environ["RWKV7_WKV_GRAD_VARIANT"] = variant
    B, T, H = 1, 2 * chunk, 2  # sizes other than the head size do not reach any constexpr
    xs = [torch.empty(B, T, H, N, device="meta", dtype=dtype, requires_grad=True) for _ in range(6)]
    h0 = torch.empty(B, H, N, N, device="meta", requires_grad=True)
    with _recording(triton_wkv7, calls):
        o, ht = triton_wkv7.wkv7_triton(*xs, initial_state=h0, output_final_state=True, chunk_size=chunk)
        (o.float().sum() + ht.sum()).backward()
        state = torch.empty(B, H, N, N, device="meta")
        triton_wkv7.wkv7_decode_triton(*(x.detach()[:, :1] for x in xs), state)
    return calls


def _compile_spec(name: str, args: tuple, meta: dict):
    """(kernel name, signature, constexprs, options) of one recorded launch, hashable for de-duplication."""
    from rwkv7_kernels import triton_wkv7

    fn = getattr(triton_wkv7, name)
    meta = dict(meta)
    options = (("num_warps", meta.pop("num_warps", 4)), ("num_stages", meta.pop("num_stages", 3)))
    if "maxnreg" in meta:  # a launch option (register cap), not a kernel argument
        options += (("maxnreg", meta.pop("maxnreg")),)
    bound = {**dict(zip(fn.arg_names, args)), **meta}  # arguments given by position or by name
    signature, constexprs = [], []
    for param in fn.params:
        value = bound[param.name]
        if param.is_constexpr or value is None:  # Triton specialises None arguments as constexprs
            signature.append((param.name, "constexpr"))
            constexprs.append((param.name, value))
        elif isinstance(value, torch.Tensor):
            signature.append((param.name, _PTR[value.dtype]))
        else:
            signature.append((param.name, "i32"))
    return name, tuple(signature), tuple(constexprs), options


@triton.jit
def _probe_kernel(x):
    tl.store(x, 1.0)


def sm90_unavailable() -> str | None:
    """Why this Triton cannot compile for sm_90 here (None if it can)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            triton.compile(ASTSource(fn=_probe_kernel, signature={"x": "*fp32"}), target=GPUTarget("cuda", 90, 32))
    except Exception as err:  # noqa: BLE001  (missing backend, ptxas, ...: all mean "cannot check here")
        return f"{type(err).__name__}: {err}"
    return None


def _compile(spec) -> tuple[int, int, int, float]:
    """Compile one launch for sm_90a; returns (shared bytes, registers, spill-store bytes, seconds)."""
    from rwkv7_kernels import triton_wkv7
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, signature, constexprs, options = spec
    fn = getattr(triton_wkv7, name)
    signature = dict(signature)
    # torch allocations are 16-byte aligned and the launcher tells the compiler so; do the same
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    log = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(options))
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    return (compiled.metadata.shared, int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else -1,
            time.perf_counter() - t)


def _fresh_cache() -> None:
    """Compile into an empty cache, so that ptxas runs (and reports spills) for every kernel."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="wkv7_smem_")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; silences Triton 3.9's notice


def measure(heads, dtypes, chunks, variants, jobs: int | None = None) -> list[dict]:
    """One row per distinct kernel compilation: the cases that launch it, its shared memory, registers
    and spills (see :func:`_fresh_cache`)."""
    specs: dict = {}
    for N in heads:
        for dname in dtypes:
            for chunk in chunks:
                for variant in variants:
                    for name, args, meta in record_launches(N, _DTYPES[dname], chunk, variant):
                        spec = _compile_spec(name, args, meta)
                        specs.setdefault(spec, []).append(f"N{N}/{dname}/chunk{chunk}/{variant}")
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        results = list(pool.map(_compile, specs))
    rows = []
    for (spec, cases), (shared, regs, spills, secs) in zip(specs.items(), results):
        name, _, constexprs, options = spec
        c, o = dict(constexprs), dict(options)
        blocks = " ".join(f"{k}={c[k]}" for k in ("BT", "BV", "BK", "PREC", "FORWARD") if k in c)
        rows.append(dict(kernel=name, K=c.get("K"), V=c.get("V"), blocks=blocks, warps=o["num_warps"],
                         stages=o["num_stages"], shared=shared, regs=regs, spills=spills, secs=secs, cases=cases))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="64,128,256")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--chunks", default="16,32,64", help="requested chunk sizes (fp32 is capped by the launch code)")
    p.add_argument("--variants", default="default,split",
                   help="gradient-kernel variants: default (the launch code's choice), fused, split "
                   "(RWKV7_WKV_GRAD_VARIANT forced; fused does not fit beyond BT x head size = 4096, by design)")
    p.add_argument("--limit-kb", type=float, default=200.0)
    p.add_argument("--jobs", type=int, default=None)
    args = p.parse_args(argv)
    t = time.perf_counter()
    _fresh_cache()
    try:
        reason = sm90_unavailable()
        if reason:
            print(f"cannot compile for sm_90 here: {reason}", file=sys.stderr)
            return 77
        rows = measure([int(x) for x in args.heads.split(",")], args.dtypes.split(","),
                       [int(x) for x in args.chunks.split(",")], args.variants.split(","), args.jobs)
    finally:
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    limit = int(args.limit_kb * 1024)
    print(f"{'kernel':<18} {'K':>4} {'V':>4} {'blocks':<34} {'warps':>5} {'stg':>3} {'shared':>7} {'regs':>4} "
          f"{'spill':>6}  cases")
    over = []
    for r in sorted(rows, key=lambda r: (r["K"], r["kernel"], r["blocks"])):
        flag = "  OVER" if r["shared"] > limit else ""
        print(f"{r['kernel']:<18} {r['K']:>4} {r['V']:>4} {r['blocks']:<34} {r['warps']:>5} {r['stages']:>3} "
              f"{r['shared']:>7} {r['regs']:>4} {r['spills']:>6}  {len(r['cases'])} e.g. {r['cases'][0]}{flag}")
        if r["shared"] > limit:
            over.append(r)
    print(f"{len(rows)} compilations in {time.perf_counter() - t:.1f} s; limit {limit} bytes "
          f"({args.limit_kb:g} KB; sm_90 has {H100_SMEM}); largest {max(r['shared'] for r in rows)}")
    if over:
        print(f"{len(over)} over the limit", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
