"""Checkpoint conversion: official BlinkDL x070 ``.pth`` and flash-linear-attention hub folders.

* :func:`convert_rwkv_checkpoint` turns an official ``.pth`` (any size; the LoRA ranks are read
  from the shapes) into a Hugging Face folder: ``model.safetensors``, ``config.json`` and the world
  tokenizer's files. Command line: ``python -m modeling_rwkv7.convert X.pth OUT_DIR``.
* :func:`official_to_hf` / :func:`hf_to_official` and :func:`fla_to_hf` / :func:`hf_to_fla` map
  state dicts between the three namings. ``Rwkv7ForCausalLM.from_pretrained`` uses
  :func:`load_fla_folder` to read fla-hub folders directly.

Loading never runs pickled code: ``.pth`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .configuration_rwkv7 import Rwkv7Config

# ---- official naming <-> ours -----------------------------------------------------------------

_OFFICIAL_LAYER_KEYS = {
    "ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    "att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g",
    "att.w0", "att.w1", "att.w2", "att.a0", "att.a1", "att.a2", "att.v0", "att.v1", "att.v2",
    "att.g1", "att.g2", "att.k_k", "att.k_a", "att.r_k",
    "att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
    "att.ln_x.weight", "att.ln_x.bias", "ffn.x_k", "ffn.key.weight", "ffn.value.weight",
}  # fmt: skip
_OFFICIAL_TOP_KEYS = {"emb.weight", "ln_out.weight", "ln_out.bias", "head.weight"}


class CheckpointFormatError(ValueError):
    """The file is not an RWKV-7 (x070) checkpoint in the expected format."""


def _check_official_keys(state_dict: dict) -> None:
    unknown = []
    for key in state_dict:
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m:
            if m.group(2) not in _OFFICIAL_LAYER_KEYS:
                unknown.append(key)
        elif key not in _OFFICIAL_TOP_KEYS:
            unknown.append(key)
    if unknown:
        raise CheckpointFormatError(
            f"unexpected keys for a plain RWKV-7 x070 checkpoint: {unknown[:6]}{' ...' if len(unknown) > 6 else ''}. "
            "Variants such as rwkv7a (DeepEmbed) or rwkv7b (DEA) are not supported."
        )
    missing = [k for k in ("emb.weight", "head.weight", "blocks.0.att.r_k") if k not in state_dict]
    if missing:
        raise CheckpointFormatError(f"not an RWKV-7 x070 checkpoint: missing {missing}")


def config_from_official(state_dict: dict, **overrides) -> Rwkv7Config:
    """Read the architecture off the tensor shapes, as pip ``rwkv`` does."""
    _check_official_keys(state_dict)
    vocab_size, hidden = state_dict["emb.weight"].shape
    num_heads, head_dim = state_dict["blocks.0.att.r_k"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    # Layer 0 may lack v1 (it never uses it); take the value-residual rank from layer 1.
    v1 = state_dict.get("blocks.1.att.v1", state_dict.get("blocks.0.att.v1"))
    config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        head_dim=head_dim,
        intermediate_size=state_dict["blocks.0.ffn.key.weight"].shape[0],
        decay_low_rank_dim=state_dict["blocks.0.att.w1"].shape[1],
        a_low_rank_dim=state_dict["blocks.0.att.a1"].shape[1],
        v_low_rank_dim=v1.shape[1] if v1 is not None else 32,
        gate_low_rank_dim=state_dict["blocks.0.att.g1"].shape[1],
        architectures=["Rwkv7ForCausalLM"],
    )
    config.update(overrides)
    return Rwkv7Config(**config)


def official_to_hf(state_dict: dict, config: Rwkv7Config) -> dict:
    """Official keys -> ``Rwkv7ForCausalLM`` keys (a prefix rename; layer 0's unused v0/v1/v2
    are filled with zeros when absent)."""
    _check_official_keys(state_dict)
    out = {}
    for key, tensor in state_dict.items():
        out[key if key == "head.weight" else f"model.{key}"] = tensor
    C, dtype = config.hidden_size, state_dict["emb.weight"].dtype
    for name, shape in (("v0", (1, 1, C)), ("v1", (C, config.v_low_rank_dim)), ("v2", (config.v_low_rank_dim, C))):
        out.setdefault(f"model.blocks.0.att.{name}", torch.zeros(shape, dtype=dtype))
    return out


def hf_to_official(state_dict: dict) -> dict:
    return {(k if k == "head.weight" else k.removeprefix("model.")): v for k, v in state_dict.items()}


# ---- flash-linear-attention naming <-> ours ---------------------------------------------------

# (fla suffix inside model.layers.{i}., our suffix inside model.blocks.{i}., how to transform)
_FLA_LAYER_MAP = [
    ("pre_norm.weight", "ln0.weight", None), ("pre_norm.bias", "ln0.bias", None),
    ("attn_norm.weight", "ln1.weight", None), ("attn_norm.bias", "ln1.bias", None),
    ("ffn_norm.weight", "ln2.weight", None), ("ffn_norm.bias", "ln2.bias", None),
    *[(f"attn.x_{c}", f"att.x_{c}", "vec") for c in "rwkvag"],
    ("attn.k_k", "att.k_k", "vec"), ("attn.k_a", "att.k_a", "vec"), ("attn.r_k", "att.r_k", None),
    *[(f"attn.{n}_lora.lora.0.weight", f"att.{n}1", "t") for n in "wavg"],
    *[(f"attn.{n}_lora.lora.2.weight", f"att.{n}2", "t") for n in "wavg"],
    *[(f"attn.{n}_lora.lora.2.bias", f"att.{n}0", "vec") for n in "wav"],
    ("attn.r_proj.weight", "att.receptance.weight", None), ("attn.k_proj.weight", "att.key.weight", None),
    ("attn.v_proj.weight", "att.value.weight", None), ("attn.o_proj.weight", "att.output.weight", None),
    ("attn.g_norm.weight", "att.ln_x.weight", None), ("attn.g_norm.bias", "att.ln_x.bias", None),
    ("ffn.x_k", "ffn.x_k", "vec"), ("ffn.key.weight", "ffn.key.weight", None), ("ffn.value.weight", "ffn.value.weight", None),
]  # fmt: skip
_FLA_TOP_MAP = [
    ("model.embeddings.weight", "model.emb.weight"),
    ("model.norm.weight", "model.ln_out.weight"),
    ("model.norm.bias", "model.ln_out.bias"),
    ("lm_head.weight", "head.weight"),
]


def fla_to_hf(state_dict: dict, config: Rwkv7Config) -> dict:
    """fla-hub ``RWKV7ForCausalLM`` keys -> ours (LoRA factors transposed, vectors reshaped)."""
    out, used = {}, set()
    for fla_key, our_key in _FLA_TOP_MAP:
        if fla_key in state_dict:
            out[our_key] = state_dict[fla_key]
            used.add(fla_key)
    C = config.hidden_size
    for i in range(config.num_hidden_layers):
        for fla_suffix, our_suffix, how in _FLA_LAYER_MAP:
            key = f"model.layers.{i}.{fla_suffix}"
            if key not in state_dict:
                continue
            t = state_dict[key]
            t = t.t().contiguous() if how == "t" else t.reshape(1, 1, C) if how == "vec" else t
            out[f"model.blocks.{i}.{our_suffix}"] = t
            used.add(key)
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise CheckpointFormatError(f"unexpected keys in the fla checkpoint: {unknown[:6]}")
    dtype = state_dict["model.embeddings.weight"].dtype
    for name, shape in (("v0", (1, 1, C)), ("v1", (C, config.v_low_rank_dim)), ("v2", (config.v_low_rank_dim, C))):
        out.setdefault(f"model.blocks.0.att.{name}", torch.zeros(shape, dtype=dtype))
    return out


def hf_to_fla(state_dict: dict, config: Rwkv7Config) -> dict:
    """Ours -> fla-hub keys (the inverse of :func:`fla_to_hf`; layer 0's unused v LoRA is dropped, as fla does)."""
    out = {fla: state_dict[ours] for fla, ours in _FLA_TOP_MAP if ours in state_dict}
    for i in range(config.num_hidden_layers):
        for fla_suffix, our_suffix, how in _FLA_LAYER_MAP:
            key = f"model.blocks.{i}.{our_suffix}"
            if key not in state_dict or (i == 0 and fla_suffix.startswith("attn.v_lora")):
                continue
            t = state_dict[key]
            if how == "t":
                t = t.t().contiguous()
            elif how == "vec" and not fla_suffix.startswith("attn.x_"):
                t = t.reshape(-1)  # fla keeps only the six lerp vectors as [1, 1, C]
            out[f"model.layers.{i}.{fla_suffix}"] = t
    return out


def fla_config_to_ours(fla_config: dict) -> Rwkv7Config:
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "intermediate_size",
              "decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim", "norm_eps")  # fmt: skip
    kwargs = {k: fla_config[k] for k in fields if fla_config.get(k) is not None}
    # fla's default bos/eos ids (1, 2) are the bytes \x00 and \x01 in the world vocabulary: use 0.
    return Rwkv7Config(**kwargs, architectures=["Rwkv7ForCausalLM"])


