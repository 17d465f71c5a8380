"""generate() speed at the 0.1B shape: our Rwkv7ForCausalLM vs flash-linear-attention's RWKV7ForCausalLM.

Random weights, bf16, 16-token prompt, 128 new tokens, greedy; batch 1 and 32. Also checks that
our greedy tokens equal those of our own full-sequence forward. Writes
benchmarks/results/bench_generate.json. Run on a GPU: python benchmarks/bench_generate.py
"""

from __future__ import annotations

import copy
import json
import sys
import traceback

import torch

from common import RESULTS, device_info, random_model_0_1b, restrict_fla_autotune, timed, write_results

PROMPT, NEW = 16, 128


def tokens_per_s(model, batch: int, **kwargs) -> float:
    ids = torch.randint(1, 65536, (batch, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs)

    return batch * NEW / timed(run, warmup=1, repeat=3)


def greedy_matches_full_forward(model) -> bool:
    """Greedy tokens of generate() (recurrent decode kernel, CUDA graph) == the argmax of one
    full-sequence forward (chunked kernel). Checked in fp32: in bf16 the two summation orders
    legitimately flip near-ties."""
    model = copy.deepcopy(model).float()
    ids = torch.randint(1, 65536, (2, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        argmax = model(gen).logits[:, PROMPT - 1 : -1].argmax(-1)
    return bool(torch.equal(argmax, gen[:, PROMPT:]))


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, batch in zip(axes, (1, 32)):
        names = [n for n in (f"ours_b{batch}", f"fla_b{batch}") if "tokens_per_s" in results["runs"].get(n, {})]
        ax.bar(names, [results["runs"][n]["tokens_per_s"] for n in names], color=["tab:blue", "tab:gray"][: len(names)])
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("generated tokens/s")
    fig.suptitle(f"generate(), 0.1B shape, bf16, greedy, {results['device']['gpu']}")
    fig.tight_layout()
    fig.savefig(RESULTS / "bench_generate.png", dpi=100)


def main() -> None:
    if "--plot-only" in sys.argv:  # redraw from the saved JSON
        plot(json.loads((RESULTS / "bench_generate.json").read_text()))
        return
    restrict_fla_autotune()
    results = {"device": device_info(), "prompt": PROMPT, "new_tokens": NEW, "fla_autotune": "reduced", "runs": {}}
    ours, _ = random_model_0_1b()
    ours.eval()
    results["ours_greedy_equals_full_forward"] = greedy_matches_full_forward(ours)
    for batch in (1, 32):
        results["runs"][f"ours_b{batch}"] = {"tokens_per_s": tokens_per_s(ours, batch)}
        print(f"ours b{batch}", results["runs"][f"ours_b{batch}"], flush=True)
        write_results("bench_generate", results)
    del ours
    try:
        from fla.models import RWKV7Config, RWKV7ForCausalLM

        config = RWKV7Config(
            vocab_size=65536, hidden_size=768, num_hidden_layers=12, head_dim=64, decay_low_rank_dim=64,
            a_low_rank_dim=64, v_low_rank_dim=32, gate_low_rank_dim=128, intermediate_size=3072,
        )  # fmt: skip
        peer = RWKV7ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
        for batch in (1, 32):
            results["runs"][f"fla_b{batch}"] = {"tokens_per_s": tokens_per_s(peer, batch)}
            print(f"fla b{batch}", results["runs"][f"fla_b{batch}"], flush=True)
    except Exception as err:  # noqa: BLE001
        results["runs"]["fla"] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        print("fla failed:", err)
    for batch in (1, 32):
        a, b = results["runs"].get(f"ours_b{batch}"), results["runs"].get(f"fla_b{batch}")
        if a and b:
            a["speed_vs_fla"] = a["tokens_per_s"] / b["tokens_per_s"]
    print(write_results("bench_generate", results))
    plot(results)


if __name__ == "__main__":
    main()
