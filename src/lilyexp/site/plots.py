"""The site's plots, drawn with matplotlib from what a run left on disk: training loss and learning rate per step,
the evaluation history with the selected step marked, and a group's metric against a swept setting. Each PNG is
redrawn only when its sources are newer, so regenerating the site takes seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def fresh(target: Path, *sources: Path) -> bool:
    """Whether ``target`` exists and is newer than every source that exists."""
    if not target.exists():
        return False
    newest = max((s.stat().st_mtime for s in sources if s.exists()), default=0.0)
    return target.stat().st_mtime >= newest


def steps_of(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def numeric(history: list[dict]) -> list[str]:
    """The metrics an evaluation history holds as numbers (in the order first seen)."""
    keys: list[str] = []
    for entry in history:
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value) and key not in keys:
                keys.append(key)
    return keys


def run_curves(record: dict, steps_path: Path, target: Path) -> bool:
    """Loss and learning rate per step, and the evaluation history (selected step marked); False when the run
    logged nothing to draw."""
    sources = (Path(record["_path"]), steps_path)
    if fresh(target, *sources):
        return True
    steps = [s for s in steps_of(steps_path) if "train/loss" in s]
    history = (record.get("metrics") or {}).get("history") or []
    evaluated = numeric(history)[:4]
    if not steps and not evaluated:
        return False
    panels = (2 if steps else 0) + (1 if evaluated else 0)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.0), squeeze=False)
    axes = list(axes[0])
    if steps:
        loss, lr = axes.pop(0), axes.pop(0)
        loss.plot([s["step"] for s in steps], [s["train/loss"] for s in steps], lw=1.2, color="tab:blue")
        loss.set(title="training loss", xlabel="optimizer step", ylabel="loss")
        lr.plot([s["step"] for s in steps], [s.get("train/lr", float("nan")) for s in steps],
                lw=1.2, color="tab:orange")
        lr.set(title="learning rate", xlabel="optimizer step", ylabel="lr")
        lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if evaluated:
        axis = axes.pop(0)
        for key in evaluated:
            points = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
            axis.plot(*zip(*points), marker="o", ms=3, lw=1, label=key)
        chosen = ((record.get("metrics") or {}).get("best") or {}).get("step")
        if chosen is not None:
            axis.axvline(chosen, color="grey", ls="--", lw=1, label=f"selected (step {chosen})")
        axis.set(title="evaluations", xlabel="optimizer step", ylabel="value")
        axis.legend(fontsize=7)
    return saved(figure, target)


def sweep_plot(rows: list[dict], setting: str, metric: str, target: Path, sources: list[Path]) -> bool:
    """``metric`` against a numeric swept ``setting``, one line per method, every record a point."""
    if fresh(target, *sources):
        return True
    by_method: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        x, y = row["settings"].get(setting), row["final"].get(metric)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            by_method.setdefault(row["method"], []).append((float(x), float(y)))
    if not by_method:
        return False
    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    for method, points in sorted(by_method.items()):
        points.sort()
        axis.plot(*zip(*points), marker="o", ms=4, lw=1, label=method)
    xs = [x for points in by_method.values() for x, _ in points]
    if min(xs) > 0 and max(xs) / min(xs) >= 10:
        axis.set_xscale("log")
    axis.set(xlabel=setting, ylabel=metric, title=f"{metric} against {setting}")
    axis.legend(fontsize=8)
    return saved(figure, target)


MARGINS_INCHES = {"left": 0.8, "right": 0.15, "bottom": 0.5, "top": 0.35, "between": 0.85}


def fixed_margins(figure) -> None:
    """Margins in inches, the same on every plot (tight_layout measures every label of every figure and took
    most of the time of drawing the site from scratch)."""
    width, height = figure.get_size_inches()
    panels = len(figure.axes)
    m = MARGINS_INCHES
    panel_width = (width - m["left"] - m["right"] - (panels - 1) * m["between"]) / panels
    figure.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width, bottom=m["bottom"] / height,
                           top=1 - m["top"] / height, wspace=m["between"] / panel_width)


def saved(figure, target: Path) -> bool:
    fixed_margins(figure)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=90)
    plt.close(figure)
    return True
