"""The training loop every paradigm runs (one loop, named steps): resume or start, train a step (micro-batches
with gradient accumulation under ``accelerate``), log, validate and keep the best weights, checkpoint, tell the
callbacks; then restore the selected weights. Checkpoints are atomic and hold everything a resumed run needs to
equal an uninterrupted one (trainable and best tensors, optimizer, scheduler, RNG states, the data position);
a non-finite loss stops the run naming the step."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lilyexp.errors import ConfigError, RunInterrupted, TrainingDiverged
from lilyexp.params import load_trainable_state, trainable_state
from lilyexp.recipes.core import FitResult, Objective, RecipeInputs, StepPlan, build_optimizer, build_scheduler
from lilyexp.recipes.devices import (enable_gradient_checkpointing, make_accelerator, precision_ran, upcast_trainable,
                                     warn_unscaled_half_precision)
from lilyexp.records import RunContext

if TYPE_CHECKING:
    from lilyexp.contracts import Logger

log = logging.getLogger("lilyexp")


class Callback:
    """Hooks into the loop (``trainer.callbacks``: ``_target_`` nodes); all are no-ops by default."""

    def on_train_start(self, loop: "TrainingLoop") -> None:
        """Before the first step this process runs (after a resume restored the state; ``loop.start`` steps are
        then done)."""

    def on_step_end(self, loop: "TrainingLoop", step: int) -> None:
        """After optimizer step ``step`` (1-based) and its logging, validation and checkpoint."""

    def on_train_end(self, loop: "TrainingLoop") -> None:
        """After the last step, before the selected weights are restored."""


class Checkpointer:
    """Atomic checkpoints in ``<work_dir>/checkpoint``: trainable and best-so-far tensors, optimizer,
    scheduler, RNG states and the loop's bookkeeping. A new one is written beside the old, then swapped."""

    def __init__(self, run: RunContext):
        self.dir = run.work_dir / "checkpoint"

    @property
    def staging(self) -> Path:
        return self.dir.with_name("checkpoint.tmp")

    def begin(self) -> None:
        """Main process: an empty staging folder for the next checkpoint."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)

    def save_rng(self, rank: int) -> None:
        """Every process: its own RNG states (each GPU's generator is its process's), into the staging folder."""
        try:
            torch.save(rng_state(), self.staging / f"rng-{rank}.pt")
        except RuntimeError as exc:
            raise as_disk_full(exc, self.dir.parent) from None

    def save(self, model, optimizer, scheduler, state: dict, best_state: dict | None) -> None:
        """Main process, after every process saved its RNG: the rest, then the staging folder swapped in. A
        write that fails (a full disk) leaves the previous checkpoint as it was."""
        try:
            self.write_staged(model, optimizer, scheduler, state, best_state)
        except BaseException as exc:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise as_disk_full(exc, self.dir.parent) from None
        self.swap_in()

    def write_staged(self, model, optimizer, scheduler, state: dict, best_state: dict | None) -> None:
        tmp = self.staging
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        if best_state is not None:
            save_file(best_state, tmp / "best.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))

    def swap_in(self) -> None:
        tmp, old = self.staging, self.dir.with_name("checkpoint.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Delete the resume checkpoints (optimizer state included) of a finished run."""
        for candidate in (self.dir, self.dir.with_name("checkpoint.old"), self.dir.with_name("checkpoint.tmp")):
            shutil.rmtree(candidate, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint; a folder holding files but no state.json is a damaged one (refused
        rather than silently trained over)."""
        for candidate in (self.dir, self.dir.with_name("checkpoint.old")):
            if (candidate / "state.json").exists():
                return candidate
        if self.dir.is_dir() and any(self.dir.iterdir()):
            raise ConfigError(f"checkpoint {self.dir} is corrupt or incomplete (state.json is missing); delete it "
                              f"to start over.")
        return None

    def step(self) -> int:
        """The optimizer step the newest checkpoint holds (0 when there is none)."""
        try:
            path = self.latest()
            return int(json.loads((path / "state.json").read_text())["step"]) if path else 0
        except (ConfigError, OSError, ValueError, KeyError, TypeError):
            return 0

    def load(self, model, optimizer, scheduler, rank: int = 0) -> tuple[dict, dict | None]:
        path = self.latest()
        try:
            load_trainable_state(model, load_file(path / "trainable.safetensors"))
            extra = torch.load(path / "optimizer.pt", weights_only=False)
            state = json.loads((path / "state.json").read_text())
            missing = [key for key in STATE_KEYS if key not in state]
            if missing:
                raise KeyError(f"state.json lacks {', '.join(missing)}")
            best = load_file(path / "best.safetensors") if (path / "best.safetensors").exists() else None
            optimizer.load_state_dict(extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
            set_rng_state(saved_rng(path, rank, extra))
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, SafetensorError,
                pickle.UnpicklingError) as exc:
            raise ConfigError(f"checkpoint {path} is corrupt or incomplete ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it to start over.") from None
        return state, best


def as_disk_full(exc: BaseException, folder: Path) -> BaseException:
    """torch.save reports a full disk as a RuntimeError of its C++ stream ("basic_ios::clear", "unexpected pos"):
    when the folder's disk has (nearly) no space left, that is what it was."""
    if isinstance(exc, RuntimeError) and shutil.disk_usage(folder).free < FULL_DISK_BYTES:
        return OSError(errno.ENOSPC, f"No space left on device writing a checkpoint in {folder}")
    return exc


FULL_DISK_BYTES = 16 * 2**20
STATE_KEYS = ("step", "history", "best", "initial")  # what a resumed run cannot do without


def rng_state() -> dict:
    """This process's generators; on a GPU, its own device's only (so a resume on fewer GPUs restores each
    process's state without indexing devices that are gone)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def saved_rng(path: Path, rank: int, extra: dict) -> dict:
    """The RNG states process ``rank`` saved; a process that did not exist when the checkpoint was written takes
    process 0's; checkpoints written before per-process files hold process 0's in ``optimizer.pt``."""
    for candidate in (path / f"rng-{rank}.pt", path / "rng-0.pt"):
        if candidate.exists():
            if candidate.name != f"rng-{rank}.pt":
                log.info("the checkpoint has no RNG state of process %d: process 0's is restored", rank)
            return torch.load(candidate, weights_only=False)
    return extra["rng"]


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):  # an older checkpoint's every-device list: this process's device, if saved
        device = torch.cuda.current_device()
        if device >= len(cuda):
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda)


class StepLog:
    """Per-step scalars as JSON lines; on resume, lines past the checkpoint are dropped (they will be redone)."""

    def __init__(self, path: Path, logger: Logger):
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
    adapter on a module whose weight the backbone reads directly (Falcon-Mamba's dt_proj without
    :func:`lilyexp.backbones.falcon_mamba.route_time_steps_through_dt_proj`)."""
    dead = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if dead:
        raise ConfigError(f"{len(dead)} trainable tensors received no gradient in the first step, so they never "
                          f"run (e.g. {', '.join(dead[:3])}); the backbone bypasses those modules: adapt others.")


def is_better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


class TrainingLoop:
    """One training run of ``inputs.model`` on ``objective``; :meth:`run` leaves the model holding the selected
    weights (best or last, per ``trainer.select``)."""

    def __init__(self, inputs: RecipeInputs, objective: Objective, accelerator: Accelerator | None = None):
        trainer = inputs.trainer
        self.inputs, self.objective, self.trainer = inputs, objective, trainer
        self.accelerator = accelerator or make_accelerator(trainer)
        self.plan = StepPlan(objective.plan_size, trainer.batch_size, trainer.grad_accum, inputs.seed,
                             self.accelerator.num_processes, self.accelerator.process_index, trainer.drop_last)
        self.total = trainer.max_steps if trainer.max_steps is not None else trainer.epochs * self.plan.steps_per_epoch
        self.eval_every = trainer.eval_every or self.plan.steps_per_epoch
        if self.total:
            self.model, self.optimizer, self.scheduler = self.prepare(inputs.model)
        else:  # trainer.max_steps=0: evaluate a loaded adapter; DDP refuses to wrap a model with nothing to train,
            # so it is placed and given the run's autocast only (accelerate's evaluation mode)
            self.model = self.accelerator.prepare_model(inputs.model, evaluation_mode=True)
            self.optimizer, self.scheduler = None, None
        self.main = self.accelerator.is_main_process
        self.checkpointer, self.log = Checkpointer(inputs.run), StepLog(inputs.run.steps_path, inputs.logger)
        self.result, self.best_state, self.start, self.collapsed = FitResult(), None, 0, 0
        self.left_chance, self.warned_collapse = False, False
        self.layout = batch_layout(self.accelerator.num_processes, trainer)
        self.result.batch, self.result.precision = self.layout, precision_ran(self.accelerator, trainer)

    def prepare(self, model: torch.nn.Module):
        if self.trainer.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        upcast_trainable(model)
        warn_unscaled_half_precision(model, self.accelerator)
        optimizer = build_optimizer(model, self.trainer, self.inputs.head_modules)
        warmup = self.trainer.warmup_steps or math.ceil(self.trainer.warmup_ratio * self.total)
        scheduler = build_scheduler(optimizer, self.trainer, warmup, self.total, self.plan.steps_per_epoch)
        # The scheduler stays ours: accelerate's wrapper steps it once per process per call under DDP (it
        # assumes per-process schedules), while ours counts optimizer steps of the global batch.
        model, optimizer = self.accelerator.prepare(model, optimizer)
        return model, optimizer, scheduler

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def run(self) -> FitResult:
        if self.total == 0:
            self.validate(0)
            return self.result
        self.resume_or_start()
        for callback in self.trainer.callbacks:
            callback.on_train_start(self)
        with stop_requests() as stop:
            self.train(stop)
        for callback in self.trainer.callbacks:
            callback.on_train_end(self)
        self.result.steps = self.total
        if self.trainer.select == "best" and self.best_state is not None:
            load_trainable_state(self.unwrapped, self.best_state)
        return self.result

    def train(self, stop: "StopRequests") -> None:
        """The steps from ``start`` to ``total``; on SIGINT/SIGTERM (or SLURM's preemption signal) the last
        completed step is checkpointed and :class:`RunInterrupted` raised, so ``trainer.resume=true`` (implied
        after a SLURM requeue) continues exactly there."""
        done = self.start
        progress = tqdm(range(self.start, self.total), initial=self.start, total=self.total, desc="train",
                        disable=not self.main)
        try:
            for step in progress:
                started = time.perf_counter()
                loss = self.train_step(step)
                self.result.step_seconds.append(time.perf_counter() - started)
                done = step + 1
                self.after_step(done, loss, progress)
                self.agreed_stop(stop)
        except StopRequested as exc:
            try:
                if done > self.start and done % self.trainer.checkpoint_every and done != self.total:
                    self.checkpoint(done)  # the finished steps are kept (adapters checkpoint in seconds)
            except KeyboardInterrupt:  # a second Ctrl-C while that checkpoint was written: the last complete stands
                raise RunInterrupted("SIGINT", None) from None
            raise RunInterrupted(exc.signal_name, done) from None
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, the last regular checkpoint stands (the runner reads it)
            raise RunInterrupted("SIGINT", None) from None

    def agreed_stop(self, stop: "StopRequests") -> None:
        """Stop after this step when any process was asked to: the launcher signals each process on its own, and a
        process that checkpointed while another went on to the next step's all-reduce would hang both."""
        if self.accelerator.num_processes > 1:
            asked = torch.tensor(1.0 if stop.requested else 0.0, device=self.accelerator.device)
            if self.accelerator.reduce(asked, "max").item() > 0 and not stop.requested:
                stop.requested = "SIGTERM"  # another process's signal
        stop.check()

    def after_step(self, done: int, loss: float, progress: Any) -> None:
        self.log_step(done, loss, progress)
        self.watch_for_collapse(done, loss)
        if done % self.eval_every == 0 or (done == self.total and self.trainer.eval_at_end):
            self.validate(done)
        if done % self.trainer.checkpoint_every == 0 or done == self.total:
            self.checkpoint(done)
        for callback in self.trainer.callbacks:
            callback.on_step_end(self, done)

    def watch_for_collapse(self, done: int, loss: float) -> None:
        """Warn once when the training loss sits at the uniform prediction's (ln of the class or vocabulary count):
        for COLLAPSE_STEPS steps after having left it (a collapse, usually a learning rate far too large), or for
        the first half of training without ever leaving it (every classifier starts there, so not sooner)."""
        chance = self.objective.chance_loss
        at_chance = bool(chance) and abs(loss - chance) < 0.02 * chance
        self.collapsed = self.collapsed + 1 if at_chance else 0
        self.left_chance = self.left_chance or not at_chance
        stuck = self.collapsed >= COLLAPSE_STEPS and (self.left_chance or done >= self.total / 2)
        if stuck and not self.warned_collapse:
            self.warned_collapse = True
            log.warning("the training loss has been %.4f = ln(%d), a uniform prediction, for %d steps (step %d): "
                        "the model learns nothing; lower trainer.lr (now %g)?", loss, round(math.exp(chance)),
                        self.collapsed, done, self.trainer.lr)

    def resume_or_start(self) -> None:
        resume = self.trainer.resume or requeued()
        if resume and self.checkpointer.latest() is None:
            log.info("trainer.resume=true, but %s holds no checkpoint: starting from step 0.", self.checkpointer.dir)
        if resume and self.checkpointer.latest() is not None:
            state, self.best_state = self.checkpointer.load(self.unwrapped, self.optimizer, self.scheduler,
                                                           self.accelerator.process_index)
            self.start = state["step"]
            self.result = FitResult(state["history"], state["best"], state["initial"], self.start,
                                    resumed_from=self.start, batch=self.layout, precision=self.result.precision,
                                    step_seconds=state.get("step_seconds", []))  # the record times every step
            if self.main:
                self.log.truncate_after(self.start)
            self.accelerator.wait_for_everyone()
            self.check_layout(state)
            return
        if self.main and self.inputs.run.steps_path.exists():
            self.inputs.run.steps_path.unlink()
        if self.objective.before_training is not None and self.trainer.eval_before_training:
            self.result.initial = self.objective.before_training(self.unwrapped)

    def check_layout(self, state: dict) -> None:
        """A resume on another number of processes: with the same global batch every step still sees the same
        examples (the plan cuts the same seeded order); with another, the run goes on as a different one."""
        saved = state.get("batch") or {}
        if saved and saved != self.layout:
            same = saved.get("global_batch") == self.layout["global_batch"]
            log.log(logging.INFO if same else logging.WARNING,
                    "the checkpoint was written with %s, this run has %s%s", saved, self.layout,
                    ": the same global batch, so the same examples per step" if same else
                    ": another global batch, so from here the run is not the one that was interrupted "
                    "(adjust trainer.grad_accum to keep the global batch)")

    def train_step(self, step: int) -> float:
        """One optimizer step over its micro-batches; the loss is summed on the device and read once."""
        self.model.train()
        group = self.plan.group(step)
        step_loss = torch.zeros((), device=self.accelerator.device)
        for i, indices in enumerate(group):
            batch = {k: v.to(self.accelerator.device) for k, v in self.objective.collate(indices).items()}
            sync = nullcontext() if i == len(group) - 1 else self.accelerator.no_sync(self.model)
            with sync, self.accelerator.autocast():
                loss = self.objective.compute_loss(self.model, batch) / len(group)
                self.accelerator.backward(loss)
            step_loss += loss.detach().float()
            if step == self.start and i == 0:
                check_every_parameter_got_a_gradient(self.model)
        if self.accelerator.num_processes > 1:  # every process logs the global batch's loss, as one process would
            step_loss = self.accelerator.reduce(step_loss, "mean")
        value = step_loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"the training loss became {value} at step {step + 1}; "
                                   f"lower trainer.lr or check the data.")
        if self.trainer.max_grad_norm:
            self.accelerator.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                             self.trainer.max_grad_norm)
        self.optimizer_step(step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def optimizer_step(self, step: int) -> None:
        try:
            self.optimizer.step()
        except RuntimeError as exc:  # AdamW's update overflowing float32 (e.g. trainer.lr=1e38): a divergence
            if "overflow" not in str(exc):
                raise
            raise TrainingDiverged(f"the optimizer step overflowed at step {step + 1} "
                                   f"(trainer.lr={self.trainer.lr:g}); lower trainer.lr.") from None

    def log_step(self, done: int, loss: float, progress: Any) -> None:
        if self.main and (done % self.trainer.log_every == 0 or done == self.total):
            self.log.write(done, {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                                  "train/epoch": done / self.plan.steps_per_epoch})
            progress.set_postfix(loss=f"{loss:.4f}")

    def validate(self, done: int) -> None:
        metrics = self.objective.validate(self.unwrapped)  # not through DDP: no buffer broadcast in evaluation
        if metrics:
            self.result.history.append({"step": done, **metrics})
            if self.main:
                self.log.write(done, metrics)
                log.info("step %d: %s", done, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                         if isinstance(v, (int, float))))
        metric, mode = self.objective.select_metric, self.objective.select_mode
        if metric in metrics and is_better(metrics[metric], self.result.best.get(metric), mode):
            self.result.best = {"step": done, **metrics}
            self.best_state = trainable_state(self.unwrapped)

    def checkpoint(self, done: int) -> None:
        state = {"step": done, "history": self.result.history, "best": self.result.best,
                 "initial": self.result.initial, "step_seconds": self.result.step_seconds, "batch": self.layout}
        if self.main:
            self.checkpointer.begin()
        self.accelerator.wait_for_everyone()
        self.checkpointer.save_rng(self.accelerator.process_index)
        self.accelerator.wait_for_everyone()
        if self.main:
            self.checkpointer.save(self.unwrapped, self.optimizer, self.scheduler, state, self.best_state)
        self.accelerator.wait_for_everyone()


