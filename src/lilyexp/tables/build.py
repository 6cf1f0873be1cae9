"""Paper tables from run records: group records into the paper's cells, aggregate seeds, and put the paper's own
numbers (with their provenance) beside ours.

A table is one YAML file in ``lilyexp/tables/specs`` (package data): its columns (which records and which metric
feed each), its rows (which records, the command that produces them, and the paper's numbers with provenance),
and the selection rules it prints. Nothing is computed from anything but records and those files.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lilyexp.records import SELECTION_RULES, read_record

# A table's selections: which records' numbers it prints (their metrics.selection.rule, None = any) and where
# in the record they sit. The rules themselves are lilyexp.records.SELECTION_RULES.
SELECTIONS = {
    "best_epoch": ("best_epoch", "final", SELECTION_RULES["best_epoch"]),
    "last_epoch": (None, "last", "the last evaluation (no selection)"),
    "val_selected": ("val_selected", "final", SELECTION_RULES["val_selected"]),
    "test_selected": ("test_selected", "final", SELECTION_RULES["test_selected"]),
}
PROVENANCE_MARKS = {"primary": "", "secondary": "†", "repo-derived": "‡", "reference": "§", "not recovered": ""}


def spec_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("lilyexp.tables").joinpath("specs").iterdir()
                  if p.name.endswith(".yaml"))


def load_spec(name: str) -> dict:
    path = resources.files("lilyexp.tables").joinpath("specs", f"{name}.yaml")
    if not path.is_file():
        raise SystemExit(f"unknown table '{name}'; known: {', '.join(spec_names())}.")
    spec = yaml.safe_load(path.read_text())
    for selection in spec.get("selections", ["best_epoch"]):
        if selection not in SELECTIONS:
            raise SystemExit(f"table {name}: unknown selection '{selection}'; known: {sorted(SELECTIONS)}.")
    return spec


def lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def same(value: Any, wanted: Any) -> bool:
    if isinstance(value, list):  # a list-valued setting (e.g. method.parallel) matches the same list
        return isinstance(wanted, list) and len(value) == len(wanted) and all(map(same, value, wanted))
    if isinstance(wanted, list):  # otherwise a list of wanted values: any of them
        return any(same(value, w) for w in wanted)
    if isinstance(wanted, (int, float)) and not isinstance(wanted, bool) and isinstance(value, (int, float)):
        return math.isclose(float(value), float(wanted), rel_tol=1e-9)
    return value == wanted or (value is None and wanted == "null")


def matches(record: dict, where: dict) -> bool:
    return all(same(lookup(record["config"], key), wanted) for key, wanted in (where or {}).items())


def read_records(results_dir: Path, groups: list[str]) -> list[dict]:
    """Every record (finished or failed) in the table's groups, oldest first, with its path."""
    paths = [p for group in groups for p in (results_dir / group).glob("*.json")]
    records = [read_record(path) for path in sorted(paths, key=lambda p: p.stat().st_mtime)]
    return [record for record in records if record is not None]


@dataclass
class Cell:
    """Our number for one row × column under one selection rule."""

    mean: float | None = None
    std: float | None = None
    seeds: list[int] = field(default_factory=list)
    params: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    chosen: str | None = None
    command: str | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)


def adapter_params(record: dict) -> int:
    params = record.get("params", {})
    return params.get("adapter") or params.get("trainable") or 0


def newest_per_seed(records: list[dict]) -> list[dict]:
    """One record per seed (records are oldest first, so a rerun replaces an earlier one)."""
    by_seed = {r["config"].get("seed"): r for r in records}
    return [by_seed[s] for s in sorted(by_seed, key=str)]


def metric_of(record: dict, selection: str, metric: str) -> float | None:
    rule, where, _ = SELECTIONS[selection]
    metrics = record.get("metrics", {})
    if rule is not None and lookup(metrics, "selection.rule") != rule:
        return None
    value = metrics.get(where)
    return value.get(metric) if isinstance(value, dict) else None


def aggregate(records: list[dict], selection: str, metric: str, scale: float) -> Cell:
    """Mean ± std over seeds of the records that hold ``metric`` under ``selection`` (the newest per seed)."""
    numbered = [r for r in records if r.get("status") == "finished" and metric_of(r, selection, metric) is not None]
    finished = newest_per_seed(numbered)
    if not finished:
        failed = [f"{Path(r['_path']).name}: {r.get('error', 'failed')}".splitlines()[0]
                  for r in records if r.get("status") == "failed"]
        return Cell(failed=failed)
    scaled = [scale * metric_of(r, selection, metric) for r in finished]
    return Cell(mean=statistics.mean(scaled), std=statistics.stdev(scaled) if len(scaled) > 1 else 0.0,
                seeds=[r["config"].get("seed") for r in finished], params=[adapter_params(r) for r in finished])


def choose(records: list[dict], rule: dict, selection: str, metric: str, scale: float) -> Cell:
    """Hyper-parameters chosen per cell by an explicit rule: group the cell's records by the values at
    ``rule.over`` (one key or several), score each group by the mean of ``rule.by`` (a metric, or one per
    selection rule) under ``rule.selection`` (default: the table's), keep the best group."""
    keys = rule["over"] if isinstance(rule["over"], list) else [rule["over"]]
    by = rule["by"][selection] if isinstance(rule["by"], dict) else rule["by"]
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(json.dumps([lookup(record["config"], key) for key in keys]), []).append(record)
    scored = []
    for value, group in groups.items():
        score = aggregate(group, rule.get("selection", selection), by, 1.0)
        if score.mean is not None:
            scored.append((score.mean, value, group))
    if not scored:
        return aggregate(records, selection, metric, scale)
    best = (max if rule.get("mode", "max") == "max" else min)(scored, key=lambda item: item[0])
    cell = aggregate(best[2], selection, metric, scale)
    cell.chosen = ", ".join(f"{key.split('.')[-1]}={value}" for key, value in zip(keys, json.loads(best[1])))
    return cell


def build_cell(records: list[dict], row: dict, column: dict, selection: str, scale: float) -> Cell:
    mine = [r for r in records if matches(r, row.get("where")) and matches(r, column.get("where"))]
    rule = row.get("choose")
    cell = choose(mine, rule, selection, column["metric"], scale) if rule else \
        aggregate(mine, selection, column["metric"], scale)
    if cell.mean is None and row.get("command"):
        cell.command = row["command"].format(**column.get("vars", {}))
    return cell


def mean_cell(cells: list[Cell]) -> Cell:
    """An average column (e.g. Avg, a group mean): the mean of its parts' means, only when every part has one."""
    if not cells or any(c.mean is None for c in cells):
        return Cell()
    return Cell(mean=statistics.mean(c.mean for c in cells), std=None,
                seeds=min((c.seeds for c in cells), key=len), params=cells[0].params)


@dataclass
class Table:
    spec: dict
    selection: str
    rows: list[dict]  # {"row": spec row, "cells": {column label: Cell}}


def build(spec: dict, records: list[dict], selection: str) -> Table:
    scale = spec.get("scale", 100)
    rows = []
    for row in spec["rows"]:
        cells: dict[str, Cell] = {}
        if row.get("where") is not None:
            for column in spec["columns"]:
                if "mean_of" in column:
                    cells[column["label"]] = mean_cell([cells[part] for part in column["mean_of"]])
                else:
                    cells[column["label"]] = build_cell(records, row, column, selection, scale)
        rows.append({"row": row, "cells": cells})
    return Table(spec, selection, rows)
