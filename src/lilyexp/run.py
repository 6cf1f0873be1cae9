"""Entry point: ``python -m lilyexp.run backbone=<b> task=<t> method=<m> [overrides]``.

Composes the config tree (the registry), checks every setting's name and type and the combination before
anything is built (a mistyped command writes no record), builds the trainer, task and method objects before any
model loads, trains with the task's recipe (or, with ``method.load_from``, evaluates an exported adapter),
exports the selected adapter to ``<checkpoints>/<group>/<run>/adapter``, and writes one JSON record; a short
summary ends with ``record: <path>``. A run that fails after the checks writes a failed record with the reason.
The Hydra entry point returns the run's objective (``objective``, default: its selection metric) for sweepers.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
from pathlib import Path

import hydra
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from lilyexp.backbones import load_backbone, skeleton
from lilyexp.compose import CONF_DIR, build, build_method, build_task, check_combination, check_override_keys
from lilyexp.contracts import Method, Task, check_parts
from lilyexp.errors import ConfigError, RunInterrupted
from lilyexp.failures import failures_recorded
from lilyexp.launch import end_unfinished, hydra_dir, hydra_overrides, objective_of, print_summary
from lilyexp.launch import SweepSummary  # noqa: F401 - run.yaml files written for 0.1 name lilyexp.run.SweepSummary
from lilyexp.loggers import NullLogger
from lilyexp.methods.export import export_cell, export_run_adapter, load_for_cell
from lilyexp.params import count_parameters, warn_if_oversized
from lilyexp.placement import training_device
from lilyexp.recipes.core import RecipeInputs
from lilyexp.recipes.devices import release_processes, set_numerics
from lilyexp.recipes.loop import Checkpointer
from lilyexp.records import RunContext, is_main_process
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
        with failures_recorded(run) as params:
            return train_and_record(cfg, run, params)


def train_and_record(cfg: DictConfig, run: RunContext, params: dict) -> Path:
    trainer, task = build(cfg.trainer), build_task(cfg.task)
    method, recipe = build_method(cfg.method), build(cfg.task.recipe)
    logger = build(cfg.logger) if is_main_process() else NullLogger()  # one wandb run per cell
    check_parts(method, task, recipe)
    for part in ("backbone.load", "task.load", "method.adapter", "task.recipe"):
        log.info("%s: %s", part, OmegaConf.select(cfg, f"{part}._target_"))
    load_from = cfg.method.get("load_from")
    if not load_from:
        check_structure(cfg, method, task)
    set_numerics(trainer)
    set_seed(cfg.seed)
    backbone = load_backbone(cfg.backbone, **task.model_kwargs)
    base = backbone.model.to(training_device())  # a method's initialisation (PiSSA's SVDs) runs on the GPU
    model = load_for_cell(method, base, load_from) if load_from else method.apply(base)
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
        extra["adapter"] = export_run_adapter(method, model, run, cfg, outcome.metrics.get("final", {}), params)
    path = run.write_record(status="finished", metrics=outcome.metrics, params=params,
                            extra={**extra, **outcome.extra, "hydra_dir": hydra_dir()})
    if not trainer.keep_checkpoint:  # the export holds the selected weights; the optimizer state can be large
        Checkpointer(run).discard()
    return path


def check_structure(cfg: DictConfig, method: Method, task: Task) -> None:
    """Before weights load (minutes for an 8B model): the method on the backbone's weightless skeleton, so an
    impossible setting (more A's than layers, a target module it lacks, a rank its weights cannot hold) is refused
    now. Random-init backbones too: their skeleton is their own load node on the meta device."""
    method.check(skeleton(cfg.backbone, **task.model_kwargs))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="run")
def main(cfg: DictConfig) -> float | None:
    try:
        path = execute(cfg, hydra_overrides())
    except (RunInterrupted, Exception) as exc:
        return end_unfinished(exc)
    print_summary(path)
    return objective_of(cfg, path)


def cli() -> None:
    """``python -m lilyexp.run``: misspelt settings refused in one sentence before Hydra composes, then the run."""
    survive_lost_readers()
    atexit.register(release_processes)  # at exit, not per cell: a multirun's cells share the process
    try:
        check_override_keys(sys.argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
