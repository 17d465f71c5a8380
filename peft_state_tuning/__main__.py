"""Command line: ``peft-state-tuning ...`` / ``python -m peft_state_tuning ...``.

* ``demo``: state-tune the shipped small RWKV-7 on the bundled task ("which book is this verse from?"), on CPU in
  about two minutes, and print the accuracy before and after (see :mod:`peft_state_tuning.demo`).
* ``train``: state-tune any RWKV-7 on any ``datasets`` dataset with ``transformers.Trainer``
  (see :mod:`peft_state_tuning.train`; ``peft-state-tuning train --help``).
"""

from __future__ import annotations

import argparse
import sys


def demo_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="an RWKV-7 folder (default: the shipped model)")
    parser.add_argument("--output-dir", default="state_tuning_demo", help="adapter, loss curve and results go here")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.3, help="states need large rates")
    parser.add_argument("--eval-per-book", type=int, default=25, help="held-out verses per book for the metric")
    parser.add_argument("--tune-token-shift", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="peft-state-tuning", description="State tuning of RWKV-7 models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo_parser(sub.add_parser("demo", help="state-tune the shipped small model on the bundled task (CPU, ~2 min)"))
    sub.add_parser("train", help="state-tune any RWKV-7 on any dataset with transformers.Trainer", add_help=False)
    if argv and argv[0] == "train":  # its own parser (peft_state_tuning.train), with its own --help
        import peft_state_tuning  # noqa: F401  (registers STATE_TUNING)
        from peft_state_tuning.train import main as train_main

        train_main(argv[1:])
        return
    args = parser.parse_args(argv)
    if args.command == "demo":
        import peft_state_tuning  # noqa: F401
        from peft_state_tuning.demo import run_demo

        run_demo(
            model_dir=args.model, output_dir=args.output_dir, steps=args.steps, batch_size=args.batch_size,
            learning_rate=args.lr, eval_per_book=args.eval_per_book, tune_token_shift=args.tune_token_shift,
            seed=args.seed,
        )  # fmt: skip


if __name__ == "__main__":
    main()
