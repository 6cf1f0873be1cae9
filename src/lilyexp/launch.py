"""How a run meets Hydra and its launchers: the overrides and output folder of the job, the summary a run prints
(also appended to the job's log), the objective a sweeper optimises, and a multirun that goes on past a failed
cell and ends with every failure listed (``hydra.callbacks``: :class:`SweepSummary`)."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lilyexp.errors import ConfigError, DiskFull, RunInterrupted, TrainingDiverged, one_line
from lilyexp.recipes.loop import hand_on, ignore_further_signals
from lilyexp.records import read_record

log = logging.getLogger("lilyexp")

FAILED_CELLS = "failed_cells.jsonl"  # in the sweep folder: one line per failed cell, read when the sweep ends


def end_unfinished(exc: BaseException) -> float:
    """How ``python -m lilyexp.run`` ends a run that did not finish: an interruption says where to resume and
    hands the signal on (exit 128 + signal); in a sweep, a failed cell is noted and the sweep goes on (the
    objective NaN); a bad setting (exit 2), a divergence or a full disk (exit 1) is one sentence; anything else
    is a bug, and its traceback is wanted (the failed record holds it too)."""
    if isinstance(exc, RunInterrupted):  # also ends a sweep: the whole job was asked to stop
        handlers = ignore_further_signals()  # exiting anyway: a second Ctrl-C must not print a traceback
        print(f"interrupted by {exc.signal_name} after step {exc.step}; record: {exc.record}\n"
              f"resume with the same command and trainer.resume=true", file=sys.stderr, flush=True)
        hand_on(exc.signal_name, handlers)
        sys.exit(128 + signal.Signals[exc.signal_name].value)
    if in_sweep():  # sys.exit would end the whole sweep: noted, and summarised when the sweep ends
        note_failed_cell(exc)
        return float("nan")  # a sweeper (Optuna) records the trial as failed and goes on
    if not isinstance(exc, (ConfigError, TrainingDiverged, DiskFull)):
        raise exc
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2 if isinstance(exc, ConfigError) else 1)


def hydra_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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


def note_failed_cell(exc: BaseException) -> None:
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
