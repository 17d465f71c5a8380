"""``StateTuningConfig``: the PEFT configuration of RWKV-7 state tuning."""

from __future__ import annotations

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

    def __post_init__(self):
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"  # so get_peft_model returns a PeftModelForCausalLM
        super().__post_init__()
        self.peft_type = STATE_TUNING
        if self.init not in ("zeros", "prompt", "rwkv_state"):
            raise ValueError(f"StateTuningConfig.init must be 'zeros', 'prompt' or 'rwkv_state'; got {self.init!r}")
        if self.init == "prompt" and not self.init_prompt:
            raise ValueError("StateTuningConfig(init='prompt') needs `init_prompt`, the text to distil into the state")
        if self.init == "rwkv_state" and not self.init_state_file:
            raise ValueError("StateTuningConfig(init='rwkv_state') needs `init_state_file`")
        if self.target_layers is not None:
            if isinstance(self.target_layers, int):
                self.target_layers = [self.target_layers]
            self.target_layers = sorted({int(i) for i in self.target_layers})

    @property
    def is_prompt_learning(self) -> bool:  # states are model-level parameters, not virtual tokens
        return False
