"""WKV-7 in Triton: chunked forward, chunked backward (with the gradient of the initial state), decode.

Semantics are those of :func:`rwkv7_kernels.reference.wkv7_reference` (flash-linear-attention layout:
the state ``h`` of a head is ``[K, V]``, ``w`` is the *log* decay, no scale)::

    u_t = h_{t-1}^T a_t ;  h_t = diag(e^{w_t}) h_{t-1} + b_t u_t^T + k_t v_t^T ;  o_t = h_t^T r_t

Algorithm (see docs/kernels.md). Tokens are cut into chunks of ``BT`` (16, 32 or 64). Inside a chunk
that starts from state ``h0`` let ``g`` be the inclusive cumulative log decay and ``gp = g - w`` the
exclusive one (per key channel). With the "gated" tiles ``rg = r e^g``, ``kn = k e^-g``, ``bn = b e^-g``,
``ag = a e^gp`` (all [BT, K])::

    A_rk = causal(rg kn^T)   A_rb = causal(rg bn^T)   A_ak = strict(ag kn^T)   A_ab = strict(ag bn^T)
    T    = (I - A_ab)^-1                                 # unit lower triangular
    u    = T (A_ak v + ag h0)                            # row i is u_i = h_{i-1}^T a_i
    o    = A_rk v + A_rb u + rg h0
    h_end = e^{g_last} h0 + kt^T v + bt^T u              # kt = k e^{g_last - g}, bt likewise

so all intra-chunk work is matrix products (``tl.dot``) and only the [K, V] state is carried from chunk to
chunk. Every column of the state evolves independently (``u`` and the update act column-wise), which
is why the serial kernels split V into blocks of ``BV`` columns, one program each.

Kernels:

* ``_chain_fwd_kernel`` / ``_chain_bwd_kernel`` (head size <= 64, all released models; one program per
  (chunk, head), the state handed from chunk to chunk: see "Chained kernels" below): ``o``, the final
  state and the state at the start of every chunk (fp32); backward: the gradient of every chunk's end
  state, and ``dh0``, then (off the chain) the dv kernel's work below for its chunk.
* ``_fwd_kernel`` / ``_bwd_state_kernel`` (larger heads, the upscaled states: serial over chunks, one
  program per (V-block, sequence, head)): the same, with the whole chunk algebra inside the serial loop.
* ``_bwd_grad_kernel`` (parallel: one program per (chunk, head)): with the chunk's start state and
  end-state gradient known, recomputes the chunk and forms every input gradient. It holds all of V,
  so the gradients of the K-side inputs (sums over V) need no cross-program reduction.
* ``_bwd_dv_kernel`` + ``_bwd_kgrad_kernel``: the same gradients in two kernels with fewer live
  tiles (``RWKV7_WKV_GRAD_VARIANT=split``; the default for head size 64 from BT 32, where it is the faster
  one, and beyond the fused kernel's shared memory; see :func:`_grad_variant`): dv, u and dx per (V-block,
  chunk, head), then the K-side gradients per (K-block, chunk, head) from u and dx. For head size 64 the
  chained backward does the dv kernel's part (it already holds the chunk's tiles and end-state gradient),
  except u where there is no lookahead: the K-side kernel forms it then (see "Where u is formed").
* ``_decode_kernel``: the plain per-token recurrence for T = 1 (or a few tokens), updating the state
  in place.

Numerics: every product accumulates in fp32 and every intermediate is fp32; the states (stored chunk
states too) are fp32. For bf16/fp16 inputs the products use TF32 tensor cores (10-bit mantissa, finer
than the inputs' own rounding), except the chained forward's delta-rule products (those with ``a``,
``b`` or what they shape, :func:`_delta_dot_precision`) and two groups in the gradient kernels
(:func:`_grad_dot_precisions`), which take bf16 operands; for fp32 inputs they are all full-precision ("ieee").

Decay floor and chunk size: the factors ``e^{+-g}`` are formed separately, so one chunk's cumulative
log decay must stay far inside fp32's range (|g| < 88). RWKV-7 keeps ``w >= -0.6065306597`` (decay
``>= 0.5452``), so a chunk of 64 spans at most ``e^{38.8}``. We allow ``|min w| * BT <= 60``
(:data:`MAX_LOG_SPAN`); for steeper decays the chunk is shortened (64 -> 32 -> 16) and below
``w = -3.75`` a ``ValueError`` is raised (:func:`_pick_chunk_size`).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime import OutOfResources

from .reference import RWKV7_DECAY_FLOOR, log_decay_from_logits

__all__ = ["wkv7_triton", "wkv7_decode_triton", "MAX_LOG_SPAN", "RWKV7_DECAY_FLOOR", "OutOfResources"]

#: Largest natural-log span a chunk's cumulative decay may reach (fp32 overflows near 88.7; we keep
#: a wide margin so that products of a large and a small factor keep their precision).
MAX_LOG_SPAN = 60.0
_CHUNK_SIZES = (64, 32, 16)  # tl.dot needs every dimension >= 16
DEFAULT_CHUNK = int(os.environ.get("RWKV7_WKV_CHUNK", "32"))
# RWKV-7's decay floor as a compile-time constant of the kernels (module-level globals of a @triton.jit function
# must be tl.constexpr), from the one definition in reference.py.
_DECAY_FLOOR = tl.constexpr(RWKV7_DECAY_FLOOR)


# ----------------------------------------------------------------------------------------------
# Small device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, tok0, n_valid, i_h, H: tl.constexpr, D: tl.constexpr, col0, BT: tl.constexpr, BD: tl.constexpr):
    """[BT, BD] fp32 tile of tokens ``tok0 ..`` (rows >= n_valid read as 0), head ``i_h``, columns ``col0 ..``.

    Inputs are [tokens, H, D] contiguous. Padded rows read 0, which for ``w`` means decay 1: a padded
    token leaves the state unchanged and contributes nothing.
    """
    rows = tl.arange(0, BT)
    cols = col0 + tl.arange(0, BD)
    offs = ((tok0 + rows).to(tl.int64)[:, None] * H + i_h) * D + cols[None, :]
    return tl.load(ptr + offs, mask=(rows < n_valid)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, x, tok0, n_valid, i_h, H: tl.constexpr, D: tl.constexpr, col0, BT: tl.constexpr, BD: tl.constexpr):
    """Store a [BT, BD] tile (cast to the pointer's dtype); rows >= n_valid are skipped."""
    rows = tl.arange(0, BT)
    cols = col0 + tl.arange(0, BD)
    offs = ((tok0 + rows).to(tl.int64)[:, None] * H + i_h) * D + cols[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=(rows < n_valid)[:, None])


@triton.jit
def _state_offsets(K: tl.constexpr, V: tl.constexpr, col0, BV: tl.constexpr):
    """Offsets of columns ``col0 .. col0+BV`` inside one row-major [K, V] state."""
    return tl.arange(0, K)[:, None] * V + (col0 + tl.arange(0, BV))[None, :]


@triton.jit
def _inverse_offsets(cbase, BT: tl.constexpr):
    """Offsets of chunk ``cbase``'s (chunk-major, like the stored states) ``(I - A_ab)^-1`` in the
    [n_chunks, H, BT, BT] buffer that the chained forward keeps for the backward."""
    rows = tl.arange(0, BT)
    return cbase * (BT * BT) + rows[:, None] * BT + rows[None, :]


@triton.jit
def _seq_bounds(i_n, T, cu_seqlens, IS_VARLEN: tl.constexpr):
    """First token and one-past-last token of sequence ``i_n`` in the flattened token axis."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def _serial_program(i_nh, T, cu_seqlens, chunk_offsets, H: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Prologue of a serial kernel (one program per sequence x head, ``i_nh``): the sequence's token
    bounds and the global index of its first chunk (where its chunk states are stored)."""
    i_n = i_nh // H
    bos, eos = _seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    if IS_VARLEN:
        first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        first_chunk = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, eos, first_chunk


@triton.jit
def _load_state_block(ptr, i_nh, i_h, soffs, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                      PRESENT: tl.constexpr, BCAST: tl.constexpr):
    """What a serial kernel starts its scan from (the initial state, or the final state's gradient), for
    its V-columns ``soffs``: zeros when absent, else the sequence's own ``[K, V]`` state, or one
    ``[1, H, K, V]`` state shared by every sequence (``BCAST``)."""
    if PRESENT:
        if BCAST:
            h = tl.load(ptr + i_h * (K * V) + soffs)
        else:
            h = tl.load(ptr + i_nh.to(tl.int64) * (K * V) + soffs)
    else:
        h = tl.zeros([K, BV], dtype=tl.float32)
    return h


@triton.jit
def _chunk_program(i_c, T, cu_seqlens, chunk_indices, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Prologue of a one-program-per-chunk kernel: the first token of global chunk ``i_c`` and how many
    tokens its sequence has from there (rows past that are padding)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c)
        c = tl.load(chunk_indices + 2 * i_c + 1)
    else:
        n_per_seq = tl.cdiv(T, BT)
        i_n = i_c // n_per_seq
        c = i_c % n_per_seq
    bos, eos = _seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    t0 = bos + c * BT
    return t0, eos - t0


@triton.jit
def _dot(x, y, PREC: tl.constexpr):
    """``x @ y`` accumulated in fp32. PREC: "ieee" (fp32 products), "tf32"/"tf32x3" (tensor cores on fp32
    operands), or "bf16": both operands rounded to bf16 first (tensor cores at twice tf32's rate, half the
    shared memory per staged operand; an opt-in, ``RWKV7_WKV_DOT_PREC=bf16``, see :func:`_dot_precision`)."""
    if PREC == "bf16":
        out = tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
    else:
        out = tl.dot(x, y, input_precision=PREC)
    return out


@triton.jit
def _dot_acc(x, y, acc, PREC: tl.constexpr):
    """``acc + x @ y`` (the accumulating form of :func:`_dot`, one tensor-core instruction chain)."""
    if PREC == "bf16":
        out = tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), acc)
    else:
        out = tl.dot(x, y, acc, input_precision=PREC)
    return out


@triton.jit
def _unit_lower_inverse(A, BT: tl.constexpr, LOG2_BT: tl.constexpr, PREC: tl.constexpr):
    """``(I - A)^-1`` for strictly lower-triangular ``A`` [BT, BT].

    ``A`` is nilpotent (``A^BT = 0``), so ``(I - A)^-1 = sum_j A^j = (I + A)(I + A^2)(I + A^4)...``
    with ``log2(BT)`` factors: exact, and only ``2 (log2(BT) - 1)`` small tensor-core products instead
    of a BT-step substitution with a cross-thread reduction at every step.
    """
    rows = tl.arange(0, BT)
    inv = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0) + A
    power = A
    for _ in tl.static_range(LOG2_BT - 1):
        power = _dot(power, power, PREC)
        inv = inv + _dot(inv, power, PREC)
    return inv


@triton.jit
def _chunk_gates(w):
    """Inclusive (g) and exclusive (gp) cumulative log decays of a [BT, K] chunk, and g at its end."""
    g = tl.cumsum(w, axis=0)
    return g, g - w, tl.sum(w, axis=0)


@triton.jit
def _load_decay_logit(w, w_bias, tok0, n_valid, i_h, H: tl.constexpr, K: tl.constexpr, col0, BT: tl.constexpr,
                      BK: tl.constexpr):
    """[BT, BK] fp32 decay logits ``w_bias + w`` (``w_bias``: [H * K] fp32)."""
    x = _load_tile(w, tok0, n_valid, i_h, H, K, col0, BT, BK)
    return x + tl.load(w_bias + i_h * K + col0 + tl.arange(0, BK))[None, :]


@triton.jit
def _load_log_decay(w, w_bias, tok0, n_valid, i_h, H: tl.constexpr, K: tl.constexpr, col0, BT: tl.constexpr,
                    BK: tl.constexpr, W_LOGIT: tl.constexpr):
    """[BT, BK] fp32 log decays. ``W_LOGIT``: ``w`` holds RWKV-7's decay logits less their per-channel bias
    ``w_bias`` ([H * K] fp32), and the log decay ``-e^-0.5 sigmoid(w_bias + w)`` is formed here, in fp32.
    Rows past the sequence end read 0 (decay 1) either way."""
    if W_LOGIT:
        z = _load_decay_logit(w, w_bias, tok0, n_valid, i_h, H, K, col0, BT, BK)
        return tl.where((tl.arange(0, BT) < n_valid)[:, None], _DECAY_FLOOR * tl.sigmoid(z), 0.0)
    return _load_tile(w, tok0, n_valid, i_h, H, K, col0, BT, BK)


@triton.jit
def _store_decay_grad(dw, w, w_bias, dlogw, tok0, n_valid, i_h, H: tl.constexpr, K: tl.constexpr, col0,
                      BT: tl.constexpr, BK: tl.constexpr, W_LOGIT: tl.constexpr):
    """Store the gradient of ``w`` from that of the log decay ``dlogw``: as is, or (``W_LOGIT``) chained
    through the sigmoid, ``d/dz -e^-0.5 sigmoid(z) = -e^-0.5 sigmoid(z) sigmoid(-z)`` (both factors formed
    directly: no cancellation where the sigmoid is close to 1)."""
    if W_LOGIT:
        z = _load_decay_logit(w, w_bias, tok0, n_valid, i_h, H, K, col0, BT, BK)
        dlogw = dlogw * (_DECAY_FLOOR * tl.sigmoid(z) * tl.sigmoid(-z))
    _store_tile(dw, dlogw, tok0, n_valid, i_h, H, K, col0, BT, BK)


