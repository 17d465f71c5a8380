"""Model cards for ``push_to_hub``.

``PeftModel.push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: it saves the adapter
(PEFT writes a proper card: ``library_name: peft``, ``base_model``, tags) and then overwrites that
README with a generic transformers card (``library_name: transformers``). For state-tuning
adapters we keep PEFT's card: while such a model pushes, the card factory transformers calls
returns PEFT's card (merged with any card already on the Hub).
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import transformers.utils.hub as hf_hub_utils
from huggingface_hub import ModelCard
from peft import PeftModel

from .registration import STATE_TUNING


@contextlib.contextmanager
def _peft_model_card(peft_model: PeftModel):
    original = hf_hub_utils.create_and_tag_model_card

    def card_factory(repo_id: str, tags: list[str] | None = None, token: str | None = None) -> ModelCard:
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.create_or_update_model_card(tmp)
            card = ModelCard.load(Path(tmp) / "README.md")
        for tag in tags or []:
            if tag not in (card.data.tags or []):
                card.data.tags = [*(card.data.tags or []), tag]
        return card

    hf_hub_utils.create_and_tag_model_card = card_factory
    try:
        yield
    finally:
        hf_hub_utils.create_and_tag_model_card = original


def install() -> None:
    """Make ``PeftModel.push_to_hub`` keep PEFT's model card for state-tuning adapters (idempotent)."""
    if getattr(PeftModel.push_to_hub, "_state_tuning_card", False):
        return
    original_push = PeftModel.push_to_hub

    @functools.wraps(original_push)
    def push_to_hub(self, *args, **kwargs):
        if self.active_peft_config.peft_type != STATE_TUNING:
            return original_push(self, *args, **kwargs)
        with _peft_model_card(self):
            return original_push(self, *args, **kwargs)

    push_to_hub._state_tuning_card = True
    PeftModel.push_to_hub = push_to_hub
