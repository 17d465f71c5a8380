"""State tuning for RWKV-7 as a PEFT method.

``import peft_state_tuning`` registers ``PeftType.STATE_TUNING`` with PEFT (and ``rwkv7`` with the
transformers Auto classes), so that::

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), StateTuningConfig())
    PeftModel.from_pretrained(base, adapter_dir)            # in a fresh process, after the import
    AutoPeftModelForCausalLM.from_pretrained(adapter_dir)

all work. Only the initial WKV state of each layer trains; every weight stays frozen.
"""

import modeling_rwkv7  # noqa: F401  (registers the model with the Auto classes)

from .config import StateTuningConfig
from .model import StateTuningModel
from .registration import STATE_TUNING, register
from .rwkv_state import load_rwkv_state, save_rwkv_state
from .callbacks import NanGuardCallback
from .long_sequence import chunked_loss_backward, chunked_prefill
from .safe_save import AdapterFormatError
from .dbp import DecorrelatedOptimizer
from .observer import ObserverCallback
from .test_time import test_time_tune

register()

__all__ = [
    "STATE_TUNING", "AdapterFormatError", "LongSequenceTrainer", "NanGuardCallback", "StateTuningConfig", "StateTuningModel",
    "chunked_loss_backward", "chunked_prefill", "load_rwkv_state", "save_rwkv_state",
    "DecorrelatedOptimizer", "ObserverCallback", "test_time_tune",
]  # fmt: skip


def __getattr__(name):  # LongSequenceTrainer subclasses transformers.Trainer: imported when first used
    if name == "LongSequenceTrainer":
        from .long_sequence import LongSequenceTrainer

        return LongSequenceTrainer
    raise AttributeError(f"module 'peft_state_tuning' has no attribute {name!r}")
