"""Bad input gets a clear error (type + what is wrong + what to do); saves are atomic.

``BAD_INPUTS`` is the table of the issue's bad inputs: each row builds one bad input, runs what a
user would run, and asserts the exception type and a message naming the problem and the fix.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import peft_state_tuning  # noqa: F401  (registers STATE_TUNING)
from modeling_rwkv7 import Rwkv7State, convert_rwkv_checkpoint, get_world_tokenizer
from modeling_rwkv7.convert import CheckpointFormatError, load_official_checkpoint
from modeling_rwkv7.tokenization_rwkv7_bytes import Rwkv7ByteTokenizer
from peft_state_tuning import AdapterFormatError, StateTuningConfig, load_rwkv_state
from peft_state_tuning.fingerprint import ALLOW_OTHER_BASE_ENV, base_model_fingerprint

from checkpoints import random_official_state_dict, write_official_checkpoint

VOCAB = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    pth = write_official_checkpoint(tmp / "model.pth", hidden=128, layers=2, vocab=VOCAB, seed=3)
    hf = convert_rwkv_checkpoint(pth, tmp / "hf", with_tokenizer=False)
    other_pth = write_official_checkpoint(tmp / "other.pth", hidden=128, layers=3, vocab=VOCAB, seed=4)
    other = convert_rwkv_checkpoint(other_pth, tmp / "other", with_tokenizer=False)
    # Base B: the same shape as the adapter's base A, other weights (what the fingerprint must catch).
    twin_pth = write_official_checkpoint(tmp / "twin.pth", hidden=128, layers=2, vocab=VOCAB, seed=5)
    twin = convert_rwkv_checkpoint(twin_pth, tmp / "twin", with_tokenizer=False)
    model = get_peft_model(load(hf), StateTuningConfig())
    with torch.no_grad():
        for p in model.base_model.adapter_states["default"].wkv.values():
            p.normal_()
    model.save_pretrained(tmp / "adapter")
    return {"tmp": tmp, "pth": pth, "hf": hf, "other": other, "twin": twin, "adapter": tmp / "adapter"}


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def adapter_copy(env, edit_config=None, edit_weights=None):
    """A copy of the good adapter with its config and/or weights file edited."""
    dst = env["tmp"] / f"variant-{time.monotonic_ns()}"
    shutil.copytree(env["adapter"], dst)
    if edit_config is not None:
        config = json.loads((dst / "adapter_config.json").read_text())
        edit_config(config)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    if edit_weights is not None:
        edit_weights(dst / "adapter_model.safetensors")
    return dst


def load_adapter_variant(env, **edits):
    return PeftModel.from_pretrained(load(env["hf"]), adapter_copy(env, **edits))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_tensors(fn):
    def edit(path):
        tensors = load_file(path)
        fn(tensors)
        save_file(tensors, path)

    return edit


def poison_first(tensors):
    key = sorted(tensors)[0]
    tensors[key][0, 0, 0] = float("nan")


def corrupt_model_folder(env):
    dst = env["tmp"] / f"model-{time.monotonic_ns()}"
    shutil.copytree(env["hf"], dst)
    truncate(dst / "model.safetensors")
    return load(dst)


def state_file(env, tensor, suffix=".pth"):
    path = env["tmp"] / f"state-{time.monotonic_ns()}{suffix}"
    tensors = {"blocks.0.att.time_state": tensor}
    save_file(tensors, path) if suffix == ".safetensors" else torch.save(tensors, path)
    return load_rwkv_state(path, num_heads=2, head_dim=64)


def forward(env, input_ids, **kwargs):
    return load(env["hf"])(input_ids=input_ids, **kwargs)


def mixed_adapters(env, names, batch):
    model = PeftModel.from_pretrained(load(env["hf"]), env["adapter"])
    return model(input_ids=torch.ones(batch, 4, dtype=torch.long), adapter_names=names)


def load_adapter_onto_twin(env):
    model = get_peft_model(load(env["twin"]), StateTuningConfig())
    return model.load_adapter(env["adapter"], adapter_name="trained_on_a")


def auto_peft_onto_twin(env):  # adapter_config.json names base B: AutoPeftModel loads B, then the adapter
    folder = adapter_copy(env, edit_config=lambda c: c.update(base_model_name_or_path=str(env["twin"])))
    return AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


OTHER_BASE = [r"was trained on another base model", r"records base fingerprint rwkv7-fp1:[0-9a-f]{16}",
              r"has fingerprint rwkv7-fp1:[0-9a-f]{16}", r"tied to the weights that read it",
              rf"set the environment variable {ALLOW_OTHER_BASE_ENV}=1"]  # fmt: skip


def no_marker_written(marker):  # helper of the pickled-code row, see test_pickled_code_is_not_run
    assert not marker.exists()


# (id, action(env), exception type, regexes the message must match: what is wrong, what to do)
BAD_INPUTS = [
    ("non-rwkv7-model", lambda env: get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), StateTuningConfig()),
     TypeError, [r"needs an RWKV-7 model", r"modeling_rwkv7\.convert"]),
    ("adapter-for-more-layers", lambda env: PeftModel.from_pretrained(load(env["other"]), env["adapter"]),
     ValueError, [r"another base model \(num_layers: adapter 2 vs base 3\)", r"Load it onto the base"]),
    ("adapter-for-another-base-same-shape", lambda env: PeftModel.from_pretrained(load(env["twin"]), env["adapter"]),
     ValueError, OTHER_BASE + [r"base_model_name_or_path: '.*/hf'"]),
    ("adapter-for-another-base-load_adapter", load_adapter_onto_twin, ValueError, OTHER_BASE),
    ("adapter-for-another-base-auto-peft", auto_peft_onto_twin, ValueError, OTHER_BASE + [r"this base \('.*/twin'\)"]),
    ("config-fingerprint-wrong-type", lambda env: load_adapter_variant(env, edit_config=lambda c: c.update(base_model_fingerprint=123)),
     TypeError, [r"`base_model_fingerprint` must be null or a string", r"fix that value"]),
    ("adapter-for-other-head-size", lambda env: load_adapter_variant(env, edit_weights=edit_tensors(
        lambda t: t.update({k: torch.zeros(4, 32, 32) for k in t}))),
     AdapterFormatError, [r"shape \(4, 32, 32\) but this base model needs \(2, 64, 64\)", r"Load it onto the base"]),
    ("config-missing-peft_type", lambda env: load_adapter_variant(env, edit_config=lambda c: c.pop("peft_type")),
     AdapterFormatError, [r"no 'peft_type' field", r'add "peft_type": "STATE_TUNING"']),
    ("config-misspelt-field", lambda env: load_adapter_variant(env, edit_config=lambda c: c.update(target_layer=[0])),
     ValueError, [r"unknown field 'target_layer'", r"did you mean 'target_layers'"]),
    ("config-target_layers-wrong-type", lambda env: load_adapter_variant(env, edit_config=lambda c: c.update(target_layers="all")),
     TypeError, [r"`target_layers` must be null or a list of layer indices, e.g. \[0, 1, 2\]; got 'all' \(str\)", r"fix that value"]),
    ("config-num_layers-as-string", lambda env: load_adapter_variant(env, edit_config=lambda c: c.update(num_layers="2")),
     TypeError, [r"`num_layers` must be null or a positive integer; got '2'", r"fix that value"]),
    ("config-bool-as-string", lambda env: load_adapter_variant(env, edit_config=lambda c: c.update(tune_token_shift="yes")),
     TypeError, [r"`tune_token_shift` must be true or false", r"fix that value"]),
    ("config-bad-init", lambda env: load_adapter_variant(env, edit_config=lambda c: c.update(init="ones")),
     ValueError, [r"init must be 'zeros', 'prompt' or 'rwkv_state'; got 'ones'"]),
    ("config-not-json", lambda env: PeftModel.from_pretrained(load(env["hf"]), _break_json(adapter_copy(env))),
     AdapterFormatError, [r"adapter_config.json is not valid JSON", r"re-download, or save the adapter again"]),
    ("adapter-weights-truncated", lambda env: load_adapter_variant(env, edit_weights=truncate),
     AdapterFormatError, [r"adapter_model.safetensors is truncated or corrupt", r"download it again or re-save"]),
    ("adapter-weights-garbage", lambda env: load_adapter_variant(env, edit_weights=lambda p: p.write_bytes(b"\x00" * 64)),
     AdapterFormatError, [r"adapter_model.safetensors is truncated or corrupt", r"download it again or re-save"]),
    ("adapter-weights-missing", lambda env: load_adapter_variant(env, edit_weights=os.unlink),
     AdapterFormatError, [r"no adapter_model.safetensors", r"Copy the whole adapter folder"]),
    ("adapter-weights-nan", lambda env: load_adapter_variant(env, edit_weights=edit_tensors(poison_first)),
     AdapterFormatError, [r"state wkv.0 contains NaN or Inf", r"use an earlier checkpoint"]),
    ("adapter-weights-lack-a-state", lambda env: load_adapter_variant(env, edit_weights=edit_tensors(
        lambda t: t.pop(sorted(t)[-1]))),
     AdapterFormatError, [r"lacks the states \['wkv.1'\]", r"Re-save the adapter"]),
    ("adapter-weights-foreign-state", lambda env: load_adapter_variant(env, edit_weights=edit_tensors(
        lambda t: t.update({"base_model.state_tuning.wkv.9": torch.zeros(2, 64, 64)}))),
     AdapterFormatError, [r"holds states \['wkv.9'\]", r"do not belong together"]),
    ("model-safetensors-truncated", corrupt_model_folder,
     CheckpointFormatError, [r"model.safetensors: truncated or corrupt", r"download or convert the model again"]),
    ("pth-not-a-checkpoint", lambda env: load_official_checkpoint(_write(env, "junk.pth", b"not a zip")),
     CheckpointFormatError, [r"could not load .*junk.pth", r"Only plain tensor state dicts are accepted"]),
    ("state-file-nan", lambda env: state_file(env, torch.full((2, 64, 64), float("nan"))),
     ValueError, [r"time_state contains NaN or Inf"]),
    ("state-file-inf-safetensors", lambda env: state_file(env, torch.full((2, 64, 64), float("inf")), ".safetensors"),
     ValueError, [r"time_state contains NaN or Inf"]),
    ("state-file-other-size", lambda env: state_file(env, torch.zeros(4, 32, 32)),
     ValueError, [r"made for another model size"]),
    ("empty-batch", lambda env: forward(env, torch.zeros(0, 5, dtype=torch.long)),
     ValueError, [r"batch is empty \(0 rows\)", r"pass at least one sequence"]),
    ("zero-length-sequence", lambda env: forward(env, torch.zeros(2, 0, dtype=torch.long)),
     ValueError, [r"zero tokens", r"pass at least one token"]),
    ("token-id-too-large", lambda env: forward(env, torch.tensor([[1, 2, VOCAB]])),
     ValueError, [rf"outside \[0, {VOCAB}\): min 1, max {VOCAB}", r"tokenizer matches the model"]),
    ("token-id-negative", lambda env: forward(env, torch.tensor([[-1, 2]])),
     ValueError, [rf"outside \[0, {VOCAB}\): min -1", r"tokenizer matches the model"]),
    # without a cache (training) the check is read after the blocks are queued: the same error, nothing returned
    ("token-id-too-large-training", lambda env: forward(env, torch.tensor([[1, 2, VOCAB]]), use_cache=False,
                                                        labels=torch.tensor([[1, 2, 3]])),
     ValueError, [rf"outside \[0, {VOCAB}\): min 1, max {VOCAB}", r"tokenizer matches the model"]),
    ("token-ids-float", lambda env: forward(env, torch.tensor([[1.0, 2.0]])),
     TypeError, [r"input_ids must be integer token ids \(torch.long\); got dtype torch.float32"]),
    ("token-ids-1d", lambda env: forward(env, torch.tensor([1, 2])),
     ValueError, [r"input_ids must have shape \[batch, seq_len\]; got \(2,\)"]),
    ("attention-mask-wrong-shape", lambda env: forward(env, torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3)),
     ValueError, [r"attention_mask must have shape \(2, 4\); got \(2, 3\)"]),
    ("adapter_names-unknown", lambda env: mixed_adapters(env, ["default", "nope"], 2),
     ValueError, [r"unknown adapter\(s\) \['nope'\]", r"loaded: \['default'\]"]),
    ("adapter_names-wrong-length", lambda env: mixed_adapters(env, ["default"], 2),
     ValueError, [r"adapter_names has 1 entries but the batch has 2 rows"]),
    ("tokenizer-lone-surrogate", lambda env: get_world_tokenizer()("a\udcffb"),
     ValueError, [r"can't encode character '\\udcff' in position 1: lone surrogate", r"Clean the text",
                  r"encode_bytes\(text.encode\('utf-8', 'surrogateescape'\)\)"]),
    ("byte-tokenizer-lone-surrogates", lambda env: Rwkv7ByteTokenizer()(["ok", "xy\ud800z"]),
     ValueError, [r"can't encode character '\\ud800' in position 2: lone surrogate", r"Clean the text"]),
]  # fmt: skip


def _break_json(folder):
    (folder / "adapter_config.json").write_text('{"peft_type": "STATE_TUNING", ')
    return folder


def _write(env, name, data: bytes):
    path = env["tmp"] / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("action, error, patterns", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gives_a_clear_error(env, action, error, patterns, monkeypatch):
    monkeypatch.delenv(ALLOW_OTHER_BASE_ENV, raising=False)  # the override would turn the other-base rows off
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as info:
            action(env)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_bad_ids_leave_a_given_cache_untouched(env):
    """With a cache the id check runs before any block: a bad id raises and the cache is not written."""
    model = load(env["hf"])
    cache = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True).cache
    before = [t.clone() for t in cache.state.wkv]
    with pytest.raises(ValueError, match="outside"):
        model(input_ids=torch.tensor([[4, VOCAB]]), cache=cache, use_cache=True)
    assert cache.seen_tokens == 3 and all(torch.equal(a, b) for a, b in zip(before, cache.state.wkv))


def test_unknown_config_field_from_a_newer_version_warns_and_loads(env):
    """Forward compatibility (PEFT's policy): a field we do not know and that is no misspelling of
    ours is dropped with a warning that says what to do; the adapter still loads."""
    folder = adapter_copy(env, edit_config=lambda c: c.update(some_future_option=True))
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['some_future_option'\].*upgrade"):
        model = PeftModel.from_pretrained(load(env["hf"]), folder)
    assert "default" in model.base_model.adapter_states


class _RunsCode:
    """Pickles into "call pathlib.Path.touch(marker)": harmless proof that loading ran pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_not_run(env, tmp_path):
    from checkpoints import random_official_state_dict

    sd = random_official_state_dict(layers=1)
    marker = tmp_path / "code-ran"
    sd["blocks.0.att.r_k"] = sd["blocks.0.att.r_k"]  # a real checkpoint ...
    payload = {**sd, "__payload__": _RunsCode(marker)}  # ... carrying code to run on load
    torch.save(payload, tmp_path / "evil.pth")
    torch.save({"blocks.0.att.time_state": torch.zeros(2, 64, 64), "x": _RunsCode(marker)}, tmp_path / "evil_state.pth")
    with pytest.raises(CheckpointFormatError, match=r"(?s)as a weights-only PyTorch checkpoint.*Unsupported global.*files that need pickled code are refused"):
        convert_rwkv_checkpoint(tmp_path / "evil.pth", tmp_path / "out")
    with pytest.raises(ValueError, match=r"(?s)could not read the RWKV state file .*Expected a weights-only"):
        load_rwkv_state(tmp_path / "evil_state.pth")
    no_marker_written(marker)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_all_padding_rows_do_not_crash_and_leave_the_state_untouched(env):
    model = load(env["hf"])
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    state = Rwkv7State(
        wkv=[torch.randn(2, cfg.num_heads, cfg.head_dim, cfg.head_dim, generator=g) for _ in range(cfg.num_hidden_layers)],
        att_shift=[torch.randn(2, cfg.hidden_size, generator=g) for _ in range(cfg.num_hidden_layers)],
        ffn_shift=[torch.randn(2, cfg.hidden_size, generator=g) for _ in range(cfg.num_hidden_layers)],
    )
    ids = torch.randint(1, VOCAB, (2, 6), generator=g)
    mask = torch.tensor([[0] * 6, [1] * 6])
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, initial_state=state, use_cache=True, labels=labels)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    for entries, final in ((state.wkv, out.cache.state.wkv), (state.att_shift, out.cache.state.att_shift), (state.ffn_shift, out.cache.state.ffn_shift)):
        for before, after in zip(entries, final):
            assert torch.equal(after[0], before[0].to(after.dtype))  # the all-padding row: untouched
            assert not torch.equal(after[1], before[1].to(after.dtype))  # the real row moved on
    # A batch that is all padding, through a state-tuning adapter: no crash, the adapter's state kept.
    peft_model = PeftModel.from_pretrained(load(env["hf"]), env["adapter"])
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=torch.zeros_like(ids), use_cache=True)
    tuned = peft_model.base_model.adapter_states["default"].wkv["0"]
    assert torch.equal(out.cache.state.wkv[0][0], tuned) and torch.equal(out.cache.state.wkv[0][1], tuned)


