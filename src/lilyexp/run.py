"""Entry point: ``python -m lilyexp.run backbone=<b> task=<t> method=<m> [overrides]``.

Composes the config tree (the registry), checks the combination and every setting before any model is
loaded, trains with the task's recipe, and writes one JSON record; the last output line is ``record: <path>``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lilyexp.compose import CONF_DIR, build, check_combination
from lilyexp.errors import ConfigError, TrainingDiverged
from lilyexp.records import RunContext, count_parameters

log = logging.getLogger("lilyexp")


def execute(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """Run one cell; return its record path (an existing finished record is kept unless ``overwrite``)."""
    run = RunContext.create(cfg, list(overrides or []))
    if run.finished_record() is not None and not cfg.overwrite:
        log.info("finished record exists, skipping (overwrite=true reruns): %s", run.record_path)
        return run.record_path
    check_combination(cfg)
    trainer, task = build(cfg.trainer), build(cfg.task.load)
    method, recipe, logger = build(cfg.method.adapter), build(cfg.task.recipe), build(cfg.logger)
    for part in ("backbone.load", "task.load", "method.adapter", "task.recipe"):
        log.info("%s: %s", part, OmegaConf.select(cfg, f"{part}._target_"))
    set_seed(cfg.seed)
    backbone = build(cfg.backbone.load, **task.model_kwargs)
    model = method.apply(backbone.model)
    head_modules = list(cfg.backbone.head_modules)
    params = count_parameters(model, head_modules)
    summary = {"adapter_summary": method.summary(model)} if hasattr(method, "summary") else {}
    log.info("parameters: %s %s", params, summary)
    logger.start(run.name, run.config)
    try:
        outcome = recipe(model=model, processor=backbone.processor, task=task, trainer=trainer, run=run,
                         logger=logger, seed=cfg.seed, head_modules=head_modules)
    except TrainingDiverged as exc:
        logger.finish({"status": "failed"})
        path = run.write_record(status="failed", metrics={}, params=params, extra={"error": str(exc)})
        raise TrainingDiverged(f"{exc}\nrecord: {path}") from None
    logger.finish(outcome.metrics["final"])
    return run.write_record(status="finished", metrics=outcome.metrics, params=params,
                            extra={**summary, **outcome.extra})


def hydra_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="run")
def main(cfg: DictConfig) -> None:
    try:
        path = execute(cfg, hydra_overrides())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as exc:
        print(f"error: {exc}", flush=True)
        sys.exit(1)
    print(f"record: {path}", flush=True)


if __name__ == "__main__":
    main()
