"""Command line: ``peft-state-tuning ...`` / ``python -m peft_state_tuning ...``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peft-state-tuning", description="State tuning of RWKV-7 models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="state-tune the shipped small model on the bundled task (CPU)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print("The demo lands with the embedded-model issue; see README.md for what works today.")


if __name__ == "__main__":
    main()
