"""Fuzz test of the WKV-7 kernels against the sequential reference, for a bounded time.

A seeded generator draws cases over shapes (B, T including 1 and non-multiples of 64, H, N in
{16, 32, 64}), dtypes (fp32, bf16), decay regimes (RWKV-7's range, its floor, no decay), padding
(runs of tokens with w = 0 and k = v = a = b = 0, which must leave the state as it was), varlen
layouts (``cu_seqlens``, empty sequences included) and initial states; each case compares the output
and final state of ``wkv7(..., backend=...)`` with :func:`wkv7_reference` (and, for some cases, the
gradients of every input and of the initial state).

Backends: ``torch`` (the CPU path) always; ``triton`` through Triton's interpreter when the kernel
module imports (``TRITON_INTERPRET=1`` is set by conftest.py), with fewer cases since the
interpreter is slow. Each backend stops drawing cases when its time budget is spent.

Knobs (environment): ``RWKV7_FUZZ_SEED`` (default 0), ``RWKV7_FUZZ_SECONDS`` (total budget, default
50), ``RWKV7_FUZZ_CASES`` (the most cases per backend, default 400). A failure prints the case, so it
can be replayed with ``replay(case)``.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

from rwkv7_kernels import available_backends, wkv7  # noqa: E402
from rwkv7_kernels.reference import wkv7_reference  # noqa: E402

SEED = int(os.environ.get("RWKV7_FUZZ_SEED", "0"))
BUDGET_S = float(os.environ.get("RWKV7_FUZZ_SECONDS", "40"))
MAX_CASES = int(os.environ.get("RWKV7_FUZZ_CASES", "400"))
DECAY_FLOOR = -0.6065306597126334
TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}  # relative norm error
SHARE = {"torch": 0.6, "triton": 0.4}  # of the budget


@dataclass
class Case:
    seed: int
    B: int
    T: int
    H: int
    N: int
    dtype: torch.dtype
    decay: str  # "rwkv", "floor", "none"
    padding: bool
    varlen: list[int] | None  # sequence lengths (B == 1 then)
    initial_state: bool
    grads: bool


def draw(rng: random.Random, backend: str) -> Case:
    tiny = backend == "triton"  # the interpreter runs every program instance in Python
    T = rng.choice([1, 2, 5, 17, 31, 63, 64, 65, 100, 129] if not tiny else [1, 3, 17, 33, 65])
    N = rng.choice([16, 32, 64] if not tiny else [16, 16, 32, 64])
    varlen = None
    B = rng.choice([1, 2, 3] if not tiny else [1, 2])
    if rng.random() < 0.3:
        B = 1
        parts = [rng.choice([0, 1, 3, 17, 40, 64, 70]) for _ in range(rng.randint(1, 4))]
        varlen = parts if sum(parts) else parts + [5]
        T = sum(varlen)
    return Case(
        seed=rng.randrange(2**31),
        B=B,
        T=T,
        H=rng.choice([1, 2, 3] if not tiny else [1, 2]),
        N=N,
        dtype=rng.choice([torch.float32, torch.bfloat16]),
        decay=rng.choice(["rwkv", "rwkv", "floor", "none"]),
        padding=rng.random() < 0.4,
        varlen=varlen,
        initial_state=rng.random() < 0.6,
        grads=rng.random() < (0.3 if not tiny else 0.15) and T <= 130,
    )


def inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    B, T, H, N = case.B, case.T, case.H, case.N
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if case.decay == "floor":
        w = torch.full((B, T, H, N), DECAY_FLOOR) * (1 - 1e-3 * torch.rand(B, T, H, N, generator=g))
    elif case.decay == "none":
        w = torch.zeros(B, T, H, N)
    else:
        w = DECAY_FLOOR * torch.sigmoid(2 * rnd(B, T, H, N))
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(rnd(B, T, H, N))
    r, k, v, a, b = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N), -kk, kk * iclr
    if case.padding:  # runs of padding, as the model's attention_mask makes them
        keep = torch.ones(B, T, dtype=torch.bool)
        for row in range(B):
            start = int(torch.randint(0, T, (1,), generator=g))
            length = int(torch.randint(1, max(2, T // 2), (1,), generator=g))
            keep[row, start : start + length] = False
        m = keep[:, :, None, None]
        w, k, v, a, b = (x.masked_fill(~m, 0.0) for x in (w, k, v, a, b))
    n_states = len(case.varlen) if case.varlen else B
    h0 = rnd(n_states, H, N, N) if case.initial_state else None
    cu = torch.tensor([0, *torch.tensor(case.varlen).cumsum(0).tolist()]) if case.varlen else None
    xs = [x.to(case.dtype) for x in (r, w, k, v, a, b)]
    return xs, h0, cu


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().double(), y.detach().double()
    # Floor on the denominator: a reference that is exactly zero (e.g. dw when the state is still 0)
    # is matched to ~1e-6 in absolute terms, not relatively.
    return float((x - y).norm() / y.norm().clamp(min=1e-2))


def replay(case: Case, backend: str) -> None:
    xs, h0, cu = inputs(case)
    tol = TOL[case.dtype]
    if case.grads:
        xs = [x.detach().requires_grad_(True) for x in xs]
        h0 = h0.requires_grad_(True) if h0 is not None else None
    o, hT = wkv7(*xs, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend)
    leaves = [*xs, *([h0] if h0 is not None else [])]
    ref_leaves = [x.detach().clone().requires_grad_(case.grads) for x in leaves]
    ref_xs, ref_h0 = ref_leaves[:6], (ref_leaves[6] if h0 is not None else None)
    o_ref, hT_ref = wkv7_reference(*ref_xs, initial_state=ref_h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == o_ref.shape and o.dtype == case.dtype, (o.shape, o_ref.shape, o.dtype)
    assert hT.dtype == torch.float32 and hT.shape == hT_ref.shape
    assert torch.isfinite(o.float()).all() and torch.isfinite(hT).all()
    assert rel(o, o_ref) <= tol, ("o", rel(o, o_ref))
    assert rel(hT, hT_ref) <= tol, ("final_state", rel(hT, hT_ref))
    if case.grads:
        g = torch.Generator().manual_seed(case.seed + 1)
        do = torch.randn(o.shape, generator=g).to(o.dtype)
        dhT = torch.randn(hT.shape, generator=g)
        torch.autograd.backward([o, hT], [do, dhT])
        torch.autograd.backward([o_ref, hT_ref], [do.to(o_ref.dtype), dhT])
        for name, x, y in zip(["dr", "dw", "dk", "dv", "da", "db", "dh0"], leaves, ref_leaves):
            assert x.grad is not None and torch.isfinite(x.grad.float()).all(), name
            assert rel(x.grad, y.grad) <= 5 * tol, (name, rel(x.grad, y.grad))


BACKENDS = ["torch"] + (["triton"] if "triton" in available_backends() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_match_the_reference_on_random_cases(backend):
    rng = random.Random(f"{SEED}-{backend}")
    deadline = time.monotonic() + BUDGET_S * SHARE[backend]
    done, failures = 0, []
    while done < MAX_CASES and time.monotonic() < deadline:
        case = draw(rng, backend)
        try:
            replay(case, backend)
        except Exception as err:  # noqa: BLE001 - collect, then report the cases that failed
            failures.append(f"{case}: {type(err).__name__}: {err}")
        done += 1
    print(f"{backend}: {done} random cases, {len(failures)} failed")
    assert done >= 5, f"only {done} cases ran within the budget"
    assert not failures, "\n".join(failures[:5])


def test_padding_runs_leave_the_state_untouched():
    """A row that is padding from some point on ends in the state it had before the padding."""
    case = Case(seed=7, B=2, T=40, H=2, N=32, dtype=torch.float32, decay="rwkv", padding=False, varlen=None,
                initial_state=True, grads=False)  # fmt: skip
    (r, w, k, v, a, b), h0, _ = inputs(case)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[:, 23:] = False
    m = keep[:, :, None, None]
    w, k, v, a, b = (x.masked_fill(~m, 0.0) for x in (w, k, v, a, b))
    for backend in BACKENDS:
        _, h_all = wkv7(r, w, k, v, a, b, initial_state=h0, output_final_state=True, backend=backend)
        _, h_23 = wkv7(*(x[:, :23] for x in (r, w, k, v, a, b)), initial_state=h0, output_final_state=True, backend=backend)
        torch.testing.assert_close(h_all, h_23, rtol=1e-5, atol=1e-5)
