"""Where the GPU sits idle in a state-tuning train step (0.1B shape, B=8, T=4096, bf16): a torch.profiler
trace of two steps, then every gap between GPU kernels longer than ``--min-gap`` microseconds, with the
host-side operations running at that moment.

    python benchmarks/train_step_gaps.py              # GPU: run 3 warm-up steps, trace 2, analyse
    python benchmarks/train_step_gaps.py --trace F    # analyse a saved trace (.json or .json.gz), any machine

Why: ``bench_train.py --profile`` adds up kernel time by family; the step takes a few milliseconds more than
its kernels, and this finds where (the trace is written next to the results as ``train_step_trace.json.gz``).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from common import RESULTS

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "python_function", "user_annotation")


def capture(path: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from common import state_tuning_step

    _, step = state_tuning_step()
    for _ in range(3):  # compile, then settle
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    raw = path.with_suffix("")  # the profiler writes plain JSON; keep it gzipped
    prof.export_chrome_trace(str(raw))
    path.write_bytes(gzip.compress(raw.read_bytes()))
    raw.unlink()


def analyse(path: Path, min_gap_us: float, top: int) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") in HOST_CATEGORIES and "dur" in e]
    gaps, end, last = [], None, None
    for e in gpu:
        if end is not None and e["ts"] - end > min_gap_us:
            gaps.append((end, e["ts"], last, e["name"]))
        if end is None or e["ts"] + e["dur"] > end:
            end, last = e["ts"] + e["dur"], e["name"]
    t0 = gpu[0]["ts"]
    busy = sum(e["dur"] for e in gpu)
    print(f"{len(gpu)} GPU operations over {(end - t0) / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms; "
          f"{len(gaps)} gaps > {min_gap_us:.0f} us, {sum(b - a for a, b, _, _ in gaps) / 1e3:.2f} ms in all")
    for a, b, before, after in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        mid = (a + b) / 2
        running = sorted((h for h in host if h["ts"] <= mid <= h["ts"] + h["dur"]), key=lambda h: h["dur"])[:3]
        print(f"{b - a:6.0f} us at +{(a - t0) / 1e3:7.2f} ms, after {before[:32]!r}, before {after[:32]!r}; "
              f"host: {[h['name'][:40] for h in running]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=None, help="analyse this saved trace instead of capturing one")
    ap.add_argument("--min-gap", type=float, default=20.0, help="microseconds")
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args()
    path = args.trace
    if path is None:
        path = RESULTS / "train_step_trace.json.gz"
        capture(path)
    analyse(path, args.min_gap, args.top)


if __name__ == "__main__":
    main()
