"""Registering ``STATE_TUNING`` with PEFT.

PEFT's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` only accepts names that
are already members. We add one member, ``PeftType.STATE_TUNING = "STATE_TUNING"``, the way the
enum machinery itself stores members, then register our config and tuner through PEFT's public
``register_peft_method``. After ``import peft_state_tuning``, ``PeftConfig.from_pretrained``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` all resolve adapters of this type.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

NAME = "STATE_TUNING"


def _add_peft_type_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


STATE_TUNING = _add_peft_type_member(NAME)


def register() -> None:
    """Register the config and tuner classes with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import StateTuningConfig
    from .model import StateTuningModel

    from .hub import install as install_model_card
    from .safe_save import install as install_safe_files

    if STATE_TUNING not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=NAME.lower(), config_cls=StateTuningConfig, model_cls=StateTuningModel, prefix="state_tuning")
    install_model_card()
    install_safe_files()  # atomic save_pretrained, checked load_adapter (state-tuning adapters only)
