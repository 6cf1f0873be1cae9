"""What the parts of a run promise each other, as runtime-checkable protocols: a method (what ``method.adapter``
builds), a task per training paradigm (what ``task.load`` builds), a recipe (``task.recipe``: one training loop
per paradigm) and a logger (``logger``). The runner composes them and never asks which backbone, task or method it
runs; a new task or method is one module satisfying these plus one yaml. ``tests/test_contracts.py`` builds every
method, task and recipe of the config tree and checks it against its protocol.

Every task scores with one signature, ``score(split, predictions, references) -> {"<split>/<metric>": value}``
(for generation tasks the split is the test set's name), and may state its ``scoring_version`` (a class attribute;
1 where a task states none): how it scores, as lm-eval-harness versions its tasks. A change to a task's scoring
bumps it; records scored under an older version are read as ``outdated``, not finished, so their cells run again
(:func:`lilyexp.records.upgrade`). Every task of lilyexp states it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar, runtime_checkable

import torch

from lilyexp.errors import ConfigError

if TYPE_CHECKING:  # the recipes' own types; this module sits below every package that uses it
    from lilyexp.recipes.core import Outcome, RecipeInputs


@runtime_checkable
class Method(Protocol):
    """Adapts a backbone. ``check`` refuses an impossible setting on the weightless skeleton before weights load;
    ``apply`` adapts (and freezes) the loaded model; ``summary`` describes what it built (a list of dicts, or
    None); ``export`` writes the trained adapter (peft's layout where peft has one) with the method's settings
    (``node``); ``load`` puts an export back on a fresh backbone (:func:`lilyexp.load_adapter`)."""

    def check(self, skeleton: torch.nn.Module) -> None: ...

    def apply(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def summary(self, model: torch.nn.Module) -> list[dict] | None: ...

    def export(self, model: torch.nn.Module, directory: str | Path, node: dict) -> None: ...

    def load(self, model: torch.nn.Module, directory: str | Path) -> torch.nn.Module: ...


@runtime_checkable
class Task(Protocol):
    """What every task gives the runner: keyword arguments for the backbone loader (e.g. ``num_labels``) and its
    scoring (``scoring_version``, optional, says which version of it)."""

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
    examples, named test sets, the evaluation prompt and generation settings; and what its ``scoring`` needs
    besides (:data:`SCORING_NEEDS`)."""

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


@runtime_checkable
class GeneratedAnswers(Protocol):
    """An instruction task scored by generation: the answer extracted from a decoded generation, and whether it
    is right."""

    def extract(self, split: str, decoded: str) -> tuple[str, str]: ...

    def is_correct(self, prediction: str, answer: str) -> bool: ...


@runtime_checkable
class AnswerChoices(Protocol):
    """An instruction task scored by log-likelihood: each question's context, its options and the right one."""

    def choices(self, split: str, example: dict) -> tuple[str, list[str], int]: ...


SCORING_NEEDS = {"generation": (GeneratedAnswers,), "loglikelihood": (AnswerChoices,),
                 "both": (GeneratedAnswers, AnswerChoices)}


@runtime_checkable
class DiffusionTask(Task, Protocol):
    """For recipes.diffusion: the instance images and prompt to train on (``instance``: its ``prompt``,
    ``pixel_values`` and SDXL ``time_id_inputs``), the prompts to sample, the real photos the metrics compare
    against, the resolution, the sampling settings, and ``evaluate`` (``score`` plus per-prompt values)."""

    instance: Any  # lilyexp.tasks.dreambooth.InstanceData
    prompts: list[str]
    real_images: list
    resolution: int
    sampling: Any  # lilyexp.tasks.dreambooth.SamplingSettings

    def evaluate(self, split: str, predictions: list, references: list) -> tuple[dict[str, float], list[dict]]: ...


AnyTask = ClassificationTask | InstructionTask | DiffusionTask
F = TypeVar("F", bound=Callable)


@runtime_checkable
class Recipe(Protocol):
    """One training loop per paradigm: trains ``inputs.model`` on ``inputs.task`` and returns the record's
    metrics (built with ``lilyexp.records.run_metrics``) and extra keys."""

    def __call__(self, inputs: RecipeInputs) -> Outcome: ...


@runtime_checkable
class Logger(Protocol):
    """Where a run's metrics stream (wandb, an accelerate tracker, or nowhere): one run per cell."""

    def start(self, run_name: str, config: dict, run_id: str | None = None) -> None: ...

    def log_metrics(self, metrics: dict, step: int) -> None: ...

    def finish(self, summary: dict, failed: bool = False) -> None: ...


def members(protocol: type) -> list[str]:
    """The attributes and methods a protocol asks for (its own and its bases'), in declaration order."""
    names: list[str] = []
    for base in reversed(protocol.__mro__):
        if base is Protocol or base is object or not getattr(base, "_is_protocol", False):
            continue
        declared = [*getattr(base, "__annotations__", {}),
                    *(name for name, value in vars(base).items() if callable(value) and not name.startswith("_"))]
        names += [name for name in declared if name not in names]
    return names + (["__call__"] if "__call__" in vars(protocol) else [])


def missing(obj: object, protocol: type) -> list[str]:
    """What ``obj`` lacks of ``protocol`` (empty when it satisfies it)."""
    return [name for name in members(protocol) if not hasattr(obj, name)]


def for_tasks(protocol: type) -> Callable[[F], F]:
    """Marks a recipe with the task protocol it trains on (``task_protocol``), so a task paired with the wrong
    recipe is refused before any model loads."""
    def mark(recipe: F) -> F:
        recipe.task_protocol = protocol
        return recipe
    return mark


def task_protocol(recipe: Callable) -> type:
    """The task protocol a recipe (or a ``functools.partial`` of one, as ``_partial_: true`` builds) declares;
    :class:`Task` when it declares none."""
    return getattr(getattr(recipe, "func", recipe), "task_protocol", Task)


def check_parts(method: object, task: object, recipe: object) -> None:
    """Refuse, in one sentence, a method, task or recipe that does not keep its contract: e.g. a new method class
    without ``export``, or a VTAB task under the causal-LM recipe."""
    required = task_protocol(recipe) if callable(recipe) else Task
    needs = SCORING_NEEDS.get(getattr(task, "scoring", None), ()) if required is InstructionTask else ()
    for node, obj, protocol in (("method.adapter", method, Method), ("task.load", task, required),
                                *(("task.load", task, need) for need in needs), ("task.recipe", recipe, Recipe)):
        lacking = missing(obj, protocol)
        if lacking:
            raise ConfigError(f"{node} built a {type(obj).__name__}, which lacks {', '.join(lacking)} of "
                              f"lilyexp.contracts.{protocol.__name__} (what the runner and the task's recipe use).")
