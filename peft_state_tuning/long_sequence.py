"""Sequences longer than memory: chunked training (truncated BPTT, "infctx") and chunked prefill.

An RWKV-7 carries everything it knows about the past in its state, so a long sequence can be cut
into chunks of ``chunk_len`` tokens that run one after the other, each starting from the state the
previous one ended in (``use_cache=True`` -> ``cache.state`` -> ``Rwkv7State.detach()`` -> the next
chunk's ``initial_state``). Memory then depends on ``chunk_len``, not on the total length.

Training (:func:`chunked_loss_backward`, :class:`LongSequenceTrainer`)
    Each chunk runs forward *and backward* before the next one starts, so at most one chunk's
    activations are alive. The loss is exact: the chunk losses (sums of token losses, including the
    prediction of each chunk's first token from the end of the previous chunk) add up to the
    full-sequence loss, normalised by the number of target tokens of the whole sequence.

    **The gradient is truncated** at chunk boundaries (truncated back-propagation through time):
    the state handed from chunk ``i`` to chunk ``i + 1`` is detached, so the loss of chunk ``i + 1``
    sends no gradient into chunk ``i``. In particular the trainable *initial* state of state tuning
    feeds only the first chunk: its gradient is that of the first chunk's loss (its ``chunk_len``
    target tokens) divided by the whole sequence's token count. Weights trained alongside (LoRA,
    full fine-tuning) get every chunk's gradient, each through its own chunk only. Chunks whose loss
    needs no gradient (e.g. later chunks with only the initial state trained) skip the backward.

Inference (:func:`chunked_prefill`)
    Reads any number of tokens chunk by chunk under ``torch.no_grad()`` and returns the cache (the
    state after the text) and the logits of the last token: a million-token input needs the memory
    of one chunk.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modeling_rwkv7 import Rwkv7Cache, Rwkv7State
from modeling_rwkv7.modeling_rwkv7 import _ChunkedLMLoss

__all__ = ["chunked_loss_backward", "chunked_prefill", "LongSequenceTrainer"]


def _parts(model: nn.Module):
    """``(backbone, head, initial_state_fn)`` of an ``Rwkv7ForCausalLM`` or of a PeftModel around one.
    ``initial_state_fn(batch)`` gives the state the first chunk starts from (the tuned one, with
    gradient, for a state-tuning adapter)."""
    from peft import PeftModel

    from .model import StateTuningModel, find_rwkv7_backbone

    inner = model
    if isinstance(model, PeftModel):
        inner = model.base_model
    if isinstance(inner, StateTuningModel):
        causal_lm = inner.model
        state_fn = inner.initial_state
    else:
        causal_lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        state_fn = lambda batch: None  # noqa: E731
    head = getattr(causal_lm, "head", None)
    if head is None:
        raise TypeError("chunked training needs an RWKV-7 causal LM (Rwkv7ForCausalLM) or a PeftModel around one")
    return find_rwkv7_backbone(causal_lm), head, state_fn


def _chunks(total: int, chunk_len: int):
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1; got {chunk_len}")
    for start in range(0, total, chunk_len):
        yield start, min(start + chunk_len, total)


def chunked_loss_backward(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_len: int = 4096,
    initial_state: Rwkv7State | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    loss_scale: float = 1.0,
    backward: Callable[[torch.Tensor], None] | None = None,
    loss_chunk: int = 4096,
) -> torch.Tensor:
    """Forward and backward of a long batch chunk by chunk (truncated BPTT; see the module docs).

    Args:
        model: an ``Rwkv7ForCausalLM``, or a PeftModel around one (state tuning, LoRA, ...).
        input_ids: ``[B, T]``; ``labels`` ``[B, T]`` as for the model (shifted inside, -100 ignored;
            default: ``input_ids``); ``attention_mask`` ``[B, T]`` (padding leaves the state untouched).
        chunk_len: tokens per chunk; memory grows with it, not with ``T``.
        initial_state: the state the first chunk starts from (default: the adapter's, or zeros).
        num_items_in_batch: the loss denominator (default: the number of target tokens in this batch;
            ``Trainer`` passes the count over all its gradient-accumulation micro-batches).
        loss_scale: multiplies every chunk's loss before its backward (e.g. ``1 / grad_accum``).
        backward: called as ``backward(chunk_loss)`` (default ``chunk_loss.backward()``; a Trainer
            passes ``accelerator.backward``). ``None`` of a chunk whose loss needs no gradient.

    Returns:
        The loss (detached, fp32, times ``loss_scale``): equal to the model's full-sequence loss.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq_len]; got {tuple(input_ids.shape)}")
    backbone, head, state_fn = _parts(model)
    labels = input_ids if labels is None else labels
    B, T = input_ids.shape
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(input_ids.device)  # target of each position
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    count = count.to(input_ids.device) if isinstance(count, torch.Tensor) else torch.tensor(count, device=input_ids.device)
    count = count.clamp(min=1).float()
    backward = backward or (lambda loss: loss.backward())
    state = initial_state if initial_state is not None else state_fn(B)
    total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
    for start, end in _chunks(T, chunk_len):
        mask = attention_mask[:, start:end] if attention_mask is not None else None
        out = backbone(input_ids=input_ids[:, start:end], attention_mask=mask, initial_state=state, use_cache=True)
        hidden = out.last_hidden_state
        chunk_targets = targets[:, start:end].reshape(-1)
        loss = _ChunkedLMLoss.apply(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, chunk_targets, loss_chunk, torch.is_grad_enabled()
        )
        loss = loss / count * loss_scale
        state = out.cache.state.detach()  # the truncation: no gradient flows into the previous chunk
        del out, hidden
        if loss.requires_grad:
            backward(loss)
        total += loss.detach().float()
    return total


@torch.no_grad()
def chunked_prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    chunk_len: int = 4096,
    attention_mask: torch.Tensor | None = None,
    initial_state: Rwkv7State | None = None,
    cache: Rwkv7Cache | None = None,
    progress: Callable[[int, int], None] | None = None,
):
    """Read ``input_ids`` ``[B, T]`` of any length chunk by chunk; memory is that of one chunk.

    Works with an ``Rwkv7ForCausalLM`` or a PeftModel around one (its adapter's state is the start).
    Returns ``(cache, logits)``: the cache holds the state after the text (continue with
    ``model.generate(..., cache=cache)`` or ``initial_state=cache.state``), ``logits`` ``[B, V]`` are
    those of the last token (the next-token distribution). ``progress(done, total)`` is called per chunk.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq_len]; got {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    logits = None
    for start, end in _chunks(T, chunk_len):
        mask = attention_mask[:, start:end] if attention_mask is not None else None
        kwargs = {} if initial_state is None or cache is not None else {"initial_state": initial_state}
        out = model(input_ids=input_ids[:, start:end], attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
        cache, logits = out.cache, out.logits[:, -1]
        if progress is not None:
            progress(end, T)
    return cache, logits


def _trainer_class():
    from transformers import Trainer

    class LongSequenceTrainer(Trainer):
        """A ``transformers.Trainer`` whose training step runs :func:`chunked_loss_backward`: each
        sequence is cut into chunks of ``chunk_len`` tokens with the state carried between them
        (truncated BPTT), so the memory of a step is flat in the sequence length.

        ``LongSequenceTrainer(model=..., args=..., train_dataset=..., chunk_len=4096)``. Evaluation
        runs the model as usual (use ``chunked_prefill``-style inputs of moderate length there).
        Single-process training (one GPU or CPU); the model is called unwrapped.
        """

        def __init__(self, *args, chunk_len: int = 4096, **kwargs):
            super().__init__(*args, **kwargs)
            self.chunk_len = chunk_len

        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()
            inputs = self._prepare_inputs(inputs)
            scale = 1.0
            if num_items_in_batch is None:
                scale = 1.0 / self.current_gradient_accumulation_steps
            with self.compute_loss_context_manager():
                loss = chunked_loss_backward(
                    self.accelerator.unwrap_model(model),
                    inputs["input_ids"],
                    labels=inputs.get("labels"),
                    attention_mask=inputs.get("attention_mask"),
                    chunk_len=self.chunk_len,
                    num_items_in_batch=num_items_in_batch,
                    loss_scale=scale,
                    backward=self.accelerator.backward,
                )
            return loss.detach()

    LongSequenceTrainer.__qualname__ = "LongSequenceTrainer"
    return LongSequenceTrainer


def __getattr__(name):  # transformers' Trainer is imported only when used
    if name == "LongSequenceTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