@triton.jit
def _masked_dot_t(x, y, STRICT: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr):
    """``x y^T`` restricted to j <= i (or j < i when STRICT): one intra-chunk interaction matrix."""
    rows = tl.arange(0, BT)
    if STRICT:
        keep = rows[:, None] > rows[None, :]
    else:
        keep = rows[:, None] >= rows[None, :]
    return tl.where(keep, _dot(x, tl.trans(y), PREC), 0.0)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    r, w, k, v, a, b, w_bias, o, h0, ht, states, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    LOG2_BT: tl.constexpr, HAS_H0: tl.constexpr, H0_BCAST: tl.constexpr, STORE_FINAL: tl.constexpr,
    STORE_STATES: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr, W_LOGIT: tl.constexpr,
):
    """One program = V-columns ``[i_v*BV, (i_v+1)*BV)`` of the state of one (sequence, head); serial over chunks."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h = i_nh % H
    bos, eos, first_chunk = _serial_program(i_nh, T, cu_seqlens, chunk_offsets, H, BT, IS_VARLEN)
    col0 = i_v * BV
    soffs = _state_offsets(K, V, col0, BV)

    h = _load_state_block(h0, i_nh, i_h, soffs, K, V, BV, HAS_H0, H0_BCAST)

    for c in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + c * BT
        nv = eos - t0
        if STORE_STATES:  # the backward restarts each chunk from here
            tl.store(states + ((first_chunk + c) * H + i_h) * (K * V) + soffs, h)
        r_c = _load_tile(r, t0, nv, i_h, H, K, 0, BT, K)
        w_c = _load_log_decay(w, w_bias, t0, nv, i_h, H, K, 0, BT, K, W_LOGIT)
        k_c = _load_tile(k, t0, nv, i_h, H, K, 0, BT, K)
        a_c = _load_tile(a, t0, nv, i_h, H, K, 0, BT, K)
        b_c = _load_tile(b, t0, nv, i_h, H, K, 0, BT, K)
        v_c = _load_tile(v, t0, nv, i_h, H, V, col0, BT, BV)

        g, gp, g_last = _chunk_gates(w_c)
        rg = r_c * tl.exp(g)
        kn = k_c * tl.exp(-g)
        bn = b_c * tl.exp(-g)
        ag = a_c * tl.exp(gp)
        A_rk = _masked_dot_t(rg, kn, False, BT, PREC)
        A_rb = _masked_dot_t(rg, bn, False, BT, PREC)
        A_ak = _masked_dot_t(ag, kn, True, BT, PREC)
        A_ab = _masked_dot_t(ag, bn, True, BT, PREC)
        inv = _unit_lower_inverse(A_ab, BT, LOG2_BT, PREC)

        x = _dot(A_ak, v_c, PREC) + _dot(ag, h, PREC)
        u = _dot(inv, x, PREC)  # [BT, BV]: u_i = h_{i-1}^T a_i
        o_c = _dot(A_rk, v_c, PREC) + _dot(A_rb, u, PREC)
        o_c += _dot(rg, h, PREC)
        _store_tile(o, o_c, t0, nv, i_h, H, V, col0, BT, BV)

        tail = tl.exp(g_last[None, :] - g)  # decay from token i (exclusive) to the chunk end
        h = tl.exp(g_last)[:, None] * h
        h += _dot(tl.trans(k_c * tail), v_c, PREC)
        h += _dot(tl.trans(b_c * tail), u, PREC)

    if STORE_FINAL:
        tl.store(ht + i_nh.to(tl.int64) * (K * V) + soffs, h)


# ----------------------------------------------------------------------------------------------
# Transition form (head size <= FAST_MAX_K): chained kernels, one program per chunk and head
# ----------------------------------------------------------------------------------------------
#
# Everything a chunk does to the state is affine in its start state h (see the module docstring):
#
#     W  = T ag            U0 = T A_ak v                  # u = U0 + W h
#     P  = diag(e^{g_last}) + bt^T W                      # h_end = P h + C
#     C  = kt^T v + bt^T U0
#     R  = rg + A_rb W     Oc = A_rk v + A_rb U0          # o = Oc + R h
#
# P, C, R, Oc depend only on the chunk's inputs, so every chunk of every head forms them at once, in
# parallel. What is serial is ``h <- P h + C``: one [K, K] x [K, V] product per chunk instead of the ~15
# dependent products of ``_fwd_kernel``. The backward is the same recurrence transposed:
# ``dh_start = P^T dh_end + R^T do``.
#
# Chained kernels. One program per (chunk, head) does the parallel part, then waits for its chunk's
# start state from the program of the chunk before (a ready flag per chunk and head, acquire/release),
# forms ``h_end = P h + C``, hands it on through memory (the chunk-state buffer the backward needs
# anyway), and only then ``o = Oc + R h``. P, C, R, Oc stay in registers: nothing per chunk but the
# state goes through memory, and the serial part overlaps the parallel work of later chunks. (Before:
# a pre-pass kernel stored P, C, R, Oc, 52 KB per chunk and head in fp32, and a scan kernel read them
# back; H100, (8, 4096, 12, 64): forward 1.21 -> 0.90 ms, fwd+bwd 3.52 -> 2.93 ms in the same process,
# benchmarks/results/ab_kernels_h100.log.)
#
# Why it cannot deadlock: a program waits only for the chunk before it in its sequence, and programs
# take their chunk from a ticket counter (``sync[0]``) in the order they start, with every sequence's
# chunk c dealt before any chunk c + 1 (:func:`_chain_chunk`). So the chunk awaited was dealt to a
# program that is already running, and it waits, in turn, only for an earlier one. The hardware's
# launch order of program ids is not relied on. Under TRITON_INTERPRET=1 programs run one after the
# other in ticket order, so every wait is already satisfied. The ready flags are fresh zeros per launch.
#
# The backward's chain programs, once they have handed their gradient on, also do the dv kernel's work for their
# chunk (all of V): they hold its tiles, the inverse and the end-state gradient already. H100, same process:
# fwd+bwd 3.00 -> 2.81 ms at (8, 4096, 12, 64), 3.84 -> 3.62-3.73 at (4, 4096, 32); the kernel then needs 255
# registers (two programs per SM instead of four) and the backward is no longer chain-bound at those shapes.
#
# The chain's latency is ~2.8 us per chunk on an H100 (the flag's round trip, the state's load and
# store), so with few sequences x heads and many chunks the serial part, not the parallel work, sets
# the time: (1, 16384, 32): 512 chunks, 1.4 ms per direction.
#
# Lookahead (few chains: :func:`_chain_lookahead`). Then the programs at even positions of a chain (from 2 on)
# also publish their transition (P and C; backward: P and R^T do) in a second buffer, with a second flag, before
# they wait; and the programs at odd positions (from 3 on) do not wait for the chunk before, but for the one two
# back: they form their start state as ``P_prev (h two back) + C_prev`` from that publication, then go on as
# usual. So the odd positions form a chain that advances two chunks per hop, while the even positions hang off
# it; every program still hands its own end state on (the backward restarts from them, and position 1 needs
# position 0's). A program waits only on the two programs before it in its chain, which got earlier tickets, and
# publishes before it waits: no deadlock. The cost (a 32 KB store and a release per even program, one more
# product per odd one, a transient [n_chunks / 2, H, 2, K, V] buffer) is a loss where there are enough chains to keep
# the GPU busy. H100 (benchmarks/results/ab_kernels_lookahead_h100.log), with / without: (1, 16384, 32) forward
# 1.41 -> 1.11 ms, forward + backward 4.21 -> 3.81 ms; (3, 8192, 16) (48 chains): forward 0.75 = 0.75, fwd+bwd
# 2.56 -> 2.71; (2, 8192, 32) and (8, 4096, 12): slower (0.88 -> 0.99 and 0.66 -> 0.75 ms forward). Publishing
# from every program (waiting two back everywhere) cost twice as much: (1, 16384, 32) forward 1.18 ms.
#
# Factored chain step (forward, no lookahead). ``P = diag(e^{g_last}) + bt^T W`` and ``R = rg + A_rb W`` are formed
# only to be applied once, to the chunk's start state: so without the lookahead (which publishes P) the forward
# applies their factors instead, ``Wh = W h``, ``h_end = e^{g_last} h + bt^T Wh + C``, ``o = Oc + rg h + A_rb Wh``:
# 4 products of [BT, K] x [K, V] size instead of [K, K] P (bt^T W), P h, A_rb W and R h, ~131k fewer multiply-adds per
# chunk and head, for two dependent products on the chain instead of one. H100, same process
# (benchmarks/results/ab_kernels_factored_h100.log): forward 0.617 -> 0.574 ms at (8, 4096, 12, 64), 0.813 -> 0.761 at
# (4, 4096, 32), 0.838 -> 0.783 at (2, 8192, 32); the same errors. The backward's chain step factored the same way
# (``P^T dh = e^{g_last} dh + W^T (bt dh)``, ``bt dh`` shared with the dv work's ``du``) was slower, its chained
# kernel 0.896 -> 0.920 ms at (4, 4096, 32) (spills 56 -> 256 bytes), and with W^T formed directly and ``A_rb^T do``
# shared too (R not formed) 0.896 -> 1.004 ms (496 bytes), so it keeps P.
# One step further, the forward could form all of ``u = T (A_ak v + ag h)`` after the wait (no W, no U0: 8 products
# instead of 11, but three dependent ones on the chain): 0.572 -> 0.554 ms at (8, 4096, 12) and 0.755 -> 0.730 at
# (4, 4096, 32) (96 and 128 chains of 128 chunks), yet 0.777 -> 0.804 at (2, 8192, 32) (64 chains of 256 chunks,
# where the chain's length counts). A third regime chosen by a chain-count threshold measured at three shapes was
# not worth it; the factored step is kept for every shape without the lookahead.
# The backward's counterpart, dx formed on the chain (``dh_start = e^{g_last} dh + rg^T do + ag^T T^T (A_rb^T do +
# bt dh)``: no W, P or R, 11 products instead of 14, ~32% fewer multiply-adds, spills 56 -> 284 bytes), was slower
# at all three shapes (chained backward 0.899 -> 0.934 ms at (4, 4096, 32)): its time is not set by its multiply-adds.
#
# Precision. ``o`` is dominated by the intra-chunk term ``A_rk v`` and by ``rg h`` (|r| |k| ~ head size),
# while the delta-rule terms (``a = -kk``, ``b = kk * iclr``, unit-norm ``kk``) are an order of magnitude
# smaller. So the forward rounds to bf16 (``DELTA_PREC``, twice TF32's tensor-core rate) the operands of its
# delta-rule products: ``A_ab`` and the inverse, ``W``, ``bt^T W`` (in P), ``A_rb`` and ``A_rb W`` (in R), ``A_ak``,
# ``A_ak v`` and ``T (A_ak v)`` (U0), ``bt^T U0`` (in C) and ``A_rb U0`` (in Oc), and in the factored chain step
# ``bt^T (W h)`` and ``A_rb (W h)``; ``A_rk v``, ``kt^T v`` and what multiplies the state itself (``P h`` and ``R h``,
# or ``W h`` and ``rg h``) stay TF32. Measured group by group (Triton interpreter against the fp32 reference,
# then an H100 at the benchmark shapes, benchmarks/results/ab_kernels_precision_h100.log and
# ab_kernels_delta_prec_h100.log). The transition's group alone (the inverse, W, bt^T W, bt^T U0) left o, dh0 and
# the input gradients where TF32 has them (o 2.0e-3, dh0 1.7e-3, grads 4.0e-3; the final state 3.9e-4 -> 4.5e-4)
# for a forward of 0.72 -> 0.65 ms at (8, 4096, 12, 64). Adding ``A_rb``, R and U0 (the default since the eighth
# 2026-11-26 session): o 2.0e-3 -> 2.1e-3 and the final state 4.5e-4 -> 6.0e-4 (the peer's: 2.5e-3 and 1.4e-3; dh0
# and the gradients unchanged) for a forward of 0.66 -> 0.62 ms at (8, 4096, 12) and 0.87 -> 0.81 ms at
# (4, 4096, 32) (U0's group alone gave half of it; A_rb and R alone were slower, 0.87 -> 0.89 ms). The backward
# keeps TF32 where it matters: rounding its u and dx took the gradients of a and b from 5e-3 to 2.2e-2
# (interpreter), its A_rb and R doubled da's error, the K-side kernel's u alone tripled db's; rounding only its P
# (W, bt^T W), its ``bt dh`` and ``(k tail) dh`` or u's ``ag h0`` moved the gradients by up to 7% (interpreter) and
# the time by +-1% either way (H100, ab_kernels_delta_prec_h100.log), so those were left at TF32 too.


@triton.jit
def _transition_p(W, bt, g_last, K: tl.constexpr, DELTA_PREC: tl.constexpr):
    """``P = diag(e^{g_last}) + bt^T W`` ([K, K]): the chunk's map of its start state to its end state."""
    kk = tl.arange(0, K)
    return _dot(tl.trans(bt), W, DELTA_PREC) + tl.where(kk[:, None] == kk[None, :], tl.exp(g_last)[:, None], 0.0)


@triton.jit
def _transition_r(W, rg, A_rb, DELTA_PREC: tl.constexpr):
    """``R = rg + A_rb W`` ([BT, K]): the chunk's map of its start state to its outputs."""
    return rg + _dot(A_rb, W, DELTA_PREC)


