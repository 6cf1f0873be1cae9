"""Select each method's grid point on the held-out validation metric, then analyse the confirm runs: per endpoint
and method the mean over seeds with its interval, the paired difference to the reference method per seed, pooled
comparisons across endpoints, the verdicts, the cost of each method from its records, and how concentrated
each method's answers are where the records hold per-question predictions."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lilyexp.study.plan import Cell, confirm_cells, grid_points, task_order, tune_cells
from lilyexp.errors import ConfigError
from lilyexp.records import beside
from lilyexp.study.run_cells import ENDED, CellIndex, CellState
from lilyexp.study.settings import StudySettings
from lilyexp.study.stats import estimate, paired_differences, verdict

SELECTION_RULE = ("per task and method, the grid point with the best mean of the task's tune metric over the tune "
                  "seeds (a diverged run, or a metric that is not a number, counts as the worst value); ties go to "
                  "the point listed first in the grid; a point is chosen only when all of its method's tune cells "
                  "on that task have ended, and none when every point diverged; a method with a single grid point "
                  "is run at it without tuning")


@dataclass
class Selection:
    """A method's tuning on one task: every grid point's validation values and the chosen point (None until
    every tune cell of the method has ended)."""

    points: list[dict] = field(default_factory=list)
    chosen: tuple | None = None
    at_edge: bool = False        # the best point is the grid's first or last: the optimum may lie outside
    all_diverged: bool = False   # nothing to confirm

    def as_dict(self) -> dict:
        return {"points": [{**p, "mean": p["mean"] if p["mean"] is None or math.isfinite(p["mean"]) else "worst"}
                           for p in self.points],
                "chosen": None if self.chosen is None else dict(self.chosen), "at_grid_edge": self.at_edge,
                "all_diverged": self.all_diverged}


def metric_of(record: dict | None, key: str) -> float | None:
    """A finite number of the record's ``final`` metrics; None when it is not a finite number. A finished record
    without the key is a mistyped study: refused with the keys it has."""
    final = ((record or {}).get("metrics") or {}).get("final", {})
    if record and record.get("status") == "finished" and key not in final:
        raise ConfigError(f"run {record.get('run_name')} reports no '{key}' (it has {', '.join(sorted(final))}); "
                          f"fix the study's tune_metric or report keys.")
    value = final.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def point_score(states: list[CellState], key: str, mode: str) -> tuple[float | None, list]:
    """The mean over the tune seeds (None while a cell has not ended; -inf/+inf with a diverged run or a metric
    that is not a number, e.g. STS-B's Pearson of constant predictions)."""
    values: list = []
    for state in states:
        if state.status not in ENDED:
            return None, values
        value = metric_of(state.record, key) if state.status == "finished" else None
        values.append(value if value is not None else state.status if state.status == "diverged" else "not a number")
    if any(isinstance(v, str) for v in values):
        return (-math.inf if mode == "max" else math.inf), values
    return statistics.fmean(values), values


def select(study: StudySettings, task: str, index: CellIndex) -> dict[str, Selection]:
    spec = study.tasks[task]
    cells = tune_cells(study, task)
    selections = {}
    for method in study.methods:
        selection, complete = Selection(), True
        if len(grid_points(study, method)) == 1:
            point = grid_points(study, method)[0]
            selections[method] = Selection([{"point": dict(point), "mean": None, "values": ["not tuned"]}], point)
            continue
        for point in grid_points(study, method):
            states = [index.state(c) for c in cells if c.method == method and c.point == point]
            score, values = point_score(states, spec.tune_metric, spec.tune_mode)
            complete &= score is not None
            selection.points.append({"point": dict(point), "mean": score, "values": values})
        if complete and any(math.isfinite(p["mean"]) for p in selection.points):
            sign = 1 if spec.tune_mode == "max" else -1
            best = max(range(len(selection.points)), key=lambda i: (sign * selection.points[i]["mean"], -i))
            selection.chosen = grid_points(study, method)[best]
            selection.at_edge = best in (0, len(selection.points) - 1)
        elif complete:
            selection.all_diverged = True
        selections[method] = selection
    return selections


@dataclass
class Seeds:
    """A method's confirm values on one endpoint: seed -> value × scale, and the seeds whose run ended without a
    number (diverged, failed, a metric that is not a number)."""

    values: dict[int, float] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)


