"""Kernel-method state upscaling (docs/methods.md, section 1).

Per layer and head, an upscaled trainable state ``S_up`` ``[M, M]`` (fla ``[K, V]`` layout) reaches the
model in one of two ways (``StateTuningConfig.upscale_mode``):

* ``"recurrence"`` (default): an extra WKV-7 recurrence of head size M runs on kernel features of the
  layer's own receptance / removal key / decay / in-context learning rate, starting from ``S_up`` and
  with no write of the tokens (k = v = 0); its output, mapped back to the head size by a fixed
  ``Q`` ``[N, M]``, is added to the base WKV output. The WKV-7 recurrence is linear in its state, so
  this is exactly the part of the output that an initial state contributes in plain state tuning:
  with the linear kernel and ``U = I`` (M = N) it *is* plain state tuning, and ``S_up = 0`` adds 0.
* ``"projection"``: the model's initial WKV state is ``S0 = Q S_up Q^T`` (everything else unchanged).

The fixed buffers (support vectors ``U``, back-projection ``Q``, decay/learning-rate mixing ``D``) are
part of the adapter: they are saved, loaded and pushed with it.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from modeling_rwkv7.cache_rwkv7 import current_cache
from modeling_rwkv7.modeling_rwkv7 import DECAY_SCALE
from rwkv7_kernels import wkv7

KERNELS = ("gaussian", "linear")
MODES = ("recurrence", "projection")
SUPPORT = ("random", "kmeans", "identity")


def validate_upscale_config(config) -> None:
    M = config.upscale_dim
    if not isinstance(M, int) or M < 1:
        raise ValueError(f"StateTuningConfig.upscale_dim must be a positive int; got {M!r}")
    if config.upscale_mode not in MODES:
        raise ValueError(f"upscale_mode must be one of {MODES}; got {config.upscale_mode!r}")
    if config.kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {config.kernel!r}")
    if config.support_vectors not in SUPPORT:
        raise ValueError(f"support_vectors must be one of {SUPPORT}; got {config.support_vectors!r}")
    if not config.kernel_gamma > 0:
        raise ValueError(f"kernel_gamma must be > 0; got {config.kernel_gamma!r}")
    if (
        config.support_vectors == "kmeans"
        and not config.state_initialized
        and not (config.calibration_texts or config.calibration_ids)
    ):
        raise ValueError("support_vectors='kmeans' needs `calibration_texts` or `calibration_ids` (the base model's k vectors are clustered)")
    if config.init != "zeros":
        raise ValueError("an upscaled state starts from zeros (the base model's own start); use init='zeros' with upscale_dim")


def is_upscaled(config) -> bool:
    return getattr(config, "upscale_dim", None) is not None


# ---- the fixed kernel map of one layer ----------------------------------------------------------


class KernelMap(nn.Module):
    """The fixed part of one layer's upscaled state: per head ``support`` U ``[H, M, N]`` (unit rows),
    ``back`` Q ``[H, N, M]`` and ``mix`` D ``[H, M, N]`` (row-stochastic), all buffers (saved)."""

    def __init__(self, num_heads: int, head_dim: int, dim: int, kernel: str, gamma: float, device=None):
        super().__init__()
        self.kernel, self.gamma = kernel, float(gamma)
        H, N, M = num_heads, head_dim, dim
        self.register_buffer("support", torch.zeros(H, M, N, device=device))
        self.register_buffer("back", torch.zeros(H, N, M, device=device))
        self.register_buffer("mix", torch.zeros(H, M, N, device=device))

    @torch.no_grad()
    def set_support(self, U: torch.Tensor, ridge: float, identity: bool = False) -> None:
        """Set U (rows normalised to unit length) and derive Q and D from it."""
        U = F.normalize(U.float(), dim=-1)
        self.support.copy_(U)
        self.mix.copy_(U.square() / U.square().sum(-1, keepdim=True))
        if identity:  # U = I: Q = I exactly (no ridge), so the reduction to plain state tuning is exact
            self.back.copy_(U.transpose(-1, -2))
            return
        dots = torch.einsum("hin,hjn->hij", U, U)
        if self.kernel == "linear":
            gram = dots
        else:  # ||u_i - u_j||^2 = 2 - 2 u_i.u_j for unit rows
            gram = torch.exp(-self.gamma * (2 - 2 * dots).clamp_min(0.0))  # [H, M, M]
        eye = torch.eye(gram.shape[-1], device=gram.device)
        # Q = U^T (K_UU + ridge I)^-1: kernel ridge regression from features back to R^N (Q phi(u_j) ~ u_j).
        # K_UU + ridge I is symmetric positive definite: a Cholesky solve in fp64 (batched LU in fp32 failed
        # once on CPU at M = 256 with "pivots must be >= 1").
        chol = torch.linalg.cholesky((gram + ridge * eye).double())
        self.back.copy_(torch.cholesky_solve(U.double(), chol).float().transpose(-1, -2))

    def _kernel(self, x: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., H, N]`` (or ``[H, M', N]``) against U ``[H, M, N]`` -> ``[..., H, M]``."""
        dots = torch.einsum("...hn,hmn->...hm", x, U)
        if self.kernel == "linear":
            return dots
        d2 = x.square().sum(-1, keepdim=True) - 2 * dots + U.square().sum(-1)
        return torch.exp(-self.gamma * d2.clamp_min(0.0))

    # The feature maps (docs/methods.md, eq. U2-U5)
    def features_r(self, r: torch.Tensor) -> torch.Tensor:
        """r~ = ||r|| phi(r / ||r||) (linear kernel: U r)."""
        r = r.float()
        if self.kernel == "linear":
            return self._kernel(r, self.support)
        norm = r.norm(dim=-1, keepdim=True)
        return norm * self._kernel(r / norm.clamp_min(1e-12), self.support)

    def features_kk(self, kk: torch.Tensor) -> torch.Tensor:
        """kappa~ = normalize(phi(kappa^)) (kappa^ is RWKV-7's unit removal key)."""
        return F.normalize(self._kernel(kk.float(), self.support), dim=-1)

    def mix_channels(self, x: torch.Tensor) -> torch.Tensor:
        """D x: per-feature averages of a per-channel quantity (log decay, in-context learning rate)."""
        return torch.einsum("...hn,hmn->...hm", x.float(), self.mix)

    def project_back(self, o: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...hm,hnm->...hn", o, self.back)

    def project_state(self, S: torch.Tensor) -> torch.Tensor:
        """Projection mode: S0 = Q S Q^T, ``[..., H, M, M]`` -> ``[..., H, N, N]``."""
        return self.back @ S @ self.back.transpose(-1, -2)

    def state_inputs(self, r: torch.Tensor, mode: str) -> torch.Tensor:
        """The vectors that multiply the trainable state at the first token (DBP statistics)."""
        if mode == "projection":
            return torch.einsum("...hn,hnm->...hm", r.float(), self.back)  # o = S^T (Q^T r)
        return self.features_r(r)

    def run(self, S: torch.Tensor, r, log_w, kk, iclr, mask, output_final_state: bool = False):
        """The upscaled recurrence (eq. U6): o_t = Q (S_t^T r~_t), S_0 = S, S_t = S_{t-1} after the
        transition diag(w~_t) + b~_t a~_t^T with no write (k = v = 0). Returns ``o`` ``[B, T, H, N]`` fp32
        and, when asked, the state after the last token ``[B, H, M, M]`` (for the cache), else None."""
        r_t = self.features_r(r)
        w_t = self.mix_channels(log_w)  # convex combination of log decays: stays in RWKV-7's range
        kap = self.features_kk(kk)
        a_t, b_t = -kap, kap * self.mix_channels(iclr)
        if mask is not None:
            keep = mask[:, :, None, None]
            a_t, b_t = a_t.masked_fill(~keep, 0.0), b_t.masked_fill(~keep, 0.0)
            w_t = w_t.masked_fill(~keep, 0.0)
        zeros = torch.zeros_like(r_t)
        # w_t averages the layer's log decays (rows of `mix` are convex weights), so RWKV-7's floor bounds it
        # too: passing it spares the kernel a w.min() host sync per layer.
        o, final = wkv7(r_t, w_t, zeros, zeros, a_t, b_t, initial_state=S.float(), output_final_state=output_final_state,
                        lower_bound=-DECAY_SCALE)
        return self.project_back(o.float()), final


def random_support(num_heads: int, head_dim: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_heads, dim, head_dim, generator=g), dim=-1)


