"""State-tune any RWKV-7 on any ``datasets`` dataset with a plain ``transformers.Trainer``.

``peft-state-tuning train ...``, ``python -m peft_state_tuning train ...`` and ``examples/train_state_tuning.py``
all run :func:`main`. Examples::

    # the shipped model on local files, a text column, a few steps (CPU is fine)
    peft-state-tuning train --dataset my_texts.jsonl --text_column text --max_steps 100 --output_dir out

    # a converted or fla-hub RWKV-7 folder (or a Hub id), a Hub dataset with chat messages, on a GPU
    peft-state-tuning train --model_name_or_path path/to/rwkv7-0.1B --dataset HuggingFaceH4/no_robots \\
        --messages_column messages --bf16 --gradient_checkpointing --max_steps 2000 --output_dir states \\
        --push_to_hub --hub_model_id me/rwkv7-0.1B-no-robots-state

Data: ``--dataset`` is a Hub id, or local files (``.json``/``.jsonl``/``.txt``/``.csv``/``.parquet``, comma-
separated or a folder). One of: ``--text_column`` (plain text, loss on every token), ``--prompt_column`` +
``--completion_column`` (loss on the completion only) or ``--messages_column`` (chat messages
``[{"role", "content"}]``, written in the RWKV world chat format ``"User: ...\\n\\nAssistant: ...\\n\\n"``; loss on
the assistant turns only).

Evaluation needs no network: eval loss, perplexity and next-token accuracy (on the tokens that carry a loss) are
computed directly, not with ``evaluate.load``. The eval split is ``--eval_split`` if given, else the dataset's
``validation``/``test`` split, else ``--eval_fraction`` of the training split.

State tuning options map to :class:`~peft_state_tuning.StateTuningConfig`: ``--target_layers``, ``--init``,
``--init_prompt``, ``--init_state_file``, ``--tune_token_shift``; any other field (e.g. upscaling or decorrelation
options) goes through ``--state_tuning_kwargs '{"field": value}'``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

EXTENSION_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peft-state-tuning train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model_name_or_path", default=None, help="RWKV-7 folder or Hub id (default: the shipped model)")
    g.add_argument("--tokenizer_name", default=None,
                   help="tokenizer folder or Hub id, when the model's own has none (default: the model's)")
    g.add_argument("--dataset", required=True, help="a datasets Hub id, or local files (comma-separated) or a folder")
    g.add_argument("--dataset_config", default=None, help="the dataset's configuration name (Hub datasets)")
    g.add_argument("--train_split", default="train")
    g.add_argument("--eval_split", default=None, help="default: 'validation' or 'test' if present, else a slice of train")
    g.add_argument("--eval_fraction", type=float, default=0.05, help="share of train held out when there is no eval split")
    g.add_argument("--text_column", default=None, help="plain-text column (default 'text' when no other column is given)")
    g.add_argument("--prompt_column", default=None, help="prompt column; with --completion_column, loss on the completion")
    g.add_argument("--completion_column", default=None)
    g.add_argument("--messages_column", default=None, help="chat column: a list of {'role', 'content'} messages")
    g.add_argument("--max_length", type=int, default=512, help="tokens per example (longer ones are cut)")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g.add_argument("--no_eos", action="store_true", help="do not end each text example with the end-of-text token")

    g = p.add_argument_group("state tuning (StateTuningConfig)")
    g.add_argument("--target_layers", default=None, help="comma-separated layer indices (default: all)")
    g.add_argument("--init", choices=["zeros", "prompt", "rwkv_state"], default="zeros")
    g.add_argument("--init_prompt", default=None, help="text whose state starts the training (--init prompt)")
    g.add_argument("--init_state_file", default=None, help="an RWKV state file (--init rwkv_state)")
    g.add_argument("--tune_token_shift", action="store_true", help="also tune the token-shift states")
    g.add_argument("--state_tuning_kwargs", default=None, help="JSON of further StateTuningConfig fields")

    g = p.add_argument_group("training (TrainingArguments)")
    g.add_argument("--output_dir", default="state_tuning_output")
    g.add_argument("--max_steps", type=int, default=-1)
    g.add_argument("--num_train_epochs", type=float, default=1.0)
    g.add_argument("--per_device_train_batch_size", type=int, default=8)
    g.add_argument("--per_device_eval_batch_size", type=int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-2, help="states train well with large rates (1e-2)")
    g.add_argument("--lr_scheduler_type", default="cosine")
    g.add_argument("--warmup_steps", type=int, default=10)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (states and their optimizer stay fp32)")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (default: at the end only)")
    g.add_argument("--save_steps", type=int, default=None, help="checkpoint every N steps (default: at the end only)")
    g.add_argument("--save_total_limit", type=int, default=2)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'last': the newest in --output_dir, if any")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--report_to", default="none", help="comma-separated integrations (default: none)")
    g.add_argument("--use_cpu", action="store_true", help="train on the CPU even when a GPU is present")
    g.add_argument("--disable_tqdm", action="store_true")
    g.add_argument("--push_to_hub", action="store_true", help="push the adapter (and its model card) when done")
    g.add_argument("--hub_model_id", default=None, help="repository for --push_to_hub (default: the output folder's name)")
    g.add_argument("--hub_private_repo", action="store_true")
    return p


# ---- data -------------------------------------------------------------------------------------------------------


def load_raw_dataset(args):
    """A ``DatasetDict`` from a Hub id or local files."""
    from datasets import load_dataset

    spec = args.dataset
    files = [s for s in spec.split(",") if s]
    if all(os.path.isfile(f) for f in files):
        exts = {Path(f).suffix.lower() for f in files}
        if len(exts) != 1 or next(iter(exts)) not in EXTENSION_BUILDERS:
            raise ValueError(f"local files must share one of the extensions {sorted(EXTENSION_BUILDERS)}; got {sorted(exts)}")
        return load_dataset(EXTENSION_BUILDERS[exts.pop()], data_files={args.train_split: files})
    if os.path.isdir(spec):
        return load_dataset(spec, args.dataset_config)
    return load_dataset(spec, args.dataset_config)


def split_dataset(raw, args):
    """``(train, eval)`` datasets following ``--train_split``/``--eval_split``/``--eval_fraction``."""
    if args.train_split not in raw:
        raise ValueError(f"the dataset has no split {args.train_split!r}; it has {sorted(raw)}")
    train = raw[args.train_split]
    eval_name = args.eval_split or next((s for s in ("validation", "valid", "test") if s in raw), None)
    if eval_name is not None:
        if eval_name not in raw:
            raise ValueError(f"the dataset has no split {eval_name!r}; it has {sorted(raw)}")
        evaluation = raw[eval_name]
    elif args.eval_fraction > 0 and len(train) > 1:
        n_eval = max(1, int(round(len(train) * args.eval_fraction)))
        parts = train.train_test_split(test_size=n_eval, seed=args.seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = None
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if evaluation is not None and args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """RWKV world chat format: ``"Role: content\\n\\n"`` per message (a blank line inside a message becomes one
    newline, as RWKV's chat convention has it); ``(text, trained)`` pieces, trained = the assistant's words."""
    segments = []
    for m in messages:
        role = ROLE_NAMES.get(str(m["role"]).lower(), str(m["role"]).capitalize())
        content = "\n".join(line for line in str(m["content"]).strip().replace("\r\n", "\n").split("\n\n"))
        if role == "Assistant":
            segments += [(f"{role}:", False), (f" {content}\n\n", True)]
        else:
            segments.append((f"{role}: {content}\n\n", False))
    return segments


def make_example(row: dict, tokenizer, args) -> dict:
    """``input_ids``/``attention_mask``/``labels`` of one row (labels -100 where no loss is taken)."""
    eos = tokenizer.eos_token_id
    if args.messages_column:
        input_ids, labels = [], []
        for text, trained in chat_segments(row[args.messages_column]):
            ids = _ids(tokenizer, text)
            input_ids += ids
            labels += ids if trained else [-100] * len(ids)
    elif args.prompt_column:
        prompt, completion = _ids(tokenizer, str(row[args.prompt_column])), _ids(tokenizer, str(row[args.completion_column]))
        if not args.no_eos and eos is not None:
            completion = completion + [eos]
        input_ids, labels = prompt + completion, [-100] * len(prompt) + completion
    else:
        input_ids = _ids(tokenizer, str(row[args.text_column]))
        if not args.no_eos and eos is not None:
            input_ids = input_ids + [eos]
        labels = list(input_ids)
    input_ids, labels = input_ids[: args.max_length], labels[: args.max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_dataset(dataset, tokenizer, args):
    if dataset is None:
        return None
    out = dataset.map(lambda row: make_example(row, tokenizer, args), remove_columns=dataset.column_names, desc="tokenizing")
    # Rows without a single trained token (e.g. a prompt cut at max_length) add nothing but NaN losses.
    return out.filter(lambda row: any(label != -100 for label in row["labels"][1:]), desc="dropping empty rows")


# ---- metrics ------------------------------------------------------------------------------------------------------


def argmax_logits(logits, labels):
    """``preprocess_logits_for_metrics``: keep the predicted ids, not the ``[B, T, vocab]`` logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def token_accuracy(eval_pred) -> dict:
    """Next-token accuracy over the positions that carry a loss (labels shifted by one, as the loss is)."""
    import numpy as np

    preds, labels = eval_pred.predictions, eval_pred.label_ids
    preds, labels = np.asarray(preds)[:, :-1], np.asarray(labels)[:, 1:]
    mask = labels != -100
    total = int(mask.sum())
    return {"token_accuracy": float((preds[mask] == labels[mask]).sum() / total) if total else float("nan")}


def with_perplexity(metrics: dict, prefix: str = "eval") -> dict:
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
    return metrics


# ---- the run ------------------------------------------------------------------------------------------------------


def state_tuning_config(args):
    from . import StateTuningConfig

    extra = json.loads(args.state_tuning_kwargs) if args.state_tuning_kwargs else {}
    layers = [int(i) for i in args.target_layers.split(",")] if args.target_layers else None
    return StateTuningConfig(
        target_layers=layers, init=args.init, init_prompt=args.init_prompt, init_state_file=args.init_state_file,
        tune_token_shift=args.tune_token_shift, **extra,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, train, evaluate, save (and push); returns the final metrics."""
    args = build_parser().parse_args(argv)
    if sum(bool(c) for c in (args.messages_column, args.prompt_column, args.text_column)) > 1:
        raise SystemExit("give one of --text_column, --prompt_column/--completion_column or --messages_column")
    if bool(args.prompt_column) != bool(args.completion_column):
        raise SystemExit("--prompt_column and --completion_column go together")
    if not (args.messages_column or args.prompt_column or args.text_column):
        args.text_column = "text"
    return run(args)


def check_tokenizer_fits(tokenizer, model, args) -> None:
    """Fail before tokenizing when the tokenizer makes ids the model has no embedding for. This happens
    when a model folder holds no tokenizer files: the RWKV-7 tokenizer class then loads the 65536-token
    world vocabulary, which does not fit a model with a smaller vocabulary (e.g. a byte-level one)."""
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        source = args.tokenizer_name or args.model_name_or_path or "the shipped model"
        raise SystemExit(
            f"The tokenizer from {source} has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: "
            "the model folder probably has no tokenizer files of its own. Pass the tokenizer it was trained with, "
            "--tokenizer_name <folder or Hub id>, or save it into the model folder (tokenizer.save_pretrained)."
        )


def run(args) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from .demo import EMBEDDED_MODEL_DIR, pad_collator

    set_seed(args.seed)
    model_path = args.model_name_or_path or str(EMBEDDED_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or model_path)
    dtype = torch.bfloat16 if args.bf16 and torch.cuda.is_available() and not args.use_cpu else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    check_tokenizer_fits(tokenizer, base, args)
    model = get_peft_model(base, state_tuning_config(args))
    model.print_trainable_parameters()

    raw = load_raw_dataset(args)
    train_raw, eval_raw = split_dataset(raw, args)
    for name, ds in (("train", train_raw), ("eval", eval_raw)):
        column = args.messages_column or args.prompt_column or args.text_column
        if ds is not None and column not in ds.column_names:
            raise SystemExit(f"the {name} split has no column {column!r}; its columns: {ds.column_names}")
    train_ds, eval_ds = tokenize_dataset(train_raw, tokenizer, args), tokenize_dataset(eval_raw, tokenizer, args)
    print(f"{len(train_ds)} training examples, {len(eval_ds) if eval_ds is not None else 0} eval examples")

    resume = args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        print(f"resuming from {resume}" if resume else f"no checkpoint in {args.output_dir} yet: starting afresh")
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if (args.eval_steps and eval_ds is not None) else "no", eval_steps=args.eval_steps,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit, seed=args.seed, data_seed=args.seed,
        report_to=[r for r in args.report_to.split(",") if r and r != "none"],
        use_cpu=args.use_cpu or not torch.cuda.is_available(),
        disable_tqdm=args.disable_tqdm, remove_unused_columns=False, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=pad_collator(tokenizer.pad_token_id or 0), compute_metrics=token_accuracy,
        preprocess_logits_for_metrics=argmax_logits,
    )  # fmt: skip
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(with_perplexity(trainer.evaluate()))
    trainer.save_model(args.output_dir)  # the adapter: adapter_config.json + adapter_model.safetensors
    tokenizer.save_pretrained(args.output_dir)
    trainer.save_metrics("all", metrics)
    trainer.save_state()
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=1))
    print(f"adapter saved to {args.output_dir}")
    if args.push_to_hub:
        repo = args.hub_model_id or Path(args.output_dir).resolve().name
        model.push_to_hub(repo, private=args.hub_private_repo)
        print(f"pushed to {repo}")
    return metrics


if __name__ == "__main__":
    main()
