"""Per-sample Lily routing in evaluation (``eval_pooling: sample`` with routing groups): batched beam search,
CFG batches and classification reproduce the official batch-1 evaluation; the per-group pooling against a
direct computation of its formula; the group layouts; the rule (eval mode and groups set); no-op elsewhere."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, RobertaConfig
from transformers import BatchEncoding
from transformers.cache_utils import Cache

from lilyexp.errors import ConfigError
from lilyexp.methods.lily import LilyVariantConfig, LilyVariantModel, RoutingContext, RowGroups, mix_experts
from lilyexp.methods.routing import (beam_groups, cfg_groups, evaluation_routing, routing_groups, routing_record,
                                     row_groups, supports_routing_groups)
from lilyexp.recipes import causal_lm, classify
from lilyexp.run import execute

from conftest import compose_run

QKV = ["q_proj", "k_proj", "v_proj"]
PAD, EOS, BEAMS, NEW_TOKENS = 0, 20, 4, 12
PROMPT_LENGTHS = (3, 7, 5, 11, 4, 9)


def tiny_llama(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=PAD, bos_token_id=None, eos_token_id=None, **kwargs)).double()


def lily(model: torch.nn.Module, targets=QKV, **kwargs) -> LilyVariantModel:
    torch.manual_seed(1)  # random, non-zero B: the routing changes the outputs
    settings = {"r": 4, "ne_1": 1, "num_B": 4, "target_modules": targets, "init_weights": False,
                "eval_pooling": "sample", **kwargs}
    return LilyVariantModel(model, LilyVariantConfig(**settings)).double().eval()


@pytest.fixture(scope="module")
def generator() -> LilyVariantModel:
    return lily(tiny_llama())


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def beam_search(model, input_ids, attention_mask) -> torch.Tensor:
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=BEAMS, do_sample=False,
                          max_new_tokens=NEW_TOKENS, pad_token_id=PAD, eos_token_id=EOS)


def answer(tokens: list[int]) -> list[int]:
    """Generated tokens up to and including the first EOS (beam search fills finished rows after it)."""
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def alone(model, prompt: list[int]) -> list[int]:
    """The official evaluation: one prompt, no padding, official whole-call routing (no groups set)."""
    ids = torch.tensor([prompt])
    return answer(beam_search(model, ids, torch.ones_like(ids))[0, len(prompt):].tolist())


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def batched(model, prompts: list[list[int]], grouped: bool) -> list[list[int]]:
    ids, mask = left_padded(prompts)
    if grouped:
        with routing_groups(model, beam_groups(len(prompts), BEAMS)):
            output = beam_search(model, ids, mask)
    else:  # the official routing: one mixture per forward call, over all prompts' rows and their padding
        output = beam_search(model, ids, mask)
    return [answer(row[ids.shape[1]:].tolist()) for row in output]


def test_batched_beam_search_with_sample_routing_reproduces_batch_1(generator, prompts):
    reference = [alone(generator, p) for p in prompts]
    # the case covers samples that finish (EOS) while others still decode, and samples that run to the limit
    assert sum(len(r) < NEW_TOKENS for r in reference) >= 2 and sum(len(r) == NEW_TOKENS for r in reference) >= 2
    assert batched(generator, prompts, grouped=True) == reference
    plain = batched(generator, prompts, grouped=False)
    assert any(p != r for p, r in zip(plain, reference)), "the official routing should couple the samples"


def test_beam_search_reorders_rows_only_within_a_prompt(generator, prompts, monkeypatch):
    """What :func:`beam_groups` relies on: generate's cache reordering never moves a row to another prompt."""
    seen, original = [], Cache.reorder_cache

    def recording(self, beam_idx):
        seen.append(beam_idx.clone())
        return original(self, beam_idx)

    monkeypatch.setattr(Cache, "reorder_cache", recording)
    batched(generator, prompts, grouped=True)
    rows = torch.arange(len(prompts) * BEAMS)
    assert seen and all(torch.equal(idx // BEAMS, rows // BEAMS) for idx in seen)
    assert any(not torch.equal(idx, rows) for idx in seen)  # rows did move, within their block


def direct_group_mix(h, experts, router, mask, ids):
    """Per row: the mean of the per-token softmax over the unmasked tokens of every row with its id."""
    out = torch.zeros(*h.shape[:-1], experts.shape[-1], dtype=h.dtype)
    for row in range(h.shape[0]):
        tokens = torch.cat([h[j][mask[j].bool()] for j in range(h.shape[0]) if ids[j] == ids[row]])
        w = torch.softmax(tokens @ router.weight.T, -1).mean(0)
        out[row] = h[row] @ sum(w[e] * experts[e] for e in range(len(experts)))
    return out


def test_group_pooling_matches_its_formula():
    torch.manual_seed(1)
    h, experts = torch.randn(6, 5, 4, dtype=torch.float64), torch.randn(3, 4, 7, dtype=torch.float64)
    router = torch.nn.Linear(4, 3, bias=False).double()
    mask = torch.ones(6, 5)
    mask[0, :2] = mask[3, :4] = mask[5, :1] = 0  # left padding, a different amount per row
    ids = torch.tensor([7, 7, 2, 9, 2, 7])  # any integers, groups need not be contiguous
    got = mix_experts(h, experts, router, "batch_mean", mask.double(), RowGroups.of(ids))
    torch.testing.assert_close(got, direct_group_mix(h, experts, router, mask, ids))
    # one group and no mask: the official whole-call pooling
    torch.testing.assert_close(mix_experts(h, experts, router, "batch_mean", None, RowGroups.of(torch.zeros(6))),
                               mix_experts(h, experts, router, "batch_mean"))
    with pytest.raises(ValueError, match="cover 4 rows but this forward call has 6"):
        mix_experts(h, experts, router, "batch_mean", None, RowGroups.of(torch.arange(4)))


def test_kv_cache_step_weights_align_on_the_last_tokens():
    context = RoutingContext()
    context.attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])  # past + new tokens
    weights = context.group_token_weights(torch.zeros(2, 2, 4))  # a step that feeds two new tokens
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    context.attention_mask = torch.ones(2, 1, 5, 5)  # the 4-D mask a compileable cache builds
    with pytest.raises(ValueError, match="2-D attention mask"):
        context.group_token_weights(torch.zeros(2, 2, 4))


