"""The shared training core every paradigm's loop uses: trainer settings, a deterministic step plan (so a
resumed run sees exactly the batches an uninterrupted one would), checkpoint/resume, NaN stop, model
selection on a validation metric, per-step JSONL, built on ``accelerate``."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler

from lilyexp.errors import ConfigError, TrainingDiverged
from lilyexp.records import RunContext, in_head


@dataclass
class TrainerConfig:
    """Settings of one training run; every field is a Hydra override (``trainer.<name>=...``)."""

    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 8  # micro-batch per process
    grad_accum: int = 1
    eval_batch_size: int | None = None
    drop_last: bool = False
    lr: float = 3e-4
    head_lr: float | None = None  # learning rate of the task head (backbone.head_modules); None = lr
    weight_decay: float = 0.0
    scheduler: str = "linear"  # any transformers.get_scheduler name, or timm_cosine_epochs (the VTAB code's)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    eval_every: int | None = None  # optimizer steps between validations; None = end of every epoch
    select: str = "best"  # best: restore the best validation checkpoint before testing; last: keep the last
    eval_before_training: bool = False  # also test the untuned model (metrics.initial)
    checkpoint_every: int = 100
    resume: bool = False
    log_every: int = 1
    gradient_checkpointing: bool = False
    kill_at_step: int | None = None  # testing aid: SIGKILL this process right after that step (a crash)

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "checkpoint_every": self.checkpoint_every, "log_every": self.log_every}
        positive.update({k: v for k, v in {"max_steps": self.max_steps, "eval_every": self.eval_every,
                                           "eval_batch_size": self.eval_batch_size}.items() if v is not None})
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"trainer.{name} must be positive, got {value}.")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ConfigError(f"learning rates must be positive, got lr={self.lr}, head_lr={self.head_lr}.")
        if self.select not in ("best", "last"):
            raise ConfigError(f"trainer.select must be 'best' or 'last', got '{self.select}'.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"trainer.mixed_precision must be no, fp16 or bf16, got '{self.mixed_precision}'.")
        known = [kind.value for kind in SchedulerType] + ["timm_cosine_epochs"]
        if self.scheduler not in known:
            raise ConfigError(f"trainer.scheduler '{self.scheduler}' is unknown; one of {', '.join(known)}.")
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
            groups.append(chunk[self.rank::self.world])
        return groups


@dataclass
class Outcome:
    """What a recipe returns: the record's ``metrics`` and extra top-level record keys."""

    metrics: dict
    extra: dict


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    initial: dict | None = None
    steps: int = 0
    resumed_from: int | None = None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors by (deduplicated) name: a shared A or B appears once. Copied contiguous: safetensors
    refuses strided tensors, such as SVD-initialised factors."""
    return {name: p.detach().cpu().clone(memory_format=torch.contiguous_format)
            for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise ConfigError(f"checkpoint does not match the model: unknown tensors {missing[:3]}.")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


# timm's CosineLRScheduler as the official VTAB code configures it (notes §3.4).
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
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if in_head(name, head_modules) else body).append(param)
    groups = [{"params": body, "lr": trainer.lr}]
    if head:
        groups.append({"params": head, "lr": trainer.head_lr or trainer.lr})
    if not body and not head:
        raise ConfigError("the method left no trainable parameter.")
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=trainer.weight_decay)


class Checkpointer:
    """Atomic checkpoints in ``<work_dir>/checkpoint``: trainable and best-so-far tensors, optimizer,
    scheduler, RNG states and the loop's bookkeeping. A new one is written beside the old, then swapped."""

    def __init__(self, run: RunContext):
        self.dir = run.work_dir / "checkpoint"

    def save(self, model, optimizer, scheduler, state: dict, best_state: dict | None) -> None:
        tmp = self.dir.with_name("checkpoint.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        if best_state is not None:
            save_file(best_state, tmp / "best.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        old = self.dir.with_name("checkpoint.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        for candidate in (self.dir, self.dir.with_name("checkpoint.old")):
            if (candidate / "state.json").exists():
                return candidate
        return None

    def load(self, model, optimizer, scheduler) -> tuple[dict, dict | None]:
        path = self.latest()
        try:
            load_trainable_state(model, load_file(path / "trainable.safetensors"))
            extra = torch.load(path / "optimizer.pt", weights_only=False)
            state = json.loads((path / "state.json").read_text())
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(f"checkpoint {path} is corrupt or incomplete ({exc}); delete it to start over.") from None
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        best = path / "best.safetensors"
        return state, (load_file(best) if best.exists() else None)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StepLog:
    """Per-step scalars as JSON lines; on resume, lines past the checkpoint are dropped (they will be redone)."""

    def __init__(self, path: Path, logger: Any):
        self.path, self.logger = path, logger

    def truncate_after(self, step: int) -> None:
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.logger.log_metrics(metrics, step)


def check_every_parameter_got_a_gradient(model: torch.nn.Module) -> None:
    """After the first backward: a trainable tensor without a gradient never took part in the forward, e.g. an
    adapter on a module whose weight the backbone reads directly (Falcon-Mamba's dt_proj, notes §2.3)."""
    dead = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if dead:
        raise ConfigError(f"{len(dead)} trainable tensors received no gradient in the first step, so they never "
                          f"run (e.g. {', '.join(dead[:3])}); the backbone bypasses those modules: adapt others.")


def is_better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def fit(
    model: torch.nn.Module,
    *,
    plan_size: int,
    collate: Callable[[list[int]], dict],
    compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor],
    validate: Callable[[torch.nn.Module], dict],
    select_metric: str,
    select_mode: str,
    trainer: TrainerConfig,
    run: RunContext,
    logger: Any,
    seed: int,
    head_modules: list[str],
    before_training: Callable[[torch.nn.Module], dict] | None = None,
    accelerator: Accelerator | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the selected weights (best or last, per ``trainer.select``)."""
    accelerator = accelerator or Accelerator(mixed_precision=trainer.mixed_precision)
    plan = StepPlan(plan_size, trainer.batch_size, trainer.grad_accum, seed, accelerator.num_processes,
                    accelerator.process_index, trainer.drop_last)
    total = trainer.max_steps or trainer.epochs * plan.steps_per_epoch
    eval_every = trainer.eval_every or plan.steps_per_epoch
    if trainer.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    optimizer = build_optimizer(model, trainer, head_modules)
    warmup = trainer.warmup_steps or math.ceil(trainer.warmup_ratio * total)
    scheduler = build_scheduler(optimizer, trainer, warmup, total, plan.steps_per_epoch)
    # The scheduler stays ours: accelerate's wrapper steps it once per process per call under DDP (it assumes
    # per-process schedules), while ours counts optimizer steps of the global batch.
    model, optimizer = accelerator.prepare(model, optimizer)
    main = accelerator.is_main_process
    checkpointer, log = Checkpointer(run), StepLog(run.steps_path, logger)
    result, best_state, start = FitResult(), None, 0
    if trainer.resume and checkpointer.latest() is not None:
        state, best_state = checkpointer.load(accelerator.unwrap_model(model), optimizer, scheduler)
        start = state["step"]
        result = FitResult(state["history"], state["best"], state["initial"], start, resumed_from=start)
        log.truncate_after(start)
    else:
        if main and run.steps_path.exists():
            run.steps_path.unlink()
        if before_training is not None and trainer.eval_before_training:
            result.initial = before_training(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    progress = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not accelerator.is_main_process)
    for step in progress:
        model.train()
        group = plan.group(step)
        step_loss = 0.0
        for i, indices in enumerate(group):
            batch = {k: v.to(accelerator.device) for k, v in collate(indices).items()}
            sync = nullcontext() if i == len(group) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss = compute_loss(model, batch) / len(group)
                accelerator.backward(loss)
            step_loss += loss.detach().float().item()
            if step == start and i == 0:
                check_every_parameter_got_a_gradient(model)
        if accelerator.num_processes > 1:  # every process logs the global batch's loss, as one process would
            step_loss = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean").item()
        if not math.isfinite(step_loss):
            raise TrainingDiverged(f"the training loss became {step_loss} at step {step + 1}; "
                                   f"lower trainer.lr or check the data.")
        if trainer.max_grad_norm:
            accelerator.clip_grad_norm_(trainable, trainer.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if main and (done % trainer.log_every == 0 or done == total):
            log.write(done, {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0],
                             "train/epoch": done / plan.steps_per_epoch})
            progress.set_postfix(loss=f"{step_loss:.4f}")
        if done % eval_every == 0 or done == total:
            metrics = validate(model)
            if metrics:
                result.history.append({"step": done, **metrics})
                if main:
                    log.write(done, metrics)
            if select_metric in metrics and is_better(metrics[select_metric], result.best.get(select_metric),
                                                      select_mode):
                result.best = {"step": done, **metrics}
                best_state = trainable_state(accelerator.unwrap_model(model))
        if done % trainer.checkpoint_every == 0 or done == total:
            state = {"step": done, "history": result.history, "best": result.best, "initial": result.initial}
            if main:
                checkpointer.save(accelerator.unwrap_model(model), optimizer, scheduler, state, best_state)
            accelerator.wait_for_everyone()
        if trainer.kill_at_step == done:
            os.kill(os.getpid(), signal.SIGKILL)
    result.steps = total
    if trainer.select == "best" and best_state is not None:
        load_trainable_state(accelerator.unwrap_model(model), best_state)
    return result
