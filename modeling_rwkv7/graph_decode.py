"""One decoding step of RWKV-7 replayed from a CUDA graph.

At batch 1 a decoding step is hundreds of tiny kernels; launching them one by one from Python costs
far more than the arithmetic. A recurrent model's step has fixed shapes (one token in, a state of
fixed size), so we capture the whole step once per batch size and replay it: the state lives in
static buffers that the graph reads and overwrites in place.

``Rwkv7ForCausalLM.forward`` uses this automatically for one-token steps with a cache on CUDA in
eval mode (``generate()``'s decoding loop). Set ``RWKV7_CUDA_GRAPHS=0`` to turn it off.
"""

from __future__ import annotations

import os

import torch

from .cache_rwkv7 import Rwkv7Cache, Rwkv7State


def graphs_enabled() -> bool:
    return os.environ.get("RWKV7_CUDA_GRAPHS", "1") != "0"


class DecodeGraph:
    """A captured decoding step for one batch size (and dtype/device of the model)."""

    def __init__(self, model, cache: Rwkv7Cache, batch: int):
        self.batch = batch
        st = cache.state
        clone = lambda xs: [x.detach().clone() for x in xs]  # noqa: E731
        self.wkv, self.att, self.ffn = clone(st.wkv), clone(st.att_shift), clone(st.ffn_shift)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.wkv[0].device)
        self.graph = torch.cuda.CUDAGraph()

        def step():
            scratch = Rwkv7Cache(len(self.wkv))
            scratch.state = Rwkv7State(list(self.wkv), list(self.att), list(self.ffn))
            scratch.seen_tokens = 1
            out = model._eager_forward(input_ids=self.ids, cache=scratch, use_cache=True)
            for static, new in zip(self.wkv + self.att + self.ffn, scratch.state.wkv + scratch.state.att_shift + scratch.state.ffn_shift):
                static.copy_(new)
            return out.logits

        # Warm up on a side stream (Triton compiles, allocator settles), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        saved = [x.clone() for x in self.wkv + self.att + self.ffn]
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph):
            self.logits = step()
        for static, original in zip(self.wkv + self.att + self.ffn, saved):
            static.copy_(original)  # warm-up and capture advanced the state: undo it

    def run(self, input_ids: torch.Tensor, cache: Rwkv7Cache) -> torch.Tensor:
        """Advance ``cache`` by one token; returns the logits ``[B, 1, V]``."""
        st = cache.state
        for entries, static in ((st.wkv, self.wkv), (st.att_shift, self.att), (st.ffn_shift, self.ffn)):
            for i, x in enumerate(entries):
                if x is not static[i]:  # first step, or the cache was reordered (beam search)
                    static[i].copy_(x)
                    entries[i] = static[i]
        self.ids.copy_(input_ids)
        self.graph.replay()
        cache.seen_tokens += 1
        return self.logits.clone()


def can_use_graph(model, input_ids, cache, kwargs) -> bool:
    return (
        graphs_enabled()
        and not model.training
        and isinstance(input_ids, torch.Tensor)
        and input_ids.is_cuda
        and input_ids.shape[1] == 1
        and cache is not None
        and cache.seen_tokens > 0
        and all(x is not None for x in cache.state.wkv + cache.state.att_shift + cache.state.ffn_shift)
        and not cache.extension_states  # an extension's Python-side state cannot live in a captured graph
        and not torch.is_grad_enabled()
        and not kwargs.get("output_hidden_states")
        and kwargs.get("labels") is None
        and kwargs.get("inputs_embeds") is None
    )
