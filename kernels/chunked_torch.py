"""Chunk-parallel WKV-7 in plain PyTorch: the path used for CPU tensors.

Within a chunk of ``L`` tokens that starts from state ``h0`` ([K, V]), let ``g_i = sum_{s<=i} w_s``
(the inclusive cumulative log-decay, per key channel). Unrolling the recurrence gives (rows are
tokens, products over the key axis)::

    A_ab[i,j] = sum_d a_id b_jd e^{g_(i-1),d - g_jd}   (j < i)     A_ak likewise with k_j
    A_rb[i,j] = sum_d r_id b_jd e^{g_id - g_jd}         (j <= i)    A_rk likewise with k_j
    U  = (I - A_ab)^-1 (A_ak V + (a * e^{g_(i-1)}) h0)             # row i is u_i = h_(i-1)^T a_i
    O  = A_rk V + A_rb U + (r * e^{g}) h0
    hL = e^{g_L} h0 + (k * e^{g_L - g})^T V + (b * e^{g_L - g})^T U

All the intra-chunk work runs batched over every chunk at once; only the chunk-to-chunk state
update is a Python loop (T / 64 steps). Autograd differentiates it, ``initial_state`` included.

Numerics: everything is fp32. The factors ``e^{+-g}`` are formed separately (so a product of
``L`` of them must stay inside fp32's range): with RWKV-7's decay floor ``w >= -0.6065`` a chunk
of 64 spans at most ``e^{39}``, far from fp32's ``e^{88}`` limit. For inputs with a steeper decay
the chunk is shortened automatically (see :func:`_safe_chunk_size`).
"""

from __future__ import annotations

import math

import torch

DEFAULT_CHUNK = 64
# Largest exponent (natural log) that we allow a chunk's cumulative decay to reach, well below
# log(FLT_MAX) = 88.7 so that the product of a large and a small factor keeps its precision.
_MAX_LOG_SPAN = 60.0


def _safe_chunk_size(w: torch.Tensor, chunk_size: int) -> int:
    steepest = float(-w.detach().min()) if w.numel() else 0.0
    if steepest <= 0:
        return chunk_size
    return max(1, min(chunk_size, int(_MAX_LOG_SPAN / steepest)))


def wkv7_chunked_torch(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk-parallel WKV-7 (see the module docstring). Same contract as :func:`rwkv7_kernels.wkv7`."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            h0 = initial_state
            if initial_state is not None and initial_state.shape[0] > 1:  # else one state shared by all
                h0 = initial_state[n : n + 1]
            o, hT = wkv7_chunked_torch(
                *(x[:, start:end] for x in (r, w, k, v, a, b)),
                initial_state=h0,
                output_final_state=True,
                chunk_size=chunk_size,
            )
            outs.append(o)
            finals.append(hT)
        return torch.cat(outs, dim=1), (torch.cat(finals) if output_final_state else None)

    out_dtype = r.dtype
    B, T, H, K = k.shape
    V = v.shape[-1]
    L = _safe_chunk_size(w, chunk_size)
    n_chunks = max(1, math.ceil(T / L))
    pad = n_chunks * L - T
    f32 = torch.float64 if r.dtype == torch.float64 else torch.float32

    def chunked(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, D] -> [B, H, n_chunks, L, D]; padded tokens have w = 0 (decay 1) and zero
        # r, k, v, a, b, so they leave the state exactly as it was.
        x = x.to(f32)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, n_chunks, L, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    r, w, k, v, a, b = (chunked(x) for x in (r, w, k, v, a, b))
    g = w.cumsum(-2)  # inclusive
    g_prev = g - w  # exclusive: g_(i-1)
    g_last = g[..., -1:, :]
    e_g, e_gprev, e_neg = g.exp(), g_prev.exp(), (-g).exp()
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    causal = torch.ones(L, L, dtype=torch.bool, device=r.device).tril()

    kn, bn = k * e_neg, b * e_neg
    ag, rg = a * e_gprev, r * e_g
    A_ab = (ag @ bn.transpose(-1, -2)).masked_fill(~strict, 0)
    A_ak = (ag @ kn.transpose(-1, -2)).masked_fill(~strict, 0)
    A_rb = (rg @ bn.transpose(-1, -2)).masked_fill(~causal, 0)
    A_rk = (rg @ kn.transpose(-1, -2)).masked_fill(~causal, 0)
    eye = torch.eye(L, dtype=f32, device=r.device)
    # (I - A_ab) is unit lower triangular: a triangular solve is exact and cheap.
    solve = lambda rhs: torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)  # noqa: E731
    U_intra = solve(A_ak @ v)  # [B, H, n, L, V]: u without the h0 part
    W = solve(ag)  # [B, H, n, L, K]: u = U_intra + W h0
    O_intra = A_rk @ v + A_rb @ U_intra
    R_h0 = rg + A_rb @ W  # o = O_intra + R_h0 h0
    k_tail = k * (g_last - g).exp()
    b_tail = b * (g_last - g).exp()
    # h_end = e^{g_L} h0 + k_tail^T V + b_tail^T (U_intra + W h0)
    state_in = k_tail.transpose(-1, -2) @ v + b_tail.transpose(-1, -2) @ U_intra  # [B, H, n, K, V]
    state_mix = b_tail.transpose(-1, -2) @ W  # [B, H, n, K, K]
    decay_all = g_last.exp().squeeze(-2)  # [B, H, n, K]

    if initial_state is None:
        h = r.new_zeros(B, H, K, V)
    else:
        h = initial_state.to(f32).expand(B, H, K, V)
    outs = []
    for c in range(n_chunks):
        outs.append(O_intra[:, :, c] + R_h0[:, :, c] @ h)
        h = decay_all[:, :, c, :, None] * h + state_in[:, :, c] + state_mix[:, :, c] @ h
    o = torch.stack(outs, dim=2)  # [B, H, n, L, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * L, H, V)[:, :T]
    final = h.float() if f32 == torch.float32 else h
    return o.to(out_dtype), (final if output_final_state else None)
