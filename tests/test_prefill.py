"""Prefill-once beam search (lilyexp.recipes.prefill): generations token for token equal to transformers'
four-copy prefill — at batch 1 and batched, Lily under per-sample and official routing, the paper's sample_sum
and per-token pooling, LoRA, a plain model — on a tiny LLaMA (SmolLM2's real weights: tests/test_settled_beams.py)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lilyexp.methods.routing import beam_groups, routing_groups
from lilyexp.recipes import causal_lm
from lilyexp.recipes.prefill import prefill_once

from test_eval_routing import BEAMS, Tokens, alone, batched, lily, tiny_llama


def lora_model() -> torch.nn.Module:
    torch.manual_seed(3)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(tiny_llama(), config).double().eval()


MODELS = {"lily per-sample": lambda: lily(tiny_llama()),
          "lily official": lambda: lily(tiny_llama(), eval_pooling="batch"),
          "lily sample_sum": lambda: lily(tiny_llama(), pooling="sample_sum", eval_pooling="batch"),
          "lily masked": lambda: lily(tiny_llama(), mask_padding=True),
          "lily token": lambda: lily(tiny_llama(), pooling="token", eval_pooling="batch"),
          "lora": lora_model, "plain": lambda: tiny_llama().eval()}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in (3, 11, 5, 9)]


@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_once_generates_what_the_four_copy_prefill_generates(name, prompts, one_torch_thread):
    model = MODELS[name]()
    four_copies = {"alone": [alone(model, p) for p in prompts], "batched": batched(model, prompts, grouped=True),
                   "official batched": batched(model, prompts, grouped=False)}
    with prefill_once(model, BEAMS) as count:
        once = {"alone": [alone(model, p) for p in prompts], "batched": batched(model, prompts, grouped=True),
                "official batched": batched(model, prompts, grouped=False)}
    assert once == four_copies
    assert count.once == len(prompts) + 2 and count.per_beam == 0 and count.mode == "once per prompt"


def test_prefill_runs_one_copy_per_prompt(prompts):
    model = MODELS["lily per-sample"]()
    target = next(m for m in model.modules() if m.__class__.__name__ == "LlamaForCausalLM")
    with prefill_once(model, BEAMS):
        rows: list[int] = []
        handle = target.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                                  with_kwargs=True)  # runs after prefill_once's hook
        batched(model, prompts, grouped=True)
        handle.remove()
    assert rows[0] == len(prompts)  # the prefill: one copy per prompt
    assert set(rows[1:]) == {len(prompts) * BEAMS}  # every later step: the beams


def test_the_hooks_leave_the_model_as_they_found_it(prompts):
    model = MODELS["lily per-sample"]()
    target = next(m for m in model.modules() if m.__class__.__name__ == "LlamaForCausalLM")
    before = (dict(target._forward_pre_hooks), dict(target._forward_hooks))
    with prefill_once(model, BEAMS):
        pass
    assert (dict(target._forward_pre_hooks), dict(target._forward_hooks)) == before
    with prefill_once(model, 1) as count:  # greedy: nothing to share
        batched(model, prompts, grouped=True)
    assert count.once == 0


def test_the_recipe_generates_with_prefill_once_and_counts_it(prompts):
    texts = [" ".join(map(str, p)) for p in prompts]
    settings = {"num_beams": BEAMS, "max_new_tokens": 12}
    model = MODELS["lily per-sample"]()
    count = causal_lm.PrefillCount()
    answers = causal_lm.generate(model, Tokens(), texts, settings, "cpu", prefill=count)
    assert count.once == 1 and count.mode == "once per prompt"
    ids, mask = Tokens()(texts, "pt", True).values()
    with routing_groups(model, beam_groups(len(texts), BEAMS)):
        plain = model.generate(input_ids=ids, attention_mask=mask, num_beams=BEAMS, do_sample=False,
                               max_new_tokens=12, pad_token_id=0)
    assert answers == Tokens().batch_decode(plain, True)


def test_a_first_call_with_a_per_row_input_the_hook_does_not_know_runs_unchanged():
    from transformers import DynamicCache

    from lilyexp.recipes.prefill import is_beam_prefill

    ids = torch.tensor([[5, 6]] * 4)
    known = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "past_key_values": DynamicCache(),
             "position_ids": torch.arange(2)[None], "cache_position": torch.arange(4)}  # shared, any length
    assert is_beam_prefill(known, 4, None)
    assert not is_beam_prefill({**known, "pixel_values": torch.zeros(4, 3)}, 4, None)
    assert not is_beam_prefill({**known, "input_ids": torch.tensor([[5, 6]] * 3 + [[5, 7]])}, 4, None)
