"""Decorrelated Backpropagation of the state (docs/methods.md, section 2)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_state_tuning  # noqa: F401
from peft_state_tuning import DecorrelatedOptimizer, StateTuningConfig

from checkpoints import load_base, make_base_folder

VOCAB = 300


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base_folder(tmp_path_factory.mktemp("base_dbp"), hidden=128, layers=2, vocab=VOCAB, seed=31)


def batches(n, batch=4, length=24):
    return [torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]


def train(model, opt, data, scheduler=None):
    model.train()
    for x in data:
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return loss.item()


@pytest.mark.parametrize("config", [StateTuningConfig(), StateTuningConfig(upscale_dim=16)], ids=["plain", "upscaled"])
def test_decor_lr_zero_equals_the_wrapped_optimizer(base_dir, config):
    data = batches(4)
    plain = get_peft_model(load_base(base_dir), StateTuningConfig(upscale_dim=config.upscale_dim))
    config2 = StateTuningConfig(upscale_dim=config.upscale_dim)
    wrapped = get_peft_model(load_base(base_dir), config2)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    opt_a = torch.optim.AdamW(params(plain), lr=0.05)
    opt_b = DecorrelatedOptimizer(torch.optim.AdamW(params(wrapped), lr=0.05), wrapped, decor_lr=0.0)
    train(plain, opt_a, data)
    train(wrapped, opt_b, data)
    for p, q in zip(params(plain), params(wrapped)):
        assert torch.equal(p, q)
    assert len(opt_b.correlation_history) == len(data)  # the statistics were gathered, R left alone
    assert all(torch.equal(R, torch.eye(R.shape[-1]).expand_as(R)) for R in wrapped.base_model.adapter_states["default"].decor.buffers())


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=0.05),
    lambda ps: torch.optim.RMSprop(ps, lr=0.01),
], ids=["sgd", "adam", "rmsprop"])  # fmt: skip
def test_wraps_any_optimizer_with_schedulers_and_state_dict(base_dir, make):
    model = get_peft_model(load_base(base_dir), StateTuningConfig(upscale_dim=16))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DecorrelatedOptimizer(make(params), model, decor_lr=0.05)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is opt.optimizer.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    lr0 = opt.param_groups[0]["lr"]
    before = [p.detach().clone() for p in params]
    train(model, opt, batches(3), sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 / 4)
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    sd = opt.state_dict()
    assert "decorrelation" in sd and sd["decorrelation"]["running"]
    fresh = DecorrelatedOptimizer(make(params), model, decor_lr=0.05)
    fresh.load_state_dict(sd)
    assert fresh.correlation_history == opt.correlation_history
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_drives_the_input_correlation_down_and_r_is_saved(base_dir, tmp_path):
    model = get_peft_model(load_base(base_dir), StateTuningConfig(upscale_dim=16, kernel_gamma=0.5))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DecorrelatedOptimizer(torch.optim.Adam(params, lr=1e-3), model, decor_lr=0.2)
    train(model, opt, batches(30, batch=2, length=16))
    hist = opt.correlation_history
    assert hist[-1] < 0.5 * hist[0], hist
    assert all(b <= a * 1.05 for a, b in zip(hist[::5], hist[5::5])), hist  # down over the run
    # R changes the function: it is saved with the adapter and restored on load
    x = batches(1)[0][:2]
    model.eval()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].decorrelation
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)


def test_trainer_with_decorrelated_optimizer_and_scheduler(base_dir, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    text = batches(1, batch=1, length=48)[0][0].tolist()
    data = Dataset.from_dict({"input_ids": [text] * 8, "labels": [text] * 8})
    model = get_peft_model(load_base(base_dir), StateTuningConfig(upscale_dim=16))
    opt = DecorrelatedOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05), model, decor_lr=0.05)
    sched = get_linear_schedule_with_warmup(opt, 1, 6)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, logging_steps=3,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    before = trainer.evaluate(data)["eval_loss"]
    trainer.train()
    assert trainer.evaluate(data)["eval_loss"] < before
    assert len(opt.correlation_history) == 6
