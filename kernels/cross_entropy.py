"""Cross-entropy of a chunk of LM logits, and its gradient written over the logits, in one kernel.

The model's LM loss (``modeling_rwkv7.modeling_rwkv7._ChunkedLMLoss``) walks over chunks of tokens: one
cuBLAS matmul makes a chunk's ``[tokens, vocab]`` logits, this operator turns them into the summed loss and,
in the same launch, into ``d(sum of losses)/d(logits)`` (softmax minus one-hot, 0 on ignored rows), written
in place in the logits' own dtype, ready for the next matmul. With a 65536-token vocabulary these logits are
the largest tensors of a training step and every pass over them is memory-bound: PyTorch's eager ops make
about ten passes in fp32 (cast, log-sum-exp, gather, subtract, exp, scale, cast back); the kernel reads a
row twice and writes it once, accumulating in fp32.

``cross_entropy_sum_(logits, labels, write_grad)`` dispatches like ``wkv7``: Triton for CUDA tensors, PyTorch
otherwise (``backend=`` or ``RWKV7_CE_BACKEND`` force one; ``TRITON_INTERPRET=1`` runs the kernel on CPU).
"""

from __future__ import annotations

import os

import torch

__all__ = ["cross_entropy_sum_", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # labels equal to this contribute no loss and no gradient (transformers' convention)


def _torch_cross_entropy_sum_(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool) -> torch.Tensor:
    valid = labels != IGNORE_INDEX
    x = logits.float()  # a copy for bf16/fp16 logits; the logits themselves when they are fp32
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    total = ((lse - target) * valid).sum()
    if write_grad:
        grad = x.sub_(lse[:, None]).exp_()
        rows = valid.nonzero().squeeze(1)
        grad[rows, labels[rows]] -= 1.0
        logits.copy_(grad.mul_(valid[:, None]))
    return total


def _triton_cross_entropy_sum_(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool) -> torch.Tensor:
    from .triton_cross_entropy import cross_entropy_rows

    return cross_entropy_rows(logits, labels, write_grad, IGNORE_INDEX).sum()


def cross_entropy_sum_(
    logits: torch.Tensor, labels: torch.Tensor, write_grad: bool = True, backend: str | None = None
) -> torch.Tensor:
    """Sum over rows of ``-log softmax(logits)[label]`` (rows whose label is -100 count 0), in fp32.

    Args:
        logits: ``[rows, vocab]``, any float dtype, rows contiguous (a row stride is allowed).
        labels: ``[rows]`` integer targets; -100 ignores a row.
        write_grad: overwrite ``logits`` with the gradient of the returned sum: ``softmax - one_hot`` on
            valid rows, 0 on ignored ones (in the logits' dtype).
        backend: ``"triton"`` or ``"torch"``; default: Triton for CUDA tensors, PyTorch otherwise.

    Returns:
        A 0-dim fp32 tensor (no host synchronisation).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or logits.stride(-1) != 1:
        raise ValueError(
            f"cross_entropy_sum_ expects logits [rows, vocab] with unit column stride and labels [rows]; got "
            f"{tuple(logits.shape)} (strides {logits.stride()}) and {tuple(labels.shape)}"
        )
    backend = backend or os.environ.get("RWKV7_CE_BACKEND") or ("triton" if logits.is_cuda else "torch")
    if backend == "triton":
        return _triton_cross_entropy_sum_(logits, labels, write_grad)
    if backend == "torch":
        return _torch_cross_entropy_sum_(logits, labels, write_grad)
    raise ValueError(f"cross_entropy_sum_: unknown backend {backend!r}; choose 'triton' or 'torch'")
