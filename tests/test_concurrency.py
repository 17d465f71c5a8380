"""Many adapters served from one process: mixed batches under threads give each row its own state."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import peft_state_tuning  # noqa: F401
from modeling_rwkv7 import convert_rwkv_checkpoint
from peft_state_tuning import StateTuningConfig, StateTuningModel

from checkpoints import write_official_checkpoint

VOCAB = 300
ADAPTERS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("concurrency")
    pth = write_official_checkpoint(tmp / "m.pth", hidden=128, layers=2, vocab=VOCAB, seed=21)
    base = AutoModelForCausalLM.from_pretrained(convert_rwkv_checkpoint(pth, tmp / "hf", with_tokenizer=False), dtype=torch.float32)
    model = get_peft_model(base.eval(), StateTuningConfig(), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, StateTuningConfig(tune_token_shift=name == "c"))
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for states in model.base_model.adapter_states.values():
            for p in states.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    model.eval()
    x = torch.randint(1, VOCAB, (4, 24), generator=g)
    alone = {}
    with torch.no_grad():
        for name in ADAPTERS:
            model.set_adapter(name)
            alone[name] = model(input_ids=x).logits
        with model.disable_adapter():
            alone["__base__"] = model(input_ids=x).logits
    return model, x, alone


def test_threads_with_different_adapter_names_each_get_their_own_rows(served, monkeypatch):
    model, x, alone = served
    # Widen the window between "adapter_names noted" and "states read" so that a race (rows kept on
    # the shared instance) shows every time, not once in a while.
    original = StateTuningModel.initial_state

    def slow_initial_state(self, *args, **kwargs):
        time.sleep(0.002)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StateTuningModel, "initial_state", slow_initial_state)
    # Each thread serves its own mix of adapters for the same 4 texts, many times over.
    mixes = [
        ["a", "b", "c", "__base__"],
        ["c", "c", "a", "b"],
        ["__base__", "a", "a", "c"],
        ["b", "__base__", "c", "a"],
        ["a", "a", "a", "a"],
        ["c", "b", "__base__", "b"],
    ]
    errors: list[str] = []
    barrier = threading.Barrier(len(mixes))

    def serve(names):
        try:
            barrier.wait()
            for _ in range(10):
                with torch.no_grad():
                    out = model(input_ids=x, adapter_names=names).logits
                for row, name in enumerate(names):
                    if not torch.allclose(out[row], alone[name][row], rtol=1e-5, atol=1e-5):
                        errors.append(f"row {row} of {names} does not match adapter {name!r} alone")
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"{names}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=serve, args=(names,)) for names in mixes]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up at once
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]


def test_generate_in_threads_with_mixed_adapters(served):
    model, x, _ = served
    mixes = [["a", "b"], ["b", "c"], ["c", "a"]]
    expected = {}
    with torch.no_grad():
        for name in ADAPTERS:
            model.set_adapter(name)
            expected[name] = model.generate(input_ids=x[:2], max_new_tokens=3, do_sample=False)
    results, errors = {}, []

    def serve(i, names):
        try:
            with torch.no_grad():
                results[i] = model.generate(input_ids=x[:2], adapter_names=names, max_new_tokens=3, do_sample=False)
        except Exception as err:  # noqa: BLE001
            errors.append(f"{names}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=serve, args=(i, names)) for i, names in enumerate(mixes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, names in enumerate(mixes):
        for row, name in enumerate(names):
            assert torch.equal(results[i][row], expected[name][row]), (names, row)
