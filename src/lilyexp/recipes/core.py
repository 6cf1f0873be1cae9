"""What every paradigm's training loop shares: the trainer settings, what a recipe receives and returns, a
deterministic step plan (so a resumed run sees exactly the batches an uninterrupted one would), the optimizer
(separate head and backbone learning rates) and the schedules. The loop itself is :mod:`lilyexp.recipes.loop`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
from transformers import SchedulerType, get_scheduler

from lilyexp.errors import ConfigError
from lilyexp.params import in_head
from lilyexp.records import RunContext
from lilyexp.settings import bookkeeping, knob

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

    from lilyexp.backbones.sdxl import SDXLParts
    from lilyexp.contracts import AnyTask, Logger

SCHEDULERS = tuple(kind.value for kind in SchedulerType) + ("timm_cosine_epochs",)


@dataclass
class TrainerConfig:
    """Settings of one training run; every field is a Hydra override (``trainer.<name>=...``)."""

    epochs: int = knob(1)
    max_steps: Optional[int] = knob(None, help="optimizer steps; overrides epochs when set")
    batch_size: int = knob(8, help="micro-batch per process")
    grad_accum: int = knob(1)
    eval_batch_size: Optional[int] = knob(None)
    drop_last: bool = knob(False)
    lr: float = knob(3e-4)
    head_lr: Optional[float] = knob(None, help="learning rate of the task head (backbone.head_modules); None = lr")
    weight_decay: float = knob(0.0)
    weight_decay_1d: bool = knob(True, help="decay biases and other 1-D tensors too (false: timm's exemption)")
    scheduler: str = knob("linear", choices=SCHEDULERS,
                          help="a transformers.get_scheduler name, or timm_cosine_epochs (the VTAB code's)")
    warmup_steps: int = knob(0)
    warmup_ratio: float = knob(0.0)
    max_grad_norm: Optional[float] = knob(1.0)
    mixed_precision: str = knob("no", choices=("no", "fp16", "bf16"))
    eval_every: Optional[int] = knob(None, help="optimizer steps between validations; None = every epoch")
    select: str = knob("best", choices=("best", "last"),
                       help="best: restore the best validation checkpoint before testing; last: keep the last")
    eval_before_training: bool = knob(False, help="also test the untuned model (metrics.initial)")
    eval_at_end: bool = knob(True, help="also validate after the last step when it is not an eval_every step "
                                        "(false: the HF Trainer's schedule, which the official commonsense runs used)")
    gradient_checkpointing: bool = knob(False, help="the backbone library's own activation checkpointing")
    tf32: Optional[bool] = knob(None, help="TF32 matmuls and convolutions on GPUs; None: PyTorch's defaults "
                                           "(matmul off, cuDNN on), as the official scripts ran")
    deterministic: bool = knob(False, help="deterministic GPU kernels (slower), so a resumed run equals an "
                                           "uninterrupted one exactly")
    checkpoint_every: int = bookkeeping(100)
    resume: bool = bookkeeping(False)
    log_every: int = bookkeeping(1)
    callbacks: list = bookkeeping([])  # objects with on_step_end(loop, step) (``_target_`` nodes), e.g. captures
    keep_checkpoint: bool = bookkeeping(False)  # keep the resume checkpoint (optimizer state) after a finished run

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "checkpoint_every": self.checkpoint_every, "log_every": self.log_every}
        positive.update({k: v for k, v in {"eval_every": self.eval_every,
                                           "eval_batch_size": self.eval_batch_size}.items() if v is not None})
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"trainer.max_steps must be 0 (evaluate a saved adapter) or positive, got "
                              f"{self.max_steps}.")
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"trainer.{name} must be positive, got {value}.")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ConfigError(f"learning rates must be positive, got lr={self.lr}, head_lr={self.head_lr}.")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            raise ConfigError("trainer.warmup_ratio must be in [0, 1) and trainer.warmup_steps non-negative.")


@dataclass
class StepPlan:
    """Which examples each optimizer step uses: a seeded permutation per epoch, cut into micro-batches of
    ``batch_size × world`` examples, grouped ``grad_accum`` at a time (the last group of an epoch may be short)."""

    num_examples: int
    batch_size: int
    grad_accum: int
    seed: int
    world: int = 1
    rank: int = 0
    drop_last: bool = False

    def __post_init__(self) -> None:
        per_micro = self.batch_size * self.world
        micro = self.num_examples // per_micro if self.drop_last else math.ceil(self.num_examples / per_micro)
        if micro == 0:
            raise ConfigError(f"{self.num_examples} training examples cannot fill one batch of {per_micro}.")
        if self.num_examples < self.world:
            raise ConfigError(f"{self.num_examples} training examples cannot give each of {self.world} processes one.")
        self.micro_per_epoch = micro
        self.steps_per_epoch = math.ceil(micro / self.grad_accum)

    def group(self, step: int) -> list[list[int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        per_micro = self.batch_size * self.world
        first = within * self.grad_accum
        last = min(first + self.grad_accum, self.micro_per_epoch)
        groups = []
        for micro in range(first, last):
            chunk = order[micro * per_micro:(micro + 1) * per_micro].tolist()
            groups.append(self.padded(chunk, order)[self.rank::self.world])
        return groups

    def padded(self, chunk: list[int], order: torch.Tensor) -> list[int]:
        """An epoch's short last micro-batch, filled up to a multiple of the process count with the epoch's first
        examples (as torch's DistributedSampler pads): no process gets an empty batch (which would crash it and
        hang the others in the gradient all-reduce), and all hold equally many, so the mean of their mean losses
        is the batch's mean. One process never pads."""
        missing = -len(chunk) % self.world
        return chunk + order[:missing].tolist()


