"""Trainer run used by tests/test_distributed.py: state-tune a small model and save the adapter.

Launched either as one process (per-device batch 4) or with ``torchrun --nproc_per_node 2``
(per-device batch 2): the global batch is 4 either way, so the saved states must agree.
"""

import os
import sys

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import peft_state_tuning  # noqa: F401
from peft_state_tuning import StateTuningConfig

base_dir, out_dir, per_device = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
rows = torch.randint(1, 300, (16, 24), generator=g).tolist()
data = Dataset.from_dict({"input_ids": rows, "labels": rows})
model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), StateTuningConfig())
args = TrainingArguments(
    output_dir=out_dir, max_steps=4, per_device_train_batch_size=per_device, learning_rate=0.05,
    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
    dataloader_drop_last=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
)  # fmt: skip
Trainer(model=model, args=args, train_dataset=data).train()
if args.process_index == 0:
    model.save_pretrained(out_dir + "/adapter")
if torch.distributed.is_initialized():
    # A clean shutdown: without it a rank that is still tearing down gloo when the other has exited can abort
    # (SIGABRT, exit code -6; seen twice in full local test runs).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
