"""Decorrelated Backpropagation (DBP) for the trainable state (docs/methods.md, section 2).

The state ``S`` (plain ``[H, N, N]`` or upscaled ``[H, M, M]``) acts on the model as a linear map of the
vectors that read it: the output it contributes is ``S^T x`` (fla ``[K, V]`` layout). DBP inserts a
decorrelating matrix ``R`` per layer and head in front of it, ``S^T (R x)``; since everything is linear
this is the same as starting from the effective state ``R^T S`` (how it is implemented: no extra
kernel work). ``R`` starts at the identity and follows the decorrelation rule of Ahmad, Dalm, van
Gerven et al. (arXiv 2405.02385) on running second moments of ``z = R x``::

    R <- R - eta [ (1 - kappa)/(D - 1) (C - diag(C)) + kappa (diag(C) - I) ] R,   C = E[z z^T] / mean(diag E[z z^T])

while the wrapped optimizer updates ``S`` with gradients that are computed on the decorrelated inputs.
``R`` is a buffer of the adapter (it changes the function, so inference needs it): saved, loaded and
pushed with it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class DecorMatrices(nn.Module):
    """One decorrelating matrix ``R`` ``[H, D, D]`` per layer (buffers ``layer{i}``), identity at start."""

    def __init__(self, layers: list[int], num_heads: int, dim: int, device=None):
        super().__init__()
        self.layers = list(layers)
        for i in self.layers:
            self.register_buffer(f"layer{i}", torch.eye(dim, device=device).repeat(num_heads, 1, 1))

    def get(self, layer: int) -> torch.Tensor:
        return getattr(self, f"layer{layer}")

    def apply(self, layer: int, S: torch.Tensor) -> torch.Tensor:
        """The effective state ``R^T S`` (reads ``x`` as ``S^T R x``)."""
        return self.get(layer).transpose(-1, -2) @ S


def _tuner_of(model):
    from .model import StateTuningModel

    if isinstance(model, StateTuningModel):
        return model
    inner = getattr(model, "base_model", None)
    if isinstance(inner, StateTuningModel):
        return inner
    raise TypeError(f"expected a state-tuning PeftModel (get_peft_model(..., StateTuningConfig())); got {type(model).__name__}")


def offdiag_correlation(C: torch.Tensor) -> torch.Tensor:
    """Mean |correlation coefficient| off the diagonal of second-moment matrices ``[..., D, D]``."""
    d = torch.diagonal(C, dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()
    corr = C / (d[..., :, None] * d[..., None, :])
    D = C.shape[-1]
    if D < 2:
        return C.new_zeros(())
    off = corr.abs().sum((-1, -2)) - torch.diagonal(corr, dim1=-2, dim2=-1).abs().sum(-1)
    return (off / (D * (D - 1))).mean()


class StateInputStats:
    """Second moments ``sum_t x_t x_t^T`` ``[H, D, D]`` per layer of the vectors ``x_t`` that multiply an
    adapter's trainable state (docs/methods.md eq. D1), gathered with forward hooks on each targeted
    layer's ``att.receptance`` during training forwards (grad enabled, module in training mode)."""

    def __init__(self, model, adapter_name: str | None = None, training_only: bool = True):
        from .model import find_rwkv7_backbone

        tuner = _tuner_of(model)
        self.name = adapter_name or next(n for n in tuner.active_adapters if n in tuner.adapter_states)
        self.states = tuner.adapter_states[self.name]
        self.training_only = training_only
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        backbone = find_rwkv7_backbone(tuner.model)
        layers = list(self.states.wkv_up) if self.states.upscale is not None else list(self.states.wkv)
        self.layers = [int(i) for i in layers]
        self._handles = [
            backbone.blocks[i].att.receptance.register_forward_hook(self._hook(i, backbone.blocks[i].att)) for i in self.layers
        ]

    def _hook(self, layer: int, att):
        def hook(mod, args, out):
            if self.training_only and not (mod.training and torch.is_grad_enabled()):
                return
            with torch.no_grad():
                B, T, _ = out.shape
                r = out.detach().float().view(B, T, att.num_heads, att.head_dim)
                if self.states.upscale is not None:
                    r = self.states.upscale[str(layer)].state_inputs(r, self.states.upscale_mode)
                x = r.reshape(B * T, att.num_heads, -1)
                C = torch.einsum("phm,phn->hmn", x, x)
                self.sums[layer] = C if layer not in self.sums else self.sums[layer] + C
                self.counts[layer] = self.counts.get(layer, 0) + B * T

        return hook

    def pop(self) -> dict[int, torch.Tensor]:
        """The mean ``E[x x^T]`` per layer since the last pop (empty if no training forward ran)."""
        out = {i: self.sums[i] / max(self.counts[i], 1) for i in self.sums}
        self.sums, self.counts = {}, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class DecorrelatedOptimizer(torch.optim.Optimizer):
    """Wraps any torch optimizer with Decorrelated Backpropagation of the trainable state.

    ``DecorrelatedOptimizer(AdamW(model.parameters(), lr), model, decor_lr=1e-2)`` behaves like the
    wrapped optimizer (``param_groups``, ``state``, ``zero_grad``, ``step``, ``state_dict`` /
    ``load_state_dict``; LR schedulers and ``Trainer(optimizers=(opt, scheduler))`` work on it). Each
    ``step()`` first runs the wrapped optimizer, then one decorrelation update of ``R`` from the input
    statistics gathered since the previous step. With ``decor_lr=0`` ``R`` stays the identity and the
    updates equal the wrapped optimizer's exactly.

    Args:
        optimizer: the wrapped optimizer (over the adapter's trainable states).
        model: the state-tuning ``PeftModel`` (or its tuner).
        decor_lr: eta of the decorrelation rule.
        kappa: 0 decorrelates only; > 0 also drives the variances of ``z`` to 1 (whitening).
        momentum: running average of the second moments over steps (0: this step's batch only).
        normalize: divide ``C`` by its mean diagonal before the update (scale-free eta; see docs).
        adapter_name: the adapter (default: the active one).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model, decor_lr: float = 1e-2, kappa: float = 0.0,
                 momentum: float = 0.0, normalize: bool = True, adapter_name: str | None = None):  # fmt: skip
        # No Optimizer.__init__: param_groups / state / defaults are the wrapped optimizer's (properties).
        self.optimizer = optimizer
        self.decor_lr, self.kappa, self.momentum, self.normalize = float(decor_lr), float(kappa), float(momentum), bool(normalize)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        tuner = _tuner_of(model)
        self.stats = StateInputStats(tuner, adapter_name)
        self.states = self.stats.states
        if self.states.decor is None:
            H = next(iter((self.states.wkv_up or self.states.wkv).values())).shape[0]
            D = next(iter((self.states.wkv_up or self.states.wkv).values())).shape[-1]
            device = next(iter((self.states.wkv_up or self.states.wkv).values())).device
            self.states.decor = DecorMatrices(self.stats.layers, H, D, device)
        tuner.peft_config[self.stats.name].decorrelation = True  # saved adapters rebuild R (then load it)
        self._running: dict[int, torch.Tensor] = {}
        self.correlation_history: list[float] = []  # mean |off-diagonal correlation| of z = R x, per step

    # ---- the torch.optim.Optimizer surface, delegated ----
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def add_param_group(self, param_group) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.decorrelation_step()
        return loss

    def state_dict(self) -> dict:
        sd = dict(self.optimizer.state_dict())
        sd["decorrelation"] = {
            "decor_lr": self.decor_lr, "kappa": self.kappa, "momentum": self.momentum, "normalize": self.normalize,
            "running": {str(i): t.detach().cpu().clone() for i, t in self._running.items()},
            "correlation_history": list(self.correlation_history),
        }  # fmt: skip
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        extra = sd.pop("decorrelation", None)
        self.optimizer.load_state_dict(sd)
        if extra:
            self.decor_lr, self.kappa = extra["decor_lr"], extra["kappa"]
            self.momentum, self.normalize = extra["momentum"], extra["normalize"]
            device = next(iter(self.states.decor.buffers())).device
            self._running = {int(i): t.to(device) for i, t in extra["running"].items()}
            self.correlation_history = list(extra.get("correlation_history", []))

    def __repr__(self) -> str:
        return f"DecorrelatedOptimizer(decor_lr={self.decor_lr}, kappa={self.kappa}, {self.optimizer!r})"

    # ---- the decorrelation rule ----
    @torch.no_grad()
    def decorrelation_step(self) -> None:
        batch = self.stats.pop()
        if not batch:
            return
        corrs = []
        for i, C in batch.items():
            prev = self._running.get(i)
            C = C if prev is None or self.momentum == 0 else self.momentum * prev + (1 - self.momentum) * C
            self._running[i] = C
            R = self.states.decor.get(i)
            Cz = R @ C @ R.transpose(-1, -2)  # E[z z^T], z = R x
            corrs.append(float(offdiag_correlation(Cz)))
            if self.decor_lr == 0:
                continue
            d = torch.diagonal(Cz, dim1=-2, dim2=-1)
            if self.normalize:
                scale = d.mean(-1).clamp_min(1e-30)[:, None, None]
                Cz, d = Cz / scale, d / scale[..., 0]
            off = Cz - torch.diag_embed(d)
            # 1/(D-1) as in the authors' rule (artcogsys/decorbp): eta is then the relative step along a fully
            # correlated direction, so eta < 1 is stable for any D (without it, eta must be < 2/D)
            G = (1 - self.kappa) / max(d.shape[-1] - 1, 1) * off
            if self.kappa:
                G = G + self.kappa * (torch.diag_embed(d) - torch.eye(d.shape[-1], device=d.device))
            R.sub_(self.decor_lr * (G @ R))
        self.correlation_history.append(sum(corrs) / len(corrs))

    def remove_hooks(self) -> None:
        self.stats.remove()
