"""Paper Fig. 3 (§4.5.1, "Does it have high-rank weight updates?"): the numerical rank of the weight update of
the query projection W_q in the first three layers, Lily vs LoRA at a similar parameter budget, on four GLUE
tasks, as grouped bars (``fig3.png``/``.pdf``). The paper gives neither the measure nor the threshold: the figure
draws both measures the capture holds, one row of panels each, the update accumulated over training (what the
paper's wording, "weight updates" over training, reads as; the first row) and the final update, each labelled with
its rank threshold; ``fig3.csv`` holds both. Bars: Lily at about LoRA's budget (r 32, ne 2 and 3), Lily with 16.7%
of LoRA's parameters (r 8, ne 2, the paper's third bar; ``conf/experiment/fig3/lily_small``) and LoRA r 8.

The numbers come from the :class:`lilyexp.figures.captures.DeltaWeightCapture` artifacts
(``<record stem>.delta_w.json``) of the runs in group ``fig3`` (``conf/experiment/fig3``: RoBERTa-base, the
paper's epochs) or of another group (``--group figures_minilm``: the CPU replication). Rank = the number of
singular values above rtol·σ_max, with the tolerance the capture states (default max(m, n)·ε(float32)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lilyexp.figures import Rendered, save_figure, write_csv
from lilyexp.figures.plots import (caption, command, experiment_exists, finished, first_seed, group_of,
                                   method_label, new_figure, no_data, output_name, read_artifact, setting, swept,
                                   task_label, task_of, training_length)

GROUP = "fig3"
METHODS = ("lily", "lily_small", "lora")  # experiment files <group>/<name>.yaml
MEASURES = ("accumulated", "final")  # rows of panels; the first is the paper's reading
ARTIFACT = "delta_w.json"


def variant(record: dict) -> str:
    """A bar's label: the method, its rank (and Lily's numbers of A's and B's), its adapter parameters."""
    parts = [method_label(record), f"r {setting(record, 'method.r')}"]
    if setting(record, "method.ne_1") is not None:
        parts.append(f"ne {setting(record, 'method.ne_1')}/{setting(record, 'method.ne_2')}")
    params = record.get("params", {}).get("adapter")
    return " ".join(parts) + (f" ({params / 1e3:.0f}K)" if params else "")


def cells(records: list[dict]) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(task, variant) -> (record of the lowest seed, its capture summary), for records that have one."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        if read_artifact(record, ARTIFACT) is not None:
            grouped.setdefault((task_of(record), variant(record)), []).append(record)
    chosen = {key: first_seed(group) for key, group in grouped.items()}
    return {key: (record, read_artifact(record, ARTIFACT)) for key, record in chosen.items()}


def rows_of(task: str, label: str, record: dict, summary: dict) -> list[dict]:
    return [{"task": task, "variant": label, "method": method_label(record), "layer": layer["layer"],
             "target": layer["target"], "module": layer["name"], "shape": "x".join(map(str, layer["shape"])),
             "rtol": layer["rtol"], "rank_accumulated": layer["accumulated"]["rank"],
             "rank_final": layer["final"]["rank"],
             "steps_accumulated": summary["steps"], "first_step": summary["first_step"],
             "training": training_length(record), "adapter_params": record["params"].get("adapter"),
             "record": Path(record["_path"]).name} for layer in summary["layers"]]


def draw_task(axes, task: str, rows: list[dict], variants: list[str], measure: str) -> None:
    mine = [row for row in rows if row["task"] == task]
    if not mine:
        no_data(axes)
        axes.set_title(task_label(task))
        return
    layers = sorted({row["layer"] for row in mine})
    width = 0.8 / max(len(variants), 1)
    for k, label in enumerate(variants):  # one colour per variant, the same in every panel
        ranks = {row["layer"]: row[f"rank_{measure}"] for row in mine if row["variant"] == label}
        xs = np.arange(len(layers)) + (k - (len(variants) - 1) / 2) * width
        heights = [ranks.get(layer) or 0 for layer in layers]
        bars = axes.bar(xs, heights, width, label=label, color=f"C{k}")
        axes.bar_label(bars, labels=[str(ranks.get(layer, "")) for layer in layers], fontsize=7)
    length, first = mine[0]["training"], max(row["first_step"] for row in mine)
    title = f"{task_label(task)} ({length})" if length else task_label(task)
    axes.set_title(title + (f"\nresumed: sums from step {first}" if first != 1 else ""))
    axes.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    axes.set_ylabel(f"rank of {measure} ΔW ({mine[0]['target']})")
    axes.margins(y=0.12)


def draw(tasks: list[str], rows: list[dict]):
    variants = sorted({row["variant"] for row in rows})
    figure = new_figure(3.2 * len(tasks), 3.0 * len(MEASURES) + 0.4)
    grid = figure.subplots(len(MEASURES), len(tasks), squeeze=False)
    for measure, axes in zip(MEASURES, grid):
        for ax, task in zip(axes, tasks):
            draw_task(ax, task, rows, variants, measure)
    if rows:
        handles, labels = next(((h, label) for h, label in (ax.get_legend_handles_labels() for ax in grid[0]) if h))
        figure.legend(handles, labels, loc="outside upper center", ncols=min(len(handles), 4), fontsize=8)
        target, shape, rtol = rows[0]["target"], rows[0]["shape"], rows[0]["rtol"]
        caption(figure, f"Fig. 3: numerical rank of the weight update of {target} ({shape}) in the first layers, "
                        f"accumulated over training (top, the paper's reading) and final (bottom); rank = number "
                        f"of singular values > {rtol:.2g}·σ_max (both rows; the paper states no threshold). Lily "
                        f"(shared A's and B experts) vs LoRA (adapter parameters in parentheses).")
    return figure


def missing(group: str, tasks: list[str], found: dict) -> list[str]:
    """A command per (task, experiment file) without a captured record."""
    done = {(task, experiment_of(record)) for (task, _), (record, _) in found.items()}
    return [command(f"{group}/{name}", **{"task.subset": task}) for task in tasks for name in METHODS
            if (task, f"{group}/{name}") not in done and experiment_exists(f"{group}/{name}")]


def experiment_of(record: dict) -> str:
    """The experiment file a record's command named (``fig3/lily_small``), else its method's (``fig3/lily``)."""
    named = [o.split("=", 1)[1] for o in record.get("overrides") or [] if o.startswith(("experiment=", "+experiment="))]
    return named[-1] if named else f"{group_of(record)}/{record['config']['method']['name']}"


def render(results_dir: Path, out_dir: Path, group: str | None = None) -> Rendered:
    name, group = output_name("fig3", group), group or GROUP
    found = cells(finished(results_dir, [group]))
    tasks = swept(f"{group}/{METHODS[0]}", "task.subset") or sorted({task for task, _ in found})
    rows = [row for (task, label), (record, summary) in sorted(found.items())
            for row in rows_of(task, label, record, summary)]
    rendered = Rendered(missing=missing(group, tasks, found))
    if rows:
        rendered.files += save_figure(draw(tasks, rows), Path(out_dir), name)
        rendered.files.append(write_csv(rows, Path(out_dir) / f"{name}.csv"))
    return rendered