def test_invalid_utf8_decodes_with_replacement_or_a_clear_error():
    tok = get_world_tokenizer()
    ids = tok.encode_bytes(b"ok \xe4\xb8")  # ends inside a 3-byte character
    assert tok.decode(ids) == "ok \ufffd"  # default errors="replace": never crashes mid-generation
    assert tok.decode_bytes(ids) == b"ok \xe4\xb8"  # the raw bytes are still available
    with pytest.raises(UnicodeDecodeError, match="unexpected end of data"):
        tok.decode(ids, errors="strict")
    assert tok.encode_bytes(b"\xff\xfe\x80abc")  # invalid UTF-8 input bytes tokenise byte by byte


@pytest.mark.parametrize("tok", [get_world_tokenizer(), Rwkv7ByteTokenizer()], ids=["world", "bytes"])
def test_lone_surrogates_and_invalid_utf8(tok):
    # Decoding ids whose bytes are not UTF-8 never raises: U+FFFD per bad sequence, as HF tokenizers do.
    ids = tok.encode_bytes(b"a\xff\xe4\xb8b")  # a stray byte, then a character cut in the middle
    assert tok.decode(ids) == "a\ufffd\ufffdb"
    assert tok.batch_decode([ids, tok.encode_bytes(b"\x80")]) == ["a\ufffd\ufffdb", "\ufffd"]
    assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids)) == "a\ufffd\ufffdb"
    # Encoding a str with a lone surrogate: a ValueError (UnicodeEncodeError) with the position in the
    # caller's text, on every path (fast path, tokenize(), split_special_tokens=False, pairs, batches).
    text = "hello \ud800 world"
    for call in (lambda: tok(text), lambda: tok.encode(text), lambda: tok.tokenize(text),
                 lambda: tok(text, split_special_tokens=False), lambda: tok("ok", text), lambda: tok(["ok", text])):  # fmt: skip
        with pytest.raises(ValueError, match=r"character '\\ud800' in position 6: lone surrogate.*Clean the text") as info:
            call()
        assert isinstance(info.value, UnicodeEncodeError) and (info.value.start, info.value.end) == (6, 7)
    # The two recipes the message gives both work.
    assert tok.decode(tok.encode(text.encode("utf-8", "replace").decode("utf-8"))) == "hello ? world"
    escaped = b"raw \xff byte".decode("utf-8", "surrogateescape")  # '\udcff' stands for the byte 0xff
    assert tok.decode_bytes(tok.encode_bytes(escaped.encode("utf-8", "surrogateescape"))) == b"raw \xff byte"
    assert tok.encode("valid \U0001f600 pair") == tok.encode_bytes("valid \U0001f600 pair".encode())  # astral chars are fine


