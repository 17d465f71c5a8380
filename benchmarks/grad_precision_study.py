"""Which products of the WKV gradient kernel can take bf16 operands? An error study on CPU (Triton interpreter).

The products of ``_bwd_grad_kernel`` fall in eight groups (below). For each group this script runs forward +
backward with that group's products on bf16 operands and every other product in fp32 (the interpreter computes
"tf32" products in full fp32), then with every group but one in bf16, and prints the relative error of each
output and gradient against the sequential fp32 reference. It found the two groups that the default "mixed"
gradient precision rounds to bf16 (``RWKV7_WKV_GRAD_DOT_PREC``, see ``kernels/triton_wkv7.py``).

How: a copy of ``_bwd_grad_kernel``'s source with one precision constexpr per group (P0..P7) replaces the real
kernel for these runs (forced "fused" variant). No GPU needed; about 30 s on 2 cores:

    python benchmarks/grad_precision_study.py [--T 256] [--seed 11]
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import textwrap
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import conftest  # noqa: E402,F401  (widens bf16 tl.dot operands in the interpreter, see tests/conftest.py)
import torch  # noqa: E402
from wkv_cases import NAMES, rel, run_with_grads, rwkv_inputs  # noqa: E402

import rwkv7_kernels.triton_wkv7 as tw  # noqa: E402
from rwkv7_kernels.reference import wkv7_reference  # noqa: E402

# (group, statements of _bwd_grad_kernel whose products belong to it)
GROUPS = [
    ("interaction matrices", ["A_rk = _masked_dot_t(rg, kn, False, BT, PREC)", "A_rb = _masked_dot_t(rg, bn, False, BT, PREC)",
                              "A_ak = _masked_dot_t(ag, kn, True, BT, PREC)", "_masked_dot_t(ag, bn, True, BT, PREC)"]),
    ("inverse", ["LOG2_BT, PREC_LO)"]),
    ("u", ["x = _dot(A_ak, v_c, PREC) + _dot(ag, h0, PREC)", "u = _dot(inv, x, PREC)"]),
    ("du, dx", ["du = _dot(tl.trans(A_rb), do_c, PREC) + _dot(bt, dhe, PREC)", "dx = _dot(tl.trans(inv), du, PREC)"]),
    ("dv", ["dv_c = _dot(tl.trans(A_rk), do_c, PREC) + _dot(tl.trans(A_ak), dx, PREC)", "dv_c += _dot(kt, dhe, PREC)"]),
    ("dA", ["dA_rk += _dot(do_c, tl.trans(v_c), PREC)", "dA_rb += _dot(do_c, tl.trans(u), PREC)",
            "dA_ak += _dot(dx, tl.trans(v_c), PREC)", "dA_ab += _dot(dx, tl.trans(u), PREC)"]),
    ("state outer products", ["drg += _dot(do_c, tl.trans(h0), PREC_LO)", "dag += _dot(dx, tl.trans(h0), PREC_LO)",
                              "dkt += _dot(v_c, tl.trans(dhe), PREC_LO)", "dbt += _dot(u, tl.trans(dhe), PREC_LO)"]),
    ("final chain", ["drg += _dot(dA_rk, kn, PREC) + _dot(dA_rb, bn, PREC)", "dag += _dot(dA_ak, kn, PREC) + _dot(dA_ab, bn, PREC)",
                     "dkn = _dot(tl.trans(dA_rk), rg, PREC) + _dot(tl.trans(dA_ak), ag, PREC)",
                     "dbn = _dot(tl.trans(dA_rb), rg, PREC) + _dot(tl.trans(dA_ab), ag, PREC)"]),
]


def grouped_kernel():
    """``_bwd_grad_kernel`` with the precision of group i in constexpr ``P{i}`` (asserts that every statement
    is found, so a changed kernel fails loudly here rather than silently measuring something else)."""
    src = textwrap.dedent(inspect.getsource(tw._bwd_grad_kernel.fn))
    src = src.replace("PREC: tl.constexpr, PREC_LO: tl.constexpr,",
                      "PREC: tl.constexpr, PREC_LO: tl.constexpr, " + ", ".join(f"P{i}: tl.constexpr" for i in range(8)) + ",")
    for i, (_, statements) in enumerate(GROUPS):
        for stmt in statements:
            assert stmt in src, f"statement not found in _bwd_grad_kernel: {stmt}"
            src = src.replace(stmt, stmt.replace("PREC_LO)", f"P{i})").replace("PREC)", f"P{i})"))
    src = src.replace("def _bwd_grad_kernel(", "def _bwd_grad_kernel_grouped(")
    path = Path(tempfile.mkdtemp()) / "grouped_kernel.py"  # triton.jit needs the source in a real file
    path.write_text("import triton\nimport triton.language as tl\nfrom rwkv7_kernels.triton_wkv7 import *\n"
                    "from rwkv7_kernels.triton_wkv7 import _chunk_gates, _chunk_program, _dot, _load_decay_logit, _load_log_decay, _load_tile, "
                    "_masked_dot_t, _state_offsets, _store_decay_grad, _store_tile, _unit_lower_inverse\n\n\n" + src)
    sys.path.insert(0, str(path.parent))
    import grouped_kernel

    return grouped_kernel._bwd_grad_kernel_grouped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    os.environ["RWKV7_WKV_GRAD_VARIANT"] = "fused"
    kernel, precs = grouped_kernel(), ["tf32"] * len(GROUPS)

    inv_arg = kernel.arg_names.index("INV")

    class Launch:  # stands in for tw._bwd_grad_kernel: adds the per-group precisions
        def __getitem__(self, grid):
            def launch(*a, **kw):
                # INV=None: the kernel forms the inverse itself (at its group's precision) instead of
                # reading the forward's, as every gradient kernel did when this study was made.
                a = (*a[:inv_arg], None, *a[inv_arg + 1:])
                return kernel[grid](*a, **kw, **{f"P{i}": p for i, p in enumerate(precs)})

            return launch

    tw._bwd_grad_kernel = Launch()
    B, H, N = 1, 2, 64
    xs = rwkv_inputs(B, args.T, H, N, torch.bfloat16, seed=args.seed)
    h0 = torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(3)) * 0.5
    ref = run_with_grads(lambda *x, **kw: wkv7_reference(*(t.float() for t in x[:6]), **kw), xs, h0)

    def report(name: str, setting: list[str]) -> None:
        precs[:] = setting
        ours = run_with_grads(lambda *a, **kw: tw.wkv7_triton(*a, chunk_size=32, **kw), xs, h0)
        errs = {n: rel(x, y) for n, x, y in zip(NAMES, ours, ref)}
        worst = max(v for k, v in errs.items() if k.startswith("d") and k != "dh0")
        print(f"{name:34s} worst input grad {worst:.2e}  " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)

    report("all fp32", ["tf32"] * 8)
    report("all bf16", ["bf16"] * 8)
    for i, (group, _) in enumerate(GROUPS):
        report(f"only {group} bf16", ["bf16" if j == i else "tf32" for j in range(8)])
    for i, (group, _) in enumerate(GROUPS):
        report(f"all but {group} bf16", ["tf32" if j == i else "bf16" for j in range(8)])
    report("mixed (inverse + state outer)", ["bf16" if j in (1, 6) else "tf32" for j in range(8)])


if __name__ == "__main__":
    main()
