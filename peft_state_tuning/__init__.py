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

register()

__all__ = ["STATE_TUNING", "StateTuningConfig", "StateTuningModel", "load_rwkv_state", "save_rwkv_state"]
