"""Cheap checks of scripts/study_gpu.py (the whole script's CPU smoke run, ``--smoke``, takes minutes: not here).

Covers the parts whose mistakes would silently bias the GPU study: the second task's labels and splits, the
batched evaluation (ranked accuracy and cache-free greedy decoding vs unbatched reference loops), the
budget logic that picks the number of steps and the order of the runs, and the study in two calls (``--smoke``
of one task and two methods, ~40 s: call 1 saves the larger base and stops after two runs, call 2 resumes it)."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sg():
    spec = importlib.util.spec_from_file_location("study_gpu", ROOT / "scripts" / "study_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_genre_labels(sg):
    from peft_state_tuning import demo

    order = list(dict.fromkeys(v.book for v in demo.load_kjv()))
    g = sg.genre_of_books(order)
    assert len(g) == 66 and set(g.values()) == set(sg.GENRES)
    expect = {"Genesis": "law", "Deuteronomy": "law", "Joshua": "history", "Esther": "history", "Acts": "history",
              "Job": "wisdom", "Song of Solomon": "wisdom", "Isaiah": "prophecy", "Lamentations": "prophecy",
              "Malachi": "prophecy", "Revelation": "prophecy", "Matthew": "gospel", "John": "gospel",
              "Romans": "letter", "Hebrews": "letter", "Jude": "letter"}  # fmt: skip
    assert {b: g[b] for b in expect} == expect


def test_genre_task_splits(sg):
    from peft_state_tuning import demo

    held = {(v.book, v.text) for v in demo.load_kjv() if demo.is_heldout(v)}
    train, evaluation = sg.genre_task(20, 5, seed=0)
    assert len(train) == 20 * 6 and len(evaluation) == 5 * 6
    assert all((e["book"], e["prompt"].removesuffix("\nGenre:")) in held for e in evaluation)
    assert not any((e["book"], e["prompt"].removesuffix("\nGenre:")) in held for e in train)
    assert all(e["answer"] == f" {e['label']}\n" for e in train + evaluation)
    assert sg.genre_task(20, 5, seed=0) == (train, evaluation)  # deterministic
    assert sg.genre_task(20, 5, seed=1)[0] != train


def test_make_task_fixed_eval_split(sg):
    class A:
        train_per_class, eval_per_class = 6, 2

    t0, t1 = sg.make_task("book", A, 0), sg.make_task("book", A, 1)
    assert t0["eval"] == t1["eval"] and t0["train"] != t1["train"]
    assert t0["fewshot_prefix"].count("\nBook: ") == 8


def test_wilson(sg):
    lo, hi = sg.wilson(0.2, 100)
    assert 0.13 < lo < 0.14 and 0.28 < hi < 0.30
    assert sg.wilson(None, 10) is None


def _tiny_model():
    from modeling_rwkv7 import Rwkv7Config, Rwkv7ForCausalLM
    from modeling_rwkv7.tokenization_rwkv7_bytes import (
        BYTE_VOCAB_SIZE,
        Rwkv7ByteTokenizer,
    )

    torch.manual_seed(0)
    cfg = Rwkv7Config(vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, head_dim=32, intermediate_size=128,
                      decay_low_rank_dim=32, a_low_rank_dim=32, v_low_rank_dim=32, gate_low_rank_dim=32)  # fmt: skip
    return Rwkv7ForCausalLM(cfg).eval(), Rwkv7ByteTokenizer()


def test_batched_evaluation_matches_unbatched_loops(sg):
    model, tok = _tiny_model()
    rng = random.Random(0)
    labels = ("law", "history", "wisdom")
    task = {"labels": labels, "answer": lambda lab: f" {lab}\n",
            "eval": [{"prompt": "".join(rng.choice("abc de") for _ in range(rng.randint(5, 30))) + "\nGenre:",
                      "label": rng.choice(labels)} for _ in range(7)]}  # fmt: skip
    # ranked: one sequence at a time, no padding
    want = []
    with torch.no_grad():
        for e in task["eval"]:
            p = tok.encode_text(e["prompt"])
            scores = []
            for lab in labels:
                a = tok.encode_text(task["answer"](lab))
                lp = model(input_ids=torch.tensor([p + a])).logits[0].log_softmax(-1)
                scores.append(sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(a)))
            want.append(labels[max(range(len(labels)), key=scores.__getitem__)])
    got = sg.ranked_accuracy(model, tok, task, token_budget=200)  # several chunks
    assert got["preds_head"] == want[:8]
    # greedy: one sequence at a time, no padding
    want = []
    with torch.no_grad():
        for e in task["eval"]:
            ids = tok.encode_text(e["prompt"])
            out = []
            for _ in range(5):
                t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if t in (tok.encode_text("\n")[0], 0):
                    break
                out.append(t)
                ids = ids + [t]
            want.append(tok.decode(out, skip_special_tokens=True))
    assert sg.greedy_answers(model, tok, [e["prompt"] for e in task["eval"]], max_new=5, token_budget=90) == want


def test_budget_picks_steps_and_drops_optional_phases(sg):
    class A:
        tasks, methods, large_methods, seeds = ["book", "genre"], list(sg.SMALL_METHODS), ["state", "lora"], [0, 1, 2]
        max_steps, preferred_steps, min_steps = 300, 150, 30

    plan = sg.build_plan(A)
    assert [r["key"] for r in plan if r["phase"] == 0][:1] == ["book/small/state/seed0"]
    keys = [r["key"] for r in plan]
    assert keys.index("book/large/full/seed0") < keys.index("book/small/observer/seed0")
    assert len(plan) == 2 * 10 + 4 + 4
    cal = {"runs": {f"{r['base']}/{r['method']}": {"step": 0.05, "setup": 1.0, "fwd_factor": 1.0} for r in plan},
           "eval": {f"{t}/{b}": 2.0 for t in A.tasks for b in ("small", "large")}}  # fmt: skip
    steps, top = sg.choose_steps(plan, cal, 1e6, A)
    assert (steps, top) == (300, 2)
    fixed0 = sum(sg.estimate(r, 0, cal) for r in plan if r["phase"] == 0)
    steps, top = sg.choose_steps(plan, cal, fixed0 + 20 * 0.05 * 160, A)  # core fits 160 steps, not all phases
    assert top == 0 and steps == 160
    steps, top = sg.choose_steps(plan, cal, fixed0 + 1.0, A)
    assert (steps, top) == (30, 0)  # never below --min-steps


def test_plan_order(sg):
    class A:
        tasks, methods, large_methods, seeds = ["book", "genre"], list(reversed(sg.SMALL_METHODS)), ["state"], [0, 1]

    plan = sg.build_plan(A)
    core = ["small/state", "small/lora", "small/full", "small/prompt", "small/upscaled_128", "large/full",
            "small/observer", "small/upscaled_256", "small/upscaled_128_dbp", "small/example"]  # fmt: skip
    want = [f"{t}/{k}/seed0" for t in A.tasks for k in core]
    want += ["book/small/state/seed1", "book/small/lora/seed1", "book/large/state/seed0", "genre/large/state/seed0"]
    assert [r["key"] for r in plan] == want
    assert [r["phase"] for r in plan] == [0] * 20 + [1, 1, 2, 2]


def test_resume_needs_large_model(sg, tmp_path):
    with pytest.raises(SystemExit):
        sg.parse_args(["--out", str(tmp_path), "--resume", str(tmp_path / "study_gpu.json")])


def test_two_calls_resume_smoke(sg, tmp_path):
    """Call 1 pretrains, saves the base (--save-large-to) and stops after 2 of 3 runs; call 2 resumes: it keeps
    call 1's results, retrains the observer's teacher (kept in call 1) and runs only the observer."""
    out1, out2, base = tmp_path / "out1", tmp_path / "out2", tmp_path / "out1" / "large_base"
    common = ["--smoke", "--tasks", "book", "--methods", "observer", "state", "--large-methods", "--seeds", "0"]
    assert sg.main(common + ["--out", str(out1), "--work-dir", str(tmp_path / "w1"), "--max-runs", "2",
                             "--save-large-to", str(base)]) == 0  # fmt: skip
    files = sorted(f for f in base.iterdir())
    assert 2 <= len(files) <= 5 and all(f.is_file() and f.stat().st_size < 16 * 2**20 for f in files)
    assert not (base / "generation_config.json").exists()
    assert len([f for f in out1.rglob("*") if f.is_file()]) <= 7  # + the log: at most 8 files come back
    d1 = json.loads((out1 / "study_gpu.json").read_text())
    assert d1["bases"]["large"]["saved_copy"]["reload_checked_equal"] and d1["bases"]["large"]["path_used"] == str(base)
    assert list(d1["runs"]) == ["book/small/state/seed0", "book/large/full/seed0"]
    assert [s["key"] for s in d1["skipped"]] == ["book/small/observer/seed0"]
    assert "few_shot" in d1["untuned"]["book/large"] and "few_shot" not in d1["untuned"]["book/small"]

    with pytest.raises(SystemExit):  # --resume without the saved base
        sg.main(["--smoke", "--out", str(out2), "--resume", str(out1 / "study_gpu.json")])
    # a differing experiment setting (--methods) is ignored: the resumed study's are kept
    assert sg.main(["--smoke", "--out", str(out2), "--work-dir", str(tmp_path / "w2"), "--methods", "state",
                    "--resume", str(out1 / "study_gpu.json"), "--large-model", str(base)]) == 0  # fmt: skip
    d2 = json.loads((out2 / "study_gpu.json").read_text())
    assert (out2 / "study_gpu.png").exists()
    assert d2["settings"]["methods"] == ["observer", "state"] and "methods" in d2["resumed"]["ignored_arguments"]
    assert d2["settings"]["steps"] == d1["settings"]["steps"] and d2["settings"]["tasks"] == ["book"]
    assert d2["timeline"]["call"] == 2 and d2["timeline"]["resumed_from"] == str(out1 / "study_gpu.json")
    calls = {k: r["call"] for k, r in d2["runs"].items()}
    assert calls == {"book/small/state/seed0": 1, "book/large/full/seed0": 1, "book/small/observer/seed0": 2}
    assert all(d2["runs"][k] == d1["runs"][k] for k in d1["runs"])  # kept as they were, not run again
    assert {k: r["call"] for k, r in d2["teacher_reruns"].items()} == {"book/large/full/seed0": 2}
    assert "after" in d2["runs"]["book/small/observer/seed0"] and not d2["skipped"]
    assert d2["runs"]["book/small/observer/seed0"]["observer_teacher"] == "teacher_reruns/book/large/full/seed0"
    assert d2["untuned"] == d1["untuned"] and d2["calibration"] == d1["calibration"]
    assert d2["bases"]["large"]["parameters"] == d1["bases"]["large"]["parameters"]
    assert d2["settings"]["plan_call"]["2"] == ["book/large/full/seed0 (teacher rerun)", "book/small/observer/seed0"]

    # --merge: call 2's observer result replaces call 1's skip of it; a failed run never replaces a result
    failed = json.loads(json.dumps(d2))
    failed["runs"]["book/small/state/seed0"] = {"error": "RuntimeError: a failed rerun"}
    (tmp_path / "failed.json").write_text(json.dumps(failed))
    parts = [str(out1 / "study_gpu.json"), str(out2 / "study_gpu.json"), str(tmp_path / "failed.json")]
    merged = sg.merge(parts, tmp_path / "merged")
    assert not merged["skipped"] and "after" in merged["runs"]["book/small/observer/seed0"]
    assert merged["runs"]["book/small/state/seed0"] == d1["runs"]["book/small/state/seed0"]
    assert list(merged["timeline"]["merged_from"]) == parts and (tmp_path / "merged" / "study_gpu.png").exists()


def test_example_run_equals_the_state_run(tmp_path):
    """``example`` (state tuning through examples/train_state_tuning.py, in its own process) and ``state`` (the
    study's own Trainer) see the same data, steps, learning rate and seed: the same adapter, so the same metrics."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "study_gpu.py"), "--out", str(out), "--smoke", "--tasks", "book",
           "--methods", "state", "example", "--large-methods", "--seeds", "0", "--no-fewshot",
           "--work-dir", str(tmp_path / "work")]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    runs = json.loads((out / "study_gpu.json").read_text())["runs"]
    state, example = runs["book/small/state/seed0"]["after"], runs["book/small/example/seed0"]["after"]
    assert abs(state["eval_loss"] - example["eval_loss"]) < 1e-3
    assert runs["book/small/example/seed0"]["example_metrics"]["train_runtime"] > 0
