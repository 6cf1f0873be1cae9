"""What a run leaves when it does not finish: an ``interrupted`` record with the step to resume from (SIGINT,
SIGTERM, SLURM's preemption signal), a ``failed`` record with the reason, and one sentence for a full disk. A
finished record of the cell is never replaced by either (:meth:`lilyexp.records.RunContext.write_failure`)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from lilyexp.errors import DiskFull, RunInterrupted, TrainingDiverged, is_disk_full, one_line
from lilyexp.recipes.loop import Checkpointer, interruptible
from lilyexp.records import RunContext, is_main_process

log = logging.getLogger("lilyexp")


@contextlib.contextmanager
def failures_recorded(run: RunContext) -> Iterator[dict]:
    """Around a run: yields the dict the run fills with its parameter counts, which an unfinished record states
    too; an interruption or failure inside writes its record and re-raises (with the record's path)."""
    params: dict = {}
    with interruptible() as signals:
        try:
            yield params
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
