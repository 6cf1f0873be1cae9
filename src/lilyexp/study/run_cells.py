"""Finding and running a study's cells with the runner itself: each cell's config is composed as
``python -m lilyexp.run`` composes it, its record found where the runner files it, and a missing cell run in this
process through :func:`lilyexp.run.execute` (its own record, lock, checkpoints and resume)."""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir

from lilyexp.compose import CONF_DIR
from lilyexp.errors import CellBusy, ConfigError, RunInterrupted
from lilyexp.records import RunContext, read_record
from lilyexp.study.plan import Cell
from lilyexp.study.settings import StudySettings

log = logging.getLogger("lilyexp.study")
# Passed to every cell: not part of a cell's identity (bookkeeping), so records stay the same cells.
RESUME = ("trainer.resume=true",)
ENDED = ("finished", "diverged")  # a cell that is not run again


@dataclass
class CellState:
    """``finished`` (its record), ``diverged`` (a failed record: the loss became NaN/inf, a result for tuning),
    ``failed`` (any other failure; retried), ``outdated`` (finished under an older scoring version; run again),
    ``missing``."""

    status: str
    record: dict | None
    path: Path


def compose_cell(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


class CellIndex:
    """Each cell's record path, composed once per process."""

    def __init__(self, study: StudySettings, extra: tuple[str, ...] = ()):
        self.study, self.extra = study, extra
        self._contexts: dict[Cell, RunContext] = {}
        self._finished: dict[Cell, CellState] = {}

    def overrides(self, cell: Cell) -> list[str]:
        return cell.overrides(self.study, self.extra)

    def context(self, cell: Cell) -> RunContext:
        if cell not in self._contexts:
            overrides = self.overrides(cell)
            self._contexts[cell] = RunContext.create(compose_cell(overrides), overrides)
        return self._contexts[cell]

    def state(self, cell: Cell) -> CellState:
        if cell in self._finished:  # a finished record does not change: read once
            return self._finished[cell]
        context = self.context(cell)
        record = context.finished_record()
        if record is not None:
            self._finished[cell] = CellState("finished", record, context.record_path)
            return self._finished[cell]
        record = context.own_record()
        if record and record.get("status") == "outdated":  # scored under an older version: its rerun's failure
            record = read_record(context.work_dir / "failed_record.json") or record  # went beside its checkpoint
        if record and record.get("status") == "failed" and record.get("error_type") == "TrainingDiverged":
            return CellState("diverged", record, context.record_path)
        status = record.get("status") if record else "missing"
        return CellState(status if status in ("failed", "outdated") else "missing", record, context.record_path)


def run_cell(index: CellIndex, cell: Cell) -> None:
    """One cell through the runner (resuming its checkpoint when one exists). A divergence or a failure is in
    the cell's record and does not stop the study; a mistyped study stops it; an interruption stops it with
    the command that continues."""
    from lilyexp.run import execute

    overrides = [*index.overrides(cell), *RESUME]
    try:
        execute(compose_cell(overrides), overrides)
    except CellBusy as exc:
        log.warning("skipped: %s", exc)
    except RunInterrupted:
        raise
    except Exception as exc:  # a failed record holds the reason (and traceback); a refused command wrote none
        if isinstance(exc, ConfigError) and index.state(cell).status == "missing":
            raise  # the study's own settings are wrong: every cell would be refused alike
        log.error("cell failed (%s: %s); the study goes on", type(exc).__name__, str(exc).splitlines()[0])
    finally:
        gc.collect()


class Progress:
    """Cells done of the study's total and the time left, from the wall time of the records finished so far
    (per task, since tasks differ in cost)."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.time()
        self.walls: dict[str, list[float]] = {}

    def count(self, cell: Cell, state: CellState) -> None:
        self.done += 1
        wall = ((state.record or {}).get("timing") or {}).get("wall_s")
        if wall:
            self.walls.setdefault(cell.task, []).append(float(wall))

    def eta_s(self, remaining: dict[str, int]) -> float | None:
        every = [w for walls in self.walls.values() for w in walls]
        if not every:
            return None
        overall = statistics.fmean(every)
        return sum(n * statistics.fmean(self.walls.get(task) or [overall]) for task, n in remaining.items())

    def line(self, cell: Cell, remaining: dict[str, int]) -> str:
        eta = self.eta_s(remaining)
        left = "unknown" if eta is None else f"{eta / 3600:.1f} h" if eta >= 3600 else f"{eta / 60:.0f} min"
        return f"[{self.done}/{self.total} cells done, about {left} left] running: {cell.label}"