def is_fla_folder(path: str | os.PathLike) -> bool:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    config = json.loads(config_path.read_text())
    return config.get("model_type") == "rwkv7" and "RWKV7ForCausalLM" in (config.get("architectures") or [])


def load_fla_folder(path: str | os.PathLike) -> tuple[Rwkv7Config, dict]:
    """Read an fla-hub RWKV-7 folder (``config.json`` + safetensors shards) into our naming."""
    path = Path(path)
    config = fla_config_to_ours(json.loads((path / "config.json").read_text()))
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointFormatError(
            f"{path} has no *.safetensors file. Convert .bin checkpoints to safetensors first; "
            "pickled weights are not loaded."
        )
    state_dict = {}
    for shard in shards:
        state_dict.update(load_file(shard))
    return config, fla_to_hf(state_dict, config)


# ---- files -------------------------------------------------------------------------------------


def load_official_checkpoint(pth_path: str | os.PathLike) -> dict:
    """``torch.load`` with ``weights_only=True``: a file that needs pickled code is refused."""
    try:
        state_dict = torch.load(pth_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - re-raised with what to do
        # torch's own message ends with advice to retry with weights_only=False: that is exactly
        # what must not be done with an untrusted file, so quote only the line that names the cause.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise CheckpointFormatError(
            f"could not load {pth_path} as a weights-only PyTorch checkpoint ({type(err).__name__}: {cause}). "
            "Only plain tensor state dicts are accepted; files that need pickled code are refused."
        ) from err
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointFormatError(f"{pth_path} is not a state dict of tensors")
    return state_dict


