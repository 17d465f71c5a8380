"""The shipped model, its tokenizer, the Trainer example / `peft-state-tuning train`, the demo and the pretraining
script, end to end on CPU with a few steps each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_state_tuning  # noqa: F401  (registers STATE_TUNING)
from modeling_rwkv7 import Rwkv7ByteTokenizer, get_world_tokenizer
from peft_state_tuning import train as train_cli
from peft_state_tuning.demo import EMBEDDED_MODEL_DIR, book_accuracy, book_task, is_heldout, load_kjv, run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_model_and_byte_tokenizer():
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    assert isinstance(tok, Rwkv7ByteTokenizer) and tok.vocab_size == 257 and tok.eos_token_id == 0
    text = "In the beginning God created the heaven and the earth.\n\n\u00e9\u4e2d"
    ids = tok(text).input_ids
    assert ids == [b + 1 for b in text.encode()]  # one byte a token, id = byte + 1 ...
    assert get_world_tokenizer().decode(ids) == text == tok.decode(ids)  # ... which are world ids too
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()
    assert model.config.vocab_size == 257 and model.config.model_type == "rwkv7"
    assert (EMBEDDED_MODEL_DIR / "model.safetensors").stat().st_size < 8_000_000
    x = torch.tensor([tok.encode_text("Genesis 1:1 In the beginning God created the heaven and the earth.\n")])
    with torch.no_grad():
        loss = model(x, labels=x).loss.item()
    assert loss < 3.0, loss  # trained: far below ln(257) = 5.55 of a uniform guess


def test_corpus_and_task_splits():
    verses = load_kjv()
    assert len(verses) == 31102 and verses[0].reference == "Genesis 1:1" and verses[-1].reference == "Revelation 22:21"
    held = sum(map(is_heldout, verses))
    assert 0.04 < held / len(verses) < 0.06
    train, evaluation = book_task(train_per_book=5, eval_per_book=3, seed=1)
    assert len(train) == 40 and len(evaluation) == 24
    train_texts = {e["prompt"] for e in train}
    assert not train_texts & {e["prompt"] for e in evaluation}


def test_chat_and_prompt_completion_examples():
    tok = Rwkv7ByteTokenizer()
    args = train_cli.build_parser().parse_args(["--dataset", "x", "--messages_column", "m"])
    row = {"m": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.\n\nBye."}]}
    ex = train_cli.make_example(row, tok, args)
    assert tok.decode(ex["input_ids"]) == "User: Hi\n\nAssistant: Hello.\nBye.\n\n"
    trained = tok.decode([i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100])
    assert trained == " Hello.\nBye.\n\n"
    args = train_cli.build_parser().parse_args(["--dataset", "x", "--prompt_column", "p", "--completion_column", "c"])
    ex = train_cli.make_example({"p": "Q:", "c": " A"}, tok, args)
    assert ex["labels"] == [-100, -100] + tok.encode_text(" A") + [0]


def _write_dataset(path: Path, n: int = 48) -> Path:
    verses = [v for v in load_kjv() if v.book == "Psalms"][:n]
    path.write_text("".join(json.dumps({"text": f"{v.reference} {v.text}"}) + "\n" for v in verses))
    return path


def test_train_example_end_to_end_and_adapter_reloads(tmp_path):
    data = _write_dataset(tmp_path / "psalms.jsonl")
    out = tmp_path / "run"
    common = [
        "--dataset", str(data), "--text_column", "text", "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--max_length", "96", "--learning_rate", "0.05", "--warmup_steps", "0",
        "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "--eval_fraction", "0.2",
    ]  # fmt: skip
    metrics = train_cli.main(common + ["--max_steps", "2"])
    assert {"eval_loss", "eval_perplexity", "eval_token_accuracy"} <= set(metrics)
    assert 0.0 <= metrics["eval_token_accuracy"] <= 1.0
    # resume: the checkpoint's step count carries on
    metrics = train_cli.main(common + ["--max_steps", "3", "--resume_from_checkpoint", "last"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert {"adapter_config.json", "adapter_model.safetensors", "all_results.json"} <= {p.name for p in out.iterdir()}

    base = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out).eval()
    wkv = model.base_model.adapter_states["default"].wkv
    assert len(wkv) == base.config.num_hidden_layers and all(p.abs().sum() > 0 for p in wkv.values())
    tok = AutoTokenizer.from_pretrained(out)
    _, evaluation = book_task(train_per_book=0, eval_per_book=1)
    accuracy, answers = book_accuracy(model, tok, evaluation[:4])
    assert 0.0 <= accuracy <= 1.0 and len(answers) == 4


def test_model_folder_without_tokenizer_needs_tokenizer_name(tmp_path):
    """A model folder with only weights (e.g. a base saved by save_pretrained alone): AutoTokenizer falls back
    to the 65536-token world vocabulary, which the byte-level model cannot embed. The script says so before
    tokenizing, and --tokenizer_name fixes it."""
    folder = tmp_path / "weights_only"
    AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).save_pretrained(folder)
    data = _write_dataset(tmp_path / "psalms.jsonl", n=12)
    common = ["--model_name_or_path", str(folder), "--dataset", str(data), "--text_column", "text", "--max_steps", "1",
              "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "--max_length", "32"]  # fmt: skip
    with pytest.raises(SystemExit, match="--tokenizer_name"):
        train_cli.main(common)
    metrics = train_cli.main(common + ["--tokenizer_name", str(EMBEDDED_MODEL_DIR)])
    assert "eval_loss" in metrics


def test_cli_entry_points_show_help():
    for cmd in ([sys.executable, "-m", "peft_state_tuning", "train", "--help"], [sys.executable, str(ROOT / "examples" / "train_state_tuning.py"), "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "--model_name_or_path" in out.stdout and "--push_to_hub" in out.stdout


def test_demo_core_function(tmp_path):
    result = run_demo(output_dir=tmp_path, steps=3, batch_size=4, train_per_book=4, eval_per_book=1, verbose=False)
    assert 0.0 <= result["accuracy_before"] <= 1.0 and 0.0 <= result["accuracy_after"] <= 1.0
    assert result["eval_loss_after"] < result["eval_loss_before"]  # three steps already lower the loss
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").exists() and result["adapter_bytes"] < 400_000  # 4 layers x 4 heads x 64 x 64 fp32
    assert len(result["examples"]) >= 1 and json.loads((tmp_path / "demo_result.json").read_text())["steps"] == 3
    pytest.importorskip("matplotlib")
    assert Path(result["loss_curve_png"]).exists()


def test_pretraining_script_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import pretrain_embedded
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    log = pretrain_embedded.main(["--out-dir", str(tmp_path / "m"), "--tiny", "--max-steps", "3", "--device", "cpu"])
    assert log["steps"] == 3 and len(log["val"]) >= 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.vocab_size == 257 and model.dtype == torch.bfloat16
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path / "m"), Rwkv7ByteTokenizer)
    assert (tmp_path / "m" / "training_log.json").exists()
