"""Shared helpers of the kernel tests: RWKV-7-like inputs, relative errors, runs with every gradient."""

from __future__ import annotations

import torch

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
NAMES = ["o", "final_state", "dr", "dw", "dk", "dv", "da", "db", "dh0"]


def rwkv_inputs(B, T, H, N, dtype, seed=0, device="cpu"):
    """Inputs shaped like a real RWKV-7 layer's: log decay in [-0.6065, 0), a = -kk, b = kk * iclr."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = -0.6065306597 * torch.sigmoid(rnd(B, T, H, N) * 2)
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(rnd(B, T, H, N))
    xs = (rnd(B, T, H, N), w, rnd(B, T, H, N), rnd(B, T, H, N), -kk, kk * iclr)
    return [x.to(device=device, dtype=dtype) for x in xs]


def rel(x, y) -> float:
    """Relative norm error of ``x`` against ``y``, in float64."""
    x, y = x.detach().double(), y.detach().double()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def run_with_grads(fn, xs, h0, seed=1, **kw):
    """o, final state and the gradients of a loss that reads both o and the final state."""
    ins = [x.clone().requires_grad_() for x in xs]
    hh = None if h0 is None else h0.clone().requires_grad_()
    o, ht = fn(*ins, initial_state=hh, output_final_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g).to(o.device)
    dht = torch.randn(ht.shape, generator=g).to(ht.device)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    grads = [x.grad for x in ins] + ([] if h0 is None else [hh.grad])
    return [o, ht] + grads


def assert_close_all(ours, ref, dtype):
    errs = {n: rel(x, y) for n, x, y in zip(NAMES, ours, ref)}
    assert all(e < TOL[dtype] for e in errs.values()), errs
