"""The fine-tuning methods compared by the quality studies (``study_demo_task.py``, ``study_gpu.py``), in one
place so that both studies build them identically.

``wrap(base, method, ...)`` returns the model to train and a JSON-able description of its configuration.
Methods: ``state``, ``state_shift`` (token shifts tuned too), ``upscaled`` (``upscale_dim`` given), ``lora``
(r = 8 on the time mix's r/k/v/o), ``prompt`` (16 virtual tokens), ``full`` (every weight).
"""

from __future__ import annotations

LORA_TARGETS = r".*\.att\.(receptance|key|value|output)"


def wrap(base, method: str, upscale_dim: int | None = None, upscale_seed: int = 0):
    """``(model, config_repr)`` for ``method`` on ``base`` (which it modifies: load a fresh base per run)."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    from peft_state_tuning import StateTuningConfig

    if method in ("state", "state_shift", "upscaled"):
        cfg = StateTuningConfig(
            tune_token_shift=method == "state_shift",
            upscale_dim=upscale_dim if method == "upscaled" else None,
            upscale_seed=upscale_seed,
        )
        keys = ("tune_token_shift", "upscale_dim", "upscale_mode", "kernel", "kernel_gamma", "support_vectors")
        return get_peft_model(base, cfg), {k: getattr(cfg, k) for k in keys}
    if method == "lora":
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        return get_peft_model(base, cfg), {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": LORA_TARGETS}
    if method == "prompt":
        return get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)), {"num_virtual_tokens": 16}
    if method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base, {"all_weights": True}
    raise ValueError(f"unknown method {method!r}")
