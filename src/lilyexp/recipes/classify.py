"""Classification fine-tuning shared by GLUE (text, reproduction-notes §3.1) and VTAB-1K (images, §3.4-3.5): the
shared training core (AdamW with separate head and backbone learning rates, the trainer's schedule), evaluation
every ``task.eval_every_epochs`` epochs on the task's selection split, and, where the task has one, a single
final test of the selected model. Records keep every evaluation, the selected one (under the task's
``selection_key``: best epoch for GLUE, test-selected or val-selected for VTAB) and the last one.

The task supplies ``prepare`` (features of a split), ``collate`` (a batch), ``logits`` and ``score``; the loss
is cross-entropy, or MSE for a single regression output (STS-B), as transformers' heads compute it."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from lilyexp.recipes.core import Outcome, StepPlan, TrainerConfig, fit
from lilyexp.records import RunContext

SELECTION_TEXT = {
    "best_epoch": "best epoch on the validation split (paper); `last` is the last epoch",
    "test_selected": "best of the periodic test evaluations (selection on the test split, the paper's rule); "
                     "`last` is the last evaluation",
    "val_selected": "epoch selected on val200, then one test pass (honest); `last` is the last evaluation",
}


def classification_loss(task: Any, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    logits = task.logits(model, batch)
    if task.is_regression:
        return F.mse_loss(logits.squeeze(-1), batch["labels"].to(logits.dtype))
    return F.cross_entropy(logits, batch["labels"])


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, processor: Any, task: Any, features: list, batch_size: int, device,
                   prefix: str | None = None) -> dict:
    model.eval()
    predictions, references = [], []
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in task.collate(processor, features[start:start + batch_size]).items()}
        logits = task.logits(model, batch)
        predictions += (logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).tolist()
        references += batch["labels"].tolist()
    return task.score(predictions, references, prefix) if prefix else task.score(predictions, references)


def with_epoch_evaluation(trainer: TrainerConfig, task: Any, train_size: int, world: int) -> TrainerConfig:
    """Evaluate every ``task.eval_every_epochs`` epochs unless the trainer names a step interval."""
    if trainer.eval_every is not None:
        return trainer
    epoch = StepPlan(train_size, trainer.batch_size, trainer.grad_accum, 0, world, 0, trainer.drop_last).steps_per_epoch
    return dataclasses.replace(trainer, eval_every=epoch * task.eval_every_epochs)


def run(*, model: torch.nn.Module, processor: Any, task: Any, trainer: TrainerConfig, run: RunContext,
        logger: Any, seed: int, head_modules: list[str]) -> Outcome:
    accelerator = Accelerator(mixed_precision=trainer.mixed_precision)
    train = task.prepare(processor, task.train)
    selection = task.prepare(processor, task.validation)
    eval_bs = task.eval_batch_size or trainer.eval_batch_size or trainer.batch_size
    trainer = with_epoch_evaluation(trainer, task, len(train), accelerator.num_processes)

    def validate(model: torch.nn.Module) -> dict:
        return evaluate_split(model, processor, task, selection, eval_bs, accelerator.device)

    result = fit(model, plan_size=len(train),
                 collate=lambda indices: task.collate(processor, [train[i] for i in indices]),
                 compute_loss=lambda m, batch: classification_loss(task, m, batch), validate=validate,
                 select_metric=task.main_metric, select_mode="max", trainer=trainer, run=run, logger=logger,
                 seed=seed, head_modules=head_modules, accelerator=accelerator)
    selected = {k: v for k, v in result.best.items() if k != "step"}
    if task.final is not None:  # the selected weights (fit restored them), tested once
        final_features = task.prepare(processor, task.final)
        selected.update(evaluate_split(accelerator.unwrap_model(model), processor, task, final_features, eval_bs,
                                       accelerator.device, prefix="test"))
    last = {k: v for k, v in result.history[-1].items() if k != "step"} if result.history else {}
    metrics = {"final": selected, "best": result.best, "last": last, "history": result.history,
               task.selection_key: selected, "selection": SELECTION_TEXT[task.selection_key]}
    extra = {"data": {"train": len(train), "selection": len(selection),
                      "final": None if task.final is None else len(task.final)},
             "steps": result.steps, "resumed_from_step": result.resumed_from, "main_metric": task.main_metric,
             "splits": task.splits}
    return Outcome(metrics, extra)