def confirm_values(study: StudySettings, task: str, selections: dict[str, Selection], index: CellIndex
                   ) -> dict[str, dict[str, Seeds]]:
    """endpoint label -> method -> its confirm seeds."""
    out: dict[str, dict[str, Seeds]] = {label: {} for label in study.tasks[task].report}
    for cell in confirm_cells(study, task, chosen_points(selections)):
        state = index.state(cell)
        for label, key in study.tasks[task].report.items():
            seeds = out[label].setdefault(cell.method, Seeds())
            value = metric_of(state.record, key) if state.status == "finished" else None
            if value is not None:
                seeds.values[cell.seed] = value * study.scale
            elif state.status in ENDED:
                seeds.lost.append(cell.seed)
    return out


def compare(study: StudySettings, seeds: dict[str, Seeds]) -> dict:
    """Per method: its estimate, and against the reference the paired difference per seed with its verdict —
    given only when every confirm seed of both has ended with a number (a dropped seed would flatter a method)."""
    planned = len(study.confirm_seeds)
    reference = seeds.get(study.reference, Seeds())
    methods = {}
    for method in study.methods:
        mine = seeds.get(method, Seeds())
        entry: dict = {"values": mine.values, "lost_seeds": mine.lost,
                       "estimate": estimate(list(mine.values.values()), study.confidence).as_dict()
                       if mine.values else None}
        if method != study.reference and mine.values and reference.values:
            entry["difference"] = difference_entry(paired_differences(mine.values, reference.values),
                                                   study.confidence, planned, mine.lost + reference.lost)
        methods[method] = entry
    return methods


def difference_entry(differences: dict[int, float], confidence: float, planned: int, lost: list[int]
                     ) -> dict | None:
    if not differences:
        return None
    result = estimate(list(differences.values()), confidence)
    if lost:
        said = f"no verdict: seeds {sorted(set(lost))} ended without a number (diverged or failed)"
    elif len(differences) < planned:
        said = f"pending ({len(differences)} of {planned} seeds)"
    else:
        said = verdict(result)
    return {"values": differences, "estimate": result.as_dict(), "verdict": said}


def pooled(study: StudySettings, endpoints: dict[str, dict], members: list[str]) -> dict:
    """Per method, the per-seed mean over the endpoints of its paired differences (only seeds present in all of
    them), with its interval and verdict."""
    out = {}
    for method in study.methods:
        if method == study.reference:
            continue
        entries = [endpoints[label]["methods"].get(method, {}) for label in members]
        reference = [endpoints[label]["methods"].get(study.reference, {}) for label in members]
        per_endpoint = [(e.get("difference") or {}).get("values", {}) for e in entries]
        seeds = set.intersection(*(set(d) for d in per_endpoint)) if per_endpoint else set()
        differences = {seed: statistics.fmean(d[seed] for d in per_endpoint) for seed in sorted(seeds)}
        lost = [seed for e in entries + reference for seed in e.get("lost_seeds", [])]
        out[method] = difference_entry(differences, study.confidence, len(study.confirm_seeds), lost)
    return out


def cost(study: StudySettings, index: CellIndex, selections: dict[str, dict[str, Selection]]) -> dict:
    """Per method, from its confirm records: adapter parameters per task, median time per step and peak memory."""
    out = {}
    for method in study.methods:
        states = [index.state(c) for task in task_order(study)
                  for c in confirm_cells(study, task, chosen_points(selections[task])) if c.method == method]
        records = [state.record for state in states if state.status == "finished"]
        timing = [r.get("timing") or {} for r in records]
        steps = [t["step_s"] for t in timing if t.get("step_s")]
        peaks = [t["peak_mem_bytes"] for t in timing if t.get("peak_mem_bytes")]
        params = sorted({(r.get("params") or {}).get("adapter") for r in records} - {None})
        out[method] = {"adapter_params": params, "step_s_median": statistics.median(steps) if steps else None,
                       "peak_mem_mib_median": statistics.median(peaks) / 2**20 if peaks else None,
                       "runs": len(records), "budget": study.methods[method].budget}
    return out


