"""Triton WKV-7 kernels against the sequential reference, on CPU through Triton's interpreter.

Every case compares the output, the final state and every gradient (r, w, k, v, a, b and the initial
state), with a gradient flowing into the final state too, by relative norm error.
"""

import os

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


# Gradient-kernel variants (RWKV7_WKV_GRAD_VARIANT, read at each backward): the default single
# kernel, and the split pair with blocks of 16 (at N = 32: two dv programs per chunk, two steps of
# the K-side kernel's V loop, two K-block programs).
GRAD_VARIANTS = [
    pytest.param({}, id="grad-fused"),
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


def test_unknown_grad_variant_raises(monkeypatch):
    monkeypatch.setenv("RWKV7_WKV_GRAD_VARIANT", "nope")
    xs = [x.requires_grad_() for x in rwkv_inputs(1, 16, 1, 16, torch.float32)]
    o, _ = wkv7_triton(*xs, chunk_size=16)
    with pytest.raises(ValueError, match="RWKV7_WKV_GRAD_VARIANT"):
        o.sum().backward()


def test_forward_only_and_dispatch():
    """No grad, no final state, through the public entry point."""
    xs = rwkv_inputs(2, 33, 2, 16, torch.float32, seed=5)
    o, ht = wkv7(*xs, backend="triton")
    o_ref, _ = wkv7_reference(*xs)
    assert ht is None and rel(o, o_ref) < 1e-4


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
