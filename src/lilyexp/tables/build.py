"""Paper tables from run records: group records into the paper's cells, aggregate seeds, and put the paper's own
numbers (with their provenance) beside ours.

A table is one YAML file in ``lilyexp/tables/specs`` (package data): its columns (which records and which metric
feed each), its rows (which records, the command that produces them, and the paper's numbers with provenance),
and the selection rules it prints. Nothing is computed from anything but records and those files.
"""

from __future__ import annotations

import json
import logging
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
    "last": ("last", "final", SELECTION_RULES["last"]),
    "initial": (None, "initial", "the untuned model, tested before training"),  # a row may read it (demo)
}
PROVENANCE_MARKS = {"primary": "", "secondary": "†", "repo-derived": "‡", "reference": "§", "not recovered": ""}

log = logging.getLogger("lilyexp.tables")


def spec_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("lilyexp.tables").joinpath("specs").iterdir()
                  if p.name.endswith(".yaml"))


STATISTICS = ("mean", "median")  # what a row prints over seeds (``statistic``; the CSV keeps both)


def load_spec(name: str) -> dict:
    path = resources.files("lilyexp.tables").joinpath("specs", f"{name}.yaml")
    if not path.is_file():
        raise SystemExit(f"unknown table '{name}'; known: {', '.join(spec_names())}.")
    spec = yaml.safe_load(path.read_text())
    for selection in spec.get("selections", ["best_epoch"]):
        if selection not in SELECTIONS:
            raise SystemExit(f"table {name}: unknown selection '{selection}'; known: {sorted(SELECTIONS)}.")
    check_statistics(name, spec)
    return spec


def check_statistics(name: str, spec: dict) -> None:
    for row in spec.get("rows", []):
        if row.get("statistic", "mean") not in STATISTICS or (row.get("statistic") == "median" and row.get("choose")):
            raise SystemExit(f"table {name}, row {row.get('label')}: statistic is one of {STATISTICS}, and a row "
                             f"that chooses by the mean prints the mean.")


def method_row(spec: dict, method: str) -> dict | None:
    """The row of a table holding a method's own cells (its ``where`` names the method), e.g. Table 4's Lily row,
    whose grid and rule the figures drawn from the same records share."""
    return next((row for row in spec["rows"] if (row.get("where") or {}).get("method.name") == method), None)


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
    """``where`` maps config keys to wanted values; ``cell`` (a group summary's rows) is an identity minus seed."""
    where = dict(where or {})
    cell = where.pop("cell", None)
    if cell is not None and {k: v for k, v in (record.get("identity") or {}).items() if k != "seed"} != cell:
        return False
    return all(same(lookup(record["config"], key), wanted) for key, wanted in where.items())


def beside_a_record(path: Path) -> bool:
    """``<run>.<kind>.json`` next to ``<run>.json``: a file a run saved beside its record (captures)."""
    return "." in path.stem and path.with_name(f"{path.stem.rsplit('.', 1)[0]}.json").exists()


def read_records(results_dir: Path, groups: list[str]) -> list[dict]:
    """Every record (finished or failed) in the table's groups, oldest first, with its path. Files beside the
    records (``<run>.<kind>.json``) are not records; any other JSON file that is not one is skipped with a
    warning naming it."""
    paths = [p for group in groups for p in (results_dir / group).glob("*.json") if not beside_a_record(p)]
    records = []
    for path in sorted(paths, key=lambda p: p.stat().st_mtime):
        record = read_record(path)
        if record is None or not isinstance(record.get("config"), dict) or "status" not in record:
            log.warning("skipped %s: not a lilyexp run record (unreadable JSON, or no status and config)", path)
            continue
        records.append(record)
    return records


