"""Shared helpers of the GPU benchmarks: the 0.1B shape, timing, results files."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE_0_1B = dict(vocab_size=65536, hidden_size=768, num_hidden_layers=12, head_dim=64,
                  decay_low_rank_dim=64, a_low_rank_dim=64, v_low_rank_dim=32, gate_low_rank_dim=128)  # fmt: skip


def random_model_0_1b(dtype=torch.bfloat16, device="cuda"):
    """Our Rwkv7ForCausalLM at the 0.1B shape with random weights at realistic scales."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from checkpoints import random_official_state_dict

    from modeling_rwkv7 import Rwkv7ForCausalLM
    from modeling_rwkv7.convert import config_from_official, official_to_hf

    sd = random_official_state_dict(vocab=65536, hidden=768, layers=12, ranks=(64, 64, 32, 128))
    config = config_from_official(sd)
    model = Rwkv7ForCausalLM(config)
    model.load_state_dict(official_to_hf(sd, config))
    return model.to(device=device, dtype=dtype), sd


def state_tuning_step(batch: int = 8, seq: int = 4096, checkpointing: bool = False, compile_blocks: bool | None = None):
    """``(model, step)``: one AdamW state-tuning step of the random 0.1B model on fixed random ids (the step that
    bench_train.py times and train_step_gaps.py / train_step_kernels.py dissect). ``compile_blocks`` None: the
    default (blocks compiled on CUDA, modeling_rwkv7/compiled_blocks.py)."""
    from peft import get_peft_model

    from peft_state_tuning import StateTuningConfig

    model, _ = random_model_0_1b()
    model.model.compile_blocks = compile_blocks
    peft_model = get_peft_model(model, StateTuningConfig())
    if checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")

    def step():
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def timed(fn, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of ``fn()`` (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def device_info() -> dict:
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def restrict_fla_autotune():
    """Shrink fla's Triton autotuning spaces to num_warps {4, 8} x num_stages {2, 3} (compiling its full
    spaces took over 6 minutes on the device). Must run before fla is imported; recorded in the json."""
    import triton

    original = triton.autotune

    def autotune(configs, *args, **kwargs):
        kept = [c for c in configs if c.num_warps in (4, 8) and c.num_stages in (2, 3)] or configs[:4]
        return original(kept, *args, **kwargs)

    triton.autotune = autotune


def cuda_kernel_rows(step, iters: int) -> list[tuple[float, float, str]]:
    """``(ms per call of step, launches per call, kernel name)`` of every CUDA kernel ``step`` launches
    (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t and evt.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((t / 1e3 / iters, evt.count / iters, evt.key))
    return sorted(rows, reverse=True)


def cuda_kernel_ms(step, iters: int) -> dict[str, float]:
    """Mean CUDA milliseconds per call of ``step`` of each kernel it launches (names cut at 90 characters),
    largest first."""
    rows: dict[str, float] = {}
    for ms, _, name in cuda_kernel_rows(step, iters):
        rows[name[:90]] = rows.get(name[:90], 0.0) + ms
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))
