"""The bundled corpus (the King James Bible) and the demo: state-tune the shipped model on "which book?".

Corpus: ``data/kjv/kjv.tsv.gz`` (31102 verses; provenance and licence in ``data/kjv/README.md``). A fixed 5% of
the verses (by a hash of the reference, :func:`is_heldout`) is *held out*: the shipped model never saw them in
pretraining, and the demo evaluates on them only.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
KJV_PATH = DATA_DIR / "kjv" / "kjv.tsv.gz"
EMBEDDED_MODEL_DIR = DATA_DIR / "embedded_rwkv7"
HELDOUT_PERCENT = 5


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str

    @property
    def reference(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def load_kjv(path: str | Path = KJV_PATH) -> list[Verse]:
    """All verses of the bundled KJV, in canonical order."""
    verses = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            book, chapter, verse, text = line.rstrip("\n").split("\t")
            verses.append(Verse(book, int(chapter), int(verse), text))
    return verses


def is_heldout(verse: Verse) -> bool:
    """The fixed held-out 5% (by CRC-32 of the reference): never in pretraining, the demo's evaluation split."""
    return zlib.crc32(verse.reference.encode()) % 100 < HELDOUT_PERCENT


def pretraining_text(verses: list[Verse]) -> str:
    """The pretraining stream: one verse a line, ``"Genesis 1:1 In the beginning ...\\n"``, held-out verses left out."""
    return "".join(f"{v.reference} {v.text}\n" for v in verses if not is_heldout(v))


# ---------------------------------------------------------------------------------------------------------------
# The bundled task: "which book is this verse from?"
# ---------------------------------------------------------------------------------------------------------------

# Eight books of clearly different kinds: law/narrative, poetry, wisdom, prophecy, gospel, history, letter, apocalypse.
TASK_BOOKS = ("Genesis", "Psalms", "Proverbs", "Isaiah", "Matthew", "Acts", "Romans", "Revelation")
MAX_VERSE_CHARS = 160  # shorter verses only: keeps the demo's sequences short on a CPU


def task_prompt(text: str) -> str:
    """The task's input: a verse, then ``"\\nBook:"``; the answer is ``" <book>\\n"``."""
    return f"{text}\nBook:"


def task_answer(book: str) -> str:
    return f" {book}\n"


def book_task(train_per_book: int = 400, eval_per_book: int = 25, seed: int = 0, books=TASK_BOOKS):
    """Balanced train/eval examples ``{"prompt", "answer", "book"}``: train from the verses the base model was
    pretrained on, eval from the held-out verses it never saw."""
    import random

    rng = random.Random(seed)
    train, evaluation = [], []
    verses = [v for v in load_kjv() if v.book in books and len(v.text) <= MAX_VERSE_CHARS]
    for book in books:
        pool = [v for v in verses if v.book == book]
        seen = [v for v in pool if not is_heldout(v)]
        held = [v for v in pool if is_heldout(v)]
        rng.shuffle(seen)
        rng.shuffle(held)
        train += [{"prompt": task_prompt(v.text), "answer": task_answer(v.book), "book": v.book} for v in seen[:train_per_book]]
        evaluation += [{"prompt": task_prompt(v.text), "answer": task_answer(v.book), "book": v.book} for v in held[:eval_per_book]]
    rng.shuffle(train)
    return train, evaluation


def encode_example(tokenizer, prompt: str, answer: str) -> dict:
    """Token ids of ``prompt + answer`` with the loss on the answer only (prompt labels are -100)."""
    p, a = tokenizer.encode_text(prompt), tokenizer.encode_text(answer)
    return {"input_ids": p + a, "attention_mask": [1] * (len(p) + len(a)), "labels": [-100] * len(p) + a}


