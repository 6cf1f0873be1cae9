"""Causal-LM supervised fine-tuning with generation-based evaluation (the commonsense paradigm, notes §3.2-3.3):
LLM-Adapters tokenisation (cutoff, EOS appended, loss on the whole prompt unless ``train_on_inputs=False``),
left padding to a multiple of 8, validation loss for checkpoint selection, then batched generation with a KV
cache and per-set answer extraction. The record states the generation settings that ran."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from lilyexp.errors import ConfigError
from lilyexp.recipes.core import Outcome, TrainerConfig, fit
from lilyexp.records import RunContext
from lilyexp.tasks.commonsense import train_prompt, train_text

IGNORE_INDEX = -100


def tokenize_for_training(tokenizer: Any, task: Any, example: dict) -> dict[str, list[int]]:
    ids = tokenizer(train_text(example), truncation=True, max_length=task.cutoff_len)["input_ids"]
    if ids[-1] != tokenizer.eos_token_id and len(ids) < task.cutoff_len:
        ids = ids + [tokenizer.eos_token_id]
    labels = list(ids)
    if not task.train_on_inputs:
        prompt_len = len(tokenizer(train_prompt(example), truncation=True, max_length=task.cutoff_len)["input_ids"])
        labels[:prompt_len] = [IGNORE_INDEX] * prompt_len
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
    total, count = 0.0, 0
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size]
        batch = {k: v.to(device) for k, v in left_pad(chunk, pad_id).items()}
        total += language_model_loss(model, batch).float().item() * len(chunk)
        count += len(chunk)
    return {"val/loss": total / max(count, 1)}


@torch.no_grad()
def generation_accuracy(model: torch.nn.Module, tokenizer: Any, task: Any, predictions_path: Path | None,
                        device) -> dict:
    """Accuracy per test set and their mean; one JSON line per example goes to ``predictions_path``."""
    model.eval()
    settings = task.generation
    tokenizer.padding_side = "left"
    lines, metrics = [], {}
    for name, examples in task.eval_sets.items():
        correct = 0
        for start in tqdm(range(0, len(examples), settings["batch_size"]), desc=f"eval {name}", leave=False):
            chunk = examples[start:start + settings["batch_size"]]
            encoded = tokenizer([task.prompt(e) for e in chunk], return_tensors="pt", padding=True).to(device)
            output = model.generate(**encoded, max_new_tokens=settings["max_new_tokens"],
                                    num_beams=settings["num_beams"], do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            for offset, (example, decoded) in enumerate(zip(chunk, tokenizer.batch_decode(output, skip_special_tokens=True))):
                response, prediction, ok = task.score(name, decoded, example["answer"])
                correct += ok
                lines.append({"id": start + offset, "eval_set": name, "generation": response,
                              "prediction": prediction, "answer": example["answer"], "correct": ok})
        metrics[f"test/accuracy/{name}"] = correct / max(len(examples), 1)
    metrics["test/accuracy/avg"] = sum(metrics.values()) / max(len(metrics), 1)
    if predictions_path is not None:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        predictions_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return metrics


def run(*, model: torch.nn.Module, processor: Any, task: Any, trainer: TrainerConfig, run: RunContext,
        logger: Any, seed: int, head_modules: list[str]) -> Outcome:
    tokenizer = processor
    accelerator = Accelerator(mixed_precision=trainer.mixed_precision)
    train_features = supervised(tokenize_for_training(tokenizer, task, e) for e in task.train)
    val_features = supervised(tokenize_for_training(tokenizer, task, e) for e in task.validation)
    if not train_features:
        raise ConfigError(f"no training example keeps an answer token within task cutoff_len={task.cutoff_len}.")
    pad_id, eval_bs = tokenizer.pad_token_id, trainer.eval_batch_size or trainer.batch_size
    main = accelerator.is_main_process

    def test(model: torch.nn.Module, tag: str) -> dict:
        path = run.work_dir / f"{tag}.jsonl" if main else None
        return generation_accuracy(accelerator.unwrap_model(model), tokenizer, task, path, accelerator.device)

    def validate(model: torch.nn.Module) -> dict:
        if not val_features:  # no held-out split: nothing to select on, the last weights are kept
            return {}
        return validation_loss(model, val_features, pad_id, eval_bs, accelerator.device)

    result = fit(
        model, plan_size=len(train_features),
        collate=lambda indices: left_pad([train_features[i] for i in indices], pad_id),
        compute_loss=language_model_loss, validate=validate,
        select_metric="val/loss", select_mode="min", trainer=trainer, run=run, logger=logger, seed=seed,
        head_modules=head_modules, before_training=lambda m: test(m, "predictions_initial"), accelerator=accelerator)
    final = {**test(model, "predictions"), **{k: v for k, v in result.best.items() if k != "step"}}
    if trainer.select == "last" and result.history:
        final.update({k: v for k, v in result.history[-1].items() if k != "step"})
    metrics = {"final": final, "best": result.best, "history": result.history, "selection": trainer.select}
    if result.initial is not None:
        metrics["initial"] = result.initial
    sizes = {"train": len(train_features), "train_dropped_no_labels": len(task.train) - len(train_features),
             "validation": len(val_features), "test": {k: len(v) for k, v in task.eval_sets.items()}}
    extra = {"generation": {**task.generation, "align_eval_prompt": task.align_eval_prompt}, "data": sizes,
             "steps": result.steps, "resumed_from_step": result.resumed_from}
    return Outcome(metrics, extra)
