"""Regional ``torch.compile`` of the RWKV-7 blocks (by default: training on CUDA).

Why: outside the WKV kernel a block is a long chain of small elementwise ops (token shift, six lerps,
sigmoids, the L2 norm of ``kk``, GroupNorm, bonus, gate, ReLU^2, residuals). Eagerly each one reads and
writes a ``[B, T, C]`` tensor, forward and backward; at the 0.1B shape with B = 8, T = 4096 they took
about 200 ms of a 252 ms state-tuning step on an H100 (benchmarks/bench_train.py), against 52 ms in the
WKV kernels. Inductor fuses these chains into a few kernels, and its partitioner keeps fewer activations
for the backward.

How: each block runs as a compiled region (the pattern PyTorch documents as "regional compilation"),
through one compiled function that takes the block as an argument: blocks 1..L-1 share the same graphs
(module parameters are graph inputs), block 0 (which owns ``ln0`` and the value residual) gets its own.
The WKV call itself is excluded (``torch.compiler.disable`` in ``Rwkv7TimeMix._wkv``): it is our Triton
autograd Function, and the upscaled states' extension reads the cache that is being filled. Measured on an
H100 (bench_train.py, 0.1B, B = 8, T = 4096): 188k tok/s compiled vs 132k eager, peak 18.3 vs 21.1 GB.

When: automatically for CUDA inputs of more than one token with gradients on, i.e. training, where the
compilation (tens of seconds, once per shape family) is paid back within a few steps. Inference stays
eager by default (a first ``generate()`` should not wait for a compiler; decode steps are CUDA graphs
already); set ``compile_blocks = True`` for long prefills. Never while a CUDA graph is being captured or
when the caller already compiles the whole model. Override with ``model.model.compile_blocks``
(``True`` / ``False``; ``None`` = automatic) or the environment variable ``RWKV7_COMPILE`` (``0`` / ``1``;
``1`` also compiles on CPU, where tests use ``RWKV7_COMPILE_BACKEND=aot_eager`` since Inductor needs a C++
compiler there). The first step of a new shape compiles (tens of seconds on a GPU); later steps reuse it.

Memory: the graphs are partitioned with an activation memory budget (:func:`activation_memory_budget`, 0.9 of
what the default partition keeps): the min-cut partitioner then recomputes cheap activations (elementwise
chains, the feed-forward's ReLU^2) in the backward instead of keeping them (see DEFAULT_ACTIVATION_BUDGET).
"""

from __future__ import annotations

import os

import torch
import torch._functorch.config as functorch_config
from torch import nn

# Measured on an H100 (benchmarks/bench_train.py, 0.1B state tuning, B = 8, T = 4096, each in a fresh process,
# benchmarks/results/bench_train.log, 2026-11-26, decay logits into the WKV call): 0.6 -> 320 k tokens/s at 12.4 GB
# peak, 0.8 -> 323 k at 12.9 GB, 0.9 -> 324 k at 13.4 GB, 1.0 (off) -> 335 k at 15.9 GB. What 1.0 adds is the feed-
# forward layer's [B, T, 4C] activation (0.2 GB per layer): below it, the partitioner recomputes that layer's first
# matmul in the backward. 0.9 is the largest setting under the memory target (0.6x the peer's 22.8 GB); the peak of
# these runs was the loss's logits at the end of the forward (two chunks' buffers alive at once; since fixed, 0.9
# keeps 12.9 GB and 1.0 15.4 GB, call Y4).
DEFAULT_ACTIVATION_BUDGET = 0.9

# Variants that each need their own graph: first block or not, padding mask or not, final state or
# not, grad or no-grad, checkpoint replay; dynamo's default of 8 graphs per code object is too few.
_RECOMPILE_LIMIT = 64


def env_switch(name: str) -> bool | None:
    """An on/off environment variable: True for 1/true/yes/on, False for 0/false/no/off, None when unset (or
    anything else)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def wants_compiled(setting: bool | None, x: torch.Tensor) -> bool:
    """Whether the blocks should run compiled for the hidden states ``x`` (``[B, T, C]``)."""
    env = env_switch("RWKV7_COMPILE")
    if env is False:
        return False
    if torch.compiler.is_compiling():  # the caller compiles the whole model: nothing to add
        return False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    if env:
        return True
    if setting is not None:
        return bool(setting)
    return x.is_cuda and x.shape[1] > 1 and torch.is_grad_enabled()


def has_hooks(block: nn.Module) -> bool:
    """Forward hooks on a block or inside it: FSDP2's all-gather (on the block), DBP's statistics (on
    ``att.receptance``), the upscaling's key collection (on ``att.key``). Automatic compilation leaves such blocks
    eager: hooks with side effects are not something to trace unmeasured, and one added after a graph was built
    must still run. ``compile_blocks=True`` compiles them anyway."""
    return any(m._forward_pre_hooks or m._forward_hooks for m in block.modules())


def _call_block(block: nn.Module, *args):
    return block(*args)  # hooks included (e.g. FSDP2's)


_compiled_calls: dict[str, object] = {}  # per backend


def run_compiled(block: nn.Module, *args):
    """``block(*args)`` through one compiled function shared by every block of every model: the block is
    an input (its parameters are graph inputs), so blocks of the same structure reuse the same graphs and
    nothing keeps a model alive after it is dropped."""
    backend = os.environ.get("RWKV7_COMPILE_BACKEND", "inductor")
    if backend not in _compiled_calls:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(cfg, name) and getattr(cfg, name) < _RECOMPILE_LIMIT:
                setattr(cfg, name, _RECOMPILE_LIMIT)
        _compiled_calls[backend] = torch.compile(_call_block, backend=backend)
    # The budget is read when a graph is compiled (the partitioner runs then), not at every call.
    with functorch_config.patch(activation_memory_budget=activation_memory_budget()):
        return _compiled_calls[backend](block, *args)


def activation_memory_budget() -> float:
    """What the compiled blocks keep for the backward, as a fraction of what AOT autograd's default partition
    would keep; the min-cut partitioner recomputes the cheapest activations in the backward to fit. 1.0 turns this
    off. Environment variable ``RWKV7_ACTIVATION_BUDGET`` (read when a graph is compiled)."""
    value = os.environ.get("RWKV7_ACTIVATION_BUDGET", "").strip()
    if not value:
        return DEFAULT_ACTIVATION_BUDGET
    try:
        budget = float(value)
    except ValueError:
        budget = -1.0
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"RWKV7_ACTIVATION_BUDGET must be a number in (0, 1], e.g. 0.6 or 1; got {value!r}")
    return budget
