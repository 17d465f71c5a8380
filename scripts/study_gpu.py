"""GPU quality study: two KJV tasks, two bases, state tuning and its variants vs LoRA, prompt tuning, full FT.

One script on one GPU, no network: in one run (about 7 minutes on an H100)::

    python scripts/study_gpu.py --out <dir>            # writes <dir>/study_gpu.json and <dir>/study_gpu.png
    python scripts/study_gpu.py --out /tmp/sg --smoke  # CPU check of every code path (~3.5 min on 2 cores)

or in two calls of at most 10 minutes each, on a fresh machine each time, where only the folder ``$OUT`` comes
back (at most 8 files of < 16 MiB, 64 MiB in all)::

    # call 1: pretrain the larger base, save it to $OUT/large_base (bf16: config.json, index, 3 shards of < 14 MiB),
    # then the untuned evaluations, the calibration and as many runs of the plan as fit
    python scripts/study_gpu.py --out $OUT --time-budget-s 520 --hard-limit-s 560 \
        --save-large-to $OUT/large_base 2>&1 | tee $OUT/study.log
    # call 2, with call 1's $OUT carried along as <carried>: the same base, settings and steps; only the runs that
    # are missing, failed or were skipped (all phases), merged with call 1's results into $OUT/study_gpu.json
    python scripts/study_gpu.py --out $OUT --resume <carried>/study_gpu.json --large-model <carried>/large_base \
        --time-budget-s 540 --hard-limit-s 570 2>&1 | tee $OUT/study.log

Call 1 leaves 8 files in ``$OUT`` (study_gpu.json, study_gpu.png, study.log, large_base/ with 5 files, ~31 MB);
the PNG is written at the end of a call, the JSON after every step and run (so a call cut short still has it), the
saved base right after pretraining.

``--save-large-to DIR``: the larger base as the study loads it (fp32), rounded to bf16 (pretrain_embedded.py saves
bf16 already, so the rounding changes nothing; the JSON says whether it did), saved in shards of at most 15 MB, no
generation_config.json, loaded back with ``AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32)`` and
checked equal. Every later evaluation and run of the call (held-out LM loss included) uses this saved copy, so the
results of both calls come from the identical base (``bases.large.saved_copy`` in the JSON).

``--resume OLD.json`` (needs ``--large-model``, the base saved by call 1; its parameter count is checked): the
settings that define the experiment (tasks, methods, seeds, steps, batch size, learning rates, data sizes, DBP and
observer settings, greedy length, few-shot choice) are taken from OLD.json, a differing command-line value is
ignored with a warning (``resumed.ignored_arguments``); OLD.json's ``bases``, ``tasks``, ``calibration`` (no new
probes: the first run of each kind is given its compilation time from the probe), the untuned evaluations that
succeeded and every run with a result are kept; the plan's other runs (all phases, the steps being fixed) run in
plan order within this call's budget. An ``observer`` run needs its teacher ``<task>/large/full`` trained in the
same process: when that run is kept from OLD.json, the teacher is trained (and evaluated) again right before the
observer, same seed and steps; that result goes to ``teacher_reruns["<task>/large/full/seed0"]`` (the kept result
in ``runs`` stays), and the observer's result names its teacher in ``observer_teacher``. Each result records the
``call`` (1, 2, ...) that produced it; ``timeline.resumed_from`` names OLD.json, ``timeline.previous_call`` keeps
its timeline, ``resumed`` lists what was kept and what was run again.

What it does, in order (docs/results.md, section 3):

1. **A larger base.** Pretrains an RWKV-7 of ``--large-layers`` x ``--large-hidden`` (default 8 x 384, about
   15 M parameters) from scratch on the same KJV corpus with the same byte tokenizer as the shipped 3.6 M
   embedded model, by ``scripts/pretrain_embedded.py`` (bf16 autocast, ``--pretrain-s`` seconds of training, the
   same held-out 5% of verses left out, best held-out checkpoint kept). Saved under ``--work-dir`` (and, with
   ``--save-large-to``, as the bf16 copy that the rest of the call uses); its loss curves go into the JSON.
   ``--large-model DIR`` skips the pretraining and uses DIR.
2. **Two tasks** from real text, train split from verses both bases were pretrained on, eval split from the held-out
   verses neither base ever saw, with a task metric besides loss:
   * ``book``: "which book is this verse from?" (``peft_state_tuning.demo.book_task``: 8 books, input
     ``"<verse>\\nBook:"``, answer ``" <book>\\n"``);
   * ``genre``: "which part of the Bible is this verse from?", over all 66 books in 6 classes (law: Genesis-
     Deuteronomy; history: Joshua-Esther and Acts; wisdom: Job-Song of Solomon; prophecy: Isaiah-Malachi and
     Revelation; gospel: Matthew-John; letter: Romans-Jude), input ``"<verse>\\nGenre:"``, answer
     ``" <class>\\n"``, balanced per class. Unlike ``book`` it must generalise over many books per label.
   Metrics on the held-out split: *ranked accuracy* (the most likely of the candidate answers, prompt + answer read
   as one sequence, valid for every method incl. upscaled branches and virtual tokens), *greedy exact match*
   (cache-free greedy decoding, the same code for every method), *eval loss* on the answer bytes
   (token-weighted mean), each accuracy with a 95% Wilson interval. The eval split is fixed (seed 0); the seed
   changes the training sample and order, LoRA's init and the upscaled support vectors.
3. **Methods**, with the same data, steps, batch, schedule (AdamW, cosine, warm-up min(10, steps/10), wd 0) and
   seed per task and base; learning rates fixed a priori (those of scripts/study_demo_task.py, no sweep):
   ``state`` (0.3), ``upscaled_128`` / ``upscaled_256`` (``StateTuningConfig(upscale_dim=M)``, recurrence mode,
   Gaussian kernel, random support; 0.3), ``upscaled_128_dbp`` (+ ``DecorrelatedOptimizer(AdamW)``,
   ``--decor-lr``), ``lora`` (r=8, alpha 16, ``att.(receptance|key|value|output)``; 2e-3), ``prompt``
   (16 virtual tokens; 3e-2), ``full`` (all weights; 2e-4), and ``observer``: state tuning of the SMALL base with
   ``ObserverCallback`` whose observer is the LARGER base after full fine-tuning on the same task's training split
   (run ``<task>/large/full``; ``--observer-alpha`` 0.5, ``--observer-temperature`` 1; ``--observer-source
   large_untuned`` for the untuned larger base instead); ``example``: plain state tuning run through the
   user-facing HF Trainer script ``examples/train_state_tuning.py`` in its own process (the task as
   prompt/completion jsonl files, the ``state`` run's steps, batch, learning rate and seed), its saved adapter then
   loaded with ``PeftModel.from_pretrained`` and evaluated like the others (on the CPU it reproduces the ``state``
   run's eval loss: tests/test_study_smoke.py). On the large base: ``full`` (the observer), then, budget
   permitting, ``state``, ``lora`` and ``example``. Seeds ``--seeds`` (0 1 2) for ``state`` and ``lora`` on
   ``book``, budget permitting. Order of the core runs (phase 0), per task, so that a call cut short has the most
   useful ones: small ``state``, ``lora``, ``full``, ``prompt``, ``upscaled_128``, large ``full`` then small
   ``observer`` right after it, small ``upscaled_256``, ``upscaled_128_dbp``, ``example``; then the extra seeds
   (phase 1), then the large base's ``state`` / ``lora`` / ``example`` (phase 2).
4. **The paper's claim** (a smaller state-tuned model beats a larger untuned one): both untuned bases are evaluated
   zero-shot, the larger one also few-shot (one training example per class in the prompt; ``--small-fewshot``
   for the small base's few-shot too, off by default as the claim compares with the larger base and cache-free
   greedy decoding after the ~900-byte prefix is slow), and compared with the state-tuned small base; the
   comparison is written to ``claim`` in the JSON, plainly.

Time: everything is fitted into ``--time-budget-s`` (default 420 s wall, from the script's start). After
pretraining, every (base, method) is timed for a few steps (this also compiles the Triton kernels), the untuned
evaluations give the evaluation cost, and the number of training steps (the same for all runs) is the largest
that fits, capped at ``--max-steps``; optional phases (extra seeds, then the large base's state/LoRA) are dropped
if keeping them would push the steps below ``--preferred-steps``. Each run is in-process (peak GPU memory per run
from ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``), wrapped in try/except (a failure is
recorded, the rest go on), and the JSON is rewritten after each run. A run that would end past
``--hard-limit-s`` is skipped and listed.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import study_methods  # noqa: E402  (the methods, built as in study_demo_task.py)

T_START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T_START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def _load_pretrain_module():
    """scripts/pretrain_embedded.py as a module (it also makes ``rwkv7_kernels`` importable from a bare checkout)."""
    spec = importlib.util.spec_from_file_location("pretrain_embedded", ROOT / "scripts" / "pretrain_embedded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain = _load_pretrain_module()

import torch

from peft_state_tuning import demo

demo.load_kjv = functools.lru_cache(maxsize=None)(demo.load_kjv)  # read the corpus once (demo.book_task calls it)

# in the order of the core runs (build_plan; ``observer`` comes right after its teacher, large/full)
SMALL_METHODS = ["state", "lora", "full", "prompt", "upscaled_128", "observer", "upscaled_256", "upscaled_128_dbp",
                 "example"]
DEFAULT_LR = {"state": 0.3, "upscaled": 0.3, "lora": 2e-3, "prompt": 3e-2, "full": 2e-4, "observer": 0.3, "example": 0.3}
LABELS = {
    "state": "state tuning", "upscaled_128": "upscaled state M=128", "upscaled_256": "upscaled state M=256",
    "upscaled_128_dbp": "upscaled M=128 + DBP", "lora": "LoRA r=8", "prompt": "prompt tuning (16 tok)",
    "full": "full fine-tuning", "observer": "state + observer (large full-FT)",
    "example": "state tuning via examples/train_state_tuning.py",
}  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------------

GENRES = ("law", "history", "wisdom", "prophecy", "gospel", "letter")


def genre_of_books(book_order: list[str]) -> dict[str, str]:
    """The 6 classes of the ``genre`` task from the canonical book order of the bundled KJV (66 books)."""
    i = {b: n for n, b in enumerate(book_order)}
    assert len(book_order) == 66 and book_order[0] == "Genesis" and book_order[-1] == "Revelation", book_order
    out = {}
    for b, n in i.items():
        if n <= i["Deuteronomy"]:
            out[b] = "law"
        elif n <= i["Esther"] or b == "Acts":
            out[b] = "history"
        elif n <= i["Song of Solomon"]:
            out[b] = "wisdom"
        elif n <= i["Malachi"] or b == "Revelation":
            out[b] = "prophecy"
        elif n <= i["John"]:
            out[b] = "gospel"
        else:
            out[b] = "letter"
    return out


def _genre_example(v, genre: str) -> dict:
    return {"prompt": f"{v.text}\nGenre:", "answer": f" {genre}\n", "label": genre, "book": v.book}


def genre_task(train_per_class: int, eval_per_class: int, seed: int, verses=None):
    """Balanced ``{"prompt", "answer", "label"}`` examples: train from pretraining verses, eval from held-out ones."""
    verses = verses or demo.load_kjv()
    order = list(dict.fromkeys(v.book for v in verses))
    genre = genre_of_books(order)
    rng = random.Random(seed)
    short = [v for v in verses if len(v.text) <= demo.MAX_VERSE_CHARS]
    train, evaluation = [], []
    for g in GENRES:
        pool = [v for v in short if genre[v.book] == g]
        seen = [v for v in pool if not demo.is_heldout(v)]
        held = [v for v in pool if demo.is_heldout(v)]
        rng.shuffle(seen)
        rng.shuffle(held)
        train += [_genre_example(v, g) for v in seen[:train_per_class]]
        evaluation += [_genre_example(v, g) for v in held[:eval_per_class]]
    rng.shuffle(train)
    return train, evaluation


def book_task(train_per_class: int, eval_per_class: int, seed: int, verses=None):
    train, evaluation = demo.book_task(train_per_class, eval_per_class, seed=seed)
    for e in train + evaluation:
        e["label"] = e["book"]
    return train, evaluation


TASKS = {
    "book": {"build": book_task, "labels": tuple(demo.TASK_BOOKS), "answer": lambda label: f" {label}\n",
             "description": "which of 8 books (demo.book_task): '<verse>\\nBook:' -> ' <book>\\n'"},
    "genre": {"build": genre_task, "labels": GENRES, "answer": lambda label: f" {label}\n",
              "description": "which of 6 parts of the Bible, all 66 books: '<verse>\\nGenre:' -> ' <class>\\n'"},
}  # fmt: skip


def make_task(name: str, a, seed: int) -> dict:
    """Train split for ``seed``, the fixed eval split (seed 0), and the few-shot prefix (one short training example
    per class, from seed 0's split)."""
    spec = TASKS[name]
    train, _ = spec["build"](a.train_per_class, a.eval_per_class, seed)
    train0, evaluation = spec["build"](a.train_per_class, a.eval_per_class, 0)
    shots = []
    for label in spec["labels"]:
        cands = [e for e in train0 if e["label"] == label]
        shots.append(next((e for e in cands if len(e["prompt"]) <= 100), cands[0]))
    random.Random(1).shuffle(shots)
    return {
        "name": name, "labels": spec["labels"], "answer": spec["answer"], "train": train, "eval": evaluation,
        "fewshot_prefix": "".join(e["prompt"] + e["answer"] for e in shots), "description": spec["description"],
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def wilson(p: float | None, n: int, z: float = 1.96) -> list[float] | None:
    if p is None or n == 0:
        return None
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def _device(model):
    return next(model.parameters()).device


def _padded(rows: list[list[int]], device):
    n = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (n - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], device=device)
    return ids, mask, n


@torch.no_grad()
def ranked_accuracy(model, tok, task: dict, prefix: str = "", token_budget: int = 131072) -> dict:
    """The most likely candidate answer after each prompt (sum of the answer bytes' log-probabilities), candidates
    read with their prompt as one right-padded sequence, no cache (prompt tuning's virtual tokens: logits cut to
    the real positions)."""
    device = _device(model)
    labels = task["labels"]
    answers = [tok.encode_text(task["answer"](lab)) for lab in labels]
    pre = tok.encode_text(prefix) if prefix else []
    prompts = [pre + tok.encode_text(e["prompt"]) for e in task["eval"]]
    L = len(labels)
    longest = max(len(p) for p in prompts) + max(len(a) for a in answers)
    per_chunk = max(1, token_budget // (longest * L))
    preds = []
    for i in range(0, len(prompts), per_chunk):
        chunk = prompts[i : i + per_chunk]
        rows = [p + a for p in chunk for a in answers]
        ids, mask, n = _padded(rows, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -n:].float()
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # lp[:, j] = log p(ids[j+1])
        sel = torch.zeros_like(lp)
        for r, (p, a) in enumerate((p, a) for p in chunk for a in answers):
            sel[r, len(p) - 1 : len(p) - 1 + len(a)] = 1
        scores = (lp * sel).sum(-1).view(len(chunk), L)
        preds += [labels[j] for j in scores.argmax(-1).tolist()]
    correct = sum(p == e["label"] for p, e in zip(preds, task["eval"]))
    return {"acc": correct / len(preds), "preds_head": preds[:8]}


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[str], max_new: int = 14, token_budget: int = 131072) -> list[str]:
    """Greedy continuations up to the first newline, without a cache: each step re-reads the right-padded
    sequences and takes the logits at each row's last real token. The same code for every method (upscaled
    branches, virtual tokens, plain states, LoRA), so the metric is comparable."""
    device = _device(model)
    stop = tok.encode_text("\n")[0]
    enc = [tok.encode_text(p) for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out = [[] for _ in enc]
    per_chunk = max(1, token_budget // (max(len(e) for e in enc) + max_new))
    for c in range(0, len(order), per_chunk):
        active = order[c : c + per_chunk]
        seqs = {i: list(enc[i]) for i in active}
        for _ in range(max_new):
            ids, mask, n = _padded([seqs[i] for i in active], device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -n:]
            last = mask.sum(1) - 1
            nxt = logits[torch.arange(len(active), device=device), last].argmax(-1).tolist()
            still = []
            for i, t in zip(active, nxt):
                if t in (stop, 0):
                    continue
                out[i].append(t)
                seqs[i].append(t)
                still.append(i)
            active = still
            if not active:
                break
    return [tok.decode(o, skip_special_tokens=True) for o in out]


@torch.no_grad()
def eval_loss(model, tok, task: dict, batch_size: int = 64) -> float:
    """Mean loss per answer byte over the eval split (token-weighted)."""
    device = _device(model)
    collate = demo.pad_collator()
    rows = [demo.encode_example(tok, e["prompt"], e["answer"]) for e in task["eval"]]
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size]).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**batch, use_cache=False).loss
        total += float(loss) * n
        count += n
    return total / max(1, count)


