"""RWKV-7 ("Goose", x070) for Hugging Face transformers.

One readable file, following the official x070 equations (BlinkDL's ``rwkv_v7_demo.py`` and pip
``rwkv``). Parameter names are the official ones, so that an official ``.pth`` loads by a prefix
rename (``emb`` -> ``model.emb``, ``blocks.*`` -> ``model.blocks.*``, ``head`` stays).

What is not in the official code:

* ``initial_state``: the forward takes a per-layer initial state (:class:`Rwkv7State`, fp32,
  batch-broadcastable) as a plain argument, so a trainable state receives its gradient, survives
  gradient checkpointing (it is an explicit input of each checkpointed block) and batch expansion
  in ``generate()``.
* ``attention_mask``: padded positions leave the state exactly as it was (decay 1, k = v = a = b = 0,
  and the token shift skips them), so left padding works with a non-zero initial state.
* The WKV recurrence runs through ``rwkv7_kernels.wkv7`` (Triton on CUDA, chunked PyTorch on CPU).
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput, logging

from rwkv7_kernels import cross_entropy_sum_, log_decay_from_logits, wkv7

from .cache_rwkv7 import Rwkv7Cache, Rwkv7State, filling
from .configuration_rwkv7 import Rwkv7Config
from .convert import CheckpointFormatError, is_fla_folder, load_fla_folder
from .compiled_blocks import env_switch, has_hooks, run_compiled, wants_compiled
from .graph_decode import DecodeGraph, can_use_graph

logger = logging.get_logger(__name__)

# Captured decoding steps per model (see graph_decode.py). Kept outside the module so that copying
# or pickling a model never touches CUDA graphs.
_DECODE_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

# w = exp(-e^{-0.5} * sigmoid(d)) keeps every decay in (0.545, 1); we pass its log to the kernel.
DECAY_SCALE = math.exp(-0.5)  # 0.6065306597126334


def token_shift(x: torch.Tensor, prev: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """The previous real token's features for every position: ``prev`` where none precedes it.

    ``x`` is ``[B, T, C]``, ``prev`` ``[B, C]`` (or ``None`` for zeros), ``mask`` ``[B, T]`` bool with
    ``False`` on padding. Padding is skipped wherever it is: left padding (the first real token sees
    ``prev``) and padding inside a row (PEFT prompt tuning puts it between its virtual tokens and the
    text: the first text token must see the last virtual token, as in the unpadded row).
    """
    B, T, C = x.shape
    prev = x.new_zeros(B, C) if prev is None else prev.to(x.dtype).expand(B, C)
    if mask is None:
        return torch.cat([prev[:, None], x[:, :-1]], dim=1)
    positions = torch.arange(T, device=x.device).expand(B, T)
    last_real = torch.where(mask, positions, -1).cummax(dim=1).values  # last real token at or before t
    before = F.pad(last_real[:, :-1], (1, 0), value=-1)  # ... strictly before t (-1: none)
    picked = x.gather(1, before.clamp(min=0)[..., None].expand(B, T, C))
    return torch.where((before >= 0)[..., None], picked, prev[:, None])


def last_real_token(x: torch.Tensor, prev: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """The features of each row's last non-padding token (``prev`` for a row of padding only)."""
    if mask is None:
        return x[:, -1]
    B, T, C = x.shape
    positions = torch.arange(T, device=x.device).expand(B, T)
    last = torch.where(mask, positions, -1).max(dim=1).values
    picked = x[torch.arange(B, device=x.device), last.clamp(min=0)]
    prev = x.new_zeros(B, C) if prev is None else prev.to(x.dtype).expand(B, C)
    return torch.where((last >= 0)[:, None], picked, prev)


