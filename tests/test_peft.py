"""StateTuning as a PEFT method, on small random RWKV-7 checkpoints in the official format."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_state_tuning  # noqa: F401  (registers STATE_TUNING)
from modeling_rwkv7 import convert_rwkv_checkpoint
from peft_state_tuning import StateTuningConfig, load_rwkv_state

from checkpoints import assert_rows_match_alone, official_model, write_official_checkpoint

VOCAB = 300


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    pth = write_official_checkpoint(tmp / "model.pth", hidden=128, layers=3, vocab=VOCAB, seed=11)
    return pth, convert_rwkv_checkpoint(pth, tmp / "hf", with_tokenizer=False)


def load_base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir[1], dtype=torch.float32).eval()


def ids(batch=2, length=12, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def set_states(peft_model, value_seed: int, adapter="default"):
    g = torch.Generator().manual_seed(value_seed)
    with torch.no_grad():
        for p in peft_model.base_model.adapter_states[adapter].wkv.values():
            p.copy_(torch.randn(p.shape, generator=g))


def test_only_states_train_and_base_is_untouched(base_dir):
    base = load_base(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, StateTuningConfig(target_layers=[0, 2]))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == ["base_model.state_tuning.adapters.default.wkv.0", "base_model.state_tuning.adapters.default.wkv.2"]
    cfg = base.config
    n_trainable, n_all = model.get_nb_trainable_parameters()
    assert n_trainable == 2 * cfg.num_heads * cfg.head_dim**2
    opt = torch.optim.AdamW(trainable.values(), lr=0.1)
    for _ in range(2):
        loss = model(ids(), labels=ids()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.abs().sum() > 0 for p in trainable.values())
    for k, v in model.get_base_model().state_dict().items():
        assert torch.equal(v, before[k]), k


def test_zero_states_and_disabled_adapter_give_base_logits(base_dir):
    base = load_base(base_dir)
    x = ids()
    with torch.no_grad():
        reference = base(x).logits
        model = get_peft_model(base, StateTuningConfig())
        assert torch.equal(model(x).logits, reference)
        set_states(model, 1)
        assert not torch.allclose(model(x).logits, reference)
        with model.disable_adapter():
            assert torch.equal(model(x).logits, reference)


def test_state_matches_official_runtime_through_export(base_dir, tmp_path):
    pth, _ = base_dir
    model = get_peft_model(load_base(base_dir), StateTuningConfig())
    set_states(model, 2)
    path = model.export_rwkv_state(tmp_path / "states.pth")
    raw = torch.load(path, weights_only=True)
    cfg = model.get_base_model().config
    assert sorted(raw) == [f"blocks.{i}.att.time_state" for i in range(cfg.num_hidden_layers)]
    assert raw["blocks.0.att.time_state"].shape == (cfg.num_heads, cfg.head_dim, cfg.head_dim)
    ref = official_model(pth)
    state = ref.generate_zero_state()
    for i in range(cfg.num_hidden_layers):
        state[3 * i + 1] = raw[f"blocks.{i}.att.time_state"].clone()
    tokens = ids(1, 15, seed=3)
    with torch.no_grad():
        ours = model(tokens).logits[0]
    theirs, _ = ref.forward(tokens[0].tolist(), state, full_output=True)
    assert (ours - theirs).abs().max() <= 1e-4
    # ... and back: a PeftModel created from RWKV's own state file has the same states.
    again = get_peft_model(load_base(base_dir), StateTuningConfig(init="rwkv_state", init_state_file=str(path)))
    for i in range(cfg.num_hidden_layers):
        torch.testing.assert_close(again.base_model.adapter_states["default"].wkv[str(i)], model.base_model.adapter_states["default"].wkv[str(i)])
    assert sorted(load_rwkv_state(path)) == list(range(cfg.num_hidden_layers))


def test_mixed_adapters_in_one_batch_equal_rows_alone(base_dir):
    model = get_peft_model(load_base(base_dir), StateTuningConfig(), adapter_name="a")
    model.add_adapter("b", StateTuningConfig(target_layers=[1]))
    set_states(model, 4, "a")
    set_states(model, 5, "b")
    x = ids(3, 10, seed=6)
    names = ["a", "__base__", "b"]
    assert_rows_match_alone(model, x, names)
    with torch.no_grad():
        gen_mixed = model.generate(input_ids=x, adapter_names=names, max_new_tokens=4, do_sample=False)
        model.set_adapter("b")
        gen_b = model.generate(input_ids=x[2:3], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_mixed[2:3], gen_b)
    model.delete_adapter("b")
    assert list(model.base_model.adapter_states) == ["a"]


def test_generate_with_beams_sampling_and_left_padding(base_dir):
    model = get_peft_model(load_base(base_dir), StateTuningConfig())
    set_states(model, 7)
    a, b = ids(1, 6, seed=8), ids(1, 9, seed=9)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1), torch.ones(1, 9)]).long()
    with torch.no_grad():
        padded = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
        alone = model.generate(input_ids=a, max_new_tokens=5, do_sample=False)
        beams = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=4, num_beams=3)
        sampled = model.generate(input_ids=a, do_sample=True, max_new_tokens=4, num_return_sequences=3)
    assert torch.equal(padded[0, -5:], alone[0, -5:])
    assert beams.shape == (2, 13) and sampled.shape == (3, 10)


def test_save_load_in_a_new_process(base_dir, tmp_path):
    base = load_base(base_dir)
    model = get_peft_model(base, StateTuningConfig(tune_token_shift=True))
    set_states(model, 10)
    with torch.no_grad():
        for p in model.base_model.adapter_states["default"].att_shift.values():
            p.normal_()
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 200_000
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_fingerprint"].startswith("rwkv7-fp1:")  # checked by the loads in the new process
    x = ids(2, 8, seed=12)
    with torch.no_grad():
        expected = model(x).logits
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch, peft_state_tuning
        from peft import PeftModel, AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / 'io.pt')!r})
        base = AutoModelForCausalLM.from_pretrained({str(base_dir[1])!r}, dtype=torch.float32)
        m = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
        with torch.no_grad():
            assert torch.equal(m(io["x"]).logits, io["expected"])
        m2 = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r}, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(m2(io["x"]).logits, io["expected"])
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_adapter_for_another_base_is_refused(base_dir, tmp_path):
    model = get_peft_model(load_base(base_dir), StateTuningConfig())
    model.save_pretrained(tmp_path / "adapter")
    other_pth = write_official_checkpoint(tmp_path / "other.pth", hidden=128, layers=2, vocab=VOCAB)
    other = AutoModelForCausalLM.from_pretrained(convert_rwkv_checkpoint(other_pth, tmp_path / "other", with_tokenizer=False))
    with pytest.raises(ValueError, match="num_layers: adapter 3 vs base 2"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")


def test_non_rwkv_model_is_refused():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="needs an RWKV-7 model"):
        get_peft_model(lin, StateTuningConfig())


def test_merge_gives_a_clear_message_and_plain_model_alternative(base_dir):
    model = get_peft_model(load_base(base_dir), StateTuningConfig())
    set_states(model, 13)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    state = model.get_initial_state()
    base = model.unload()
    with torch.no_grad():
        assert torch.equal(base(x, initial_state=state).logits, expected)


def test_prompt_initialisation_distils_the_prompt(base_dir):
    base = load_base(base_dir)
    prompt = "\x10\x11\x12"  # control bytes: world ids < 300, inside this small test vocabulary
    from modeling_rwkv7 import get_world_tokenizer

    tok_ids = get_world_tokenizer()(prompt).input_ids
    assert max(tok_ids) < VOCAB
    model = get_peft_model(base, StateTuningConfig(init="prompt", init_prompt=prompt, tune_token_shift=True))
    x = ids(1, 6, seed=14)
    with torch.no_grad():
        with_prompt = base(torch.cat([torch.tensor([tok_ids]), x], 1)).logits[:, -6:]
        torch.testing.assert_close(model(x).logits, with_prompt, rtol=1e-4, atol=1e-4)


def test_push_to_hub_uploads_adapter_and_model_card(base_dir):
    model = get_peft_model(load_base(base_dir), StateTuningConfig())
    uploaded = {}

    def fake_create_commit(self, repo_id, operations, *args, **kwargs):
        for op in operations:
            content = op.path_or_fileobj
            uploaded[op.path_in_repo] = open(content, "rb").read() if isinstance(content, str) else content
        return mock.MagicMock(commit_url="https://example.invalid/commit", oid="0" * 40)

    with (
        mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.MagicMock(repo_id="me/my-states")),
        mock.patch("huggingface_hub.HfApi.create_commit", fake_create_commit),
    ):
        model.push_to_hub("me/my-states", token="dummy")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded)
    card = uploaded["README.md"].decode() if isinstance(uploaded["README.md"], bytes) else str(uploaded["README.md"])
    assert "library_name: peft" in card and "state-tuning" in card and "rwkv7" in card
    assert str(base_dir[1]) in card  # base_model
    config = json.loads(uploaded["adapter_config.json"])
    assert config["peft_type"] == "STATE_TUNING"


def test_trainer_lowers_the_loss_and_checkpointing_keeps_gradients(base_dir, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    text = ids(1, 64, seed=20)[0].tolist()  # a fixed "toy text"
    data = Dataset.from_dict({"input_ids": [text] * 16, "labels": [text] * 16})

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model = get_peft_model(load_base(base_dir), StateTuningConfig())
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        x = torch.tensor([text, text[::-1]])
        model(x, labels=x).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for g0, g1 in zip(grads(False), grads(True)):
        assert g0.abs().sum() > 0
        torch.testing.assert_close(g0, g1)

    model = get_peft_model(load_base(base_dir), StateTuningConfig())
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=0.05, gradient_checkpointing=True, logging_steps=4, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.1, (before, after)


def test_peft_prompt_tuning_runs_on_the_model(base_dir):
    """Generic PEFT methods read the usual config names (num_attention_heads) and work on our model."""
    from peft import PromptTuningConfig

    model = get_peft_model(load_base(base_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.train()
    x = ids(2, 7, seed=30)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and model.prompt_encoder["default"].embedding.weight.grad is not None
