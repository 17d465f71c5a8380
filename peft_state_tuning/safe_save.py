"""Safe adapter files: atomic saves and checked loads for state-tuning adapters.

* **Atomic saves.** ``PeftModel.save_pretrained`` writes its files straight into the target folder, so
  a crash (or a kill, or a full disk) midway leaves a half-written ``adapter_model.safetensors`` and
  no way back to the previous adapter. For state-tuning adapters we make it write everything into a
  temporary folder beside the target (``.tmp-save-*``, same file system), ``fsync`` each file, and
  then ``os.replace`` each file into place: a reader sees the previous file or the new one, never a
  torn one. (The files are replaced one after the other, weights last; a crash in the microseconds
  between two renames can pair the new config with the old weights, which the load checks below
  then report instead of loading silently.)
* **Checked loads.** ``PeftModel.from_pretrained`` / ``load_adapter`` of a state-tuning adapter
  reads the folder's ``adapter_model.safetensors`` before PEFT does, so that a truncated or corrupt
  file, a missing file, or a ``adapter_config.json`` without ``peft_type`` gives an
  :class:`AdapterFormatError` naming the file and what to do, instead of a deep safetensors / Hub
  error. :func:`check_adapter_tensors` (called by the tuner on every load) refuses NaN/Inf states,
  wrong shapes and missing or foreign keys.
* **Which base.** Saves record the frozen base's fingerprint in ``adapter_config.json``
  (:func:`record_base_fingerprint`); the tuner refuses to load the adapter onto a base with another one.

Both wrappers act only on ``STATE_TUNING`` adapters (as ``hub.py`` does for ``push_to_hub``); other
PEFT methods keep PEFT's own behaviour. :func:`install` is called by ``registration.register()``.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel

from .registration import STATE_TUNING

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
# Keys only a state-tuning adapter_config.json has: lets us recognise one that lost its `peft_type`.
_STATE_TUNING_KEYS = {"state_initialized", "tune_token_shift", "init_state_file"}


class AdapterFormatError(ValueError):
    """An adapter folder or file is not a valid state-tuning adapter (the message says how to fix it)."""


# ---- atomic saves ---------------------------------------------------------------------------------


def _is_state_tuning(peft_model: PeftModel) -> bool:
    configs = getattr(peft_model, "peft_config", {}) or {}
    return bool(configs) and all(getattr(c, "peft_type", None) == STATE_TUNING for c in configs.values())


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _move_into_place(src: Path, dst: Path) -> None:
    """Move every file of ``src`` to the same relative place under ``dst`` with ``os.replace``
    (sub-folders are merged, not replaced); the weights of each folder go last."""
    dst.mkdir(parents=True, exist_ok=True)
    items = sorted(src.iterdir(), key=lambda p: (p.is_dir(), p.name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN), p.name))
    for item in items:
        if item.is_dir():
            _move_into_place(item, dst / item.name)
        else:
            os.replace(item, dst / item.name)
    try:  # make the renames themselves durable
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass


def atomic_save_pretrained(original, self: PeftModel, save_directory, *args, **kwargs):
    """Run PEFT's ``save_pretrained`` into a temporary folder next to ``save_directory``, then move
    the files into place. An existing model card (``README.md``) is carried over, so PEFT updates it
    as it would in place."""
    target = Path(save_directory)
    if target.is_file():
        raise ValueError(f"Provided path ({target}) should be a directory, not a file")
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=target))
    try:
        # PEFT updates the model card it finds in the output folder (one per non-default adapter too).
        for sub in ["", *(n for n in getattr(self, "peft_config", {}) if n != "default")]:
            card = target / sub / "README.md"
            if card.is_file():
                (tmp / sub).mkdir(parents=True, exist_ok=True)
                shutil.copy2(card, tmp / sub / "README.md")
        result = original(self, str(tmp), *args, **kwargs)
        _fsync_tree(tmp)
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# ---- checked loads --------------------------------------------------------------------------------


def _local_folder(model_id, subfolder: str | None) -> Path | None:
    path = Path(model_id) / subfolder if subfolder else Path(model_id)
    return path if path.is_dir() else None


def check_adapter_folder(folder: str | os.PathLike) -> None:
    """Read a local adapter folder's files as PEFT will, raising :class:`AdapterFormatError` with
    the file name and the fix for a missing, truncated or corrupt file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        raise AdapterFormatError(
            f"{folder} has no {ADAPTER_CONFIG}: it is not a saved adapter. Pass the folder that "
            "`peft_model.save_pretrained(...)` wrote."
        )
    try:
        json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterFormatError(
            f"{config} is not valid JSON ({err}). The file is corrupt or was cut off: restore it from the "
            "adapter's source (re-download, or save the adapter again)."
        ) from err
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / ADAPTER_WEIGHTS_BIN).is_file():
            return  # PEFT reads it with torch.load(weights_only=True)
        raise AdapterFormatError(
            f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: the adapter's states are missing. "
            "Copy the whole adapter folder (or save it again with `save_pretrained`)."
        )
    try:
        load_file(weights)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types; all mean "bad file"
        raise AdapterFormatError(
            f"{weights} is truncated or corrupt ({type(err).__name__}: {err}). It was probably cut off by an "
            "interrupted download, copy or save: download it again or re-save the adapter from the trained model."
        ) from err


