"""Test-time scaling by state tuning (docs/methods.md, section 3.3): tune a state on the fly from a few
examples, within a wall-clock budget, optionally guided by an observer model, and return a ready adapter."""

from __future__ import annotations

import time

import torch
from peft import PeftModel, get_peft_model

from .config import StateTuningConfig
from .observer import distillation_kl


def _as_rows(examples, tokenizer) -> list[list[int]]:
    if isinstance(examples, torch.Tensor):
        return [row.tolist() for row in (examples if examples.dim() == 2 else examples[None])]
    rows = []
    for ex in examples:
        if isinstance(ex, str):
            if tokenizer is None:
                from modeling_rwkv7 import get_world_tokenizer

                tokenizer = get_world_tokenizer()
            rows.append(tokenizer(ex).input_ids)
        else:
            rows.append([int(t) for t in ex])
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("test_time_tune needs at least one example of two or more tokens")
    return rows


def _batch(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: padded positions leave the state untouched
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def test_time_tune(model, examples, steps: int = 20, time_budget_s: float | None = None, lr: float = 0.05,
                   observer=None, alpha: float = 0.5, temperature: float = 1.0, config: StateTuningConfig | None = None,
                   tokenizer=None, batch_size: int = 8, adapter_name: str = "test_time", seed: int = 0) -> PeftModel:  # fmt: skip
    """Tune a state from ``examples`` at inference time and return the ready ``PeftModel`` (eval mode).

    Args:
        model: a base RWKV-7 (a new state-tuning adapter is made with ``config``, default
            ``StateTuningConfig()``) or a state-tuning ``PeftModel`` (a new adapter ``adapter_name`` is
            added, made active and tuned; other adapters stay as they are).
        examples: texts (tokenized with ``tokenizer``, default the world tokenizer), token-id lists,
            or a ``[B, T]`` tensor. The loss is next-token cross-entropy on every token.
        steps: at most this many optimisation steps (Adam, ``lr``).
        time_budget_s: wall-clock budget. A step starts only if the time spent so far plus 1.5x the
            longest step so far (not counting the first, warm-up one) fits in it; the first step always runs.
        observer: optional causal LM sharing the tokenizer; adds ``alpha * T^2 * KL(observer || model)``.

    The returned model carries ``test_time_stats``: steps run, seconds spent, the losses.
    """
    start = time.perf_counter()
    config = config if config is not None else StateTuningConfig()
    if isinstance(model, PeftModel):
        peft_model = model
        if adapter_name in peft_model.peft_config:
            peft_model.delete_adapter(adapter_name)
        peft_model.add_adapter(adapter_name, config)
        peft_model.set_adapter(adapter_name)
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    device = next(peft_model.parameters()).device
    rows = _as_rows(examples, tokenizer)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    if observer is not None and observer is not peft_model:
        observer.eval()
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    last = 0.0  # the longest step after the first (which warms up): 1.5x it is the estimate of the next one
    peft_model.train()
    for n in range(steps):
        elapsed = time.perf_counter() - start
        if time_budget_s is not None and n > 0 and elapsed + 1.5 * last > time_budget_s:
            break
        t0 = time.perf_counter()
        pick = torch.randperm(len(rows), generator=g)[:batch_size].tolist()
        ids, mask, labels = _batch([rows[i] for i in pick], device)
        out = peft_model(input_ids=ids, attention_mask=mask)
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)
        if observer is not None and alpha:
            with torch.no_grad():
                was_training = peft_model.training
                obs_logits = observer(input_ids=ids, attention_mask=mask).logits
                peft_model.train(was_training)
            loss = loss + alpha * temperature**2 * distillation_kl(logits, obs_logits, shifted != -100, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        last = time.perf_counter() - t0 if n == 0 else max(last if n > 1 else 0.0, time.perf_counter() - t0)
    peft_model.eval()
    for p in params:
        p.grad = None
    peft_model.test_time_stats = {"steps": len(losses), "seconds": time.perf_counter() - start, "losses": losses}
    return peft_model


test_time_tune.__test__ = False  # not a pytest test, whatever module imports it
