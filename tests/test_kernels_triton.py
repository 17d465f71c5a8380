"""Triton WKV-7 kernels against the sequential reference, on CPU through Triton's interpreter.

Every case compares the output, the final state and every gradient (r, w, k, v, a, b and the initial
state), with a gradient flowing into the final state too, by relative norm error.
"""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton` (see conftest.py)

import pytest
import torch

triton = pytest.importorskip("triton")

from rwkv7_kernels import wkv7  # noqa: E402
from rwkv7_kernels.reference import wkv7_reference  # noqa: E402
from rwkv7_kernels.triton_wkv7 import wkv7_decode_triton, wkv7_triton  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs a GPU or TRITON_INTERPRET=1 set before triton is imported",
)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

import wkv_cases  # noqa: E402
from wkv_cases import TOL, assert_close_all, rel, run_with_grads  # noqa: E402


def rwkv_inputs(*args, **kwargs):
    return wkv_cases.rwkv_inputs(*args, device=DEVICE, **kwargs)


CASES = [
    # (B, T, H, N, chunk, initial state: None | "full" | "bcast")
    pytest.param(2, 45, 2, 16, 16, "full", id="N16-T45-bt16-h0"),
    pytest.param(1, 70, 1, 64, 32, None, id="N64-T70-bt32-noh0"),
    pytest.param(3, 37, 2, 32, 16, "bcast", id="N32-T37-bt16-bcast"),
    pytest.param(1, 80, 1, 32, 64, "full", id="N32-T80-bt64-h0"),
    pytest.param(1, 40, 1, 128, 32, "full", id="N128-T40-bt32-h0"),
    # head size 256 (upscaled states): chunk 64 asked, 32 run (shared memory), "split" gradient kernels
    pytest.param(1, 40, 1, 256, 64, "full", id="N256-T40-bt64-h0"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,H,N,chunk,h0_kind", CASES)
def test_matches_reference(B, T, H, N, chunk, h0_kind, dtype):
    xs = rwkv_inputs(B, T, H, N, dtype)
    h0 = None
    if h0_kind:
        h0 = torch.randn(B if h0_kind == "full" else 1, H, N, N, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ours = run_with_grads(wkv7_triton, xs, h0, chunk_size=chunk)
    ref = run_with_grads(lambda *x, **kw: wkv7_reference(*(t.float() for t in x[:6]), **kw), xs, h0)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    if h0_kind == "bcast":
        assert ours[-1].shape == (1, H, N, N)
    assert_close_all(ours, ref, dtype)


# Gradient-kernel variants (RWKV7_WKV_GRAD_VARIANT, read at each backward): the single ("fused")
# kernel, and the split pair with blocks of 16 (at N = 32: two dv programs per chunk, two steps of
# the K-side kernel's V loop, two K-block programs).
GRAD_VARIANTS = [
    pytest.param({"RWKV7_WKV_GRAD_VARIANT": "fused"}, id="grad-fused"),
    pytest.param({"RWKV7_WKV_GRAD_VARIANT": "split", "RWKV7_WKV_GRAD_BV": "16", "RWKV7_WKV_GRAD_KBV": "16",
                  "RWKV7_WKV_GRAD_BK": "16"}, id="grad-split"),
]


@pytest.mark.parametrize("grad_env", GRAD_VARIANTS)
@pytest.mark.parametrize("form", ["transition", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_matches_reference(dtype, form, grad_env, monkeypatch):
    """Both kernel forms: the transition form (pre-pass + scan, heads <= FAST_MAX_K) and the fused
    serial kernels used for larger heads, forced here on a small head; each with both gradient-kernel
    variants."""
    from rwkv7_kernels import triton_wkv7

    if form == "fused":
        monkeypatch.setattr(triton_wkv7, "FAST_MAX_K", 0)
    for name, value in grad_env.items():
        monkeypatch.setenv(name, value)
    xs = rwkv_inputs(1, 90, 2, 32, dtype, seed=3)
    cu = torch.tensor([0, 20, 21, 64, 90], dtype=torch.int32, device=DEVICE)  # includes a 1-token sequence
    h0 = torch.randn(4, 2, 32, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ours = run_with_grads(wkv7_triton, xs, h0, cu_seqlens=cu, chunk_size=16)
    ref = run_with_grads(lambda *x, **kw: wkv7_reference(*(t.float() for t in x[:6]), **kw), xs, h0, cu_seqlens=cu)
    assert_close_all(ours, ref, dtype)


@pytest.mark.parametrize("B,T,H,N,chunk,h0_kind", [CASES[0], CASES[3], CASES[4]])
def test_split_grad_matches_reference(B, T, H, N, chunk, h0_kind, monkeypatch):
    """The "split" gradient kernels on fixed-length shapes with T not a multiple of the chunk (16, 64,
    and a 128-head in the fused serial form), with their default K-side blocks; fp32, so their math is
    checked at fp32 tolerance."""
    monkeypatch.setenv("RWKV7_WKV_GRAD_VARIANT", "split")
    monkeypatch.setenv("RWKV7_WKV_GRAD_BV", "16")
    xs = rwkv_inputs(B, T, H, N, torch.float32)
    h0 = torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ours = run_with_grads(wkv7_triton, xs, h0, chunk_size=chunk)
    ref = run_with_grads(lambda *x, **kw: wkv7_reference(*x[:6], **kw), xs, h0)
    assert_close_all(ours, ref, torch.float32)


@pytest.mark.parametrize("form", ["transition", "fused"])
def test_bf16_products_match_reference(form, monkeypatch):
    """``RWKV7_WKV_DOT_PREC=bf16`` (opt-in: the intra-chunk products on bf16-rounded tiles) in both kernel
    forms, bf16 inputs: every output and gradient within 5% relative error (tf32: 2%), the state scan
    staying in tf32 so the error does not grow from chunk to chunk."""
    from rwkv7_kernels import triton_wkv7

    if form == "fused":
        monkeypatch.setattr(triton_wkv7, "FAST_MAX_K", 0)
    monkeypatch.setenv("RWKV7_WKV_DOT_PREC", "bf16")
    xs = rwkv_inputs(2, 77, 2, 32, torch.bfloat16, seed=5)
    h0 = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    ours = run_with_grads(wkv7_triton, xs, h0, chunk_size=16)
    ref = run_with_grads(lambda *x, **kw: wkv7_reference(*(t.float() for t in x[:6]), **kw), xs, h0)
    errs = {n: rel(x, y) for n, x, y in zip(wkv_cases.NAMES, ours, ref)}
    assert all(e < 5e-2 for e in errs.values()), errs
    monkeypatch.setenv("RWKV7_WKV_DOT_PREC", "fp8")
    with pytest.raises(ValueError, match="RWKV7_WKV_DOT_PREC"):
        wkv7_triton(*xs, initial_state=h0)


@pytest.mark.parametrize("grad_prec", ["bf16", "mixed"])
@pytest.mark.parametrize("grad_env", GRAD_VARIANTS)
def test_bf16_products_in_gradient_kernel_only(grad_prec, grad_env, monkeypatch):
    """``RWKV7_WKV_GRAD_DOT_PREC=bf16`` or ``mixed`` (the default): o, the final state and dh0 are exactly those
    of the all-TF32 run, since only the gradient kernels' products change; the six input gradients within 5%,
    and with "mixed" close to the all-TF32 run's own error."""
    for name, value in grad_env.items():
        monkeypatch.setenv(name, value)
    xs = rwkv_inputs(1, 77, 2, 32, torch.bfloat16, seed=7)
    h0 = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    monkeypatch.setenv("RWKV7_WKV_GRAD_DOT_PREC", "tf32")
    default = run_with_grads(wkv7_triton, xs, h0, chunk_size=16)
    monkeypatch.setenv("RWKV7_WKV_GRAD_DOT_PREC", grad_prec)
    coarse = run_with_grads(wkv7_triton, xs, h0, chunk_size=16)
    ref = run_with_grads(lambda *x, **kw: wkv7_reference(*(t.float() for t in x[:6]), **kw), xs, h0)
    for name, x, y in zip(wkv_cases.NAMES, coarse, default):
        if name in ("o", "final_state", "dh0"):
            assert torch.equal(x, y), name
    errs = {n: rel(x, y) for n, x, y in zip(wkv_cases.NAMES, coarse, ref)}
    assert all(e < 5e-2 for e in errs.values()), errs
    if grad_prec == "mixed":  # bf16 only where it costs little: close to the default's own error
        base = {n: rel(x, y) for n, x, y in zip(wkv_cases.NAMES, default, ref)}
        assert all(errs[n] < 1.5 * base[n] + 1e-4 for n in errs), (errs, base)
    if grad_prec == "mixed":  # and it is what an unset variable means
        monkeypatch.delenv("RWKV7_WKV_GRAD_DOT_PREC")
        unset = run_with_grads(wkv7_triton, xs, h0, chunk_size=16)
        assert all(torch.equal(x, y) for x, y in zip(unset, coarse))
    monkeypatch.setenv("RWKV7_WKV_GRAD_DOT_PREC", "fp8")
    with pytest.raises(ValueError, match="mixed"):
        run_with_grads(wkv7_triton, xs, h0, chunk_size=16)


def test_delta_rule_products_in_bf16_keep_outputs_and_gradients(monkeypatch):
    """bf16 inputs: by default the chained forward rounds to bf16 the operands of its delta-rule products
    (``RWKV7_WKV_DELTA_DOT_PREC``, see "Precision" in kernels/triton_wkv7.py). o, dh0 and every input gradient
    stay within 20% of their distance to the fp32 reference with TF32 (full fp32 in the interpreter); the final
    state moves, but stays within 2e-3. fp32 inputs keep full-precision products."""
    from rwkv7_kernels.triton_wkv7 import _delta_dot_precision

    xs = rwkv_inputs(1, 77, 2, 64, torch.bfloat16, seed=9)
    h0 = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(10)).to(DEVICE) * 0.3
    ref = run_with_grads(lambda *x, **kw: wkv7_reference(*(t.float() for t in x[:6]), **kw), xs, h0)
    monkeypatch.setenv("RWKV7_WKV_DELTA_DOT_PREC", "tf32")
    fine = run_with_grads(wkv7_triton, xs, h0, chunk_size=32)
    monkeypatch.delenv("RWKV7_WKV_DELTA_DOT_PREC")
    default = run_with_grads(wkv7_triton, xs, h0, chunk_size=32)
    assert not torch.equal(default[1], fine[1])  # the default does round something
    base = {n: rel(x, y) for n, x, y in zip(wkv_cases.NAMES, fine, ref)}
    errs = {n: rel(x, y) for n, x, y in zip(wkv_cases.NAMES, default, ref)}
    assert errs["final_state"] < 2e-3, errs
    assert all(errs[n] < 1.2 * base[n] + 1e-4 for n in errs if n != "final_state"), (errs, base)
    assert _delta_dot_precision(torch.bfloat16) == "bf16"
    assert _delta_dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv("RWKV7_WKV_DELTA_DOT_PREC", "fp8")
    with pytest.raises(ValueError, match="RWKV7_WKV_DELTA_DOT_PREC"):
        wkv7_triton(*xs, initial_state=h0)


def test_unknown_grad_variant_raises(monkeypatch):
    monkeypatch.setenv("RWKV7_WKV_GRAD_VARIANT", "nope")
    xs = [x.requires_grad_() for x in rwkv_inputs(1, 16, 1, 16, torch.float32)]
    o, _ = wkv7_triton(*xs, chunk_size=16)
    with pytest.raises(ValueError, match="RWKV7_WKV_GRAD_VARIANT"):
        o.sum().backward()


def test_chain_orders_never_wait_on_a_later_ticket():
    """The chained kernels cannot deadlock if every chunk's predecessor in its chain (the chunk before, forward;
    after, backward) is dealt an earlier ticket. Checked on the varlen tables (uneven and empty sequences); the
    fixed-length order is the same rule in closed form (:func:`_chain_chunk`)."""
    from rwkv7_kernels.triton_wkv7 import _varlen_tables

    cu = torch.tensor([0, 5, 5, 100, 101, 164, 300])
    (offsets, pairs, fwd, bwd), n_chunks, empty = _varlen_tables(cu, 32, "cpu")
    pairs = [tuple(p) for p in pairs.tolist()]
    counts = [sum(1 for n, _ in pairs if n == s) for s in range(len(cu) - 1)]
    assert n_chunks == len(pairs) == sum(counts) and empty == [1] and counts[1] == 0
    for order, step in ((fwd.tolist(), -1), (bwd.tolist(), +1)):
        assert sorted(order) == list(range(n_chunks))
        rank = {(pairs[i]): r for r, i in enumerate(order)}
        for (n, c), r in rank.items():
            for hops in (1, 2):  # with the lookahead a chunk also waits on the chunk two before it in its chain
                pred = (n, c + hops * step)
                if pred in rank:
                    assert rank[pred] < r, (n, c, "waits on a later ticket")
    # The lookahead's buffer slot of a publishing chunk (even position >= 2 of its chain, not its chain's last) is
    # its global index // 2 (_la_slot): unique among the publishers of each direction (sequences of odd and even
    # chunk counts starting at odd and even global chunks).
    cu = torch.tensor([0, 5, 205, 238, 538, 635, 699, 828, 1078])
    (_, pairs, _, _), _, _ = _varlen_tables(cu, 32, "cpu")
    pairs = [tuple(p) for p in pairs.tolist()]
    counts = [sum(1 for n, _ in pairs if n == s) for s in range(len(cu) - 1)]
    for from_end in (False, True):
        slots = []
        for g, (n, c) in enumerate(pairs):
            pos = counts[n] - 1 - c if from_end else c
            if pos >= 2 and pos % 2 == 0 and pos < counts[n] - 1:
                slots.append(g // 2)
        assert len(slots) >= 8 and len(slots) == len(set(slots))


def _chain_case(varlen, dtype, seed, fixed_T):
    """Inputs of the chained kernels' A/B tests (head size 64, 2 heads): two sequences of ``fixed_T`` tokens, or
    five packed ones of uneven lengths (one of a single token) with one initial state each."""
    cu = torch.tensor([0, 10, 40, 41, 150, 300]) if varlen else None
    xs = rwkv_inputs(1 if varlen else 2, 300 if varlen else fixed_T, 2, 64, dtype, seed=seed)
    h0 = torch.randn(5 if varlen else 2, 2, 64, 64, generator=torch.Generator().manual_seed(seed + 1)) * 0.3
    return xs, h0, cu


def _runs_with_flag_off_and_on(monkeypatch, env, xs, h0, cu):
    """Outputs, final state and gradients of the Triton path (chunk 32) with ``env`` set to "0" and to "1"."""
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(env, flag)
        runs[flag] = run_with_grads(wkv7_triton, xs, h0, chunk_size=32, cu_seqlens=cu)
    return runs


@pytest.mark.parametrize("varlen", [False, True])
def test_lookahead_hands_on_the_same_states(varlen, monkeypatch):
    """The chained kernels' lookahead (``RWKV7_WKV_CHAIN_LOOKAHEAD``: some programs form their start state from
    the state two chunks back and the published transition of the chunk between) gives exactly the outputs,
    states and gradients of the plain chain (the interpreter runs the same products in the same order), for
    fixed-length and packed sequences of odd and even chunk counts; and it is the default only for few chains."""
    from rwkv7_kernels import triton_wkv7

    xs, h0, cu = _chain_case(varlen, torch.bfloat16, seed=3, fixed_T=200)
    monkeypatch.setenv("RWKV7_WKV_KGRAD_FORMS_U", "0")  # else the K-side kernel forms u without the lookahead
    monkeypatch.setenv("RWKV7_WKV_FACTORED_CHAIN", "0")  # else the forward factors P and R without the lookahead
    runs = _runs_with_flag_off_and_on(monkeypatch, "RWKV7_WKV_CHAIN_LOOKAHEAD", xs, h0, cu)
    assert all(torch.equal(x, y) for x, y in zip(runs["0"], runs["1"]))
    monkeypatch.delenv("RWKV7_WKV_CHAIN_LOOKAHEAD")
    chains = triton_wkv7.LOOKAHEAD_MAX_CHAINS
    assert triton_wkv7._chain_lookahead(chains, 1, 4, 64, 64, "cpu") is not None
    assert triton_wkv7._chain_lookahead(chains + 1, 1, 4, 64, 64, "cpu") is None


@pytest.mark.parametrize("varlen,dtype", [(False, torch.bfloat16), (True, torch.bfloat16), (False, torch.float32)],
                         ids=["bf16", "bf16-varlen", "fp32"])
def test_kside_kernel_forming_u_gives_the_same_gradients(varlen, dtype, monkeypatch):
    """Without the lookahead the K-side gradient kernel forms u itself (``RWKV7_WKV_KGRAD_FORMS_U``, see "Where u is
    formed" in triton_wkv7.py) instead of reading what the chained backward stored: the same products on the same
    operands, so the same gradients up to fp32 rounding (numpy's matmul may sum in another order, and a bf16
    gradient then rounds a few elements to the next bf16 value: ~1e-5 relative) and the reference's, for bf16 and
    fp32 inputs, fixed-length and packed sequences."""
    xs, h0, cu = _chain_case(varlen, dtype, seed=5, fixed_T=100)
    monkeypatch.setenv("RWKV7_WKV_CHAIN_LOOKAHEAD", "0")
    runs = _runs_with_flag_off_and_on(monkeypatch, "RWKV7_WKV_KGRAD_FORMS_U", xs, h0, cu)
    assert all(torch.equal(x, y) for x, y in zip(runs["0"][:2], runs["1"][:2]))  # o, final state: no change
    assert all(rel(x, y) < 1e-4 for x, y in zip(runs["0"], runs["1"]))
    ref = run_with_grads(wkv7_reference, [x.float() for x in xs], h0, cu_seqlens=cu)
    assert_close_all(runs["1"], ref, dtype)


@pytest.mark.parametrize("varlen,dtype", [(False, torch.bfloat16), (True, torch.bfloat16), (False, torch.float32)],
                         ids=["bf16", "bf16-varlen", "fp32"])
def test_factored_chain_step_matches_the_transition_form(varlen, dtype, monkeypatch):
    """Without the lookahead the chained forward applies P and R through their factors (``P h = e^{g_last} h +
    bt^T (W h)``, ``R h = rg h + A_rb (W h)``; "Factored chain step" in triton_wkv7.py) instead of forming them:
    the same outputs, final state and gradients as the formed P and R up to rounding (exactly fp32's for fp32
    inputs), and the reference's, for fixed-length and packed sequences; with the lookahead P is still formed."""
    from rwkv7_kernels import triton_wkv7

    xs, h0, cu = _chain_case(varlen, dtype, seed=7, fixed_T=100)
    monkeypatch.setenv("RWKV7_WKV_CHAIN_LOOKAHEAD", "0")
    runs = _runs_with_flag_off_and_on(monkeypatch, "RWKV7_WKV_FACTORED_CHAIN", xs, h0, cu)
    tol = 1e-5 if dtype == torch.float32 else 3e-3  # bf16: bt^T (W h) rounds W h, P h rounded bt^T W
    assert all(rel(x, y) < tol for x, y in zip(runs["0"], runs["1"]))
    ref = run_with_grads(wkv7_reference, [x.float() for x in xs], h0, cu_seqlens=cu)
    assert_close_all(runs["1"], ref, dtype)
    monkeypatch.delenv("RWKV7_WKV_FACTORED_CHAIN")
    assert triton_wkv7._factored_chain(None) and not triton_wkv7._factored_chain(torch.zeros(1))


def test_forward_only_and_dispatch():
    """No grad, no final state, through the public entry point."""
    xs = rwkv_inputs(2, 33, 2, 16, torch.float32, seed=5)
    o, ht = wkv7(*xs, backend="triton")
    o_ref, _ = wkv7_reference(*xs)
    assert ht is None and rel(o, o_ref) < 1e-4


@pytest.mark.parametrize("form", ["transition", "fused"])
def test_only_initial_state_gradient(form, monkeypatch):
    """Inputs that need no gradient (a state-tuned layer fed by frozen weights): the forward keeps no chunk
    states, the backward runs the state scan only, and dh0 equals the reference's."""
    import rwkv7_kernels.triton_wkv7 as tw

    if form == "fused":
        monkeypatch.setattr(tw, "_transition_form", lambda K, V: False)
    launched = []
    for name in ("_bwd_grad_kernel", "_bwd_dv_kernel", "_bwd_kgrad_kernel"):
        monkeypatch.setattr(tw, name, _Recorder(getattr(tw, name), name, launched))
    xs = rwkv_inputs(2, 45, 2, 32, torch.float32, seed=3)
    h0 = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE).requires_grad_()
    do = torch.randn(2, 45, 2, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    o, _ = wkv7_triton(*xs, initial_state=h0, chunk_size=16)
    (dh0,) = torch.autograd.grad(o, h0, do)
    h0_ref = h0.detach().clone().requires_grad_()
    o_ref, _ = wkv7_reference(*xs, initial_state=h0_ref)
    (dh0_ref,) = torch.autograd.grad(o_ref, h0_ref, do)
    assert rel(o, o_ref) < 1e-5 and rel(dh0, dh0_ref) < 1e-5
    assert launched == []  # no input-gradient kernel ran


@pytest.mark.parametrize("form", ["transition", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decay_logits_match_the_log_decay(form, dtype, monkeypatch):
    """``w_logit_bias``: the kernels form the log decay from logits themselves. Output, final state and every
    gradient (the logits' and the bias' included) equal those of the reference given that log decay; a
    logit of -inf (padding) is decay 1 with a zero gradient; the chunk is picked without reading ``w``."""
    import rwkv7_kernels.triton_wkv7 as tw
    from rwkv7_kernels import log_decay_from_logits

    if form == "fused":
        monkeypatch.setattr(tw, "_transition_form", lambda K, V: False)
    B, T, H, N = 2, 45, 2, 32
    gen = torch.Generator().manual_seed(6)
    r, _, k, v, a, b = rwkv_inputs(B, T, H, N, dtype, seed=7)
    z = (torch.randn(B, T, H, N, generator=gen) * 2).to(DEVICE, dtype)
    z[1, -5:] = float("-inf")  # right padding of row 1 (as the model pads: no write either)
    for x in (k, v, a, b):
        x[1, -5:] = 0
    bias = torch.randn(H * N, generator=gen).to(DEVICE)
    h0 = torch.randn(B, H, N, N, generator=gen).to(DEVICE)
    xs = [r, z, k, v, a, b]
    ins = [x.clone().requires_grad_() for x in xs] + [bias.clone().requires_grad_(), h0.clone().requires_grad_()]
    chunk = 32 if form == "transition" else 16  # the split gradient kernels, then the fused one
    o, ht = wkv7_triton(*ins[:6], initial_state=ins[7], output_final_state=True, chunk_size=chunk, w_logit_bias=ins[6])
    ref_ins = [x.detach().float().clone().requires_grad_() for x in ins]
    log_w = log_decay_from_logits(ref_ins[1], ref_ins[6])
    o_ref, ht_ref = wkv7_reference(ref_ins[0], log_w, *ref_ins[2:6], initial_state=ref_ins[7], output_final_state=True)
    do = torch.randn(o.shape, generator=gen).to(DEVICE)
    dht = torch.randn(ht.shape, generator=gen).to(DEVICE)
    torch.autograd.backward([o.float(), ht], [do, dht])
    torch.autograd.backward([o_ref, ht_ref], [do, dht])
    errs = {"o": rel(o, o_ref), "ht": rel(ht, ht_ref)}
    for name, x, y in zip(["dr", "dz", "dk", "dv", "da", "db", "dbias", "dh0"], ins, ref_ins):
        assert x.grad.dtype == x.dtype and torch.isfinite(x.grad).all(), name
        errs[name] = rel(x.grad, torch.nan_to_num(y.grad))
    assert all(e < TOL[dtype] for e in errs.values()), errs
    assert (ins[1].grad[1, -5:] == 0).all()
    # The state after the padded tail is the state after the last real token.
    _, ht_short = wkv7_reference(*(t.detach().float()[1:, :-5] for t in (r, log_w, k, v, a, b)),
                                 initial_state=h0[1:], output_final_state=True)
    assert rel(ht[1:], ht_short) < TOL[dtype]


class _Recorder:
    """Stands in for a Triton kernel (``kernel[grid](...)``): records the launch, then runs it."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_fp32_decay_with_bf16_activations():
    """A log decay kept in fp32 next to bf16 activations is used as is, and its gradient is fp32."""
    xs = rwkv_inputs(1, 40, 2, 16, torch.bfloat16, seed=9)
    xs[1] = xs[1].float()
    ours = run_with_grads(wkv7_triton, xs, None, chunk_size=16)
    ref = run_with_grads(lambda *x, **kw: wkv7_reference(*(t.float() for t in x[:6]), **kw), xs, None)
    assert ours[3].dtype == torch.float32 and ours[0].dtype == torch.bfloat16
    assert_close_all(ours, ref, torch.bfloat16)


def test_steep_decay_shortens_chunk_or_raises():
    xs = rwkv_inputs(1, 40, 1, 16, torch.float32, seed=6)
    xs[1] = xs[1] * 4  # w down to -2.4: a chunk of 32 would span e^77, so 16 is used
    o, ht = wkv7_triton(*xs, output_final_state=True, chunk_size=32)
    o_ref, ht_ref = wkv7_reference(*xs, output_final_state=True)
    assert rel(o, o_ref) < 1e-4 and rel(ht, ht_ref) < 1e-4
    xs[1] = xs[1] * 3  # w down to -7: no chunk is safe
    with pytest.raises(ValueError, match="too steep"):
        wkv7_triton(*xs)


def test_lower_bound_picks_the_chunk_without_reading_w(monkeypatch):
    """With ``lower_bound`` (the model passes RWKV-7's floor) the chunk size comes from the bound: no
    ``w.min()``, which on a GPU is a device sync per layer; the results are those without it."""
    xs = rwkv_inputs(1, 40, 2, 16, torch.float32, seed=6)
    plain = wkv7(*xs, output_final_state=True, backend="triton")
    monkeypatch.setattr(torch.Tensor, "min", lambda *a, **k: pytest.fail("w.min() was read"))
    bounded = wkv7(*xs, output_final_state=True, backend="triton", lower_bound=-0.6065306597126334)
    assert torch.equal(plain[0], bounded[0]) and torch.equal(plain[1], bounded[1])
    with pytest.raises(ValueError, match="too steep"):
        wkv7_triton(*xs, lower_bound=-7.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_matches_reference(dtype):
    B, T, H, N = 2, 5, 3, 32
    xs = rwkv_inputs(B, T, H, N, dtype, seed=7)
    h0 = torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    o_ref, ht_ref = wkv7_reference(*(x.float() for x in xs), initial_state=h0, output_final_state=True)
    state = h0.clone()
    outs = [wkv7_decode_triton(*(x[:, t : t + 1] for x in xs[:]), state) for t in range(3)]  # T = 1 steps
    outs.append(wkv7_decode_triton(*(x[:, 3:] for x in xs), state))  # then 2 tokens at once
    o = torch.cat(outs, dim=1)
    assert o.dtype == dtype
    assert rel(o, o_ref) < TOL[dtype] and rel(state, ht_ref) < 1e-4  # the state stays fp32


# ----------------------------------------------------------------------------------------------
# Safety net: a kernel that does not fit the GPU (OutOfResources at launch) -> the PyTorch path
# ----------------------------------------------------------------------------------------------


class _DoesNotFit:
    """Stands in for a kernel: every launch raises OutOfResources, as the H100 did for head size 256."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches += 1
            raise triton.runtime.OutOfResources(376832, 232448, "shared memory")

        return launch


@pytest.mark.parametrize(
    "kernel,varlen",
    [
        pytest.param("_chain_fwd_kernel", False, id="forward"),  # caught by the dispatcher
        pytest.param("_chain_bwd_kernel", True, id="backward-varlen-bcast"),  # caught inside the autograd function
        pytest.param("_decode_kernel", False, id="decode"),
    ],
)
def test_out_of_resources_falls_back_to_torch(kernel, varlen, monkeypatch):
    """Correct results through the PyTorch path, one warning naming the shape and RWKV7_WKV_BACKEND,
    and later calls with the same head size go to PyTorch without trying the kernel again."""
    import warnings

    from rwkv7_kernels import triton_wkv7

    monkeypatch.setattr(triton_wkv7, "OUT_OF_RESOURCES", set())
    broken = _DoesNotFit()
    monkeypatch.setattr(triton_wkv7, kernel, broken)
    T = 3 if kernel == "_decode_kernel" else 37
    xs = rwkv_inputs(1 if varlen else 2, T, 2, 16, torch.float32, seed=11)
    cu = torch.tensor([0, 20, 37], dtype=torch.int32, device=DEVICE) if varlen else None
    h0 = torch.randn(1 if varlen else 2, 2, 16, 16, generator=torch.Generator().manual_seed(12)).to(DEVICE)

    def ours():
        if kernel == "_decode_kernel":  # no gradient: the dispatcher's decode path
            return wkv7(*xs, initial_state=h0, output_final_state=True, backend="triton")
        return run_with_grads(lambda *x, **kw: wkv7(*x, backend="triton", **kw), xs, h0, cu_seqlens=cu)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ours()
        second = ours()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "(B, T, H, K, V) = (" in messages[0] and "RWKV7_WKV_BACKEND" in messages[0], messages[0]
    assert broken.launches == 1  # the second call did not try the kernel
    if kernel == "_decode_kernel":
        ref = wkv7_reference(*xs, initial_state=h0, output_final_state=True)
        assert all(rel(x, y) < 1e-4 for x, y in zip(first, ref))
    else:
        ref = run_with_grads(lambda *x, **kw: wkv7_reference(*x[:6], **kw), xs, h0, cu_seqlens=cu)
        assert_close_all(first, ref, torch.float32)
        assert_close_all(second, ref, torch.float32)


def test_out_of_resources_propagates_from_wkv7_triton(monkeypatch):
    """Called directly (tests, benchmarks), the kernels do not fall back: the error reaches the caller."""
    from rwkv7_kernels import triton_wkv7

    monkeypatch.setattr(triton_wkv7, "_bwd_grad_kernel", _DoesNotFit())
    xs = [x.requires_grad_() for x in rwkv_inputs(1, 16, 1, 16, torch.float32)]
    o, _ = wkv7_triton(*xs, chunk_size=16)
    with pytest.raises(triton.runtime.OutOfResources):
        o.sum().backward()


# ----------------------------------------------------------------------------------------------
# Shared memory on an H100, checked without a GPU
# ----------------------------------------------------------------------------------------------


def test_block_choice_by_head_size(monkeypatch):
    """The launch code's per-head-size choices that keep every kernel inside sm_90's shared memory."""
    from rwkv7_kernels.triton_wkv7 import _grad_block_v, _grad_variant, _max_chunk, _split_grad_tiles

    monkeypatch.delenv("RWKV7_WKV_GRAD_VARIANT", raising=False)
    for name in ("RWKV7_WKV_GRAD_BV", "RWKV7_WKV_GRAD_BK", "RWKV7_WKV_GRAD_KBV"):
        monkeypatch.delenv(name, raising=False)
    assert [_max_chunk(n, n, torch.bfloat16) for n in (64, 128, 256)] == [64, 64, 32]
    assert [_max_chunk(n, n, torch.float32) for n in (64, 128, 256)] == [32, 32, 32]
    assert [_grad_variant(bt, 64, 64) for bt in (16, 32, 64)] == ["fused", "split", "split"]  # timed, not forced
    assert [_grad_variant(bt, 128, 128) for bt in (16, 32, 64)] == ["fused", "fused", "split"]
    assert [_grad_variant(bt, 256, 256) for bt in (16, 32)] == ["fused", "split"]
    blocks = [_grad_block_v(variant, n, n) for variant, n in (("fused", 64), ("fused", 128), ("split", 256))]
    assert blocks == [64, 32, 64]
    assert _split_grad_tiles(32, 64, 64) == (32, 64) and _split_grad_tiles(32, 256, 256) == (32, 64)
    monkeypatch.setenv("RWKV7_WKV_GRAD_VARIANT", "fused")  # an explicit choice wins (it may not fit)
    assert _grad_variant(32, 256, 256) == "fused"


def test_kernels_fit_h100_shared_memory():
    """Every kernel launched for head sizes 64, 128 and 256 (bf16, chunks 32 and 64, default gradient
    variant), compiled for sm_90a by benchmarks/kernel_smem.py without a GPU, needs <= 200 KB of shared
    memory (H100: 227 KB; margin for the GPU's older Triton). Before the per-head-size choices,
    _bwd_grad_kernel needed 303 KB here (head 256, BT 32; 368 KB in fp32, the H100 failure). bf16 only
    to stay under ~25 s on 2 CPU cores (fp32 at head 256 compiles slowly, heavy spills); run the script
    for the full table (64/128/256, fp32 and bf16, chunks 16/32/64, both gradient variants: ~3 min)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_smem.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--heads", "64,128,256", "--dtypes", "bf16", "--chunks", "32,64", "--variants", "default"]
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grad_precision_study_still_matches_the_kernel():
    """benchmarks/grad_precision_study.py rewrites _bwd_grad_kernel's products group by group: it must find every
    statement it names (the study behind the default "mixed" gradient precision stays reproducible)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grad_precision_study.py"
    spec = importlib.util.spec_from_file_location("grad_precision_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    assert study.grouped_kernel().arg_names[-8:] == [f"P{i}" for i in range(8)]