@dataclass
class Cell:
    """Our number for one row × column under one selection rule."""

    mean: float | None = None
    std: float | None = None
    median: float | None = None
    statistic: str = "mean"  # the one printed: a row's `statistic` (median where the paper's source reports it)
    seeds: list[int] = field(default_factory=list)
    params: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    chosen: str | None = None
    command: str | None = None
    records: list[str] = field(default_factory=list)  # the paths of the records behind the number (or the failure)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def shown(self) -> float | None:
        return self.median if self.statistic == "median" else self.mean


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
        failures = [r for r in records if r.get("status") == "failed"]
        failed = [f"{Path(r['_path']).name}: {r.get('error', 'failed')}".splitlines()[0] for r in failures]
        return Cell(failed=failed, records=[r["_path"] for r in failures])
    scaled = [scale * metric_of(r, selection, metric) for r in finished]
    return Cell(mean=statistics.mean(scaled), std=statistics.stdev(scaled) if len(scaled) > 1 else 0.0,
                median=statistics.median(scaled),
                seeds=[r["config"].get("seed") for r in finished], params=[adapter_params(r) for r in finished],
                records=[r["_path"] for r in finished])


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
    """One cell; a row may read another part of the records than the table's selection (``row.selection``)."""
    selection = row.get("selection", selection)
    mine = [r for r in records if matches(r, row.get("where")) and matches(r, column.get("where"))]
    rule = row.get("choose")
    cell = choose(mine, rule, selection, column["metric"], scale) if rule else \
        aggregate(mine, selection, column["metric"], scale)
    if selection == "initial":  # the untuned model trains nothing
        cell.params = [0] * len(cell.params)
    cell.statistic = row.get("statistic", "mean")
    if cell.mean is None and row.get("command"):
        cell.command = row["command"].format(**column.get("vars", {}))
    return cell


def mean_cell(cells: list[Cell]) -> Cell:
    """An average column (e.g. Avg, a group mean): the mean of its parts' printed values (means, or medians), only
    when every part has one."""
    if not cells or any(c.shown is None for c in cells):
        return Cell()
    return Cell(mean=statistics.mean(c.shown for c in cells), std=None,
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
                    cells[column["label"]] = build_cell(records, row, column, selection, column.get("scale", scale))
        rows.append({"row": row, "cells": cells})
    return Table(spec, selection, rows)


def label_part(key: str, value: Any) -> str:
    """One setting in a row label: the bare name for backbone/task/method, ``name=value`` otherwise, long values
    shortened."""
    text = str(value) if key in ("backbone", "task", "method") else f"{key.split('.')[-1]}={value}"
    return text if len(text) <= 40 else text[:37] + "..."


def group_spec(group: str, records: list[dict]) -> dict:
    """A table of any record group (``python -m lilyexp.tables --group <group>``): one row per cell (the method
    and the knobs that tell the group's cells apart), one column per number of their ``final`` metrics, seeds
    aggregated as in every table, under each selection rule the records used."""
    finished = [r for r in records if r.get("status") == "finished" and r.get("identity")]
    cells = {json.dumps({k: v for k, v in r["identity"].items() if k != "seed"}, sort_keys=True, default=str)
             for r in finished}
    identities = [json.loads(c) for c in sorted(cells)]
    varying = {k for i in identities for k in i if any(j.get(k) != i.get(k) for j in identities)}
    if "backbone" in varying:  # the backbone's name says it; its architecture dict would drown the label
        varying = {k for k in varying if not k.startswith("backbone.load.")}
    rows = [{"label": " ".join(label_part(k, v) for k, v in sorted(i.items())
                               if (k in varying or k == "method") and v is not None),
             "where": {"cell": i}} for i in identities]
    metrics = sorted({m for r in finished for m, v in r["metrics"].get("final", {}).items()
                      if isinstance(v, (int, float))})
    rules = sorted({r["metrics"]["selection"]["rule"] for r in finished})
    return {"name": f"group_{group}", "title": f"Records of group '{group}' (final metrics ×100, losses as they are; "
                                              f"mean ± std over seeds)",
            "groups": [group], "selections": rules or ["best_epoch"], "digits": 2,
            "columns": [{"label": m, "metric": m, **({"scale": 1} if "loss" in m else {})} for m in metrics],
            "rows": rows}
