"""Multi-process state tuning on CPU (gloo): 2 processes == 1 process with the same global batch."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_rwkv7 import convert_rwkv_checkpoint

from checkpoints import write_official_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def free_port() -> int:
    """A port nothing listens on now (a fixed one can be taken on a shared CI machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_ddp_equals_single_process(tmp_path):
    pth = write_official_checkpoint(tmp_path / "m.pth", hidden=128, layers=2, vocab=300, seed=5)
    base = convert_rwkv_checkpoint(pth, tmp_path / "base", with_tokenizer=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    single = subprocess.run(
        [sys.executable, str(SCRIPT), str(base), str(tmp_path / "one"), "4"], env=env, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT), str(base), str(tmp_path / "two"),
         "2"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert one[key].abs().sum() > 0
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)
