"""State-tune an RWKV-7 with a plain ``transformers.Trainer`` (a thin wrapper of ``peft_state_tuning.train``).

    python examples/train_state_tuning.py --help

    # the shipped model, local jsonl with a "text" column, a few steps on CPU
    python examples/train_state_tuning.py --dataset data.jsonl --text_column text --max_steps 50 --output_dir out

    # any RWKV-7 folder or Hub id, a Hub chat dataset, on a GPU, resumable, pushed to the Hub
    python examples/train_state_tuning.py --model_name_or_path path/to/rwkv7 --dataset HuggingFaceH4/no_robots \\
        --messages_column messages --bf16 --max_steps 2000 --save_steps 500 --output_dir states \\
        --resume_from_checkpoint last --push_to_hub --hub_model_id me/my-rwkv7-state

The same command line is ``peft-state-tuning train ...`` and ``python -m peft_state_tuning train ...``.
"""

import peft_state_tuning  # noqa: F401  (registers STATE_TUNING with PEFT and rwkv7 with the Auto classes)
from peft_state_tuning.train import main

if __name__ == "__main__":
    main()