def answer_concentration(study: StudySettings, index: CellIndex, selections: dict[str, dict[str, Selection]]
                         ) -> dict:
    """Per test set whose confirm records carry per-question predictions (``<record>.predictions.jsonl``: eval_set,
    prediction, answer): the most frequent correct answer and its share, and per method each seed's most frequent
    answer (counted over seeds, as seeds may differ in it) and the share of questions given it (mean over seeds).
    A method near 100% answers one label whatever the question, so its accuracy there is that label's frequency."""
    sets: dict[str, dict] = {}
    for task in task_order(study):
        for cell in confirm_cells(study, task, chosen_points(selections[task])):
            state = index.state(cell)
            if state.status != "finished":
                continue
            for eval_set, rows in predictions_by_set(beside(state.path, "predictions.jsonl")).items():
                entry = sets.setdefault(eval_set, {"gold": Counter(r["answer"] for r in rows), "methods": {}})
                top, count = Counter(r["prediction"] for r in rows).most_common(1)[0]
                entry["methods"].setdefault(cell.method, []).append((top, count / len(rows)))
    return {eval_set: concentration_entry(entry) for eval_set, entry in sets.items()}


def predictions_by_set(path: Path) -> dict[str, list[dict]]:
    if not path.exists():
        return {}
    by_set: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if {"eval_set", "prediction", "answer"} <= set(row):
            by_set.setdefault(row["eval_set"], []).append(row)
    return by_set


def concentration_entry(entry: dict) -> dict:
    gold, total = entry["gold"].most_common(1)[0], sum(entry["gold"].values())
    methods = {method: {"answers": dict(Counter(top for top, _ in seeds).most_common()),
                        "share": statistics.fmean(share for _, share in seeds), "n": len(seeds)}
               for method, seeds in entry["methods"].items()}
    return {"questions": total, "gold_answer": gold[0], "gold_share": gold[1] / total, "methods": methods}


def chosen_points(selections: dict[str, Selection]) -> dict[str, tuple]:
    return {m: s.chosen for m, s in selections.items() if s.chosen is not None}


def cell_counts(study: StudySettings, index: CellIndex, selections: dict[str, dict[str, Selection]]) -> dict:
    counts: dict[str, int] = {}
    for task in task_order(study):
        cells: list[Cell] = tune_cells(study, task) + confirm_cells(study, task, chosen_points(selections[task]))
        for cell in cells:
            status = index.state(cell).status
            counts[status] = counts.get(status, 0) + 1
    return {"planned": planned_total(study), **counts}


def planned_total(study: StudySettings) -> int:
    """Every cell a study runs: its tune cells and each method's confirm seeds on every task."""
    return sum(len(tune_cells(study, t)) + len(study.methods) * len(study.confirm_seeds) for t in study.tasks)


def analyse(study: StudySettings, index: CellIndex) -> dict:
    selections = {task: select(study, task, index) for task in task_order(study)}
    endpoints = {}
    for task in task_order(study):
        for label, values in confirm_values(study, task, selections[task], index).items():
            endpoints[label] = {"task": task, "key": study.tasks[task].report[label],
                                "methods": compare(study, values)}
    pools = {name: pooled(study, endpoints, members) for name, members in study.pools.items()}
    secondary = {name: {"why": pool.why.strip(), "endpoints": pool.endpoints,
                        "methods": pooled(study, endpoints, pool.endpoints)}
                 for name, pool in study.secondary_pools.items()}
    return {"study": study.name, "reference": study.reference, "confidence": study.confidence,
            "selection_rule": SELECTION_RULE,
            "selection": {task: {m: s.as_dict() for m, s in sel.items()} for task, sel in selections.items()},
            "endpoints": endpoints, "pools": pools, "secondary_pools": secondary,
            "cost": cost(study, index, selections),
            "answer_concentration": answer_concentration(study, index, selections),
            "cells": cell_counts(study, index, selections)}