COLLAPSE_STEPS = 20


def requeued() -> bool:
    """SLURM requeued this job (after a time-out or preemption; submitit requeues with the same command): the
    run continues from its checkpoint as if ``trainer.resume=true`` had been given."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    if restarts.isdigit() and int(restarts) > 0:
        log.info("SLURM requeued this job (SLURM_RESTART_COUNT=%s): resuming from the last checkpoint", restarts)
        return True
    return False


def batch_layout(processes: int, trainer) -> dict:
    """How the global batch was cut. Lily's official routing pools over one forward call, i.e. over one process's
    micro-batch: paper cells keep the official per-device micro-batch (4 for LLaMA3) whatever the process count."""
    return {"processes": processes, "micro_batch_per_process": trainer.batch_size, "grad_accum": trainer.grad_accum,
            "global_batch": processes * trainer.batch_size * trainer.grad_accum}


class StopRequested(Exception):
    """SIGTERM arrived (what SLURM sends before it kills a job); the loop stops after the current step."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopRequests:
    """SIGINT (Ctrl-C) or SIGTERM (what SLURM sends before it kills a job) noted by a handler and turned into
    :class:`StopRequested` after the current step, so the checkpoint is consistent; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s: stopping after the current step (a checkpoint is written; resume with "
                    "trainer.resume=true)", self.requested)

    def check(self) -> None:
        if self.requested:
            raise StopRequested(self.requested)


def preemption_signal() -> signal.Signals:
    """What SLURM sends ahead of a time-out or preemption when submitit asked for it (``--signal=USR2@90``;
    submitit's ``SUBMITIT_PREEMPT_SIGNAL`` names another)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def ignore_further_signals() -> dict:
    """Ignore SIGINT/SIGTERM/the preemption signal from now on; the handlers they had."""
    return {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM,
                                                                       preemption_signal())}


