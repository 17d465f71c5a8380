"""The observer (docs/methods.md, section 3): distillation of a larger observer model into the state, and
monitoring of the state during training.

``ObserverCallback(observer_model, alpha=..., temperature=...)`` is a stock ``TrainerCallback``. A
callback cannot change the loss, so at ``on_train_begin`` it installs a forward pre-hook and hook on
the trained ``PeftModel``: during training forwards the pre-hook takes the ``labels`` out (so the model
returns logits), and the hook sets ``outputs.loss = CE + alpha * T^2 * KL(p_obs^T || p_student^T)``,
where the observer reads the same ``input_ids`` under ``no_grad``. Works with the stock ``Trainer``
(no subclass, no ``compute_loss_func``, which never sees the inputs).

Monitoring: per targeted layer, the state's norm, effective rank, the mean |off-diagonal correlation|
of the vectors that read it, and its gradient norm are added to the Trainer's logs (every
``log_every`` steps, at logging steps) and to ``state.log_history``; optional PNG plots at the end.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from .dbp import StateInputStats, _tuner_of, offdiag_correlation


def distillation_kl(student_logits: torch.Tensor, observer_logits: torch.Tensor, valid: torch.Tensor | None,
                    temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Mean over valid positions of ``KL(softmax(obs/T) || softmax(student/T))`` (next-token
    distributions; vocabularies are cut to the shorter one: a shared tokenizer, padded heads)."""
    V = min(student_logits.shape[-1], observer_logits.shape[-1])
    log_q = F.log_softmax(student_logits[..., :V].float() / temperature, dim=-1)
    log_p = F.log_softmax(observer_logits[..., :V].float().to(log_q.device) / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if valid is None:
        return kl.mean()
    valid = valid.to(kl.device)
    return (kl * valid).sum() / valid.sum().clamp_min(1)


def effective_rank(S: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalised singular values), averaged over heads (``S`` ``[H, D, D]``)."""
    s = torch.linalg.svdvals(S.float())
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return torch.where(s.sum(-1) > 0, ent.exp(), torch.zeros_like(ent)).mean()


def _trainable_state(states, layer: int) -> torch.Tensor | None:
    if states.upscale is not None:
        return states.wkv_up[str(layer)] if str(layer) in states.wkv_up else None
    return states.wkv[str(layer)] if str(layer) in states.wkv else None


class DistillationHook:
    """The loss side of the observer, as hooks on a PeftModel (see module docstring)."""

    def __init__(self, model, observer, alpha: float, temperature: float):
        self.model, self.observer, self.alpha, self.temperature = model, observer, float(alpha), float(temperature)
        self._inside = False
        self._pending = None
        self.last_kl: float | None = None
        self.last_ce: float | None = None
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def active(self, module) -> bool:
        return self.observer is not None and self.alpha != 0 and module.training and not self._inside

    def _pre(self, module, args, kwargs):
        if not self.active(module) or kwargs.get("labels") is None:
            self._pending = None
            return None
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending = (labels, input_ids, kwargs.get("attention_mask"), kwargs.get("num_items_in_batch"))
        return args, kwargs

    def _post(self, module, args, kwargs, output):
        if self._pending is None:
            return output
        labels, input_ids, attention_mask, num_items = self._pending
        self._pending = None
        logits = output.logits
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="sum")
        count = num_items if num_items is not None else (shifted != -100).sum()
        ce = ce / (count.to(ce.device) if isinstance(count, torch.Tensor) else count)
        self._inside = True
        try:
            with torch.no_grad():
                obs_device = next(self.observer.parameters()).device
                obs_logits = self.observer(
                    input_ids=input_ids.to(obs_device),
                    attention_mask=None if attention_mask is None else attention_mask.to(obs_device),
                ).logits
        finally:
            self._inside = False
        kl = distillation_kl(logits, obs_logits, shifted != -100, self.temperature)
        self.last_kl, self.last_ce = float(kl.detach()), float(ce.detach())
        output["loss"] = ce + self.alpha * self.temperature**2 * kl  # item assignment: also a dict key
        return output

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class ObserverCallback(TrainerCallback):
    """The paper's observer for ``Trainer``: distillation of ``observer_model`` into the state (weight
    ``alpha``; ``None`` or ``alpha=0`` for monitoring only) and per-layer state statistics in the logs.

    Args:
        observer_model: any causal LM sharing the tokenizer (``None``: monitoring only). Put it on the
            device you want; it runs under ``no_grad`` in eval mode.
        alpha: weight of the distillation term ``alpha * T^2 * KL``.
        temperature: T of the softened distributions.
        log_every: add the state statistics to the logs at logging steps that are multiples of this.
        plot_dir: if given, ``state_statistics.png`` is written there at the end of training.
        adapter_name: the adapter to monitor (default: the active one).
    """

    def __init__(self, observer_model=None, alpha: float = 0.5, temperature: float = 1.0, log_every: int = 1,
                 plot_dir: str | None = None, adapter_name: str | None = None):  # fmt: skip
        self.observer, self.alpha, self.temperature = observer_model, alpha, temperature
        self.log_every, self.plot_dir, self.adapter_name = max(1, int(log_every)), plot_dir, adapter_name
        self.hook: DistillationHook | None = None
        self.inputs: StateInputStats | None = None
        self._grad_norms: dict[int, float] = {}
        self.history: list[dict] = []
        self._model = None

    # ---- attaching ----
    def attach(self, model) -> None:
        self.detach()
        self._model = model
        if self.observer is not None and self.observer is not model:
            self.observer.eval()
        self.hook = DistillationHook(model, self.observer, self.alpha, self.temperature)
        self.inputs = StateInputStats(model, self.adapter_name)

    def detach(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        if self.inputs is not None:
            self.inputs.remove()
        self.hook = self.inputs = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()
        if self.plot_dir and self.history:
            self.plot(self.plot_dir)

    # ---- monitoring ----
    def _states(self):
        tuner = _tuner_of(self._model)
        name = self.adapter_name or next(n for n in tuner.active_adapters if n in tuner.adapter_states)
        return tuner.adapter_states[name]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._model is None:
            return
        states = self._states()
        for i in states.layers:
            S = _trainable_state(states, i)
            if S is not None and S.grad is not None:
                self._grad_norms[i] = float(S.grad.detach().norm())

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """``state/L{i}/norm``, ``/erank``, ``/input_corr``, ``/grad_norm`` per targeted layer, and
        ``observer/kl`` / ``observer/ce`` of the last training forward."""
        states = self._states()
        moments = self.inputs.pop() if self.inputs is not None else {}
        moments = self._last_moments = moments or getattr(self, "_last_moments", {})  # no forward since: the last ones
        out = {}
        for i in states.layers:
            S = _trainable_state(states, i)
            if S is None:
                continue
            S_eff = states.effective_up(i) if states.upscale is not None else states.effective_wkv(i)
            out[f"state/L{i}/norm"] = float(S_eff.norm())
            out[f"state/L{i}/erank"] = float(effective_rank(S_eff))
            if i in moments:
                C = moments[i]
                if states.decor is not None:
                    R = states.decor.get(i)
                    C = R @ C @ R.transpose(-1, -2)
                out[f"state/L{i}/input_corr"] = float(offdiag_correlation(C))
            if i in self._grad_norms:
                out[f"state/L{i}/grad_norm"] = self._grad_norms[i]
        if self.hook is not None and self.hook.last_kl is not None:
            out["observer/kl"] = self.hook.last_kl
            out["observer/ce"] = self.hook.last_ce
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._model is None or state.global_step % self.log_every:
            return
        stats = self.statistics()
        stats = {k: v for k, v in stats.items() if math.isfinite(v)}
        if logs is not None:
            logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
        self.history.append({"step": state.global_step, **stats})

    def plot(self, directory: str) -> str | None:
        """Write ``state_statistics.png`` (one panel per statistic, one line per layer)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plots are optional
            return None
        os.makedirs(directory, exist_ok=True)
        kinds = ["norm", "erank", "input_corr", "grad_norm"]
        fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.2))
        keys = sorted({k for h in self.history for k in h if k.startswith("state/")})
        for ax, kind in zip(axes, kinds):
            for key in (k for k in keys if k.endswith("/" + kind)):
                pts = [(h["step"], h[key]) for h in self.history if key in h]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key.split("/")[1])
            ax.set_title(kind)
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(directory, "state_statistics.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
