"""WKV-7 operators for RWKV-7 (installed as ``rwkv7_kernels``; the source folder is ``kernels/``).

``wkv7`` is the one entry point. It dispatches on the device of its inputs:

* CUDA tensors -> our Triton kernels (``rwkv7_kernels.triton_wkv7``), when Triton is importable;
* anything else -> the chunk-parallel PyTorch path (``rwkv7_kernels.chunked_torch``).

Tests and benchmarks can force a path with ``backend=`` or the environment variable
``RWKV7_WKV_BACKEND`` (``triton``, ``torch`` or ``reference``). ``TRITON_INTERPRET=1`` makes the
Triton path run on CPU tensors, which is how CI tests the kernels without a GPU.

If a Triton kernel does not fit the GPU (``OutOfResources`` at launch, e.g. shared memory on a card
with less of it than the H100 the block sizes were chosen for), the call takes the PyTorch path
instead, with one warning per device, dtype and head size; later calls go there directly.

``cross_entropy_sum_`` (``cross_entropy.py``) is the other operator here: the LM loss of a chunk of logits
and its gradient in one pass, which the model's chunked loss calls.
"""

from __future__ import annotations

import os

import torch

from .chunked_torch import wkv7_chunked_torch
from .cross_entropy import cross_entropy_sum_
from .reference import log_decay_from_logits, wkv7_reference

__all__ = ["wkv7", "wkv7_reference", "wkv7_chunked_torch", "available_backends", "cross_entropy_sum_",
           "log_decay_from_logits"]

BACKENDS = ("triton", "torch", "reference")
# Up to this many tokens without autograd (generation), the Triton path runs the plain recurrence:
# no chunk machinery, one launch per layer.
DECODE_MAX_T = 16


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _decode(r, w, k, v, a, b, initial_state, output_final_state):
    from .triton_wkv7 import wkv7_decode_triton

    B, _, H, K = r.shape
    V = v.shape[-1]
    if initial_state is None:
        state = torch.zeros(B, H, K, V, dtype=torch.float32, device=r.device)
    else:  # a copy: the caller's state (a cache entry or a tuned parameter) is never modified
        state = initial_state.to(torch.float32).expand(B, H, K, V).clone(memory_format=torch.contiguous_format)
    o = wkv7_decode_triton(r, w, k, v, a, b, state)
    return o, (state if output_final_state else None)


def _triton_wkv7():
    try:
        from .triton_wkv7 import wkv7_triton
    except ImportError:  # no triton on this platform, or the kernel module is not present
        return None
    return wkv7_triton


def available_backends() -> list[str]:
    """The backends that can run on this machine."""
    return (["triton"] if _triton_wkv7() is not None else []) + ["torch", "reference"]


def _check_inputs(r, w, k, v, a, b, initial_state, cu_seqlens) -> None:
    if r.dim() != 4:
        raise ValueError(f"wkv7 expects inputs of shape [B, T, H, N]; got r with shape {tuple(r.shape)}")
    for name, x in zip("wkab", (w, k, a, b)):
        if x.shape != r.shape:
            raise ValueError(f"wkv7: `{name}` has shape {tuple(x.shape)} but `r` has {tuple(r.shape)}; they must match")
    if v.shape[:3] != r.shape[:3]:
        raise ValueError(f"wkv7: `v` has shape {tuple(v.shape)}, incompatible with r {tuple(r.shape)}")
    B, _, H, K = r.shape
    V = v.shape[-1]
    n_states = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"wkv7: with `cu_seqlens` the batch must be 1 (packed sequences); got B={B}")
    if initial_state is not None and (
        initial_state.dim() != 4 or initial_state.shape[1:] != (H, K, V) or initial_state.shape[0] not in (1, n_states)
    ):
        raise ValueError(
            f"wkv7: `initial_state` must have shape [{n_states}, {H}, {K}, {V}] (or batch 1 to broadcast); "
            f"got {tuple(initial_state.shape)}"
        )


