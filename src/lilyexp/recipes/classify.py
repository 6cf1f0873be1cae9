"""Classification fine-tuning shared by GLUE (text; the official natural-language-understanding code) and VTAB-1K
(images; the official visual-adaptation-benchmark code): the shared training loop (AdamW with separate head and
backbone learning rates, the trainer's schedule), evaluation every ``task.eval_every_epochs`` epochs on the task's
selection split, and, where the task has one, a single final test of the selected model. The record's selection
rule is the task's: the best epoch for GLUE, test-selected or val-selected for VTAB. Evaluation batches give every
example its own routing group: a method whose router pools over the batch (Lily) keeps the official coupling unless
it is set to route per sample (Lily ``eval_pooling: sample``); the record states which ran.

The task supplies ``prepare`` (features of a split), ``collate`` (a batch), ``logits`` and ``score``
(:class:`lilyexp.contracts.ClassificationTask`); the loss is cross-entropy, or MSE for a single regression output
(STS-B), as transformers' heads compute it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from lilyexp.contracts import ClassificationTask, for_tasks
from lilyexp.methods.routing import routing_groups, routing_record, row_groups
from lilyexp.recipes.core import Objective, Outcome, RecipeInputs, StepPlan, TrainerConfig, selected_evaluation
from lilyexp.recipes.devices import make_accelerator
from lilyexp.recipes.loop import fit
from lilyexp.recipes.sharding import map_batches
from lilyexp.records import run_metrics


def classification_loss(task: ClassificationTask, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    logits = task.logits(model, batch)
    if task.is_regression:
        return F.mse_loss(logits.squeeze(-1), batch["labels"].to(logits.dtype))
    return F.cross_entropy(logits, batch["labels"])


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, processor: Any, task: ClassificationTask, features: list, batch_size: int,
                   device, split: str) -> dict:
    model.eval()

    def predict(chunk: list) -> list[tuple]:
        batch = {k: v.to(device) for k, v in task.collate(processor, chunk).items()}
        with routing_groups(model, row_groups(len(batch["labels"]), device)):
            logits = task.logits(model, batch)
        predicted = (logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).tolist()
        return list(zip(predicted, batch["labels"].tolist()))

    pairs = map_batches(features, batch_size, predict, desc=f"eval {split}")
    return task.score(split, [p for p, _ in pairs], [r for _, r in pairs])


def with_epoch_evaluation(trainer: TrainerConfig, task: ClassificationTask, train_size: int,
                          world: int) -> TrainerConfig:
    """Evaluate every ``task.eval_every_epochs`` epochs unless the trainer names a step interval."""
    if trainer.eval_every is not None:
        return trainer
    epoch = StepPlan(train_size, trainer.batch_size, trainer.grad_accum, 0, world, 0, trainer.drop_last).steps_per_epoch
    return dataclasses.replace(trainer, eval_every=epoch * task.eval_every_epochs)


@for_tasks(ClassificationTask)
def run(inputs: RecipeInputs) -> Outcome:
    task, processor = inputs.task, inputs.processor
    accelerator = make_accelerator(inputs.trainer)
    train = task.prepare(processor, task.train)
    selection = task.prepare(processor, task.validation)
    eval_bs = task.eval_batch_size or inputs.trainer.eval_batch_size or inputs.trainer.batch_size
    inputs = dataclasses.replace(inputs, trainer=with_epoch_evaluation(inputs.trainer, task, len(train),
                                                                        accelerator.num_processes))

    def evaluate(model: torch.nn.Module, features: list, split: str) -> dict:
        return evaluate_split(model, processor, task, features, eval_bs, accelerator.device, split)

    objective = Objective(
        plan_size=len(train), collate=lambda indices: task.collate(processor, [train[i] for i in indices]),
        compute_loss=lambda model, batch: classification_loss(task, model, batch),
        validate=lambda model: evaluate(model, selection, task.selection_split),
        select_metric=task.main_metric, select_mode="max",
        chance_loss=None if task.is_regression else math.log(task.num_classes))
    result = fit(inputs, objective, accelerator)
    chosen, rule = selected_evaluation(result, inputs.trainer, task.selection_rule)
    final = {k: v for k, v in chosen.items() if k != "step"}
    if task.final is not None:  # the selected weights (fit restored them), tested once
        final.update(evaluate(accelerator.unwrap_model(inputs.model), task.prepare(processor, task.final), "test"))
    metrics = run_metrics(final=final, rule=rule, metric=task.main_metric, mode="max", best=chosen,
                          history=result.history)
    extra = {"data": {"train": len(train), "selection": len(selection),
                      "final": None if task.final is None else len(task.final)},
             **result.record_fields(), "splits": task.splits,
             "evaluation": {"batch_size": eval_bs, "routing": routing_record(inputs.model, "each example")}}
    return Outcome(metrics, extra)
