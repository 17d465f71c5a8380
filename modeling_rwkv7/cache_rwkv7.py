"""The recurrent state of RWKV-7, and the cache that carries it through ``generate()``.

Per layer an RWKV-7 carries three tensors (the official runtime's ``state[3i+0..2]``):

* ``att_shift`` ``[B, C]``: the last token's time-mix input (after ``ln1``), for the token shift;
* ``wkv`` ``[B, H, K, V]`` fp32: the WKV state, in flash-linear-attention's ``[K, V]`` layout
  (the official runtime keeps its transpose, ``[H, V, K]``);
* ``ffn_shift`` ``[B, C]``: the last token's channel-mix input (after ``ln2``).

:class:`Rwkv7State` is that triple, read-only, used as the model's ``initial_state`` argument
(batch-broadcastable: batch 1, or a batch that divides the input's). :class:`Rwkv7Cache` is the
mutable version that ``forward(use_cache=True)`` and ``generate()`` update.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch


@dataclass
class Rwkv7State:
    """Per-layer recurrent state. Any entry may be ``None``, which means zeros."""

    wkv: list[torch.Tensor | None]
    att_shift: list[torch.Tensor | None] = field(default_factory=list)
    ffn_shift: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def coerce(cls, state: "Rwkv7State | list | tuple | None", num_layers: int) -> "Rwkv7State | None":
        """Accept a :class:`Rwkv7State`, a list of per-layer WKV tensors, or ``None``."""
        if state is None:
            return None
        if isinstance(state, Rwkv7Cache):
            state = state.state
        if isinstance(state, (list, tuple)):
            state = cls(wkv=list(state))
        if not isinstance(state, cls):
            raise TypeError(
                "initial_state must be an Rwkv7State, an Rwkv7Cache, or a list of per-layer WKV tensors "
                f"[B, H, K, V]; got {type(state).__name__}"
            )
        for name in ("wkv", "att_shift", "ffn_shift"):
            entries = getattr(state, name)
            if entries and len(entries) != num_layers:
                raise ValueError(f"initial_state.{name} has {len(entries)} entries but the model has {num_layers} layers")
        return state

    def layer(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        pick = lambda entries: entries[i] if entries else None  # noqa: E731
        return pick(self.wkv), pick(self.att_shift), pick(self.ffn_shift)

    def detach(self) -> "Rwkv7State":
        """A copy cut from the autograd graph (clone, so later in-place updates can't touch it)."""
        copy = lambda entries: [None if x is None else x.detach().clone() for x in entries]  # noqa: E731
        return Rwkv7State(copy(self.wkv), copy(self.att_shift), copy(self.ffn_shift))

    def to_official(self) -> list[torch.Tensor]:
        """The state in pip ``rwkv``'s layout for one sequence: ``[att_x_prev, wkv [H, V, K], ffn_x_prev]`` per layer."""
        out = []
        for wkv, att, ffn in zip(self.wkv, self.att_shift, self.ffn_shift):
            out += [att[0], wkv[0].transpose(-1, -2).contiguous(), ffn[0]]
        return out


class Rwkv7Cache:
    """Mutable per-layer state for incremental decoding with ``generate()``.

    The state can be read out with :attr:`state` (e.g. saved after a conversation) and fed back as
    ``initial_state`` to continue from it later.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.state = Rwkv7State([None] * num_layers, [None] * num_layers, [None] * num_layers)
        self.seen_tokens = 0
        # States of extensions of the time mix (``Rwkv7TimeMix.wkv_extension``, e.g. the upscaled
        # branches of peft_state_tuning), keyed by the extension; ``[B, ...]`` tensors, reordered and
        # expanded with the rest. The extension finds the cache through :func:`current_cache`.
        self.extension_states: dict = {}

    def __len__(self) -> int:
        return self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        """Every layer is a recurrent state, not a key/value cache: transformers' ``generate()`` reads this
        (and then builds no causal masks and does not slice a prompt by cache length) when a cache is passed in."""
        return [True] * self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def update(self, layer_idx: int, wkv: torch.Tensor, att_shift: torch.Tensor, ffn_shift: torch.Tensor) -> None:
        self.state.wkv[layer_idx] = wkv
        self.state.att_shift[layer_idx] = att_shift
        self.state.ffn_shift[layer_idx] = ffn_shift

    def _map(self, fn) -> None:
        for entries in (self.state.wkv, self.state.att_shift, self.state.ffn_shift):
            for i, x in enumerate(entries):
                if x is not None:
                    entries[i] = fn(x)
        for key, x in self.extension_states.items():
            self.extension_states[key] = fn(x)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows of the beams that survive."""
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda x: x[indices])


_CURRENT_CACHE: contextvars.ContextVar[Rwkv7Cache | None] = contextvars.ContextVar("rwkv7_current_cache", default=None)


def current_cache() -> Rwkv7Cache | None:
    """The cache that the running forward reads and updates (None outside a forward or without
    ``use_cache``): how a ``wkv_extension`` keeps its own state next to the model's."""
    return _CURRENT_CACHE.get()


@contextlib.contextmanager
def filling(cache: Rwkv7Cache | None):
    """Make ``cache`` the :func:`current_cache` for the duration of one forward (thread- and task-local)."""
    token = _CURRENT_CACHE.set(cache)
    try:
        yield cache
    finally:
        _CURRENT_CACHE.reset(token)
