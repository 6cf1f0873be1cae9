"""A study's report: ``<out>/<name>.md`` (the protocol in words, the verdicts, per-endpoint tables with
intervals, the answer concentration where records hold predictions, the selection, the cost), ``.csv`` (one row
per endpoint × method), ``.json`` (everything the analysis computed, the selection included) and two figures:
learning-rate (grid) sensitivity and a forest plot of the paired differences."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from lilyexp.figures.plots import METHOD_LABELS, new_figure
from lilyexp.records import atomic_write_text
from lilyexp.study.analyse import SELECTION_RULE
from lilyexp.study.plan import grid_points
from lilyexp.study.settings import StudySettings

COLORS = {"lily": "tab:red", "lora": "tab:blue", "pissa": "tab:green", "milora": "tab:purple"}


def label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def interval(entry: dict | None) -> str:
    if not entry:
        return "—"
    low, high = entry["ci_t"]
    if not math.isfinite(low):
        return f"{entry['mean']:.2f} (n={entry['n']})"
    return f"{entry['mean']:.2f} [{low:.2f}, {high:.2f}] (n={entry['n']})"


def signed(entry: dict | None) -> str:
    if not entry:
        return "pending"
    low, high = entry["estimate"]["ci_t"]
    mean = entry["estimate"]["mean"]
    span = f" [{low:+.2f}, {high:+.2f}]" if math.isfinite(low) else ""
    return f"{mean:+.2f}{span} (n={entry['estimate']['n']}): {entry['verdict']}"


def verdict_lines(study: StudySettings, result: dict) -> list[str]:
    """The pooled comparisons (the primary verdicts); without pools, each endpoint's."""
    lines = []
    for name, methods in result["pools"].items():
        for method, entry in methods.items():
            lines.append(f"- **{label(method)} vs {label(study.reference)}, {name}**: {signed(entry)}")
    if not result["pools"]:
        for name, endpoint in result["endpoints"].items():
            for method, entry in endpoint["methods"].items():
                if method != study.reference:
                    lines.append(f"- **{label(method)} vs {label(study.reference)}, {name}**: "
                                 f"{signed(entry.get('difference'))}")
    return lines


def secondary_lines(study: StudySettings, result: dict) -> list[str]:
    """The pooled comparisons that are not verdicts, each with why it is reported."""
    lines = []
    for name, pool in result["secondary_pools"].items():
        lines += ["", f"*{name}* ({pool['why']}):"]
        lines += [f"- {label(method)} vs {label(study.reference)}: {signed(entry)}"
                  for method, entry in pool["methods"].items()]
    return ["", "Not verdicts:", *lines] if lines else []


