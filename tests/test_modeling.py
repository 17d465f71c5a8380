"""RWKV-7 model tests, with pip ``rwkv``'s official x070 implementation as the oracle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_rwkv7 import Rwkv7ForCausalLM, Rwkv7State, convert_rwkv_checkpoint
from modeling_rwkv7.convert import CheckpointFormatError, fla_to_hf, hf_to_fla

from checkpoints import official_model, write_official_checkpoint

TOL = 1e-4

SIZES = [
    # (hidden, layers, ranks (w, a, v, g), layer-0 v LoRA present, vocab)
    (128, 2, (32, 32, 16, 32), True, 300),
    (192, 3, (16, 48, 32, 64), False, 257),
]


@pytest.fixture(scope="module", params=range(len(SIZES)), ids=lambda i: f"size{i}")
def converted(request, tmp_path_factory):
    hidden, layers, ranks, layer0_v, vocab = SIZES[request.param]
    tmp = tmp_path_factory.mktemp("ckpt")
    pth = write_official_checkpoint(
        tmp / "model.pth", hidden=hidden, layers=layers, ranks=ranks, layer0_v=layer0_v, vocab=vocab, seed=request.param
    )
    out = convert_rwkv_checkpoint(pth, tmp / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return pth, out, model, official_model(pth)


def test_full_sequence_logits_match_official(converted):
    _, _, model, ref = converted
    ids = torch.randint(0, model.config.vocab_size, (1, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits[0]
    theirs, _ = ref.forward(ids[0].tolist(), None, full_output=True)
    assert (ours - theirs).abs().max() <= TOL


def test_token_by_token_with_cache_matches_official(converted):
    _, _, model, ref = converted
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    cache, state = None, None
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            theirs, state = ref.forward([int(ids[0, t])], state)
            assert (out.logits[0, -1] - theirs).abs().max() <= TOL


def test_nonzero_initial_state_matches_official(converted):
    _, _, model, ref = converted
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    H, N, C, L = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.num_hidden_layers
    state = Rwkv7State(
        wkv=[torch.randn(1, H, N, N, generator=g) for _ in range(L)],
        att_shift=[torch.randn(1, C, generator=g) for _ in range(L)],
        ffn_shift=[torch.randn(1, C, generator=g) for _ in range(L)],
    )
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=g)
    with torch.no_grad():
        ours = model(ids, initial_state=state).logits[0]
    theirs, _ = ref.forward(ids[0].tolist(), [t.clone() for t in state.to_official()], full_output=True)
    assert (ours - theirs).abs().max() <= TOL


def test_cache_state_read_out_and_fed_back(converted):
    """Continue a conversation from a saved state: state after part 1 + part 2 == whole text."""
    _, _, model, _ = converted
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model(ids).logits
        saved = model(ids[:, :17], use_cache=True).cache.state.detach()
        rest = model(ids[:, 17:], initial_state=saved).logits
    assert (whole[:, 17:] - rest).abs().max() <= TOL


def test_left_padding_equals_unpadded(converted):
    _, _, model, _ = converted
    cfg = model.config
    g = torch.Generator().manual_seed(5)
    state = [torch.randn(1, cfg.num_heads, cfg.head_dim, cfg.head_dim, generator=g) for _ in range(cfg.num_hidden_layers)]
    a = torch.randint(1, cfg.vocab_size, (1, 9), generator=g)
    b = torch.randint(1, cfg.vocab_size, (1, 14), generator=g)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), a], 1), b])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 9)], 1), torch.ones(1, 14)]).long()
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, initial_state=state).logits
        alone_a = model(a, initial_state=state).logits
        alone_b = model(b, initial_state=state).logits
        assert (padded[0, 5:] - alone_a[0]).abs().max() <= TOL
        assert (padded[1] - alone_b[0]).abs().max() <= TOL
        gen = model.generate(batch, attention_mask=mask, initial_state=state, max_new_tokens=6, do_sample=False)
        gen_a = model.generate(a, initial_state=state, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen[0, -6:], gen_a[0, -6:])


def test_generate_with_cache_equals_stepwise_forward(converted):
    _, _, model, _ = converted
    ids = torch.randint(1, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        seq = ids
        for _ in range(8):  # greedy by full re-computation, no cache
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


def test_beam_search_and_sampling(converted):
    _, _, model, _ = converted
    ids = torch.randint(1, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        beams = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False)
        beams_nocache = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False)
        torch.manual_seed(0)
        sampled = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=20, num_return_sequences=2)
    assert torch.equal(beams, beams_nocache)
    assert sampled.shape == (4, 10)


def test_generate_continues_from_a_cache_passed_in(converted):
    """A conversation's cache (the state after its first tokens) passed to generate() with the whole
    history gives the tokens of generating from scratch: only the unseen tokens are read."""
    _, _, model, _ = converted
    ids = torch.randint(1, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = model(ids[:, :8], use_cache=True).cache
        continued = model.generate(ids, cache=cache, max_new_tokens=4, do_sample=False)
        scratch = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(continued, scratch)


def test_initial_state_gets_gradient_with_and_without_checkpointing(converted):
    _, _, model, _ = converted
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(8))
    grads = []
    for checkpointing in (False, True):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        state = [
            torch.full((1, cfg.num_heads, cfg.head_dim, cfg.head_dim), 0.01, requires_grad=True)
            for _ in range(cfg.num_hidden_layers)
        ]
        loss = model(ids, labels=ids, initial_state=state).loss
        loss.backward()
        grads.append([s.grad.clone() for s in state])
        model.gradient_checkpointing_disable()
        model.eval()
    for g0, g1 in zip(*grads):
        assert g0.abs().sum() > 0
        torch.testing.assert_close(g0, g1)


def test_fla_folder_loads_and_round_trips(converted, tmp_path):
    _, hf_dir, model, _ = converted
    cfg = model.config
    ours = model.state_dict()
    fla_sd = hf_to_fla(ours, cfg)
    assert "model.layers.0.attn.v_lora.lora.0.weight" not in fla_sd  # fla drops layer 0's v LoRA
    assert fla_sd["model.layers.1.attn.w_lora.lora.0.weight"].shape == (cfg.decay_low_rank_dim, cfg.hidden_size)
    back = fla_to_hf(fla_sd, cfg)
    for key, value in ours.items():
        if key.startswith("model.blocks.0.att.v"):
            continue  # unused, zero-filled on the way back
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)
    fla_dir = tmp_path / "fla"
    fla_dir.mkdir()
    save_file({k: v.contiguous() for k, v in fla_sd.items()}, fla_dir / "model.safetensors")
    fla_config = {
        "model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"], "attn_mode": "chunk",
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers, "head_dim": cfg.head_dim,
        "decay_low_rank_dim": cfg.decay_low_rank_dim, "a_low_rank_dim": cfg.a_low_rank_dim,
        "v_low_rank_dim": cfg.v_low_rank_dim, "gate_low_rank_dim": cfg.gate_low_rank_dim,
        "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size, "norm_eps": 1e-5,
        "fuse_norm": True, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    }  # fmt: skip
    (fla_dir / "config.json").write_text(json.dumps(fla_config))
    fla_model = AutoModelForCausalLM.from_pretrained(fla_dir)
    assert isinstance(fla_model, Rwkv7ForCausalLM)
    assert fla_model.config.eos_token_id == 0  # fla's default 2 is a byte in the world vocabulary
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(fla_model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_converted_folder_and_bf16_checkpoint(tmp_path):
    pth = write_official_checkpoint(tmp_path / "m.pth", hidden=128, layers=2, vocab=65536, dtype=torch.bfloat16)
    subprocess.run([sys.executable, "-m", "modeling_rwkv7.convert", str(pth), str(tmp_path / "hf")], check=True)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= files
    assert AutoConfig.from_pretrained(tmp_path / "hf").model_type == "rwkv7"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ref = official_model(pth)
    ids = [11, 261, 33, 1000, 40000]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    theirs, _ = ref.forward(ids, None, full_output=True)
    assert (ours - theirs).abs().max() <= TOL


def test_foreign_checkpoint_keys_are_refused(tmp_path):
    from checkpoints import random_official_state_dict

    sd = random_official_state_dict(layers=1)
    sd["blocks.0.ffn.s_emb.weight"] = torch.zeros(4, 4)  # an rwkv7a (DeepEmbed) key
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(CheckpointFormatError, match="rwkv7a"):
        convert_rwkv_checkpoint(tmp_path / "x.pth", tmp_path / "out")


def test_registration_survives_a_prior_rwkv7_registration():
    code = (
        "from transformers import AutoConfig, PretrainedConfig\n"
        "class Other(PretrainedConfig):\n    model_type = 'rwkv7'\n"
        "AutoConfig.register('rwkv7', Other)\n"
        "import modeling_rwkv7\n"
        "from transformers import AutoModelForCausalLM\n"
        "cfg = AutoConfig.for_model('rwkv7', hidden_size=64, num_hidden_layers=1, vocab_size=16)\n"
        "assert type(cfg).__name__ == 'Rwkv7Config', type(cfg)\n"
        "m = AutoModelForCausalLM.from_config(cfg)\n"
        "assert type(m).__name__ == 'Rwkv7ForCausalLM'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunked_training_loss_equals_full_loss(converted):
    _, _, model, _ = converted
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(9))
    labels = ids.clone()
    labels[0, :5] = -100
    head_grads = []
    for chunked in (False, True):
        model.train()
        model.config.chunked_loss_in_training = chunked
        model.head.weight.requires_grad_(True)
        model.zero_grad()
        out = model(ids, labels=labels)
        assert (out.logits is None) == chunked
        out.loss.backward()
        head_grads.append((out.loss.detach(), model.head.weight.grad.clone(), model.model.emb.weight.grad.clone()))
    model.eval()
    model.config.chunked_loss_in_training = True
    for full, chunked in zip(*head_grads):
        torch.testing.assert_close(full, chunked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_function_matches_cross_entropy(dtype, backend, monkeypatch):
    """Several chunks (the last one partial), ignored labels: loss and both gradients equal those of
    ``F.cross_entropy`` on the full fp32 logits of the same (rounded) inputs, with either backend of the
    fused loss kernel (Triton under TRITON_INTERPRET=1)."""
    from modeling_rwkv7.modeling_rwkv7 import _ChunkedLMLoss

    monkeypatch.setenv("RWKV7_CE_BACKEND", backend)

    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(23, 16, generator=g) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(50, 16, generator=g) / 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (23,), generator=g)
    labels[[0, 7, 22]] = -100
    total = _ChunkedLMLoss.apply(hidden, weight, labels, 5)
    (total * 0.37).backward()
    h_ref = hidden.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    logits = (h_ref @ w_ref.t()).float()
    ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    (ref * 0.37).backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(total, ref, **tol)
    torch.testing.assert_close(hidden.grad.float(), h_ref.grad.float(), **tol)
    torch.testing.assert_close(weight.grad.float(), w_ref.grad.float(), **tol)


def test_chunked_loss_without_grad_mode_computes_no_gradients():
    """Evaluation (no_grad): the same loss, and a result with no backward (the gradients are skipped)."""
    from modeling_rwkv7.modeling_rwkv7 import _ChunkedLMLoss

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 8, generator=g, requires_grad=True)
    weight = torch.randn(20, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 20, (9,), generator=g)
    with torch.no_grad():
        evaluated = _ChunkedLMLoss.apply(hidden, weight, labels, 4, torch.is_grad_enabled())
    assert evaluated.grad_fn is None
    trained = _ChunkedLMLoss.apply(hidden, weight, labels, 4, torch.is_grad_enabled())
    torch.testing.assert_close(evaluated, trained.detach())


def test_hooks_on_the_time_mix_still_run(converted):
    """A block calls its time mix's steps itself (fewer compiled graphs); with a forward hook on ``att`` it makes
    the module call instead, so the hook runs, and the logits are the same either way."""
    _, _, model, _ = converted
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        seen = []
        handle = model.model.blocks[1].att.register_forward_hook(lambda mod, args, out: seen.append(out[0].shape))
        try:
            hooked = model(input_ids=ids).logits
        finally:
            handle.remove()
    assert seen == [torch.Size([2, 9, model.config.hidden_size])]
    assert torch.equal(plain, hooked)
