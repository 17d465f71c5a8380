"""Triton kernel behind ``rwkv7_kernels.cross_entropy.cross_entropy_sum_`` (see there for the why).

One program per row of logits. Pass 1 keeps, per lane of a BLOCK-wide vector, a running maximum and a running
sum of exponentials (the online log-sum-exp), and combines the lanes at the end: no per-block reductions. The
target logit is one scalar load. Pass 2 (only with WRITE_GRAD) rereads the row and stores
``exp(x - lse) - [col == label]`` in the logits' dtype; an ignored row (label -100) gets zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A finite "minus infinity" for the running maximum: exp(m_old - m_new) must stay defined (not -inf - -inf)
# for lanes that have seen no element yet; any real logit is far above it.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _cross_entropy_row_kernel(
    logits,  # [R, V], unit column stride; overwritten with the gradient when WRITE_GRAD
    labels,  # [R] int
    loss,  # [R] fp32 out: lse - target logit, 0 on ignored rows
    V,
    stride_row,
    IGNORE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride_row
    cols = tl.arange(0, BLOCK)
    label = tl.load(labels + row).to(tl.int64)
    valid = label != IGNORE

    run_max = tl.full([BLOCK], _NEG_BIG, tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), axis=0))
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(loss + row, tl.where(valid, lse - target, 0.0))

    if WRITE_GRAD:
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(offs == label, 1.0, 0.0)) * keep
            tl.store(base + offs, grad.to(logits.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool, ignore_index: int) -> torch.Tensor:
    """Per-row losses ``[R]`` in fp32; with ``write_grad`` the logits become the gradient of their sum."""
    R, V = logits.shape
    loss = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R == 0:
        return loss
    # 4096 lanes x 2 bytes per pass: enough loads in flight to stream. 16 warps (8 elements a thread): H200,
    # [4096, 65536] bf16, 0.407 vs 0.422 ms at 8 warps; wider programs, fewer rows resident at once (so that
    # the second pass hits L2), or a whole row in registers were all slower (0.44 - 0.66 ms).
    block = min(triton.next_power_of_2(V), 4096 if logits.element_size() <= 2 else 2048)
    _cross_entropy_row_kernel[(R,)](
        logits, labels.contiguous(), loss, V, logits.stride(0),
        IGNORE=ignore_index, WRITE_GRAD=write_grad, BLOCK=block, num_warps=16,
    )  # fmt: skip
    return loss
