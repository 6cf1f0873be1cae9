"""The one JSON record each finished (or failed) run writes, its schema, and a run's identity on disk.

Record schema, version 2 (``schema``), the same for every paradigm:

* ``run_name``, ``status`` (``finished`` | ``failed`` | ``interrupted``; read as ``outdated``
  when its task's scoring changed since: :func:`outdated_if_rescored`), ``identity`` (what makes the run a cell:
  :func:`lilyexp.settings.cell_identity`), ``scoring_version`` (how its task scored: :class:`lilyexp.contracts.Task`),
  ``config`` (resolved), ``overrides`` (the command line's);
* ``metrics``:
    - ``final``: the numbers the run reports, i.e. the selected model's evaluation (and its test, when the task
      tests the selected model once);
    - ``selection``: ``{"rule", "metric", "mode", "step"}``: how ``final`` was chosen; ``rule`` is one of
      :data:`SELECTION_RULES`;
    - ``best``: the evaluation at the selected step (``{"step", metrics...}``), ``last``: the last evaluation,
      ``history``: every evaluation, ``initial``: the untuned model, when it was tested;
* ``params`` (``trainable``, ``total``, ``adapter``, ``head``), ``env`` (git sha, package versions, device),
  ``timing`` (``wall_s``, ``peak_mem_bytes``), and what the recipe adds (``data`` sizes, ``steps``, ...);
* a failed record has ``error``, ``error_type`` and, for unexpected errors, ``traceback``.

Version-1 records (lilyexp 0.1) are read through :func:`upgrade`, so old results still render.

A run's name is ``<backbone>-<task>[-<subset>]-<method>-seed<k>-<hash of its identity>``; a rerun of the same cell
finds its checkpoints and its finished record, also one written under another name by an older version.
Records are written atomically: a temp file in the same folder, then a rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import platform
import resource
import shutil
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from lilyexp.errors import CellBusy, ConfigError, RunInterrupted
from lilyexp.params import count_parameters, in_head  # noqa: F401 - their home before 0.2; importable here still
from lilyexp.placement import numerics
from lilyexp.settings import cell_identity, identity_hash, upgrade_identity

log = logging.getLogger("lilyexp")

SCHEMA_VERSION = 2
# How a record's ``final`` numbers were chosen (metrics.selection.rule): the one vocabulary of the project.
SELECTION_RULES = {
    "best_epoch": "best evaluation on the validation split, which is also the split reported (the paper's GLUE rule)",
    "val_selected": "checkpoint selected on a validation split, then tested once",
    "test_selected": "best of the periodic test evaluations (selection on the test split, the paper's VTAB rule)",
    "last": "the last weights, no selection",
}
PACKAGES = ("lilyexp", "torch", "transformers", "peft", "accelerate", "hydra-core", "datasets", "timm", "diffusers")


def beside(record_path: Path, suffix: str) -> Path:
    """A file that sits beside a record: ``<record stem>.<suffix>`` (``predictions.jsonl``, ``steps.jsonl``)."""
    return record_path.with_name(f"{record_path.stem}.{suffix}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either nothing or the whole file (mode from the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_metrics(*, final: dict, rule: str, metric: str, mode: str, best: dict, history: list[dict],
                initial: dict | None = None) -> dict:
    """The ``metrics`` of a record (schema 2): every recipe builds it here, so the keys mean the same."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule '{rule}'; one of {sorted(SELECTION_RULES)}")
    metrics = {"final": final, "selection": {"rule": rule, "metric": metric, "mode": mode, "step": best.get("step")},
               "best": best, "last": history[-1] if history else {}, "history": history}
    if initial is not None:
        metrics["initial"] = initial
    return metrics


# ------------------------------------------------------------------------------------------ reading records

V1_TASK_KNOBS = ("val_size", "cutoff_len", "train_on_inputs", "ignore_case", "align_eval_prompt", "generation")


def upgrade_config_v1(config: dict) -> dict:
    """Version-1 configs named the subset ``task_name`` (GLUE, VTAB) or ``eval_sets`` (commonsense) and kept the
    commonsense knobs inside ``task.load``."""
    task = dict(config.get("task") or {})
    for old in ("task_name", "eval_sets"):
        if old in task:
            task["subset"] = task.pop(old)
    load = task.get("load") or {}
    for key in V1_TASK_KNOBS:
        if key in load and key not in task:
            task[key] = load[key]
    trainer = {k: v for k, v in (config.get("trainer") or {}).items() if k != "kill_at_step"}
    trainer.setdefault("_schema_", trainer.get("_target_"))
    return {**config, "task": task, "trainer": trainer}


