"""The schema of a study (``conf/study/<name>.yaml``): which cells it runs and how it reads them.

A study names the overrides every cell shares (``base``), its training configurations (``tasks``), the methods
with their fixed settings and a grid per method (``grid``: override key -> values, crossed), the seeds of the
tuning and confirmation stages, the metric each task is tuned on and the metrics it reports. Every cell is an
ordinary runner cell: ``python -m lilyexp.run <base> <task> <method> <grid point> seed=<k> group=<group>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from lilyexp.compose import CONF_DIR
from lilyexp.errors import ConfigError

STUDY_DIR = CONF_DIR / "study"


@dataclass
class StudyTask:
    """One training configuration and what is read from its records."""

    overrides: list[str] = field(default_factory=list)
    tune_metric: str = ""              # a key of the record's metrics.final, on the held-out validation split
    tune_mode: str = "max"             # max | min
    report: dict[str, str] = field(default_factory=dict)  # endpoint label -> key of metrics.final (reported split)


@dataclass
class StudyMethod:
    """A method at its budget setting, and the grid it is tuned over."""

    overrides: list[str] = field(default_factory=list)
    per_task: dict[str, list[str]] = field(default_factory=dict)  # task -> extra overrides (e.g. Lily's s per task)
    grid: dict[str, list[Any]] = field(default_factory=dict)      # override key -> values (crossed)
    budget: str = ""                                              # the adapter budget in words, for the report


@dataclass
class SecondaryPool:
    """A pooled comparison that is not a verdict (chosen after the data was seen, or a sensitivity check)."""

    endpoints: list[str] = field(default_factory=list)
    why: str = ""


@dataclass
class StudySettings:
    """A tuned, seeded, paired comparison."""

    name: str = ""
    description: str = ""
    group: str = ""                    # the records' folder (results/runs/<group>)
    base: list[str] = field(default_factory=list)
    tasks: dict[str, StudyTask] = field(default_factory=dict)
    methods: dict[str, StudyMethod] = field(default_factory=dict)
    reference: str = "lora"            # paired differences are taken against this method
    tune_seeds: list[int] = field(default_factory=lambda: [0])
    confirm_seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    scale: float = 100.0               # metrics are reported multiplied by this (points)
    pools: dict[str, list[str]] = field(default_factory=dict)  # pooled comparisons: name -> endpoint labels
    # Pooled comparisons reported beside the verdicts and never as one, each with why it is there (e.g. the pool
    # without an endpoint whose spread dominates): name -> {endpoints: [...], why: "..."}.
    secondary_pools: dict[str, SecondaryPool] = field(default_factory=dict)
    protocol: str = ""                 # the protocol in words: sizes, lengths, what is held out
    confidence: float = 0.95
    order: Optional[list[str]] = None  # the task order the runner takes (default: as listed)


def load_study(name_or_path: str) -> StudySettings:
    """A study by name (``conf/study/<name>.yaml``) or by yaml path, checked against the schema in one sentence."""
    path = Path(name_or_path)
    if not path.suffix:
        path = STUDY_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in STUDY_DIR.glob("*.yaml")))
        raise ConfigError(f"no study '{name_or_path}' (a conf/study/<name>.yaml or a yaml path); known: {known}.")
    node = OmegaConf.load(path)
    node.pop("_schema_", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudySettings), node)
    except (ValidationError, ConfigKeyError) as exc:
        raise ConfigError(f"study {path}: {str(exc).splitlines()[0]} (key {getattr(exc, 'full_key', '?')}).") from None
    study: StudySettings = OmegaConf.to_object(merged)
    check_study(study, path)
    return study


def check_study(study: StudySettings, path: Path) -> None:
    problems = []
    if not study.group:
        problems.append("it names no group")
    if study.reference not in study.methods:
        problems.append(f"its reference '{study.reference}' is not one of its methods")
    for name, task in study.tasks.items():
        if task.tune_mode not in ("max", "min"):
            problems.append(f"task {name}: tune_mode must be max or min")
        if not task.tune_metric or not task.report:
            problems.append(f"task {name} needs a tune_metric and a report")
    for name, method in study.methods.items():
        unknown = set(method.per_task) - set(study.tasks)
        if unknown:
            problems.append(f"method {name}: per_task names unknown tasks {sorted(unknown)}")
    labels = endpoint_labels(study)
    pools = {**study.pools, **{name: pool.endpoints for name, pool in study.secondary_pools.items()}}
    for pool, members in pools.items():
        if set(members) - set(labels):
            problems.append(f"pool {pool} names unknown endpoints {sorted(set(members) - set(labels))}")
    for name, pool in study.secondary_pools.items():
        if not pool.endpoints or not pool.why.strip():
            problems.append(f"secondary pool {name} needs endpoints and a why")
    if not study.confirm_seeds or not study.tune_seeds:
        problems.append("it needs tune and confirm seeds")
    if set(study.tune_seeds) & set(study.confirm_seeds):
        problems.append("its confirm seeds must differ from its tune seeds (the run that won the tuning would be "
                        "counted again, biased upwards)")
    if problems:
        raise ConfigError(f"study {path}: " + "; ".join(problems) + ".")


def endpoint_labels(study: StudySettings) -> list[str]:
    return [label for task in study.tasks.values() for label in task.report]


def as_dict(study: StudySettings) -> dict:
    return dataclasses.asdict(study)