@triton.jit
def _chunk_transition(r, w, a, b, w_bias, INV, t0, nv, cbase, i_h, H: tl.constexpr, K: tl.constexpr,
                      BT: tl.constexpr, LOG2_BT: tl.constexpr, FORM_INV: tl.constexpr, STORE_INV: tl.constexpr,
                      DELTA_PREC: tl.constexpr, W_LOGIT: tl.constexpr, FORM_P: tl.constexpr, FORM_R: tl.constexpr):
    """The chunk's ``P`` and ``R`` (and what the forward's ``C``, ``Oc`` reuse). The inverse
    ``(I - A_ab)^-1`` is formed (``FORM_INV``; stored when ``STORE_INV``) or read from ``INV``. ``DELTA_PREC``:
    the delta-rule products (the inverse, ``W``, ``P``'s ``bt^T W``, ``A_rb`` and ``R``'s ``A_rb W``; see
    "Precision" above). P and R are formed when ``FORM_P`` / ``FORM_R`` (else W and rg stand in for them, unused:
    Triton has no None tiles; the factored chain step applies their factors instead, see "Factored chain step")."""
    g, gp, g_last = _chunk_gates(_load_log_decay(w, w_bias, t0, nv, i_h, H, K, 0, BT, K, W_LOGIT))
    e_neg = tl.exp(-g)
    tail = tl.exp(g_last[None, :] - g)
    b_c = _load_tile(b, t0, nv, i_h, H, K, 0, BT, K)
    bn = b_c * e_neg
    bt = b_c * tail
    ag = _load_tile(a, t0, nv, i_h, H, K, 0, BT, K) * tl.exp(gp)
    if FORM_INV:
        inv = _unit_lower_inverse(_masked_dot_t(ag, bn, True, BT, DELTA_PREC), BT, LOG2_BT, DELTA_PREC)
        if STORE_INV:
            tl.store(INV + _inverse_offsets(cbase, BT), inv)
    else:
        inv = tl.load(INV + _inverse_offsets(cbase, BT))
    W = _dot(inv, ag, DELTA_PREC)  # [BT, K]
    Pm = W
    if FORM_P:
        Pm = _transition_p(W, bt, g_last, K, DELTA_PREC)
    rg = _load_tile(r, t0, nv, i_h, H, K, 0, BT, K) * tl.exp(g)
    A_rb = _masked_dot_t(rg, bn, False, BT, DELTA_PREC)
    Rm = rg
    if FORM_R:
        Rm = _transition_r(W, rg, A_rb, DELTA_PREC)
    return Pm, Rm, W, g_last, A_rb, rg, ag, bt, e_neg, tail, inv


