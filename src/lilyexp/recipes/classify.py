"""Sequence classification (GLUE, reproduction-notes §3.1): single-sentence and sentence-pair tokenisation up to
``task.max_length``, dynamic padding, the shared training core (AdamW with separate head and backbone learning
rates, the trainer's schedule), validation after every epoch. Records keep every epoch's metrics, the best epoch
(what the paper reports) and the last one."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from lilyexp.recipes.core import Outcome, TrainerConfig, fit
from lilyexp.records import RunContext


def tokenize(tokenizer: Any, task: Any, example: dict) -> dict:
    encoded = tokenizer(example["text_a"], example["text_b"], truncation=True, max_length=task.max_length)
    return {**encoded, "labels": example["label"]}


def collate(tokenizer: Any, features: list[dict], regression: bool) -> dict[str, torch.Tensor]:
    labels = torch.tensor([f["labels"] for f in features], dtype=torch.float if regression else torch.long)
    batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt")
    return {**batch, "labels": labels}


def classification_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss  # cross-entropy, or MSE for a single regression output (STS-B)


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, tokenizer: Any, task: Any, features: list[dict], batch_size: int,
                   device) -> dict:
    model.eval()
    predictions, references = [], []
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(tokenizer, features[start:start + batch_size],
                                                     task.is_regression).items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        predictions += (logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).tolist()
        references += batch["labels"].tolist()
    return task.score(predictions, references)


def run(*, model: torch.nn.Module, processor: Any, task: Any, trainer: TrainerConfig, run: RunContext,
        logger: Any, seed: int, head_modules: list[str]) -> Outcome:
    tokenizer = processor
    accelerator = Accelerator(mixed_precision=trainer.mixed_precision)
    train_features = [tokenize(tokenizer, task, e) for e in task.train]
    val_features = [tokenize(tokenizer, task, e) for e in task.validation]
    eval_bs = trainer.eval_batch_size or trainer.batch_size  # the official GLUE code evaluates at the train batch size

    def validate(model: torch.nn.Module) -> dict:
        return evaluate_split(model, tokenizer, task, val_features, eval_bs, accelerator.device)

    result = fit(model, plan_size=len(train_features),
                 collate=lambda indices: collate(tokenizer, [train_features[i] for i in indices], task.is_regression),
                 compute_loss=classification_loss, validate=validate, select_metric=task.main_metric,
                 select_mode="max", trainer=trainer, run=run, logger=logger, seed=seed, head_modules=head_modules,
                 accelerator=accelerator)
    last = {k: v for k, v in result.history[-1].items() if k != "step"} if result.history else {}
    metrics = {"final": {k: v for k, v in result.best.items() if k != "step"}, "best": result.best, "last": last,
               "history": result.history, "selection": "best epoch on the validation split (paper); `last` is the "
                                                       "last epoch"}
    extra = {"data": {"train": len(train_features), "validation": len(val_features)}, "steps": result.steps,
             "resumed_from_step": result.resumed_from, "main_metric": task.main_metric}
    return Outcome(metrics, extra)
