"""The chunk-parallel PyTorch WKV-7 (the CPU path) against the sequential reference: output, final
state and every gradient, the initial state's included."""

import pytest
import torch

from rwkv7_kernels import wkv7
from rwkv7_kernels.chunked_torch import wkv7_chunked_torch
from rwkv7_kernels.reference import wkv7_reference

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
NAMES = ["o", "final_state", "dr", "dw", "dk", "dv", "da", "db", "dh0"]


def rwkv_inputs(B, T, H, N, dtype, seed=0):
    """Inputs shaped like a real RWKV-7 layer's: log decay in [-0.6065, 0), a = -kk, b = kk * iclr."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = -0.6065306597 * torch.sigmoid(rnd(B, T, H, N) * 2)
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(rnd(B, T, H, N))
    return [x.to(dtype) for x in (rnd(B, T, H, N), w, rnd(B, T, H, N), rnd(B, T, H, N), -kk, kk * iclr)]


def rel(x, y):
    x, y = x.detach().double(), y.detach().double()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def run_with_grads(fn, xs, h0, **kw):
    ins = [x.clone().requires_grad_() for x in xs]
    hh = None if h0 is None else h0.clone().requires_grad_()
    o, ht = fn(*ins, initial_state=hh, output_final_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    ((o.float() * torch.randn(o.shape, generator=g)).sum() + (ht * torch.randn(ht.shape, generator=g)).sum()).backward()
    return [o, ht] + [x.grad for x in ins] + ([] if h0 is None else [hh.grad])


def reference(*x, **kw):
    return wkv7_reference(*(t.float() for t in x[:6]), **kw)


def assert_close_all(ours, ref, dtype):
    errs = {n: rel(x, y) for n, x, y in zip(NAMES, ours, ref)}
    assert all(e < TOL[dtype] for e in errs.values()), errs


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
