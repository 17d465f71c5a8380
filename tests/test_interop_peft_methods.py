"""Generic PEFT methods (not our StateTuning) on RWKV-7: prompt tuning generates correctly, prefix
tuning is refused with a clear message.

Prompt tuning feeds its virtual tokens as ``inputs_embeds`` in the first step of ``generate()``, so
the cache then holds positions that are not in ``input_ids``; and PEFT looks for the cache under
the name ``past_key_values`` to decide whether to prepend the virtual tokens again. Both used to
break decoding (wrong tokens at batch 1, an attention-mask shape error with a padded batch).
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from modeling_rwkv7.modeling_rwkv7 import _DECODE_GRAPHS

from checkpoints import load_base, make_base_folder, random_ids

VOCAB = 300
VIRTUAL = 16
NEW = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_base_folder(tmp_path_factory.mktemp("base"), hidden=128, layers=2, vocab=VOCAB, seed=21)


def prompt_tuned(folder):
    model = get_peft_model(load_base(folder), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL))
    weight = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():  # reproducible virtual tokens at the scale of the word embeddings
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(22)))
    return model.eval()


def greedy_by_full_forwards(model, ids, mask, steps):
    """The greedy continuation by re-running the whole sequence (with the virtual tokens, which the
    PEFT model's forward prepends) for every new token: no cache involved."""
    seq = ids
    for _ in range(steps):
        nxt = model(input_ids=seq, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return seq


def left_padded_pair():
    a, b = random_ids(VOCAB, 1, 6, seed=23), random_ids(VOCAB, 1, 10, seed=24)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], 1), torch.ones(1, 10)]).long()
    return ids, mask


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("batch", ["one", "left_padded_two"])
def test_prompt_tuning_greedy_generate_equals_full_forwards(folder, batch, use_cache):
    model = prompt_tuned(folder)
    ids, mask = (random_ids(VOCAB, 1, 7, seed=25), None) if batch == "one" else left_padded_pair()
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=use_cache)
        expected = greedy_by_full_forwards(model, ids, mask, NEW)
        with model.disable_adapter():
            plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(gen, expected)
    assert not torch.equal(gen, plain)  # the virtual tokens are really in there


def test_prompt_tuning_padded_row_equals_the_row_alone(folder):
    model = prompt_tuned(folder)
    ids, mask = left_padded_pair()
    with torch.no_grad():
        padded = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        alone = model.generate(input_ids=ids[:1, 4:], max_new_tokens=NEW, do_sample=False)
    assert torch.equal(padded[0, -NEW:], alone[0, -NEW:])


def test_prompt_tuning_beam_search_with_and_without_cache(folder):
    model = prompt_tuned(folder)
    ids, mask = left_padded_pair()
    with torch.no_grad():
        beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
        beams_nocache = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False
        )
    assert torch.equal(beams, beams_nocache) and beams.shape == (2, 15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prompt_tuning_generate_with_cuda_graphs_equals_eager_on_gpu(folder):
    """Decoding steps after the virtual tokens go through the captured CUDA-graph step."""
    model = prompt_tuned(folder).cuda()
    ids, mask = (t.cuda() for t in left_padded_pair())
    with torch.no_grad():
        graphed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        assert _DECODE_GRAPHS.get(model.get_base_model()), "the decoding steps did not use the CUDA graph"
        os.environ["RWKV7_CUDA_GRAPHS"] = "0"
        try:
            eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        finally:
            os.environ.pop("RWKV7_CUDA_GRAPHS")
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_generate_from_inputs_embeds_equals_from_ids(folder, use_cache):
    """The same cause without PEFT: a prompt given as embeddings is in the cache but not in input_ids."""
    model = load_base(folder)
    ids = random_ids(VOCAB, 2, 7, seed=26)
    with torch.no_grad():
        from_ids = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        from_embeds = model.generate(
            inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=NEW, do_sample=False, use_cache=use_cache
        )
    assert torch.equal(from_embeds, from_ids[:, -NEW:])  # with inputs_embeds, generate returns the new tokens only


def test_prefix_tuning_is_refused_with_a_clear_message(folder):
    model = get_peft_model(load_base(folder), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    x = random_ids(VOCAB, 1, 5, seed=27)
    for call in (lambda: model(input_ids=x), lambda: model.generate(input_ids=x, max_new_tokens=2)):
        with pytest.raises(TypeError, match=r"prefix tuning.*attention KV caches.*PromptTuningConfig.*StateTuningConfig"):
            call()
