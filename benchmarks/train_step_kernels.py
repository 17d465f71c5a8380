"""Every CUDA kernel of one state-tuning train step, with GPU milliseconds and launches per step.

    python benchmarks/train_step_kernels.py [--top 80]

The step is bench_train.py's ``ours_state_tuning`` (0.1B shape, random weights, B = 8, T = 4096, bf16, the CUDA
defaults). ``bench_train.py --profile`` sums kernels by family; this lists them one by one, with how often each
runs per step, which is what shows work that should not be there (e.g. eager gradient sums between compiled
graphs, zero-filled gradients of unused graph outputs; see benchmarks/results/train_step_kernels_h200.log).
"""

from __future__ import annotations

import argparse

import torch
from common import cuda_kernel_rows, state_tuning_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--top", type=int, default=80, help="how many kernels to list")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()
    _, step = state_tuning_step(args.batch, args.seq)
    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    rows = cuda_kernel_rows(step, iters=2)
    print(f"total GPU ms per step {sum(r[0] for r in rows):.2f}, kernels per step {sum(r[1] for r in rows):.0f}")
    for ms, count, name in rows[: args.top]:
        print(f"{ms:8.3f} ms {count:6.0f}x {ms / max(count, 1) * 1e3:8.1f} us  {name[:150]}")


if __name__ == "__main__":
    main()