def atomic_write_file(path: str | os.PathLike, write) -> Path:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, then ``os.replace`` it into
    place: readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_save_folder(out_dir: str | os.PathLike, write) -> Path:
    """Run ``write(tmp_dir)`` into a temporary folder next to ``out_dir``, then move each file
    into place with ``os.replace``: a crash midway leaves the previous files intact."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir))
    try:
        write(tmp)
        for item in tmp.iterdir():
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def convert_rwkv_checkpoint(
    pth_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
) -> Path:
    """Convert an official BlinkDL RWKV-7 x070 ``.pth`` into a Hugging Face folder.

    Args:
        pth_path: the official checkpoint (e.g. ``RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth``).
        out_dir: the folder to write (``model.safetensors``, ``config.json``, tokenizer files).
        dtype: convert the weights to this dtype (default: keep the checkpoint's, bf16 for releases).
        with_tokenizer: also write the world tokenizer's files (for world-vocabulary models).
    """
    official = load_official_checkpoint(pth_path)
    config = config_from_official(official)
    state_dict = official_to_hf(official, config)
    state_dict = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state_dict.items()}
    config.dtype = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")

    def write(tmp: Path) -> None:
        save_file(state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if with_tokenizer and config.vocab_size == 65536:
            from .tokenization_rwkv7 import get_world_tokenizer

            get_world_tokenizer().save_pretrained(tmp)

    return atomic_save_folder(out_dir, write)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_rwkv7.convert",
        description="Convert an official RWKV-7 x070 .pth checkpoint into a Hugging Face folder.",
    )
    parser.add_argument("pth", help="the official .pth checkpoint")
    parser.add_argument("out_dir", help="the output folder")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--no-tokenizer", action="store_true", help="do not write the world tokenizer files")
    args = parser.parse_args(argv)
    out = convert_rwkv_checkpoint(
        args.pth, args.out_dir, dtype=getattr(torch, args.dtype) if args.dtype else None, with_tokenizer=not args.no_tokenizer
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
