"""Paper Fig. 5 (§4.5.2, "What's the influence of adapter granularity?"): VTAB-1K accuracy against ne (the number
of A's and of B experts, set equal) on 12 tasks, one panel per task (``fig5.png``/``.pdf``, ``fig5.csv``).

The points come from Table 4's grid records (group ``table4``: Lily kvmlp on ViT-B/16 over s × ne 2-4) and the
figure's own cells past that grid (ne 6 and 12, same group; Table 4 does not read them). For each ne,
s is chosen the way Table 4 chooses its cells (the rule in ``lilyexp/tables/specs/table4.yaml``: the best
accuracy over s, on the test split under the paper protocol, on val200 under the honest one), so each point is
the best s at that ne. The paper protocol is drawn solid, the honest protocol dashed where its records exist.
"""

from __future__ import annotations

from pathlib import Path

from lilyexp.figures import Rendered, save_figure, write_csv
from lilyexp.figures.plots import (caption, command, finished, new_figure, no_data, output_name, setting, swept,
                                   task_label)
from lilyexp.tables.build import choose, load_spec, method_row

GROUP = "table4"
EXPERIMENT = "fig5/lily"  # the 12 tasks and the ne grid it sweeps
METRIC = "test/accuracy"
DATA = {"task.data_dir": "/path/to/vtab-1k"}  # the VTAB-1K release (Table 4's cells need it)
SELECTIONS = {"test_selected": ("paper protocol (test-selected)", "-", "tab:red"),
              "val_selected": ("honest protocol (val-selected)", "--", "tab:grey")}


def lily_rule() -> dict:
    """Table 4's rule for Lily's cells, choosing s alone (ne is the figure's axis)."""
    row = method_row(load_spec("table4"), "lily")
    return {**row["choose"], "over": [key for key in row["choose"]["over"] if key != "method.ne_1"]}


def points(records: list[dict], task: str, selection: str) -> list[dict]:
    """One point per ne with a finished Lily record of ``task``: accuracy (%) at the s the rule chooses."""
    mine = [r for r in records if setting(r, "task.subset") == task and setting(r, "method.name") == "lily"]
    result = []
    for ne in sorted({setting(r, "method.ne_1") for r in mine}):
        cell = choose([r for r in mine if setting(r, "method.ne_1") == ne], lily_rule(), selection, METRIC, 100)
        if cell.mean is not None:
            result.append({"task": task, "ne": ne, "selection": selection, "accuracy": round(cell.mean, 2),
                           "std": round(cell.std, 2), "seeds": cell.n, "chosen": cell.chosen or "",
                           "adapter_params": cell.params[0] if cell.params else None})
    return result


def draw_task(axes, task: str, rows: list[dict]) -> None:
    axes.set_title(task_label(task), fontsize=9)
    mine = [row for row in rows if row["task"] == task]
    if not mine:
        no_data(axes)
        return
    for selection, (label, style, color) in SELECTIONS.items():
        line = [row for row in mine if row["selection"] == selection]
        if line:
            axes.plot([row["ne"] for row in line], [row["accuracy"] for row in line], style, marker="o",
                      color=color, label=label)
        for row in line if selection == "test_selected" else []:  # the s each point uses
            axes.annotate(row["chosen"].replace("=", " "), (row["ne"], row["accuracy"]), fontsize=6,
                          textcoords="offset points", xytext=(0, 5), ha="center")
    axes.set_xticks(sorted({row["ne"] for row in mine}))
    axes.set_xlabel("ne (A's = B experts)", fontsize=8)
    axes.set_ylabel("top-1 accuracy (%)", fontsize=8)
    axes.grid(alpha=0.3)
    axes.margins(x=0.15, y=0.2)


def draw(tasks: list[str], rows: list[dict]):
    columns = min(4, len(tasks))
    lines = -(-len(tasks) // columns)
    figure = new_figure(3.0 * columns, 2.5 * lines + 0.6)
    axes = figure.subplots(lines, columns, squeeze=False).flatten()
    for ax, task in zip(axes, tasks):
        draw_task(ax, task, rows)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    handles, labels = next(((h, label) for h, label in (ax.get_legend_handles_labels() for ax in axes) if h), ([], []))
    if handles:
        figure.legend(handles, labels, loc="outside upper center", ncols=len(handles), fontsize=8)
    caption(figure, "Fig. 5: Lily (kvmlp, ViT-B/16) accuracy against ne = ne_1 = ne_2 on VTAB-1K (ne 2-4: Table 4's "
                    "grid; 6 and 12: the figure's own cells); at each ne, s is the best of Table 4's s grid by Table "
                    "4's rule (its value in fig5.csv).")
    return figure


def render(results_dir: Path, out_dir: Path, group: str | None = None) -> Rendered:
    name = output_name("fig5", group)
    records = finished(results_dir, [group or GROUP])
    tasks = swept(EXPERIMENT, "task.subset") or sorted({setting(r, "task.subset") for r in records})
    grid = [int(ne) for ne in swept(EXPERIMENT, "method.ne_1") or swept("table4/lily", "method.ne_1") or []]
    rows = [row for task in tasks for selection in SELECTIONS for row in points(records, task, selection)]
    have = {(row["task"], row["ne"]) for row in rows if row["selection"] == "test_selected"}
    rendered = Rendered(missing=[command(EXPERIMENT, **{"task.subset": task, "method.ne_1": ne, **DATA})
                                 for task in tasks for ne in grid if (task, ne) not in have])
    if rows:
        rendered.files += save_figure(draw(tasks, rows), Path(out_dir), name)
        rendered.files.append(write_csv(rows, Path(out_dir) / f"{name}.csv"))
    return rendered
