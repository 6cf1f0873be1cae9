"""What the parts of a run promise each other, as typed protocols: a method (what ``method.adapter`` builds), a
task per training paradigm (what ``task.load`` builds), and a recipe (``task.recipe``: one training loop per
paradigm). The runner composes them and never asks which backbone, task or method it runs; a new task or method
is one module satisfying these plus one yaml.

Every task scores with one signature, ``score(split, predictions, references) -> {"<split>/<metric>": value}``
(for generation tasks the split is the test set's name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from lilyexp.recipes.core import Outcome, RecipeInputs


@runtime_checkable
class Method(Protocol):
    """Adapts a backbone (``apply``), reports what it built (``summary``: a list of dicts, or None), and saves /
    loads what it trained."""

    def apply(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def summary(self, model: torch.nn.Module) -> list[dict] | None: ...

    def save(self, model: torch.nn.Module, directory: str | Path) -> None: ...

    def load(self, model: torch.nn.Module, directory: str | Path) -> torch.nn.Module: ...


@runtime_checkable
class Task(Protocol):
    """What every task gives the runner: keyword arguments for the backbone loader (e.g. ``num_labels``) and
    its scoring."""

    model_kwargs: dict[str, Any]

    def score(self, split: str, predictions: list, references: list) -> dict[str, float]: ...


@runtime_checkable
class ClassificationTask(Task, Protocol):
    """For recipes.classify: training / selection / final-test examples, how a batch is built and read out, how
    often to evaluate, and which selection rule the record states (lilyexp.records.SELECTION_RULES)."""

    train: list
    validation: list
    final: list | None
    splits: dict[str, str | None]
    selection_rule: str
    selection_split: str  # the metric prefix of the selection split: "val" or "test"
    eval_every_epochs: int
    eval_batch_size: int | None
    is_regression: bool
    num_classes: int  # 1 for a regression head
    main_metric: str

    def prepare(self, processor: Any, examples: list) -> list: ...

    def collate(self, processor: Any, features: list) -> dict[str, torch.Tensor]: ...

    def logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor: ...


@runtime_checkable
class InstructionTask(Task, Protocol):
    """For recipes.causal_lm: training texts (and the prompt part the loss may skip), the held-out validation
    examples, named test sets, the evaluation prompt, answer extraction and generation settings."""

    train: list[dict]
    validation: list[dict]
    eval_sets: dict[str, list[dict]]
    cutoff_len: int
    train_on_inputs: bool
    align_eval_prompt: bool
    generation: dict
    scoring: str  # generation | loglikelihood | both

    def train_text(self, example: dict) -> str: ...

    def train_prompt(self, example: dict) -> str: ...

    def prompt(self, example: dict) -> str: ...

    def extract(self, split: str, decoded: str) -> tuple[str, str]: ...

    def is_correct(self, prediction: str, answer: str) -> bool: ...

    def choices(self, split: str, example: dict) -> tuple[str, list[str], int]: ...


class Recipe(Protocol):
    """One training loop per paradigm: trains ``inputs.model`` on ``inputs.task`` and returns the record's
    metrics (built with ``lilyexp.records.run_metrics``) and extra keys."""

    def __call__(self, inputs: RecipeInputs) -> Outcome: ...
