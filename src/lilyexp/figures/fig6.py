"""Paper Fig. 6 (§4.5.4, "What's the hardware efficiency?"): training time and peak memory of Lily vs LoRA, from
real run records (their ``timing``: the median time per optimizer step, the summed training time, the run's peak
memory and how it was measured), one row of panels per setting (``fig6.png``/``.pdf``, ``fig6.csv``).

The paper's two settings (:data:`SETTINGS`): NLU, RoBERTa-base on CoLA for 10 epochs (group ``fig6``,
``conf/experiment/fig6``), and LLM, the Falcon-Mamba-7B commonsense cells of Table 1 (group ``table1``). With
``--group a[,b]`` each (backbone, task) those groups hold is a setting (e.g. the CPU replication
``figures_minilm`` and ``commonsense_smollm2``). Values are means over seeds of each method's unlabelled cell
(records with a ``setting`` label are variants, left out).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from lilyexp.figures import Rendered, save_figure, write_csv
from lilyexp.figures.plots import (COLORS, METHOD_LABELS, caption, command, experiment_exists, finished, group_of,
                                   groups_of, new_figure, output_name, setting, task_label,
                                   training_length)
from lilyexp.tables.build import matches, newest_per_seed

SETTINGS = (
    {"label": "NLU: RoBERTa-base, CoLA, 10 epochs", "group": "fig6",
     "where": {"backbone.name": "roberta", "task.subset": "cola"},
     "experiments": {"lily": "fig6/lily", "lora": "fig6/lora"}},
    {"label": "LLM: Falcon-Mamba-7B, commonsense (Table 1)", "group": "table1",
     "where": {"backbone.name": "falcon_mamba"},  # Table 1's Lily (in) and its 3.7M LoRA (Δ+in) row
     "method_where": {"lily": {"method.target_modules": ["in_proj"]},
                      "lora": {"method.target_modules": ["in_proj", "dt_proj"]}},
     "experiments": {"lily": "table1/lily_in", "lora": "table1/lora_dt_in"}},
)
METHODS = ("lily", "lora")
MEASURES = (("step_s", "time per step (s)", 1.0), ("train_s", "training time (min)", 1 / 60),
            ("peak_mem_bytes", "peak memory (GiB)", 1 / 2**30))


def settings_of(groups: list[str], records: list[dict]) -> list[dict]:
    """One setting per (group, backbone, task, subset) in the records of another group."""
    keys = sorted({(group_of(r), setting(r, "backbone.name"), setting(r, "task.name"),
                    str(setting(r, "task.subset"))) for r in records}, key=str)
    return [{"label": f"{backbone}, {task_label(subset) if subset != 'None' else task}", "group": group,
             "where": {"backbone.name": backbone, "task.name": task},
             "subset": subset, "experiments": {m: f"{group}/{m}" for m in METHODS}}
            for group, backbone, task, subset in keys if group in groups]


def runs_of(item: dict, records: list[dict], method: str) -> list[dict]:
    where = {**item["where"], **item.get("method_where", {}).get(method, {})}
    mine = [r for r in records if group_of(r) == item["group"] and matches(r, where)
            and setting(r, "method.name") == method and r.get("timing", {}).get("step_s") is not None
            and setting(r, "setting") is None]  # a labelled variant (e.g. another learning rate) is another cell
    if "subset" in item:
        mine = [r for r in mine if str(setting(r, "task.subset")) == item["subset"]]
    return newest_per_seed(mine)


def row_of(item: dict, method: str, runs: list[dict]) -> dict:
    timing = [r["timing"] for r in runs]
    row = {"setting": item["label"], "method": METHOD_LABELS[method], "seeds": len(runs),
           "training": training_length(runs[0]), "adapter_params": runs[0]["params"].get("adapter"),
           "peak_mem_kind": timing[0].get("peak_mem_kind"), "device": runs[0].get("env", {}).get("device"),
           "timed_steps": timing[0].get("timed_steps"), "global_batch": runs[0].get("batch", {}).get("global_batch"),
           "resumed": any(r.get("resumed_from_step") for r in runs)}
    for key, _, scale in MEASURES:
        values = [t[key] for t in timing if t.get(key) is not None]
        row[key] = statistics.mean(values) * scale if values else None
    row["peak_mem_gib"] = row.pop("peak_mem_bytes")
    row["train_min"] = row.pop("train_s")
    row["records"] = " ".join(Path(r["_path"]).name for r in runs)
    return row


MEMORY_KINDS = {"cuda_max_allocated": "CUDA", "cpu_peak_rss": "CPU RSS", "cpu_lifetime_max_rss": "CPU RSS, process"}


def draw_panel(axes, rows: list[dict], key: str, label: str) -> None:
    """Lily and LoRA side by side (a method without a record keeps its place, marked)."""
    column = {"train_s": "train_min", "peak_mem_bytes": "peak_mem_gib"}.get(key, key)
    by_method = {row["method"]: row.get(column) for row in rows}
    names = [METHOD_LABELS[m] for m in METHODS]
    bars = axes.bar(names, [by_method.get(n) or 0 for n in names], color=[COLORS.get(n, "grey") for n in names])
    axes.bar_label(bars, labels=[f"{by_method[n]:.3g}" if by_method.get(n) is not None else "no record"
                                 for n in names], fontsize=8)
    kind = next((MEMORY_KINDS.get(row.get("peak_mem_kind"), row.get("peak_mem_kind")) for row in rows), None)
    axes.set_ylabel(label.replace(")", f", {kind})") if key == "peak_mem_bytes" and kind else label, fontsize=8)
    axes.margins(y=0.15)


def title_of(item: dict, rows: list[dict]) -> str:
    """The setting, its length, the batch each method trained with (they should agree) and the device."""
    length = rows[0]["training"] if rows else None
    title = item["label"]
    if length and "epoch" not in title:
        title += f", {length}"
    batches = " / ".join(f"{row['method']} {row['global_batch']}" for row in rows if row.get("global_batch"))
    title += f", batch {batches}" if batches else ""
    title += " (a resumed run: its training time covers the steps after the resume)" \
        if any(row.get("resumed") for row in rows) else ""
    return title + (f" — {rows[0]['device']}" if rows and rows[0].get("device") else "")


def draw(items: list[dict], rows: list[dict]):
    figure = new_figure(9.0, 2.4 * len(items) + 0.4)
    axes = figure.subplots(len(items), len(MEASURES), squeeze=False)
    for line, item in zip(axes, items):
        mine = [row for row in rows if row["setting"] == item["label"]]
        for ax, (key, label, _) in zip(line, MEASURES):
            draw_panel(ax, mine, key, label)
        line[0].set_title(title_of(item, mine), loc="left", fontsize=9)
    caption(figure, "Fig. 6: training cost of Lily vs LoRA from the run records: median time per optimizer step "
                    "(evaluation excluded), total training time, and the run's peak memory (CUDA allocator peak on "
                    "GPU, peak resident set on CPU). Falcon-Mamba: Lily (in) beside the paper's LoRA (Δ+in), whose "
                    "dt_proj adapter runs here (in the official runs it did not).")
    return figure


def render(results_dir: Path, out_dir: Path, group: str | None = None) -> Rendered:
    name = output_name("fig6", group)
    groups = groups_of(group, sorted({item["group"] for item in SETTINGS}))
    records = finished(results_dir, groups)
    items = settings_of(groups, records) if group else list(SETTINGS)
    rendered, rows = Rendered(), []
    for item in items:
        for method in METHODS:
            runs = runs_of(item, records, method)
            if runs:
                rows.append(row_of(item, method, runs))
            elif experiment_exists(item["experiments"][method]):
                rendered.missing.append(command(item["experiments"][method]))
    for empty in sorted(set(groups) - {group_of(r) for r in records}) if group else []:
        rendered.missing += [command(f"{empty}/{m}") for m in METHODS if experiment_exists(f"{empty}/{m}")]
    if rows:  # a setting without any record is left out of the picture; its commands are in rendered.missing
        drawn = [item for item in items if any(row["setting"] == item["label"] for row in rows)]
        rendered.files += save_figure(draw(drawn, rows), Path(out_dir), name)
        rendered.files.append(write_csv(rows, Path(out_dir) / f"{name}.csv"))
    return rendered