def pad_collator(pad_id: int = 0):
    """Right-pads ``input_ids`` (``pad_id``), ``attention_mask`` (0) and ``labels`` (-100) to the longest row."""
    import torch

    def collate(rows: list[dict]) -> dict:
        n = max(len(r["input_ids"]) for r in rows)
        out = {
            "input_ids": torch.tensor([r["input_ids"] + [pad_id] * (n - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor([r["attention_mask"] + [0] * (n - len(r["attention_mask"])) for r in rows]),
        }
        if "labels" in rows[0]:
            out["labels"] = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in rows])
        return out

    return collate


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 14, batch_size: int = 32,
                     stop: str = "\n", desc: str | None = None) -> list[str]:  # fmt: skip
    """Greedy continuations of ``prompts`` (batched, left-padded), cut at the first ``stop``."""
    import torch
    from tqdm.auto import tqdm

    stop_id = tokenizer.encode_text(stop)[0] if stop else None
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    answers = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
                    do_sample=False, eos_token_id=stop_id, pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                text = tokenizer.decode(row, skip_special_tokens=True)
                answers.append(text.split(stop)[0] if stop else text)
    finally:
        tokenizer.padding_side = side
    return answers


def ranked_accuracy(model, tokenizer, examples: list[dict], books=TASK_BOOKS) -> float:
    """Accuracy of picking the book whose answer ``" <book>\n"`` is most likely after the prompt.

    Each prompt is read once (``use_cache=True``); the candidates then start from that state
    (``initial_state``), so scoring 8 answers costs 8 short forwards, not 8 re-reads of the verse."""
    import torch

    device = next(model.parameters()).device
    answers = [tokenizer.encode_text(task_answer(b)) for b in books]
    width = max(len(a) for a in answers)
    cand = torch.tensor([a + [0] * (width - len(a)) for a in answers], device=device)
    valid = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers], device=device, dtype=torch.bool)
    correct = 0
    with torch.no_grad():
        for e in examples:
            prompt = torch.tensor([tokenizer.encode_text(e["prompt"])], device=device)
            out = model(input_ids=prompt, use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].float(), -1)[cand[:, 0]]  # the first answer byte
            rest = model(input_ids=cand, initial_state=out.cache.state).logits.float().log_softmax(-1)
            rest = rest[:, :-1].gather(-1, cand[:, 1:, None]).squeeze(-1).masked_fill(~valid[:, 1:], 0.0)
            scores = first + rest.sum(-1)
            correct += books[int(scores.argmax())] == e["book"]
    return correct / max(1, len(examples))


def book_accuracy(model, tokenizer, examples: list[dict], desc: str | None = None) -> tuple[float, list[str]]:
    """Exact match of the greedy answer (stripped) with the book name; returns ``(accuracy, answers)``."""
    answers = generate_answers(model, tokenizer, [e["prompt"] for e in examples], desc=desc)
    correct = sum(a.strip() == e["book"] for a, e in zip(answers, examples))
    return correct / max(1, len(examples)), answers