def check_adapter_tensors(model, adapter_name: str, state_dict: dict, source: str = "the adapter weights (adapter_model.safetensors)") -> None:
    """Refuse adapter tensors that would load silently wrong: keys that no state of this adapter
    has, missing states, wrong shapes, NaN/Inf. ``state_dict`` is keyed as in the model
    (``...state_tuning.adapters.<adapter>.wkv.<layer>``)."""
    # Buffers too: upscaled / DBP adapters carry fixed tensors (support vectors, projections, R) in the file.
    named = [*model.named_parameters(), *model.named_buffers()]
    expected = {n: p for n, p in named if f"state_tuning.adapters.{adapter_name}." in n}
    if not expected:
        return
    strip = lambda n: n.split(f"state_tuning.adapters.{adapter_name}.", 1)[1]  # noqa: E731
    by_suffix = {strip(n): p for n, p in expected.items()}
    given = {}
    for key, tensor in state_dict.items():
        if f"state_tuning.adapters.{adapter_name}." in key:
            given[strip(key)] = tensor
    unknown = sorted(set(given) - set(by_suffix))
    if unknown:
        raise AdapterFormatError(
            f"{source} holds states {unknown[:6]} that the adapter {adapter_name!r} does not have (its config "
            f"tunes {sorted(by_suffix)[:6]}...). adapter_config.json and the weights do not belong together: "
            "re-save the adapter, or fix `target_layers` / `tune_token_shift` in adapter_config.json."
        )
    missing = sorted(set(by_suffix) - set(given))
    if missing:
        raise AdapterFormatError(
            f"{source} lacks the states {missing[:6]} of adapter {adapter_name!r}: the file is incomplete or was "
            "saved with another `target_layers` / `tune_token_shift`. Re-save the adapter from the trained model."
        )
    for suffix, tensor in given.items():
        want = tuple(by_suffix[suffix].shape)
        if tuple(tensor.shape) != want:
            raise AdapterFormatError(
                f"{source}: state {suffix} has shape {tuple(tensor.shape)} but this base model needs {want}: the "
                "adapter was made for a model of another size. Load it onto the base it was trained on."
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFormatError(
                f"{source}: state {suffix} contains NaN or Inf values, so every output would be NaN. The adapter "
                "was saved from a diverged run: use an earlier checkpoint (NanGuardCallback stops training "
                "before this happens)."
            )


def record_base_fingerprint(peft_model: PeftModel) -> None:
    """Write the frozen base's fingerprint into every adapter's config before it is saved, so that loading
    the adapter onto another base fails clearly (``StateTuningModel`` checks it on load). Computed at save
    time, from the base the states were trained with; when it cannot be computed (offloaded or partitioned
    weights) the value already there is kept."""
    from .fingerprint import base_model_fingerprint

    fingerprint = base_model_fingerprint(peft_model.get_base_model())
    if fingerprint is None:
        return
    for config in peft_model.peft_config.values():
        config.base_model_fingerprint = fingerprint


def _checked_get_peft_type(original):
    @functools.wraps(original)
    def _get_peft_type(cls, model_id, **hf_hub_download_kwargs):
        folder = _local_folder(model_id, hf_hub_download_kwargs.get("subfolder"))
        config = folder / ADAPTER_CONFIG if folder else None
        try:
            return original.__func__(cls, model_id, **hf_hub_download_kwargs)
        except json.JSONDecodeError as err:
            raise AdapterFormatError(
                f"{config or model_id} is not valid JSON ({err}). The file is corrupt or was cut off: restore "
                "it from the adapter's source (re-download, or save the adapter again)."
            ) from err
        except KeyError as err:
            if err.args == ("peft_type",) and config is not None and config.is_file():
                if _STATE_TUNING_KEYS & set(json.loads(config.read_text())):
                    raise AdapterFormatError(
                        f"{config} has no 'peft_type' field. For a state-tuning adapter add "
                        f'"peft_type": "{STATE_TUNING.value}" (or re-save the adapter with `save_pretrained`).'
                    ) from err
            raise

    return classmethod(_get_peft_type)


def install() -> None:
    """Make ``PeftModel.save_pretrained`` atomic and ``PeftModel.load_adapter`` checked, for
    state-tuning adapters only (idempotent)."""
    if getattr(PeftModel.save_pretrained, "_state_tuning_atomic", False):
        return
    original_save = PeftModel.save_pretrained
    original_load = PeftModel.load_adapter

    @functools.wraps(original_save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _is_state_tuning(self):
            return original_save(self, save_directory, *args, **kwargs)
        record_base_fingerprint(self)
        if not kwargs.get("is_main_process", True):
            return original_save(self, save_directory, *args, **kwargs)
        return atomic_save_pretrained(original_save, self, save_directory, *args, **kwargs)

    @functools.wraps(original_load)
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        config = self.peft_config.get(adapter_name)
        folder = _local_folder(model_id, kwargs.get("subfolder"))
        ours = config is not None and config.peft_type == STATE_TUNING
        if config is None and folder is not None and (folder / ADAPTER_CONFIG).is_file():
            try:
                ours = json.loads((folder / ADAPTER_CONFIG).read_text()).get("peft_type") == STATE_TUNING.value
            except ValueError:
                ours = False
        if ours and folder is not None:
            check_adapter_folder(folder)
        return original_load(self, model_id, adapter_name, *args, **kwargs)

    save_pretrained._state_tuning_atomic = True
    PeftModel.save_pretrained = save_pretrained
    PeftModel.load_adapter = load_adapter
    PeftConfig._get_peft_type = _checked_get_peft_type(inspect.getattr_static(PeftConfig, "_get_peft_type"))
