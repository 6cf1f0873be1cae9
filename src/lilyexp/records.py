"""Run identity and the one JSON record each finished (or failed) run writes.

A run's name is derived from what it computes (backbone, task, method, seed and a hash of the resolved config
minus bookkeeping keys), so a rerun of the same cell finds its checkpoints and its finished record.
Records are written atomically: a temp file in the same folder, then a rename.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
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
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lilyexp.errors import ConfigError

SCHEMA_VERSION = 1
# Keys that change where or how a run is logged, not what it computes.
BOOKKEEPING_KEYS = ("paths", "logger", "overwrite", "trainer.resume", "trainer.kill_at_step", "hydra")
PACKAGES = ("lilyexp", "torch", "transformers", "peft", "accelerate", "hydra-core", "datasets", "timm")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def without_bookkeeping(data: dict) -> dict:
    data = copy.deepcopy(data)
    for dotted in BOOKKEEPING_KEYS:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def config_hash(cfg: DictConfig) -> str:
    """Short hash of the resolved config without bookkeeping keys."""
    blob = json.dumps(without_bookkeeping(OmegaConf.to_container(cfg, resolve=True)), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def with_absolute_data_dirs(node: Any) -> Any:
    """The same data reached through a relative or an absolute path is the same cell."""
    if isinstance(node, dict):
        return {k: os.path.realpath(v) if k.endswith("data_dir") and isinstance(v, str) else with_absolute_data_dirs(v)
                for k, v in node.items()}
    return [with_absolute_data_dirs(v) for v in node] if isinstance(node, list) else node


def cell_identity(config: dict) -> str:
    return json.dumps(with_absolute_data_dirs(without_bookkeeping(config)), sort_keys=True, default=str)


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.backbone.name}-{cfg.task.name}-{cfg.method.name}-seed{cfg.seed}-{config_hash(cfg)}"


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun / accelerate launch set RANK), or a plain process. Read from the
    environment, because creating accelerate's state here, before the recipe's Accelerator, would fix it too early."""
    return os.environ.get("RANK", "0") == "0"


def in_head(parameter_name: str, head_modules: list[str] | set[str]) -> bool:
    """Whether a parameter belongs to the task head (a module named in ``backbone.head_modules``)."""
    return bool(set(head_modules) & set(parameter_name.split(".")))


def count_parameters(model: torch.nn.Module, head_modules: list[str]) -> dict[str, int]:
    """Unique parameter counts: shared tensors (Lily's A and B) are counted once."""
    counts = {"total": 0, "trainable": 0, "head": 0}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        counts["total"] += param.numel()
        if param.requires_grad:
            counts["trainable"] += param.numel()
            if in_head(name, head_modules):
                counts["head"] += param.numel()
    counts["adapter"] = counts["trainable"] - counts["head"]
    return counts


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent)
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
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {"git_sha": git_sha(), "packages": versions, "python": platform.python_version(), "device": device,
            "torch_threads": torch.get_num_threads(), "hostname": platform.node()}


def peak_memory() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated()), "peak_mem_kind": "cuda_max_allocated"}
    return {"peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_mem_kind": "cpu_max_rss"}


@dataclass
class RunContext:
    """Where one run keeps its checkpoints, per-step log and record."""

    name: str
    record_path: Path
    work_dir: Path
    config: dict
    overrides: list[str]
    started: float = field(default_factory=time.time)

    @classmethod
    def create(cls, cfg: DictConfig, overrides: list[str]) -> "RunContext":
        name = run_name(cfg)
        record_path = Path(cfg.paths.results_dir) / cfg.group / f"{name}.json"
        work_dir = Path(cfg.paths.checkpoint_dir) / cfg.group / name
        return cls(name, record_path, work_dir, OmegaConf.to_container(cfg, resolve=True), overrides)

    @property
    def steps_path(self) -> Path:
        return self.work_dir / "steps.jsonl"

    def side_file(self, suffix: str) -> Path:
        """A file that sits beside the record: ``<record stem>.<suffix>``."""
        return self.record_path.with_name(f"{self.record_path.stem}.{suffix}")

    def finished_record(self) -> dict | None:
        """The finished record of this cell: the one at ``record_path``, or one of the same cell whose name differs
        only because its data folder was given by another path (``record_path`` then points at it)."""
        if self.record_path.exists():
            record = json.loads(self.record_path.read_text())
            return record if record.get("status") == "finished" else None
        identity = cell_identity(self.config)
        prefix = self.name.rsplit("-", 1)[0]
        for path in sorted(self.record_path.parent.glob(f"{prefix}-*.json")):
            record = json.loads(path.read_text())
            if record.get("status") == "finished" and cell_identity(record.get("config", {})) == identity:
                self.record_path = path
                return record
        return None

    def write_failure(self, exc: BaseException, params: dict) -> Path:
        """A failed record with the reason. If a finished record exists (an ``overwrite`` rerun failed), it is
        kept and the failure goes to the work directory instead."""
        failure = {"error": str(exc), "error_type": type(exc).__name__}
        if not isinstance(exc, ConfigError):
            failure["traceback"] = traceback.format_exc(limit=-8)
        target = self.work_dir / "failed_record.json" if self.finished_record() is not None else None
        return self.write_record(status="failed", metrics={}, params=params, extra=failure, path=target)

    def write_record(self, *, status: str, metrics: dict, params: dict, extra: dict | None = None,
                     path: Path | None = None) -> Path:
        for side in sorted(self.work_dir.glob("*.jsonl")) if path is None else []:  # per-step log, predictions
            target = self.side_file(side.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(side, target)
        record = {
            "schema": SCHEMA_VERSION,
            "run_name": self.name,
            "status": status,
            "config": self.config,
            "overrides": self.overrides,
            "metrics": metrics,
            "params": params,
            "env": environment(),
            "timing": {"wall_s": round(time.time() - self.started, 3), **peak_memory()},
            **(extra or {}),
        }
        path = path or self.record_path
        atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
        return path
