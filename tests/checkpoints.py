"""Small random RWKV-7 checkpoints in the real formats, and pip ``rwkv`` as the oracle."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def random_official_state_dict(
    vocab: int = 512,
    hidden: int = 128,
    layers: int = 2,
    head_dim: int = 64,
    ranks: tuple[int, int, int, int] = (32, 32, 16, 32),
    ffn: int | None = None,
    layer0_v: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """An official x070 state dict with random weights at realistic scales (so every term of the
    forward pass matters: none of the zero inits of training from scratch)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    C, H, N = hidden, hidden // head_dim, head_dim
    Dw, Da, Dv, Dg = ranks
    F = ffn or 4 * C
    sd = {"emb.weight": randn(vocab, C), "blocks.0.ln0.weight": 1 + 0.1 * randn(C), "blocks.0.ln0.bias": 0.1 * randn(C)}
    for i in range(layers):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = 1 + 0.1 * randn(C)
            sd[p + ln + ".bias"] = 0.1 * randn(C)
        for c in "rwkvag":
            sd[p + f"att.x_{c}"] = rand(1, 1, C)
        sd[p + "att.w0"] = randn(1, 1, C) - 1.0
        sd[p + "att.w1"] = 0.1 * randn(C, Dw)
        sd[p + "att.w2"] = 0.1 * randn(Dw, C)
        sd[p + "att.a0"] = 0.5 * randn(1, 1, C)
        sd[p + "att.a1"] = 0.1 * randn(C, Da)
        sd[p + "att.a2"] = 0.1 * randn(Da, C)
        if i > 0 or layer0_v:
            sd[p + "att.v0"] = 0.5 * randn(1, 1, C)
            sd[p + "att.v1"] = 0.1 * randn(C, Dv)
            sd[p + "att.v2"] = 0.1 * randn(Dv, C)
        sd[p + "att.g1"] = 0.1 * randn(C, Dg)
        sd[p + "att.g2"] = 0.1 * randn(Dg, C)
        sd[p + "att.k_k"] = 0.85 + 0.1 * randn(1, 1, C)
        sd[p + "att.k_a"] = 1 + 0.1 * randn(1, 1, C)
        sd[p + "att.r_k"] = 0.1 * randn(H, N)
        for name in ("receptance", "key", "value", "output"):
            sd[p + f"att.{name}.weight"] = randn(C, C) / C**0.5
        sd[p + "att.ln_x.weight"] = 1 + 0.1 * randn(C)
        sd[p + "att.ln_x.bias"] = 0.1 * randn(C)
        sd[p + "ffn.x_k"] = rand(1, 1, C)
        sd[p + "ffn.key.weight"] = randn(F, C) / C**0.5
        sd[p + "ffn.value.weight"] = randn(C, F) / F**0.5
    sd["ln_out.weight"] = 1 + 0.1 * randn(C)
    sd["ln_out.bias"] = 0.1 * randn(C)
    sd["head.weight"] = randn(vocab, C) / C**0.5
    return {k: v.to(dtype) for k, v in sd.items()}


def write_official_checkpoint(path: str | os.PathLike, **kwargs) -> Path:
    path = Path(path)
    torch.save(random_official_state_dict(**kwargs), path)
    return path


def official_model(pth_path: str | os.PathLike):
    """pip ``rwkv``'s reference x070 model on the CPU in fp32 (the oracle)."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "0")
    from rwkv.model import RWKV

    return RWKV(model=str(pth_path).removesuffix(".pth"), strategy="cpu fp32")


def make_base_folder(tmp_dir: str | os.PathLike, **kwargs) -> Path:
    """A random official checkpoint (``random_official_state_dict(**kwargs)``) converted into an HF
    folder without tokenizer files: the small base model of the PEFT tests."""
    from modeling_rwkv7 import convert_rwkv_checkpoint

    pth = write_official_checkpoint(Path(tmp_dir) / "model.pth", **kwargs)
    return convert_rwkv_checkpoint(pth, Path(tmp_dir) / "hf", with_tokenizer=False)


def random_hf_model(**kwargs):
    """A random official checkpoint (``random_official_state_dict(**kwargs)``) as an in-memory
    ``Rwkv7ForCausalLM`` in fp32 (no files)."""
    from modeling_rwkv7 import Rwkv7ForCausalLM
    from modeling_rwkv7.convert import config_from_official, official_to_hf

    sd = random_official_state_dict(**kwargs)
    cfg = config_from_official(sd)
    model = Rwkv7ForCausalLM(cfg)
    model.load_state_dict(official_to_hf(sd, cfg))
    return model


def load_base(folder: str | os.PathLike):
    """The base model of ``folder`` in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def random_ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Token ids in [1, vocab) (no end-of-text), reproducible."""
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_rows_match_alone(model, x: torch.Tensor, names: list[str]) -> None:
    """A PEFT model's logits for a batch with ``adapter_names=names`` equal, row by row, those of each
    row run alone with its adapter active (``"__base__"``: adapters disabled). Leaves the last
    named adapter active."""
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(x[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(x[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)