def test_group_layouts():
    assert beam_groups(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert cfg_groups(3).tolist() == [0, 1, 2, 0, 1, 2]
    assert row_groups(3).tolist() == [0, 1, 2]


def test_cfg_batch_with_groups_equals_each_pair_alone():
    """A CFG batch [uncond_0..uncond_{n-1}, cond_0..cond_{n-1}] routes as n batch-1 calls [uncond_i, cond_i]."""
    model = lily(tiny_llama())
    n, tokens = 3, torch.randint(1, 64, (6, 5), generator=torch.Generator().manual_seed(3))
    with routing_groups(model, cfg_groups(n)):
        together = model(input_ids=tokens).logits
    for i in range(n):
        pair = model(input_ids=tokens[[i, n + i]]).logits
        torch.testing.assert_close(together[[i, n + i]], pair, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(model(input_ids=tokens).logits, together)


def tiny_classifier(num_labels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(RobertaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, num_labels=num_labels)).double()


def test_classification_with_row_groups_equals_batch_1_row_by_row():
    model = lily(tiny_classifier(), targets=["query", "value"])
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (4, 9, 6, 2)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [1] * (width - len(r)) for r in rows])  # right padding
    mask = (ids != 1).long()
    with routing_groups(model, row_groups(len(rows))):
        grouped = model(input_ids=ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        single = model(input_ids=torch.tensor([row])).logits[0]
        torch.testing.assert_close(grouped[i], single, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, grouped)


def test_groups_apply_only_in_eval_mode_with_the_sample_setting():
    base, tokens = tiny_llama(), torch.randint(1, 64, (4, 5), generator=torch.Generator().manual_seed(5))
    sample = lily(copy.deepcopy(base))
    official = lily(copy.deepcopy(base), eval_pooling="batch")
    reference = official(input_ids=tokens).logits
    with routing_groups(official, row_groups(4)):
        torch.testing.assert_close(official(input_ids=tokens).logits, reference)  # eval_pooling=batch: ignored
    with routing_groups(sample, row_groups(4)):
        assert not torch.allclose(sample(input_ids=tokens).logits, reference)
        sample.train()  # training keeps the official whole-call pooling
        torch.testing.assert_close(sample(input_ids=tokens).logits, reference)
    sample.eval()
    torch.testing.assert_close(sample(input_ids=tokens).logits, reference)  # groups cleared on exit


def test_context_restores_the_previous_groups_and_checks_its_input():
    model = lily(tiny_llama())
    layer = model.model.model.layers[0].self_attn.q_proj
    outer = row_groups(4)
    with routing_groups(model, outer) as count:
        assert count == 6 and layer.routing.groups.ids is outer  # 2 layers x q, k, v
        with routing_groups(model, beam_groups(2, 2)):
            assert layer.routing.groups.index.tolist() == [0, 0, 1, 1]
        assert layer.routing.groups.ids is outer
    assert layer.routing.groups is None
    with pytest.raises(ValueError, match="1-D integer"):
        with routing_groups(model, torch.zeros(4)):
            pass


def test_no_op_on_a_model_without_lily():
    from peft import LoraConfig, get_peft_model
    for model in (tiny_llama(), get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=QKV))):
        model.eval()
        tokens = torch.randint(1, 64, (2, 5))
        reference = model(input_ids=tokens).logits
        assert not supports_routing_groups(model)
        with routing_groups(model, row_groups(2)) as count:
            torch.testing.assert_close(model(input_ids=tokens).logits, reference, rtol=0, atol=0)
        assert count == 0