# ---- an adapter belongs to one base -----------------------------------------------------------------------

FINGERPRINT_WARNINGS = r".*(another base|fingerprint)"


def test_save_records_the_base_fingerprint_and_dtypes_of_that_base_load(env, monkeypatch):
    monkeypatch.delenv(ALLOW_OTHER_BASE_ENV, raising=False)
    recorded = json.loads((env["adapter"] / "adapter_config.json").read_text())["base_model_fingerprint"]
    assert re.fullmatch(r"rwkv7-fp1:[0-9a-f]{16}", recorded)
    assert base_model_fingerprint(load(env["hf"])) == recorded
    assert base_model_fingerprint(load(env["twin"])) != recorded  # same shape, other weights
    # The same base loaded in bf16 has the same fingerprint (values are hashed at bf16 precision): it loads.
    bf16 = AutoModelForCausalLM.from_pretrained(env["hf"], dtype=torch.bfloat16)
    assert base_model_fingerprint(bf16) == recorded
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=FINGERPRINT_WARNINGS)  # ... without a fingerprint warning
        model = PeftModel.from_pretrained(bf16, env["adapter"])
    tensors = load_file(env["adapter"] / "adapter_model.safetensors")
    for layer, p in model.base_model.adapter_states["default"].wkv.items():
        assert p.dtype == torch.float32 and torch.equal(p, tensors[f"base_model.state_tuning.wkv.{layer}"])
    # A fine-tune of the base (one layer's decay moved by 1e-2) is another base.
    tuned = load(env["hf"])
    with torch.no_grad():
        tuned.model.blocks[1].att.w0.add_(1e-2)
    assert base_model_fingerprint(tuned) != recorded


