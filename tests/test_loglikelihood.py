"""Log-likelihood multiple-choice scoring (recipes/loglikelihood.py): the options a question offers, the context
and continuations as training taught them, log-probabilities against a direct one-at-a-time computation, per-row
routing (batched equals batch 1 for Lily per-sample), the accuracies, and the task setting."""

from __future__ import annotations

import pytest
import torch

from lilyexp.errors import ConfigError
from lilyexp.recipes import loglikelihood
from lilyexp.tasks.commonsense import answer_options, scoring_choices, train_prompt

from test_eval_routing import lily, tiny_llama

ARC = {"instruction": "Which is a mammal?\n\nAnswer1: trout Answer2: whale Answer3: shark Answer4: squid\n\n"
                      "Answer format: answer1/answer2/answer3/answer4",
       "input": "", "output": "the correct answer is answer2", "answer": "answer2"}


def test_options_come_from_the_questions_answer_format_line():
    assert answer_options(ARC["instruction"], "answer") == ["answer1", "answer2", "answer3", "answer4"]
    assert answer_options("Is it? Answer format: true/false", "true_false") == ["true", "false"]
    assert answer_options("no line here", "option") == ["option1", "option2"]  # the format's alternatives


def test_context_and_continuations_are_the_training_text_split_before_the_answer():
    context, continuations, gold = scoring_choices(ARC, answer_options(ARC["instruction"], "answer"))
    assert context == train_prompt(ARC) + "the correct answer is"
    assert continuations == [" answer1", " answer2", " answer3", " answer4"] and gold == 1
    assert context + continuations[gold] == train_prompt(ARC) + ARC["output"]
    with pytest.raises(ConfigError, match="none of the question's options"):
        scoring_choices({**ARC, "answer": "answer7", "output": "the correct answer is answer7"}, ["answer1"])


class Digits:
    """A tokenizer over space-separated integers."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}


def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))


@pytest.mark.parametrize("build", [lambda: tiny_llama().eval(), lambda: lily(tiny_llama())],
                         ids=["plain", "lily per-sample"])
def test_batched_option_logprobs_equal_one_at_a_time(build, one_torch_thread):
    model = build()
    pairs = [([5, 9, 3], [7]), ([5, 9, 3, 11, 12], [8, 2]), ([4], [6, 6, 1])]
    batched = loglikelihood.option_logprobs(model, Digits(), pairs, "cpu")
    assert batched == pytest.approx([direct_logprob(model, c, o) for c, o in pairs], abs=1e-9)


def test_a_bpe_merge_across_the_boundary_is_split_on_the_joint_encoding():
    class Merging(Digits):
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            bos = [99] if add_special_tokens else []  # a BOS, as LLaMA-3's tokenizer adds one
            return {"input_ids": bos + [len(word) for word in text.split(" ") if word]}
    head, tail = loglikelihood.continuation_ids(Merging(), "ab cd", " efg")
    assert (head, tail) == ([99, 2, 2], [3])  # the context as training encodes it, BOS included


class FixedTask:
    """Two questions whose right options are known."""

    eval_sets = {"set": [{"q": 0}, {"q": 1}]}

    def choices(self, name: str, example: dict):
        return "1 2", [" 3", " 4 4"], example["q"]


def test_accuracy_counts_the_most_likely_option_summed_and_per_byte(monkeypatch):
    scores = iter([-1.0, -1.5, -1.0, -1.5])  # option 0 wins summed; per byte (2 and 4 bytes): -0.5 vs -0.375
    monkeypatch.setattr(loglikelihood, "option_logprobs", lambda model, tok, pairs, device: [next(scores)
                                                                                            for _ in pairs])
    metrics = loglikelihood.loglikelihood_accuracy(torch.nn.Linear(1, 1), Digits(), FixedTask(), 8, "cpu")
    assert metrics["test/mc_accuracy/set"] == 0.5 and metrics["test/mc_accuracy_norm/set"] == 0.5
    assert metrics["test/mc_accuracy/avg"] == 0.5
