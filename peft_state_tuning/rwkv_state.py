"""State files of RWKV's own tools (RWKV-PEFT, RWKV-LM state tuning, pip ``rwkv`` runtimes).

They hold ``blocks.{i}.att.time_state`` of shape ``[H, N, N]`` per layer, in the official
``[V, K]`` layout: exactly the WKV part of pip ``rwkv``'s per-layer state. Our states are in the
``[K, V]`` layout of ``rwkv7_kernels.wkv7``, so both directions transpose the last two axes.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modeling_rwkv7.convert import atomic_write_file

_KEY = re.compile(r"blocks\.(\d+)\.att\.time_state")


def save_rwkv_state(wkv_by_layer: dict[int, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``{layer: [H, K, V]}`` states as an RWKV state file (``.pth``, or ``.safetensors``
    by extension), atomically."""
    tensors = {
        f"blocks.{i}.att.time_state": t.detach().float().cpu().transpose(-1, -2).contiguous()
        for i, t in sorted(wkv_by_layer.items())
    }
    path = Path(path)
    if path.suffix == ".safetensors":
        return atomic_write_file(path, lambda tmp: save_file(tensors, tmp))
    return atomic_write_file(path, lambda tmp: torch.save(tensors, tmp))


def load_rwkv_state(
    path: str | os.PathLike, num_heads: int | None = None, head_dim: int | None = None
) -> dict[int, torch.Tensor]:
    """Read an RWKV state file into ``{layer: [H, K, V]}`` fp32 (our layout). Never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RWKV state file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            raw = load_file(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"could not read the RWKV state file {path} ({type(err).__name__}: {err}). Expected a weights-only "
            ".pth or a .safetensors file holding blocks.{{i}}.att.time_state tensors."
        ) from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a dict of tensors")
    out = {}
    for key, tensor in raw.items():
        m = _KEY.fullmatch(key)
        if not m:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[1] != tensor.shape[2]:
            raise ValueError(f"{path}: {key} must be a [H, N, N] tensor; got {getattr(tensor, 'shape', type(tensor))}")
        if num_heads is not None and tuple(tensor.shape) != (num_heads, head_dim, head_dim):
            raise ValueError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but the model's states are "
                f"[{num_heads}, {head_dim}, {head_dim}]; the file was made for another model size"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {key} contains NaN or Inf values")
        out[int(m.group(1))] = tensor.float().transpose(-1, -2).contiguous()
    if not out:
        raise ValueError(f"{path} holds no blocks.{{i}}.att.time_state tensor: not an RWKV state file")
    return out