def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    lower_bound: float | None = None,
    w_logit_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The WKV-7 recurrence, forward and backward.

    Args:
        r, w, k, a, b: ``[B, T, H, K]``; ``w`` is the log of the decay (RWKV-7 keeps it in
            ``[-0.6065306597, 0)``); ``a = -kappa_hat`` and ``b = kappa_hat * iclr``.
        v: ``[B, T, H, V]``.
        initial_state: ``[B, H, K, V]`` fp32 (``[N, H, K, V]`` with ``cu_seqlens``), or batch 1 to
            share one state across the batch; its gradient is returned by autograd.
        output_final_state: also return the state after the last token (fp32).
        cu_seqlens: ``[N + 1]`` cumulative lengths of packed sequences (then ``B == 1``).
        backend: ``"triton"``, ``"torch"`` or ``"reference"``; default: Triton for CUDA tensors,
            PyTorch otherwise.
        lower_bound: a bound that the caller guarantees, ``w >= lower_bound`` (RWKV-7's layers:
            ``-e^-0.5``). The Triton path then picks its chunk size from it
            instead of reading ``w.min()``, a device sync per call (like flash-linear-attention's
            ``lower_bound``). Values below the bound are the caller's error: they are not checked.
        w_logit_bias: ``H * K`` values (fp32; e.g. RWKV-7's ``w0``). When given, ``w`` holds RWKV-7's decay
            logits less this bias, and the log decay is ``-e^-0.5 sigmoid(w_logit_bias + w)``
            (:func:`log_decay_from_logits`), formed in fp32 inside the Triton kernels: ``w`` can stay bf16
            without rounding the decay, a model need not keep an fp32 ``[B, T, C]`` log decay for the
            backward, and autograd returns the gradients of the logits and of the bias. Other paths form
            the log decay first. Padding: a logit of ``-inf`` gives the log decay 0 (decay 1).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in the dtype of ``r``; ``final_state`` is
        ``[B, H, K, V]`` fp32, or ``None`` unless ``output_final_state``. Same semantics as
        flash-linear-attention's ``chunk_rwkv7(..., scale=1.0)``.
    """
    _check_inputs(r, w, k, v, a, b, initial_state, cu_seqlens)
    if w_logit_bias is not None and (w_logit_bias.numel() != r.shape[2] * r.shape[3] or w_logit_bias.device != w.device):
        raise ValueError(f"wkv7: `w_logit_bias` must hold H * K = {r.shape[2] * r.shape[3]} values on {w.device}; "
                         f"got shape {tuple(w_logit_bias.shape)} on {w_logit_bias.device}")
    backend = backend or os.environ.get("RWKV7_WKV_BACKEND") or ("triton" if r.is_cuda else "torch")
    if backend == "triton":
        if _triton_wkv7() is None:
            raise RuntimeError("wkv7: the Triton backend was requested but Triton is not available here")
        from . import triton_wkv7 as tw

        # Safety net: a kernel that does not fit this GPU (shared memory, registers) raises
        # OutOfResources at launch; then these head sizes take the PyTorch path, with one warning.
        # A backward kernel's failure is handled inside the autograd function (torch_fallback).
        if not tw.known_out_of_resources(r, v):
            decode = r.shape[1] <= DECODE_MAX_T and cu_seqlens is None
            try:
                if decode and not _needs_grad(r, w, k, v, a, b, initial_state, w_logit_bias):
                    log_w = w if w_logit_bias is None else log_decay_from_logits(w, w_logit_bias)
                    return _decode(r, log_w, k, v, a, b, initial_state, output_final_state)
                o, final = tw.wkv7_triton(r, w, k, v, a, b, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                          torch_fallback=True, lower_bound=lower_bound, w_logit_bias=w_logit_bias)
                return o.to(r.dtype), final
            except tw.OutOfResources as err:
                tw.note_out_of_resources(err, r, v)
        backend = "torch"
    if backend == "torch":
        fn = wkv7_chunked_torch
    elif backend == "reference":
        fn = wkv7_reference
    else:
        raise ValueError(f"wkv7: unknown backend {backend!r}; choose one of {BACKENDS}")
    if w_logit_bias is not None:
        w = log_decay_from_logits(w, w_logit_bias)
    o, final = fn(r, w, k, v, a, b, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return o.to(r.dtype), final
