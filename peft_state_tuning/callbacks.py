"""Trainer callbacks for state tuning.

:class:`NanGuardCallback` stops a ``transformers.Trainer`` run as soon as the loss or a trained
state becomes NaN/Inf, puts back the last good states and says which step went bad::

    trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[NanGuardCallback()])
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)


class NanGuardCallback(TrainerCallback):
    """Stop training on a NaN/Inf loss or state, and restore the last good states.

    * Every forward in training mode is watched (a forward hook reads ``outputs.loss``), so the
      step whose loss went bad is known exactly, even though ``Trainer`` hides NaN losses from its
      logs (``logging_nan_inf_filter``). A NaN/Inf ``loss`` or ``grad_norm`` in the logs counts too.
    * After every optimizer step the trainable parameters (for state tuning: the states, a few
      hundred kB) are checked; a CPU copy of them is kept every ``every_n_steps`` steps (default:
      the run's ``logging_steps``), always only after they were checked to be finite.
    * On a bad step: the parameters are restored from that copy, the optimizer's moments of those
      parameters are cleared (they are NaN too), ``control.should_training_stop`` is set, and a
      warning names the bad step and the step restored. :attr:`bad_step`, :attr:`restored_step`
      and :attr:`reason` keep them for the caller; ``state.log_history`` gets an entry as well.

    Steps are numbered as ``Trainer`` numbers them (``state.global_step`` after the step: the first
    optimizer step is step 1; step 0 is the start of training).
    """

    def __init__(self, every_n_steps: int | None = None, check_states: bool = True):
        self.every_n_steps = every_n_steps
        self.check_states = check_states
        self.bad_step: int | None = None
        self.restored_step: int | None = None
        self.reason: str | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._snapshot_step = 0
        self._bad_loss: float | None = None
        self._hook = None
        self._model = None

    # ---- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _trainable(model) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def _take_snapshot(self, model, step: int) -> None:
        self._snapshot = {n: p.detach().to("cpu", copy=True) for n, p in self._trainable(model).items()}
        self._snapshot_step = step

    def _watch_loss(self, module, args, output) -> None:
        if not module.training or self._bad_loss is not None:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().flatten()[0])

    def _restore(self, model, optimizer) -> list[str]:
        params = self._trainable(model)
        restored = []
        with torch.no_grad():
            for name, saved in (self._snapshot or {}).items():
                if name in params:
                    params[name].copy_(saved.to(params[name].device))
                    restored.append(name)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        state = getattr(inner, "state", None)
        if state is not None:
            for p in params.values():
                state.pop(p, None)
        return restored

    def _stop(self, args, state, control, model, optimizer, step: int, reason: str):
        self.bad_step, self.reason = step, reason
        restored = self._restore(model, optimizer)
        self.restored_step = self._snapshot_step
        control.should_training_stop = True
        control.should_save = False
        message = (
            f"NanGuardCallback: step {step} went bad ({reason}). Training stopped; restored the {len(restored)} "
            f"trained tensors saved at step {self._snapshot_step}. Lower the learning rate, check the data of "
            f"step {step}, or set max_grad_norm."
        )
        logger.warning(message)
        state.log_history.append({"step": step, "nan_guard": message})
        return control

    # ---- Trainer events -------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.bad_step = self.restored_step = self.reason = None
        self._bad_loss = None
        if self.every_n_steps is None:
            steps = args.logging_steps
            self.every_n_steps = max(1, int(steps if steps >= 1 else math.ceil(steps * max(state.max_steps, 1))))
        if model is not None:
            self._model = model
            self._hook = model.register_forward_hook(self._watch_loss)
            self._take_snapshot(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        model = model if model is not None else self._model
        if model is None:
            return control
        step = state.global_step
        if self._bad_loss is not None:
            return self._stop(args, state, control, model, optimizer, step, f"loss = {self._bad_loss}")
        if self.check_states:
            bad = [n for n, p in self._trainable(model).items() if not bool(torch.isfinite(p.detach()).all())]
            if bad:
                return self._stop(args, state, control, model, optimizer, step, f"NaN/Inf in {bad[:3]}")
        if step % self.every_n_steps == 0:
            self._take_snapshot(model, step)
        return control

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        model = model if model is not None else self._model
        if model is None or self.bad_step is not None or not logs:
            return control
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return self._stop(args, state, control, model, optimizer, state.global_step, f"logged {key} = {value}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._model = None
        return control