def hand_on(signal_name: str, handlers: dict) -> None:
    """Give the signal that stopped training to the handler that was installed before the run's (submitit's
    requeue-and-exit on a SLURM time-out), now that the step is checkpointed and the record written."""
    signum = signal.Signals[signal_name]
    handler = handlers.get(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)


class stop_requests:
    """Install the SIGINT/SIGTERM and preemption-signal handlers for the loop (main thread only) and restore the
    previous ones after. submitit's own preemption handler requeues the job and exits at once, mid-step; ours
    runs first, so the step finishes and is checkpointed, and the runner hands the signal on to it afterwards."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopRequests:
        self.requests = StopRequests()
        self.previous = install_stop_handler(self.requests.handle)
        return self.requests

    def __exit__(self, *exc: Any) -> None:
        restore_handlers(self.previous)


class interruptible:
    """SIGINT, SIGTERM or the preemption signal anywhere outside the training loop (loading, evaluation before or
    after training, DreamBooth sampling, the export) stop the run at once with :class:`RunInterrupted`, so it
    ends with an ``interrupted`` record like an interruption mid-training; the loop's own handlers replace these
    while it trains. :meth:`hold` ignores further signals while that record is written."""

    def __enter__(self) -> "interruptible":
        self.previous = install_stop_handler(self.stop)
        return self

    @staticmethod
    def stop(signum: int, frame: Any) -> None:
        raise RunInterrupted(signal.Signals(signum).name, None)

    def hold(self) -> None:
        for signum in self.previous:
            signal.signal(signum, signal.SIG_IGN)

    def __exit__(self, *exc: Any) -> None:
        restore_handlers(self.previous)


def install_stop_handler(handler: Any) -> dict:
    """``handler`` for SIGINT, SIGTERM and the preemption signal; the handlers they had (none off the main
    thread, where signals cannot be handled)."""
    try:
        return {s: signal.signal(s, handler) for s in (*stop_requests.SIGNALS, preemption_signal())}
    except ValueError:
        return {}


def restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def fit(inputs: RecipeInputs, objective: Objective, accelerator: Accelerator | None = None) -> FitResult:
    """Train ``inputs.model`` in place on ``objective``; on return it holds the selected weights."""
    return TrainingLoop(inputs, objective, accelerator).run()