def finite(value):
    """The result with every non-finite number as None (JSON has no infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def endpoint_table(study: StudySettings, result: dict) -> list[str]:
    rows = [f"| endpoint | method | mean [95% t interval] (n seeds) | paired difference to {label(study.reference)} "
            "[95% t interval]: verdict |", "|---|---|---|---|"]
    for name, endpoint in result["endpoints"].items():
        for method, entry in endpoint["methods"].items():
            lost = f" (no number on seeds {entry['lost_seeds']})" if entry.get("lost_seeds") else ""
            rows.append(f"| {name} | {label(method)} | {interval(entry.get('estimate'))}{lost} | "
                        f"{signed(entry.get('difference')) if method != study.reference else '(reference)'} |")
    return rows


def concentration_table(study: StudySettings, result: dict) -> list[str]:
    """Each method's most frequent answer per test set and the share of questions given it, beside the most
    frequent correct answer's share; empty where no record carries per-question predictions."""
    sets = result["answer_concentration"]
    if not sets:
        return []
    methods = [m for m in study.methods if any(m in entry["methods"] for entry in sets.values())]
    lines = ["## Answer concentration", "",
             "From the records' per-question predictions (`<record>.predictions.jsonl`): each method's most "
             "frequent answer at each seed and the share of questions given it (mean over seeds; where seeds differ "
             "in that answer, each is named with its number of seeds), beside the most frequent correct answer and "
             "its share. A share near 100% means one label for every question: the accuracy there is that label's "
             "frequency.",
             "", "| test set | most frequent correct answer | " + " | ".join(label(m) for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for eval_set, entry in sets.items():
        cells = [f"{top_answers(e['answers'])} ({e['share']:.1%}, n={e['n']})"
                 if (e := entry["methods"].get(m)) else "—" for m in methods]
        lines.append(f"| {eval_set} ({entry['questions']}) | {entry['gold_answer']} ({entry['gold_share']:.0%}) | "
                     + " | ".join(cells) + " |")
    return [*lines, ""]


def top_answers(answers: dict[str, int]) -> str:
    """``true`` when every seed's most frequent answer is the same, else ``solution2 at 2 seeds, solution1 at 1``."""
    named = {answer or "(none extracted)": seeds for answer, seeds in answers.items()}
    if len(named) == 1:
        return next(iter(named))
    return ", ".join(f"{answer} at {seeds} seed{'s' if seeds > 1 else ''}" if i == 0 else f"{answer} at {seeds}"
                     for i, (answer, seeds) in enumerate(named.items()))


def selection_table(study: StudySettings, result: dict) -> list[str]:
    rows = ["| task | method | grid point: mean tune metric (seeds) | chosen |", "|---|---|---|---|"]
    for task, methods in result["selection"].items():
        for method, selection in methods.items():
            points = "; ".join(f"{' '.join(f'{k.rsplit(chr(46), 1)[-1]}={v}' for k, v in p['point'].items())}: "
                               f"{format_score(p)}" for p in selection["points"])
            chosen = selection["chosen"]
            said = " ".join(f"{v}" for v in chosen.values()) if chosen else (
                "none: every point diverged" if selection.get("all_diverged") else "pending")
            edge = " (at the grid's edge)" if selection.get("at_grid_edge") else ""
            rows.append(f"| {task} | {label(method)} | {points} | {said}{edge} |")
    return rows


def format_score(point: dict) -> str:
    """A grid point's mean tune metric, or why there is none."""
    mean, values = point["mean"], point["values"]
    if mean == "worst":
        return f"worst ({', '.join(str(v) for v in values if isinstance(v, str))})"
    if mean is None:
        return "not tuned (a single point)" if values == ["not tuned"] else "pending"
    return f"{mean:.4f}"


def cost_table(result: dict) -> list[str]:
    rows = ["| method | budget | adapter parameters | time per step (median) | peak memory (median) | runs |",
            "|---|---|---|---|---|---|"]
    for method, entry in result["cost"].items():
        params = ", ".join(f"{p:,}" for p in entry["adapter_params"]) or "—"
        step = f"{entry['step_s_median']:.3f} s" if entry["step_s_median"] else "—"
        peak = f"{entry['peak_mem_mib_median']:.0f} MiB" if entry["peak_mem_mib_median"] else "—"
        rows.append(f"| {label(method)} | {entry['budget']} | {params} | {step} | {peak} | {entry['runs']} |")
    return rows


def markdown(study: StudySettings, result: dict, figures: list[str]) -> str:
    cells = result["cells"]
    done = cells.get("finished", 0) + cells.get("diverged", 0)
    waiting = cells["planned"] - done - cells.get("failed", 0)
    parts = [f"# Study `{study.name}`", "", study.description.strip(), "",
             f"Regenerate: `python -m lilyexp.study {study.name}` (or `make study STUDY={study.name}`); finished "
             f"cells are kept, the same command continues an interrupted study.", "",
             "## Verdicts", "",
             f"Paired differences to {label(study.reference)} in points (metric × {study.scale:g}), mean over the "
             f"confirm seeds with a {study.confidence:.0%} Student-t interval over seeds; \"better\"/\"worse\" only "
             "when the interval excludes 0.", "",
             *(verdict_lines(study, result) or ["- pending (no confirm runs yet)"]),
             *secondary_lines(study, result),
             "", f"Cells: {done} of {cells['planned']} ended ({cells.get('diverged', 0)} diverged, "
             f"{cells.get('failed', 0)} failed, {waiting} not run yet).", "",
             "## Protocol", "", study.protocol.strip(), "",
             f"- **Tune**: every grid point at seed(s) {', '.join(map(str, study.tune_seeds))}, scored on each "
             "task's held-out validation metric (never the reported split).",
             f"- **Select**: {SELECTION_RULE}.",
             f"- **Confirm**: the chosen point at seeds {', '.join(map(str, study.confirm_seeds))} (a seed fixes the "
             "data order and initialisation; every method sees the same order for the same seed), reported once on "
             "the reported split with the checkpoint chosen on the held-out split.",
             "- **Intervals**: Student's t over seeds (reported); a percentile bootstrap over seeds (10,000 "
             "resamples) is in the JSON. Each interval is a separate 95% interval (no multiplicity correction). "
             "Pooled comparisons average each seed's paired differences over the endpoints first.", "",
             "## Per endpoint", "", *endpoint_table(study, result), "",
             *concentration_table(study, result),
             "## Selection", "", *selection_table(study, result), "",
             "## Cost", "", *cost_table(result), ""]
    parts += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(parts) + "\n"


def csv_text(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["endpoint", "method", "n", "mean", "ci_low", "ci_high", "diff_mean", "diff_low", "diff_high",
                     "verdict"])
    for name, endpoint in result["endpoints"].items():
        for method, entry in endpoint["methods"].items():
            est, diff = entry.get("estimate") or {}, entry.get("difference") or {}
            d = diff.get("estimate") or {}
            writer.writerow([name, method, est.get("n"), est.get("mean"), *(est.get("ci_t") or [None, None]),
                             d.get("mean"), *(d.get("ci_t") or [None, None]), diff.get("verdict")])
    return buffer.getvalue()


def sensitivity_figure(study: StudySettings, result: dict, index, path: Path) -> None:
    """Tune metric vs the first grid dimension (log scale when numeric), a line per method through the seed
    means, every seed a point, the chosen point circled."""
    from lilyexp.study.analyse import metric_of
    from lilyexp.study.plan import tune_cells

    tasks = list(result["selection"])
    tuned = [m for m in study.methods if len(grid_points(study, m)) > 1]
    figure = new_figure(3.6 * len(tasks), 3.4)
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        spec = study.tasks[task]
        for method in tuned:
            key = next(iter(study.methods[method].grid))
            xs, means = [], []
            for point, entry in zip(grid_points(study, method), result["selection"][task][method]["points"]):
                x = float(dict(point)[key])
                cells = [c for c in tune_cells(study, task) if c.method == method and c.point == point]
                values = [metric_of(index.state(c).record, spec.tune_metric) for c in cells]
                ax.scatter([x] * len([v for v in values if v is not None]), [v for v in values if v is not None],
                           s=10, color=COLORS.get(method), alpha=0.5)
                if isinstance(entry["mean"], (int, float)):
                    xs.append(x)
                    means.append(entry["mean"])
                chosen = result["selection"][task][method]["chosen"]
                if chosen and dict(point) == chosen and isinstance(entry["mean"], (int, float)):
                    ax.scatter([x], [entry["mean"]], s=90, facecolors="none", edgecolors=COLORS.get(method))
            if xs:
                ax.plot(xs, means, marker="o", ms=3, color=COLORS.get(method), label=label(method))
        grid_values = [float(v) for m in tuned for v in next(iter(study.methods[m].grid.values()))]
        if not ax.lines:
            ax.text(0.5, 0.5, "pending", transform=ax.transAxes, ha="center", va="center", color="grey")
            ax.set_yticks([])
        ax.set_xscale("log")
        ax.set_xlim(min(grid_values) / 1.5, max(grid_values) * 1.5)
        ax.set_title(task)
        ax.set_xlabel(next(iter(study.methods[tuned[0]].grid)))
        ax.set_ylabel(f"{spec.tune_metric} (held-out validation)")
    drawn = [ax for ax in axes if ax.lines]
    if drawn:
        drawn[0].legend(fontsize=8)
    figure.suptitle(f"{study.name}: tune metric vs learning rate (line: mean over tune seeds; dots: seeds; "
                    "circle: chosen)", fontsize=9)
    figure.savefig(path, dpi=110)


def numeric_grids(study: StudySettings) -> bool:
    """Whether the methods that are tuned all sweep one numeric setting first (what the sensitivity figure
    draws on a log axis)."""
    firsts = [next(iter(study.methods[name].grid.items())) for name in study.methods
              if len(grid_points(study, name)) > 1]
    try:
        return bool(firsts) and len({k for k, _ in firsts}) == 1 and all(float(v) > 0 for _, vs in firsts for v in vs)
    except (TypeError, ValueError):
        return False


def is_interim(difference: dict) -> bool:
    """A paired difference over fewer than all of its confirm seeds (its verdict is still pending)."""
    return str(difference.get("verdict", "")).startswith("pending")


def forest_figure(study: StudySettings, result: dict, path: Path) -> None:
    """Each method's paired difference to the reference per endpoint and pooled, with its interval."""
    rows = [(name, entry["methods"]) for name, entry in result["endpoints"].items()]
    rows += [(f"pooled: {name}", {m: {"difference": e} for m, e in methods.items()})
             for name, methods in result["pools"].items()]
    rows += [(f"not a verdict: {name}", {m: {"difference": e} for m, e in pool["methods"].items()})
             for name, pool in result["secondary_pools"].items()]
    others = [m for m in study.methods if m != study.reference]
    step = 0.8 / len(others) if len(others) > 1 else 0.0
    figure = new_figure(7.5, 1.3 + 0.3 * len(rows) * max(1, len(others)))
    ax = figure.subplots()
    for y, (name, methods) in enumerate(reversed(rows)):
        drawn = False
        for offset, method in enumerate(others):  # the first method on top within a row, as in the legend
            entry = methods.get(method) or {}
            diff = entry.get("difference")
            if diff and diff["estimate"]["ci_t"][0] is not None and math.isfinite(diff["estimate"]["ci_t"][0]):
                mean, (low, high) = diff["estimate"]["mean"], diff["estimate"]["ci_t"]
                interim = is_interim(diff)
                row_y = y + (len(others) - 1 - offset) * step
                ax.errorbar([mean], [row_y], xerr=[[mean - low], [high - mean]], fmt="o", color=COLORS.get(method),
                            capsize=3, label=label(method), mfc="white" if interim else COLORS.get(method),
                            ls="none", elinewidth=1 if interim else 1.5)
                if interim:
                    ax.annotate(f"interim, n={diff['estimate']['n']}", (high, row_y), xytext=(4, 0),
                                textcoords="offset points", va="center", fontsize=7, color="grey")
                drawn = True
        if not drawn:
            ax.text(0.02, y + step * (len(others) - 1) / 2, "pending", transform=ax.get_yaxis_transform(),
                    va="center", fontsize=8, color="grey")
    ax.set_ylim(-0.5, len(rows) - 0.5 + step * (len(others) - 1))
    ax.set_yticks([y + step * (len(others) - 1) / 2 for y in range(len(rows))], [n for n, _ in reversed(rows)],
                  fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"paired difference to {label(study.reference)} (points, {study.confidence:.0%} t interval "
                  "over seeds)")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    if unique:  # nothing drawn yet (every row pending): no empty legend box
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    ax.set_title(f"{study.name}: method − {label(study.reference)}", fontsize=10)
    figure.savefig(path, dpi=110)


def write_report(study: StudySettings, result: dict, index, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    sensitivity, forest = out / f"{study.name}_sensitivity.png", out / f"{study.name}_forest.png"
    figures = [forest]
    if numeric_grids(study):
        sensitivity_figure(study, result, index, sensitivity)
        figures.insert(0, sensitivity)
    forest_figure(study, result, forest)
    paths = [out / f"{study.name}.{suffix}" for suffix in ("md", "csv", "json")]
    atomic_write_text(paths[0], markdown(study, result, [str(f) for f in figures]))
    atomic_write_text(paths[1], csv_text(result))
    atomic_write_text(paths[2], json.dumps(finite(result), indent=1, default=str) + "\n")
    atomic_write_text(out / f"{study.name}.selection.json",
                      json.dumps(finite({"rule": SELECTION_RULE, "selection": result["selection"]}), indent=1) + "\n")
    return [*paths, *figures]
