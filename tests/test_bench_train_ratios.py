"""Host-side helpers of the GPU benchmarks, on CPU: bench_train.py's ratios to the peer (only for runs measured beside
it) and train_step_gaps.py's trace analysis."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    """benchmarks/{name}.py as a module (its sibling imports, e.g. ``common``, resolved)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratios_only_beside_the_peer():
    add_ratios = _benchmark("bench_train").add_ratios
    # the peer here, twice (its fastest run counts); a run here; a run merged from an earlier invocation
    runs = {
        "fla_state_tuning": {"tokens_per_s": 200.0, "peak_gb": 20.0},
        "fla_state_tuning_repeat": {"tokens_per_s": 250.0, "peak_gb": 20.0},
        "ours_state_tuning": {"tokens_per_s": 300.0, "peak_gb": 10.0},
        "ours_old": {"merged_from": "old.json", "tokens_per_s": 280.0, "peak_gb": 12.0, "speed_vs_fla": 9.0},
    }
    add_ratios(runs)
    assert runs["ours_state_tuning"]["speed_vs_fla"] == 300 / 250 and runs["ours_state_tuning"]["memory_vs_fla"] == 0.5
    assert "speed_vs_fla" not in runs["ours_old"]  # its peer was another run: a stale ratio is dropped too
    # the peer merged from the other GPU's file (run at the same time): our runs here get ratios, as do runs
    # merged from that same file
    runs = {
        "fla_state_tuning": {"merged_from": "gpu1.json", "tokens_per_s": 200.0, "peak_gb": 20.0},
        "ours_state_tuning": {"tokens_per_s": 300.0, "peak_gb": 10.0},
    }
    add_ratios(runs)
    assert runs["ours_state_tuning"]["speed_vs_fla"] == 1.5


def test_train_step_gaps_finds_idle_time_and_the_host_work_beside_it(tmp_path, capsys):
    """benchmarks/train_step_gaps.py's analysis on a hand-made trace: one 100 us gap between kernels, the
    host op that ran during it, and overlapping kernels (a stream beside another) counted as no gap."""
    module = _benchmark("train_step_gaps")
    events = [
        {"cat": "kernel", "name": "a", "ts": 0, "dur": 50},
        {"cat": "kernel", "name": "b", "ts": 40, "dur": 60},  # overlaps a: no gap
        {"cat": "kernel", "name": "c", "ts": 200, "dur": 10},  # idle from 100 to 200
        {"cat": "cpu_op", "name": "aten::embedding", "ts": 120, "dur": 50},
        {"cat": "cpu_op", "name": "outer", "ts": 0, "dur": 300},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    module.analyse(trace, min_gap_us=20, top=5)
    out = capsys.readouterr().out
    assert "3 GPU operations over 0.2 ms" in out and "1 gaps > 20 us" in out
    assert "100 us at +   0.10 ms, after 'b', before 'c'" in out and "['aten::embedding', 'outer']" in out
