"""Entry point: ``python -m lilyexp.run backbone=<b> task=<t> method=<m> [overrides]``.

Composes the config tree (the registry), checks every setting's name and type and the combination before
anything is built (a mistyped command writes no record), builds the trainer, task and method objects before any
model loads, trains with the task's recipe (or, with ``method.load_from``, evaluates an exported adapter),
exports the selected adapter to ``<checkpoints>/<group>/<run>/adapter``, and writes one JSON record; a short
summary ends with ``record: <path>``. A run that fails after the checks writes a failed record with the reason.
The Hydra entry point returns the run's objective (``objective``, default: its selection metric) for sweepers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

import hydra
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lilyexp.backbones import load_backbone, skeleton
from lilyexp.compose import CONF_DIR, build, check_combination, check_override_keys
from lilyexp.errors import ConfigError, DiskFull, RunInterrupted, TrainingDiverged, is_disk_full
from lilyexp.loggers import NullLogger
from lilyexp.methods.export import (describe_export, export_cell, load_adapter, method_settings,
                                    write_export_cell)
from lilyexp.placement import training_device
from lilyexp.recipes.core import RecipeInputs
from lilyexp.recipes.devices import set_numerics
from lilyexp.recipes.loop import Checkpointer, interruptible, preemption_signal
from lilyexp.records import RunContext, count_parameters, is_main_process, read_record, task_label
from lilyexp.settings import check_settings
from lilyexp.streams import survive_lost_readers

log = logging.getLogger("lilyexp")


def execute(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """Run one cell; return its record path (an existing finished record is kept unless ``overwrite``). A
    mistyped command raises ConfigError before anything is written; any later failure writes a failed record
    with the reason (a finished record is never replaced by one) and re-raises."""
    check_settings(cfg, overrides)
    check_combination(cfg)
    run = RunContext.create(cfg, list(overrides or []))
    run.own_record()  # a cell filed under an older version's name goes on under it (record, checkpoints, lock)
    run.check_writable()
    with run.lock() if is_main_process() else contextlib.nullcontext():
        if run.finished_record() is not None and not cfg.overwrite:
            log.info("finished record exists, skipping (overwrite=true reruns): %s", run.record_path)
            return run.record_path
        return run_and_record(cfg, run)


def run_and_record(cfg: DictConfig, run: RunContext) -> Path:
    params: dict = {}
    with interruptible() as signals:
        try:
            return train_and_record(cfg, run, params)
        except RunInterrupted as exc:
            signals.hold()  # a second Ctrl-C must not cut the record short
            step = exc.step if exc.step is not None else Checkpointer(run).step()
            exc = RunInterrupted(exc.signal_name, step)
            path = run.write_interrupted(exc, params) if is_main_process() else run.record_path
            raise RunInterrupted(exc.signal_name, step, path) from None
        except Exception as exc:
            if is_disk_full(exc):
                raise disk_full(run, params) from None
            path = run.write_failure(exc, params)
            log.error("run failed (%s); record: %s", one_line(exc), path)
            if isinstance(exc, TrainingDiverged):
                raise TrainingDiverged(f"{exc}\nrecord: {path}") from None
            raise


def disk_full(run: RunContext, params: dict) -> DiskFull:
    """One sentence for a full disk, after trying to leave a failed record (which may not fit either)."""
    step = Checkpointer(run).step()
    error = DiskFull(f"no space left on the device while writing this run's files (checkpoints under "
                     f"{run.work_dir}, the record under {run.record_path.parent}); the checkpoint of step {step} is "
                     f"kept: free some space and rerun the same command with trainer.resume=true.")
    try:
        run.write_failure(error, params)
    except OSError:
        pass
    return error


def train_and_record(cfg: DictConfig, run: RunContext, params: dict) -> Path:
    trainer, task = build(cfg.trainer), build(cfg.task.load)
    method, recipe = build(cfg.method.adapter), build(cfg.task.recipe)
    logger = build(cfg.logger) if is_main_process() else NullLogger()  # one wandb run per cell
    for part in ("backbone.load", "task.load", "method.adapter", "task.recipe"):
        log.info("%s: %s", part, OmegaConf.select(cfg, f"{part}._target_"))
    check_structure(cfg, method, task)
    set_numerics(trainer)
    set_seed(cfg.seed)
    backbone = load_backbone(cfg.backbone, **task.model_kwargs)
    load_from = cfg.method.get("load_from")
    base = backbone.model.to(training_device())  # a method's initialisation (PiSSA's SVDs) runs on the GPU
    model = load_adapter(base, load_from) if load_from else method.apply(base)
    head_modules = list(cfg.backbone.head_modules)
    params.update(count_parameters(model, head_modules))
    if load_from:  # a loaded adapter is frozen: its counts are those of the run that trained it
        params.update(((export_cell(load_from) or {}).get("params")) or {})
    summary = method.summary(model) if not load_from else None
    log.info("parameters: %s %s", params, summary or "")
    warn_if_oversized(params, cfg.method.name)
    logger.start(run.name, {**run.config, "params": params}, run_id=run.wandb_id)
    inputs = RecipeInputs(model=model, processor=backbone.processor, task=task, trainer=trainer, run=run,
                          logger=logger, seed=cfg.seed, head_modules=head_modules)
    try:
        outcome = recipe(inputs)
    except Exception:
        logger.finish({"status": "failed"}, failed=True)
        raise
    logger.finish({**outcome.metrics["final"], **{f"params/{k}": v for k, v in params.items()}})
    if not is_main_process():  # under `accelerate launch` / torchrun, one process writes the record
        return run.record_path
    extra = {"adapter_summary": summary} if summary is not None else {}
    if not load_from:
        extra["adapter"] = export_adapter(method, model, run, OmegaConf.to_container(cfg.method.adapter, resolve=True),
                                          params)
        describe_export(extra["adapter"]["path"], base=cfg.backbone.get("hub_id"), run_name=run.name,
                        method=cfg.method.name, settings=method_settings(run.identity), task=task_label(cfg),
                        metrics=outcome.metrics.get("final", {}), params=params,
                        command=" ".join(["python -m lilyexp.run", *run.overrides]), note=cfg.backbone.get("card_note"))
        extra["adapter"]["size_bytes"] = folder_size(extra["adapter"]["path"])  # the card included
    path = run.write_record(status="finished", metrics=outcome.metrics, params=params,
                            extra={**extra, **outcome.extra, "hydra_dir": hydra_dir()})
    if not trainer.keep_checkpoint:  # the export holds the selected weights; the optimizer state can be large
        Checkpointer(run).discard()
    return path


def warn_if_oversized(params: dict, method: str) -> None:
    """An adapter larger than the frozen backbone it adapts (e.g. a rank far above the layers' width) is almost
    certainly a typo; it runs, but says so."""
    frozen = params["total"] - params["trainable"]
    if 0 < frozen < params["adapter"]:
        log.warning("method '%s' adds %s adapter parameters, more than the %s frozen backbone parameters it adapts: "
                    "is its rank larger than the layers' width?", method, f"{params['adapter']:,}", f"{frozen:,}")


def check_structure(cfg: DictConfig, method, task) -> None:
    """Before weights load (minutes for an 8B model): the method on the backbone's weightless skeleton, so an
    impossible setting (more A's than layers, a target module it lacks, a rank its weights cannot hold) is refused
    now. Random-init backbones too: their skeleton is their own load node on the meta device."""
    if not cfg.method.get("load_from"):
        method.check(skeleton(cfg.backbone, **task.model_kwargs))


def export_adapter(method, model, run: RunContext, node: dict, params: dict) -> dict:
    """The selected adapter in peft's layout, under the run's checkpoint folder, with the method settings that
    made it (an evaluation-only run is checked against them); the record names it."""
    directory = (run.work_dir / "adapter").resolve()  # absolute: the record is read from anywhere
    method.export(model, directory, node)
    write_export_cell(directory, run.identity, params)
    return {"path": str(directory), "load": "lilyexp.load_adapter(model, path)"}


def folder_size(directory: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def hydra_dir() -> str | None:
    """The Hydra output folder of this run (its .hydra/ config and log), when Hydra launched it."""
    return str(Path(HydraConfig.get().runtime.output_dir).resolve()) if HydraConfig.initialized() else None


def print_summary(path: Path) -> None:
    """What the run reports, in a few lines before ``record: <path>``."""
    record = read_record(path) or {}
    metrics, timing, params = record.get("metrics", {}), record.get("timing", {}), record.get("params", {})
    selection = metrics.get("selection", {})
    numbers = ", ".join(f"{k} {v:.4g}" for k, v in metrics.get("final", {}).items() if isinstance(v, (int, float)))
    lines = [f"final ({selection.get('rule')}, selected on {selection.get('metric')}): {numbers}",
             f"parameters: {params.get('trainable', 0):,} trainable, {params.get('adapter', 0):,} adapter",
             f"wall {timing.get('wall_s', 0):.1f} s, {timing.get('step_s', 0):.3f} s a training step, peak memory "
             f"{timing.get('peak_mem_bytes', 0) / 2**20:.0f} MiB ({timing.get('peak_mem_kind')})"]
    if record.get("adapter"):
        lines.append(f"adapter: {record['adapter']['path']}")
    lines.append(f"record: {path}")
    print("\n".join(lines), flush=True)
    append_to_hydra_log(lines)


def append_to_hydra_log(lines: list[str]) -> None:
    """The summary also goes to Hydra's log file of the run (``<output dir>/<job name>.log``)."""
    if not HydraConfig.initialized():
        return
    config = HydraConfig.get()
    log_file = Path(config.runtime.output_dir) / f"{config.job.name}.log"
    try:
        with log_file.open("a") as handle:
            handle.write("".join(f"{line}\n" for line in lines))
    except OSError:  # no log folder (hydra.output_subdir=null, a read-only place): the terminal has it
        pass


def objective_of(cfg: DictConfig, path: Path) -> float | None:
    """The number a Hydra sweeper optimises: ``final[objective]`` (default: the selection metric)."""
    metrics = (read_record(path) or {}).get("metrics", {})
    key = cfg.get("objective") or metrics.get("selection", {}).get("metric")
    value = metrics.get("final", {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


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


FAILED_CELLS = "failed_cells.jsonl"  # in the sweep folder: one line per failed cell, read when the sweep ends


def note_failed_cell(cfg: DictConfig, exc: BaseException) -> None:
    """In a sweep, a failed cell is noted (its overrides and reason) and the sweep goes on with the others; Hydra
    would otherwise end with the traceback of the first failure only."""
    folder = Path(HydraConfig.get().sweep.dir)
    folder.mkdir(parents=True, exist_ok=True)
    line = {"overrides": hydra_overrides(), "reason": one_line(exc)}
    with (folder / FAILED_CELLS).open("a") as handle:
        handle.write(json.dumps(line) + "\n")
    log.error("cell failed (%s): %s", " ".join(line["overrides"]), line["reason"])


class SweepSummary(Callback):
    """When a multirun ends: every cell that failed, with its overrides and reason, then exit status 1."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        (Path(config.hydra.sweep.dir) / FAILED_CELLS).unlink(missing_ok=True)  # an interrupted sweep's notes

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = Path(config.hydra.sweep.dir) / FAILED_CELLS
        if not path.exists():
            return
        failed = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        path.unlink()  # a rerun of the sweep reports its own failures only
        lines = [f"  {' '.join(cell['overrides'])}: {cell['reason']}" for cell in failed]
        print(f"{len(failed)} cell(s) of the sweep failed (their records hold the details; the same command "
              f"retries them):\n" + "\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(1)


def hydra_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="run")
def main(cfg: DictConfig) -> float | None:
    try:
        path = execute(cfg, hydra_overrides())
    except RunInterrupted as exc:  # also ends a sweep: the whole job was asked to stop
        handlers = ignore_further_signals()  # exiting anyway: a second Ctrl-C must not print a traceback
        print(f"interrupted by {exc.signal_name} after step {exc.step}; record: {exc.record}\n"
              f"resume with the same command and trainer.resume=true", file=sys.stderr, flush=True)
        hand_on(exc.signal_name, handlers)
        sys.exit(128 + signal.Signals[exc.signal_name].value)
    except Exception as exc:
        if in_sweep():  # sys.exit would end the whole sweep: noted, and summarised when the sweep ends
            note_failed_cell(cfg, exc)
            return float("nan")  # a sweeper (Optuna) records the trial as failed and goes on
        if not isinstance(exc, (ConfigError, TrainingDiverged, DiskFull)):
            raise  # a bug: the traceback is wanted (the failed record holds it too)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    print_summary(path)
    return objective_of(cfg, path)


def cli() -> None:
    """``python -m lilyexp.run``: misspelt settings refused in one sentence before Hydra composes, then the run."""
    survive_lost_readers()
    try:
        check_override_keys(sys.argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
