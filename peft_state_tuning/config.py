"""``StateTuningConfig``: the PEFT configuration of RWKV-7 state tuning."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from .registration import STATE_TUNING


@dataclass
class StateTuningConfig(PeftConfig):
    """Configuration of state tuning: only the initial recurrent state of an RWKV-7 is trained.

    Args:
        target_layers: indices of the layers whose initial WKV state is trained (default: all).
        init: how to initialise the trainable states:
            ``"zeros"`` (the base model's own start; the adapter then changes nothing until trained),
            ``"prompt"`` (the state the base model reaches after reading ``init_prompt``: a prompt
            distilled into a state), or ``"rwkv_state"`` (read ``init_state_file``, a state file of
            RWKV's own tools: ``blocks.{i}.att.time_state`` ``[H, N, N]``, official ``[V, K]`` layout).
        init_prompt: the text for ``init="prompt"``.
        init_state_file: the file for ``init="rwkv_state"`` (``.pth`` read with ``weights_only``,
            or ``.safetensors``).
        tune_token_shift: also train the two token-shift vectors of each targeted layer (the
            "previous token" seen by the first token of a text).
        num_layers, num_heads, head_dim, hidden_size: the base model's shape, filled in when the
            adapter is created, checked when it is loaded onto a base.
        state_initialized: bookkeeping; ``True`` in saved adapters, so that loading one does not
            re-run ``init`` (the saved states replace it anyway).
        base_model_fingerprint: a short hash of the frozen base the adapter was saved with (written by
            ``save_pretrained``, see ``peft_state_tuning.fingerprint.base_model_fingerprint``). Loading the adapter
            onto a base with another fingerprint raises a ``ValueError`` (set the environment variable
            ``RWKV7_STATE_TUNING_ALLOW_OTHER_BASE=1`` to load it anyway). ``None`` (adapters saved before
            this field existed): not checked.
    """

    target_layers: list[int] | None = field(default=None, metadata={"help": "layers to tune (default: all)"})
    init: Literal["zeros", "prompt", "rwkv_state"] = field(default="zeros", metadata={"help": "initialisation"})
    init_prompt: str | None = field(default=None, metadata={"help": "text for init='prompt'"})
    init_state_file: str | None = field(default=None, metadata={"help": "RWKV state file for init='rwkv_state'"})
    tune_token_shift: bool = field(default=False, metadata={"help": "also tune the token-shift states"})
    num_layers: int | None = field(default=None, metadata={"help": "filled in from the base model"})
    num_heads: int | None = field(default=None, metadata={"help": "filled in from the base model"})
    head_dim: int | None = field(default=None, metadata={"help": "filled in from the base model"})
    hidden_size: int | None = field(default=None, metadata={"help": "filled in from the base model"})
    state_initialized: bool = field(
        default=False, metadata={"help": "set once `init` ran; a saved adapter's weights then replace any init"}
    )
    # Which base the states were trained on (states are tied to the weights that read them). Optional with
    # default None, so adapter_config.json files written before this field existed still load (unchecked).
    base_model_fingerprint: str | None = field(
        default=None, metadata={"help": "hash of the base model the adapter was saved with; checked on load"}
    )
    # ---- kernel-method state upscaling (docs/methods.md; peft_state_tuning/upscaling.py) ----
    upscale_dim: int | None = field(default=None, metadata={"help": "M: train an upscaled [H, M, M] state per layer"})
    upscale_mode: Literal["recurrence", "projection"] = field(
        default="recurrence",
        metadata={"help": "'recurrence': an M-sized WKV-7 recurrence on kernel features; 'projection': S0 = Q S_up Q^T"},
    )
    kernel: Literal["gaussian", "linear"] = field(default="gaussian", metadata={"help": "kernel of the features"})
    kernel_gamma: float = field(default=1.0, metadata={"help": "gamma of exp(-gamma ||x - u||^2) (unit-norm inputs)"})
    support_vectors: Literal["random", "kmeans", "identity"] = field(
        default="random", metadata={"help": "'random' unit vectors, 'kmeans' of the base model's k, or 'identity' (M = N)"}
    )
    calibration_texts: list[str] | None = field(default=None, metadata={"help": "texts for support_vectors='kmeans'"})
    calibration_ids: list[list[int]] | None = field(default=None, metadata={"help": "token ids for 'kmeans'"})
    kmeans_iters: int = field(default=10, metadata={"help": "Lloyd iterations of the k-means"})
    upscale_ridge: float = field(default=1e-3, metadata={"help": "ridge of the back-projection Q = U^T (K_UU + ridge I)^-1"})
    upscale_seed: int = field(default=0, metadata={"help": "seed of the random support vectors / k-means init"})
    # ---- Decorrelated Backpropagation (peft_state_tuning/dbp.py) ----
    decorrelation: bool = field(
        default=False, metadata={"help": "the adapter carries DBP decorrelation matrices R (set by DecorrelatedOptimizer)"}
    )

    def __post_init__(self):
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"  # so get_peft_model returns a PeftModelForCausalLM
        super().__post_init__()
        self.peft_type = STATE_TUNING
        self._check_field_types()
        if self.init not in ("zeros", "prompt", "rwkv_state"):
            raise ValueError(f"StateTuningConfig.init must be 'zeros', 'prompt' or 'rwkv_state'; got {self.init!r}")
        if self.init == "prompt" and not self.init_prompt:
            raise ValueError("StateTuningConfig(init='prompt') needs `init_prompt`, the text to distil into the state")
        if self.init == "rwkv_state" and not self.init_state_file:
            raise ValueError("StateTuningConfig(init='rwkv_state') needs `init_state_file`")
        if self.upscale_dim is not None:
            from .upscaling import validate_upscale_config

            validate_upscale_config(self)
        if self.target_layers is not None:
            if isinstance(self.target_layers, int):
                self.target_layers = [self.target_layers]
            self.target_layers = sorted({int(i) for i in self.target_layers})

    def _check_field_types(self) -> None:
        """Wrong-typed fields (e.g. a hand-edited adapter_config.json) fail here, by name."""
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        rules = {
            "target_layers": (lambda v: v is None or is_int(v) or (isinstance(v, (list, tuple)) and all(map(is_int, v))),
                              "null or a list of layer indices, e.g. [0, 1, 2]"),
            "init": (lambda v: isinstance(v, str), "one of 'zeros', 'prompt', 'rwkv_state'"),
            "init_prompt": (lambda v: v is None or isinstance(v, str), "null or a string"),
            "init_state_file": (lambda v: v is None or isinstance(v, (str, os.PathLike)), "null or a file path"),
            "tune_token_shift": (lambda v: isinstance(v, bool), "true or false"),
            "state_initialized": (lambda v: isinstance(v, bool), "true or false"),
            "base_model_fingerprint": (lambda v: v is None or isinstance(v, str), "null or a string (written by save_pretrained)"),
            **{k: (lambda v: v is None or (is_int(v) and v > 0), "null or a positive integer")
               for k in ("num_layers", "num_heads", "head_dim", "hidden_size")},
        }  # fmt: skip
        for name, (ok, expected) in rules.items():
            value = getattr(self, name)
            if not ok(value):
                raise TypeError(
                    f"StateTuningConfig field `{name}` must be {expected}; got {value!r} ({type(value).__name__}). "
                    "If it comes from adapter_config.json, fix that value there (or re-save the adapter)."
                )

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Loading adapter_config.json: a field that looks like a misspelt one of ours is an error;
        other unknown fields (from a newer PEFT) are left to PEFT, which warns and drops them."""
        import dataclasses
        import difflib

        known = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            if key not in known and close:
                raise ValueError(
                    f"adapter_config.json has an unknown field {key!r}; did you mean {close[0]!r}? "
                    f"Rename it (fields of StateTuningConfig: {sorted(known)})."
                )
        return super().check_kwargs(**kwargs)

    @property
    def is_prompt_learning(self) -> bool:  # states are model-level parameters, not virtual tokens
        return False