@pytest.mark.parametrize("bad,match", [({"eval_pooling": "rows"}, "eval_pooling must be one of"),
                                       ({"eval_pooling": "sample", "pooling": "sample_sum"}, "already routes")])
def test_bad_eval_pooling_is_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        LilyVariantConfig(r=4, target_modules=QKV, **bad)


def test_eval_pooling_survives_save_and_load(tmp_path):
    lily(tiny_llama()).save_pretrained(tmp_path)
    reloaded = LilyVariantModel.load_pretrained(tiny_llama(), tmp_path)
    assert reloaded.peft_config["default"].eval_pooling == "sample"


# ---- the recipes state the groups (wiring), and the record says which routing ran ---------------------------------

class Tokens:
    """A tokenizer over space-separated integers, enough for causal_lm.generate."""

    pad_token_id, padding_side = PAD, "left"

    def __call__(self, texts: list[str], return_tensors: str, padding: bool):
        return BatchEncoding(dict(zip(("input_ids", "attention_mask"), left_padded([
            [int(t) for t in text.split()] for text in texts]))))

    def batch_decode(self, output: torch.Tensor, skip_special_tokens: bool) -> list[str]:
        """Without padding, and with one EOS where beam search filled a finished row with more."""
        texts = []
        for row in output.tolist():
            tokens = [t for t in row if t != PAD]
            while tokens[-2:] == [EOS, EOS]:
                tokens.pop()
            texts.append(" ".join(map(str, tokens)))
        return texts


def test_causal_lm_generate_routes_each_prompts_beams_on_their_own(prompts):
    texts = [" ".join(map(str, p)) for p in prompts]
    settings = {"num_beams": BEAMS, "max_new_tokens": NEW_TOKENS}
    per_group, official = lily(tiny_llama()), lily(tiny_llama(), eval_pooling="batch")
    one_at_a_time = [causal_lm.generate(official, Tokens(), [text], settings, "cpu")[0] for text in texts]
    assert causal_lm.generate(per_group, Tokens(), texts, settings, "cpu") == one_at_a_time
    assert causal_lm.generate(official, Tokens(), texts, settings, "cpu") != one_at_a_time
    assert routing_record(per_group, "beams")["mode"] == "per_group"
    assert routing_record(official, "beams")["mode"] == "per_call"