def upgrade_metrics_v1(metrics: dict, record: dict) -> dict:
    if not metrics or isinstance(metrics.get("selection"), dict):
        return metrics
    history = metrics.get("history", [])
    rule = next((key for key in ("best_epoch", "test_selected", "val_selected") if key in metrics), None)
    if rule is None and record.get("main_metric"):  # the first classification records (GLUE) named it in text
        rule = "best_epoch"
    if rule is not None:  # classification: the rule was a key holding the selected numbers
        metric, mode = record.get("main_metric"), "max"
    else:  # causal LM: "best" restored the lowest validation loss, "last" kept the last weights
        rule = "val_selected" if metrics.get("selection") == "best" and metrics.get("best") else "last"
        metric, mode = "val/loss", "min"
    return run_metrics(final=metrics.get("final", {}), rule=rule, metric=metric, mode=mode,
                       best=metrics.get("best", {}), history=history, initial=metrics.get("initial"))


def upgrade(record: dict) -> dict:
    """A record in the current schema, its identity in the current version (older ones are converted; nothing is
    written), and a finished one scored under an older version of its task's scoring read as ``outdated``."""
    if record.get("schema", 1) < SCHEMA_VERSION:
        record = upgrade_schema_v1(record)
    record = {**record, "identity": upgrade_identity(record.get("identity"), record.get("config"))}
    return outdated_if_rescored(record)


def outdated_if_rescored(record: dict) -> dict:
    """A finished record whose ``scoring_version`` (1 when absent: every record before versions were kept) is
    below its task's current one no longer counts as finished: tables, figures and studies leave it out and the
    runner runs its cell again. Its numbers stay in the file, and a failed rerun never replaces it. A record whose
    task cannot be judged (no task class importable here, an odd version) is left as it is."""
    if record.get("status") != "finished" or not isinstance((record.get("metrics") or {}).get("final"), dict):
        return record
    current, held = task_scoring_version(record.get("config")), record.get("scoring_version", 1)
    if current is None or not isinstance(held, int) or held >= current:
        return record
    return {**record, "status": "outdated", "outdated": {"scoring_version": held, "current": current}}


def task_scoring_version(config: Any) -> int | None:
    """The scoring version of the task class the config's ``task.load`` builds (its class attribute
    ``scoring_version``, 1 where the class states none: :class:`lilyexp.contracts.Task`); None when that class is
    not importable here."""
    task = config.get("task") if isinstance(config, dict) else None
    load = task.get("load") if isinstance(task, dict) else None
    target = load.get("_target_") if isinstance(load, dict) else None
    task_class = located(target) if isinstance(target, str) else None
    version = getattr(task_class, "scoring_version", 1) if task_class is not None else None
    return version if isinstance(version, int) else None


@functools.lru_cache(maxsize=None)
def located(target: str) -> Any:
    """The object a dotted path names (``package.module.Class``), or None when it is not importable here (a
    plugin this installation lacks, a renamed class): quietly, since every record read asks."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except Exception:  # not a module (or one that fails to import here): try the shorter prefix
            continue
        for name in parts[split:]:
            found = getattr(found, name, None)
        return found
    return None


def upgrade_schema_v1(record: dict) -> dict:
    config = upgrade_config_v1(record.get("config", {}))
    upgraded = {**record, "schema": SCHEMA_VERSION, "config": config,
                "metrics": upgrade_metrics_v1(record.get("metrics", {}), record)}
    upgraded["identity"] = cell_identity(config)
    return upgraded


def is_finished(record: dict) -> bool:
    """A finished record with its final metrics; one that says "finished" but lacks them (a truncated or
    hand-edited file) is not, so its cell runs again (with a warning)."""
    if record.get("status") != "finished":
        return False
    if isinstance((record.get("metrics") or {}).get("final"), dict):
        return True
    log.warning("%s says finished but holds no final metrics: the cell runs again", record.get("_path", "a record"))
    return False


def read_record(path: Path) -> dict | None:
    """The record at ``path`` in the current schema, with its ``_path``; ``None`` for an unreadable file."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {**upgrade(record), "_path": str(path)} if isinstance(record, dict) else None