def evaluate(model, tok, task: dict, prefix: str = "", token_budget: int = 131072, greedy_max_new: int = 14) -> dict:
    t = time.perf_counter()
    was_training = model.training
    model.eval()
    res = {}
    ranked = ranked_accuracy(model, tok, task, prefix, token_budget)
    n = len(task["eval"])
    res["ranked_accuracy"] = ranked["acc"]
    res["ranked_ci95"] = wilson(ranked["acc"], n)
    res["ranked_preds_head"] = ranked["preds_head"]
    if greedy_max_new:
        answers = greedy_answers(model, tok, [prefix + e["prompt"] for e in task["eval"]], greedy_max_new, token_budget)
        acc = sum(a.strip() == e["label"] for a, e in zip(answers, task["eval"])) / n
        res["greedy_exact_match"] = acc
        res["greedy_ci95"] = wilson(acc, n)
        res["greedy_answers_head"] = answers[:8]
    if not prefix:  # the loss of the answer bytes after the bare prompt
        res["eval_loss"] = eval_loss(model, tok, task)
    res["n_eval"] = n
    res["eval_seconds"] = time.perf_counter() - t
    model.train(was_training)
    return res


@torch.no_grad()
def heldout_lm_loss(model, tok, verses, max_bytes: int, T: int = 512) -> float:
    """LM loss (nats/byte) on held-out verses of the books outside demo.TASK_BOOKS (pretrain_embedded's val text)."""
    text = "".join(f"{v.reference} {v.text}\n" for v in verses if demo.is_heldout(v) and v.book not in demo.TASK_BOOKS)
    ids = torch.tensor(tok.encode_text(text)[: max_bytes + 1], device=_device(model))
    n = (len(ids) - 1) // T * T
    x, y = ids[:n].view(-1, T), ids[1 : n + 1].view(-1, T)
    model.eval()
    total = 0.0
    for i in range(0, x.shape[0], 32):
        logits = model(input_ids=x[i : i + 32], use_cache=False).logits.float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i : i + 32].flatten(), reduction="sum").item()
    return total / y.numel()


