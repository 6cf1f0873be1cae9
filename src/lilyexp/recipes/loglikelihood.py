"""Multiple-choice scoring by log-likelihood (as lm-evaluation-harness scores ARC, PIQA, ...; not the paper's
protocol, which generates an answer and extracts it): each option is appended to the question's context and the
option with the highest summed log-probability of its tokens wins (``mc_accuracy``); ``mc_accuracy_norm`` divides
by the option's length in bytes (lm-evaluation-harness's ``acc_norm``). It needs no trained answer format and one
forward call per option, so it is cheap on small models. Every row is its own routing group: a router that pools
per sample (Lily ``eval_pooling: sample``) scores each option as a batch-1 call would."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lilyexp.methods.routing import length_order, routing_groups, row_groups, warn_if_batch_coupled
from lilyexp.recipes.sharding import map_batches

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

    from lilyexp.contracts import InstructionTask


def continuation_ids(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the context (with the tokenizer's special tokens, e.g. LLaMA-3's BOS, as training and
    generation encode it) and of the continuation, split on the joint encoding (so a BPE merge across the
    boundary is tokenised as the model reads the whole text)."""
    whole = tokenizer(context + continuation)["input_ids"]
    head = tokenizer(context)["input_ids"]
    if whole[:len(head)] != head or len(whole) == len(head):
        return head, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return head, whole[len(head):]


def right_padded(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    return {"input_ids": torch.tensor([row + [pad_id] * (width - len(row)) for row in rows]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])}


@torch.no_grad()
def option_logprobs(model: torch.nn.Module, tokenizer: Tokenizer, pairs: list[tuple[list[int], list[int]]], device
                    ) -> list[float]:
    """Summed log-probability of each continuation given its context, one row per pair."""
    rows = [context + continuation for context, continuation in pairs]
    batch = {k: v.to(device) for k, v in right_padded(rows, tokenizer.pad_token_id).items()}
    with routing_groups(model, row_groups(len(rows), device)):
        logits = model(**batch).logits
    scores = []
    for row, (context, continuation) in enumerate(pairs):  # only the continuation's positions: a vocabulary-wide
        positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1, device=device)
        picked = logits[row, positions]  # log-softmax over every position would hold rows x length x vocabulary
        logprobs = picked.to(torch.promote_types(picked.dtype, torch.float32)).log_softmax(-1)  # fp16 -> fp32
        targets = torch.tensor(continuation, device=device)
        scores.append(logprobs[torch.arange(len(continuation), device=device), targets].sum().item())
    return scores


def score_set(model, tokenizer, task, name: str, examples: list[dict], batch_size: int, device) -> dict:
    """Accuracy (summed log-probability) and byte-normalised accuracy of one test set (batches of questions of
    similar length, unless a router couples the batch)."""

    def judge(chunk: list[dict]) -> list[tuple[bool, bool]]:  # (summed, byte-normalised) right, per question
        questions = [task.choices(name, e) for e in chunk]
        pairs = [continuation_ids(tokenizer, context, option) for context, options, _ in questions
                 for option in options]
        scores, judged = iter(option_logprobs(model, tokenizer, pairs, device)), []
        for context, options, gold in questions:
            mine = [next(scores) for _ in options]
            normed = [s / max(1, len(option.encode())) for s, option in zip(mine, options)]
            judged.append((mine.index(max(mine)) == gold, normed.index(max(normed)) == gold))
        return judged

    judged = map_batches(examples, batch_size, judge, desc=f"score {name}",
                         length=length_order(model, lambda example: len(task.choices(name, example)[0])))
    total = max(len(examples), 1)
    return {f"test/mc_accuracy/{name}": sum(j[0] for j in judged) / total,
            f"test/mc_accuracy_norm/{name}": sum(j[1] for j in judged) / total}


def loglikelihood_accuracy(model: torch.nn.Module, tokenizer: Tokenizer, task: InstructionTask, batch_size: int,
                           device) -> dict:
    """Both accuracies per test set and their means over the sets."""
    model.eval()
    warn_if_batch_coupled(model, batch_size, "scoring each option alone")
    metrics: dict[str, float] = {}
    for name, examples in task.eval_sets.items():
        metrics.update(score_set(model, tokenizer, task, name, examples, batch_size, device))
    for kind in ("mc_accuracy", "mc_accuracy_norm"):
        values = [v for k, v in metrics.items() if k.startswith(f"test/{kind}/")]
        metrics[f"test/{kind}/avg"] = sum(values) / max(len(values), 1)
    return metrics