def test_fingerprint_of_a_bf16_checkpoint_is_the_same_in_fp32_bf16_and_fp16(env):
    """Released RWKV-7 weights are bf16: loading them in any of the three dtypes gives one fingerprint,
    including values below fp16's normal range (fp16 keeps them less precisely; they count as 0) and -0.0."""
    sd = random_official_state_dict(hidden=128, layers=2, vocab=VOCAB, seed=6, dtype=torch.bfloat16)
    sd["emb.weight"][0, :4] = torch.tensor([1e-6, -3e-7, -0.0, 2.0**-14])
    sd["blocks.1.att.w0"].view(-1)[:2] = torch.tensor([5e-8, -1e-5])
    torch.save(sd, env["tmp"] / "bf16.pth")
    folder = convert_rwkv_checkpoint(env["tmp"] / "bf16.pth", env["tmp"] / "bf16", with_tokenizer=False)
    prints = {dt: base_model_fingerprint(AutoModelForCausalLM.from_pretrained(folder, dtype=dt))
              for dt in (torch.float32, torch.bfloat16, torch.float16)}  # fmt: skip
    assert len(set(prints.values())) == 1 and None not in prints.values(), prints


def test_override_loads_an_adapter_onto_another_base_and_resave_records_it(env, monkeypatch, tmp_path):
    monkeypatch.setenv(ALLOW_OTHER_BASE_ENV, "1")
    with pytest.warns(UserWarning, match=rf"trained on another base model.*Loading it anyway, because {ALLOW_OTHER_BASE_ENV} is set"):
        model = PeftModel.from_pretrained(load(env["twin"]), env["adapter"])
    tensors = load_file(env["adapter"] / "adapter_model.safetensors")
    for layer, p in model.base_model.adapter_states["default"].wkv.items():
        assert torch.equal(p, tensors[f"base_model.state_tuning.wkv.{layer}"])
    model.save_pretrained(tmp_path / "on_twin")  # the adapter now belongs to base B
    saved = json.loads((tmp_path / "on_twin" / "adapter_config.json").read_text())["base_model_fingerprint"]
    assert saved == base_model_fingerprint(load(env["twin"]))
    monkeypatch.delenv(ALLOW_OTHER_BASE_ENV)
    PeftModel.from_pretrained(load(env["twin"]), tmp_path / "on_twin")
    with pytest.raises(ValueError, match="trained on another base model"):
        PeftModel.from_pretrained(load(env["hf"]), tmp_path / "on_twin")


