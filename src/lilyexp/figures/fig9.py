"""Paper Fig. 9 (App. I, "How to allocate parameters?"): commonsense-reasoning accuracy of Lily on LLaMA3-8B when
one parameter budget is spent on rank or on experts (r 32 ne 2, r 16 ne 4, r 8 ne 8, r 4 ne 16, ne = ne_1 =
ne_2, all 1,185,792 parameters), per test set and on average, as grouped bars (``fig9.png``/``.pdf``,
``fig9.csv``).

Records: group ``fig9`` (``conf/experiment/fig9/lily.yaml``, Table 2's recipe at the other ranks) and Table 2's
Lily cell (group ``table2``, r 16 ne 4). Accuracies are Table 2's: the test of the adapter selected on the
validation loss (``val_selected``), mean over seeds; the test sets and their labels are Table 2's columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lilyexp.figures import Rendered, save_figure, write_csv
from lilyexp.figures.plots import caption, command, finished, groups_of, new_figure, output_name, setting, swept
from lilyexp.tables.build import aggregate, load_spec

GROUPS = ("fig9", "table2")
EXPERIMENT = "fig9/lily"
SHARED_CELL = {"r": 16, "experiment": "table2/lily"}  # the budget's point Table 2 already runs
SELECTION = "val_selected"


def columns() -> list[dict]:
    """Table 2's test-set columns (label, metric); the average is computed here."""
    return [c for c in load_spec("table2")["columns"] if "metric" in c]


def variants(records: list[dict]) -> dict[tuple[int, int, int], list[dict]]:
    """(r, ne_1, ne_2) -> Lily records (Table 2's recipe: the same learning rate and targets)."""
    grouped: dict[tuple, list[dict]] = {}
    for record in records:
        if setting(record, "method.name") == "lily":
            key = tuple(setting(record, f"method.{k}") for k in ("r", "ne_1", "ne_2"))
            grouped.setdefault(key, []).append(record)
    return grouped


def rows_of(key: tuple, records: list[dict]) -> list[dict]:
    rows = []
    for column in columns():
        cell = aggregate(records, SELECTION, column["metric"], 100)
        if cell.mean is not None:
            rows.append({"r": key[0], "ne_1": key[1], "ne_2": key[2], "test_set": column["label"],
                         "accuracy": round(cell.mean, 2), "std": round(cell.std, 2), "seeds": cell.n,
                         "adapter_params": cell.params[0]})
    if len(rows) == len(columns()):
        rows.append({**rows[0], "test_set": "Avg", "accuracy": round(np.mean([r["accuracy"] for r in rows]), 2),
                     "std": None})
    return rows


def draw(rows: list[dict]):
    keys = sorted({(row["r"], row["ne_1"], row["ne_2"]) for row in rows}, reverse=True)
    sets = [c["label"] for c in columns()] + ["Avg"]
    figure = new_figure(11.0, 3.6)
    axes = figure.subplots()
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        values = {row["test_set"]: row["accuracy"] for row in rows if (row["r"], row["ne_1"], row["ne_2"]) == key}
        params = next(row["adapter_params"] for row in rows if (row["r"], row["ne_1"], row["ne_2"]) == key)
        axes.bar(np.arange(len(sets)) + (k - (len(keys) - 1) / 2) * width, [values.get(s, 0) for s in sets],
                 width, label=f"r {key[0]}, ne {key[1]}" + (f" ({params / 1e6:.2f}M)" if params else ""),
                 color=f"C{k}")
    axes.set_xticks(range(len(sets)), sets)
    axes.set_ylabel("accuracy (%)")
    figure.legend(*axes.get_legend_handles_labels(), fontsize=8, ncols=len(keys), loc="outside upper center")
    values = [row["accuracy"] for row in rows]
    axes.set_ylim(max(0, min(values) - 10), min(100, max(values) + 5))
    axes.grid(axis="y", alpha=0.3)
    caption(figure, "Fig. 9: Lily on LLaMA3-8B, commonsense reasoning, one parameter budget spent on rank r or on "
                    "experts ne (= ne_1 = ne_2); adapter parameters in parentheses; accuracy of the adapter "
                    "selected on validation loss. The backbone is an assumption: the paper's text does not name it; "
                    "LLaMA3-8B is its commonsense backbone (Table 2).")
    return figure


def missing(found: set[int]) -> list[str]:
    ranks = [int(r) for r in swept(EXPERIMENT, "method.r") or []]
    commands = [command(EXPERIMENT, **{"method.r": r}) for r in ranks if r not in found]
    if SHARED_CELL["r"] not in found:
        commands.append(command(SHARED_CELL["experiment"]))
    return commands


def render(results_dir: Path, out_dir: Path, group: str | None = None) -> Rendered:
    name = output_name("fig9", group)
    grouped = variants(finished(results_dir, groups_of(group, list(GROUPS))))
    rows = [row for key, records in sorted(grouped.items()) for row in rows_of(key, records)]
    rendered = Rendered(missing=missing({row["r"] for row in rows}) if not group else [])
    if rows:
        rendered.files += save_figure(draw(rows), Path(out_dir), name)
        rendered.files.append(write_csv(rows, Path(out_dir) / f"{name}.csv"))
    return rendered