# ---------------------------------------------------------------------------------------------------------------
# One training run
# ---------------------------------------------------------------------------------------------------------------


def load_base(path, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


OUT_MAX_FILE_BYTES = 16 * 2**20  # what comes back from a GPU call: files of < 16 MiB, 8 files in all
SAVED_BASE_MAX_FILES = 5  # config.json + model.safetensors.index.json + 3 shards (the JSON, PNG and log: 3 more)


def save_base_bf16(src, dst: Path) -> dict:
    """The base at ``src`` as the study loads it (fp32), rounded to bf16 and saved to ``dst`` in shards of at most
    15 MB (no generation_config.json: not needed to load it), then loaded back in fp32 and checked equal to the
    rounded weights. Returns what the JSON records (files, sizes, whether they fit what comes back from $OUT)."""
    from transformers import AutoModelForCausalLM

    model = load_base(src, "cpu")
    sd = model.state_dict()
    rounded = {k: v.to(torch.bfloat16) if v.is_floating_point() else v.clone() for k, v in sd.items()}
    changed = sum(int((v.to(sd[k].dtype) != sd[k]).sum()) for k, v in rounded.items())
    dst.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(dst, max_shard_size="15MB")
    (dst / "generation_config.json").unlink(missing_ok=True)
    back = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).state_dict()
    same = set(back) == set(rounded) and all(torch.equal(back[k], rounded[k].to(back[k].dtype)) for k in rounded)
    if not same:
        raise RuntimeError(f"the base saved to {dst} does not load back as the bf16-rounded weights")
    files = {f.name: f.stat().st_size for f in sorted(dst.iterdir())}
    fits = len(files) <= SAVED_BASE_MAX_FILES and all(n < OUT_MAX_FILE_BYTES for n in files.values())
    return {
        "path": str(dst), "dtype": "bfloat16", "source": str(src), "files": files, "total_bytes": sum(files.values()),
        "fits_out_limits": fits, "weights_changed_by_rounding": changed, "reload_checked_equal": True,
        "note": "every later evaluation and run of this call (and of a call resumed with --large-model <this dir>) "
                "uses this bf16 copy, loaded in fp32",
    }  # fmt: skip


def lr_of(method: str, a) -> float:
    if method in a.lr_override:
        return a.lr_override[method]
    return DEFAULT_LR["upscaled" if method.startswith("upscaled") else method]


