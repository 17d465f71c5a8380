"""The chunk-parallel PyTorch WKV-7 (the CPU path) against the sequential reference: output, final
state and every gradient, the initial state's included."""

import pytest
import torch

from rwkv7_kernels import wkv7
from rwkv7_kernels.chunked_torch import wkv7_chunked_torch
from rwkv7_kernels.reference import wkv7_reference

from wkv_cases import assert_close_all, rel, run_with_grads, rwkv_inputs


def reference(*x, **kw):
    return wkv7_reference(*(t.float() for t in x[:6]), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "B,T,H,N,h0_kind",
    [(2, 100, 2, 16, "full"), (1, 150, 1, 64, None), (3, 70, 2, 32, "bcast")],
    ids=["T100-h0", "N64-T150-noh0", "T70-bcast"],
)
def test_matches_reference(B, T, H, N, h0_kind, dtype):
    xs = rwkv_inputs(B, T, H, N, dtype)
    h0 = None if h0_kind is None else torch.randn(B if h0_kind == "full" else 1, H, N, N)
    ours = run_with_grads(wkv7_chunked_torch, xs, h0)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    assert_close_all(ours, run_with_grads(reference, xs, h0), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_matches_reference(dtype):
    xs = rwkv_inputs(1, 160, 2, 16, dtype, seed=3)
    cu = torch.tensor([0, 70, 71, 135, 160])
    h0 = torch.randn(4, 2, 16, 16)
    ours = run_with_grads(wkv7_chunked_torch, xs, h0, cu_seqlens=cu)
    assert_close_all(ours, run_with_grads(reference, xs, h0, cu_seqlens=cu), dtype)


def test_steep_decay_uses_shorter_chunks():
    xs = rwkv_inputs(1, 90, 1, 16, torch.float32, seed=4)
    xs[1] = xs[1] * 8  # w down to -4.9: a chunk of 64 would overflow fp32
    o, ht = wkv7_chunked_torch(*xs, output_final_state=True)
    o_ref, ht_ref = wkv7_reference(*xs, output_final_state=True)
    assert torch.isfinite(o).all() and rel(o, o_ref) < 1e-4 and rel(ht, ht_ref) < 1e-4


def test_default_cpu_dispatch_is_torch():
    xs = rwkv_inputs(1, 20, 1, 16, torch.float32, seed=5)
    o, _ = wkv7(*xs)
    assert rel(o, wkv7_reference(*xs)[0]) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_decay_logits_through_the_dispatcher(backend):
    """``wkv7(..., w_logit_bias=...)`` on the PyTorch paths forms the log decay first: same results as passing
    it, gradients reach the logits and the bias; a bias of the wrong size is a clear error."""
    from rwkv7_kernels import log_decay_from_logits

    r, _, k, v, a, b = rwkv_inputs(2, 40, 2, 16, torch.float32, seed=5)
    z = torch.randn(2, 40, 2, 16, requires_grad=True)
    bias = torch.randn(1, 1, 32, requires_grad=True)  # the model's w0 shape
    o, ht = wkv7(r, z, k, v, a, b, output_final_state=True, backend=backend, w_logit_bias=bias)
    o_ref, ht_ref = wkv7(r, log_decay_from_logits(z, bias), k, v, a, b, output_final_state=True, backend=backend)
    assert rel(o, o_ref) < 1e-6 and rel(ht, ht_ref) < 1e-6
    o.sum().backward()
    assert z.grad is not None and bias.grad is not None and bias.grad.shape == bias.shape
    with pytest.raises(ValueError, match="w_logit_bias"):
        wkv7(r, z, k, v, a, b, backend=backend, w_logit_bias=torch.zeros(31))
