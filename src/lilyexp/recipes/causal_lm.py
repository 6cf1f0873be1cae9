"""Causal-LM supervised fine-tuning with generation-based evaluation (the commonsense paradigm of the official
commonsense-reasoning/finetune_*.py and evaluate_*.py): LLM-Adapters tokenisation (cutoff, EOS appended, loss on
the whole prompt unless ``train_on_inputs=False``), left padding to a multiple of 8, validation loss for checkpoint
selection, then batched generation with a KV cache and the task's answer extraction. The record states the
generation settings that ran. The task supplies the texts, prompts and scoring
(:class:`lilyexp.contracts.InstructionTask`); nothing here knows a dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from lilyexp.contracts import InstructionTask, for_tasks
from lilyexp.errors import ConfigError
from lilyexp.methods.routing import (batch_coupled, beam_groups, length_order, routing_groups, routing_record,
                                     warn_if_batch_coupled)
from lilyexp.recipes.core import Objective, Outcome, RecipeInputs, selected_evaluation
from lilyexp.recipes.devices import make_accelerator
from lilyexp.recipes.loglikelihood import loglikelihood_accuracy
from lilyexp.recipes.loop import fit
from lilyexp.recipes.prefill import PrefillCount, prefill_once
from lilyexp.recipes.settled_beams import settled_beam_search
from lilyexp.recipes.sharding import map_batches
from lilyexp.records import run_metrics

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer


IGNORE_INDEX = -100


def tokenize_for_training(tokenizer: Tokenizer, task: InstructionTask, example: dict) -> dict[str, list[int]]:
    ids = tokenizer(task.train_text(example), truncation=True, max_length=task.cutoff_len)["input_ids"]
    if ids[-1] != tokenizer.eos_token_id and len(ids) < task.cutoff_len:
        ids = ids + [tokenizer.eos_token_id]
    labels = list(ids)
    if not task.train_on_inputs:
        prompt = tokenizer(task.train_prompt(example), truncation=True, max_length=task.cutoff_len)["input_ids"]
        labels[:len(prompt)] = [IGNORE_INDEX] * len(prompt)
    return {"input_ids": ids, "labels": labels}


def supervised(features) -> list[dict[str, list[int]]]:
    """Features with at least one label; with ``train_on_inputs=False`` a prompt longer than the cutoff leaves
    none, and its loss would be 0/0."""
    return [f for f in features if any(label != IGNORE_INDEX for label in f["labels"])]


def left_pad(features: list[dict[str, list[int]]], pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Pad on the left (as the official collator with padding_side='left' does), labels with -100."""
    longest = max(len(f["input_ids"]) for f in features)
    width = -(-longest // multiple) * multiple
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for feature in features:
        pad = width - len(feature["input_ids"])
        batch["input_ids"].append([pad_id] * pad + feature["input_ids"])
        batch["attention_mask"].append([0] * pad + [1] * len(feature["input_ids"]))
        batch["labels"].append([IGNORE_INDEX] * pad + feature["labels"])
    return {key: torch.tensor(value) for key, value in batch.items()}


def language_model_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def validation_loss(model: torch.nn.Module, features: list[dict], pad_id: int, batch_size: int, device) -> dict:
    model.eval()

    def batch_loss(chunk: list[dict]) -> list[float]:  # the batch's mean loss, once per example in it
        batch = {k: v.to(device) for k, v in left_pad(chunk, pad_id).items()}
        return [language_model_loss(model, batch).float().item()] * len(chunk)

    losses = map_batches(features, batch_size, batch_loss, desc="eval val/loss")
    return {"val/loss": sum(losses) / max(len(losses), 1)}


def drops_settled(model: torch.nn.Module, beams: int, prompts_per_call: int) -> bool:
    """Whether beam search stops computing a prompt whose answer is settled (not when a router couples it to its
    batch-mates); settled_beams may still hand a case it cannot reproduce to transformers' loop."""
    return beams > 1 and (prompts_per_call == 1 or not batch_coupled(model))


def batching_record(model: torch.nn.Module) -> str:
    return "as the test set orders them" if batch_coupled(model) else "longest prompts first"


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[str], settings: dict, device,
             prefill: PrefillCount | None = None) -> list[str]:
    """Decoded prompt + generation per prompt (left padding, KV cache, beam search or greedy). Each prompt's
    beams form one routing group: with per-group routing a batch generates what batch 1 generates. Beam search
    prefills one copy of each prompt (:mod:`lilyexp.recipes.prefill`; ``prefill`` counts how the prefills ran)
    and stops computing a prompt once its answer is settled (:mod:`lilyexp.recipes.settled_beams`)."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    beams = settings["num_beams"]
    settled = {"custom_generate": settled_beam_search} if drops_settled(model, beams, len(prompts)) else {}
    with routing_groups(model, beam_groups(len(prompts), beams, device)), prefill_once(model, beams) as count:
        output = model.generate(**encoded, max_new_tokens=settings["max_new_tokens"],
                                num_beams=settings["num_beams"], do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                **settled)
    if prefill is not None:
        prefill.once, prefill.per_beam = prefill.once + count.once, prefill.per_beam + count.per_beam
    return tokenizer.batch_decode(output, skip_special_tokens=True)


def answer_test_set(model, tokenizer, task, name: str, examples: list[dict], device, prefill: PrefillCount
                    ) -> tuple[dict, list[dict]]:
    """The task's score on one test set and one prediction line per example. Batches hold prompts of similar
    length (less padding, and a batch's beams tend to finish together) unless a router couples the batch: then
    the test set's own order is kept, as any batch-coupled run before."""
    decoded = map_batches(examples, task.generation["batch_size"], lambda chunk: generate(
        model, tokenizer, [task.prompt(e) for e in chunk], task.generation, device, prefill), desc=f"eval {name}",
        length=length_order(model, lambda example: len(task.prompt(example))))
    lines = []
    for index, (example, text) in enumerate(zip(examples, decoded)):
        response, prediction = task.extract(name, text)
        lines.append({"id": index, "eval_set": name, "generation": response, "prediction": prediction,
                      "answer": example["answer"], "correct": task.is_correct(prediction, example["answer"])})
    score = task.score(name, [line["prediction"] for line in lines], [line["answer"] for line in lines])
    return score, lines


def generation_accuracy(model: torch.nn.Module, tokenizer: Tokenizer, task: InstructionTask,
                        predictions_path: Path | None, device, prefill: PrefillCount | None = None) -> dict:
    """The task's score per test set and their mean; one JSON line per example goes to ``predictions_path``."""
    prefill = prefill if prefill is not None else PrefillCount()
    model.eval()
    tokenizer.padding_side = "left"
    warn_if_batch_coupled(model, task.generation["batch_size"], "the official evaluation at batch size 1")
    metrics, lines = {}, []
    for name, examples in task.eval_sets.items():
        score, answered = answer_test_set(model, tokenizer, task, name, examples, device, prefill)
        metrics.update(score)
        lines += answered
    metrics["test/accuracy/avg"] = sum(metrics.values()) / max(len(metrics), 1)
    if predictions_path is not None:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        predictions_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return metrics


def scoring_record(task: InstructionTask, model: torch.nn.Module, batch_size: int) -> dict:
    """How the test sets were scored, for the record."""
    record = {"scoring": task.scoring}
    if task.scoring != "generation":
        record["loglikelihood"] = {
            "protocol": "not the paper's: the option with the highest log-probability after the training prompt "
                        "and 'the correct answer is' (mc_accuracy: summed; mc_accuracy_norm: per byte)",
            "batch_size": batch_size, "routing": routing_record(model, "each option"),
            "batches": batching_record(model)}
    return record


@for_tasks(InstructionTask)
def run(inputs: RecipeInputs) -> Outcome:
    tokenizer, task, trainer = inputs.processor, inputs.task, inputs.trainer
    accelerator = make_accelerator(trainer)
    train_features = supervised(tokenize_for_training(tokenizer, task, e)
                                for e in tqdm(task.train, desc="tokenise", leave=False))
    val_features = supervised(tokenize_for_training(tokenizer, task, e) for e in task.validation)
    if not train_features:
        scale = getattr(task, "token_scale", 1)
        raise ConfigError(f"no training example keeps an answer token within task.cutoff_len="
                          f"{task.cutoff_len // scale}" + (f" ({task.cutoff_len} tokens of this backbone's tokenizer, "
                          f"{scale} per BPE token)" if scale != 1 else " tokens") + "; raise task.cutoff_len.")
    pad_id, eval_bs = tokenizer.pad_token_id, trainer.eval_batch_size or trainer.batch_size
    main = accelerator.is_main_process

    prefill = PrefillCount()

    def test(model: torch.nn.Module, tag: str) -> dict:
        path = inputs.run.work_dir / f"{tag}.jsonl" if main else None
        model, metrics = accelerator.unwrap_model(model), {}
        if task.scoring in ("generation", "both"):
            metrics.update(generation_accuracy(model, tokenizer, task, path, accelerator.device, prefill))
        if task.scoring in ("loglikelihood", "both"):
            metrics.update(loglikelihood_accuracy(model, tokenizer, task, eval_bs, accelerator.device))
        return metrics

    def validate(model: torch.nn.Module) -> dict:
        if not val_features:  # no held-out split: nothing to select on, the last weights are kept
            return {}
        return validation_loss(model, val_features, pad_id, eval_bs, accelerator.device)

    objective = Objective(
        plan_size=len(train_features), collate=lambda indices: left_pad([train_features[i] for i in indices], pad_id),
        compute_loss=language_model_loss, validate=validate, select_metric="val/loss", select_mode="min",
        before_training=lambda model: test(model, "predictions_initial"), chance_loss=math.log(len(tokenizer)))
    result = fit(inputs, objective, accelerator)
    chosen, rule = selected_evaluation(result, trainer, "val_selected")
    final = {**test(inputs.model, "predictions"), **{k: v for k, v in chosen.items() if k != "step"}}
    metrics = run_metrics(final=final, rule=rule, metric="val/loss", mode="min", best=chosen,
                          history=result.history, initial=result.initial)
    sizes = {"train": len(train_features), "train_dropped_no_labels": len(task.train) - len(train_features),
             "validation": len(val_features), "test": {k: len(v) for k, v in task.eval_sets.items()}}
    beams = task.generation["num_beams"]
    routing = routing_record(inputs.model, f"each prompt's {beams} beams" if beams > 1 else "each prompt")
    decoding = ("beam search, settled prompts leave the batch" if drops_settled(
        inputs.model, beams, task.generation["batch_size"]) else "transformers' beam search" if beams > 1 else "greedy")
    extra = {"generation": {**task.generation, "align_eval_prompt": task.align_eval_prompt, "routing": routing,
                            "prefill": prefill.mode, "batches": batching_record(inputs.model), "decoding": decoding},
             "evaluation": scoring_record(task, inputs.model, eval_bs),
             "data": sizes, **result.record_fields()}
    return Outcome(metrics, extra)