def _readable_safetensors(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
        return os.path.getsize(path) > 8
    except Exception:  # noqa: BLE001 - any failure means the file is bad
        return False


def _take_cache(cache, kwargs: dict) -> Rwkv7Cache | None:
    """The ``cache`` argument, or the same under ``past_key_values`` (the name of older transformers,
    and the one PEFT's prompt-learning methods read and write; ``prepare_inputs_for_generation``
    passes both). Refuses what is not an :class:`Rwkv7Cache` with a message that says why."""
    alias = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else alias
    if cache is not None and not isinstance(cache, Rwkv7Cache):
        raise TypeError(
            f"RWKV-7 got a {type(cache).__name__} as its cache; it needs an Rwkv7Cache (a recurrent state). "
            "If it comes from PEFT prefix tuning (PrefixTuningConfig) or another method that prepends keys/values "
            "to attention KV caches: those need attention layers, which RWKV-7 does not have. Use prompt tuning "
            "(peft.PromptTuningConfig, trainable embeddings before the input) or state tuning "
            "(peft_state_tuning.StateTuningConfig, a trainable initial state) instead."
        )
    return cache


def _fit_batch(state: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Broadcast a state of batch 1, or repeat a state of batch b to batch n*b (``generate`` expands
    each prompt into beams / return sequences with ``repeat_interleave``)."""
    if state is None or state.shape[0] in (1, batch):
        return state
    if batch % state.shape[0]:
        raise ValueError(f"an initial state of batch {state.shape[0]} cannot be used for a batch of {batch}")
    return state.repeat_interleave(batch // state.shape[0], dim=0)


class _IdBounds:
    """``[min, max]`` of the input ids on their way to the host, read later without stalling the GPU.

    On CUDA the two numbers are copied into pinned host memory right away (non-blocking) and an event
    marks the copy; :meth:`read` waits for that event only, which the GPU passed long before the blocks
    queued after it are done. A plain ``.tolist()`` at that point would wait for all of them, and the GPU
    would then idle while the host queues the loss (~0.5 ms of a train step on an H200,
    benchmarks/results/train_step_gaps_h200.log)."""

    def __init__(self, bounds: torch.Tensor):
        self.event = None
        if bounds.is_cuda:
            self.host = torch.empty(bounds.shape, dtype=bounds.dtype, pin_memory=True)
            self.host.copy_(bounds, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = bounds

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class _ChunkedLMLoss(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T`` without materialising the ``[tokens, vocab]`` logits.

    The forward walks over chunks of tokens, computing each chunk's logits and dropping them again. With
    a 65536-token vocabulary this saves the largest activation of a training step (B=8, T=4096: 8.6 GB
    of fp32 logits). Returns the *sum* of the token losses.

    The gradients are computed in the forward, while a chunk's logits exist: ``cross_entropy_sum_`` (one
    fused kernel on CUDA) turns them into the loss and, in place, into ``d loss / d logits``, which one
    more matmul takes to ``d loss / d hidden`` (``[tokens, hidden]``, small). The loss is the end of the
    graph, so its incoming gradient is a scalar and the backward only scales what was kept: no second
    logits matmul and no second pass over the logits. ``grad_enabled`` is passed in because inside
    ``forward`` autograd is always off: without it (evaluation) only the loss is computed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, grad_enabled: bool = True):
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        want_weight = grad_enabled and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        weight_as_logits = None  # the head in the logits' dtype (autocast may differ from the weight's), cast once
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            logits = h @ weight.t()
            total = total + cross_entropy_sum_(logits, labels[s : s + chunk], write_grad=want_hidden or want_weight)
            if grad_hidden is not None:  # `logits` now holds d loss / d logits
                if weight_as_logits is None:
                    weight_as_logits = weight.to(logits.dtype)
                grad_hidden[s : s + chunk] = logits @ weight_as_logits
            if grad_weight is not None:
                grad_weight += (logits.t() @ h.to(logits.dtype)).float()
            # Freed before the next chunk's logits exist: else two [chunk, vocab] buffers are alive at once, and
            # at the end of a forward that is the step's memory peak (0.54 GB more at B = 8, T = 4096, 0.1B).
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.float()
        if grad_hidden is not None:
            grad_hidden = (grad_hidden.float() * scale).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_causal_lm_loss(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, num_items_in_batch=None, chunk: int = 4096
) -> torch.Tensor:
    """Next-token cross-entropy (labels shifted inside, -100 ignored), as transformers'
    ``ForCausalLMLoss``, computed chunk by chunk (see :class:`_ChunkedLMLoss`)."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1).to(hidden.device)
    total = _ChunkedLMLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, shifted, chunk, torch.is_grad_enabled()
    )
    count = num_items_in_batch if num_items_in_batch is not None else (shifted != -100).sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


class Rwkv7TimeMix(nn.Module):
    """The RWKV-7 time mix ("attention"): token shift, six lerps, LoRAs, WKV, GroupNorm, bonus, gate."""

    # Optional callable ``(module, r, log_w, kk, iclr, mask, output_final_state) -> [B, T, H, N] | None``
    # whose result is added to the WKV output (peft_state_tuning's upscaled states). None: no extension.
    wkv_extension = None

    def __init__(self, config: Rwkv7Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        # Branches read this bool, not layer_idx: a compiled block then shares one graph with every
        # other block except the first (see compiled_blocks.py).
        self.is_first = layer_idx == 0
        C, H, N = config.hidden_size, config.num_heads, config.head_dim
        self.num_heads, self.head_dim = H, N
        vec = lambda: nn.Parameter(torch.zeros(1, 1, C))  # noqa: E731
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0, self.a0, self.v0 = vec(), vec(), vec()
        self.w1 = nn.Parameter(torch.zeros(C, config.decay_low_rank_dim))
        self.w2 = nn.Parameter(torch.zeros(config.decay_low_rank_dim, C))
        self.a1 = nn.Parameter(torch.zeros(C, config.a_low_rank_dim))
        self.a2 = nn.Parameter(torch.zeros(config.a_low_rank_dim, C))
        # Layer 0 owns the value residual (v_first) and never reads v0/v1/v2; checkpoints still
        # carry them, so we keep them for a lossless round trip.
        self.v1 = nn.Parameter(torch.zeros(C, config.v_low_rank_dim))
        self.v2 = nn.Parameter(torch.zeros(config.v_low_rank_dim, C))
        self.g1 = nn.Parameter(torch.zeros(C, config.gate_low_rank_dim))
        self.g2 = nn.Parameter(torch.zeros(config.gate_low_rank_dim, C))
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=N * config.norm_eps)  # 64e-5 for head size 64

    def forward(
        self,
        x: torch.Tensor,
        v_first: torch.Tensor | None,
        wkv_state: torch.Tensor | None,
        shift_state: torch.Tensor | None,
        mask: torch.Tensor | None,
        output_final_state: bool,
    ):
        """Returns ``(out, v_first, wkv_final, shift_final)``: :meth:`mix`, the WKV recurrence, :meth:`finish`
        (which ``Rwkv7Block.forward`` also calls one by one, see there)."""
        wkv_inputs, post, v_first, shift_final = self.mix(x, v_first, shift_state, mask, output_final_state)
        o, wkv_final = self._wkv(*wkv_inputs, wkv_state, mask, output_final_state)
        return self.finish(o, *post), v_first, wkv_final, shift_final

    def mix(self, x, v_first, shift_state, mask, output_final_state: bool):
        """Everything before the WKV recurrence: token shift, lerps, projections, LoRAs, the bonus.
        Returns ``(wkv_inputs, post, v_first, shift_final)``: the arguments of :meth:`_wkv` (before the states)
        and of :meth:`finish` (after ``o``)."""
        B, T, C = x.shape
        H, N = self.num_heads, self.head_dim
        xx = token_shift(x, shift_state, mask) - x
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)
        # The decay logits less their bias w0. The log decay -e^-0.5 sigmoid(w0 + d) must be formed in fp32 (in
        # bf16, decays just below 1 would round to exactly 1): the WKV call does that from d and w0 (inside the
        # Triton kernels), so no fp32 [B, T, C] log decay is written, read four times and kept for the backward.
        d = torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        if self.is_first:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        iclr = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (iclr - 1) * self.k_a)
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        r_, k_, v_, iclr_, d_ = heads(r), heads(k), heads(v), heads(iclr), heads(d)
        a_, b_ = -kk, kk * iclr_
        if mask is not None:
            # Padding must not touch the state: decay 1 (logit -inf, log decay 0) and no write (k = v = a = b = 0).
            keep = mask[:, :, None, None]
            d_ = d_.masked_fill(~keep, float("-inf"))
            k_w, v_w, a_, b_ = (t.masked_fill(~keep, 0.0) for t in (k_, v_, a_, b_))
        else:
            k_w, v_w = k_, v_
        # The bonus is formed before the WKV call, i.e. inside the same compiled graph as r, k, v (see
        # compiled_blocks.py: the call is a graph break). Then r, k, v feed only the WKV kernel, and their
        # gradients need no eager sum of two contributions in the backward. kk and iclr cross the break only
        # for an extension: an unused graph output would get a zero-filled gradient in the backward.
        bonus = ((r_ * k_ * self.r_k).sum(dim=-1, keepdim=True) * v_).view(B, T, C)
        extra = (kk, iclr_) if self.wkv_extension is not None else (None, None)
        shift_final = last_real_token(x, shift_state, mask) if output_final_state else None
        return (r_, d_, k_w, v_w, a_, b_, *extra), (bonus, g), v_first, shift_final

    def finish(self, o: torch.Tensor, bonus: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """After the WKV recurrence: GroupNorm per head, the bonus, the gate, the output projection."""
        B, T, H, N = o.shape
        C = H * N
        o = F.group_norm(o.reshape(B * T, C).float(), H, self.ln_x.weight.float(), self.ln_x.bias.float(), self.ln_x.eps)
        o = o.view(B, T, C).to(bonus.dtype) + bonus
        return self.output(o * g)

    @torch.compiler.disable
    def _wkv(self, r, d, k, v, a, b, kk, iclr, wkv_state, mask, output_final_state):
        """The WKV recurrence (+ the upscaled states' extension): kept out of compiled graphs, since it is
        our own Triton autograd Function and the extension reads the cache being filled. ``d``: the decay
        logits less ``w0`` (see :meth:`mix`)."""
        o, wkv_final = wkv7(r, d, k, v, a, b, initial_state=wkv_state, output_final_state=output_final_state,
                            w_logit_bias=self.w0)
        if self.wkv_extension is not None:
            log_w = log_decay_from_logits(d, self.w0)
            extra = self.wkv_extension(self, r, log_w, kk, iclr, mask, output_final_state)
            if extra is not None:
                o = o + extra.to(o.dtype)
        return o, wkv_final


class Rwkv7ChannelMix(nn.Module):
    """The RWKV-7 channel mix: token shift and a ReLU^2 feed-forward layer."""

    def __init__(self, config: Rwkv7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.key = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.value = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, shift_state, mask, output_final_state: bool, recompute: bool = False):
        """``recompute``: keep only the input of the feed-forward layer for the backward and recompute its
        ``[B, T, 4C]`` activation there (one more ``key`` matmul), see ``Rwkv7Model.recompute_ffn``."""
        k = x + (token_shift(x, shift_state, mask) - x) * self.x_k
        if recompute and torch.is_grad_enabled():
            out = checkpoint(self._feed_forward, k, use_reentrant=False)
        else:
            out = self._feed_forward(k)
        shift_final = last_real_token(x, shift_state, mask) if output_final_state else None
        return out, shift_final

    def _feed_forward(self, k: torch.Tensor) -> torch.Tensor:
        return self.value(torch.relu(self.key(k)) ** 2)


class Rwkv7Block(nn.Module):
    def __init__(self, config: Rwkv7Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_first = layer_idx == 0
        if layer_idx == 0:
            self.ln0 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.att = Rwkv7TimeMix(config, layer_idx)
        self.ffn = Rwkv7ChannelMix(config)

    def forward(
        self, x, v_first, wkv_state, att_shift, ffn_shift, mask, output_final_state: bool = False, recompute_ffn: bool = False
    ):
        """Returns ``(x, v_first, wkv_final, att_shift_final, ffn_shift_final)`` (finals ``None``
        unless ``output_final_state``). Every state is an explicit argument, so a checkpointed
        replay sees the same tensors and their gradients flow. ``recompute_ffn``: see
        ``Rwkv7Model.recompute_ffn``."""
        if self.is_first:
            x = self.ln0(x)
        # The time mix's three steps are called here rather than through ``self.att(...)``: the WKV call is the
        # graph break of a compiled block (compiled_blocks.py), and a break inside a nested module call makes
        # Dynamo cut the block into four graphs (before ``att``, the time mix before and after the WKV call, the
        # rest) instead of two. (Measured: the same speed either way, benchmarks/results/bench_train.log, call Y2.)
        # Hooks on the time mix itself still see a module call.
        att = self.att
        if att._forward_hooks or att._forward_pre_hooks:
            att_out, v_first, wkv_final, att_final = att(self.ln1(x), v_first, wkv_state, att_shift, mask, output_final_state)
        else:
            wkv_inputs, post, v_first, att_final = att.mix(self.ln1(x), v_first, att_shift, mask, output_final_state)
            o, wkv_final = att._wkv(*wkv_inputs, wkv_state, mask, output_final_state)
            att_out = att.finish(o, *post)
        x = x + att_out
        ffn_out, ffn_final = self.ffn(self.ln2(x), ffn_shift, mask, output_final_state, recompute_ffn)
        x = x + ffn_out
        return x, v_first, wkv_final, att_final, ffn_final


@dataclass
class Rwkv7Output(ModelOutput):
    """Output of :class:`Rwkv7Model`: ``cache`` holds the state after the last token when ``use_cache``."""

    last_hidden_state: torch.FloatTensor | None = None
    cache: Rwkv7Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class Rwkv7CausalLMOutput(ModelOutput):
    """Output of :class:`Rwkv7ForCausalLM`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Rwkv7Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class Rwkv7PreTrainedModel(PreTrainedModel):
    config_class = Rwkv7Config
    config: Rwkv7Config
    base_model_prefix = "model"
    _no_split_modules = ["Rwkv7Block"]
    supports_gradient_checkpointing = True
    _is_stateful = True  # no assisted generation: a recurrent state cannot be rolled back

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As :meth:`transformers.PreTrainedModel.from_pretrained`; also reads local folders in the
        flash-linear-attention hub format (``RWKV7ForCausalLM``) directly, no ``trust_remote_code``."""
        path = pretrained_model_name_or_path
        try:
            if isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and is_fla_folder(path):
                return cls._from_fla_folder(path, dtype=kwargs.get("dtype", kwargs.get("torch_dtype")))
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except SafetensorError as err:  # name the bad file and the fix, not a header-parsing error
            bad = [str(f) for f in sorted(Path(path).glob("*.safetensors")) if not _readable_safetensors(f)] if os.path.isdir(path) else []
            raise CheckpointFormatError(
                f"{', '.join(bad) or path}: truncated or corrupt safetensors file ({err}). It was probably cut off by "
                "an interrupted download, copy or conversion: download or convert the model again."
            ) from err

    @classmethod
    def _from_fla_folder(cls, path, dtype=None):
        config, state_dict = load_fla_folder(path)
        if not issubclass(cls, Rwkv7ForCausalLM):  # the backbone alone
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model.eval()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialisation for training from scratch, after BlinkDL's ``train_temp`` recipe
        (simplified). Loading a checkpoint never calls this on loaded tensors."""
        cfg = self.config
        if isinstance(module, Rwkv7TimeMix):
            L, i, C = cfg.num_hidden_layers, module.layer_idx, cfg.hidden_size
            ratio_0_to_1 = i / max(L - 1, 1)
            ratio_1_to_almost0 = 1.0 - i / L
            ddd = torch.arange(C, dtype=torch.float32) / C
            for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                getattr(module, name).copy_((1.0 - ddd.pow(power * ratio_1_to_almost0)).view(1, 1, C))
            n = torch.arange(C, dtype=torch.float32)
            decay_speed = -7 + 5 * (n / (C - 1)) ** (0.85 + 1.0 * ratio_0_to_1**0.5)
            module.w0.copy_((decay_speed + 0.5).view(1, 1, C))
            module.a0.zero_()
            module.v0.fill_(1.0)
            for name in ("w1", "a1", "v1", "g1"):
                getattr(module, name).zero_()
            for name in ("w2", "a2", "v2", "g2"):
                nn.init.orthogonal_(getattr(module, name), gain=0.1)
            module.k_k.fill_(0.85)
            module.k_a.fill_(1.0)
            module.r_k.fill_(-0.04)
            scale = C**-0.5
            for lin in (module.receptance, module.key):
                lin.weight.uniform_(-scale, scale)
            module.value.weight.uniform_(-0.5 * scale, 0.5 * scale)
            module.output.weight.zero_()
            module.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
            module.ln_x.bias.zero_()
        elif isinstance(module, Rwkv7ChannelMix):
            i = next(b.layer_idx for b in self.modules() if isinstance(b, Rwkv7Block) and b.ffn is module)
            ratio_1_to_almost0 = 1.0 - i / cfg.num_hidden_layers
            ddd = torch.arange(cfg.hidden_size, dtype=torch.float32) / cfg.hidden_size
            module.x_k.copy_((1.0 - ddd.pow(ratio_1_to_almost0**4)).view(1, 1, -1))
            scale = cfg.hidden_size**-0.5
            module.key.weight.uniform_(-scale, scale)
            module.value.weight.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.uniform_(-1e-4, 1e-4)
        elif isinstance(module, nn.Linear) and getattr(module, "_is_lm_head", False):
            module.weight.normal_(0.0, 0.5 * (cfg.vocab_size / cfg.hidden_size) ** 0.5 / cfg.vocab_size**0.5)


class Rwkv7Model(Rwkv7PreTrainedModel):
    """The RWKV-7 backbone: embedding, blocks, final LayerNorm."""

    def __init__(self, config: Rwkv7Config):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Rwkv7Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        # None: compile the blocks when training on CUDA; True/False: always/never
        # (compiled_blocks.py; the environment variable RWKV7_COMPILE overrides both).
        self.compile_blocks: bool | None = None
        # Recompute each feed-forward layer's [B, T, 4C] activation in the backward instead of keeping it
        # (training without gradient checkpointing; with it, whole blocks are recomputed anyway). None:
        # automatic: on for CUDA training of blocks that run eagerly (compiled blocks get the same from their
        # activation memory budget, compiled_blocks.py), True/False: always/never; RWKV7_RECOMPUTE_FFN=0/1
        # overrides. Cost: one more [C, 4C] matmul per block in the backward.
        self.recompute_ffn: bool | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.emb = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Rwkv7Cache | None = None,
        use_cache: bool | None = None,
        initial_state: Rwkv7State | list[torch.Tensor | None] | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Rwkv7Output | tuple:
        r"""
        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding. Padding (left or right)
                leaves the recurrent state untouched.
            cache: an :class:`Rwkv7Cache` to continue from and update (incremental decoding).
            use_cache: return the state after the last token in ``cache`` (a new cache if none was given).
            initial_state: the state to start from when ``cache`` holds none yet: an
                :class:`Rwkv7State` or a list of per-layer WKV tensors ``[B or 1, H, K, V]`` (fp32,
                flash-linear-attention layout). Gradients flow into it (state tuning).
        """
        cache = _take_cache(cache, kwargs)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        id_bounds = None  # the min and max of input_ids, when their check is read after the blocks
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape [batch, seq_len]; got {tuple(input_ids.shape)}")
            if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must be integer token ids (torch.long); got dtype {input_ids.dtype}")
            capturing = input_ids.is_cuda and torch.cuda.is_current_stream_capturing()  # no host syncs then
            if input_ids.numel() and not capturing:
                bounds = torch.stack(torch.aminmax(input_ids))
                if use_cache or cache is not None:
                    self._check_id_bounds(_IdBounds(bounds))  # up front: nothing may reach a cache from bad ids
                else:
                    id_bounds = _IdBounds(bounds)
                    # Read after the blocks are queued (below): a host sync here would leave the GPU idle
                    # while the host runs the embedding, Dynamo's guards and the first layers' launches
                    # (~1.9 ms of a 96 ms train step on an H200, benchmarks/train_step_gaps.py). Until then
                    # the embedding reads clamped ids, so a bad id cannot trip a device-side assert first.
                    input_ids = input_ids.clamp(0, self.config.vocab_size - 1)
            inputs_embeds = self.emb(input_ids)
        B, T, _ = inputs_embeds.shape
        if B == 0:
            raise ValueError("The batch is empty (0 rows); pass at least one sequence.")
        if T == 0:
            raise ValueError("The input has zero tokens; pass at least one token per row.")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must have shape {(B, T)}; got {tuple(attention_mask.shape)}")
            mask = attention_mask.bool()
            # One host sync, but cheaper than the masked path for an all-ones mask (H200 train step: ~1 ms vs
            # ~1.5-2 ms, benchmarks/results/train_step_kernels_h200.log).
            if bool(mask.all()):
                mask = None  # no padding: skip the masking work

        if use_cache and cache is None:
            cache = Rwkv7Cache(self.config.num_hidden_layers)
        start = cache.state if (cache is not None and cache.seen_tokens > 0) else None
        start = start or Rwkv7State.coerce(initial_state, self.config.num_hidden_layers)

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        with filling(cache if use_cache else None):
            x, all_hidden = self._run_blocks(inputs_embeds, start, mask, cache, use_cache, checkpointing, output_hidden_states)
        if id_bounds is not None:
            self._check_id_bounds(id_bounds)
        x = self.ln_out(x)
        if use_cache:
            cache.seen_tokens += T
        if not return_dict:
            return tuple(t for t in (x, cache if use_cache else None, all_hidden) if t is not None)
        return Rwkv7Output(last_hidden_state=x, cache=cache if use_cache else None, hidden_states=all_hidden)

    def _check_id_bounds(self, id_bounds: _IdBounds) -> None:
        """Raise if ``[min, max]`` of the input ids leaves the vocabulary (waits for their copy to the host)."""
        low, high = id_bounds.read()
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"input_ids contain ids outside [0, {self.config.vocab_size}): min {low}, max {high}. "
                "Check that the tokenizer matches the model."
            )

    def _run_blocks(self, x, start, mask, cache, use_cache, checkpointing, output_hidden_states):
        B = x.shape[0]
        v_first = None
        all_hidden = (x,) if output_hidden_states else None
        use_compiled = wants_compiled(self.compile_blocks, x)
        for i, block in enumerate(self.blocks):
            compile_this = use_compiled and (self.compile_blocks or not has_hooks(block))
            run = functools.partial(run_compiled, block) if compile_this else block
            recompute_ffn = not checkpointing and self._wants_ffn_recompute(x, compile_this)
            wkv0, att0, ffn0 = start.layer(i) if start is not None else (None, None, None)
            wkv0 = _fit_batch(wkv0, B)
            att0, ffn0 = _fit_batch(att0, B), _fit_batch(ffn0, B)
            if wkv0 is not None:
                wkv0 = wkv0.float()
            if checkpointing:
                x, v_first, wkv, att, ffn = self._gradient_checkpointing_func(
                    run, x, v_first, wkv0, att0, ffn0, mask, bool(use_cache)
                )
            else:
                x, v_first, wkv, att, ffn = run(x, v_first, wkv0, att0, ffn0, mask, bool(use_cache), recompute_ffn)
            if use_cache:
                cache.update(i, wkv, att, ffn)
            if output_hidden_states:
                all_hidden += (x,)
        return x, all_hidden

    def _wants_ffn_recompute(self, x: torch.Tensor, compiled: bool) -> bool:
        if not (self.training and torch.is_grad_enabled()):
            return False
        env = env_switch("RWKV7_RECOMPUTE_FFN")
        if env is not None:
            return env
        if self.recompute_ffn is not None:
            return bool(self.recompute_ffn)
        return x.is_cuda and not compiled


class Rwkv7ForCausalLM(Rwkv7PreTrainedModel, GenerationMixin):
    """RWKV-7 with its (untied) language-model head."""

    _tied_weights_keys = {}

    def __init__(self, config: Rwkv7Config):
        super().__init__(config)
        self.model = Rwkv7Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head._is_lm_head = True
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.emb = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Rwkv7Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        initial_state: Rwkv7State | list[torch.Tensor | None] | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> Rwkv7CausalLMOutput | tuple:
        r"""Arguments as :meth:`Rwkv7Model.forward`, plus ``labels`` (``[B, T]``, shifted inside,
        -100 ignored) and ``logits_to_keep`` (compute the logits of the last N positions only).

        One-token decoding steps with a cache on CUDA (``generate()``) replay a captured CUDA graph
        (see ``graph_decode.py``); the result is the same as the eager path."""
        cache = _take_cache(cache, kwargs)
        if return_dict is not False and can_use_graph(
            self, input_ids, cache, dict(kwargs, labels=labels, inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states)
        ):
            graph = self._decode_graph(cache, input_ids.shape[0])
            return Rwkv7CausalLMOutput(logits=graph.run(input_ids, cache), cache=cache)
        return self._eager_forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, cache=cache,
            labels=labels, use_cache=use_cache, initial_state=initial_state, output_hidden_states=output_hidden_states,
            return_dict=return_dict, logits_to_keep=logits_to_keep, **kwargs,
        )  # fmt: skip

    def _decode_graph(self, cache: Rwkv7Cache, batch: int) -> DecodeGraph:
        """The captured decoding step for this batch size; re-captured when the weights moved
        (``.to()`` allocates new tensors, and a graph replays fixed addresses)."""
        graphs = _DECODE_GRAPHS.setdefault(self, {})
        key = (batch, self.head.weight.data_ptr(), self.model.emb.weight.data_ptr(), self.head.weight.dtype)
        if key not in graphs:
            graphs.clear()
            graphs[key] = DecodeGraph(self, cache, batch)
        return graphs[key]

    def _eager_forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        cache=None,
        labels=None,
        use_cache=None,
        initial_state=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        **kwargs,
    ) -> Rwkv7CausalLMOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            initial_state=initial_state,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        if labels is not None and self.training and self.config.chunked_loss_in_training:
            # Training needs only the loss: skip the [B, T, vocab] logits (see chunked_causal_lm_loss).
            loss = chunked_causal_lm_loss(hidden, self.head, labels, kwargs.get("num_items_in_batch"))
            return Rwkv7CausalLMOutput(loss=loss, logits=None, cache=outputs.cache, hidden_states=outputs.hidden_states)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            out = (logits, outputs.cache, outputs.hidden_states)
            out = tuple(t for t in out if t is not None)
            return ((loss,) + out) if loss is not None else out
        return Rwkv7CausalLMOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)

    # ---- generation -------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Rwkv7Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        initial_state=None,
        use_cache: bool = True,
        next_sequence_length: int | None = None,
        is_first_iteration: bool = False,
        **kwargs,
    ) -> dict:
        """Feed only the tokens that the cache has not seen yet (the whole prompt at first).

        A decoding step (the cache holds the prompt, and generate() appended tokens since) feeds
        the last ``next_sequence_length`` tokens of ``input_ids`` (generate()'s own count: 1, more
        in assisted decoding). The count is not derived from ``cache.seen_tokens``: the cache also
        holds positions that were fed as ``inputs_embeds`` and are not in ``input_ids`` (a prompt
        given as embeddings; PEFT prompt tuning's virtual tokens), so slicing ``input_ids`` by it
        would drop the new tokens.
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        for unused in ("cache_position", "position_ids"):
            kwargs.pop(unused, None)
        seen = cache.seen_tokens if cache is not None else 0
        decoding = seen > 0 and not is_first_iteration
        model_inputs: dict = {"cache": cache, "use_cache": use_cache, "initial_state": initial_state}
        if decoding:
            model_inputs["input_ids"] = input_ids[:, -(next_sequence_length or 1) :]
            # PEFT's prompt-learning methods (PeftModelForCausalLM.prepare_inputs_for_generation)
            # look for the cache under this name only: without it they would take every step for
            # the first one and prepend the virtual tokens again. The forward accepts the alias.
            model_inputs["past_key_values"] = cache
            # No attention mask: generate() extends it with ones for every token it appends, so a
            # decoding step's mask is all ones (padding only matters in the prompt, and is already
            # in the state; the CUDA-graph step relies on this too). Passing it would also make
            # PEFT prepend num_virtual_tokens columns to it, a layout that fits attention models
            # (a mask over past + new tokens), not ours (a mask over the new tokens only).
            attention_mask = None
        elif inputs_embeds is not None and seen == 0:
            if input_ids.shape[1] and not use_cache:
                # No cache: each step recomputes everything, i.e. the prompt embeddings followed
                # by the tokens generated so far (generate()'s input_ids holds only those).
                inputs_embeds = torch.cat([inputs_embeds, self.get_input_embeddings()(input_ids)], dim=1)
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            # The prompt; when continuing from a cache that already holds its beginning, the rest.
            model_inputs["input_ids"] = input_ids[:, seen:] if seen else input_ids
        if attention_mask is not None:
            new_tokens = (model_inputs.get("input_ids", model_inputs.get("inputs_embeds"))).shape[1]
            model_inputs["attention_mask"] = attention_mask[:, -new_tokens:]
        model_inputs.update(kwargs)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["cache"] = outputs.cache
        model_kwargs.pop("past_key_values", None)
        return model_kwargs

    def _reorder_cache(self, cache: Rwkv7Cache | None, beam_idx: torch.LongTensor) -> Rwkv7Cache | None:
        if cache is not None:  # None when generating with use_cache=False
            cache.reorder_cache(beam_idx)
        return cache
