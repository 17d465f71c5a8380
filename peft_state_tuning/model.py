"""The state-tuning tuner: trainable initial states injected through the model's ``initial_state``.

Unlike LoRA, state tuning replaces no module: the trainable tensors (per layer a WKV state
``[H, K, V]``, fp32, in the model's ``[K, V]`` layout, and optionally the two token-shift vectors)
live on the tuner itself, under ``base_model.state_tuning.<adapter>``, and reach the frozen RWKV-7
through its documented ``initial_state`` argument. That keeps them explicit inputs of every
checkpointed block (so gradient checkpointing keeps their gradient), lets ``generate()`` expand
them for beams, and lets one batch mix adapters row by row (``adapter_names=[...]``).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from modeling_rwkv7 import Rwkv7PreTrainedModel, Rwkv7State

from .config import StateTuningConfig

BASE_ROW = "__base__"  # PEFT's name for "no adapter" in `adapter_names`
# {id(tuner): adapter_names} of the forwards in progress in this thread / async context.
_ROW_ADAPTERS: contextvars.ContextVar[dict] = contextvars.ContextVar("state_tuning_row_adapters", default={})


def find_rwkv7_backbone(model: nn.Module):
    """The ``Rwkv7Model`` inside ``model``, or a clear error for anything that is not an RWKV-7."""
    from modeling_rwkv7 import Rwkv7Model

    if isinstance(model, Rwkv7Model):
        return model
    inner = getattr(model, "model", None)
    if isinstance(model, Rwkv7PreTrainedModel) and isinstance(inner, Rwkv7Model):
        return inner
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    raise TypeError(
        f"State tuning needs an RWKV-7 model from `modeling_rwkv7` (Rwkv7ForCausalLM or Rwkv7Model); got {kind!r}. "
        "Load it with `import modeling_rwkv7` and `AutoModelForCausalLM.from_pretrained(...)`; convert official "
        "`.pth` checkpoints with `python -m modeling_rwkv7.convert`."
    )


class AdapterStates(nn.Module):
    """The trainable states of one adapter: ``wkv[str(layer)]`` ``[H, K, V]`` and, when token
    shifts are tuned, ``att_shift[str(layer)]`` / ``ffn_shift[str(layer)]`` ``[C]``; all fp32."""

    def __init__(self, layers: list[int], num_heads: int, head_dim: int, hidden_size: int, tune_token_shift: bool, device=None,
                 config: StateTuningConfig | None = None, model: nn.Module | None = None):  # fmt: skip
        super().__init__()
        zeros = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=torch.float32, device=device))  # noqa: E731
        self.layers = list(layers)
        # Upscaled adapters (config.upscale_dim = M, see upscaling.py) train `wkv_up` [H, M, M] instead of `wkv`.
        M = getattr(config, "upscale_dim", None)
        self.upscale_mode = config.upscale_mode if M else None
        self.wkv = nn.ParameterDict({} if M else {str(i): zeros(num_heads, head_dim, head_dim) for i in layers})
        self.wkv_up = nn.ParameterDict({str(i): zeros(num_heads, M, M) for i in layers} if M else {})
        self.upscale = None
        if M:
            from .upscaling import build_kernel_maps

            self.upscale = build_kernel_maps(config, model, self.layers, device)
        self.att_shift = nn.ParameterDict({str(i): zeros(hidden_size) for i in layers} if tune_token_shift else {})
        self.ffn_shift = nn.ParameterDict({str(i): zeros(hidden_size) for i in layers} if tune_token_shift else {})
        self.decor = None  # DBP decorrelation matrices (dbp.py), when config.decorrelation
        if getattr(config, "decorrelation", False):
            from .dbp import DecorMatrices

            self.decor = DecorMatrices(self.layers, num_heads, M or head_dim, device)

    def effective_up(self, layer: int) -> torch.Tensor:
        """An upscaled state as the recurrence reads it: ``R^T S_up`` with DBP, else ``S_up``."""
        S = self.wkv_up[str(layer)]
        return S if self.decor is None else self.decor.apply(layer, S)

    def effective_wkv(self, layer: int) -> torch.Tensor | None:
        """The ``[H, N, N]`` initial WKV state this adapter gives the model for ``layer``."""
        if self.upscale is not None:
            if self.upscale_mode == "projection" and str(layer) in self.wkv_up:
                return self.upscale[str(layer)].project_state(self.effective_up(layer))
            return None  # recurrence mode: the state enters through Rwkv7TimeMix.wkv_extension
        W = self.wkv[str(layer)] if str(layer) in self.wkv else None
        return W if W is None or self.decor is None else self.decor.apply(layer, W)

    def get(self, kind: str, layer: int) -> torch.Tensor | None:
        if kind == "wkv":
            return self.effective_wkv(layer)
        entries = getattr(self, kind)
        return entries[str(layer)] if str(layer) in entries else None


class StateTuningLayer(nn.Module, BaseTunerLayer):
    """Holds every adapter's :class:`AdapterStates` (``adapters[name]``). It wraps no base layer:
    it exists so that PEFT's adapter bookkeeping (``get_model_status``, ``disable_adapter()``)
    finds the state-tuning adapters like any other tuner layer."""

    adapter_layer_names = ("adapters",)
    other_param_names = ()

    def __init__(self):
        nn.Module.__init__(self)
        self.adapters = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = "default"

    def forward(self, *args, **kwargs):  # pragma: no cover - states are read, not called
        raise RuntimeError("StateTuningLayer is a container; the tuner passes its states as `initial_state`")


class StateTuningModel(BaseTuner):
    """PEFT tuner for RWKV-7 state tuning (``PeftType.STATE_TUNING``). Created by ``get_peft_model``."""

    prefix: str = "state_tuning"
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict = {}

    # `adapter_names` of the forward in progress. Kept per thread / async context (not on the
    # instance), so concurrent forwards with different adapter_names never see each other's rows.
    @property
    def _row_adapters(self) -> list[str] | None:
        return _ROW_ADAPTERS.get().get(id(self))

    @_row_adapters.setter
    def _row_adapters(self, rows: list[str] | None) -> None:
        current = dict(_ROW_ADAPTERS.get())
        if rows is None:
            current.pop(id(self), None)
        else:
            current[id(self)] = rows
        _ROW_ADAPTERS.set(current)

    # ---- creating adapters ------------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, **kwargs) -> None:
        config: StateTuningConfig = self.peft_config[adapter_name]
        if not isinstance(config, StateTuningConfig):
            raise TypeError(f"adapter {adapter_name!r} has a {type(config).__name__}; expected a StateTuningConfig")
        backbone = find_rwkv7_backbone(model)
        self._check_shape(config, backbone.config, adapter_name)
        # The shapes fit; was it this very base? (PeftModel.from_pretrained, load_adapter and
        # AutoPeftModelForCausalLM all come through here with the adapter_config.json they read.)
        from .fingerprint import check_base_fingerprint

        check_base_fingerprint(config, model, adapter_name)
        cfg = backbone.config
        layers = config.target_layers if config.target_layers is not None else list(range(cfg.num_hidden_layers))
        bad = [i for i in layers if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"target_layers {bad} are out of range: the model has {cfg.num_hidden_layers} layers")
        device = next(model.parameters()).device
        states = AdapterStates(layers, cfg.num_heads, cfg.head_dim, cfg.hidden_size, config.tune_token_shift, device, config, model)
        if states.upscale_mode == "recurrence":
            from .upscaling import install_branch

            install_branch(self, model)
        if not config.state_initialized:  # a saved adapter's weights replace any initialisation
            self._initialise(states, config, model)
            config.state_initialized = True
        if "state_tuning" not in self._modules:
            self.state_tuning = StateTuningLayer()
        self.state_tuning.adapters[adapter_name] = states
        self.state_tuning._active_adapter = self.active_adapter
        if hasattr(model, "add_model_tags"):  # shown in the model card that save_pretrained/push_to_hub write
            model.add_model_tags(["state-tuning", "rwkv7"])
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            states.requires_grad_(False)

    @staticmethod
    def _check_shape(config: StateTuningConfig, model_config, adapter_name: str) -> None:
        expected = {
            "num_layers": model_config.num_hidden_layers,
            "num_heads": model_config.num_heads,
            "head_dim": model_config.head_dim,
            "hidden_size": model_config.hidden_size,
        }
        mismatched = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) not in (None, v)}
        if mismatched:
            detail = ", ".join(f"{k}: adapter {a} vs base {b}" for k, (a, b) in mismatched.items())
            raise ValueError(
                f"The state-tuning adapter {adapter_name!r} was made for another base model ({detail}). "
                f"Load it onto the base it was trained on ({config.base_model_name_or_path or 'see adapter_config.json'})."
            )
        for k, v in expected.items():
            setattr(config, k, v)

    def _initialise(self, states: AdapterStates, config: StateTuningConfig, model: nn.Module) -> None:
        if config.init == "zeros":
            return
        if config.init == "rwkv_state":
            from .rwkv_state import load_rwkv_state

            loaded = load_rwkv_state(config.init_state_file, num_heads=config.num_heads, head_dim=config.head_dim)
            with torch.no_grad():
                for i in states.layers:
                    if i in loaded:
                        states.wkv[str(i)].copy_(loaded[i])
            return
        # init == "prompt": the state the frozen base model reaches after reading the prompt.
        state = prompt_state(model, config.init_prompt)
        with torch.no_grad():
            for i in states.layers:
                states.wkv[str(i)].copy_(state.wkv[i][0])
                if config.tune_token_shift:
                    states.att_shift[str(i)].copy_(state.att_shift[i][0])
                    states.ffn_shift[str(i)].copy_(state.ffn_shift[i][0])

    def _create_and_replace(self, *args, **kwargs):  # pragma: no cover - no module is replaced
        raise NotImplementedError("state tuning replaces no module")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, states in self.adapter_states.items():
            states.requires_grad_(name in self.active_adapters)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        pass  # states stay fp32 whatever the base model's dtype: RWKV states lose too much in bf16

    @staticmethod
    def _prepare_adapter_config(peft_config, model_config):
        return peft_config

    # ---- saving and loading: file keys carry no adapter name ------------------------------------
    # In the model:  base_model.state_tuning.adapters.<adapter>.wkv.<layer>
    # In the file:   base_model.state_tuning.wkv.<layer>

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key.replace(f"state_tuning.adapters.{adapter_name}.", "state_tuning.", 1)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        from .safe_save import check_adapter_tensors

        remapped = {k.replace("state_tuning.", f"state_tuning.adapters.{adapter_name}.", 1): v for k, v in state_dict.items()}
        check_adapter_tensors(model, adapter_name, remapped)  # NaN/Inf, shapes, missing or foreign states
        return remapped

    @property
    def adapter_states(self) -> nn.ModuleDict:
        """``{adapter name: AdapterStates}``."""
        return self.state_tuning.adapters if "state_tuning" in self._modules else nn.ModuleDict()

    # ---- the states as the model's initial_state --------------------------------------------

    def initial_state(self, batch_size: int | None = None) -> Rwkv7State | None:
        """The ``initial_state`` for the next forward: the active adapter's states (batch 1,
        broadcast), or per row when ``adapter_names`` was given; ``None`` when adapters are disabled."""
        if self.state_tuning.disable_adapters:
            return None
        num_layers = find_rwkv7_backbone(self.model).config.num_hidden_layers
        rows = self._row_adapters
        if rows is None:
            names = [n for n in self.active_adapters if n in self.adapter_states]
            if not names:
                return None
            if len(names) > 1:
                raise ValueError(
                    f"{len(names)} state-tuning adapters are active ({names}); a forward can start from one state. "
                    "Use `set_adapter(name)`, or `adapter_names=[...]` to pick one per row."
                )
            states = self.adapter_states[names[0]]
            pick = lambda kind, i: (lambda t: None if t is None else t[None])(states.get(kind, i))  # noqa: E731
        else:
            if batch_size is not None and len(rows) != batch_size:
                raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {batch_size} rows")
            pick = lambda kind, i: self._stack_rows(rows, kind, i)  # noqa: E731
        return Rwkv7State(
            wkv=[pick("wkv", i) for i in range(num_layers)],
            att_shift=[pick("att_shift", i) for i in range(num_layers)],
            ffn_shift=[pick("ffn_shift", i) for i in range(num_layers)],
        )

    def _stack_rows(self, rows: list[str], kind: str, layer: int) -> torch.Tensor | None:
        per_row = [None if name == BASE_ROW else self.adapter_states[name].get(kind, layer) for name in rows]
        present = [t for t in per_row if t is not None]
        if not present:
            return None
        return torch.stack([t if t is not None else torch.zeros_like(present[0]) for t in per_row])

    @staticmethod
    def _batch_size(args, kwargs) -> int | None:
        for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
            if isinstance(x, torch.Tensor):
                return x.shape[0]
        return None

    def forward(self, *args, **kwargs):
        self._inject_states(args, kwargs)
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self._inject_states(args, kwargs)
        return self.model.generate(*args, **kwargs)

    def _inject_states(self, args, kwargs) -> None:
        """Pass the adapters' states as the model's ``initial_state`` (unless the caller gave one)."""
        if kwargs.get("initial_state") is None:
            kwargs["initial_state"] = self.initial_state(self._batch_size(args, kwargs))
        self._ensure_upscaled_branches()

    def _ensure_upscaled_branches(self) -> None:
        """Put the recurrence-mode upscaled branches back into the base model if ``unload()`` took them out."""
        from .upscaling import install_branch, uses_recurrence

        if uses_recurrence(self):
            install_branch(self, self.model)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PEFT calls this around forward/generate: ``adapter_names`` picks a state per row."""
        names = kwargs.get("adapter_names")
        if names is not None:
            unknown = sorted({n for n in names if n != BASE_ROW and n not in self.adapter_states})
            if unknown:
                raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; loaded: {sorted(self.adapter_states)}")
        self._row_adapters = list(names) if names is not None else None
        try:
            yield
        finally:
            self._row_adapters = None

    # ---- managing adapters -------------------------------------------------------------------

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.adapter_states]
        if missing:
            raise ValueError(f"adapter(s) {missing} not found; loaded: {sorted(self.adapter_states)}")
        self.active_adapter = adapter_name
        self.state_tuning._active_adapter = adapter_name
        for name, states in self.adapter_states.items():
            states.requires_grad_(name in names and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapter_states:
            raise ValueError(f"adapter {adapter_name!r} not found; loaded: {sorted(self.adapter_states)}")
        del self.adapter_states[adapter_name]
        self.peft_config.pop(adapter_name, None)
        remaining = [n for n in self.active_adapters if n != adapter_name]
        self.active_adapter = remaining or (next(iter(self.adapter_states), None) or [])
        self.state_tuning._active_adapter = self.active_adapter

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self.state_tuning._disable_adapters = not enabled

    def disable_adapter_layers(self) -> None:
        self._enable_adapter_layers(False)

    def enable_adapter_layers(self) -> None:
        self._enable_adapter_layers(True)

    def get_initial_state(self, adapter_name: str | None = None) -> Rwkv7State:
        """A detached copy of an adapter's states as an :class:`Rwkv7State`, to use with the plain
        base model: ``base(input_ids, initial_state=state)`` (the alternative to merging)."""
        name = adapter_name or self.active_adapters[0]
        previous, self._row_adapters = self._row_adapters, [name]
        try:
            return self.initial_state().detach()
        finally:
            self._row_adapters = previous

    def merge_adapter(self, *args, **kwargs) -> None:
        raise ValueError(self._merge_message())

    def merge_and_unload(self, *args, **kwargs):
        raise ValueError(self._merge_message())

    def _unload_and_optionally_merge(self, merge=True, *args, **kwargs):
        if merge:
            raise ValueError(self._merge_message())
        return self.unload()

    def unload(self) -> nn.Module:
        """The base model, without the states: its weights were never changed; the hooks of
        recurrence-mode upscaled adapters are taken out (they come back on the next PEFT call)."""
        from .upscaling import remove_branch

        remove_branch(self.model)
        return self.model

    @staticmethod
    def _merge_message() -> str:
        return (
            "A tuned initial state cannot be merged into the weights: it is the state the recurrence starts from, "
            "not a change of any weight. Use the plain base model with the state instead: "
            "`state = peft_model.get_initial_state()`, `base = peft_model.unload()`, then "
            "`base(input_ids, initial_state=state)` or `base.generate(input_ids, initial_state=state)`."
        )

    # ---- interoperability with RWKV's own state files ----------------------------------------

    def export_rwkv_state(self, path: str | Path, adapter_name: str | None = None) -> Path:
        """Write the tuned WKV states as RWKV's own state-tuning tools do (``blocks.{i}.att.time_state``,
        ``[H, N, N]`` in the official ``[V, K]`` layout; untargeted layers are zeros)."""
        from .rwkv_state import save_rwkv_state

        name = adapter_name or self.active_adapters[0]
        cfg = find_rwkv7_backbone(self.model).config
        states = self.adapter_states[name]
        empty = torch.zeros(cfg.num_heads, cfg.head_dim, cfg.head_dim)
        full = {i: (states.wkv[str(i)].detach() if str(i) in states.wkv else empty) for i in range(cfg.num_hidden_layers)}
        if states.att_shift:
            warnings.warn("export_rwkv_state writes the WKV states only; RWKV's state files hold no token-shift states")
        return save_rwkv_state(full, path)


def prompt_state(model: nn.Module, prompt: str) -> Rwkv7State:
    """The state a frozen RWKV-7 reaches after reading ``prompt`` (batch 1, detached)."""
    from transformers import AutoTokenizer

    from modeling_rwkv7 import get_world_tokenizer

    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name) if name else get_world_tokenizer()
    except (OSError, ValueError):
        tokenizer = get_world_tokenizer()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    if ids.shape[1] == 0:
        raise ValueError("init_prompt encodes to zero tokens")
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return out.cache.state.detach()
