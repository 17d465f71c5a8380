"""Which base model an adapter belongs to: a cheap, dtype-independent fingerprint of the frozen base,
recorded in ``adapter_config.json`` on save and checked on load (docs/hardening.md)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch
from torch import nn

from .config import StateTuningConfig
from .model import find_rwkv7_backbone

FINGERPRINT_SCHEME = "rwkv7-fp1"  # bump when the recipe below changes; other schemes are not compared
ALLOW_OTHER_BASE_ENV = "RWKV7_STATE_TUNING_ALLOW_OTHER_BASE"
_FP16_MIN_NORMAL = 2.0**-14


def _canonical_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes that represent ``tensor`` in the fingerprint, the same whatever dtype the base was loaded in.

    Values are rounded to bf16 (round to nearest even, as ``from_pretrained(dtype=torch.bfloat16)`` does),
    so an fp32 load and a bf16 load of one checkpoint give the same bytes. Magnitudes below fp16's smallest
    normal number (2**-14) count as 0 (and -0.0 as +0.0), so an fp16 load of a bf16 or fp16 checkpoint
    (all released RWKV-7 weights are bf16) matches too: fp16 holds every other bf16 value exactly.
    (An fp16 load of a checkpoint stored in full fp32 rounds twice and may differ: see docs/hardening.md.)
    """
    t = tensor.detach().to("cpu", torch.float32).reshape(-1).to(torch.bfloat16)
    t = torch.where(t.abs() < _FP16_MIN_NORMAL, torch.zeros_like(t), t)
    return t.view(torch.int16).numpy().astype("<i2").tobytes()  # explicit little-endian: same on every host


def base_model_fingerprint(model: nn.Module) -> str | None:
    """A short, deterministic fingerprint of an RWKV-7 base model (``"rwkv7-fp1:<16 hex digits>"``).

    sha256 over the shape fields of the config and a few small, fixed tensors: the first 4 rows of the
    embedding and, for the first, middle and last layer, ``att.w0`` (decay bias), ``att.k_k``, ``att.r_k`` and
    ``ln1.weight``, plus ``ln_out.weight``. A few thousand values even for a 7B model, so it is cheap to
    compute on every save and load. These are all plain parameters, never ``nn.Linear`` weights, which
    quantizers (bitsandbytes, GPTQ...) replace; and the first embedding rows survive
    ``resize_token_embeddings`` (new tokens are appended). The layer tensors move in any fine-tune, so a
    fine-tune of the base counts as another base. Values are compared at bf16 precision
    (:func:`_canonical_bytes`): loading one checkpoint in fp32 or bf16 gives the same fingerprint.

    Returns ``None`` when the weights cannot be read here (meta tensors of an offloaded model, DeepSpeed
    ZeRO-3 partitions...): the fingerprint is then neither recorded nor checked.
    """
    backbone = find_rwkv7_backbone(model)
    cfg = backbone.config
    C, H, N, L = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.num_hidden_layers
    digest = hashlib.sha256(FINGERPRINT_SCHEME.encode())
    digest.update(json.dumps({"hidden_size": C, "num_heads": H, "head_dim": N, "num_hidden_layers": L}, sort_keys=True).encode())
    try:
        emb = backbone.get_input_embeddings().weight
        tensors = [("emb.weight[:4]", emb[:4], min(4, cfg.vocab_size) * C)]
        for i in sorted({0, L // 2, L - 1}):
            block = backbone.blocks[i]
            tensors += [
                (f"blocks.{i}.att.w0", block.att.w0, C),
                (f"blocks.{i}.att.k_k", block.att.k_k, C),
                (f"blocks.{i}.att.r_k", block.att.r_k, H * N),
                (f"blocks.{i}.ln1.weight", block.ln1.weight, C),
            ]
        tensors.append(("ln_out.weight", backbone.ln_out.weight, C))
        for name, tensor, numel in tensors:
            # Meta tensors (offloaded weights) and partitioned ones (ZeRO-3 keeps an empty placeholder) have no
            # values to hash here; a wrong fingerprint would be worse than none.
            if tensor.is_meta or tensor.numel() != numel:
                return None
            digest.update(name.encode())
            digest.update(_canonical_bytes(tensor))
    except (AttributeError, IndexError, NotImplementedError, RuntimeError, TypeError):
        return None  # an unusual wrapper around the weights: never block a save or a load over the fingerprint
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()[:16]}"


def _other_base_allowed() -> bool:
    return os.environ.get(ALLOW_OTHER_BASE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_base_fingerprint(config: StateTuningConfig, model: nn.Module, adapter_name: str) -> None:
    """Refuse to put an adapter onto a base other than the one it was saved with (see
    :func:`base_model_fingerprint`); adapters without a fingerprint are not checked."""
    stored = config.base_model_fingerprint
    if not stored:
        return  # saved before fingerprints existed, or never saved (get_peft_model, RWKV state-file imports)
    if not stored.startswith(FINGERPRINT_SCHEME + ":"):
        warnings.warn(
            f"The state-tuning adapter {adapter_name!r} records a base fingerprint of an unknown scheme ({stored!r}; "
            f"this version computes {FINGERPRINT_SCHEME!r}), probably from a newer peft-state-tuning: not checked."
        )
        return
    current = base_model_fingerprint(model)
    if current is None:
        warnings.warn(
            f"Cannot fingerprint this base model (its weights are offloaded or partitioned here), so it is not "
            f"checked that the state-tuning adapter {adapter_name!r} was trained on it."
        )
        return
    if current == stored:
        return
    here = getattr(find_rwkv7_backbone(model).config, "_name_or_path", "") or "unknown"
    message = (
        f"The state-tuning adapter {adapter_name!r} was trained on another base model: its adapter_config.json "
        f"records base fingerprint {stored} (base_model_name_or_path: {config.base_model_name_or_path!r}), but "
        f"this base ({here!r}) has fingerprint {current}. A tuned state is tied to the weights that read it: on "
        "another base, even one of the same shape or a fine-tune of it, it gives different, usually worse, "
        "output without any error. Load the adapter onto the base it was trained on."
    )
    if _other_base_allowed():
        warnings.warn(f"{message} Loading it anyway, because {ALLOW_OTHER_BASE_ENV} is set.")
        return
    raise ValueError(
        f"{message} To load it anyway (e.g. you re-trained or re-saved the base on purpose), set the environment "
        f"variable {ALLOW_OTHER_BASE_ENV}=1; saving the adapter afterwards records the new base."
    )
