"""Encode/decode speed of our RWKV world tokenizer vs pip ``rwkv``'s TRIE_TOKENIZER on ~10 MB of text.

Usage::

    python benchmarks/bench_tokenizer.py [--mb 10] [--repeats 3] [--out benchmarks/results/bench_tokenizer.json]

Two corpora: a seeded mix of English prose, Chinese prose, Python code and emoji/other scripts with whitespace runs,
and the vocabulary file itself (decoded text: lots of rare tokens). Each measurement is the best of ``--repeats``
runs (the minimum is the least noisy estimate of the cost on a shared machine); the median is recorded too. Before
timing, the ids of both tokenizers are checked to be identical on the whole corpus.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling_rwkv7 import tokenization_rwkv7 as tk  # noqa: E402

EN = (
    "The quick brown fox jumps over the lazy dog. In 2023, RWKV-7 reached strong results on many benchmarks, "
    "while keeping a constant memory footprint per token!\n"
)
ZH = "人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。\n"
CODE = (
    "def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
    "    for i in range(len(self.layers)):\n"
    "        x = x + self.layers[i](self.norm(x))  # residual\n"
    "    return x\n\n"
)
MISC = "Emoji 😀🎉👍🏽 — naïve café — Ελληνικά — русский текст — 日本語のテキスト\t\t\r\n        \n\n\n"


def mixed_corpus(n_bytes: int, seed: int = 0) -> str:
    """About ``n_bytes`` of UTF-8 text from randomly interleaved English/Chinese/code/misc paragraphs."""
    rng = random.Random(seed)
    chunks = [EN, ZH, CODE, MISC]
    parts, size = [], 0
    while size < n_bytes:
        c = rng.choice(chunks)
        parts.append(c)
        size += len(c.encode("utf-8"))
    return "".join(parts)


def vocab_corpus(n_bytes: int) -> str:
    """The vocabulary file's own text, repeated to about ``n_bytes``."""
    with open(tk.DEFAULT_VOCAB_PATH, encoding="utf-8") as f:
        text = f.read()
    reps = n_bytes // len(text.encode("utf-8")) + 1
    out = text * reps
    return out.encode("utf-8")[:n_bytes].decode("utf-8", "ignore")


def timeit(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    times, result = [], None
    for _ in range(repeats):
        # Free the previous result first: deallocating millions of objects must not be charged to the next run.
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), result


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0, help="corpus size in MB (1e6 bytes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_tokenizer.json"))
    args = ap.parse_args()

    import transformers
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    import rwkv

    n_bytes = int(args.mb * 1e6)
    rwkv_vocab = os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt")

    # One-time setup costs (ours: parse + tables; the regex is compiled on the first encode).
    t0 = time.perf_counter()
    trie = TRIE_TOKENIZER(rwkv_vocab)
    trie_init = time.perf_counter() - t0
    tk._TABLES_CACHE.clear()
    t0 = time.perf_counter()
    ours = tk.get_world_tokenizer()
    ours_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours.encode_text("warm up")
    ours_compile = time.perf_counter() - t0

    results: dict[str, Any] = {
        "machine": {
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "rwkv": getattr(rwkv, "__version__", "0.8.32 (pip)"),
            "note": "single-threaded, on the CPU-only development machine of this session (no accelerator used)",
        },
        "setup_seconds": {
            "trie_tokenizer_init": round(trie_init, 3),
            "ours_init_parse_tables": round(ours_init, 3),
            "ours_first_encode_regex_compile": round(ours_compile, 3),
        },
        "repeats": args.repeats,
        "corpora": {},
    }

    for name, text in [("mixed_en_zh_code_emoji", mixed_corpus(n_bytes)), ("vocab_file_text", vocab_corpus(n_bytes))]:
        data = text.encode("utf-8")
        mb = len(data) / 1e6
        print(f"[{name}] {mb:.2f} MB", flush=True)

        trie_best, trie_med, ref = timeit(lambda: trie.encode(text), args.repeats)
        ours_best, ours_med, ids = timeit(lambda: ours.encode_text(text), args.repeats)
        if ids != ref:
            raise SystemExit(f"[{name}] ids differ from TRIE_TOKENIZER: benchmark invalid")
        # The full Hugging Face call (BatchEncoding with attention mask) on the same text.
        hf_best, hf_med, enc = timeit(lambda: ours(text), max(1, args.repeats - 1))
        if enc["input_ids"] != ref:
            raise SystemExit(f"[{name}] HF __call__ ids differ from TRIE_TOKENIZER")
        dec_trie_best, _, raw = timeit(lambda: trie.decodeBytes(ref), args.repeats)
        dec_ours_best, _, raw2 = timeit(lambda: ours.decode_bytes(ref), args.repeats)
        if raw != raw2:
            raise SystemExit(f"[{name}] decoded bytes differ")
        dec_hf_best, _, _ = timeit(lambda: ours.decode(ref), args.repeats)

        entry = {
            "bytes": len(data),
            "tokens": len(ref),
            "encode_MBps": {
                "trie_tokenizer": round(mb / trie_best, 2),
                "ours_encode_text": round(mb / ours_best, 2),
                "ours_hf_call": round(mb / hf_best, 2),
            },
            "encode_seconds_best_median": {
                "trie_tokenizer": [round(trie_best, 3), round(trie_med, 3)],
                "ours_encode_text": [round(ours_best, 3), round(ours_med, 3)],
                "ours_hf_call": [round(hf_best, 3), round(hf_med, 3)],
            },
            "speedup_encode_vs_trie": round(trie_best / ours_best, 2),
            "decode_MBps": {
                "trie_decodeBytes": round(mb / dec_trie_best, 1),
                "ours_decode_bytes": round(mb / dec_ours_best, 1),
                "ours_decode_str": round(mb / dec_hf_best, 1),
            },
            "ids_identical": True,
        }
        results["corpora"][name] = entry
        print(json.dumps(entry, indent=2), flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
