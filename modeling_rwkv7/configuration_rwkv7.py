"""Configuration of RWKV-7 ("Goose", x070) models."""

from __future__ import annotations

from transformers import PretrainedConfig


class Rwkv7Config(PretrainedConfig):
    r"""Configuration of an RWKV-7 (x070) model.

    The defaults describe the released 0.1B "world" model (L12-D768). Every size of the official
    models is described by the same fields; the four low-rank dimensions differ between sizes and
    are read from the checkpoint's shapes by the converter.

    Args:
        vocab_size: size of the vocabulary (65536 for the world tokenizer).
        hidden_size: model width C.
        num_hidden_layers: number of blocks L.
        head_dim: head size N (64 in every released model); ``num_heads = hidden_size // head_dim``.
        intermediate_size: width of the ReLU^2 feed-forward layer (4 * hidden_size in released models).
        decay_low_rank_dim, a_low_rank_dim, v_low_rank_dim, gate_low_rank_dim: the ranks of the
            decay (w), in-context learning rate (a), value-residual (v) and gate (g) LoRAs.
        norm_eps: LayerNorm epsilon (1e-5). The per-head GroupNorm of the time mix uses
            ``head_dim * norm_eps`` (= 64e-5), as the official code does.
        initializer_range: standard deviation used only when training from scratch.
        chunked_loss_in_training: in training mode with ``labels``, compute the loss chunk by chunk
            and return no logits (saves the largest activation; ``model.eval()`` returns logits).
    """

    model_type = "rwkv7"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 65536,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        head_dim: int = 64,
        intermediate_size: int | None = None,
        decay_low_rank_dim: int = 64,
        a_low_rank_dim: int = 64,
        v_low_rank_dim: int = 32,
        gate_low_rank_dim: int = 128,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        chunked_loss_in_training: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        kwargs.pop("num_attention_heads", None)  # derived, see below
        if hidden_size % head_dim != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of head_dim ({head_dim})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.head_dim = head_dim
        # Not used by the model (heads = hidden_size // head_dim); stored under the usual name because
        # generic tools read it, e.g. PEFT's prompt tuning sizes its virtual tokens from it.
        self.num_attention_heads = hidden_size // head_dim
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.decay_low_rank_dim = decay_low_rank_dim
        self.a_low_rank_dim = a_low_rank_dim
        self.v_low_rank_dim = v_low_rank_dim
        self.gate_low_rank_dim = gate_low_rank_dim
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.chunked_loss_in_training = chunked_loss_in_training
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim
