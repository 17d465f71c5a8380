"""The observer (distillation + monitoring) and test-time tuning (docs/methods.md, section 3)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

import peft_state_tuning  # noqa: F401
from peft_state_tuning import ObserverCallback, StateTuningConfig, test_time_tune

from checkpoints import load_base, make_base_folder, random_ids

VOCAB = 300


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base_folder(tmp_path_factory.mktemp("base_obs"), hidden=128, layers=2, vocab=VOCAB, seed=41)


@pytest.fixture(scope="module")
def observer_dir(tmp_path_factory):  # a "larger" observer sharing the tokenizer (same vocabulary)
    return make_base_folder(tmp_path_factory.mktemp("observer"), hidden=128, layers=3, vocab=VOCAB, seed=42)


load = load_base


def ids(batch=2, length=16, seed=0):
    return random_ids(VOCAB, batch, length, seed)


def test_observer_equal_to_the_model_adds_zero_distillation_loss(base_dir):
    model = get_peft_model(load(base_dir), StateTuningConfig())
    with torch.no_grad():
        for p in model.base_model.adapter_states["default"].wkv.values():
            p.normal_()
    callback = ObserverCallback(model, alpha=1.0, temperature=2.0)
    callback.attach(model)
    model.train()
    x = ids()
    out = model(x, labels=x)
    assert callback.hook.last_kl == 0.0
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce)
    out.loss.backward()  # the loss still trains the state
    callback.detach()


def test_observer_distils_and_monitors_in_trainer(base_dir, observer_dir, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    text = ids(1, 48, seed=3)[0].tolist()
    data = Dataset.from_dict({"input_ids": [text] * 8, "labels": [text] * 8})
    model = get_peft_model(load(base_dir), StateTuningConfig(upscale_dim=16))
    observer = load(observer_dir)
    callback = ObserverCallback(observer, alpha=0.5, temperature=1.0, log_every=1, plot_dir=str(tmp_path / "plots"))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                             learning_rate=0.05, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "state/L0/norm" in h]
    assert len(logged) >= 2  # the logging steps (and the final summary log)
    for key in ("state/L0/erank", "state/L1/input_corr", "state/L1/grad_norm", "observer/kl"):
        assert key in logged[-1], key
    assert logged[-1]["observer/kl"] > 0 and logged[-1]["state/L0/norm"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "plots" / "state_statistics.png").stat().st_size > 1000
    # the hooks are gone after training: evaluation and plain forwards see the usual loss
    x = torch.tensor([text])
    model.train()
    assert callback.hook is None and model(x, labels=x).loss is not None


def test_test_time_tune_respects_its_budget_and_returns_an_adapter(base_dir, observer_dir):
    examples = [ids(1, 24, seed=s)[0].tolist() for s in range(4)]
    warm = test_time_tune(load(base_dir), examples, steps=2)  # warm-up; gives this machine's step time
    budget = max(2.0, 8 * warm.test_time_stats["seconds"] / 2)  # room for several steps, however loaded the CPU
    base = load(base_dir)
    start = time.perf_counter()
    tuned = test_time_tune(base, examples, steps=100_000, time_budget_s=budget, lr=0.05)
    elapsed = time.perf_counter() - start
    stats = tuned.test_time_stats
    assert isinstance(tuned, PeftModel) and not tuned.training
    # The tuner stops before a step that its running step time says would overrun; on a loaded CI
    # machine one step can still take longer than the ones before it, hence the slack.
    slack = 0.25 * budget + 0.5
    assert 2 <= stats["steps"] < 100_000, stats
    assert stats["seconds"] <= budget + slack and elapsed <= budget + slack, (stats, elapsed, budget)
    assert stats["losses"][-1] < stats["losses"][0]
    # on a PeftModel: a new adapter, with observer feedback, few steps
    again = test_time_tune(tuned, examples, steps=3, observer=load(observer_dir), adapter_name="tt2")
    assert again.active_adapter == "tt2" and again.test_time_stats["steps"] == 3
    with torch.no_grad():
        assert again(torch.tensor(examples[:1])).logits.shape == (1, 24, VOCAB)
