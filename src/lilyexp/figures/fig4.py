"""Paper Fig. 4 (§4.5.3, "Does it exhibit selectivity?"): the weight Lily's routers assign to each B expert,
accumulated over training, in a shallow, a middle and a deep layer, one heat-map per task (``fig4.png``/``.pdf``;
every layer's numbers in ``fig4.csv``). A cell's value is the expert's share of its layer's accumulated router
output (the per-token softmax summed over the tokens and steps of training; the shares of a layer sum to 1).

The sums come from the :class:`lilyexp.figures.captures.RouterCapture` artifacts (``<record stem>.router_weights.json``)
of the runs in group ``fig4`` (``conf/experiment/fig4``: Vim-S Lily-S with three B experts on CIFAR-100 and
Retinopathy, as the paper) or of another group (``--group fig4_vit``: the same on ViT-B/16; ``--group
figures_minilm``: the CPU replication on GLUE).

Which blocks: the paper shows "layers of index 2 (or 1), 13 and 22" of a 24-block model. Block indices here are
0-based, as the model names its modules (``layers.2``), and a capture with those blocks shows
:data:`PAPER_LAYERS` = 2, 13 and 22, reading the paper's indices as 0-based (its "(or 1)" allows a 1-based 2, i.e.
block 1 here, for the shallow one; 13 and 22 would then be blocks 12 and 21). :data:`LAYERS` overrides the choice;
other depths show their first, middle and last adapted block of :data:`TARGET`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lilyexp.figures import Rendered, save_figure, write_csv
from lilyexp.figures.plots import (caption, command, experiment_exists, finished, first_seed, new_figure, no_data,
                                   output_name, read_artifact, swept, task_label, task_of)

GROUP = "fig4"
EXPERIMENT = "lily"  # the experiment file <group>/<name>.yaml whose runs carry the capture
ARTIFACT = "router_weights.json"
TARGET = None  # the adapted module shown (e.g. "query", "qkv.k", "mlp"); None: the first the artifact lists
LAYERS = None  # blocks shown, e.g. (2, 6, 10); None: the paper's when captured, else first, middle and last
PAPER_LAYERS = (2, 13, 22)
DATA = {"task.data_dir": "/path/to/vtab-1k"}  # what the VTAB-1K cells need besides their file
VTAB_GROUPS = (GROUP, "fig4_vit")


def captured(records: list[dict]) -> dict[str, tuple[dict, dict]]:
    """task -> (record of the lowest seed with a router capture, the capture)."""
    grouped: dict[str, list[dict]] = {}
    for record in records:
        if read_artifact(record, ARTIFACT) is not None:
            grouped.setdefault(task_of(record), []).append(record)
    return {task: (first_seed(group), read_artifact(first_seed(group), ARTIFACT)) for task, group in grouped.items()}


def rows_of(task: str, record: dict, capture: dict) -> list[dict]:
    rows = []
    for layer in capture["layers"]:
        total = sum(layer["sums"]) or 1.0
        rows += [{"task": task, "target": layer["target"], "layer": layer["layer"], "expert": f"B{e + 1}",
                  "accumulated_weight": value, "share": value / total, "tokens": layer["tokens"],
                  "steps": capture["steps"], "first_step": capture.get("first_step", 1),
                  "record": Path(record["_path"]).name}
                 for e, value in enumerate(layer["sums"])]
    return rows


def shown_layers(rows: list[dict]) -> tuple[str, list[int]]:
    """The target and the three blocks a heat-map shows."""
    target = TARGET or rows[0]["target"]
    available = sorted({row["layer"] for row in rows if row["target"] == target})
    if LAYERS is not None:
        return target, [layer for layer in LAYERS if layer in available]
    if set(PAPER_LAYERS) <= set(available):
        return target, list(PAPER_LAYERS)
    return target, sorted({available[0], available[len(available) // 2], available[-1]})


def heat_map(axes, task: str, rows: list[dict]):
    target, layers = shown_layers(rows)
    experts = sorted({row["expert"] for row in rows}, key=lambda e: int(e[1:]))
    share = {(row["layer"], row["expert"]): row["share"] for row in rows if row["target"] == target}
    grid = np.array([[share[(layer, e)] for e in experts] for layer in layers])
    image = axes.imshow(grid, cmap="viridis", vmin=0, vmax=max(grid.max(), 1.0 / len(experts) * 1.5), aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                  color="white" if value < grid.max() * 0.6 else "black")
    names = ["shallow ", "middle ", "deep "] if len(layers) == 3 else [""] * len(layers)
    axes.set_yticks(range(len(layers)), [f"{n}block {layer}" for n, layer in zip(names, layers)])
    axes.set_xticks(range(len(experts)), experts)
    axes.set_xlabel("B expert")
    first = max(row["first_step"] for row in rows)
    resumed = f"\nresumed: sums from step {first}" if first != 1 else ""
    axes.set_title(f"{task_label(task)} ({target} routers){resumed}")
    return image


def draw(tasks: list[str], rows: list[dict]):
    figure = new_figure(3.4 * len(tasks), 3.0)
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    image = None
    for ax, task in zip(axes, tasks):
        mine = [row for row in rows if row["task"] == task]
        if mine:
            image = heat_map(ax, task, mine)
        else:
            no_data(ax)
            ax.set_title(task_label(task))
    if image is not None:
        figure.colorbar(image, ax=list(axes), label="share of accumulated router weight", shrink=0.9)
    caption(figure, "Fig. 4: share of each B expert in a layer's router output, summed over the tokens and "
                    "steps of training (each row sums to 1; uniform = 1/number of experts). Blocks count from 0.")
    return figure


def render(results_dir: Path, out_dir: Path, group: str | None = None) -> Rendered:
    name, group = output_name("fig4", group), group or GROUP
    found = captured(finished(results_dir, [group]))
    tasks = swept(f"{group}/{EXPERIMENT}", "task.subset") or sorted(found)
    extra = DATA if group in VTAB_GROUPS else {}
    rendered = Rendered(missing=[command(f"{group}/{EXPERIMENT}", **{"task.subset": task, **extra}) for task in tasks
                                 if task not in found and experiment_exists(f"{group}/{EXPERIMENT}")])
    rows = [row for task in tasks if task in found for row in rows_of(task, *found[task])]
    if rows:
        rendered.files += save_figure(draw(tasks, rows), Path(out_dir), name)
        rendered.files.append(write_csv(rows, Path(out_dir) / f"{name}.csv"))
    return rendered