def make_step_timer():
    """A TrainerCallback recording the wall time at the end of every optimizer step (CUDA-synchronised)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    return StepTimer()


def _cuda_mib(fn) -> float | None:
    return fn() / 2**20 if torch.cuda.is_available() else None


def run_one(ctx: dict, task: dict, base: str, method: str, seed: int, steps: int, evaluate_after: bool = True,
            observer=None) -> dict:  # fmt: skip
    """Train ``method`` on ``base`` for ``steps`` steps of ``task`` and evaluate it; returns the result dict and
    (for ``full`` on the large base) keeps the trained model in ctx['teachers'] for the observer."""
    from transformers import (
        Trainer,
        TrainingArguments,
        get_cosine_schedule_with_warmup,
        set_seed,
    )
    from transformers.trainer_callback import PrinterCallback

    from peft_state_tuning import DecorrelatedOptimizer, ObserverCallback

    a, device, tok = ctx["args"], ctx["device"], ctx["tok"]
    if method == "example":
        return run_example(ctx, task, base, seed, steps, evaluate_after)
    t0 = time.perf_counter()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    mem0 = _cuda_mib(torch.cuda.memory_allocated)
    set_seed(seed)
    model = load_base(ctx["base_dirs"][base], device)
    lr = lr_of(method, a)
    res = {"task": task["name"], "base": base, "method": method, "label": LABELS.get(method, method), "seed": seed,
           "lr": lr, "steps": steps, "batch_size": a.batch_size}  # fmt: skip
    callbacks, optimizers, cfg_repr, opt = [], (None, None), {}, None
    # observer = plain state tuning + the callback; upscaled_<M>[_dbp] = upscaled M (+ DBP below)
    kind = "state" if method == "observer" else "upscaled" if method.startswith("upscaled") else method
    upscale = int(method.split("_")[1]) if kind == "upscaled" else None
    model, cfg_repr = study_methods.wrap(model, kind, upscale_dim=upscale, upscale_seed=seed)
    model.to(device)
    if method == "observer":
        if observer is None:
            raise RuntimeError(f"no observer: run {task['name']}/large/full failed or was skipped")
        observer.to(device).eval()
        obs_cb = ObserverCallback(observer, alpha=a.observer_alpha, temperature=a.observer_temperature,
                                  log_every=max(1, steps // 4))  # fmt: skip
        callbacks.append(obs_cb)
        which = ("the larger base untuned (--observer-source large_untuned)" if a.observer_source == "large_untuned"
                 else f"{task['name']}/large/full (the larger base, fully fine-tuned on this task)")  # fmt: skip
        cfg_repr["observer"] = {"model": which,
                                "alpha": a.observer_alpha, "temperature": a.observer_temperature}  # fmt: skip
    res["config"] = cfg_repr
    res["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res["base_parameters"] = ctx["base_params"][base]
    warmup = min(10, steps // 10)
    if method.endswith("_dbp"):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = DecorrelatedOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=0.0), model, decor_lr=a.decor_lr)
        optimizers = (opt, get_cosine_schedule_with_warmup(opt, warmup, steps))
        cfg_repr["dbp"] = {"decor_lr": a.decor_lr, "kappa": 0.0, "momentum": 0.0, "normalize": True}
    timer = make_step_timer()
    callbacks.append(timer)
    train_rows = [demo.encode_example(tok, e["prompt"], e["answer"]) for e in task["train"]]
    targs = TrainingArguments(
        output_dir=str(Path(a.work_dir) / "trainer"), max_steps=steps, per_device_train_batch_size=a.batch_size,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.0,
        logging_steps=max(1, steps // 20), eval_strategy="no", save_strategy="no", report_to=[], seed=seed,
        data_seed=seed, disable_tqdm=True, use_cpu=device.type != "cuda", dataloader_num_workers=0,
        remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=train_rows, data_collator=demo.pad_collator(),
                      callbacks=callbacks, optimizers=optimizers)  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # no log dict printed every logging step
    res["setup_seconds"] = time.perf_counter() - t0
    res["gpu_mib_before_train"] = _cuda_mib(torch.cuda.memory_allocated)
    res["gpu_mib_at_start"] = mem0
    t_train = time.perf_counter()
    trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    res["train_seconds"] = time.perf_counter() - t_train
    ts = timer.times
    diffs = sorted(y - x for x, y in itertools.pairwise(ts[1:]))  # after the first step (compilation)
    res["step_seconds"] = diffs[len(diffs) // 2] if diffs else res["train_seconds"] / max(1, steps)  # median
    res["peak_gpu_mib_train"] = _cuda_mib(torch.cuda.max_memory_allocated)
    res["train_loss_curve"] = [(r["step"], round(r["loss"], 4)) for r in trainer.state.log_history if "loss" in r]
    if opt is not None:
        h = opt.correlation_history
        res["dbp_correlation_first_last"] = [h[0], h[-1]] if h else None
        opt.remove_hooks()
    if evaluate_after:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res["after"] = evaluate(model, tok, task, token_budget=a.eval_token_budget, greedy_max_new=a.greedy_max_new)
        res["peak_gpu_mib_eval"] = _cuda_mib(torch.cuda.max_memory_allocated)
    if method == "observer":
        observer.to("cpu")
        res["observer_stats"] = [{k: round(v, 5) for k, v in h.items()} for h in obs_cb.history]  # KL, CE, state norms
    if method == "full" and base == "large" and evaluate_after:
        ctx["teachers"][task["name"]] = model.to("cpu")
    res["wall_seconds"] = time.perf_counter() - t0
    del trainer, model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def run_example(ctx: dict, task: dict, base: str, seed: int, steps: int, evaluate_after: bool = True) -> dict:
    """Plain state tuning through the user-facing HF Trainer example, ``examples/train_state_tuning.py``, in a
    process of its own: the task written as prompt/completion jsonl files (``train.jsonl``, ``test.jsonl``), the
    same steps, batch, learning rate, warm-up and seed as the ``state`` run (``--no_eos``: the same tokens as the
    other runs). Then the adapter it saved is loaded onto the base with ``PeftModel.from_pretrained`` and evaluated
    like every other run; the example's own metrics (eval token accuracy and perplexity on 64 eval rows) are kept."""
    from peft import PeftModel

    a, device, tok = ctx["args"], ctx["device"], ctx["tok"]
    t0 = time.perf_counter()
    folder = Path(a.work_dir) / f"example_{task['name']}_{base}_seed{seed}"
    data_dir, out_dir = folder / "data", folder / "adapter"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", task["train"]), ("test", task["eval"])):
        lines = [json.dumps({"prompt": e["prompt"], "completion": e["answer"]}) for e in rows]
        (data_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--model_name_or_path", str(ctx["base_dirs"][base]), "--dataset", str(data_dir), "--prompt_column", "prompt",
            "--completion_column", "completion", "--no_eos", "--max_steps", str(steps),
            "--per_device_train_batch_size", str(a.batch_size), "--learning_rate", str(lr_of("example", a)),
            "--warmup_steps", str(min(10, steps // 10)), "--seed", str(seed), "--output_dir", str(out_dir),
            "--logging_steps", str(max(1, steps // 20)), "--max_eval_samples", "64", "--disable_tqdm",
            "--tokenizer_name", str(ctx["base_dirs"]["small"])]  # fmt: skip
    if device.type != "cuda":
        args.append("--use_cpu")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_state_tuning.py"), *args],
                          capture_output=True, text=True, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"examples/train_state_tuning.py exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2500:]}")
    metrics = json.loads((out_dir / "all_results.json").read_text())
    res = {"task": task["name"], "base": base, "method": "example", "label": LABELS["example"], "seed": seed,
           "lr": lr_of("example", a), "steps": steps, "batch_size": a.batch_size,
           "command": "examples/train_state_tuning.py " + " ".join(args), "example_metrics": metrics,
           "train_seconds": metrics.get("train_runtime"), "peak_gpu_mib_train": None,
           "base_parameters": ctx["base_params"][base]}  # fmt: skip
    res["step_seconds"] = (res["train_seconds"] or 0.0) / max(1, steps)
    model = PeftModel.from_pretrained(load_base(ctx["base_dirs"][base], device), str(out_dir)).to(device)
    res["trainable_parameters"] = sum(p.numel() for n, p in model.named_parameters() if "state_tuning" in n)
    if evaluate_after:
        res["after"] = evaluate(model, tok, task, token_budget=a.eval_token_budget, greedy_max_new=a.greedy_max_new)
    res["wall_seconds"] = time.perf_counter() - t0
    return res



def run_guarded(ctx: dict, kind: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; on CUDA, if it fails inside Triton (e.g. a kernel that does not compile for the upscaled head
    size M), once more with ``RWKV7_WKV_BACKEND=torch`` (the chunked PyTorch path, any size), remembered for this
    (base, method) so that later runs of it start there. The result records the backend used."""
    fallback = ctx.setdefault("torch_backend_kinds", {})
    prev = os.environ.get("RWKV7_WKV_BACKEND")
    try:
        if kind in fallback:
            os.environ["RWKV7_WKV_BACKEND"] = "torch"
        try:
            res = fn(*args, **kwargs)
            if kind in fallback:
                res["wkv_backend"] = f"torch (fallback after: {fallback[kind]})"
            return res
        except Exception as e:
            if ctx["device"].type != "cuda" or kind in fallback or "triton" not in traceback.format_exc().lower():
                raise
            fallback[kind] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"!!! {kind} failed in Triton ({fallback[kind][:120]}); retrying with RWKV7_WKV_BACKEND=torch")
            gc.collect()
            torch.cuda.empty_cache()
            os.environ["RWKV7_WKV_BACKEND"] = "torch"
            res = fn(*args, **kwargs)
            res["wkv_backend"] = f"torch (fallback after: {fallback[kind]})"
            return res
    finally:
        if prev is None:
            os.environ.pop("RWKV7_WKV_BACKEND", None)
        else:
            os.environ["RWKV7_WKV_BACKEND"] = prev


# ---------------------------------------------------------------------------------------------------------------
# Plan, budget, main loop
# ---------------------------------------------------------------------------------------------------------------


def build_plan(a) -> list[dict]:
    """All runs in order; phase 0 is the core (per task, the methods in SMALL_METHODS's order, the large base's
    ``full`` right before ``observer``), 1 extra seeds, 2 the large base's state/LoRA."""
    plan = []
    for t in a.tasks:
        for m in sorted(dict.fromkeys(a.methods), key=SMALL_METHODS.index):
            if m == "observer":
                plan.append({"task": t, "base": "large", "method": "full", "seed": 0, "phase": 0})
            plan.append({"task": t, "base": "small", "method": m, "seed": 0, "phase": 0})
    if "book" in a.tasks:
        for s in a.seeds[1:]:
            for m in ("state", "lora"):
                plan.append({"task": "book", "base": "small", "method": m, "seed": s, "phase": 1})
    for t in a.tasks:
        for m in a.large_methods:
            if not any(r["task"] == t and r["base"] == "large" and r["method"] == m for r in plan):
                plan.append({"task": t, "base": "large", "method": m, "seed": 0, "phase": 2})
    for r in plan:
        r["key"] = f"{r['task']}/{r['base']}/{r['method']}/seed{r['seed']}"
    return plan


def estimate(run: dict, steps: int, cal: dict) -> float:
    c = cal["runs"].get(f"{run['base']}/{run['method']}", {"step": 0.1, "setup": 2.0, "fwd_factor": 1.0})
    ev = cal["eval"].get(f"{run['task']}/{run['base']}", 5.0) * c.get("fwd_factor", 1.0)
    return c["setup"] + steps * c["step"] + ev + 1.0


def choose_steps(plan, cal, available: float, a) -> tuple[int, int]:
    """(steps, highest phase kept): drop phases from the top while the steps would fall below preferred."""
    for top in sorted({r["phase"] for r in plan}, reverse=True):
        runs = [r for r in plan if r["phase"] <= top]
        fixed = sum(estimate(r, 0, cal) for r in runs)
        per_step = sum(estimate(r, 1, cal) - estimate(r, 0, cal) for r in runs)
        steps = int((available - fixed) / per_step) if per_step > 0 else a.max_steps
        if steps >= min(a.preferred_steps, a.max_steps) or top == 0:
            return max(a.min_steps, min(a.max_steps, steps)), top
    raise AssertionError


def summarize_claim(data: dict) -> dict:
    out = {}
    for t in data["settings"]["tasks"]:
        u = data["untuned"]
        runs = [r for k, r in data["runs"].items() if k.startswith(f"{t}/small/state/") and "after" in r]
        large_state = data["runs"].get(f"{t}/large/state/seed0", {}).get("after")
        if not runs or f"{t}/large" not in u or f"{t}/small" not in u:
            out[t] = "not measured (runs missing)"
            continue
        st = {key: sum(r["after"][key] for r in runs) / len(runs) for key in ("ranked_accuracy", "greedy_exact_match", "eval_loss")}
        st["seeds"] = [r["seed"] for r in runs]
        lz, lf = u[f"{t}/large"]["zero_shot"], u[f"{t}/large"].get("few_shot", {})
        sz, sf = u[f"{t}/small"]["zero_shot"], u[f"{t}/small"].get("few_shot", {})
        best_large = max(lz["ranked_accuracy"], lf.get("ranked_accuracy", 0.0))
        best_large_greedy = max(lz.get("greedy_exact_match", 0.0), lf.get("greedy_exact_match", 0.0))
        out[t] = {
            "small_state_tuned": st,
            "small_untuned_zero_shot": {k: sz.get(k) for k in ("ranked_accuracy", "greedy_exact_match", "eval_loss")},
            "small_untuned_few_shot": {k: sf.get(k) for k in ("ranked_accuracy", "greedy_exact_match")},
            "large_untuned_zero_shot": {k: lz.get(k) for k in ("ranked_accuracy", "greedy_exact_match", "eval_loss")},
            "large_untuned_few_shot": {k: lf.get(k) for k in ("ranked_accuracy", "greedy_exact_match")},
            "large_state_tuned": None if not large_state else
                {k: large_state.get(k) for k in ("ranked_accuracy", "greedy_exact_match", "eval_loss")},
            "small_state_tuned_beats_large_untuned_ranked": st["ranked_accuracy"] > best_large,
            "small_state_tuned_beats_large_untuned_greedy": st["greedy_exact_match"] > best_large_greedy,
            "note": "untuned = the pretrained base, never trained on the task format; 'few-shot' puts one training "
                    "example per class before each prompt; the comparison is against the better of zero-/few-shot.",
        }  # fmt: skip
        out[t]["verdict"] = (
            f"{t}: small ({data['bases']['small']['parameters'] / 1e6:.1f} M) state-tuned ranked "
            f"{st['ranked_accuracy']:.1%} / greedy {st['greedy_exact_match']:.1%} vs large "
            f"({data['bases']['large']['parameters'] / 1e6:.1f} M) untuned ranked {lz['ranked_accuracy']:.1%} zero-shot, "
            f"{lf.get('ranked_accuracy', float('nan')):.1%} few-shot / greedy {lz.get('greedy_exact_match', 0):.1%}, "
            f"{lf.get('greedy_exact_match', float('nan')):.1%}: the smaller state-tuned model "
            f"{'beats' if out[t]['small_state_tuned_beats_large_untuned_ranked'] else 'does NOT beat'} the larger untuned "
            f"one on ranked accuracy"
        )
    return out


def plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data["settings"]["tasks"]
    fig, axes = plt.subplots(len(tasks) + 1, 3, figsize=(19, 4.6 * (len(tasks) + 1)), squeeze=False)
    legend = {}  # one legend for the whole figure, right of the panels: inside them it hid the points
    metrics = [("ranked_accuracy", "ranked accuracy"), ("greedy_exact_match", "greedy exact match"),
               ("eval_loss", "eval loss (nats/answer byte)")]  # fmt: skip
    methods = list(LABELS)
    for row, t in enumerate(tasks):
        runs = [r for r in data["runs"].values() if r.get("task") == t and "after" in r]
        for col, (key, title) in enumerate(metrics):
            ax = axes[row][col]
            for r in runs:
                y = r["after"].get(key)
                if y is None:
                    continue
                j = methods.index(r["method"]) if r["method"] in methods else 0
                ax.scatter([r["trainable_parameters"]], [y], edgecolors=f"C{j}", marker="o" if r["base"] == "small" else "s",
                           facecolors=f"C{j}" if r["base"] == "small" else "none", s=55, alpha=0.85,
                           label=f"{LABELS.get(r['method'], r['method'])}" + (" (large)" if r["base"] == "large" else ""))  # fmt: skip
            for b, ls in (("small", "--"), ("large", "-.")):
                u = data["untuned"].get(f"{t}/{b}", {}).get("zero_shot", {})
                if key in u:
                    ax.axhline(u[key], color="gray" if b == "small" else "black", ls=ls, lw=1, label=f"{b} base untuned")
                f = data["untuned"].get(f"{t}/{b}", {}).get("few_shot", {})
                if key in f:
                    ax.axhline(f[key], color="gray" if b == "small" else "black", ls=":", lw=1, label=f"{b} base few-shot")
            if key != "eval_loss":
                ax.axhline(data["tasks"][t]["chance"], color="red", ls=":", lw=1, label="chance")
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters (o small base, [] large base)")
            ax.set_title(f"{t}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
            for hh, ll in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(ll, hh)
    # last row: pretraining curve, seeds, claim
    ax = axes[-1][0]
    pre = data["bases"]["large"].get("pretrain")
    if isinstance(pre, dict) and pre.get("train_curve"):  # a string when the base was given (--large-model)
        ax.plot([p[0] for p in pre["train_curve"]], [p[1] for p in pre["train_curve"]], lw=1, label="train")
        ax.plot([p[0] for p in pre["val_curve"]], [p[1] for p in pre["val_curve"]], "o-", ms=3, label="held-out")
        ax.set_ylim(top=min(4.0, max(p[1] for p in pre["train_curve"])))
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.legend(fontsize=8)
    ax.set_title(f"larger base pretraining ({data['bases']['large'].get('parameters', 0) / 1e6:.1f} M)", fontsize=10)
    ax.grid(alpha=0.3)
    ax = axes[-1][1]
    seeds = data.get("seed_summary", {})
    names = [k for k in seeds if seeds[k]["n"] > 0]
    if names:
        ax.bar(range(len(names)), [seeds[k]["mean"] for k in names], yerr=[seeds[k]["std"] for k in names], capsize=4)
        for i, k in enumerate(names):
            ax.scatter([i] * len(seeds[k]["values"]), seeds[k]["values"], color="k", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_title("book, small base: ranked accuracy over seeds (mean +- sd)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[-1][2]
    bars, vals = [], []
    for t in tasks:
        c = data.get("claim", {}).get(t)
        if isinstance(c, dict):
            for name, v in (("small untuned", c["small_untuned_zero_shot"]), ("large untuned", c["large_untuned_zero_shot"]),
                            ("large few-shot", c["large_untuned_few_shot"]), ("small state-tuned", c["small_state_tuned"])):  # fmt: skip
                bars.append(f"{t}\n{name}")
                vals.append(v.get("ranked_accuracy") or 0.0)
    if bars:
        ax.bar(range(len(bars)), vals, color=[f"C{i % 4}" for i in range(len(bars))])
        ax.set_xticks(range(len(bars)), bars, fontsize=6, rotation=60)
    ax.set_title("claim: small state-tuned vs larger untuned (ranked acc.)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.legend(legend.values(), legend.keys(), fontsize=8, loc="center right")
    s = data["settings"]
    parts = data.get("timeline", {}).get("merged_from", {}).values()
    devices = sorted({(d.get("environment") or {}).get("device") for d in parts} - {None}) or [data["environment"].get("device")]
    fig.suptitle(f"GPU study ({', '.join(map(str, devices))}): {s.get('steps')} steps x {s['batch_size']}, "
                 f"small {data['bases']['small']['parameters'] / 1e6:.1f} M vs large "
                 f"{data['bases']['large'].get('parameters', 0) / 1e6:.1f} M", fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 0.8, 0.97))
    fig.savefig(png, dpi=90)
    plt.close(fig)


def seed_summary(data: dict) -> dict:
    out = {}
    for m in ("state", "lora"):
        vals = [r["after"]["ranked_accuracy"] for k, r in data["runs"].items()
                if k.startswith(f"book/small/{m}/") and "after" in r]  # fmt: skip
        mean = sum(vals) / len(vals) if vals else None
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        out[m] = {"values": vals, "mean": mean, "std": std, "n": len(vals)}
    u = data["untuned"].get("book/small", {}).get("zero_shot")
    if u:
        out["untuned"] = {"values": [u["ranked_accuracy"]], "mean": u["ranked_accuracy"], "std": 0.0, "n": 1,
                          "note": "deterministic: the eval split is fixed, the untuned model has no training seed"}  # fmt: skip
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for study_gpu.json and study_gpu.png")
    ap.add_argument("--work-dir", default="/tmp/study_gpu_work", help="the larger base and trainer scratch")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU check of every code path")
    ap.add_argument("--time-budget-s", type=float, default=420.0, help="wall seconds for everything, from the start")
    ap.add_argument("--hard-limit-s", type=float, default=500.0, help="no run starts that would end after this")
    ap.add_argument("--pretrain-s", type=float, default=130.0, help="training seconds of the larger base")
    ap.add_argument("--large-model", default=None, help="use this pretrained larger base instead of pretraining one")
    ap.add_argument("--save-large-to", default=None, metavar="DIR",
                    help="save the larger base (bf16, <= 5 files of < 16 MiB) to DIR and use that copy from then on")
    ap.add_argument("--resume", default=None, metavar="JSON",
                    help="continue the study of this study_gpu.json (needs --large-model, the base it used)")
    ap.add_argument("--max-runs", type=int, default=None, help="start at most this many runs (tests of --resume)")
    ap.add_argument("--large-layers", type=int, default=8)
    ap.add_argument("--large-hidden", type=int, default=384)
    ap.add_argument("--large-lr", type=float, default=2e-3)
    ap.add_argument("--large-batch", type=int, default=64)
    ap.add_argument("--tasks", nargs="+", default=["book", "genre"], choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=SMALL_METHODS, choices=SMALL_METHODS)
    ap.add_argument("--large-methods", nargs="*", default=["state", "lora", "example"],
                    choices=["state", "lora", "full", "example"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None,
                    help="fix the steps and keep every phase (the probes still run; the fit is only recorded)")
    ap.add_argument("--no-probes", action="store_true",
                    help="with --steps: skip the timing probes (each kind's first Triton compilation then happens in its "
                         "first run; estimates use defaults, only --hard-limit-s guards the time)")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--preferred-steps", type=int, default=150)
    ap.add_argument("--min-steps", type=int, default=30)
    ap.add_argument("--probe-steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-per-class", type=int, default=400)
    ap.add_argument("--eval-per-class", type=int, default=50)
    ap.add_argument("--decor-lr", type=float, default=1e-2)
    ap.add_argument("--observer-alpha", type=float, default=0.5)
    ap.add_argument("--observer-temperature", type=float, default=1.0)
    ap.add_argument("--observer-source", choices=["large_full", "large_untuned"], default="large_full",
                    help="the observer: the larger base fully fine-tuned on the task (default) or untuned")
    ap.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="override learning rates")
    ap.add_argument("--eval-token-budget", type=int, default=131072, help="tokens per evaluation forward")
    ap.add_argument("--greedy-max-new", type=int, default=14, help="bytes of greedy decoding (longest answer: 12)")
    ap.add_argument("--no-fewshot", action="store_true", help="no few-shot evaluation of the untuned bases")
    ap.add_argument("--small-fewshot", dest="small_fewshot", action="store_true",
                    help="also evaluate the untuned SMALL base few-shot (off: the claim needs the larger base's)")
    ap.add_argument("--untuned-only-large-fewshot", dest="small_fewshot", action="store_false",
                    help="only the larger untuned base few-shot (the default)")
    a = ap.parse_args(argv)
    if a.no_probes and not a.steps:
        ap.error("--no-probes needs --steps N")
    if a.resume and not a.large_model:
        ap.error("--resume needs --large-model DIR: the larger base the resumed study used (its --save-large-to DIR)")
    a.lr_override = {k: float(v) for k, v in (x.split("=") for x in a.lr)}
    a.seeds = [0] + [s for s in dict.fromkeys(a.seeds) if s != 0]  # seed 0 is the main run of every method
    if a.smoke:
        a.train_per_class, a.eval_per_class, a.greedy_max_new = 8, 1, 3
        a.max_steps, a.min_steps, a.preferred_steps, a.probe_steps = 3, 2, 3, 3
        a.steps = a.steps or 2  # fixed: every phase runs (the budget fit is still computed and recorded)
        a.batch_size, a.eval_token_budget = 4, 8192
        a.time_budget_s, a.hard_limit_s = max(a.time_budget_s, 900.0), max(a.hard_limit_s, 1200.0)
        a.work_dir = a.work_dir if a.work_dir != "/tmp/study_gpu_work" else "/tmp/study_gpu_smoke_work"
    return a


# the settings that define the experiment: a resumed study keeps those of the JSON it resumes
RESUME_KEYS = ("tasks", "methods", "large_methods", "seeds", "steps", "batch_size", "train_per_class", "eval_per_class",
               "decor_lr", "observer_alpha", "observer_temperature", "observer_source", "greedy_max_new",
               "eval_token_budget", "no_fewshot", "small_fewshot", "probe_steps")  # fmt: skip


def apply_resume(a, old: dict) -> dict:
    """Sets ``a``'s experiment settings (RESUME_KEYS and the learning rates) to those of the resumed study ``old``;
    returns ``{argument: {"given", "kept"}}`` for those the command line gave differently (ignored)."""
    s, ignored = old["settings"], {}
    for k in RESUME_KEYS:
        if k not in s or s[k] is None:  # e.g. no steps yet: the resumed call never got past its calibration
            continue
        given = getattr(a, k)
        if given != s[k] and not (k == "steps" and given is None):
            ignored[k] = {"given": given, "kept": s[k]}
        setattr(a, k, s[k])
    if isinstance(s.get("lr"), dict):
        given = {m: lr_of(m, a) for m in s["lr"]}
        ignored.update({f"lr {m}": {"given": v, "kept": s["lr"][m]} for m, v in given.items() if v != s["lr"][m]})
        a.lr_override = dict(s["lr"])
    for k, v in ignored.items():
        log(f"!!! --resume: {k} = {v['given']} ignored, the resumed study's {v['kept']} kept")
    return ignored


def merge(paths: list[str], out: Path) -> dict:
    """One study from several study_gpu.json of the same base (e.g. one process per task on a 2-GPU machine, each
    with ``--tasks <task> --large-model DIR``, plus the call that pretrained DIR): the first JSON gives the settings,
    the bases (with the pretraining record) and its untuned evaluations (few-shot included); the others add their
    tasks, runs, skips and any untuned evaluation the first lacks. A run present in several parts keeps the last
    result (a failed run never replaces one), and a skip is dropped once the run has a result. Writes
    ``out/study_gpu.json`` and ``.png``."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    data = json.loads(json.dumps(parts[0]))
    data["calibration"] = {paths[0]: parts[0].get("calibration")}
    data["timeline"] = {"merged_from": {p: {"timeline": d.get("timeline"), "environment": d.get("environment"),
                                            "tasks": d["settings"]["tasks"], "steps": d["settings"].get("steps")}
                                        for p, d in zip(paths, parts)}}  # fmt: skip
    for p, d in zip(paths[1:], parts[1:]):
        data["tasks"].update(d.get("tasks", {}))
        # later parts win, except that a failed run never replaces a result
        data["runs"].update({k: r for k, r in d.get("runs", {}).items() if "after" in r or k not in data["runs"]})
        data["teacher_reruns"] = {**data.get("teacher_reruns", {}), **d.get("teacher_reruns", {})}
        data["skipped"] += d.get("skipped", [])
        for k, u in d.get("untuned", {}).items():
            data["untuned"].setdefault(k, u)
        data["calibration"][p] = d.get("calibration")
        data["settings"]["tasks"] = list(dict.fromkeys(data["settings"]["tasks"] + d["settings"]["tasks"]))
    # a run skipped or failed in one part and done in a later one: the result counts, the skip does not
    data["skipped"] = [s for s in data["skipped"] if "after" not in data["runs"].get(s["key"], {})]
    steps = sorted({r["steps"] for r in data["runs"].values() if "steps" in r})
    data["settings"]["steps"] = steps[0] if len(steps) == 1 else steps
    data["seed_summary"] = seed_summary(data)
    data["claim"] = summarize_claim(data)
    out.mkdir(parents=True, exist_ok=True)
    plot(data, out / "study_gpu.png")
    (out / "study_gpu.json").write_text(json.dumps(data, indent=1, default=str))
    print_table(data)
    return data


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--merge":  # study_gpu.py --merge OUT A.json B.json ...
        merge(sys.argv[3:], Path(sys.argv[2]))
        return 0
    # One GPU (before CUDA is initialised): on a multi-GPU host Trainer would wrap the model in DataParallel.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    # Eager blocks: many short runs of many methods and shapes, each timed against a budget; compiling the blocks
    # (the CUDA training default, modeling_rwkv7/compiled_blocks.py) would add unpredictable compilation time.
    os.environ.setdefault("RWKV7_COMPILE", "0")
    a = parse_args(argv)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*use_cache.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    old = json.loads(Path(a.resume).read_text()) if a.resume else None
    ignored = apply_resume(a, old) if old else {}
    out, work = Path(a.out), Path(a.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    js, png = out / "study_gpu.json", out / "study_gpu.png"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    import peft
    import transformers

    data = {
        "settings": {k: v for k, v in vars(a).items() if k != "lr_override"},
        "environment": {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.machine()}, "
                      f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "RWKV7_COMPILE": os.environ.get("RWKV7_COMPILE"),
        },
        "bases": {}, "tasks": {}, "untuned": {}, "runs": {}, "teacher_reruns": {}, "skipped": [], "timeline": {},
    }  # fmt: skip
    data["settings"]["lr"] = {m: lr_of(m, a) for m in LABELS}
    call = 1
    if old:  # keep what the resumed study measured; redo what failed, was skipped or never ran
        call = old.get("timeline", {}).get("call", 1) + 1
        data["bases"] = old["bases"]
        data["tasks"] = old.get("tasks", {})
        data["untuned"] = {k: u for k, u in old.get("untuned", {}).items() if "error" not in u}
        data["runs"] = {k: r for k, r in old.get("runs", {}).items() if "after" in r}
        data["teacher_reruns"] = old.get("teacher_reruns", {})
        if old.get("calibration"):
            data["calibration"] = old["calibration"]
        data["timeline"] = {"resumed_from": str(a.resume), "previous_call": old.get("timeline", {})}
        data["resumed"] = {
            "from": str(a.resume), "ignored_arguments": ignored, "kept_runs": list(data["runs"]),
            "dropped_runs": {k: r.get("error", "no result") for k, r in old.get("runs", {}).items() if k not in data["runs"]},
            "dropped_untuned": [k for k in old.get("untuned", {}) if k not in data["untuned"]],
            "previous_skipped": old.get("skipped", []), "previous_environment": old.get("environment"),
            "previous_settings": old["settings"],
        }  # fmt: skip
    data["timeline"]["call"] = call

    def save():
        data["timeline"]["elapsed_s"] = elapsed()
        js.write_text(json.dumps(data, indent=1, default=str))

    log(f"device {data['environment']['device']}; budget {a.time_budget_s:.0f}s (hard {a.hard_limit_s:.0f}s)"
        + (f"; call {call}, resuming {a.resume}: {len(data['runs'])} runs kept" if old else ""))

    # ---- 1. the larger base ----
    small_dir = demo.EMBEDDED_MODEL_DIR
    if a.large_model:
        large_dir = Path(a.large_model)
        data["bases"].setdefault("large", {"path": str(large_dir), "pretrain": "given (--large-model)"})
        if old:
            data["bases"]["large"][f"path_call{call}"] = str(large_dir)
    else:
        large_dir = work / "large_base"
        argv_pre = ["--out-dir", str(large_dir), "--seed", "0"]
        if a.smoke:
            argv_pre += ["--tiny", "--max-steps", "3"]
        else:
            argv_pre += ["--layers", str(a.large_layers), "--hidden", str(a.large_hidden), "--lr", str(a.large_lr),
                         "--batch-size", str(a.large_batch), "--time-budget", str(a.pretrain_s)]  # fmt: skip
        log(f"pretraining the larger base: pretrain_embedded.py {' '.join(argv_pre)}")
        t = time.perf_counter()
        plog = pretrain.main(argv_pre)
        tr = plog["train"]
        stride = max(1, len(tr) // 60)
        data["bases"]["large"] = {
            "path": str(large_dir), "command": "scripts/pretrain_embedded.py " + " ".join(argv_pre),
            "pretrain": {
                "steps": plog["steps"], "tokens": plog["tokens"], "epochs": plog["epochs"], "train_s": plog["train_s"],
                "wall_s": time.perf_counter() - t, "best_step": plog.get("best_step"),
                "best_val_loss": plog.get("best_val_loss"), "final_val_loss": plog.get("final_val_loss"),
                "train_curve": [(r["step"], round(r["loss"], 4)) for r in tr[::stride]],
                "val_curve": [(r["step"], round(r["loss"], 4)) for r in plog["val"]],
                "samples": [s[:200] for s in plog.get("samples", [])], "device": plog.get("device"),
                "args": plog["args"],
            },
        }  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if a.save_large_to:  # from here on, everything uses the saved bf16 copy (the base a resumed call gets)
        saved = save_base_bf16(large_dir, Path(a.save_large_to))
        data["bases"]["large"]["saved_copy"] = saved
        large_dir = Path(a.save_large_to)
        log(f"saved the larger base (bf16) to {large_dir}: {len(saved['files'])} files, "
            f"{saved['total_bytes'] / 2**20:.1f} MiB, largest {max(saved['files'].values()) / 2**20:.1f} MiB, "
            f"{saved['weights_changed_by_rounding']} weights changed by the rounding: {', '.join(saved['files'])}")
        if not saved["fits_out_limits"]:
            log(f"!!! {large_dir} does not fit what comes back from $OUT (<= {SAVED_BASE_MAX_FILES} files here, "
                f"each < 16 MiB)")
    data["bases"]["large"]["path_used"] = str(large_dir)
    data["bases"].setdefault("small", {"path": str(small_dir), "note": "the shipped embedded model (H100-pretrained, 4 x 256)"})
    data["timeline"]["pretrain_done_s"] = elapsed()
    save()

    tok = AutoTokenizer.from_pretrained(small_dir)
    ctx = {"args": a, "device": device, "tok": tok, "base_dirs": {"small": small_dir, "large": large_dir},
           "base_params": {}, "teachers": {}}  # fmt: skip
    # (base, method) kinds that fell back to the torch WKV backend (run_guarded): recorded, and kept when resuming
    ctx["torch_backend_kinds"] = data["torch_backend_fallbacks"] = dict((old or {}).get("torch_backend_fallbacks", {}))
    verses = demo.load_kjv()
    for b in ("small", "large"):
        m = load_base(ctx["base_dirs"][b], device)
        n = sum(p.numel() for p in m.parameters())
        ctx["base_params"][b] = n
        c = m.config
        if old and data["bases"][b].get("parameters") not in (None, n):
            raise SystemExit(f"--resume: the {b} base ({ctx['base_dirs'][b]}) has {n:,} parameters, the resumed "
                             f"study's had {data['bases'][b]['parameters']:,}: not the same base")  # fmt: skip
        if "heldout_lm_loss" not in data["bases"][b]:
            data["bases"][b]["heldout_lm_loss"] = heldout_lm_loss(m, tok, verses, 16384 if a.smoke else 262144)
        data["bases"][b].update(parameters=n, layers=c.num_hidden_layers, hidden=c.hidden_size)
        log(f"{b} base: {n / 1e6:.2f} M params, {c.num_hidden_layers} x {c.hidden_size}, held-out LM loss "
            f"{data['bases'][b]['heldout_lm_loss']:.3f}")
        del m

    # ---- 2. tasks + untuned evaluations ----
    tasks = {}
    for t in a.tasks:
        tasks[t] = {s: make_task(t, a, s) for s in (a.seeds if t == "book" else [0])}
        t0 = tasks[t][0]
        data["tasks"][t] = {"description": t0["description"], "labels": list(t0["labels"]), "chance": 1 / len(t0["labels"]),
                            "n_train": len(t0["train"]), "n_eval": len(t0["eval"]),
                            "eval_label_counts": {lab: sum(e["label"] == lab for e in t0["eval"]) for lab in t0["labels"]},
                            "fewshot_prefix_bytes": len(t0["fewshot_prefix"].encode()),
                            "example": {"prompt": t0["eval"][0]["prompt"], "answer": t0["eval"][0]["answer"]}}  # fmt: skip
    cal = data.get("calibration") or {"runs": {}, "eval": {}}
    for t in a.tasks:
        for b in ("small", "large"):
            if f"{t}/{b}" in data["untuned"]:
                continue  # kept from the resumed study
            try:
                m = load_base(ctx["base_dirs"][b], device)
                if device.type == "cuda":  # warm-up (kernel compilation) so that the timing below is an eval's cost
                    evaluate(m, tok, dict(tasks[t][0], eval=tasks[t][0]["eval"][:24]), token_budget=a.eval_token_budget,
                             greedy_max_new=2)  # fmt: skip
                te = time.perf_counter()
                zs = evaluate(m, tok, tasks[t][0], token_budget=a.eval_token_budget, greedy_max_new=a.greedy_max_new)
                cal["eval"][f"{t}/{b}"] = time.perf_counter() - te
                entry = {"zero_shot": zs}
                if not a.no_fewshot and (b == "large" or a.small_fewshot):
                    entry["few_shot"] = evaluate(m, tok, tasks[t][0], prefix=tasks[t][0]["fewshot_prefix"],
                                                 token_budget=a.eval_token_budget, greedy_max_new=a.greedy_max_new)  # fmt: skip
                entry["call"] = call
                data["untuned"][f"{t}/{b}"] = entry
                log(f"untuned {t}/{b}: ranked {zs['ranked_accuracy']:.3f} greedy {zs['greedy_exact_match']:.3f} "
                    f"loss {zs['eval_loss']:.3f} ({zs['eval_seconds']:.1f}s)" + (f"; few-shot ranked "
                    f"{entry['few_shot']['ranked_accuracy']:.3f} greedy {entry['few_shot']['greedy_exact_match']:.3f} "
                    f"({entry['few_shot']['eval_seconds']:.1f}s)" if "few_shot" in entry else ""))  # fmt: skip
                del m
            except Exception as e:  # noqa: BLE001
                data["untuned"][f"{t}/{b}"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:],
                                               "call": call}  # fmt: skip
                log(f"!!! untuned {t}/{b} failed: {type(e).__name__}: {e}")
            save()
    data["timeline"]["untuned_done_s"] = elapsed()

    # ---- 3. calibration: time every (base, method) for a few steps (also compiles the kernels) ----
    plan = build_plan(a)
    resumed_cal = bool(old and a.steps and cal["runs"])  # the resumed study's probes and steps: no new probes
    first_run_extra = {}
    if resumed_cal:  # the first run of each kind compiles its kernels here: its probe's first-step overhead
        first_run_extra = {k: max(0.0, c.get("probe_wall", 0.0) - c["setup"] - a.probe_steps * c["step"])
                           for k, c in cal["runs"].items()}  # fmt: skip
        fit, available = None, a.time_budget_s - elapsed()
        log(f"calibration kept from {a.resume}: {a.steps} steps per run")
    elif a.no_probes:  # fixed --steps, no timing probes: the runs are skipped by --hard-limit-s alone if time runs out
        fit, available = None, a.time_budget_s - elapsed()
        log(f"no probes (--no-probes): {a.steps} steps per run")
    else:
        kinds = list(dict.fromkeys((r["base"], r["method"]) for r in plan))
        probe_task = tasks[a.tasks[0]][0]
        for b, m in kinds:
            try:
                obs = load_base(large_dir, "cpu") if m == "observer" else None
                r = run_guarded(ctx, f"{b}/{m}", run_one, ctx, probe_task, b, m, 0, a.probe_steps, evaluate_after=False,
                                observer=obs)  # fmt: skip
                cal["runs"][f"{b}/{m}"] = {"step": r["step_seconds"], "setup": r["setup_seconds"],
                                           "probe_wall": r["wall_seconds"]}  # fmt: skip
            except Exception as e:  # noqa: BLE001
                cal["runs"][f"{b}/{m}"] = {"step": 0.2, "setup": 3.0, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                log(f"!!! probe {b}/{m} failed: {type(e).__name__}: {e}")
        base_step = {b: cal["runs"].get(f"{b}/state", {}).get("step") for b in ("small", "large")}
        for k, c in cal["runs"].items():  # evaluation cost scales roughly like the forward: the step time ratio
            b, m = k.split("/")
            c["fwd_factor"] = 1.0 if m in ("observer", "full", "lora") or not base_step[b] else max(1.0, c["step"] / base_step[b])
            log(f"probe {k}: {c['step'] * 1000:.0f} ms/step, setup {c['setup']:.1f}s, eval x{c['fwd_factor']:.2f}")
        data["calibration"] = cal
        available = a.time_budget_s - elapsed() - (15 if not a.smoke else 5)
        fit = choose_steps(plan, cal, available, a)
        data["calibration"]["fit"] = {"steps": fit[0], "phases_kept": fit[1], "available_s": available}
    steps, top = (a.steps, max(r["phase"] for r in plan)) if a.steps else fit
    plan = [r for r in plan if r["phase"] <= top]
    data["settings"]["steps"] = steps
    data["settings"]["phases_kept"] = top
    data["settings"]["plan"] = [r["key"] for r in plan]
    # this call's runs: the plan less the runs kept from a resumed study; an observer whose teacher (large/full,
    # trained in this process) was kept gets the teacher trained again right before it
    todo = []
    for r in plan:
        if r["key"] in data["runs"]:
            continue
        teacher = f"{r['task']}/large/full/seed0"
        if r["method"] == "observer" and a.observer_source == "large_full" and teacher in data["runs"]:
            todo.append({"task": r["task"], "base": "large", "method": "full", "seed": 0, "phase": r["phase"],
                         "key": teacher, "teacher_rerun": True})  # fmt: skip
        todo.append(r)
    data["settings"]["plan_call"] = {**(old or {}).get("settings", {}).get("plan_call", {}),
                                     str(call): [r["key"] + (" (teacher rerun)" if r.get("teacher_rerun") else "")
                                                 for r in todo]}  # fmt: skip
    est = sum(estimate(r, steps, cal) for r in todo)
    data["timeline"]["calibration_done_s"] = elapsed()
    log(f"plan: {len(plan)} runs of {steps} steps (phases <= {top}), this call {len(todo)}, estimated {est:.0f}s, "
        f"available {available:.0f}s")
    save()

    # ---- 4. the runs ----
    started = 0
    for i, run in enumerate(todo):
        key, kind = run["key"], f"{run['base']}/{run['method']}"
        need = estimate(run, steps, cal) + first_run_extra.get(kind, 0.0)
        if a.max_runs is not None and started >= a.max_runs:
            data["skipped"].append({"key": key, "reason": f"--max-runs {a.max_runs}", "call": call})
            log(f"skip {key} (--max-runs)")
            continue
        if elapsed() + need > a.hard_limit_s or (run["phase"] > 0 and elapsed() + need > a.time_budget_s):
            data["skipped"].append({"key": key, "reason": f"time: {elapsed():.0f}s elapsed + ~{need:.0f}s needed",
                                    "call": call})  # fmt: skip
            log(f"skip {key} (time)")
            continue
        started += 1
        first_run_extra.pop(kind, None)
        task = tasks[run["task"]][run["seed"]]
        log(f"[{i + 1}/{len(todo)}] {key}{' (teacher rerun)' if run.get('teacher_rerun') else ''} (est. {need:.0f}s)")
        obs = None
        if run["method"] == "observer":
            obs = load_base(large_dir, "cpu") if a.observer_source == "large_untuned" else ctx["teachers"].get(run["task"])
        try:
            res = run_guarded(ctx, kind, run_one, ctx, task, run["base"], run["method"], run["seed"], steps, observer=obs)
        except Exception as e:  # noqa: BLE001
            res = {"task": run["task"], "base": run["base"], "method": run["method"], "seed": run["seed"],
                   "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            log(f"!!! {key} failed: {type(e).__name__}: {e}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        res["estimated_seconds"] = need
        res["call"] = call
        if run["method"] == "observer" and a.observer_source == "large_full":
            teacher = f"{run['task']}/large/full/seed0"
            res["observer_teacher"] = (f"teacher_reruns/{teacher}" if teacher in data["teacher_reruns"]
                                       and data["teacher_reruns"][teacher].get("call") == call else f"runs/{teacher}")  # fmt: skip
        (data["teacher_reruns"] if run.get("teacher_rerun") else data["runs"])[key] = res
        if "after" in res:
            r = res["after"]
            log(f"    ranked {r['ranked_accuracy']:.3f} greedy {r['greedy_exact_match']:.3f} loss {r['eval_loss']:.3f} "
                f"| {res['trainable_parameters']:,} params, train {res['train_seconds']:.1f}s "
                f"({res['step_seconds'] * 1000:.0f} ms/step), eval {r['eval_seconds']:.1f}s, "
                f"peak {res['peak_gpu_mib_train'] or 0:.0f} MiB")  # fmt: skip
        if run["method"] == "observer":
            ctx["teachers"].pop(run["task"], None)
        data["seed_summary"] = seed_summary(data)
        data["claim"] = summarize_claim(data)
        save()
    for t in list(ctx["teachers"]):
        ctx["teachers"].pop(t)
    data["timeline"]["runs_done_s"] = elapsed()

    # ---- 5. summary ----
    data["seed_summary"] = seed_summary(data)
    data["claim"] = summarize_claim(data)
    try:
        plot(data, png)
    except Exception as e:  # noqa: BLE001
        data["plot_error"] = f"{type(e).__name__}: {e}"
        log(f"!!! plot failed: {e}")
    save()
    print_table(data)
    log(f"wrote {js} and {png}")
    return 0


def print_table(data: dict) -> None:
    print(f"\n{'run':34s} {'params':>10s} {'ranked':>7s} {'greedy':>7s} {'loss':>6s} {'train_s':>7s} {'ms/st':>6s} {'MiB':>6s}")
    for k, u in data["untuned"].items():
        for shot in ("zero_shot", "few_shot"):
            r = u.get(shot)
            if r:
                print(f"{k + ' untuned ' + shot.split('_')[0]:34s} {0:>10,d} {r['ranked_accuracy']:7.3f} "
                      f"{r['greedy_exact_match']:7.3f} {r.get('eval_loss', float('nan')):6.3f}")  # fmt: skip
    for k, r in data["runs"].items():
        if "after" in r:
            e = r["after"]
            print(f"{k:34s} {r['trainable_parameters']:>10,d} {e['ranked_accuracy']:7.3f} {e['greedy_exact_match']:7.3f} "
                  f"{e['eval_loss']:6.3f} {r['train_seconds']:7.1f} {r['step_seconds'] * 1000:6.0f} "
                  f"{r['peak_gpu_mib_train'] or 0:6.0f}")  # fmt: skip
        else:
            print(f"{k:34s} ERROR {r.get('error', '')[:90]}")
    for k, r in data.get("teacher_reruns", {}).items():
        e = r.get("after")
        print(f"{k + ' (rerun)':34s} " + (f"{r['trainable_parameters']:>10,d} {e['ranked_accuracy']:7.3f} "
              f"{e['greedy_exact_match']:7.3f} {e['eval_loss']:6.3f}" if e else f"ERROR {r.get('error', '')[:90]}"))
    for s in data["skipped"]:
        print(f"{s['key']:34s} SKIPPED {s['reason']}")
    for t, c in data.get("claim", {}).items():
        print("claim:", c["verdict"] if isinstance(c, dict) else f"{t}: {c}")
    ss = data.get("seed_summary", {})
    for m, s in ss.items():
        if s["n"]:
            print(f"seeds book/small/{m}: ranked {s['mean']:.3f} +- {s['std']:.3f} over {s['n']} ({s['values']})")


if __name__ == "__main__":
    sys.exit(main())