# ---------------------------------------------------------------------------------------------- identity

PATH_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


def check_path_part(what: str, value: str) -> None:
    """Names that become folder or file names stay inside their folder (no ``..``, no separators)."""
    if not PATH_PART.match(value) or ".." in value:
        raise ConfigError(f"{what} '{value}' cannot be a file name: use letters, digits and _ . = + - only.")


def run_name(cfg: DictConfig, identity: dict) -> str:
    return f"{cfg.backbone.name}-{task_label(cfg)}-{cfg.method.name}-seed{cfg.seed}-{identity_hash(identity)}"


def task_label(cfg: DictConfig) -> str:
    """The task with its subset (``glue-mrpc``), as run names and model cards name it."""
    subset = cfg.task.get("subset")
    return f"{cfg.task.name}-{subset}" if isinstance(subset, str) else str(cfg.task.name)


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun / accelerate launch set RANK), or a plain process. Read from the
    environment, because creating accelerate's state here, before the recipe's Accelerator, would fix it too early."""
    return os.environ.get("RANK", "0") == "0"


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"cpu ({platform.processor() or platform.machine()})")
    return {"git_sha": git_sha(), "packages": versions, "python": platform.python_version(), "device": device,
            "torch_threads": torch.get_num_threads(), "hostname": platform.node(), "numerics": numerics()}


CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


class MemoryMeter:
    """The peak memory of one run, not of the process (a sweep runs cells in one process): CUDA's peak statistics
    are reset when the run starts; on CPU the process's peak resident set (Linux VmHWM) is reset through
    /proc/self/clear_refs. Where neither is possible the process's lifetime peak is reported, and named so."""

    def __init__(self) -> None:
        self.kind = "cuda_max_allocated" if torch.cuda.is_available() else self.reset_cpu_peak()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def reset_cpu_peak() -> str:
        try:
            CLEAR_REFS.write_text("5")
            return "cpu_peak_rss"
        except OSError:
            return "cpu_lifetime_max_rss"

    def peak(self) -> dict[str, Any]:
        if self.kind == "cuda_max_allocated":
            value = int(torch.cuda.max_memory_allocated())
        elif self.kind == "cpu_peak_rss":
            value = int(re.search(r"VmHWM:\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024
        else:
            value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_mem_bytes": value, "peak_mem_kind": self.kind}


@dataclass
class RunContext:
    """Where one run keeps its checkpoints, per-step log and record."""

    name: str
    record_path: Path
    work_dir: Path
    config: dict
    overrides: list[str]
    identity: dict
    started: float = field(default_factory=time.time)
    memory: MemoryMeter = field(default_factory=MemoryMeter)

    @classmethod
    def create(cls, cfg: DictConfig, overrides: list[str]) -> "RunContext":
        config = OmegaConf.to_container(cfg, resolve=True)
        identity = cell_identity(config)
        name = run_name(cfg, identity)
        check_path_part("group", str(cfg.group))
        check_path_part("the run name", name)
        record_path = Path(cfg.paths.results_dir) / cfg.group / f"{name}.json"
        work_dir = Path(cfg.paths.checkpoint_dir) / cfg.group / name
        return cls(name, record_path, work_dir, config, overrides, identity)

    @property
    def wandb_id(self) -> str:
        """A stable wandb run id for this cell in this group: a resumed or requeued run continues its wandb run."""
        group = self.record_path.parent.name
        return hashlib.sha1(f"{group}/{self.name}".encode()).hexdigest()[:16]

    @property
    def steps_path(self) -> Path:
        return self.work_dir / "steps.jsonl"

    def side_file(self, suffix: str) -> Path:
        return beside(self.record_path, suffix)

    def check_writable(self) -> None:
        """Before any model loads: the record and checkpoint folders exist and take a file (a read-only or full
        disk found after training would lose the run)."""
        for folder in (self.record_path.parent, self.work_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-") as probe:
                    probe.write(b"lilyexp")
                    probe.flush()
                    os.fsync(probe.fileno())
            except OSError as exc:
                raise ConfigError(f"cannot write to {folder} ({exc.strerror or exc}); point paths.results_dir or "
                                  f"paths.checkpoint_dir at a writable folder with free space.") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An advisory lock on the cell while it runs (``.<run name>.lock`` beside the record): a second run of
        the same cell says which process holds it and leaves every file alone."""
        path = self.record_path.parent / f".{self.name}.lock"
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise CellBusy(f"cell {self.name} is running in {holder}; wait for it to finish or stop it.") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {platform.node()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def finished_record(self) -> dict | None:
        """The finished record of this cell (see :meth:`own_record`)."""
        record = self.own_record()
        return record if record and is_finished(record) else None

    def holds_results(self) -> bool:
        """Whether this cell's record holds results a failed or interrupted rerun must not replace: a finished
        record, or one outdated by a newer scoring version."""
        record = self.own_record()
        return record is not None and (is_finished(record) or record.get("status") == "outdated")

    def own_record(self) -> dict | None:
        """This cell's record: the one at ``record_path``, or one of the same identity written under another name
        (an older version's hash) when that one is finished and this one is not; the run then goes on under that
        name (:meth:`adopt`)."""
        here = read_record(self.record_path) if self.record_path.exists() else None
        if here is not None and is_finished(here):
            return here
        prefix = f"{self.config['backbone']['name']}-{self.config['task']['name']}"
        same = [record for path in sorted(self.record_path.parent.glob(f"{prefix}*.json"))
                if path != self.record_path and (record := read_record(path))
                and record.get("identity") == self.identity]
        chosen = next((record for record in same if record.get("status") == "finished" and is_finished(record)),
                      None if here is not None else (same[0] if same else None))
        if chosen is None:
            return here
        self.adopt(Path(chosen["_path"]))
        return chosen

    def adopt(self, record_path: Path) -> None:
        """Continue the cell under the name its record was filed under: record, checkpoints (an interrupted run
        resumes from them) and lock."""
        self.name, self.record_path = record_path.stem, record_path
        self.work_dir = self.work_dir.parent / record_path.stem

    def write_interrupted(self, exc: RunInterrupted, params: dict) -> Path:
        """An ``interrupted`` record (SIGINT/SIGTERM): the step reached and how to continue; a finished record of
        the cell is never replaced by one."""
        note = {"interrupted": {"signal": exc.signal_name, "after_step": exc.step,
                                "resume": "the same command with trainer.resume=true"}}
        target = self.work_dir / "interrupted_record.json" if self.holds_results() else None
        return self.write_record(status="interrupted", metrics={}, params=params, extra=note, path=target)

    def write_failure(self, exc: BaseException, params: dict) -> Path:
        """A failed record with the reason. If a finished record exists (an ``overwrite`` rerun failed), it is
        kept and the failure goes to the work directory instead."""
        failure = {"error": str(exc), "error_type": type(exc).__name__}
        if not isinstance(exc, ConfigError):
            failure["traceback"] = traceback.format_exc(limit=-8)
        target = self.work_dir / "failed_record.json" if self.holds_results() else None
        return self.write_record(status="failed", metrics={}, params=params, extra=failure, path=target)

    def write_record(self, *, status: str, metrics: dict, params: dict, extra: dict | None = None,
                     path: Path | None = None) -> Path:
        for side in sorted(self.work_dir.glob("*.jsonl")) if path is None else []:  # per-step log, predictions
            target = self.side_file(side.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(side, target)
        extra = dict(extra or {})
        timing = {"wall_s": round(time.time() - self.started, 3), **self.memory.peak(), **extra.pop("timing", {})}
        record = {
            "schema": SCHEMA_VERSION,
            "run_name": self.name,
            "status": status,
            "identity": self.identity,
            "scoring_version": task_scoring_version(self.config),
            "config": self.config,
            "overrides": self.overrides,
            "metrics": metrics,
            "params": params,
            "env": environment(),
            "timing": timing,
            **extra,
        }
        path = path or self.record_path
        atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
        return path


def to_dataframe(results_dir: str | Path = "results/runs", group: str | list[str] | None = None):
    """The records as a pandas DataFrame, one row per run (:func:`lilyexp.frames.to_dataframe`)."""
    from lilyexp.frames import to_dataframe as frame

    return frame(results_dir, group)
