"""GPU-only checks (skipped without CUDA; run them on the device machine with ``TRITON_INTERPRET=0 python -m pytest
tests/test_gpu.py``): the model on the Triton kernels against the CPU path, CUDA-graph decoding against eager
decoding, and compiled blocks against eager blocks."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    # tests/conftest.py turns Triton's interpreter on unless the variable is set: CUDA tensors then fail inside it
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="set TRITON_INTERPRET=0 to run the GPU tests"),
]


@pytest.fixture(scope="module")
def model():
    from checkpoints import random_hf_model

    return random_hf_model(vocab=1000, hidden=256, layers=4, seed=3).eval()


def test_triton_model_matches_cpu_model(model):
    ids = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.cuda()(ids.cuda()).logits.cpu()
    model.cpu()
    assert (gpu - cpu).abs().max() / cpu.abs().max() < 2e-3


def test_graph_decoding_equals_eager_decoding(model):
    model.cuda()
    ids = torch.randint(1, 1000, (3, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        graphed = model.generate(ids, max_new_tokens=20, do_sample=False)
        beams_graphed = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
        os.environ["RWKV7_CUDA_GRAPHS"] = "0"
        try:
            eager = model.generate(ids, max_new_tokens=20, do_sample=False)
            beams_eager = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
        finally:
            os.environ.pop("RWKV7_CUDA_GRAPHS")
    model.cpu()
    assert torch.equal(graphed, eager)
    assert torch.equal(beams_graphed, beams_eager)


def test_state_tuning_gradients_on_gpu_match_cpu(model):
    import peft_state_tuning  # noqa: F401
    from peft import get_peft_model

    from peft_state_tuning import StateTuningConfig

    ids = torch.randint(0, 1000, (2, 200), generator=torch.Generator().manual_seed(2))
    grads = {}
    for device in ("cpu", "cuda"):
        peft_model = get_peft_model(copy.deepcopy(model).to(device), StateTuningConfig())
        with torch.no_grad():
            for p in peft_model.base_model.adapter_states["default"].wkv.values():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        peft_model.train()
        peft_model(ids.to(device), labels=ids.to(device)).loss.backward()
        grads[device] = [p.grad.cpu() for p in peft_model.parameters() if p.requires_grad]
    for a, b in zip(grads["cpu"], grads["cuda"]):
        assert (a - b).norm() / a.norm() < 5e-3


def test_compiled_blocks_match_eager_on_gpu(model):
    """Inductor-compiled blocks (the CUDA default, compiled_blocks.py) against eager blocks: bf16 model,
    state tuning, loss and state gradients."""
    import peft_state_tuning  # noqa: F401
    from peft import get_peft_model

    from peft_state_tuning import StateTuningConfig

    ids = torch.randint(0, 1000, (2, 256), generator=torch.Generator().manual_seed(4)).cuda()
    results = {}
    for compile_blocks in (False, True):
        base = copy.deepcopy(model).to("cuda", torch.bfloat16)
        base.model.compile_blocks = compile_blocks
        peft_model = get_peft_model(base, StateTuningConfig())
        with torch.no_grad():
            for p in peft_model.base_model.adapter_states["default"].wkv.values():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        peft_model.train()
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        results[compile_blocks] = (loss.item(), [p.grad.float().cpu() for p in peft_model.parameters() if p.requires_grad])
    (l0, g0), (l1, g1) = results[False], results[True]
    assert abs(l0 - l1) / abs(l0) < 1e-2
    for a, b in zip(g0, g1):
        assert (a - b).norm() / a.norm() < 3e-2


def test_two_compiled_models_in_one_process(model):
    """Compiled state-tuning steps on a model, then on a second one with gradient checkpointing, in one
    process (as in a notebook or the study script): the first is freed, the second reuses the graphs."""
    import gc
    import weakref

    import peft_state_tuning  # noqa: F401
    from peft import get_peft_model

    from peft_state_tuning import StateTuningConfig

    ids = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(6)).cuda()
    losses = []
    for checkpointing in (False, True):
        peft_model = get_peft_model(copy.deepcopy(model).to("cuda", torch.bfloat16), StateTuningConfig())
        if checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.train()
        for _ in range(2):
            loss = peft_model(ids, labels=ids).loss
            loss.backward()
        losses.append(loss.item())
        ref = weakref.ref(peft_model)
        del peft_model, loss
        gc.collect()
        assert ref() is None
    assert abs(losses[0] - losses[1]) / abs(losses[0]) < 1e-2


def test_bad_id_in_a_cuda_training_step_raises_the_clear_error(model):
    """Without a cache the id check is read after the blocks, from a pinned copy made up front (no stall):
    a bad id still raises the clear ValueError, and no device-side assert poisons the CUDA context."""
    model.cuda().train()
    ids = torch.randint(0, 1000, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    bad = ids.clone()
    bad[1, 7] = 1000
    with pytest.raises(ValueError, match="outside"):
        model(bad, labels=bad)
    assert torch.isfinite(model(ids, labels=ids).loss)  # the context is still usable
    model.eval().cpu()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_cross_entropy_on_gpu_matches_torch(dtype):
    """The fused LM-loss kernel at the real vocabulary (65536) and a chunk of 1000 rows, against F.cross_entropy
    on the same logits: loss and the gradient it writes over them."""
    from rwkv7_kernels import cross_entropy_sum_

    g = torch.Generator("cuda").manual_seed(0)
    logits = (torch.randn(1000, 65536, device="cuda", generator=g) * 4).to(dtype)
    labels = torch.randint(0, 65536, (1000,), device="cuda", generator=g)
    labels[::7] = -100
    ref_logits = logits.float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits, labels, reduction="sum")
    ref.backward()
    total = cross_entropy_sum_(logits, labels, write_grad=True)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert abs(total.item() - ref.item()) / ref.item() < 1e-5
    err = (logits.float() - ref_logits.grad).norm() / ref_logits.grad.norm()
    assert err < tol, err


@pytest.mark.parametrize("lookahead", ["0", "1"])
def test_chained_kernels_are_deterministic(lookahead, monkeypatch):
    """Each chained program takes its chunk's start state (or end-state gradient) from the program of the chunk
    before, through memory, with an acquire/release flag: a missed ordering would read a stale state. The
    computation is deterministic, so 10 repeats of forward + backward must agree bitwise (2000 tokens, 16 heads),
    with and without the lookahead (two flags per chunk, states two hops back)."""
    from rwkv7_kernels.triton_wkv7 import wkv7_triton

    monkeypatch.setenv("RWKV7_WKV_CHAIN_LOOKAHEAD", lookahead)
    g = torch.Generator("cuda").manual_seed(0)
    B, T, H, K = 2, 2000, 8, 64
    r, k, v, d, do = (torch.randn(B, T, H, K, device="cuda", generator=g).to(torch.bfloat16) for _ in range(5))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, K, device="cuda", generator=g), dim=-1)
    a, b = (-kk).to(torch.bfloat16), (kk * torch.rand(B, T, H, K, device="cuda", generator=g)).to(torch.bfloat16)
    bias = torch.randn(H * K, device="cuda", generator=g)
    h0 = (torch.randn(B, H, K, K, device="cuda", generator=g) * 0.1).requires_grad_()
    xs = [x.requires_grad_() for x in (r, d, k, v, a, b)]
    first = None
    for _ in range(10):
        for x in [*xs, h0]:
            x.grad = None
        o, ht = wkv7_triton(*xs, initial_state=h0, output_final_state=True, w_logit_bias=bias)
        (o.float() * do.float()).sum().add(ht.sum() * 0.01).backward()
        out = [o, ht, h0.grad, *(x.grad for x in xs)]
        assert all(torch.isfinite(t).all() for t in out)
        if first is None:
            first = [t.clone() for t in out]
        assert all(torch.equal(t, f) for t, f in zip(out, first))