# ---- k-means support vectors from the base model's own k vectors ------------------------------------


@torch.no_grad()
def collect_removal_keys(model: nn.Module, ids_list: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
    """RWKV-7's unit removal keys kappa^ = normalize(k * k_k) per layer, ``{layer: [tokens, H, N]}``,
    read with forward hooks on each layer's ``att.key`` while the frozen model reads the texts."""
    from .model import find_rwkv7_backbone

    backbone = find_rwkv7_backbone(model)
    found: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = []
    for i in layers:
        att = backbone.blocks[i].att

        def hook(mod, args, out, att=att, i=i):
            H, N = att.num_heads, att.head_dim
            kk = F.normalize((out * att.k_k).float().reshape(-1, H, N), dim=-1)
            found[i].append(kk.cpu())

        handles.append(att.key.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        for ids in ids_list:
            if len(ids):
                model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in found.items() if v}


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Lloyd's algorithm on the unit sphere, per head: ``x`` ``[P, H, N]`` (unit rows) -> ``[H, k, N]``.
    Initial centres are distinct random samples; with fewer samples than k the rest are random."""
    P, H, N = x.shape
    g = torch.Generator().manual_seed(seed)
    centres = random_support(H, N, k, seed).clone()
    take = min(P, k)
    idx = torch.randperm(P, generator=g)[:take]
    centres[:, :take] = x[idx].transpose(0, 1)
    xh = x.transpose(0, 1)  # [H, P, N]
    for _ in range(iters):
        assign = torch.einsum("hpn,hkn->hpk", xh, centres).argmax(-1)  # [H, P]
        onehot = F.one_hot(assign, k).float()  # [H, P, k]
        sums = torch.einsum("hpk,hpn->hkn", onehot, xh)
        counts = onehot.sum(1)[..., None]
        centres = torch.where(counts > 0, F.normalize(sums, dim=-1), centres)  # empty clusters keep their centre
    return centres


def _calibration_ids(model, config) -> list[list[int]]:
    if config.calibration_ids:
        return [list(map(int, ids)) for ids in config.calibration_ids]
    from transformers import AutoTokenizer

    from modeling_rwkv7 import get_world_tokenizer

    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        tok = AutoTokenizer.from_pretrained(name) if name else get_world_tokenizer()
    except (OSError, ValueError):
        tok = get_world_tokenizer()
    return [tok(text).input_ids for text in config.calibration_texts]


def build_kernel_maps(config, model, layers: list[int], device=None) -> nn.ModuleDict:
    """One :class:`KernelMap` per targeted layer. When ``config.state_initialized`` (a saved adapter)
    the buffers stay zeros: the loaded adapter file replaces them."""
    H, N, M = config.num_heads, config.head_dim, config.upscale_dim
    maps = nn.ModuleDict({str(i): KernelMap(H, N, M, config.kernel, config.kernel_gamma, device) for i in layers})
    if config.state_initialized:
        return maps
    identity = config.support_vectors == "identity"
    if identity and M != N:
        raise ValueError(f"support_vectors='identity' needs upscale_dim == head size ({N}); got {M}")
    keys = None
    if config.support_vectors == "kmeans":
        keys = collect_removal_keys(model, _calibration_ids(model, config), layers)
    for i in layers:
        if identity:
            U = torch.eye(N).expand(H, N, N)
        elif keys is not None and i in keys:
            U = spherical_kmeans(keys[i], M, config.kmeans_iters, config.upscale_seed + i)
        else:
            U = random_support(H, N, M, config.upscale_seed * 1000 + i)
        maps[str(i)].set_support(U.to(maps[str(i)].support.device), config.upscale_ridge, identity=identity)
    return maps


# ---- the extension installed into each Rwkv7TimeMix ----------------------------------------------


class UpscaledBranch:
    """``Rwkv7TimeMix.wkv_extension`` for recurrence-mode upscaled adapters: adds the upscaled
    recurrence's output of whichever upscaled adapter is active (or per row with ``adapter_names``).
    Holds the tuner weakly; reads the states as leaf parameters, so gradient checkpointing keeps them."""

    def __init__(self, tuner):
        self._tuner = weakref.ref(tuner)

    def __call__(self, module, r, log_w, kk, iclr, mask, output_final_state=False):
        tuner = self._tuner()
        if tuner is None or "state_tuning" not in tuner._modules or tuner.state_tuning.disable_adapters:
            return None
        layer = module.layer_idx
        rows = tuner._row_adapters
        names = [n for n in tuner.active_adapters if n in tuner.adapter_states] if rows is None else list(dict.fromkeys(rows))
        # With a cache (generate(), demo scoring) each adapter's branch state after the tokens read so far
        # is kept in it, next to the model's own state, so decoding continues from there instead of S_0.
        cache = current_cache()
        continuing = cache is not None and cache.seen_tokens > 0
        total = None
        for name in names:
            states = tuner.adapter_states[name] if name in tuner.adapter_states else None
            if states is None or getattr(states, "upscale_mode", None) != "recurrence" or str(layer) not in states.wkv_up:
                continue
            key = ("peft_state_tuning.upscaled", name, layer)
            if continuing and key in cache.extension_states:
                S = cache.extension_states[key]  # [B, H, M, M]: rows of other adapters stay 0 (no write)
            else:
                S = states.effective_up(layer)[None]  # [1, H, M, M]
                if rows is not None:
                    sel = torch.tensor([n == name for n in rows], device=S.device, dtype=S.dtype)
                    S = S * sel[:, None, None, None]
            keep_final = cache is not None and output_final_state
            out, final = states.upscale[str(layer)].run(S, r, log_w, kk, iclr, mask, output_final_state=keep_final)
            if keep_final:
                cache.extension_states[key] = final.expand(r.shape[0], *final.shape[1:]).contiguous()
            total = out if total is None else total + out
        return total


def install_branch(tuner, model) -> None:
    from .model import find_rwkv7_backbone

    backbone = find_rwkv7_backbone(model)
    for block in backbone.blocks:
        if not isinstance(block.att.__dict__.get("wkv_extension"), UpscaledBranch):
            block.att.__dict__["wkv_extension"] = UpscaledBranch(tuner)


def remove_branch(model) -> None:
    """Take the upscaled branches out of the base model (``unload()``): the plain model must
    compute the plain base output again."""
    from .model import find_rwkv7_backbone

    for block in find_rwkv7_backbone(model).blocks:
        if isinstance(block.att.__dict__.get("wkv_extension"), UpscaledBranch):
            del block.att.__dict__["wkv_extension"]


def uses_recurrence(tuner) -> bool:
    return any(getattr(s, "upscale_mode", None) == "recurrence" for s in tuner.adapter_states.values())
