"""Kernel-method state upscaling (docs/methods.md, section 1)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_state_tuning  # noqa: F401
from peft_state_tuning import StateTuningConfig

from checkpoints import assert_rows_match_alone, load_base, make_base_folder, random_ids

VOCAB = 300


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base_folder(tmp_path_factory.mktemp("base_up"), hidden=128, layers=2, vocab=VOCAB, seed=21)


def ids(batch=2, length=12, seed=0):
    return random_ids(VOCAB, batch, length, seed)


def fill(states, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in states.values():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def test_only_upscaled_states_train(base_dir):
    base = load_base(base_dir)
    cfg = base.config
    M = 16
    model = get_peft_model(base, StateTuningConfig(upscale_dim=M))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"base_model.state_tuning.adapters.default.wkv_up.{i}" for i in range(cfg.num_hidden_layers)]
    assert model.get_nb_trainable_parameters()[0] == cfg.num_hidden_layers * cfg.num_heads * M * M
    x = ids()
    model.train()
    model(x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if "wkv_up" not in n)


@pytest.mark.parametrize("mode", ["recurrence", "projection"])
def test_zero_upscaled_state_gives_base_logits(base_dir, mode):
    base = load_base(base_dir)
    x = ids()
    with torch.no_grad():
        reference = base(x).logits
        model = get_peft_model(base, StateTuningConfig(upscale_dim=32, upscale_mode=mode))
        assert torch.equal(model(x).logits, reference)
        fill(model.base_model.adapter_states["default"].wkv_up, 1)
        assert not torch.allclose(model(x).logits, reference, atol=1e-3)
        with model.disable_adapter():
            assert torch.equal(model(x).logits, reference)


@pytest.mark.parametrize("mode", ["recurrence", "projection"])
def test_linear_kernel_identity_support_is_plain_state_tuning(base_dir, mode):
    """M = N, linear kernel, U = I: the upscaled adapter is exactly plain state tuning (values and gradients)."""
    N = load_base(base_dir).config.head_dim
    up = get_peft_model(load_base(base_dir), StateTuningConfig(upscale_dim=N, kernel="linear", support_vectors="identity", upscale_mode=mode))
    plain = get_peft_model(load_base(base_dir), StateTuningConfig())
    fill(up.base_model.adapter_states["default"].wkv_up, 2)
    fill(plain.base_model.adapter_states["default"].wkv, 2)
    x = ids(2, 20, seed=3)
    a, b = up(x, labels=x), plain(x, labels=x)
    if mode == "projection":  # S0 = I S I^T: bit for bit
        assert torch.equal(a.logits, b.logits)
    else:  # the same linear map, computed as a second recurrence: equal up to fp32 rounding
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for i in up.base_model.adapter_states["default"].wkv_up:
        g_up = up.base_model.adapter_states["default"].wkv_up[i].grad
        g_plain = plain.base_model.adapter_states["default"].wkv[i].grad
        torch.testing.assert_close(g_up, g_plain, rtol=1e-4, atol=1e-6)


def test_short_run_lowers_the_loss(base_dir):
    model = get_peft_model(load_base(base_dir), StateTuningConfig(upscale_dim=32, kernel_gamma=1.0))
    x = ids(4, 32, seed=5)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_kmeans_support_vectors_save_load_round_trip(base_dir, tmp_path):
    calib = [ids(1, 40, seed=s)[0].tolist() for s in range(3)]
    config = StateTuningConfig(upscale_dim=16, support_vectors="kmeans", calibration_ids=calib, kmeans_iters=5)
    model = get_peft_model(load_base(base_dir), config)
    states = model.base_model.adapter_states["default"]
    U = states.upscale["0"].support
    assert U.shape == (2, 16, 64) and torch.allclose(U.norm(dim=-1), torch.ones(2, 16))
    random_U = get_peft_model(load_base(base_dir), StateTuningConfig(upscale_dim=16)).base_model.adapter_states["default"].upscale["0"].support
    assert not torch.allclose(U, random_U)
    fill(states.wkv_up, 4)
    x = ids(2, 10, seed=6)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {"base_model.state_tuning.upscale.0.support", "base_model.state_tuning.upscale.0.back",
            "base_model.state_tuning.upscale.0.mix", "base_model.state_tuning.wkv_up.0"} <= set(saved)  # fmt: skip
    loaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    again = loaded.base_model.adapter_states["default"]
    for name, buf in states.upscale.named_buffers():
        assert torch.equal(dict(again.upscale.named_buffers())[name], buf), name


def test_mixed_batch_and_generate(base_dir):
    model = get_peft_model(load_base(base_dir), StateTuningConfig(upscale_dim=16), adapter_name="up")
    model.add_adapter("plain", StateTuningConfig())
    model.add_adapter("proj", StateTuningConfig(upscale_dim=16, upscale_mode="projection"))
    fill(model.base_model.adapter_states["up"].wkv_up, 7)
    fill(model.base_model.adapter_states["plain"].wkv, 8)
    fill(model.base_model.adapter_states["proj"].wkv_up, 9)
    x = ids(4, 10, seed=10)
    names = ["up", "__base__", "plain", "proj"]
    assert_rows_match_alone(model, x, names)
    with torch.no_grad():
        model.set_adapter("up")
        greedy = model.generate(input_ids=x[:1], max_new_tokens=4, do_sample=False)
        # greedy decoding (through the cache) equals step-by-step argmax of full forwards
        seq = x[:1]
        for _ in range(4):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(greedy, seq)


def test_unload_gives_the_plain_base_back(base_dir):
    base = load_base(base_dir)
    x = ids()
    with torch.no_grad():
        reference = base(x).logits
        model = get_peft_model(base, StateTuningConfig(upscale_dim=32, upscale_mode="recurrence"))
        fill(model.base_model.adapter_states["default"].wkv_up, 2)
        tuned = model(x).logits
        plain = model.unload()
        assert torch.equal(plain(x).logits, reference)  # the upscaled branch is gone from the base
        assert torch.equal(model(x).logits, tuned)  # and back for the PEFT model's next call


def test_upscaled_branch_state_is_carried_in_the_cache(base_dir):
    """Prefill + one token at a time through the cache gives the logits of the full sequence, per row
    of a mixed batch (the branch's state after the prompt lives in the cache), and generate() with
    and without the cache agree."""
    model = get_peft_model(load_base(base_dir), StateTuningConfig(upscale_dim=16), adapter_name="up")
    model.add_adapter("up2", StateTuningConfig(upscale_dim=32, kernel_gamma=0.5))
    fill(model.base_model.adapter_states["up"].wkv_up, 11)
    fill(model.base_model.adapter_states["up2"].wkv_up, 12)
    x = ids(3, 9, seed=13)
    names = ["up", "up2", "__base__"]
    with torch.no_grad():
        full = model(x, adapter_names=names, use_cache=False).logits
        out = model(x[:, :5], adapter_names=names, use_cache=True)
        steps, cache = [out.logits], out.cache
        assert len(cache.extension_states) == 2 * len(model.base_model.adapter_states["up"].wkv_up)
        for t in range(5, 9):
            out = model(x[:, t : t + 1], adapter_names=names, cache=cache, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
        model.set_adapter("up2")
        with_cache = model.generate(input_ids=x[:2], max_new_tokens=5, do_sample=False)
        without = model.generate(input_ids=x[:2], max_new_tokens=5, do_sample=False, use_cache=False)
        beams = model.generate(input_ids=x[:1], max_new_tokens=4, num_beams=3, do_sample=False)
        beams_nc = model.generate(input_ids=x[:1], max_new_tokens=4, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    assert torch.equal(beams, beams_nc)
