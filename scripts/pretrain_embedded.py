"""Pretrain the project's embedded RWKV-7 from scratch on the bundled King James Bible.

The model is our ``Rwkv7ForCausalLM`` in the official x070 architecture: 4 layers, width 256 (4 heads of 64),
LoRA ranks 32/32/32/64 (the official formulas at this width), feed-forward 1024, and a byte-level vocabulary of 257
ids that is a subset of the RWKV world vocabulary (``Rwkv7ByteTokenizer``: id 0 end-of-text, id = byte + 1).
3.6 M parameters, saved in bf16 (about 7 MB).

Data: ``peft_state_tuning/data/kjv/kjv.tsv.gz`` as one verse a line (``"Genesis 1:1 In the beginning ..."``), with
the demo's held-out 5% of verses left out; the loss on those held-out lines is the validation loss.

GPU (the shipped model; about 4 minutes on one H100, no network needed)::

    python scripts/pretrain_embedded.py --out-dir $OUT/embedded_rwkv7

CPU smoke test (seconds)::

    python scripts/pretrain_embedded.py --out-dir /tmp/embedded --tiny --max-steps 5

Writes to ``--out-dir``: ``model.safetensors`` + ``config.json`` + tokenizer files (``save_pretrained``, loadable
with ``AutoModelForCausalLM`` / ``AutoTokenizer`` after ``import modeling_rwkv7``), ``generation_config.json``,
``training_log.json`` (loss curve, settings, timings, device) and ``loss_curve.png``, and ``README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout too


def _kernels_from_checkout() -> None:
    """``modeling_rwkv7`` imports ``rwkv7_kernels``, the install name of the folder ``kernels/``; without
    ``pip install -e .`` (a bare checkout on a GPU machine) load it from the folder under that name."""
    try:
        import rwkv7_kernels  # noqa: F401
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "rwkv7_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["rwkv7_kernels"] = module
        spec.loader.exec_module(module)


_kernels_from_checkout()

from modeling_rwkv7 import Rwkv7Config, Rwkv7ForCausalLM  # noqa: E402
from modeling_rwkv7.tokenization_rwkv7_bytes import BYTE_VOCAB_SIZE, Rwkv7ByteTokenizer  # noqa: E402
from peft_state_tuning.demo import KJV_PATH, TASK_BOOKS, is_heldout, load_kjv, pretraining_text  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="where the HF model folder and the logs are written")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine to lr * --final-lr-ratio)")
    p.add_argument("--final-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=None,
                   help="number of optimiser steps (default: as many as fit in --time-budget, measured on the fly)")
    p.add_argument("--time-budget", type=float, default=100.0,
                   help="seconds of training when --max-steps is not given (the schedule is fixed after 20 timed steps)")
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: ~25 times per run); the best held-out loss is what is saved")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--val-tokens", type=int, default=262_144, help="held-out bytes scored at each validation")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the saved weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch, for a CPU smoke test")
    p.add_argument("--replot", action="store_true", help="only redraw --out-dir/loss_curve.png from its training_log.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.seq_len, args.batch_size = 2, 64, 64, 4
        args.warmup_steps = min(args.warmup_steps, 2)
        args.val_tokens = min(args.val_tokens, 4096)
    return args


def model_config(args) -> Rwkv7Config:
    C = args.hidden
    # The official x070 low-rank sizes (BlinkDL's train_temp): multiples of 32, at least 32.
    lora = lambda factor, power: max(32, round(factor * C**power / 32) * 32)  # noqa: E731
    return Rwkv7Config(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=C, num_hidden_layers=args.layers, head_dim=64 if C >= 64 else C,
        intermediate_size=4 * C, decay_low_rank_dim=lora(1.8, 0.5), a_low_rank_dim=lora(1.8, 0.5),
        v_low_rank_dim=lora(1.3, 0.5), gate_low_rank_dim=lora(0.6, 0.8),
    )  # fmt: skip


def lr_at(step: int, max_steps: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    lo = args.lr * args.final_lr_ratio
    return lo + 0.5 * (args.lr - lo) * (1 + math.cos(math.pi * progress))


def plot(log: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (the curve is in training_log.json)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = log["train"]
    ax.plot([r["tokens"] / 1e6 for r in tr], [r["loss"] for r in tr], label="train", lw=1)
    va = log["val"]
    ax.plot([r["tokens"] / 1e6 for r in va], [r["loss"] for r in va], "o-", label="held-out verses", ms=3)
    ax.set_xlabel("training tokens (M bytes)")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(f"embedded RWKV-7 pretraining on the KJV ({log['device']})", fontsize=10)
    ax.set_ylim(top=min(4.0, max(r["loss"] for r in tr)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        log = json.loads((args.out_dir / "training_log.json").read_text())
        plot(log, args.out_dir / "loss_curve.png")
        return log
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    tokenizer = Rwkv7ByteTokenizer()

    verses = load_kjv()
    train_ids = torch.tensor(tokenizer.encode_text(pretraining_text(verses)), dtype=torch.long)
    # Validation: the held-out verses of the books the demo's task does not use (the task's evaluation verses stay
    # unseen by every choice made here, including the pick of the best checkpoint).
    val_text = "".join(f"{v.reference} {v.text}\n" for v in verses if is_heldout(v) and v.book not in TASK_BOOKS)
    val_ids = torch.tensor(tokenizer.encode_text(val_text), dtype=torch.long)
    print(f"corpus: {len(train_ids):,} training bytes, {len(val_ids):,} held-out bytes ({time.perf_counter() - t_start:.1f}s)")
    train_ids, val_ids = train_ids.to(device), val_ids.to(device)

    config = model_config(args)
    model = Rwkv7ForCausalLM(config).to(device)  # fp32 master weights; _init_weights gives the from-scratch init
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} layers, width {args.hidden}, {n_params / 1e6:.2f} M parameters, on {device}")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "emb" not in name and "r_k" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.99), eps=1e-8, fused=device.type == "cuda",
    )  # fmt: skip
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    T, B = args.seq_len, args.batch_size
    offsets_row = torch.arange(T, device=device)

    def batch():
        starts = torch.randint(0, len(train_ids) - T, (B,), generator=gen).to(device)
        return train_ids[starts[:, None] + offsets_row]

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        n = min(len(val_ids) - 1, args.val_tokens) // T * T
        x = val_ids[:n].view(-1, T)
        y = val_ids[1 : n + 1].view(-1, T)
        total, count = 0.0, 0
        for i in range(0, x.shape[0], B):
            with autocast:
                logits = model(input_ids=x[i : i + B], use_cache=False).logits
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y[i : i + B].flatten(), reduction="sum").item()
            count += y[i : i + B].numel()
        model.train()
        return total / count

    log = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "train": [], "val": []}
    log["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    max_steps = args.max_steps or 10**9
    eval_every = args.eval_every
    calib = (5, 25)  # steps whose time sets max_steps when only a time budget is given
    t_calib = t_train0 = None
    model.train()
    step = 0
    best = (float("inf"), 0, None)
    val0 = validate()
    log["val"].append({"step": 0, "tokens": 0, "loss": val0})
    print(f"step 0: held-out loss {val0:.3f}")
    t_train0 = time.perf_counter()
    while step < max_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, max_steps if args.max_steps or step >= calib[1] else 10**9, args)
        x = batch()
        with autocast:
            loss = model(input_ids=x, labels=x).loss  # labels are shifted inside
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if args.max_steps is None and step == calib[0]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_calib = time.perf_counter()
        if args.max_steps is None and step == calib[1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - t_calib) / (calib[1] - calib[0])
            elapsed = time.perf_counter() - t_train0
            max_steps = max(step + 1, step + int((args.time_budget - elapsed) / per_step * 0.97))
            print(f"{per_step * 1000:.0f} ms/step -> {max_steps} steps in the {args.time_budget:.0f}s budget")
        if eval_every is None and max_steps < 10**9:
            eval_every = max(1, max_steps // 25)
        if step % args.log_every == 0 or step == max_steps:
            rec = {"step": step, "tokens": step * B * T, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                   "grad_norm": float(grad_norm), "time_s": time.perf_counter() - t_train0}  # fmt: skip
            log["train"].append(rec)
            if step % (args.log_every * 10) == 0 or step == max_steps:
                print(f"step {step}/{max_steps}: loss {rec['loss']:.3f} lr {rec['lr']:.2e} ({rec['time_s']:.0f}s)")
        if eval_every and (step % eval_every == 0 or step == max_steps):
            v = validate()
            log["val"].append({"step": step, "tokens": step * B * T, "loss": v})
            print(f"step {step}: held-out loss {v:.3f}")
            if v < best[0]:  # keep the best weights: a small model overfits the 4 MB corpus after ~10 epochs
                best = (v, step, {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()})
    train_s = time.perf_counter() - t_train0
    if best[2] is not None and best[1] != step:
        print(f"restoring the weights of step {best[1]} (held-out loss {best[0]:.3f}, best of the run)")
        model.load_state_dict(best[2])
    log["best_step"], log["best_val_loss"] = best[1], best[0]

    save_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model.eval()
    if device.type == "cuda":
        model.to(dtype=save_dtype)  # samples from the weights as saved (bf16 decoding on a CPU is slow: fp32 there)
    samples = []
    with torch.no_grad():
        for prompt in ("Genesis 1:1 ", "Psalms 23:1 ", "John 3:16 ", "And the LORD said unto Moses, "):
            ids = torch.tensor([tokenizer.encode_text(prompt)], device=device)
            out = model.generate(ids, max_new_tokens=120, do_sample=False, eos_token_id=tokenizer.encode_text("\n")[0])
            samples.append(tokenizer.decode(out[0].tolist()))
            print("sample:", samples[-1].rstrip())

    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device="cpu", dtype=save_dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.update(
        n_params=n_params, steps=step, tokens=step * B * T, epochs=step * B * T / len(train_ids), train_s=train_s,
        total_s=time.perf_counter() - t_start, final_val_loss=min(r["loss"] for r in log["val"]), samples=samples,
        saved_dtype=args.dtype, corpus=str(KJV_PATH.relative_to(KJV_PATH.parents[2])),
        corpus_sha256=hashlib.sha256(KJV_PATH.read_bytes()).hexdigest(), torch=torch.__version__,
    )  # fmt: skip
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1))
    plot(log, out_dir / "loss_curve.png")
    (out_dir / "README.md").write_text(model_card(log, config))
    size = (out_dir / "model.safetensors").stat().st_size
    print(f"saved {out_dir} (model.safetensors {size / 1e6:.1f} MB, {args.dtype}); "
          f"{step} steps, {log['tokens'] / 1e6:.1f} M tokens ({log['epochs']:.1f} epochs), "
          f"held-out loss {log['final_val_loss']:.3f}; {log['total_s']:.0f}s in all")  # fmt: skip
    return log


def model_card(log: dict, config: Rwkv7Config) -> str:
    return f"""---