@triton.jit
def _chain_chunk(ticket, n_seq, order, chunk_indices, T, cu_seqlens, H: tl.constexpr, BT: tl.constexpr,
                 IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """Which chunk a chained program takes: ticket ``t`` -> head ``t % H`` of the ``t // H``-th chunk in
    chain order (every sequence's first chunks first, or its last chunks first when ``REVERSE``), so that
    a chunk's predecessor in its chain always holds a smaller ticket. Returns the global chunk index, the
    sequence, the head, the first token, the valid tokens, whether the chunk starts / ends its sequence, and
    its position in chain order (chunks before it in its sequence, or after it when ``REVERSE``)."""
    j = ticket // H
    i_h = ticket % H
    if IS_VARLEN:
        i_c = tl.load(order + j)
        i_n = tl.load(chunk_indices + 2 * i_c)
        c = tl.load(chunk_indices + 2 * i_c + 1)
    else:
        n_per_seq = tl.cdiv(T, BT)
        c = j // n_seq
        if REVERSE:
            c = n_per_seq - 1 - c
        i_n = j % n_seq
        i_c = i_n * n_per_seq + c
    bos, eos = _seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    t0 = bos + c * BT
    pos = tl.cdiv(eos - t0, BT) - 1 if REVERSE else c
    return i_c, i_n, i_h, t0, eos - t0, c == 0, t0 + BT >= eos, pos


@triton.jit
def _chain_wait(flag):
    """Spin until the predecessor in the chain has published its state (acquire: its stores are visible)."""
    ready = tl.atomic_add(flag, 0, sem="acquire")
    while ready == 0:
        ready = tl.atomic_add(flag, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _chain_signal(flag):
    """Publish this program's stores to its successor: every thread's stores, then one release flag."""
    tl.debug_barrier()
    tl.atomic_xchg(flag, 1, sem="release")


@triton.jit
def _chain_take(flag, ptr, offs):
    """Wait for ``flag``, then load the tile it guards (bypassing L1, where a stale copy could sit)."""
    _chain_wait(flag)
    return tl.load(ptr + offs, cache_modifier=".cg")


@triton.jit
def _la_slot(cbase, H: tl.constexpr):
    """Slot of (chunk, head) ``cbase`` in the lookahead buffer: only chunks at even positions of their chain (from
    2 on) publish, and two such chunks are never adjacent in the global chunk numbering (adjacent chunks of one
    sequence differ in parity; a sequence's last / first chunk never publishes), so chunk // 2 is unique among them."""
    return (cbase // H) // 2 * H + cbase % H


@triton.jit
def _chain_publish_early(LA, sync, n_flags, cbase, Mm, Cm, soffs, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Lookahead: store this chunk's transition (``Mm``: P, [K, K] with K == V; ``Cm``: its offset, [K, V]) for
    the next program in the chain, and flag it (``sync[1 + n_flags + chunk*H + head]``)."""
    base = LA + _la_slot(cbase, H) * (2 * K * V)
    tl.store(base + soffs, Mm)
    tl.store(base + K * V + soffs, Cm)
    _chain_signal(sync + 1 + n_flags + cbase)


@triton.jit
def _chain_take_ahead(LA, sync, n_flags, hand, prev, soffs, SCAN_PREC: tl.constexpr, TRANSPOSE: tl.constexpr,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Lookahead: this chunk's start state (backward: end-state gradient) from two hops back, carried through
    the previous chunk's published transition: ``M h_prev + C`` (``M^T`` when ``TRANSPOSE``). ``prev`` is the
    previous chunk's (chunk, head) index; ``hand`` the hand-over buffer holding its start state."""
    h_prev = _chain_take(sync + 1 + prev, hand, prev * (K * V) + soffs)
    _chain_wait(sync + 1 + n_flags + prev)
    base = LA + _la_slot(prev, H) * (2 * K * V)
    Mm = tl.load(base + soffs, cache_modifier=".cg")
    if TRANSPOSE:
        Mm = tl.trans(Mm)
    return _dot(Mm, h_prev, SCAN_PREC) + tl.load(base + K * V + soffs, cache_modifier=".cg")


@triton.jit
def _chain_receive(LA, sync, n_flags, hand, cbase, prev, pos, at_start, may_publish, Mm, Cm, src, src_row, i_h, soffs,
                   HAS_SRC: tl.constexpr, SRC_BCAST: tl.constexpr, TRANSPOSE: tl.constexpr, SCAN_PREC: tl.constexpr,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """What a chained program starts from: its chunk's start state (forward) or end-state gradient (backward,
    ``TRANSPOSE``), kept in the hand-over buffer ``hand`` at ``cbase``. At the chain's start (``at_start``) it
    comes from ``src`` (h0 / dht; zeros without) and is stored to ``hand``; else from the chunk before in the
    chain (``prev``): its flag, or with the lookahead (``LA``) at odd positions from 3 on, two hops back through
    ``prev``'s published transition. With the lookahead, a program at an even position from 2 on first publishes
    its own transition (``Mm``, ``Cm``) when there is a next chunk (``may_publish``)."""
    if LA is not None:
        if (pos % 2 == 0) & (pos >= 2) & may_publish:
            _chain_publish_early(LA, sync, n_flags, cbase, Mm, Cm, soffs, H, K, V)
    if at_start:
        x = _load_state_block(src, src_row, i_h, soffs, K, V, V, HAS_SRC, SRC_BCAST)
        tl.store(hand + cbase * (K * V) + soffs, x)
    elif LA is not None:
        if (pos % 2 == 1) & (pos >= 3):
            x = _chain_take_ahead(LA, sync, n_flags, hand, prev, soffs, SCAN_PREC, TRANSPOSE, H, K, V)
        else:
            x = _chain_take(sync + 1 + cbase, hand, cbase * (K * V) + soffs)
    else:
        x = _chain_take(sync + 1 + cbase, hand, cbase * (K * V) + soffs)
    return x


@triton.jit
def _chain_fwd_kernel(
    r, w, k, v, a, b, w_bias, o, h0, ht, states, INV, LA, sync, order, cu_seqlens, chunk_indices, T, n_seq, n_flags,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr,
    HAS_H0: tl.constexpr, H0_BCAST: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr, DELTA_PREC: tl.constexpr, SCAN_PREC: tl.constexpr, W_LOGIT: tl.constexpr,
    FACTORED: tl.constexpr,
):
    """One program = one chunk of one head: form P, C, R, Oc (all parallel work), then take the chunk's
    start state from its predecessor, hand ``h_end = P h + C`` on, and store ``o = Oc + R h``. ``FACTORED``: P and
    R are applied through their factors, not formed (see "Factored chain step" above).

    ``states`` ([n_chunks, H, K, V] fp32) is both the hand-over buffer and what the backward restarts
    each chunk from. ``sync`` is int32 zeros: ``sync[0]`` deals the tickets, ``sync[1 + chunk*H + head]``
    says that chunk's start state is in ``states``. ``LA``: None, or the lookahead buffer (:func:`_chain_lookahead`;
    its flags follow the others in ``sync``, ``n_flags`` = n_chunks * H), see "Lookahead" above.
    """
    ticket = tl.atomic_add(sync, 1)  # chunk order follows start order: see "Chained kernels" above
    i_c, i_n, i_h, t0, nv, first, last, pos = _chain_chunk(ticket, n_seq, order, chunk_indices, T, cu_seqlens, H,
                                                            BT, IS_VARLEN, False)
    cbase = i_c.to(tl.int64) * H + i_h  # chunk-major, like the stored states
    Pm, Rm, W, g_last, A_rb, rg, ag, bt, e_neg, tail, inv = _chunk_transition(
        r, w, a, b, w_bias, INV, t0, nv, cbase, i_h, H, K, BT, LOG2_BT, True, INV is not None, DELTA_PREC, W_LOGIT,
        not FACTORED, not FACTORED)
    k_c = _load_tile(k, t0, nv, i_h, H, K, 0, BT, K)
    kn = k_c * e_neg
    v_c = _load_tile(v, t0, nv, i_h, H, V, 0, BT, V)
    U0 = _dot(inv, _dot(_masked_dot_t(ag, kn, True, BT, DELTA_PREC), v_c, DELTA_PREC), DELTA_PREC)
    Cm = _dot(tl.trans(k_c * tail), v_c, PREC) + _dot(tl.trans(bt), U0, DELTA_PREC)
    Om = _dot(_masked_dot_t(rg, kn, False, BT, PREC), v_c, PREC)
    Om += _dot(A_rb, U0, DELTA_PREC)

    soffs = _state_offsets(K, V, 0, V)
    h = _chain_receive(LA, sync, n_flags, states, cbase, cbase - H, pos, first, nv > BT, Pm, Cm, h0, i_n * H + i_h,
                       i_h, soffs, HAS_H0, H0_BCAST, False, SCAN_PREC, H, K, V)
    if FACTORED:  # P h = e^{g_last} h + bt^T (W h), R h = rg h + A_rb (W h)
        Wh = _dot(W, h, SCAN_PREC)
        h_end = tl.exp(g_last)[:, None] * h + _dot(tl.trans(bt), Wh, DELTA_PREC) + Cm
    else:
        h_end = _dot(Pm, h, SCAN_PREC) + Cm
    if last:
        if STORE_FINAL:
            tl.store(ht + (i_n * H + i_h).to(tl.int64) * (K * V) + soffs, h_end)
    else:
        tl.store(states + (cbase + H) * (K * V) + soffs, h_end)
        _chain_signal(sync + 1 + cbase + H)
    if FACTORED:
        Om += _dot(rg, h, SCAN_PREC) + _dot(A_rb, Wh, DELTA_PREC)
    else:
        Om += _dot(Rm, h, SCAN_PREC)
    _store_tile(o, Om, t0, nv, i_h, H, V, 0, BT, V)


@triton.jit
def _chain_bwd_kernel(
    r, w, k, v, a, b, w_bias, do, dht, dh0, dstates, states, dv, U, DX, INV, LA, sync, order, cu_seqlens,
    chunk_indices, T, n_seq, n_flags, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    LOG2_BT: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr, SCAN_PREC: tl.constexpr,
    W_LOGIT: tl.constexpr, WITH_DV: tl.constexpr, GRAD_PREC: tl.constexpr, STORE_U: tl.constexpr,
):
    """The forward's chain transposed, last chunk first: form P and ``R^T do``, take the gradient of the
    chunk's end state from its successor (``dstates``, kept for the input-gradient kernels), hand
    ``P^T dh + R^T do`` on to the chunk before (or to ``dh0``). ``WITH_DV``: then, off the chain, the work
    of ``_bwd_dv_kernel`` for this chunk (all of V), from the tiles already formed: ``dv``, and ``dx`` (and
    ``u`` when ``STORE_U``; else ``_bwd_kgrad_kernel`` forms it, see "Where u is formed" there) to scratch for
    ``_bwd_kgrad_kernel``."""
    ticket = tl.atomic_add(sync, 1)
    i_c, i_n, i_h, t0, nv, first, last, pos = _chain_chunk(ticket, n_seq, order, chunk_indices, T, cu_seqlens, H,
                                                            BT, IS_VARLEN, True)
    cbase = i_c.to(tl.int64) * H + i_h
    Pm, Rm, W, g_last, A_rb, rg, ag, bt, e_neg, tail, inv = _chunk_transition(
        r, w, a, b, w_bias, INV, t0, nv, cbase, i_h, H, K, BT, LOG2_BT, INV is None, False, PREC, W_LOGIT, True, True)
    do_c = _load_tile(do, t0, nv, i_h, H, V, 0, BT, V)
    dC = _dot(tl.trans(Rm), do_c, PREC)

    soffs = _state_offsets(K, V, 0, V)
    dh = _chain_receive(LA, sync, n_flags, dstates, cbase, cbase + H, pos, last, ~first, Pm, dC, dht, i_n * H + i_h,
                        i_h, soffs, HAS_DHT, False, True, SCAN_PREC, H, K, V)
    dh_start = _dot(tl.trans(Pm), dh, SCAN_PREC) + dC
    if first:
        tl.store(dh0 + (i_n * H + i_h).to(tl.int64) * (K * V) + soffs, dh_start)
    else:
        tl.store(dstates + (cbase - H) * (K * V) + soffs, dh_start)
        _chain_signal(sync + 1 + cbase - H)
    if WITH_DV:
        k_c = _load_tile(k, t0, nv, i_h, H, K, 0, BT, K)
        kn = k_c * e_neg
        A_ak = _masked_dot_t(ag, kn, True, BT, GRAD_PREC)
        xoffs = cbase * (BT * V) + tl.arange(0, BT)[:, None] * V + tl.arange(0, V)[None, :]
        if STORE_U:
            v_c = _load_tile(v, t0, nv, i_h, H, V, 0, BT, V)
            h_start = tl.load(states + cbase * (K * V) + soffs)
            u = _dot(inv, _dot(A_ak, v_c, GRAD_PREC) + _dot(ag, h_start, GRAD_PREC), GRAD_PREC)
            tl.store(U + xoffs, u)
        du = _dot(tl.trans(A_rb), do_c, GRAD_PREC) + _dot(bt, dh, GRAD_PREC)
        dx = _dot(tl.trans(inv), du, GRAD_PREC)
        tl.store(DX + xoffs, dx)
        dv_c = _dot(tl.trans(_masked_dot_t(rg, kn, False, BT, GRAD_PREC)), do_c, GRAD_PREC)
        dv_c += _dot(tl.trans(A_ak), dx, GRAD_PREC)
        dv_c += _dot(k_c * tail, dh, GRAD_PREC)
        _store_tile(dv, dv_c, t0, nv, i_h, H, V, 0, BT, V)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_state_kernel(
    r, w, a, b, w_bias, do, dht, dh0, dstates, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    LOG2_BT: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
    STORE_DSTATES: tl.constexpr, W_LOGIT: tl.constexpr,
):
    """Serial, last chunk first: store dL/d(state at the end of each chunk) (for the input gradients,
    ``STORE_DSTATES``); finally write dh0.

    Per chunk (dh = gradient of the end state, do = gradient of the chunk's outputs)::

        du = A_rb^T do + bt dh ;  dx = T^T du ;  dh <- e^{g_last} dh + rg^T do + ag^T dx
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h = i_nh % H
    bos, eos, first_chunk = _serial_program(i_nh, T, cu_seqlens, chunk_offsets, H, BT, IS_VARLEN)
    col0 = i_v * BV
    soffs = _state_offsets(K, V, col0, BV)

    dh = _load_state_block(dht, i_nh, i_h, soffs, K, V, BV, HAS_DHT, False)

    n_chunks = tl.cdiv(eos - bos, BT)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t0 = bos + c * BT
        nv = eos - t0
        if STORE_DSTATES:
            tl.store(dstates + ((first_chunk + c) * H + i_h) * (K * V) + soffs, dh)
        r_c = _load_tile(r, t0, nv, i_h, H, K, 0, BT, K)
        w_c = _load_log_decay(w, w_bias, t0, nv, i_h, H, K, 0, BT, K, W_LOGIT)
        a_c = _load_tile(a, t0, nv, i_h, H, K, 0, BT, K)
        b_c = _load_tile(b, t0, nv, i_h, H, K, 0, BT, K)
        do_c = _load_tile(do, t0, nv, i_h, H, V, col0, BT, BV)

        g, gp, g_last = _chunk_gates(w_c)
        rg = r_c * tl.exp(g)
        bn = b_c * tl.exp(-g)
        ag = a_c * tl.exp(gp)
        A_rb = _masked_dot_t(rg, bn, False, BT, PREC)
        inv = _unit_lower_inverse(_masked_dot_t(ag, bn, True, BT, PREC), BT, LOG2_BT, PREC)

        bt = b_c * tl.exp(g_last[None, :] - g)
        du = _dot(tl.trans(A_rb), do_c, PREC) + _dot(bt, dh, PREC)
        dx = _dot(tl.trans(inv), du, PREC)
        dh = tl.exp(g_last)[:, None] * dh
        dh += _dot(tl.trans(rg), do_c, PREC)
        dh += _dot(tl.trans(ag), dx, PREC)

    tl.store(dh0 + i_nh.to(tl.int64) * (K * V) + soffs, dh)


@triton.jit
def _grad_accumulators(BT: tl.constexpr, BK: tl.constexpr):
    """The zeroed sums over V of the gradient kernels, for ``BK`` key columns: dA_rk, dA_rb, dA_ak, dA_ab
    ([BT, BT]), drg, dag, dkt, dbt ([BT, BK]) and d_end ([BK]: sum over V of dh_end * h0, the gradient of
    e^{g_last})."""
    square = tl.zeros([BT, BT], dtype=tl.float32)
    tile = tl.zeros([BT, BK], dtype=tl.float32)
    return square, square, square, square, tile, tile, tile, tile, tl.zeros([BK], dtype=tl.float32)


@triton.jit
def _bwd_grad_kernel(
    r, w, k, v, a, b, w_bias, do, states, dstates, dr, dw, dk, dv, da, db, INV, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    LOG2_BT: tl.constexpr, IS_VARLEN: tl.constexpr, W_LOGIT: tl.constexpr, PREC: tl.constexpr, PREC_LO: tl.constexpr,
):
    """One program = one chunk of one head. Recompute the chunk from its stored start state, then form
    every input gradient from ``do`` and the stored gradient of its end state.

    The gradients are first taken with respect to the gated tiles (rg, kn, bn, ag, kt, bt) and the
    interaction matrices, then chained to r, k, a, b and to the cumulative decays; for a gated tile
    ``p = x e^{s g}``: ``dx = dp e^{s g}`` and ``dg = s (dp * p)``. ``dw`` is the reverse cumulative
    sum of ``dg`` plus the chunk-end terms. ``INV``: as in ``_bwd_dv_kernel``.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, nv = _chunk_program(i_c, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    rows = tl.arange(0, BT)
    causal = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]

    r_c = _load_tile(r, t0, nv, i_h, H, K, 0, BT, K)
    w_c = _load_log_decay(w, w_bias, t0, nv, i_h, H, K, 0, BT, K, W_LOGIT)
    k_c = _load_tile(k, t0, nv, i_h, H, K, 0, BT, K)
    a_c = _load_tile(a, t0, nv, i_h, H, K, 0, BT, K)
    b_c = _load_tile(b, t0, nv, i_h, H, K, 0, BT, K)
    g, gp, g_last = _chunk_gates(w_c)
    e_neg = tl.exp(-g)
    tail = tl.exp(g_last[None, :] - g)
    rg = r_c * tl.exp(g)
    kn = k_c * e_neg
    bn = b_c * e_neg
    ag = a_c * tl.exp(gp)
    kt = k_c * tail
    bt = b_c * tail
    A_rk = _masked_dot_t(rg, kn, False, BT, PREC)
    A_rb = _masked_dot_t(rg, bn, False, BT, PREC)
    A_ak = _masked_dot_t(ag, kn, True, BT, PREC)
    if INV is None:
        inv = _unit_lower_inverse(_masked_dot_t(ag, bn, True, BT, PREC), BT, LOG2_BT, PREC_LO)
    else:
        inv = tl.load(INV + _inverse_offsets(i_c.to(tl.int64) * H + i_h, BT))

    dA_rk, dA_rb, dA_ak, dA_ab, drg, dag, dkt, dbt, d_end = _grad_accumulators(BT, K)

    sbase = (i_c.to(tl.int64) * H + i_h) * (K * V)
    for i_v in range(0, V // BV):
        col0 = i_v * BV
        soffs = _state_offsets(K, V, col0, BV)
        h0 = tl.load(states + sbase + soffs)
        dhe = tl.load(dstates + sbase + soffs)
        v_c = _load_tile(v, t0, nv, i_h, H, V, col0, BT, BV)
        do_c = _load_tile(do, t0, nv, i_h, H, V, col0, BT, BV)

        x = _dot(A_ak, v_c, PREC) + _dot(ag, h0, PREC)
        u = _dot(inv, x, PREC)
        du = _dot(tl.trans(A_rb), do_c, PREC) + _dot(bt, dhe, PREC)
        dx = _dot(tl.trans(inv), du, PREC)
        dv_c = _dot(tl.trans(A_rk), do_c, PREC) + _dot(tl.trans(A_ak), dx, PREC)
        dv_c += _dot(kt, dhe, PREC)
        _store_tile(dv, dv_c, t0, nv, i_h, H, V, col0, BT, BV)

        dA_rk += _dot(do_c, tl.trans(v_c), PREC)
        dA_rb += _dot(do_c, tl.trans(u), PREC)
        dA_ak += _dot(dx, tl.trans(v_c), PREC)
        dA_ab += _dot(dx, tl.trans(u), PREC)  # d(I-A)^-1 folded in: dA = T^T du x^T T^T
        drg += _dot(do_c, tl.trans(h0), PREC_LO)  # the state outer products: see _grad_dot_precisions
        dag += _dot(dx, tl.trans(h0), PREC_LO)
        dkt += _dot(v_c, tl.trans(dhe), PREC_LO)
        dbt += _dot(u, tl.trans(dhe), PREC_LO)
        d_end += tl.sum(dhe * h0, axis=1)

    dA_rk = tl.where(causal, dA_rk, 0.0)
    dA_rb = tl.where(causal, dA_rb, 0.0)
    dA_ak = tl.where(strict, dA_ak, 0.0)
    dA_ab = tl.where(strict, dA_ab, 0.0)
    drg += _dot(dA_rk, kn, PREC) + _dot(dA_rb, bn, PREC)
    dag += _dot(dA_ak, kn, PREC) + _dot(dA_ab, bn, PREC)
    dkn = _dot(tl.trans(dA_rk), rg, PREC) + _dot(tl.trans(dA_ak), ag, PREC)
    dbn = _dot(tl.trans(dA_rb), rg, PREC) + _dot(tl.trans(dA_ab), ag, PREC)

    _store_tile(dr, drg * tl.exp(g), t0, nv, i_h, H, K, 0, BT, K)
    _store_tile(dk, dkn * e_neg + dkt * tail, t0, nv, i_h, H, K, 0, BT, K)
    _store_tile(db, dbn * e_neg + dbt * tail, t0, nv, i_h, H, K, 0, BT, K)
    _store_tile(da, dag * tl.exp(gp), t0, nv, i_h, H, K, 0, BT, K)

    # Gradients with respect to g_i (inclusive), gp_i (exclusive) and g_last, then to each w_s:
    # dw_s = sum_{i >= s} dg_i + sum_{i > s} dgp_i + dg_last.
    tail_terms = dkt * kt + dbt * bt
    dg = drg * rg - dkn * kn - dbn * bn - tail_terms
    dgp = dag * ag
    dg_last = tl.sum(tail_terms, axis=0) + d_end * tl.exp(g_last)
    both = dg + dgp
    rev_cumsum = tl.sum(both, axis=0)[None, :] - tl.cumsum(both, axis=0) + both
    _store_decay_grad(dw, w, w_bias, rev_cumsum - dgp + dg_last[None, :], t0, nv, i_h, H, K, 0, BT, K, W_LOGIT)


# ----------------------------------------------------------------------------------------------
# Backward, "split" variant of the gradient kernel (RWKV7_WKV_GRAD_VARIANT=split)
# ----------------------------------------------------------------------------------------------
#
# Why: ``_bwd_grad_kernel`` keeps ~24 [BT, K] / [BT, BT] fp32 tiles live at once (r, w, k, a, b;
# g, gp, e^-g, tail, rg, kn, bn, ag, kt, bt; four interaction matrices and the inverse; four dA and
# four [BT, K] gradient accumulators) and spills registers. H100, (B, T, H, N) = (8, 4096, 12, 64),
# bf16, BT = 32, one forward+backward of 4.36 ms: ``_bwd_grad_kernel`` 2.21 ms, ``_prep_kernel``
# 1.06 ms, scans 0.41 + 0.39 ms. 8 warps or a V-block of 32 were slower, and BT = 64 took 7.4 ms
# (worse spills). The split does the same algebra in two kernels, each with a much smaller live set:
#
# (a) ``_bwd_dv_kernel``, one program per (V-block, chunk, head): recomputes the gated tiles, A_rk,
#     A_rb, A_ak and the inverse, then for its V columns forms u, du, dx and dv; stores dv, and u and
#     dx (fp32 [BT, V] per chunk) to scratch. Live: 4 [BT, BT] + ~3 [BT, K] + the V-block's tiles.
# (b) ``_bwd_kgrad_kernel``, one program per (K-block, chunk, head): loops over V-blocks accumulating
#     every reduction over V from plain loads (dA_rk = do v^T, dA_rb = do u^T, dA_ak = dx v^T,
#     dA_ab = dx u^T, drg = do h0^T, dag = dx h0^T, dkt = v dhe^T, dbt = u dhe^T, d_end), holding only
#     the accumulators (4 [BT, BT] + 4 [BT, BK]) and that block's loads; the gated tiles are
#     recomputed *after* the loop (reloading r, w, k, a, b) to finish dr, dk, da, db and dw.
#     The products are taken on row-stacked tiles (``_stack_rows``): X = [do; dx] and Y = [v; u] make the
#     four dA products one [2 BT, 2 BT] product X Y^T (its quadrants), the four state products two
#     ([drg; dag] = X h0^T, [dkt; dbt] = Y dhe^T), and after the loop [drg; dag] += dA [kn; bn] and
#     [dkn; dbn] = dA^T [rg; ag]: 5 + 2 products of 2 BT = 64 rows instead of 8 + 8 of 32. H100, same
#     process (benchmarks/results/ab_kernels_stacked_kgrad_h100.log): 0.96 -> 0.81 ms at (8, 4096, 12, 64),
#     1.28 -> 1.08 at (4, 4096, 32, 64); ptxas spills 476 -> 272 bytes.
#
# Why u and dx go through scratch rather than per-V-block partial sums of the dA / [BT, K]
# accumulators: the partials would be 4 BT^2 + 4 BT K + K floats per V-block and chunk (12 K floats
# at BT = 32, K = 64: 48 KB, x V/BV blocks), u and dx are 2 BT BV floats per V-block (8 KB at BV = 32)
# and (b) needs no cross-program reduction. Cost: u, dx written and read once (fp32, so the numbers
# are those of the fused kernel), and (b) re-reads the chunk states, v, do and r, w, k, a, b.
#
# Spills (ptxas for sm_90a, bytes of spill stores per thread, K = V = 64, compiled without a GPU):
# fused BT 32 / 4 warps 1830, BT 64 / 8 warps 2408. Split, 8 warps: BT 32 with (a) V-block 64: 0,
# (b) V-block 32: 0; BT 64 with (a) V-block 16: 148, (b) V-block 16 and K-block 32: 0. Timings on
# the GPU decide (benchmarks/tune_kernels.py); the split's knobs: RWKV7_WKV_GRAD_BV (a's V-block),
# RWKV7_WKV_GRAD_KBV, RWKV7_WKV_GRAD_BK (b's V- and K-block), RWKV7_WKV_GRAD_WARPS (both).


@triton.jit
def _bwd_dv_kernel(
    r, w, k, v, a, b, w_bias, do, states, dstates, dv, U, DX, INV, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    LOG2_BT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr, PREC_LO: tl.constexpr,
    W_LOGIT: tl.constexpr,
):
    """One program = V-columns ``[i_v*BV, ..)`` of one chunk of one head: store dv, and u and dx (fp32
    scratch ``[n_chunks, H, BT, V]``, padded rows included) for ``_bwd_kgrad_kernel``. ``INV``: the chunks'
    ``(I - A_ab)^-1`` stored by the forward, or None (formed here). Used where the chained backward does not do
    this itself (``with_dv`` in the launch code: larger heads, V-blocks under V).

    The V-block index varies fastest along axis 0, so the programs of one chunk run side by side and
    share its r, w, k, a, b through L2. Statements are ordered so that tiles die early.
    """
    pid, i_h = tl.program_id(0), tl.program_id(1)
    i_c = pid // (V // BV)
    col0 = (pid % (V // BV)) * BV
    t0, nv = _chunk_program(i_c, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    cbase = i_c.to(tl.int64) * H + i_h
    soffs = _state_offsets(K, V, col0, BV)
    xoffs = cbase * (BT * V) + tl.arange(0, BT)[:, None] * V + (col0 + tl.arange(0, BV))[None, :]

    g, gp, g_last = _chunk_gates(_load_log_decay(w, w_bias, t0, nv, i_h, H, K, 0, BT, K, W_LOGIT))
    e_neg = tl.exp(-g)
    ag = _load_tile(a, t0, nv, i_h, H, K, 0, BT, K) * tl.exp(gp)
    bn = _load_tile(b, t0, nv, i_h, H, K, 0, BT, K) * e_neg
    if INV is None:
        inv = _unit_lower_inverse(_masked_dot_t(ag, bn, True, BT, PREC), BT, LOG2_BT, PREC_LO)
    else:
        inv = tl.load(INV + _inverse_offsets(cbase, BT))
    rg = _load_tile(r, t0, nv, i_h, H, K, 0, BT, K) * tl.exp(g)
    A_rb = _masked_dot_t(rg, bn, False, BT, PREC)
    kn = _load_tile(k, t0, nv, i_h, H, K, 0, BT, K) * e_neg
    A_rk = _masked_dot_t(rg, kn, False, BT, PREC)
    A_ak = _masked_dot_t(ag, kn, True, BT, PREC)

    h0 = tl.load(states + cbase * (K * V) + soffs)
    v_c = _load_tile(v, t0, nv, i_h, H, V, col0, BT, BV)
    x = _dot(A_ak, v_c, PREC) + _dot(ag, h0, PREC)
    u = _dot(inv, x, PREC)
    tl.store(U + xoffs, u)

    tail = tl.exp(g_last[None, :] - g)
    dhe = tl.load(dstates + cbase * (K * V) + soffs)
    do_c = _load_tile(do, t0, nv, i_h, H, V, col0, BT, BV)
    bt = _load_tile(b, t0, nv, i_h, H, K, 0, BT, K) * tail
    du = _dot(tl.trans(A_rb), do_c, PREC) + _dot(bt, dhe, PREC)
    dx = _dot(tl.trans(inv), du, PREC)
    tl.store(DX + xoffs, dx)

    kt = _load_tile(k, t0, nv, i_h, H, K, 0, BT, K) * tail
    dv_c = _dot(tl.trans(A_rk), do_c, PREC) + _dot(tl.trans(A_ak), dx, PREC)
    dv_c += _dot(kt, dhe, PREC)
    _store_tile(dv, dv_c, t0, nv, i_h, H, V, col0, BT, BV)


@triton.jit
def _stack_rows(x, y):
    """``[x; y]``: two [M, N] tiles stacked along rows ([2 M, N])."""
    return tl.reshape(tl.permute(tl.join(x, y), (2, 0, 1)), (2 * x.shape[0], x.shape[1]))


@triton.jit
def _split_rows(z, M: tl.constexpr, N: tl.constexpr):
    """The top and bottom [M, N] halves of a [2 M, N] tile."""
    return tl.split(tl.permute(tl.reshape(z, (2, M, N)), (1, 2, 0)))


# Where u is formed. u = T (A_ak v + ag h0) needs the chunk's start state, which the K-side kernel loads anyway
# (for ``[do; dx] h0^T``), while the chained backward would load it only for u. So where the chained backward's
# time is its parallel work (many chains, no lookahead), the K-side kernel forms u per V-block (``FORM_U``, all
# of K in one program) and the chained backward stores only dx: no u scratch, the state loaded once. H100,
# same process (benchmarks/results/ab_kernels_u_in_kgrad2_h100.log): (8, 4096, 12) chained backward 0.83 ->
# 0.68 ms, K-side 0.83 -> 0.89 (V-block 64; 32 gave 1.07), fwd+bwd 2.32 -> 2.24; (4, 4096, 32) 3.06 -> 2.96. With
# the lookahead (few chains, chain-bound) the chained backward got slower instead, (1, 16384, 32) 1.44 -> 1.73 ms,
# so there the chained backward keeps forming u.


@triton.jit
def _bwd_kgrad_kernel(
    r, w, k, v, a, b, w_bias, do, states, dstates, U, DX, INV, dr, dw, dk, da, db, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr, PREC_LO: tl.constexpr, W_LOGIT: tl.constexpr, FORM_U: tl.constexpr,
):
    """One program = K-columns ``[i_k*BK, ..)`` of one chunk of one head: dr, dk, da, db, dw from u
    and dx (``_bwd_dv_kernel``). ``FORM_U`` (needs ``BK == K`` and ``INV``): u is formed here, not read from
    ``U`` (see "Where u is formed" above).

    Same formulas as ``_bwd_grad_kernel``; only the order differs: first every reduction over V (the
    loop holds just the accumulators), then the gated tiles, recomputed after the loop. Every K-side
    quantity is column-local in K (dw's cumulative sum runs over tokens), so K can be split in
    blocks (``BK < K``, fewer live registers); only the [BT, BT] dA matrices need all of K, and each
    K-block program forms them again (twice the dA products at BK = K / 2; loads of v, do, u, dx
    shared through L2 since the K-blocks of a chunk are adjacent programs).
    """
    pid, i_h = tl.program_id(0), tl.program_id(1)
    i_c = pid // (K // BK)
    kcol0 = (pid % (K // BK)) * BK
    krows = kcol0 + tl.arange(0, BK)
    t0, nv = _chunk_program(i_c, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    rows = tl.arange(0, BT)
    cbase = i_c.to(tl.int64) * H + i_h

    # Stacked operands: X = [do; dx], Y = [v; u] ([2 BT, BV]), so that the four dA products are one [2 BT, 2 BT]
    # product (quadrants dA_rk, dA_rb / dA_ak, dA_ab) and the four state products two: fewer, larger tensor-core
    # products (2 BT = 64 rows at BT = 32), measured faster (see (b) above).
    dA = tl.zeros([2 * BT, 2 * BT], dtype=tl.float32)
    XH = tl.zeros([2 * BT, BK], dtype=tl.float32)  # [drg; dag]
    YE = tl.zeros([2 * BT, BK], dtype=tl.float32)  # [dkt; dbt]
    d_end = tl.zeros([BK], dtype=tl.float32)
    # FORM_U: the loop-invariant factors of u = T (A_ak v + ag h0). The gated tiles are formed again after the loop
    # rather than kept: keeping ag0 etc. live through it measured slower (K-side kernel 0.89 -> 0.95 ms, H100).
    if FORM_U:
        tl.static_assert(BK == K, "FORM_U needs all of K in one program (A_ak, ag h0)")
        g0, gp0, _ = _chunk_gates(_load_log_decay(w, w_bias, t0, nv, i_h, H, K, 0, BT, K, W_LOGIT))
        ag0 = _load_tile(a, t0, nv, i_h, H, K, 0, BT, K) * tl.exp(gp0)
        A_ak = _masked_dot_t(ag0, _load_tile(k, t0, nv, i_h, H, K, 0, BT, K) * tl.exp(-g0), True, BT, PREC)
        inv = tl.load(INV + _inverse_offsets(cbase, BT))
    for i_v in range(0, V // BV):
        col0 = i_v * BV
        soffs = krows[:, None] * V + (col0 + tl.arange(0, BV))[None, :]  # rows kcol0.. of the [K, V] state
        xoffs = cbase * (BT * V) + rows[:, None] * V + (col0 + tl.arange(0, BV))[None, :]
        X = _stack_rows(_load_tile(do, t0, nv, i_h, H, V, col0, BT, BV), tl.load(DX + xoffs))
        h0 = tl.load(states + cbase * (K * V) + soffs)
        v_b = _load_tile(v, t0, nv, i_h, H, V, col0, BT, BV)
        if FORM_U:
            u_b = _dot(inv, _dot(A_ak, v_b, PREC) + _dot(ag0, h0, PREC), PREC)
        else:
            u_b = tl.load(U + xoffs)
        Y = _stack_rows(v_b, u_b)
        dhe = tl.load(dstates + cbase * (K * V) + soffs)
        dA = _dot_acc(X, tl.trans(Y), dA, PREC)  # d(I-A)^-1 folded into dA_ab (see fused)
        XH = _dot_acc(X, tl.trans(h0), XH, PREC_LO)  # the state outer products: see _grad_dot_precisions
        YE = _dot_acc(Y, tl.trans(dhe), YE, PREC_LO)
        d_end += tl.sum(dhe * h0, axis=1)

    r2 = tl.arange(0, 2 * BT)
    ii, jj = r2[:, None] % BT, r2[None, :] % BT
    dA = tl.where(tl.where(r2[:, None] < BT, ii >= jj, ii > jj), dA, 0.0)  # causal dA_rk, dA_rb; strict dA_ak, dA_ab

    g, gp, g_last = _chunk_gates(_load_log_decay(w, w_bias, t0, nv, i_h, H, K, kcol0, BT, BK, W_LOGIT))
    e_neg = tl.exp(-g)
    kn = _load_tile(k, t0, nv, i_h, H, K, kcol0, BT, BK) * e_neg
    bn = _load_tile(b, t0, nv, i_h, H, K, kcol0, BT, BK) * e_neg
    rg = _load_tile(r, t0, nv, i_h, H, K, kcol0, BT, BK) * tl.exp(g)
    ag = _load_tile(a, t0, nv, i_h, H, K, kcol0, BT, BK) * tl.exp(gp)
    drg, dag = _split_rows(_dot_acc(dA, _stack_rows(kn, bn), XH, PREC), BT, BK)  # += dA_r* [kn; bn], dA_a* [kn; bn]
    dkn, dbn = _split_rows(_dot(tl.trans(dA), _stack_rows(rg, ag), PREC), BT, BK)  # dA_*k^T, dA_*b^T [rg; ag]
    dkt, dbt = _split_rows(YE, BT, BK)
    _store_tile(dr, drg * tl.exp(g), t0, nv, i_h, H, K, kcol0, BT, BK)
    _store_tile(da, dag * tl.exp(gp), t0, nv, i_h, H, K, kcol0, BT, BK)
    dgp = dag * ag

    # Gradients with respect to g_i, gp_i and g_last, then dw as in _bwd_grad_kernel.
    tail = tl.exp(g_last[None, :] - g)
    _store_tile(dk, dkn * e_neg + dkt * tail, t0, nv, i_h, H, K, kcol0, BT, BK)
    _store_tile(db, dbn * e_neg + dbt * tail, t0, nv, i_h, H, K, kcol0, BT, BK)
    tail_terms = dkt * (_load_tile(k, t0, nv, i_h, H, K, kcol0, BT, BK) * tail)
    tail_terms += dbt * (_load_tile(b, t0, nv, i_h, H, K, kcol0, BT, BK) * tail)
    dg = drg * rg - dkn * kn - dbn * bn - tail_terms
    dg_last = tl.sum(tail_terms, axis=0) + d_end * tl.exp(g_last)
    both = dg + dgp
    rev_cumsum = tl.sum(both, axis=0)[None, :] - tl.cumsum(both, axis=0) + both
    _store_decay_grad(dw, w, w_bias, rev_cumsum - dgp + dg_last[None, :], t0, nv, i_h, H, K, kcol0, BT, BK, W_LOGIT)


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------


@triton.jit
def _decode_kernel(
    r, w, k, v, a, b, o, state, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
):
    """Token-by-token recurrence on V-columns ``[i_v*BV, ..)`` of one (batch, head) state, in place."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    kk = tl.arange(0, K)
    vv = i_v * BV + tl.arange(0, BV)
    sptr = state + i_nh.to(tl.int64) * (K * V) + kk[:, None] * V + vv[None, :]
    h = tl.load(sptr)
    for t in range(0, T):
        row = (i_n.to(tl.int64) * T + t) * H + i_h
        r_t = tl.load(r + row * K + kk).to(tl.float32)
        w_t = tl.load(w + row * K + kk).to(tl.float32)
        k_t = tl.load(k + row * K + kk).to(tl.float32)
        a_t = tl.load(a + row * K + kk).to(tl.float32)
        b_t = tl.load(b + row * K + kk).to(tl.float32)
        v_t = tl.load(v + row * V + vv).to(tl.float32)
        u = tl.sum(h * a_t[:, None], axis=0)  # uses the state before this token
        h = tl.exp(w_t)[:, None] * h + b_t[:, None] * u[None, :] + k_t[:, None] * v_t[None, :]
        o_t = tl.sum(h * r_t[:, None], axis=0)
        tl.store(o + row * V + vv, o_t.to(o.dtype.element_ty))
    tl.store(sptr, h)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _pick_chunk_size(w: torch.Tensor, preferred: int, lower_bound: float | None = None) -> int:
    """Largest allowed chunk <= ``preferred`` whose cumulative decay stays within ``MAX_LOG_SPAN``.

    Judged from ``lower_bound`` when the caller guarantees ``w >= lower_bound`` (RWKV-7's layers do: their
    ``w`` is ``-e^-0.5 * sigmoid(.)``), else from ``w.min()``, which is a device sync on every call (in a
    train step, one per layer, each leaving the GPU idle while the host catches up). Set
    ``RWKV7_WKV_TRUST_DECAY=1`` to skip the check altogether (then ``preferred`` is used as is).
    """
    if os.environ.get("RWKV7_WKV_TRUST_DECAY") == "1" or w.numel() == 0:
        return preferred
    steepest = -float(w.detach().min() if lower_bound is None else lower_bound)
    for bt in _CHUNK_SIZES:
        if bt <= preferred and steepest * bt <= MAX_LOG_SPAN:
            return bt
    raise ValueError(
        f"wkv7_triton: log decay w = {-steepest:.3f} is too steep for the chunked kernel (needs "
        f"w >= {-MAX_LOG_SPAN / _CHUNK_SIZES[-1]:.3f}; RWKV-7 keeps w >= {RWKV7_DECAY_FLOOR:.4f}). "
        "Use the reference or torch backend for such inputs."
    )


def _block_v(K: int, V: int) -> int:
    """V-columns per program of the fused serial kernels (head sizes over ``FAST_MAX_K``), which do a whole
    chunk's algebra per step and want more, smaller programs: 16. ``RWKV7_WKV_BV`` overrides; tl.dot needs
    >= 16. (The chained kernels of the transition form hold all of V.)"""
    return min(V, int(os.environ.get("RWKV7_WKV_BV", "0")) or 16)


#: Precisions of the intra-chunk products (``RWKV7_WKV_DOT_PREC``, for bf16/fp16 inputs; fp32 inputs always
#: use "ieee"). "tf32" is the default; "bf16" rounds the fp32 tiles to bf16 before each product (faster,
#: coarser: 8 significant bits instead of 11); "tf32x3" and "ieee" are finer and slower.
DOT_PRECISIONS = ("tf32", "bf16", "tf32x3", "ieee")


def _dot_precision(dtype: torch.dtype, env: str = "RWKV7_WKV_DOT_PREC") -> str:
    if dtype == torch.float32:
        return "ieee"
    prec = os.environ.get(env) or "tf32"
    if prec not in DOT_PRECISIONS:
        raise ValueError(f"{env}={prec!r}: expected one of {DOT_PRECISIONS}")
    return prec


def _grad_dot_precisions(dtype: torch.dtype) -> tuple[str, str]:
    """Precisions of the gradient kernels' products: ``(PREC, PREC_LO)``, ``PREC_LO`` for the products whose
    rounding the gradients hardly feel. ``RWKV7_WKV_GRAD_DOT_PREC``: "mixed" (the default for bf16/fp16 inputs
    at the default TF32 products), "tf32" (TF32 everywhere, the default until 2026-11-26), "bf16", or any
    other product precision; unset with ``RWKV7_WKV_DOT_PREC`` set, the gradient kernels follow that.

    Whatever is chosen here, ``o``, the final state and ``dh0`` stay exactly those of ``tf32`` here (the
    chained forward and backward keep their precision); only the six input gradients change.
    "mixed": bf16 only for the inverse ``(I - A_ab)^-1`` and the four outer products with the chunk's states
    (``do h0^T``, ``dx h0^T``, ``v dhe^T``, ``u dhe^T``). Measured one group of products at a time
    (benchmarks/grad_precision_study.py: Triton interpreter, bf16 inputs, T = 256, N = 64, against the fp32
    reference), those two groups moved the worst
    input gradient from 4.2e-3 to 4.5e-3, while each other group alone took it to 6.5e-3 - 1.2e-2. On an H200
    at (8, 4096, 12, 64): worst input gradient 4.0e-3 vs 3.9e-3 (the peer's: 4.4e-3), fwd+bwd 3.54 vs 3.74 ms
    (benchmarks/results/tune_kernels_split_h200.json). Since then, for head sizes up to 64 (the transition
    form) the gradient kernels read the inverse that the chained forward formed (bf16 products by default, see
    :func:`_delta_dot_precision`), so there "mixed" rounds only the state outer products; larger heads
    form it in bf16 here.
    """
    env = os.environ.get("RWKV7_WKV_GRAD_DOT_PREC")
    if env and env not in (*DOT_PRECISIONS, "mixed"):
        raise ValueError(f"RWKV7_WKV_GRAD_DOT_PREC={env!r}: expected one of {(*DOT_PRECISIONS, 'mixed')}")
    prec = _dot_precision(dtype)
    if not env and prec == "tf32":
        env = "mixed"
    if env == "mixed":
        return prec, ("bf16" if prec == "tf32" else prec)
    prec = _dot_precision(dtype, "RWKV7_WKV_GRAD_DOT_PREC") if env else prec
    return prec, prec


def _delta_dot_precision(dtype: torch.dtype) -> str:
    """Precision of the chained forward's delta-rule products (see "Precision" above):
    ``RWKV7_WKV_DELTA_DOT_PREC``, else bf16 where the other products are TF32 (the default for bf16/fp16
    inputs), else the same as the others (fp32 inputs: "ieee"). The backward keeps its own precisions."""
    env = os.environ.get("RWKV7_WKV_DELTA_DOT_PREC")
    if env and env not in DOT_PRECISIONS:
        raise ValueError(f"RWKV7_WKV_DELTA_DOT_PREC={env!r}: expected one of {DOT_PRECISIONS}")
    prec = _dot_precision(dtype)
    if dtype == torch.float32:
        return prec
    return env or ("bf16" if prec == "tf32" else prec)


def _kgrad_forms_u() -> bool:
    """``RWKV7_WKV_KGRAD_FORMS_U`` ("1" by default, "0" off): let the K-side kernel form u where it pays (see
    "Where u is formed")."""
    return os.environ.get("RWKV7_WKV_KGRAD_FORMS_U", "1") != "0"


#: Most chains (sequences x heads) for which the chained kernels hand states on two chunks at a time (lookahead).
LOOKAHEAD_MAX_CHAINS = 32

#: Largest head size run in the transition form (chained kernels, P in registers); larger heads (the
#: upscaled states) use the fused serial kernels, whose registers hold no [K, K] matrix.
FAST_MAX_K = int(os.environ.get("RWKV7_WKV_FAST_MAX_K", "64"))


def _transition_form(K: int, V: int) -> bool:
    return max(K, V) <= FAST_MAX_K


def _scan_precision(dtype: torch.dtype) -> str:
    """Precision of the chain's ``P h`` product: the state is carried through it once per chunk."""
    return os.environ.get("RWKV7_WKV_SCAN_PREC") or ("ieee" if dtype == torch.float32 else "tf32")


def _warps(BT: int, K: int) -> int:
    return 4 if BT * K <= 2048 else 8


def _parallel_warps(BT: int, K: int) -> int:
    """Warps of the one-program-per-chunk kernels, which hold many [BT, K] tiles at once (registers)."""
    return int(os.environ.get("RWKV7_WKV_PAR_WARPS", "0")) or _warps(BT, K)


#: Gradient-kernel variants (``RWKV7_WKV_GRAD_VARIANT``, read at every backward): "fused" is the
#: single ``_bwd_grad_kernel``; "split" is ``_bwd_dv_kernel`` + ``_bwd_kgrad_kernel`` (fewer live
#: tiles, u and dx through fp32 scratch; see the comment above ``_bwd_dv_kernel``). H100, (8, 4096,
#: 12, 64), bf16, BT 32, default settings of each: fwd+bwd 4.63 ms fused, 5.30 ms split.
GRAD_VARIANTS = ("fused", "split")


def _grad_variant(BT: int, K: int, V: int) -> str:
    """``RWKV7_WKV_GRAD_VARIANT`` if set, else by timing and shared memory:

    * head size <= 64: "split" from BT = 32 on, "fused" at BT = 16. Measured on an H200 (``tune_kernels.py
      --chunks 16,32,64``, (8, 4096, 12, 64), fwd+bwd): BT 32 split 3.65 ms (4 warps) vs fused 4.10; BT 64
      split 5.12 vs fused 6.03; BT 16 fused 4.51 vs split 5.01. The same numbers either way.
    * larger heads (not timed on a GPU): "fused" where it fits in shared memory (see "Shared memory" below: up
      to BT * head size = 4096, i.e. BT <= 32 at 128, BT 16 at 256) and "split" beyond, whose K-side kernel
      works on K-blocks and whose dv kernel holds no K-side accumulators.
    """
    if max(K, V) <= 64:
        default = "split" if BT >= 32 else "fused"
    else:
        default = "fused" if BT * max(K, V) <= 4096 else "split"
    variant = os.environ.get("RWKV7_WKV_GRAD_VARIANT") or default
    if variant not in GRAD_VARIANTS:
        raise ValueError(f"RWKV7_WKV_GRAD_VARIANT={variant!r}: expected one of {GRAD_VARIANTS}")
    return variant


def _grad_block_v(variant: str, K: int, V: int) -> int:
    """V-columns per step of the gradient kernels (``RWKV7_WKV_GRAD_BV``): the fused kernel's loop
    block (64 measured best at head size 64; 32 above, whose [K, BV] state tiles are staged in shared
    memory: at K = 128, BT = 32, fp32 204800 -> 155648 bytes and fewer spills); for "split", the V-block
    of one ``_bwd_dv_kernel`` program (64: one program per chunk, nothing recomputed, and no spills at
    8 warps; see :func:`_split_grad_tiles`)."""
    default = 32 if variant == "fused" and K > 64 else 64
    return min(V, int(os.environ.get("RWKV7_WKV_GRAD_BV", "0")) or default)


def _split_grad_tiles(BT: int, K: int, V: int, form_u: bool = False) -> tuple[int, int]:
    """``_bwd_kgrad_kernel``'s V-block of its loop (``RWKV7_WKV_GRAD_KBV``) and K-block per program
    (``RWKV7_WKV_GRAD_BK``). Defaults from ptxas's spill counts for sm_90 (8 warps, no GPU timing
    yet). K = V = 64: BT 32: V-block 32, all of K (0 bytes spilled; K-block 32 spilled 632); BT 64:
    V-block 16, K-block 32 (0 bytes; all of K spilled 600). Larger heads keep K-blocks of 64 (K = 256,
    BT 32, fp32: 408 bytes spilled and 32 KB of shared memory; all of K: 50940 bytes and 88 KB). When the
    kernel forms u (``form_u``), all of V (H100, K = V = 64, BT 32: 0.89 ms vs 1.07 at 32, 1.16 at 16)."""
    kbv = int(os.environ.get("RWKV7_WKV_GRAD_KBV", "0")) or (V if form_u else 32 if BT <= 32 else 16)
    bk = int(os.environ.get("RWKV7_WKV_GRAD_BK", "0")) or (64 if BT <= 32 else 32)
    return min(V, kbv), min(K, bk)


def _grad_warps(variant: str, BT: int, K: int) -> int:
    """Warps of the gradient kernel(s) (``RWKV7_WKV_GRAD_WARPS``). Default: "fused", those of the
    other per-chunk kernels (:func:`_parallel_warps`); "split", 4 up to BT * K = 2048 (H200, BT 32, K 64:
    3.65 ms fwd+bwd at 4 warps, 4.93 at 8), 8 beyond (both of its kernels spill less; BT 64, K 64: 5.12 ms)."""
    default = _parallel_warps(BT, K) if variant == "fused" else (4 if BT * K <= 2048 else 8)
    return int(os.environ.get("RWKV7_WKV_GRAD_WARPS", "0")) or default


def _dv_register_cap(BT: int, K: int, V: int, warps: int) -> dict:
    """Launch option capping ``_bwd_dv_kernel``'s registers per thread (``RWKV7_WKV_DV_MAXNREG``, 0 = no cap).

    At head size 64, BT 32, 4 warps it needs 252 registers without a cap: two programs per SM. At 168,
    three fit (65536 registers per SM), for ~230 bytes of spills per thread (ptxas, sm_90a). H200,
    (8, 4096, 12, 64): 0.57 -> 0.49 ms per backward, fwd+bwd 3.41 -> 3.33 ms; caps of 128 (four programs)
    and 200 were slower (benchmarks/results/tune_kernels_inv_h200.log). Other shapes: not measured, no cap.
    """
    env = os.environ.get("RWKV7_WKV_DV_MAXNREG")
    cap = int(env) if env else (168 if max(K, V) <= 64 and BT == 32 and warps == 4 else 0)
    return {"maxnreg": cap} if cap else {}


def _stages(BT: int, K: int) -> int:
    """Software-pipelining depth of the chunk loops: each stage buffers a chunk's tiles in shared memory."""
    return 2 if BT * K <= 2048 else 1


# Shared memory. Every operand of a tl.dot is staged in shared memory, so the kernels that hold a
# chunk's [BT, K] tiles need about (number of such tiles) x BT x K x 4 bytes, and a launch over the
# GPU's limit fails with OutOfResources (sm_90: 232448 bytes per block). Measured offline for sm_90a
# (benchmarks/kernel_smem.py, Triton 3.9; the H100's Triton 3.6 needed 8 KB more in the one case seen):
# the fused serial kernels at head size 256 and BT 64 (bf16) need 282 KB (_fwd_kernel) and 217 KB
# (_bwd_state_kernel); _bwd_grad_kernel (V-block 64) needs 368 KB at head size 256 and BT 32 in fp32
# (the H100 failure), 231 KB even at BT 16 in bf16, and 360 KB at head size 128 and BT 64. Hence:
# the chunk is capped at BT x head size <= 8192 (:func:`_max_chunk`), the gradient is computed by the
# "split" kernels beyond BT x head size = 4096 (:func:`_grad_variant`), and the fused gradient kernel's
# V-block and the split K-side kernel's K-block shrink for heads over 64 (:func:`_grad_block_v`,
# :func:`_split_grad_tiles`). With these, every default launch for head sizes 64, 128, 256 (fp32,
# bf16, every chunk) is at most 174080 bytes (_bwd_grad_kernel, K = 256, BT = 16, fp32; at the default
# BT 32: 155648, K = 128, fp32). tests/test_kernels_triton.py checks part of this table offline.


def _max_chunk(K: int, V: int, dtype: torch.dtype) -> int:
    """Largest chunk for this head size and dtype (shared memory, see above). fp32 inputs stop at 32:
    their full-precision products stage more (K = 64, BT = 64: 240 KB measured on the H100)."""
    cap = 32 if dtype == torch.float32 else 64
    return max(_CHUNK_SIZES[-1], min(cap, 8192 // max(K, V)))


def _varlen_tables(cu_seqlens: torch.Tensor, BT: int, device) -> tuple[tuple[torch.Tensor, ...], int, list[int]]:
    """Tables of packed sequences: the chunk offset of each sequence, (sequence, chunk) of each global chunk,
    and the global chunks in the chained kernels' forward and backward orders (by position from the sequence's
    start, resp. end: a chunk's predecessor in its chain always comes earlier); then the chunk count and the
    sequences without tokens (no chunk, so no chained program: their final state / dh0 are set here)."""
    bounds = cu_seqlens.tolist()  # one sync per forward; the backward reuses the tables
    offsets, pairs, counts, empty = [], [], [], []
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        offsets.append(len(pairs))
        counts.append(math.ceil((e - s) / BT))
        pairs.extend((n, c) for c in range(counts[-1]))
        if counts[-1] == 0:
            empty.append(n)
    fwd_order = sorted(range(len(pairs)), key=lambda i: (pairs[i][1], pairs[i][0]))
    bwd_order = sorted(range(len(pairs)), key=lambda i: (counts[pairs[i][0]] - 1 - pairs[i][1], pairs[i][0]))

    def table(x):
        return torch.tensor(x or [0], dtype=torch.int32, device=device)

    idx = torch.tensor(pairs or [(0, 0)], dtype=torch.int32, device=device).view(-1, 2)
    return (table(offsets), idx, table(fwd_order), table(bwd_order)), len(pairs), empty


def _chain_sync(n_chunks: int, H: int, device, lookahead: bool = False) -> torch.Tensor:
    """Zeroed int32 ticket counter + one ready flag per (chunk, head) for a chained kernel launch (two with
    ``lookahead``: the second says that the chunk's transition is in the lookahead buffer)."""
    return torch.zeros(1 + (2 if lookahead else 1) * n_chunks * H, dtype=torch.int32, device=device)


def _lookahead_on(n_seq: int, H: int, n_chunks: int, K: int, V: int) -> bool:
    """Whether the chained kernels use the lookahead. ``RWKV7_WKV_CHAIN_LOOKAHEAD``: "1" / "0" forces it on / off;
    by default it is on when there are at most :data:`LOOKAHEAD_MAX_CHAINS` chains (sequences x heads), where the
    chain, not the parallel work, sets the time (see "Lookahead" above)."""
    env = os.environ.get("RWKV7_WKV_CHAIN_LOOKAHEAD")
    on = env == "1" if env in ("0", "1") else n_seq * H <= LOOKAHEAD_MAX_CHAINS
    return on and K == V and n_chunks > 0


def _factored_chain(la: torch.Tensor | None) -> bool:
    """Whether the chained kernels apply P and R through their factors (see "Factored chain step"): where there is
    no lookahead (which publishes P), unless ``RWKV7_WKV_FACTORED_CHAIN=0``."""
    env = os.environ.get("RWKV7_WKV_FACTORED_CHAIN")
    return la is None and env != "0"


def _chain_lookahead(n_seq: int, H: int, n_chunks: int, K: int, V: int, device) -> torch.Tensor | None:
    """The lookahead buffer of the chained kernels ([ceil(n_chunks / 2), H, 2, K, V] fp32: the transitions of the
    chunks at even positions, see :func:`_la_slot`), or None (no lookahead, :func:`_lookahead_on`)."""
    if not _lookahead_on(n_seq, H, n_chunks, K, V):
        return None
    return torch.empty((n_chunks + 1) // 2, H, 2, K, V, dtype=torch.float32, device=device)


class _WKV7Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, h0, cu_seqlens, output_final_state, chunk_size, torch_fallback, lower_bound,
                w_logit_bias):
        B, T, H, K = r.shape
        V = v.shape[-1]
        dtype = r.dtype
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        # Decay logits (see wkv7_triton): the kernels form the log decay, which never goes below the floor.
        w_bias = None if w_logit_bias is None else w_logit_bias.detach().reshape(-1).float().contiguous()
        if w_bias is not None:
            lower_bound = RWKV7_DECAY_FLOOR
        BT = _pick_chunk_size(w, min(chunk_size, _max_chunk(K, V, dtype)), lower_bound)
        varlen = cu_seqlens is not None
        if varlen:
            cu_seqlens = cu_seqlens.to(device=r.device, dtype=torch.int32).contiguous()
            n_seq, seq_T = cu_seqlens.numel() - 1, 0
            (chunk_offsets, chunk_indices, fwd_order, bwd_order), n_chunks, empty = _varlen_tables(cu_seqlens, BT, r.device)
        else:
            n_seq, seq_T = B, T
            n_chunks = B * math.ceil(T / BT)
            chunk_offsets = chunk_indices = fwd_order = bwd_order = None
            empty = list(range(B)) if T == 0 else []
        BV = _block_v(K, V)
        # Which gradients autograd wants. The chunk-start states are kept only for the input gradients
        # (_bwd_grad_kernel): dh0 alone needs just the backward scan. That is the case of a state-tuned
        # layer whose inputs come from frozen weights only (layer 0, or the lowest tuned layer).
        need_input_grads = any(ctx.needs_input_grad[:6])
        need_grad = need_input_grads or ctx.needs_input_grad[6]
        h0_f = None if h0 is None else h0.to(torch.float32).contiguous()
        o = torch.empty(B, T, H, V, dtype=dtype, device=r.device)
        ht = torch.empty(n_seq, H, K, V, dtype=torch.float32, device=r.device) if output_final_state else None
        states = torch.empty(n_chunks, H, K, V, dtype=torch.float32, device=r.device) if need_input_grads else None
        h0_flags = dict(HAS_H0=h0 is not None, H0_BCAST=h0 is not None and h0.shape[0] == 1 and n_seq > 1)
        common = dict(H=H, K=K, V=V, BT=BT, IS_VARLEN=varlen)
        inv = None
        if _transition_form(K, V):
            f32 = dict(dtype=torch.float32, device=r.device)
            # The chained kernel hands each chunk's start state to the next program through `states`, which
            # the backward then restarts every chunk from (kept only when input gradients are wanted).
            states = torch.empty(n_chunks, H, K, V, **f32)
            # Each chunk's (I - A_ab)^-1, kept for the backward's chained kernel and dv kernel (BT^2 floats per
            # chunk: 1/4 of the chunk states at BT = 32, K = 64), which then need not form it again.
            inv = torch.empty(n_chunks, H, BT, BT, **f32) if need_grad else None
            if n_chunks:
                la = _chain_lookahead(n_seq, H, n_chunks, K, V, r.device)
                _chain_fwd_kernel[(n_chunks * H,)](
                    r, w, k, v, a, b, w_bias, o, h0_f, ht, states, inv, la,
                    _chain_sync(n_chunks, H, r.device, la is not None), fwd_order, cu_seqlens, chunk_indices, seq_T,
                    n_seq, n_chunks * H, **common, LOG2_BT=int(math.log2(BT)), **h0_flags,
                    STORE_FINAL=output_final_state, PREC=_dot_precision(dtype),
                    DELTA_PREC=_delta_dot_precision(dtype), SCAN_PREC=_scan_precision(dtype),
                    W_LOGIT=w_bias is not None, FACTORED=_factored_chain(la), num_warps=_parallel_warps(BT, K),
                )
            if empty and ht is not None:  # sequences without tokens: no program; their final state is h0
                ht[empty] = 0.0 if h0_f is None else h0_f[[0] * len(empty) if h0_flags["H0_BCAST"] else empty]
            if not need_input_grads:
                states = None
        else:
            _fwd_kernel[(V // BV, n_seq * H)](
                r, w, k, v, a, b, w_bias, o, h0_f, ht, states, cu_seqlens, chunk_offsets, seq_T, **common, BV=BV,
                LOG2_BT=int(math.log2(BT)), **h0_flags, STORE_FINAL=output_final_state, STORE_STATES=need_input_grads,
                PREC=_dot_precision(dtype), W_LOGIT=w_bias is not None, num_warps=_warps(BT, K), num_stages=_stages(BT, K),
            )
        if need_grad:
            ctx.save_for_backward(r, w, k, v, a, b, states, cu_seqlens, chunk_offsets, chunk_indices, bwd_order, inv,
                                  w_bias)
            ctx.empty_sequences = empty
            ctx.w_bias_shape = None if w_logit_bias is None else (w_logit_bias.shape, w_logit_bias.dtype)
            ctx.meta = (BT, BV, n_seq, seq_T, n_chunks, h0 is not None, None if h0 is None else (h0.shape, h0.dtype))
            # Kept for the PyTorch fallback of the backward only. Not in save_for_backward: the kernels
            # never read h0 (the chunk states hold it), so modifying it in place after the forward stays
            # legal, as it was before the fallback existed (only a fallback would then see the new values).
            ctx.torch_fallback = torch_fallback
            ctx.h0 = None if h0 is None or not torch_fallback else h0.detach()
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        try:
            grads = _WKV7Function._kernel_backward(ctx, do, dht)
        except OutOfResources as err:
            if not ctx.torch_fallback:  # a direct wkv7_triton call (tests, benchmarks): no fallback
                raise
            r, w, k, v, a, b, _, cu_seqlens = ctx.saved_tensors[:8]
            note_out_of_resources(err, r, v)
            grads = _torch_backward((r, w, k, v, a, b), ctx.h0, cu_seqlens, do, dht, ctx.saved_tensors[-1])
        # The bias of decay logits: the sum of the logits' gradient over tokens (from its rounding to w's dtype).
        dw, dbias = grads[1], None
        if ctx.needs_input_grad[12] and dw is not None:
            shape, dtype = ctx.w_bias_shape
            dbias = dw.float().sum((0, 1)).reshape(shape).to(dtype)
        return (*grads, None, None, None, None, None, dbias)

    @staticmethod
    def _kernel_backward(ctx, do, dht):
        r, w, k, v, a, b, states, cu_seqlens, chunk_offsets, chunk_indices, bwd_order, inv, w_bias = ctx.saved_tensors
        BT, BV, n_seq, seq_T, n_chunks, has_h0, h0_info = ctx.meta
        B, T, H, K = r.shape
        V = v.shape[-1]
        varlen = cu_seqlens is not None
        prec = _dot_precision(r.dtype)
        do = do.contiguous()
        dht = None if dht is None else dht.to(torch.float32).contiguous()
        # dstates: the gradient of every chunk's end state, for the input-gradient kernel only.
        dstates = None if states is None else torch.empty_like(states)
        dh0 = torch.empty(n_seq, H, K, V, dtype=torch.float32, device=r.device)
        common = dict(H=H, K=K, V=V, BT=BT, IS_VARLEN=varlen)
        grad_prec, grad_prec_lo = _grad_dot_precisions(r.dtype)
        variant = _grad_variant(BT, K, V)
        # u and dx of every chunk (fp32, padded rows included), for the split variant's K-side kernel: n_chunks * H
        # * BT * V floats each. For head size 64 the chained backward writes dx (and dv) itself (with_dv), and u
        # too unless the K-side kernel forms it (form_u, see "Where u is formed").
        split = states is not None and variant == "split"
        dr, dw, dk, dv, da, db = (torch.empty_like(x) for x in (r, w, k, v, a, b)) if states is not None else (None,) * 6
        with_dv = split and _transition_form(K, V) and _grad_block_v(variant, K, V) == V
        form_u = (with_dv and inv is not None and _split_grad_tiles(BT, K, V)[1] == K and _kgrad_forms_u()
                  and not _lookahead_on(n_seq, H, n_chunks, K, V))
        U = torch.empty(n_chunks, H, BT, V, dtype=torch.float32, device=r.device) if split and not form_u else None
        DX = torch.empty(n_chunks, H, BT, V, dtype=torch.float32, device=r.device) if split else None
        if _transition_form(K, V):
            # The chain hands each chunk's end-state gradient to the chunk before through `dstates` (a scratch
            # buffer when only dh0 is wanted).
            handover = dstates if dstates is not None else torch.empty(n_chunks, H, K, V, dtype=torch.float32,
                                                                       device=r.device)
            if n_chunks:
                la = _chain_lookahead(n_seq, H, n_chunks, K, V, r.device)
                _chain_bwd_kernel[(n_chunks * H,)](
                    r, w, k, v, a, b, w_bias, do, dht, dh0, handover, states, dv, U, DX, inv, la,
                    _chain_sync(n_chunks, H, r.device, la is not None), bwd_order, cu_seqlens, chunk_indices, seq_T,
                    n_seq, n_chunks * H, **common,
                    LOG2_BT=int(math.log2(BT)), HAS_DHT=dht is not None, PREC=prec, SCAN_PREC=_scan_precision(r.dtype),
                    W_LOGIT=w_bias is not None, WITH_DV=with_dv, GRAD_PREC=grad_prec, STORE_U=not form_u,
                    num_warps=_parallel_warps(BT, K),
                )
            del handover
            if ctx.empty_sequences:  # sequences without tokens: no program; the gradient passes through
                dh0[ctx.empty_sequences] = 0.0 if dht is None else dht[ctx.empty_sequences]
        else:
            _bwd_state_kernel[(V // BV, n_seq * H)](
                r, w, a, b, w_bias, do, dht, dh0, dstates, cu_seqlens, chunk_offsets, seq_T, **common, BV=BV,
                LOG2_BT=int(math.log2(BT)), HAS_DHT=dht is not None, PREC=prec, STORE_DSTATES=states is not None,
                W_LOGIT=w_bias is not None, num_warps=_warps(BT, K), num_stages=_stages(BT, K),
            )
        dh0_out = None
        if has_h0:
            shape, dtype = h0_info
            dh0_out = (dh0.sum(0, keepdim=True) if shape[0] == 1 and n_seq > 1 else dh0).to(dtype)
        if states is None:  # only dh0 was asked for (see the forward): no input-gradient kernel
            return None, None, None, None, None, None, dh0_out
        gbv, gwarps = _grad_block_v(variant, K, V), _grad_warps(variant, BT, K)
        if n_chunks and variant == "fused":
            _bwd_grad_kernel[(n_chunks, H)](
                r, w, k, v, a, b, w_bias, do, states, dstates, dr, dw, dk, dv, da, db, inv, cu_seqlens, chunk_indices, seq_T,
                H=H, K=K, V=V, BT=BT, BV=gbv, LOG2_BT=int(math.log2(BT)), IS_VARLEN=varlen, PREC=grad_prec, PREC_LO=grad_prec_lo,
                W_LOGIT=w_bias is not None, num_warps=gwarps, num_stages=_stages(BT, K),
            )
        elif n_chunks:
            if not with_dv:  # else the chained backward wrote dv, u and dx
                _bwd_dv_kernel[(n_chunks * (V // gbv), H)](
                    r, w, k, v, a, b, w_bias, do, states, dstates, dv, U, DX, inv, cu_seqlens, chunk_indices, seq_T,
                    H=H, K=K, V=V, BT=BT, BV=gbv, LOG2_BT=int(math.log2(BT)), IS_VARLEN=varlen, PREC=grad_prec,
                    PREC_LO=grad_prec_lo, W_LOGIT=w_bias is not None, num_warps=gwarps, **_dv_register_cap(BT, K, V, gwarps),
                )
            kbv, gbk = _split_grad_tiles(BT, K, V, form_u)
            _bwd_kgrad_kernel[(n_chunks * (K // gbk), H)](
                r, w, k, v, a, b, w_bias, do, states, dstates, U, DX, inv, dr, dw, dk, da, db, cu_seqlens,
                chunk_indices, seq_T, H=H, K=K, V=V, BT=BT, BV=kbv, BK=gbk, IS_VARLEN=varlen, PREC=grad_prec,
                PREC_LO=grad_prec_lo, W_LOGIT=w_bias is not None, FORM_U=form_u, num_warps=gwarps,
                num_stages=_stages(BT, K),
            )
            del U, DX
        return dr, dw, dk, dv, da, db, dh0_out


# ----------------------------------------------------------------------------------------------
# Safety net: a launch that does not fit the GPU (OutOfResources) -> the chunked PyTorch path
# ----------------------------------------------------------------------------------------------

#: (device, dtype, K, V) of inputs for which a launch raised OutOfResources in this process; the
#: dispatcher (:func:`rwkv7_kernels.wkv7`) sends them straight to the PyTorch path from then on.
OUT_OF_RESOURCES: set = set()


def _oor_key(r: torch.Tensor, v: torch.Tensor) -> tuple:
    return (str(r.device), r.dtype, r.shape[-1], v.shape[-1])


def known_out_of_resources(r: torch.Tensor, v: torch.Tensor) -> bool:
    return _oor_key(r, v) in OUT_OF_RESOURCES


def note_out_of_resources(err: Exception, r: torch.Tensor, v: torch.Tensor) -> None:
    """Remember that these head sizes do not fit, and say so once (per device, dtype and head size).

    The launch-time block sizes are chosen to fit an H100 (see "Shared memory" above), so this is for
    GPUs with less shared memory per block (A100: 163 KB, consumer cards: ~99 KB), head sizes
    outside those checked, or a forced setting (``RWKV7_WKV_GRAD_VARIANT=fused`` at head size 256)."""
    key = _oor_key(r, v)
    if key in OUT_OF_RESOURCES:
        return
    OUT_OF_RESOURCES.add(key)
    B, T, H, K = r.shape
    warnings.warn(
        f"wkv7: a Triton kernel does not fit this GPU for (B, T, H, K, V) = ({B}, {T}, {H}, {K}, {v.shape[-1]}), "
        f"{r.dtype} on {r.device} ({err}). Falling back to the chunked PyTorch path (slower, more memory) for "
        f"K={K}, V={v.shape[-1]} in this process; set RWKV7_WKV_BACKEND=torch to choose that path up front.",
        RuntimeWarning,
        stacklevel=3,
    )


def _torch_backward(xs, h0, cu_seqlens, do, dht, w_bias=None):
    """Gradients of r, w, k, v, a, b and h0 by autograd through the chunked PyTorch path (recomputes
    the forward; used when a backward kernel does not fit the GPU). ``w_bias``: ``w`` holds decay logits."""
    from .chunked_torch import wkv7_chunked_torch

    with torch.enable_grad():
        ins = [x.detach().requires_grad_() for x in xs] + ([] if h0 is None else [h0.detach().requires_grad_()])
        log_w = ins[1] if w_bias is None else log_decay_from_logits(ins[1], w_bias)
        o, ht = wkv7_chunked_torch(ins[0], log_w, *ins[2:6], initial_state=None if h0 is None else ins[6],
                                   output_final_state=dht is not None, cu_seqlens=cu_seqlens)
        outs, grad_outs = [o], [do.to(o.dtype)]
        if dht is not None:
            outs.append(ht)
            grad_outs.append(dht.to(ht.dtype))
        grads = torch.autograd.grad(outs, ins, grad_outs)
    return (*grads, None) if h0 is None else grads


def _check(r, v, initial_state) -> None:
    K, V = r.shape[-1], v.shape[-1]
    for name, n in (("K", K), ("V", V)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"wkv7_triton: head size {name}={n} must be a power of two >= 16")
    if r.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"wkv7_triton: unsupported dtype {r.dtype}")


def wkv7_triton(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    torch_fallback: bool = False,
    lower_bound: float | None = None,
    w_logit_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked WKV-7 with autograd (gradients of r, w, k, v, a, b and ``initial_state``).

    Same contract as :func:`rwkv7_kernels.wkv7`: inputs ``[B, T, H, N]`` (bf16, fp16 or fp32; all of
    the same dtype), ``initial_state`` ``[B, H, K, V]`` (or ``[1, H, K, V]``, broadcast over the batch,
    its gradient summed) fp32, ``cu_seqlens`` ``[N+1]`` for packed sequences (then ``B == 1`` and one
    initial state per sequence). Returns ``o`` in the input dtype and the fp32 final state (or None).
    ``chunk_size`` (16, 32 or 64) overrides the default; it is shortened for steep decays, judged from
    ``lower_bound`` (a bound the caller guarantees, ``w >= lower_bound``) if given, else from ``w.min()``
    (a device sync). ``torch_fallback`` (set by the dispatcher): if a backward kernel raises ``OutOfResources``, compute
    the gradients with the PyTorch path instead (:func:`note_out_of_resources` warns once). A forward
    kernel's ``OutOfResources`` always propagates; the dispatcher catches it. ``w_logit_bias``: ``w`` holds
    decay logits, as in :func:`rwkv7_kernels.wkv7` (the kernels form the log decay in fp32).
    """
    _check(r, v, initial_state)
    # Each tensor keeps its own dtype (the kernels upcast on load): an fp32 log decay next to bf16
    # activations is not rounded to bf16. Gradients come back in each input's dtype.
    o, ht = _WKV7Function.apply(
        r, w, k, v, a, b, initial_state, cu_seqlens, output_final_state, chunk_size or DEFAULT_CHUNK, torch_fallback,
        lower_bound, w_logit_bias,
    )
    return o, ht


@torch.no_grad()
def wkv7_decode_triton(r, w, k, v, a, b, state: torch.Tensor) -> torch.Tensor:
    """Recurrent WKV-7 for a few tokens (T = 1 in decoding); no autograd.

    ``r, w, k, a, b``: ``[B, T, H, K]``; ``v``: ``[B, T, H, V]``; ``state``: ``[B, H, K, V]`` fp32
    contiguous, **updated in place** to the state after the last token. Returns ``o`` ``[B, T, H, V]``
    in the dtype of ``r``.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    if state.dtype != torch.float32 or not state.is_contiguous() or tuple(state.shape) != (B, H, K, V):
        raise ValueError(f"wkv7_decode_triton: state must be a contiguous fp32 [{B}, {H}, {K}, {V}] tensor")
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    o = torch.empty(B, T, H, V, dtype=r.dtype, device=r.device)
    BV = min(V, 32)
    _decode_kernel[(triton.cdiv(V, BV), B * H)](r, w, k, v, a, b, o, state, T, H=H, K=K, V=V, BV=BV, num_warps=2 if K <= 64 else 4)
    return o
