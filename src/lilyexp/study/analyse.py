"""Select each method's grid point on the held-out validation metric, then analyse the confirm runs: per endpoint
and method the mean over seeds with its interval, the paired difference to the reference method per seed, pooled
comparisons across endpoints, the verdicts, and the cost of each method from its records."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from lilyexp.study.plan import Cell, confirm_cells, grid_points, task_order, tune_cells
from lilyexp.study.run_cells import CellIndex, CellState
from lilyexp.study.settings import StudySettings
from lilyexp.study.stats import estimate, paired_differences, verdict

SELECTION_RULE = ("per task and method, the grid point with the best mean of the task's tune metric over the tune "
                  "seeds (a diverged run counts as the worst value); ties go to the point listed first in the grid; "
                  "a point is chosen only when all of its method's tune cells on that task have ended; a method "
                  "with a single grid point is run at it without tuning")


@dataclass
class Selection:
    """A method's tuning on one task: every grid point's validation values and the chosen point (None until
    every tune cell of the method has ended)."""

    points: list[dict] = field(default_factory=list)
    chosen: tuple | None = None

    def as_dict(self) -> dict:
        return {"points": self.points, "chosen": None if self.chosen is None else dict(self.chosen)}


def metric_of(record: dict | None, key: str) -> float | None:
    value = ((record or {}).get("metrics") or {}).get("final", {}).get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def point_score(states: list[CellState], key: str, mode: str) -> tuple[float | None, list]:
    """The mean over the tune seeds (None while a cell has not ended; -inf/+inf with a diverged one)."""
    values = []
    for state in states:
        if state.status == "diverged":
            values.append("diverged")
        elif state.status == "finished" and metric_of(state.record, key) is not None:
            values.append(metric_of(state.record, key))
        else:
            return None, values
    if "diverged" in values:
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
        if complete:
            sign = 1 if spec.tune_mode == "max" else -1
            best = max(range(len(selection.points)), key=lambda i: (sign * selection.points[i]["mean"], -i))
            selection.chosen = grid_points(study, method)[best]
        selections[method] = selection
    return selections


def confirm_values(study: StudySettings, task: str, selections: dict[str, Selection], index: CellIndex
                   ) -> dict[str, dict[str, dict[int, float]]]:
    """endpoint label -> method -> seed -> value × scale, from the finished confirm cells."""
    chosen = {m: s.chosen for m, s in selections.items() if s.chosen is not None}
    out: dict[str, dict[str, dict[int, float]]] = {label: {} for label in study.tasks[task].report}
    for cell in confirm_cells(study, task, chosen):
        state = index.state(cell)
        for label, key in study.tasks[task].report.items():
            value = metric_of(state.record, key) if state.status == "finished" else None
            if value is not None:
                out[label].setdefault(cell.method, {})[cell.seed] = value * study.scale
    return out


def compare(study: StudySettings, values: dict[str, dict[int, float]]) -> dict:
    """Per method: its estimate, and against the reference the paired difference per seed with its verdict."""
    reference = values.get(study.reference, {})
    methods = {}
    for method in study.methods:
        mine = values.get(method, {})
        entry: dict = {"values": mine, "estimate": estimate(list(mine.values()), study.confidence).as_dict()
                       if mine else None}
        if method != study.reference and mine and reference:
            differences = paired_differences(mine, reference)
            entry["difference"] = difference_entry(differences, study.confidence)
        methods[method] = entry
    return methods


def difference_entry(differences: dict[int, float], confidence: float) -> dict | None:
    if not differences:
        return None
    result = estimate(list(differences.values()), confidence)
    return {"values": differences, "estimate": result.as_dict(), "verdict": verdict(result)}


def pooled(study: StudySettings, endpoints: dict[str, dict], members: list[str]) -> dict:
    """Per method, the per-seed mean over the endpoints of its paired differences (only seeds present in all of
    them), with its interval and verdict."""
    out = {}
    for method in study.methods:
        if method == study.reference:
            continue
        per_endpoint = [(endpoints[label]["methods"].get(method, {}).get("difference") or {}).get("values", {})
                        for label in members]
        seeds = set.intersection(*(set(d) for d in per_endpoint)) if per_endpoint else set()
        differences = {seed: statistics.fmean(d[seed] for d in per_endpoint) for seed in sorted(seeds)}
        out[method] = difference_entry(differences, study.confidence)
    return out


def cost(study: StudySettings, index: CellIndex, selections: dict[str, dict[str, Selection]]) -> dict:
    """Per method, from its confirm records: adapter parameters per task, median time per step and peak memory."""
    out = {}
    for method in study.methods:
        records = [index.state(c).record for task in task_order(study)
                   for c in confirm_cells(study, task, chosen_points(selections[task]))
                   if c.method == method and index.state(c).status == "finished"]
        timing = [r.get("timing") or {} for r in records]
        steps = [t["step_s"] for t in timing if t.get("step_s")]
        peaks = [t["peak_mem_bytes"] for t in timing if t.get("peak_mem_bytes")]
        params = sorted({(r.get("params") or {}).get("adapter") for r in records} - {None})
        out[method] = {"adapter_params": params, "step_s_median": statistics.median(steps) if steps else None,
                       "peak_mem_mib_median": statistics.median(peaks) / 2**20 if peaks else None,
                       "runs": len(records), "budget": study.methods[method].budget}
    return out


def chosen_points(selections: dict[str, Selection]) -> dict[str, tuple]:
    return {m: s.chosen for m, s in selections.items() if s.chosen is not None}


def cell_counts(study: StudySettings, index: CellIndex, selections: dict[str, dict[str, Selection]]) -> dict:
    counts: dict[str, int] = {}
    for task in task_order(study):
        cells: list[Cell] = tune_cells(study, task) + confirm_cells(study, task, chosen_points(selections[task]))
        for cell in cells:
            status = index.state(cell).status
            counts[status] = counts.get(status, 0) + 1
    expected = sum(len(tune_cells(study, t)) + len(study.methods) * len(study.confirm_seeds) for t in study.tasks)
    return {"planned": expected, **counts}


def analyse(study: StudySettings, index: CellIndex) -> dict:
    selections = {task: select(study, task, index) for task in task_order(study)}
    endpoints = {}
    for task in task_order(study):
        for label, values in confirm_values(study, task, selections[task], index).items():
            endpoints[label] = {"task": task, "key": study.tasks[task].report[label],
                                "methods": compare(study, values)}
    pools = {name: pooled(study, endpoints, members) for name, members in study.pools.items()}
    return {"study": study.name, "reference": study.reference, "confidence": study.confidence,
            "selection_rule": SELECTION_RULE,
            "selection": {task: {m: s.as_dict() for m, s in sel.items()} for task, sel in selections.items()},
            "endpoints": endpoints, "pools": pools, "cost": cost(study, index, selections),
            "cells": cell_counts(study, index, selections)}