@dataclass
class RecipeInputs:
    """What the runner hands a recipe (``recipe(inputs) -> Outcome``)."""

    model: torch.nn.Module
    processor: Tokenizer | SDXLParts | None  # None where the task builds its own transform (VTAB)
    task: AnyTask  # a protocol per paradigm: lilyexp.contracts
    trainer: TrainerConfig
    run: RunContext
    logger: Logger
    seed: int
    head_modules: list[str]


@dataclass
class Objective:
    """What a paradigm trains and selects on: the examples (by index), the loss, and the validation that picks
    the checkpoint (``select_metric``, higher or lower is better by ``select_mode``)."""

    plan_size: int
    collate: Callable[[list[int]], dict]
    compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    validate: Callable[[torch.nn.Module], dict]
    select_metric: str
    select_mode: str
    before_training: Callable[[torch.nn.Module], dict] | None = None  # tests the untuned model
    chance_loss: float | None = None  # the loss of a uniform prediction, ln(classes or vocabulary): collapse watch


@dataclass
class Outcome:
    """What a recipe returns: the record's ``metrics`` (built by ``records.run_metrics``) and extra top-level
    record keys."""

    metrics: dict
    extra: dict


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    initial: dict | None = None
    steps: int = 0
    resumed_from: int | None = None
    step_seconds: list[float] = field(default_factory=list)  # each optimizer step's wall time, evaluation excluded
    batch: dict = field(default_factory=dict)  # processes x micro-batch x accumulation: what batch-pooled routing saw
    precision: dict = field(default_factory=dict)  # the precision asked for and what ran (lilyexp.recipes.devices)

    def record_fields(self) -> dict:
        """What every paradigm's record says of its training: steps, resume point, timing, batch layout, precision."""
        return {"steps": self.steps, "resumed_from_step": self.resumed_from, "timing": self.timing(),
                "batch": self.batch, "precision": self.precision}

    def timing(self) -> dict:
        """The record's training-time figures: time per optimizer step (median; evaluation excluded) and their sum."""
        if not self.step_seconds:
            return {}
        ordered = sorted(self.step_seconds)
        return {"step_s": ordered[len(ordered) // 2], "train_s": sum(self.step_seconds),
                "timed_steps": len(ordered)}


def selected_evaluation(result: FitResult, trainer: TrainerConfig, rule: str) -> tuple[dict, str]:
    """The evaluation of the weights the loop kept, and the record's selection rule: the best evaluation under
    the task's ``rule``, or the last one (``trainer.select=last``)."""
    if trainer.select == "best" and result.best and trainer.max_steps != 0:
        return result.best, rule
    return (result.history[-1] if result.history else {}), "last"


# timm's CosineLRScheduler as the official VTAB code configures it (visual-adaptation-benchmark/vit/main.py).
TIMM_LR_MIN, TIMM_WARMUP_LR_INIT = 1e-5, 1e-6


def timm_cosine_epoch_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int) -> float:
    """The learning rate of a (0-based) epoch under timm ``CosineLRScheduler(t_initial=epochs, warmup_t,
    lr_min=1e-5, warmup_lr_init=1e-6)`` stepped with ``scheduler.step(ep)`` after each epoch: epochs 0 and 1 both
    run at lr(t=0), epoch k >= 1 at lr(t=k-1); the cosine counts from t=0 (warmup_prefix False)."""
    t = max(epoch - 1, 0)
    if t < warmup_epochs:
        return TIMM_WARMUP_LR_INIT + t * (base_lr - TIMM_WARMUP_LR_INIT) / warmup_epochs
    return TIMM_LR_MIN + 0.5 * (base_lr - TIMM_LR_MIN) * (1 + math.cos(math.pi * t / epochs))


def build_scheduler(optimizer: torch.optim.Optimizer, trainer: TrainerConfig, warmup_steps: int, total: int,
                    steps_per_epoch: int):
    if trainer.scheduler != "timm_cosine_epochs":
        return get_scheduler(trainer.scheduler, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total)
    epochs = math.ceil(total / steps_per_epoch)
    warmup_epochs = round(trainer.warmup_ratio * epochs)
    factors = []
    for group in optimizer.param_groups:  # the head may run at its own learning rate
        base = group["lr"]
        factors.append(lambda step, base=base: timm_cosine_epoch_lr(step // steps_per_epoch, base, epochs,
                                                                    warmup_epochs) / base)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def build_optimizer(model: torch.nn.Module, trainer: TrainerConfig, head_modules: list[str]) -> torch.optim.Optimizer:
    """AdamW with the head at ``head_lr`` and the rest at ``lr``; with ``weight_decay_1d=false`` biases and other
    1-D tensors are not decayed (timm's optimizer factory, which the official Vim run used)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = not trainer.weight_decay_1d and (param.ndim <= 1 or name.endswith(".bias"))
            groups.setdefault((in_head(name, head_modules), exempt), []).append(param)
    if not groups:
        raise ConfigError("the method left no trainable parameter.")
    return torch.optim.AdamW([{"params": params, "lr": (trainer.head_lr or trainer.lr) if head else trainer.lr,
                               "weight_decay": 0.0 if exempt else trainer.weight_decay}
                              for (head, exempt), params in sorted(groups.items())])
