"""Compiled blocks (modeling_rwkv7/compiled_blocks.py) give the eager model's loss, state gradients and tokens.

On CPU the test compiles with the ``aot_eager`` backend (dynamo capture + AOT autograd, no C++ compiler
needed): it checks that the blocks trace, that the WKV call stays outside the graphs, and that padding,
initial states, checkpointing and the cache behave as in eager mode. tests/test_gpu.py runs Inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peft_state_tuning  # noqa: F401
from peft import get_peft_model
from peft_state_tuning import StateTuningConfig

from checkpoints import random_hf_model


@pytest.fixture(scope="module")
def model():
    return random_hf_model(vocab=300, hidden=128, layers=3, seed=4)


def _state_grads(model, ids, mask, compile_blocks: bool, checkpointing: bool):
    peft_model = get_peft_model(copy.deepcopy(model), StateTuningConfig())
    peft_model.base_model.model.model.compile_blocks = compile_blocks
    with torch.no_grad():
        for p in peft_model.base_model.adapter_states["default"].wkv.values():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    if checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    out = peft_model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_match_eager(model, monkeypatch, checkpointing):
    monkeypatch.setenv("RWKV7_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 300, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding in one row: the masked graph variant
    for m in (None, mask):
        ref_loss, ref_grads = _state_grads(model, ids, m, False, checkpointing)
        loss, grads = _state_grads(model, ids, m, True, checkpointing)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compile_blocks", [False, True], ids=["eager", "compiled"])
def test_ffn_recompute_gives_the_same_gradients(model, monkeypatch, compile_blocks):
    """RWKV7_RECOMPUTE_FFN (on by default for eager CUDA training) changes what is kept for the backward, not the
    numbers: loss and state gradients equal those of the step that keeps the FFN activation."""
    monkeypatch.setenv("RWKV7_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    ids = torch.randint(1, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    results = []
    for recompute in ("0", "1"):
        monkeypatch.setenv("RWKV7_RECOMPUTE_FFN", recompute)
        results.append(_state_grads(model, ids, None, compile_blocks, checkpointing=False))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_ffn_recompute_setting():
    backbone = random_hf_model(vocab=300, hidden=128, layers=1, seed=4).model
    x = torch.zeros(1, 2, 128)
    backbone.train()
    assert not backbone._wants_ffn_recompute(x, compiled=False)  # automatic: eager blocks on CUDA only
    backbone.recompute_ffn = True
    assert backbone._wants_ffn_recompute(x, compiled=True)
    with torch.no_grad():
        assert not backbone._wants_ffn_recompute(x, compiled=False)  # nothing to keep without gradients
    backbone.eval()
    assert not backbone._wants_ffn_recompute(x, compiled=False)


def test_activation_budget_setting(monkeypatch):
    from modeling_rwkv7.compiled_blocks import DEFAULT_ACTIVATION_BUDGET, activation_memory_budget

    monkeypatch.delenv("RWKV7_ACTIVATION_BUDGET", raising=False)
    assert activation_memory_budget() == DEFAULT_ACTIVATION_BUDGET
    monkeypatch.setenv("RWKV7_ACTIVATION_BUDGET", "1")
    assert activation_memory_budget() == 1.0
    for bad in ("0", "1.5", "lots"):
        monkeypatch.setenv("RWKV7_ACTIVATION_BUDGET", bad)
        with pytest.raises(ValueError, match="RWKV7_ACTIVATION_BUDGET"):
            activation_memory_budget()


def test_compiled_prefill_then_cache_matches_eager(model, monkeypatch):
    """Prefill compiled (output_final_state graph), then one-token steps eager from its cache."""
    monkeypatch.setenv("RWKV7_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    m = copy.deepcopy(model).eval()
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.model.compile_blocks = False
        eager = m.generate(ids, max_new_tokens=6, do_sample=False)
        m.model.compile_blocks = True
        comp = m.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(eager, comp)


def test_environment_switch(model, monkeypatch):
    from modeling_rwkv7.compiled_blocks import wants_compiled

    x = torch.zeros(1, 5, 8)
    assert not wants_compiled(None, x)  # CPU: off by default
    assert wants_compiled(True, x)
    monkeypatch.setenv("RWKV7_COMPILE", "0")
    assert not wants_compiled(True, x)
    monkeypatch.setenv("RWKV7_COMPILE", "1")
    assert wants_compiled(False, x)


def test_models_are_freed_and_share_graphs(model, monkeypatch):
    """A dropped model is freed (nothing caches it), and a second model reuses the first one's graphs."""
    import gc
    import weakref

    from torch._dynamo.utils import counters

    monkeypatch.setenv("RWKV7_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(1, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    first = copy.deepcopy(model)
    first.model.compile_blocks = True
    with torch.no_grad():
        first(ids)
    graphs = counters["stats"]["unique_graphs"]
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None
    second = copy.deepcopy(model)
    second.model.compile_blocks = True
    with torch.no_grad():
        second(ids)
    assert counters["stats"]["unique_graphs"] == graphs


def test_blocks_with_forward_hooks_stay_eager_unless_asked(model, monkeypatch):
    """FSDP2 puts its all-gather in forward hooks of a block, DBP its statistics in hooks inside one: automatic
    compilation leaves such blocks eager."""
    import modeling_rwkv7.modeling_rwkv7 as modeling

    compiled_calls = []
    monkeypatch.setattr(modeling, "run_compiled", lambda block, *args: compiled_calls.append(block) or block(*args))
    monkeypatch.setenv("RWKV7_COMPILE", "1")  # automatic compilation, also on CPU
    m = copy.deepcopy(model)
    handle = m.model.blocks[1].register_forward_pre_hook(lambda module, args: None)
    inner = m.model.blocks[2].att.receptance.register_forward_hook(lambda module, args, out: None)
    ids = torch.randint(1, 300, (1, 8))
    with torch.no_grad():
        m(ids)
    assert compiled_calls == [m.model.blocks[0]]
    inner.remove()
    compiled_calls.clear()
    m.model.compile_blocks = True
    with torch.no_grad():
        m(ids)
    assert m.model.blocks[1] in compiled_calls
    handle.remove()


def test_compiled_lora_matches_eager(model, monkeypatch):
    """PEFT LoRA layers inside the compiled blocks: the same loss and LoRA gradients as eager blocks."""
    from peft import LoraConfig

    monkeypatch.setenv("RWKV7_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    results = []
    for compile_blocks in (False, True):
        torch.manual_seed(0)  # the same LoRA init
        lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=r".*\.att\.(receptance|value)"))
        with torch.no_grad():
            for n, p in lora.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        lora.base_model.model.model.compile_blocks = compile_blocks
        lora.train()
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in lora.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
