"""The fused LM-loss operator (rwkv7_kernels.cross_entropy_sum_): the Triton kernel (under TRITON_INTERPRET=1
on CPU) and the PyTorch path against F.cross_entropy, loss and the gradient written over the logits."""

import pytest
import torch
import torch.nn.functional as F

from rwkv7_kernels import cross_entropy_sum_


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [50, 5000])  # 5000: two blocks of the kernel's loop, the second one partial
def test_cross_entropy_sum_matches_f_cross_entropy(backend, dtype, vocab):
    g = torch.Generator().manual_seed(0)
    # a row stride larger than the vocabulary: a slice of a wider buffer, as the kernel allows
    buffer = (torch.randn(7, vocab + 3, generator=g) * 3).to(dtype)
    logits = buffer[:, :vocab]
    labels = torch.randint(0, vocab, (7,), generator=g)
    labels[[1, 5]] = -100
    labels[2] = vocab - 1  # the last column
    ref_logits = logits.float().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits, labels, ignore_index=-100, reduction="sum")
    ref.backward()

    loss_only = cross_entropy_sum_(logits.clone(), labels, write_grad=False, backend=backend)
    before = buffer.clone()
    total = cross_entropy_sum_(logits, labels, write_grad=True, backend=backend)

    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert total.dtype == torch.float32 and total.dim() == 0
    torch.testing.assert_close(total, ref.detach(), **tol)
    torch.testing.assert_close(loss_only, total)
    torch.testing.assert_close(logits.float(), ref_logits.grad, **tol)  # the logits now hold d loss / d logits
    assert torch.equal(buffer[:, vocab:], before[:, vocab:])  # nothing written outside the slice
    assert torch.equal(logits[[1, 5]].float(), torch.zeros(2, vocab))  # ignored rows: zero gradient


def test_cross_entropy_sum_without_grad_leaves_logits():
    logits = torch.randn(4, 30)
    before = logits.clone()
    cross_entropy_sum_(logits, torch.tensor([1, 2, -100, 29]), write_grad=False, backend="triton")
    assert torch.equal(logits, before)


def test_cross_entropy_sum_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits \\[rows, vocab\\]"):
        cross_entropy_sum_(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown backend"):
        cross_entropy_sum_(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="cuda")


COMPILE_FOR_SM90 = r"""
import contextlib, io, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rwkv7_kernels.triton_cross_entropy import _cross_entropy_row_kernel as fn

target = GPUTarget("cuda", 90, 32)
for ptr in ("*bf16", "*fp32"):
    for write_grad in (False, True):
        sig = {"logits": ptr, "labels": "*i64", "loss": "*fp32", "V": "i32", "stride_row": "i32",
               "IGNORE": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK": "constexpr"}
        src = ASTSource(fn=fn, signature=sig, constexprs={"IGNORE": -100, "WRITE_GRAD": write_grad, "BLOCK": 4096})
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                triton.compile(src, target=target, options={"num_warps": 8})
        except Exception as err:
            if "CompilationError" in type(err).__name__ or "NameError" in repr(err):
                raise
            print(f"cannot compile for sm_90 here: {type(err).__name__}: {err}", file=sys.stderr)
            sys.exit(77)
print("ok")
"""


def test_cross_entropy_kernel_compiles_for_sm90():
    """The interpreter runs what a GPU compile refuses (e.g. a plain Python global read inside the kernel, which
    cost a GPU run once): compile the kernel for sm_90 ahead of time, as benchmarks/kernel_smem.py does for the
    WKV kernels. Skipped where this Triton has no CUDA backend."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stderr.strip()[-300:])
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
