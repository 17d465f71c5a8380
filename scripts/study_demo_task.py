"""Quality study on the demo's task (docs/results.md section 2, CPU-sized).

Trains and evaluates, with the SAME data, steps, batch size, seed, schedule and evaluation, on the shipped
embedded RWKV-7 (3.6 M parameters, byte-level, KJV) and the demo's task ("which book is this verse from?"):

  state            StateTuningConfig()                                   lr 0.3
  state_shift      StateTuningConfig(tune_token_shift=True)              lr 0.3
  upscaled         StateTuningConfig(upscale_dim=128)  (recurrence mode, gaussian kernel, random support)
  upscaled_dbp     same + DecorrelatedOptimizer(AdamW) passed via Trainer(optimizers=...)
  lora             PEFT LoRA r=8 on att.(receptance|key|value|output)   lr 2e-3
  prompt           PEFT PromptTuningConfig(num_virtual_tokens=16)        lr 3e-2
  full             all weights                                           lr 2e-4
  observer         (optional) state tuning + ObserverCallback with the fully fine-tuned model as observer

Each method runs in its own child process (so that peak RSS, ``resource.getrusage().ru_maxrss``, is per
method) one after the other; results are merged into the JSON after each method, and methods already in
the JSON are skipped (resumable).  Usage::

    python scripts/study_demo_task.py                       # all methods, defaults below
    python scripts/study_demo_task.py --methods state lora  # a subset
    python scripts/study_demo_task.py --plot-only

Metrics on the held-out eval verses (never seen in pretraining):
  * ranked accuracy: the most likely of the 8 answers " <book>\\n" after the prompt. Computed here by
    ``ranked_accuracy_full`` (prompt + candidate read as one sequence, no cache), because the demo's
    ``demo.ranked_accuracy`` continues from ``use_cache=True`` state, which does not carry a
    recurrence-mode upscaled branch nor PEFT's virtual tokens; for the methods where it is valid,
    ``demo.ranked_accuracy`` is also recorded as a cross-check;
  * greedy exact match (``demo.book_accuracy``);
  * eval loss on the answer bytes (``Trainer.evaluate()``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import study_methods  # noqa: E402  (the methods, built as in study_gpu.py)

DEFAULT_JSON = ROOT / "docs" / "results" / "study_demo_task.json"
DEFAULT_PNG = ROOT / "docs" / "results" / "study_demo_task.png"

METHODS = ["state", "lora", "full", "prompt", "state_shift", "upscaled", "upscaled_dbp", "observer"]  # run order
DEFAULT_LR = {
    "state": 0.3, "state_shift": 0.3, "upscaled": 0.3, "upscaled_dbp": 0.3,
    "lora": 2e-3, "prompt": 3e-2, "full": 2e-4, "observer": 0.3,
}  # fmt: skip
LABELS = {
    "state": "state tuning", "state_shift": "state + token shift", "upscaled": "upscaled state (M=128)",
    "upscaled_dbp": "upscaled (M=128) + DBP", "lora": "LoRA r=8", "prompt": "prompt tuning (16 tok)",
    "full": "full fine-tuning", "observer": "state + observer (full-FT model)",
}  # fmt: skip


def ranked_accuracy_full(model, tokenizer, examples, books=None) -> float:
    """Most likely of the 8 answers after the prompt, each candidate read with its prompt as one sequence
    (8 right-padded rows per example, no cache): valid for every method, incl. upscaled branches and
    virtual tokens."""
    import torch

    from peft_state_tuning import demo

    books = books or demo.TASK_BOOKS
    device = next(model.parameters()).device
    answers = [tokenizer.encode_text(demo.task_answer(b)) for b in books]
    correct = 0
    with torch.no_grad():
        for e in examples:
            p = tokenizer.encode_text(e["prompt"])
            rows = [p + a for a in answers]
            n = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (n - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], device=device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logits = logits[:, -n:]  # prompt tuning prepends virtual tokens: keep the real positions
            logp = logits.log_softmax(-1)
            scores = []
            for j, a in enumerate(answers):
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(a), device=device)
                scores.append(logp[j, pos, torch.tensor(a, device=device)].sum())
            correct += books[int(torch.stack(scores).argmax())] == e["book"]
    return correct / max(1, len(examples))


def evaluate_all(model, tokenizer, trainer, evaluation, cross_check: bool) -> dict:
    from peft_state_tuning import demo

    t = time.perf_counter()
    model.eval()
    loss = trainer.evaluate()["eval_loss"]
    try:
        greedy, answers = demo.book_accuracy(model, tokenizer, evaluation)
        greedy_error = None
    except Exception as e:  # noqa: BLE001  (prompt tuning: generate() fails with our model; recorded)
        greedy, answers, greedy_error = None, [], f"{type(e).__name__}: {str(e)[:300]}"
    ranked = ranked_accuracy_full(model, tokenizer, evaluation)
    out = {"eval_loss": loss, "greedy_exact_match": greedy, "ranked_accuracy": ranked, "answers_head": answers[:8]}
    if greedy_error:
        out["greedy_error"] = greedy_error
    if cross_check:
        out["ranked_accuracy_demo_fn"] = demo.ranked_accuracy(model, tokenizer, evaluation)
    out["eval_seconds"] = time.perf_counter() - t
    return out


def run_method(method: str, a) -> dict:
    """Train + evaluate one method in this process; returns its result dict."""
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed
    from transformers import get_cosine_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    from peft_state_tuning import DecorrelatedOptimizer, ObserverCallback, demo

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    set_seed(a.seed)
    model_dir = demo.EMBEDDED_MODEL_DIR
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_base = sum(p.numel() for p in base.parameters())
    train, evaluation = demo.book_task(a.train_per_book, a.eval_per_book, seed=a.seed)
    lr = a.lr if a.lr is not None else DEFAULT_LR[method]
    label = LABELS[method].replace("M=128", f"M={a.upscale_dim}") if method.startswith("upscaled") else LABELS[method]
    result = {"method": method, "label": label, "lr": lr, "base_parameters": n_base}

    callbacks, optimizers, config_repr = [], (None, None), None
    # observer = plain state tuning + the callback; upscaled_dbp = upscaled + DBP (below)
    kind = {"observer": "state", "upscaled_dbp": "upscaled"}.get(method, method)
    model, config_repr = study_methods.wrap(base, kind, upscale_dim=a.upscale_dim)
    if method == "observer":
        obs_dir = Path(a.work_dir) / "full_model"
        if not (obs_dir / "config.json").exists():
            raise RuntimeError(f"observer run needs the fully fine-tuned model saved by method 'full' in {obs_dir}")
        observer = AutoModelForCausalLM.from_pretrained(obs_dir, dtype=torch.float32)
        observer.eval()
        callbacks.append(ObserverCallback(observer, alpha=a.observer_alpha, temperature=1.0, log_every=10**9))
        config_repr["observer"] = {"model": "method 'full' of this study", "alpha": a.observer_alpha, "temperature": 1.0}
    result["config"] = config_repr

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["trainable_parameters"] = n_train
    enc = lambda e: demo.encode_example(tokenizer, e["prompt"], e["answer"])  # noqa: E731
    train_ds = Dataset.from_list([enc(e) for e in train])
    eval_ds = Dataset.from_list([enc(e) for e in evaluation])
    targs = TrainingArguments(
        output_dir=str(Path(a.work_dir) / method / "trainer"), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=32, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=min(10, a.steps // 10), weight_decay=0.0, logging_steps=max(1, a.steps // 30),
        eval_strategy="no", save_strategy="no", report_to=[], seed=a.seed, data_seed=a.seed,
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    if method == "upscaled_dbp":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = DecorrelatedOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=0.0), model, decor_lr=a.decor_lr)
        sched = get_cosine_schedule_with_warmup(opt, min(10, a.steps // 10), a.steps)
        optimizers = (opt, sched)
        config_repr["dbp"] = {"decor_lr": a.decor_lr, "kappa": 0.0, "momentum": 0.0, "normalize": True}
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=demo.pad_collator(), callbacks=callbacks, optimizers=optimizers)  # fmt: skip

    cross_check = method in ("state", "state_shift", "lora", "full", "observer")
    # Before: zero-initialised adapters (states, upscaled S_up, LoRA B) and the untouched base all give the base
    # model's outputs, so their "before" is measured once (method 'state') and reused unless --full-before; the
    # eval loss before is measured for every method (cheap) as a check. Prompt tuning changes the output at init.
    if method == "prompt" or a.full_before or method == "state":
        result["before"] = evaluate_all(model, tokenizer, trainer, evaluation, cross_check)
    else:
        model.eval()
        result["before"] = {"eval_loss": trainer.evaluate()["eval_loss"], "reused_from": "state"}
    print(f"[{method}] before: {json.dumps({k: v for k, v in result['before'].items() if k != 'answers_head'})}", flush=True)

    t_train = time.perf_counter()
    out = trainer.train()
    result["train_seconds"] = time.perf_counter() - t_train
    result["train_loss_final_logged"] = next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None)
    result["train_loss_curve"] = [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]
    result["train_runtime_trainer"] = out.metrics.get("train_runtime")
    if method == "upscaled_dbp":
        h = opt.correlation_history
        result["dbp_correlation_first_last"] = [h[0], h[-1]] if h else None
        opt.remove_hooks()
    result["after"] = evaluate_all(model, tokenizer, trainer, evaluation, cross_check)
    print(f"[{method}] after: {json.dumps({k: v for k, v in result['after'].items() if k != 'answers_head'})}", flush=True)
    if method == "full":
        model.save_pretrained(Path(a.work_dir) / "full_model")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result["process_seconds"] = time.perf_counter() - t0
    result["steps"], result["batch_size"], result["seed"] = a.steps, a.batch_size, a.seed
    return result


def _num(x) -> float:
    return float("nan") if x is None else x


def plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for k, r in data["methods"].items() if "after" in r and not k.endswith("_rerun")]  # reruns: timing only
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    metrics = [("ranked_accuracy", "ranked accuracy (most likely of 8)"), ("greedy_exact_match", "greedy exact match"),
               ("eval_loss", "eval loss, answer bytes (nats/byte)")]  # fmt: skip
    base = data["methods"].get("state", {}).get("before")
    for ax, (key, title) in zip(axes, metrics):
        for j, r in enumerate(runs):
            x, y = r["trainable_parameters"], r["after"][key]
            if y is None:
                continue
            ax.scatter([x], [y], s=70 - 6 * j, color=f"C{j}", marker="osD^vPX*"[j % 8], label=r["label"], alpha=0.85)
        if base and key in base:
            ax.axhline(base[key], color="gray", ls="--", lw=1, label="base model (before)")
        if key != "eval_loss":
            ax.axhline(data["chance"], color="red", ls=":", lw=1, label="chance (12.5%)")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_xlim(2e3, 1e7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    s = data["settings"]
    fig.suptitle(f"embedded RWKV-7 (3.6 M), which book? {s['steps']} steps x {s['batch_size']}, seed {s['seed']}, "
                 f"{s['eval_examples']} held-out verses; CPU, 2 cores", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=METHODS[:-1], help=f"subset of {METHODS} (observer is opt-in)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-book", type=int, default=400)
    ap.add_argument("--eval-per-book", type=int, default=25)
    ap.add_argument("--lr", type=float, default=None, help="override the method's default lr (children only)")
    ap.add_argument("--upscale-dim", type=int, default=128)
    ap.add_argument("--decor-lr", type=float, default=1e-2)
    ap.add_argument("--observer-alpha", type=float, default=0.5)
    ap.add_argument("--full-before", action="store_true", help="measure all 'before' metrics for every method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    ap.add_argument("--png", default=str(DEFAULT_PNG))
    ap.add_argument("--work-dir", default="/tmp/study_demo_task")
    ap.add_argument("--tag", default=None, help="store under this key instead of the method name (lr sweeps)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child:  # one method, in this process; the result goes to stdout's last line
        res = run_method(a.child, a)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    js, png = Path(a.json), Path(a.png)
    js.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(js.read_text()) if js.exists() else {"methods": {}}
    if not a.plot_only:  # a redraw must not relabel the stored results with this call's defaults
        data["settings"] = {
            "model": "peft_state_tuning.demo.EMBEDDED_MODEL_DIR (3.6 M params)", "task": "demo.book_task",
            "steps": a.steps, "batch_size": a.batch_size, "seed": a.seed, "train_per_book": a.train_per_book,
            "eval_per_book": a.eval_per_book, "eval_examples": 8 * a.eval_per_book, "schedule": "cosine, warmup min(10, steps//10), AdamW, wd 0",
            "device": "this project's CPU machine, 2 cores", "threads": a.threads,
        }  # fmt: skip
    data["chance"] = 1 / 8
    if not a.plot_only:
        for m in a.methods:
            key = a.tag or m
            if key in data["methods"]:
                print(f"skip {key}: already in {js}")
                continue
            cmd = [sys.executable, __file__, "--child", m, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                   "--seed", str(a.seed), "--train-per-book", str(a.train_per_book), "--eval-per-book",
                   str(a.eval_per_book), "--upscale-dim", str(a.upscale_dim), "--decor-lr", str(a.decor_lr),
                   "--observer-alpha", str(a.observer_alpha), "--threads", str(a.threads), "--work-dir", a.work_dir]  # fmt: skip
            if a.lr is not None:
                cmd += ["--lr", str(a.lr)]
            if a.full_before:
                cmd.append("--full-before")
            print(f"=== {key}: {' '.join(cmd[2:])}", flush=True)
            t = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})  # fmt: skip
            lines = proc.stdout.splitlines()
            for line in lines:
                if not line.startswith("RESULT "):
                    print("   " + line[:400], flush=True)
            res = next((json.loads(l[7:]) for l in reversed(lines) if l.startswith("RESULT ")), None)
            if res is None:
                res = {"method": m, "label": LABELS[m], "error": "\n".join(lines[-25:]), "returncode": proc.returncode}
                print(f"!!! {key} failed (rc {proc.returncode}); error recorded", flush=True)
            res["wall_seconds_incl_start"] = time.perf_counter() - t
            data["methods"][key] = res
            js.write_text(json.dumps(data, indent=1))
    try:
        plot(data, png)
    except ImportError:
        print("matplotlib missing: no PNG")
    js.write_text(json.dumps(data, indent=1))
    for k, r in data["methods"].items():
        if "after" in r:
            b = data["methods"].get("state", {}).get("before", {}) if "ranked_accuracy" not in r["before"] else r["before"]
            print(f"{k:14s} n={r['trainable_parameters']:>9,d} lr={r['lr']:<7g} ranked {_num(b.get('ranked_accuracy')):.3f}->"
                  f"{r['after']['ranked_accuracy']:.3f} greedy {_num(b.get('greedy_exact_match')):.3f}->"
                  f"{_num(r['after']['greedy_exact_match']):.3f} loss {r['before']['eval_loss']:.3f}->{r['after']['eval_loss']:.3f} "
                  f"train {r['train_seconds']:.0f}s rss {r['peak_rss_mib']:.0f}MiB")  # fmt: skip
        else:
            print(f"{k:14s} ERROR: {r.get('error', '')[-300:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