class Numbers:
    """A test set of token-number prompts, scored by whether the generation is non-empty (enough for
    causal_lm.answer_test_set: the test is which batches run and what comes back)."""

    generation = {"num_beams": BEAMS, "max_new_tokens": NEW_TOKENS, "batch_size": 3}

    def prompt(self, example: dict) -> str:
        return example["text"]

    def extract(self, name: str, text: str) -> tuple[str, str]:
        return text, text

    def is_correct(self, prediction: str, answer: str) -> bool:
        return True

    def score(self, name: str, predictions: list, answers: list) -> dict:
        return {f"test/accuracy/{name}": 1.0}


def test_a_test_set_is_answered_in_batches_of_similar_length_and_comes_back_in_order(prompts, monkeypatch):
    examples = [{"text": " ".join(map(str, p)), "answer": ""} for p in prompts]  # lengths 3, 7, 5, 11, 4, 9
    per_group, official = lily(tiny_llama()), lily(tiny_llama(), eval_pooling="batch")
    reference = [causal_lm.generate(official, Tokens(), [e["text"]], Numbers.generation, "cpu")[0] for e in examples]
    seen, real_generate = [], causal_lm.generate
    monkeypatch.setattr(causal_lm, "generate", lambda model, tok, texts, *rest: (
        seen.append([t.count(" ") + 1 for t in texts]), real_generate(model, tok, texts, *rest))[1])
    _, lines = causal_lm.answer_test_set(per_group, Tokens(), Numbers(), "set", examples, "cpu", None)
    assert seen == [[11, 9, 7], [5, 4, 3]]  # longest first, so the batches pad little
    assert [line["generation"] for line in lines] == reference and [line["id"] for line in lines] == list(range(6))
    seen.clear()
    causal_lm.answer_test_set(official, Tokens(), Numbers(), "set", examples, "cpu", None)
    assert seen == [[3, 7, 5], [11, 4, 9]]  # a batch-coupled router keeps the test set's own batches


class Rows:
    """A regression task over token rows: evaluate_split's predictions are then the raw outputs."""

    is_regression = True

    def collate(self, processor, features: list[list[int]]) -> dict:
        width = max(map(len, features))
        ids = torch.tensor([row + [1] * (width - len(row)) for row in features])
        return {"input_ids": ids, "attention_mask": (ids != 1).long(), "labels": torch.zeros(len(features))}

    def logits(self, model, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def score(self, split: str, predictions: list, references: list) -> dict:
        return {"outputs": predictions}


def test_classification_evaluation_routes_each_example_only_in_the_per_sample_mode():
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (4, 9, 6, 2, 7)]
    per_sample = lily(tiny_classifier(num_labels=1), targets=["query", "value"])
    official = lily(tiny_classifier(num_labels=1), targets=["query", "value"], eval_pooling="batch")
    single = classify.evaluate_split(official, None, Rows(), rows, 1, "cpu", "val")["outputs"]
    torch.testing.assert_close(torch.tensor(classify.evaluate_split(per_sample, None, Rows(), rows, 4, "cpu", "val")
                                            ["outputs"]), torch.tensor(single), rtol=1e-10, atol=1e-10)
    coupled = classify.evaluate_split(official, None, Rows(), rows, 4, "cpu", "val")["outputs"]
    assert not torch.allclose(torch.tensor(coupled), torch.tensor(single))  # the official coupling, kept by default
    assert evaluation_routing(tiny_classifier()) is None
    assert evaluation_routing(lily(tiny_classifier(), targets=["query"], use_router=False)) == "none"
    assert evaluation_routing(lily(tiny_classifier(), targets=["query"], pooling="sample_sum",
                                   eval_pooling="batch")) == "per_row"


@pytest.mark.slow
def test_a_commonsense_record_states_the_evaluation_routing(tiny_run, tmp_path):
    record = json.loads(execute(compose_run(["backbone=tiny_llama", "method=lily", "method.eval_pooling=sample",
                                             "trainer.max_steps=1", *tiny_run], tmp_path)).read_text())
    assert record["generation"]["routing"] == {"mode": "per_group", "groups": "each prompt"}
    assert (record["generation"]["batches"], record["generation"]["decoding"]) == ("longest prompts first", "greedy")