license: apache-2.0
library_name: transformers
tags: [rwkv7, state-tuning]
---
# embedded RWKV-7 (byte-level, KJV)

The small RWKV-7 (x070) that ships with `peft-state-tuning` as its default model: {config.num_hidden_layers} layers,
width {config.hidden_size} ({config.num_heads} heads of {config.head_dim}), {log['n_params'] / 1e6:.2f} M parameters, vocabulary of
{config.vocab_size} ids (end-of-text + the 256 bytes; a subset of the RWKV world vocabulary, `Rwkv7ByteTokenizer`),
weights saved in {log['saved_dtype']}.

Trained from scratch by `scripts/pretrain_embedded.py` on the King James Bible (public domain; from Debian's
`bible-kjv-text`, see `peft_state_tuning/data/kjv/README.md`), one verse a line (`Genesis 1:1 In the beginning ...`),
with 5% of the verses held out: {log['steps']} steps of {log['args']['batch_size']} x {log['args']['seq_len']} bytes
({log['tokens'] / 1e6:.1f} M bytes, {log['epochs']:.1f} epochs) in {log['train_s']:.0f} s on {log['device']}.
Held-out loss: {log['final_val_loss']:.3f} nats per byte. Loss curve: `loss_curve.png`, `training_log.json`.

It is a toy: it writes Bible-like English and knows the format of the corpus; it is not an assistant.
"""


if __name__ == "__main__":
    main()
