"""Plain sequential WKV-7: the oracle that every other implementation is tested against.

Layout and semantics follow flash-linear-attention's ``chunk_rwkv7(..., scale=1.0)``: inputs are
``[B, T, H, N]``, the state of each head is ``h`` in ``[K, V]`` layout (the transpose of the official
RWKV ``[V, K]`` state), ``w`` is the *log* of the decay, and per step::

    u_t = h_{t-1}^T a_t                              # [V]
    h_t = diag(exp(w_t)) h_{t-1} + b_t u_t^T + k_t v_t^T
    o_t = h_t^T r_t                                  # [V]

Everything is computed in fp32 (or fp64 when the inputs are fp64), one token at a time. It is slow
on purpose: it is the easiest form to check against the equations.
"""

from __future__ import annotations

import torch

#: RWKV-7's floor on the log decay: ``w = -e^{-0.5} * sigmoid(d)``.
RWKV7_DECAY_FLOOR = -0.6065306597126334


def log_decay_from_logits(w: torch.Tensor, w_logit_bias: torch.Tensor) -> torch.Tensor:
    """RWKV-7's log decay ``-e^-0.5 sigmoid(w_logit_bias + w)`` in fp32 from decay logits ``w`` ``[B, T, H, K]``
    less their per-channel bias (``H * K`` values); differentiable. The Triton kernels form the same thing
    themselves when :func:`rwkv7_kernels.wkv7` is given ``w_logit_bias``."""
    H, K = w.shape[-2:]
    return RWKV7_DECAY_FLOOR * torch.sigmoid(w_logit_bias.float().reshape(H, K) + w.float())


def wkv7_reference(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token WKV-7. Same arguments and results as :func:`rwkv7_kernels.wkv7`."""
    if cu_seqlens is not None:
        outs, finals = [], []
        bounds = cu_seqlens.tolist()
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            h0 = initial_state
            if initial_state is not None and initial_state.shape[0] > 1:  # else one state shared by all
                h0 = initial_state[n : n + 1]
            o, hT = wkv7_reference(
                *(x[:, start:end] for x in (r, w, k, v, a, b)), initial_state=h0, output_final_state=True
            )
            outs.append(o)
            finals.append(hT)
        return torch.cat(outs, dim=1), (torch.cat(finals) if output_final_state else None)

    B, T, H, K = k.shape
    V = v.shape[-1]
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32
    r, w, k, v, a, b = (x.to(compute) for x in (r, w, k, v, a, b))
    if initial_state is None:
        h = r.new_zeros(B, H, K, V)
    else:
        h = initial_state.to(compute).expand(B, H, K, V)
    outs = []
    for t in range(T):
        u = torch.einsum("bhkv,bhk->bhv", h, a[:, t])
        h = (
            h * w[:, t].exp()[..., None]
            + b[:, t, :, :, None] * u[:, :, None, :]
            + k[:, t, :, :, None] * v[:, t, :, None, :]
        )
        outs.append(torch.einsum("bhkv,bhk->bhv", h, r[:, t]))
    o = torch.stack(outs, dim=1) if T else r.new_zeros(B, 0, H, V)
    final = h.to(torch.float32) if compute == torch.float32 else h
    return o, (final if output_final_state else None)
