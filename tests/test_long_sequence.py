"""Long sequences: chunked training (truncated BPTT) and chunked prefill, against full-sequence runs."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import peft_state_tuning  # noqa: F401
from peft_state_tuning import StateTuningConfig, chunked_loss_backward, chunked_prefill

from checkpoints import make_base_folder

VOCAB = 300


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base_folder(tmp_path_factory.mktemp("long"), hidden=128, layers=2, vocab=VOCAB, seed=31)


def tuned(base_dir, tune_token_shift=True):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, StateTuningConfig(tune_token_shift=tune_token_shift))
    g = torch.Generator().manual_seed(32)
    with torch.no_grad():
        for p in model.base_model.adapter_states["default"].parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def batch(T=53, seed=33):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, T), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt that is not trained on
    labels[1, 20:24] = -100
    return ids, labels


@pytest.mark.parametrize("chunk_len, T", [(1, 11), (16, 53), (53, 53), (64, 53)])
def test_chunked_loss_equals_full_loss(base_dir, chunk_len, T):
    model = tuned(base_dir)
    model.train()
    ids, labels = batch(T)
    full = model(input_ids=ids, labels=labels).loss
    chunked = chunked_loss_backward(model, ids, labels, chunk_len=chunk_len, backward=lambda loss: None)
    torch.testing.assert_close(chunked, full.detach(), rtol=1e-5, atol=1e-6)


def test_chunked_loss_with_padding_equals_full_loss(base_dir):
    model = tuned(base_dir)
    model.train()
    ids, labels = batch(T=40)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding that crosses a chunk boundary
    labels = labels.masked_fill(mask == 0, -100)
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    chunked = chunked_loss_backward(model, ids, labels, attention_mask=mask, chunk_len=8, backward=lambda loss: None)
    torch.testing.assert_close(chunked, full.detach(), rtol=1e-5, atol=1e-6)


def test_gradient_is_that_of_the_first_chunk_only(base_dir):
    """Truncated BPTT: the initial state feeds chunk 0 only, so its gradient is the gradient of the
    first chunk's token losses (incl. the prediction of chunk 1's first token), over the full count."""
    chunk_len = 16
    ids, labels = batch()
    model = tuned(base_dir)
    model.train()
    chunked_loss_backward(model, ids, labels, chunk_len=chunk_len)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    total = (labels[:, 1:] != -100).sum()
    first = model(input_ids=ids[:, : chunk_len + 1], labels=labels[:, : chunk_len + 1])  # targets 1..chunk_len
    first_count = (labels[:, 1 : chunk_len + 1] != -100).sum()
    (first.loss * first_count / total).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert got[name].abs().sum() > 0
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7)


def test_trainable_weights_get_every_chunks_gradient(base_dir):
    """With weights trained too (here: the head), each chunk backpropagates into them."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).train()
    ids, labels = batch()
    base.requires_grad_(False)
    base.head.weight.requires_grad_(True)
    chunked_loss_backward(base, ids, labels, chunk_len=16)
    got = base.head.weight.grad.clone()
    base.head.weight.grad = None
    base(input_ids=ids, labels=labels).loss.backward()  # the head sees no state: same gradient
    torch.testing.assert_close(got, base.head.weight.grad, rtol=1e-4, atol=1e-6)


def test_long_sequence_trainer_trains_the_state(base_dir, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from peft_state_tuning import LongSequenceTrainer

    model = tuned(base_dir, tune_token_shift=False)
    ids, _ = batch(T=96, seed=34)
    text = ids[0].tolist()
    data = Dataset.from_dict({"input_ids": [text] * 8, "labels": [text] * 8})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=2, learning_rate=0.05,
        logging_steps=4, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = LongSequenceTrainer(model=model, args=args, train_dataset=data, chunk_len=32)
    x = torch.tensor([text])
    with torch.no_grad():
        before = model(input_ids=x, labels=x).loss
    trainer.train()
    with torch.no_grad():
        after = model(input_ids=x, labels=x).loss
    assert after < before - 0.05, (before, after)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_chunked_prefill_equals_the_full_forward(base_dir):
    model = tuned(base_dir).eval()
    ids, _ = batch(T=70)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=True)
    cache, logits = chunked_prefill(model, ids, chunk_len=16)
    torch.testing.assert_close(logits, full.logits[:, -1], rtol=1e-4, atol=1e-4)
    assert cache.seen_tokens == 70
    for a, b in zip(cache.state.wkv, full.cache.state.wkv):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # ... and generation continues from it as from the full prompt
    with torch.no_grad():
        nxt = model(input_ids=ids[:, -1:].clone().fill_(5), cache=cache, use_cache=True).logits
        ref = model(input_ids=torch.cat([ids, ids[:, -1:].clone().fill_(5)], 1)).logits[:, -1:]
    torch.testing.assert_close(nxt, ref, rtol=1e-4, atol=1e-4)


def test_bad_chunk_len_is_refused(base_dir):
    model = tuned(base_dir)
    with pytest.raises(ValueError, match="chunk_len must be >= 1"):
        chunked_prefill(model, torch.ones(1, 4, dtype=torch.long), chunk_len=0)