def test_adapters_without_a_fingerprint_load_onto_any_base_of_their_shape(env, monkeypatch):
    """adapter_config.json files written before the field existed (and adapters built from RWKV state
    files, which carry no config) load as before; an unknown fingerprint scheme warns and loads."""
    monkeypatch.delenv(ALLOW_OTHER_BASE_ENV, raising=False)
    old = adapter_copy(env, edit_config=lambda c: c.pop("base_model_fingerprint"))
    for base in ("hf", "twin"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=FINGERPRINT_WARNINGS)
            model = PeftModel.from_pretrained(load(env[base]), old)
        assert model.peft_config["default"].base_model_fingerprint is None
    future = adapter_copy(env, edit_config=lambda c: c.update(base_model_fingerprint="rwkv7-fp9:0123"))
    with pytest.warns(UserWarning, match=r"unknown scheme \('rwkv7-fp9:0123'"):
        PeftModel.from_pretrained(load(env["twin"]), future)


def test_no_fingerprint_without_readable_weights(env):
    """Meta weights (an offloaded model) give no fingerprint rather than a wrong one: nothing is recorded or checked."""
    from modeling_rwkv7 import Rwkv7ForCausalLM

    config = load(env["hf"]).config
    with torch.device("meta"):
        meta = Rwkv7ForCausalLM(config)
    assert base_model_fingerprint(meta) is None