def plot_loss(log_history: list[dict], path: Path, title: str) -> bool:
    """Training (and evaluation) loss against step, from ``trainer.state.log_history``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (answer tokens)")
    if evals:
        ax.plot(*zip(*evals), "o--", label="eval loss (held-out verses)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_demo(
    model_dir: str | Path | None = None,
    output_dir: str | Path = "state_tuning_demo",
    steps: int = 150,
    batch_size: int = 16,
    learning_rate: float = 0.3,
    train_per_book: int = 400,
    eval_per_book: int = 25,
    tune_token_shift: bool = False,
    seed: int = 0,
    show: int = 4,
    verbose: bool = True,
) -> dict:
    """State-tune the embedded model on "which book is this verse from?" with ``transformers.Trainer``.

    Returns a dict with the accuracy and eval loss before and after, the example generations, the adapter's
    path and size, the loss-curve PNG and the wall time. Prints all of it when ``verbose``.
    """
    import time

    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    from . import StateTuningConfig

    t0 = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    hf_logging.set_verbosity_error()
    set_seed(seed)
    model_dir = Path(model_dir) if model_dir is not None else EMBEDDED_MODEL_DIR
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_base = sum(p.numel() for p in base.parameters())
    train, evaluation = book_task(train_per_book, eval_per_book, seed=seed)
    say(f"model: {model_dir} ({n_base / 1e6:.2f} M parameters, frozen)")
    say(f"task: which book is a verse from? {len(TASK_BOOKS)} books ({', '.join(TASK_BOOKS)}); "
        f"{len(train)} training verses, {len(evaluation)} held-out verses (never seen in pretraining); "
        f"chance = {1 / len(TASK_BOOKS):.1%}")  # fmt: skip
    say(f"input:  {evaluation[0]['prompt']!r}\ntarget: {evaluation[0]['answer']!r}\n")

    model = get_peft_model(base, StateTuningConfig(tune_token_shift=tune_token_shift))
    n_train, _ = model.get_nb_trainable_parameters()
    train_ds = Dataset.from_list([encode_example(tokenizer, e["prompt"], e["answer"]) for e in train])
    eval_ds = Dataset.from_list([encode_example(tokenizer, e["prompt"], e["answer"]) for e in evaluation])
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=32, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=min(10, steps // 10), weight_decay=0.0, logging_steps=max(1, steps // 30),
        eval_strategy="no", save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        disable_tqdm=not verbose, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=pad_collator())

    # Before: the zero-initialised adapter leaves the base model exactly as it is.
    loss_before = trainer.evaluate()["eval_loss"]
    acc_before, answers_before = book_accuracy(model, tokenizer, evaluation, desc="eval (before)" if verbose else None)
    ranked_before = ranked_accuracy(model, tokenizer, evaluation)
    say(f"before state tuning: accuracy {ranked_before:.1%} (likelihood of the 8 answers), greedy exact match "
        f"{acc_before:.1%}, eval loss {loss_before:.3f}")

    say(f"state tuning: {n_train:,} trainable parameters (the initial WKV state of every layer), {steps} steps of {batch_size}")
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    loss_after = trainer.evaluate()["eval_loss"]
    acc_after, answers_after = book_accuracy(model, tokenizer, evaluation, desc="eval (after)" if verbose else None)
    ranked_after = ranked_accuracy(model, tokenizer, evaluation)

    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    adapter_bytes = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file())
    png = output_dir / "loss_curve.png"
    history = trainer.state.log_history + [{"step": steps, "eval_loss": loss_after}]
    history = [{"step": 0, "eval_loss": loss_before}] + history
    has_png = plot_loss(history, png, f"state tuning the embedded RWKV-7: which book? ({steps} steps)")
    shown = [
        {"input": e["prompt"], "target": e["book"], "before": b, "after": a}
        for e, b, a in list(zip(evaluation, answers_before, answers_after))[:: max(1, len(evaluation) // show)][:show]
    ]
    result = {
        "accuracy_before": ranked_before, "accuracy_after": ranked_after,
        "greedy_exact_match_before": acc_before, "greedy_exact_match_after": acc_after, "eval_loss_before": loss_before,
        "eval_loss_after": loss_after, "chance": 1 / len(TASK_BOOKS), "trainable_parameters": n_train,
        "adapter_dir": str(adapter_dir), "adapter_bytes": adapter_bytes, "loss_curve_png": str(png) if has_png else None,
        "train_seconds": train_s, "seconds": time.perf_counter() - t0, "examples": shown,
        "steps": steps, "device": str(next(model.parameters()).device),
    }  # fmt: skip
    import json

    (output_dir / "demo_result.json").write_text(json.dumps(result, indent=1))

    say("\n=== examples (held-out verses) ===")
    for ex in shown:
        text = ex["input"].removesuffix("\nBook:")
        say(f"verse:  {text[:100] + ('...' if len(text) > 100 else '')}")
        say(f"  target {ex['target']!r} | before {ex['before']!r} | after {ex['after']!r}")
    say("\n=== result ===")
    say(f"accuracy on {len(evaluation)} held-out verses (most likely of the 8 answers): {ranked_before:.1%} -> "
        f"{ranked_after:.1%} (chance {1 / len(TASK_BOOKS):.1%})")
    say(f"greedy answer exact match: {acc_before:.1%} -> {acc_after:.1%}")
    say(f"eval loss (answer bytes): {loss_before:.3f} -> {loss_after:.3f}")
    say(f"adapter: {adapter_dir} ({adapter_bytes / 1024:.0f} KiB; {n_train:,} trained parameters vs {n_base:,} frozen)")
    say(f"loss curve: {png}" if has_png else "loss curve: matplotlib is not installed, no PNG (pip install matplotlib)")
    say(f"took {result['seconds']:.0f}s ({train_s:.0f}s training) on {result['device']}")
    return result