# ---- nothing is lost --------------------------------------------------------------------------------


def test_save_pretrained_is_atomic_and_keeps_the_card(env, tmp_path):
    model = PeftModel.from_pretrained(load(env["hf"]), env["adapter"])
    out = tmp_path / "a"
    model.save_pretrained(out)
    (out / "README.md").write_text((out / "README.md").read_text() + "\nMY NOTES\n")
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "MY NOTES" in (out / "README.md").read_text()  # PEFT updates the existing card, as in place
    model.add_adapter("second", StateTuningConfig())
    model.save_pretrained(out)  # non-default adapters go to sub-folders, atomically too
    assert (out / "second" / "adapter_model.safetensors").is_file()
    assert not [p for p in out.rglob(".tmp-save-*")]


def test_rwkv_state_export_and_conversion_are_atomic(env, tmp_path, monkeypatch):
    """A failing write leaves the previous state file / converted folder as they were."""
    import modeling_rwkv7.convert as convert

    model = PeftModel.from_pretrained(load(env["hf"]), env["adapter"])
    path = model.base_model.export_rwkv_state(tmp_path / "s.pth")
    before = path.read_bytes()
    out = convert_rwkv_checkpoint(env["pth"], tmp_path / "conv", with_tokenizer=False)
    weights_before = (out / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        model.base_model.export_rwkv_state(path)
    assert path.read_bytes() == before
    monkeypatch.setattr(convert, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_rwkv_checkpoint(env["pth"], out, with_tokenizer=False)
    assert (out / "model.safetensors").read_bytes() == weights_before
    assert [p.name for p in [*tmp_path.iterdir(), *out.iterdir()] if p.name.startswith(".")] == []  # no temp files left


def test_a_save_killed_midway_leaves_the_previous_adapter(env, tmp_path):
    """SIGKILL a process in the middle of writing version 2: version 1 still loads, tensors identical."""
    out = tmp_path / "adapter"
    shutil.copytree(env["adapter"], out)
    v1 = load_file(out / "adapter_model.safetensors")
    started = tmp_path / "writing"
    script = textwrap.dedent(
        f"""
        import time, torch, peft_state_tuning, peft.peft_model, safetensors.torch as st
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(env['hf'])!r}), {str(out)!r})
        with torch.no_grad():
            for p in model.base_model.adapter_states["default"].wkv.values():
                p.add_(1.0)  # version 2
        def slow_save_file(tensors, filename, metadata=None):
            with open(filename, "wb") as f:  # a torn file: half written, then a long stall
                f.write(b"\\x00" * 1000)
                f.flush()
                open({str(started)!r}, "w").close()
                time.sleep(60)
        peft.peft_model.safe_save_file = slow_save_file
        model.save_pretrained({str(out)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in out.glob(".tmp-save-*")], "the kill should have hit the write in the temporary folder"
    reloaded = PeftModel.from_pretrained(load(env["hf"]), out)
    v1_after = load_file(out / "adapter_model.safetensors")
    assert v1_after.keys() == v1.keys() and all(torch.equal(v1[k], v1_after[k]) for k in v1)
    for layer, p in reloaded.base_model.adapter_states["default"].wkv.items():
        assert torch.equal(p, v1[f"base_model.state_tuning.wkv.{layer}"])


def test_nan_guard_stops_training_and_restores_the_last_good_state(env, tmp_path):
    from datasets import Dataset
    from transformers import TrainerCallback, Trainer, TrainingArguments

    from peft_state_tuning import NanGuardCallback

    model = get_peft_model(load(env["hf"]), StateTuningConfig())
    text = torch.randint(1, VOCAB, (32,), generator=torch.Generator().manual_seed(5)).tolist()
    data = Dataset.from_dict({"input_ids": [text] * 64, "labels": [text] * 64})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=2, learning_rate=0.05,
        logging_steps=2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip

    class Record(TrainerCallback):  # the states after every step, to compare with what is restored
        seen: dict = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    guard = NanGuardCallback()  # snapshots every logging step (2)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Record(), guard])

    def poison(module, inputs, output):  # the loss of step 5 (computed while global_step == 4) is NaN
        if module.training and trainer.state.global_step == 4:
            output.loss = output.loss * float("nan")
        return output

    model.get_base_model().register_forward_hook(poison)
    trainer.train()
    assert guard.bad_step == 5 and guard.restored_step == 4 and "loss = nan" in guard.reason
    assert trainer.state.global_step == 5  # stopped right after the bad step
    assert any(torch.isnan(p).any() for p in Record.seen[5].values())  # the bad step did poison the states ...
    for name, p in model.named_parameters():
        if p.requires_grad:  # ... and the guard put back those of step 4
            assert torch.isfinite(p).all() and torch.equal(p, Record.seen[4][name]), name
    notes = [h["nan_guard"] for h in trainer.state.log_history if "nan_guard" in h]
    assert len(notes) == 1 and "step 5 went bad" in notes[0] and "saved at step 4" in notes[0]
