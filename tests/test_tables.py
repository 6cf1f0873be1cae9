"""Paper tables from run records: cells, seed aggregation, failed and missing cells, provenance, the selection
rule, an explicit per-cell choice, and the three renderings (LaTeX compiled when a TeX engine is installed)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
import subprocess

import pytest
import yaml

from lilyexp.records import run_metrics
from lilyexp.tables.__main__ import render
from lilyexp.tables.build import build, load_spec, read_records, spec_names
from lilyexp.tables.render import csv_text, latex, markdown

SPEC = {
    "name": "fixture", "title": "Fixture table", "groups": ["g"], "selections": ["best_epoch"],
    "columns": [
        {"label": "MRPC", "where": {"task.subset": "mrpc"}, "metric": "val/accuracy", "vars": {"task": "mrpc"}},
        {"label": "CoLA", "where": {"task.subset": "cola"}, "metric": "val/mcc", "vars": {"task": "cola"}},
        {"label": "Avg", "mean_of": ["MRPC", "CoLA"]},
    ],
    "rows": [
        {"label": "Lily", "where": {"method.name": "lily"}, "command": "run lily_{task}",
         "paper": {"params": "0.3M", "provenance": "secondary", "source": "a note",
                   "values": {"MRPC": 90.0, "CoLA": 60.0, "Avg": 75.0}}},
        {"label": "LoRA", "where": {"method.name": "lora"}, "command": "run lora_{task}",
         "paper": {"params": "0.3M", "provenance": "primary", "values": {"MRPC": 89.0}}},
        {"label": "FourierFT", "paper": {"params": "0.02M", "provenance": "primary", "values": {"MRPC": 88.0}}},
    ],
}


def record(method, task, seed, best, last=None, status="finished", s=None, error=None, params=300,
           rule="best_epoch"):
    metric = "val/accuracy" if task == "mrpc" else "val/mcc"
    cfg = {"method": {"name": method, "s": s}, "task": {"subset": task}, "seed": seed, "backbone": {"name": "b"}}
    out = {"schema": 2, "status": status, "config": cfg, "params": {"adapter": params, "trainable": params}}
    history = [{"step": 1, metric: best}, {"step": 2, metric: last if last is not None else best}]
    out["metrics"] = run_metrics(final={metric: best}, rule=rule, metric=metric, mode="max", best=history[0],
                                 history=history) if status == "finished" else {}
    if error:
        out["error"] = error
    return out


def write(tmp_path, records):
    folder = tmp_path / "runs" / "g"
    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(records):
        (folder / f"r{i}.json").write_text(json.dumps(r))
    return read_records(tmp_path / "runs", ["g"])


def cells(table, label):
    return next(entry["cells"] for entry in table.rows if entry["row"]["label"] == label)


def test_seeds_are_aggregated_and_failed_runs_left_out(tmp_path):
    records = write(tmp_path, [record("lily", "mrpc", s, v) for s, v in ((0, 0.90), (1, 0.92), (2, 0.91))]
                    + [record("lily", "cola", 0, 0.5), record("lily", "cola", 1, None, status="failed", error="NaN")])
    table = build(SPEC, records, "best_epoch")
    mrpc = cells(table, "Lily")["MRPC"]
    assert mrpc.mean == pytest.approx(statistics.mean([90, 92, 91])) and mrpc.std == pytest.approx(1.0)
    assert mrpc.seeds == [0, 1, 2] and mrpc.params == [300, 300, 300]
    assert cells(table, "Lily")["CoLA"].n == 1  # the failed seed is not a number
    assert cells(table, "Lily")["Avg"].mean == pytest.approx((91 + 50) / 2)


def test_a_median_row_prints_the_median_and_the_csv_keeps_mean_std_and_median(tmp_path):
    spec = {**SPEC, "rows": [{**SPEC["rows"][1], "statistic": "median"}]}
    scores = ((0, 0.90), (1, 0.80), (2, 0.91), (3, 0.92), (4, 0.89))
    records = write(tmp_path, [record("lora", "mrpc", s, v) for s, v in scores]
                    + [record("lora", "cola", s, v) for s, v in ((0, 0.5), (1, 0.6), (2, 0.1))])
    table = build(spec, records, "best_epoch")
    mrpc, avg = cells(table, "LoRA")["MRPC"], cells(table, "LoRA")["Avg"]
    assert mrpc.shown == pytest.approx(90.0) and mrpc.mean == pytest.approx(88.4)
    assert avg.mean == pytest.approx((90.0 + 50.0) / 2)  # the mean of the medians
    assert "90.0 (median, n=5)" in markdown(table) and "+1.0" in markdown(table)  # Δ against the paper's 89.0
    rows = csv.DictReader(io.StringIO(csv_text(table)))
    row = next(r for r in rows if r["column"] == "MRPC" and r["source"] == "ours")
    assert float(row["value"]) == pytest.approx(88.4) and float(row["median"]) == pytest.approx(90.0)


def test_a_rerun_replaces_the_older_record_of_the_same_seed(tmp_path):
    folder = tmp_path / "runs" / "g"
    folder.mkdir(parents=True)
    (folder / "old.json").write_text(json.dumps(record("lily", "mrpc", 0, 0.5)))
    import os
    os.utime(folder / "old.json", (1, 1))
    (folder / "new.json").write_text(json.dumps(record("lily", "mrpc", 0, 0.8)))
    table = build(SPEC, read_records(tmp_path / "runs", ["g"]), "best_epoch")
    assert cells(table, "Lily")["MRPC"].mean == pytest.approx(80) and cells(table, "Lily")["MRPC"].n == 1


def test_missing_and_failed_cells_say_so_with_the_command_and_reason(tmp_path):
    records = write(tmp_path, [record("lora", "mrpc", 0, 0.8), record("lora", "cola", 0, None, status="failed",
                                                                     error="Lily ne_1=4 asks for too many A's")])
    text = markdown(build(SPEC, records, "best_epoch"))
    lily_ours = next(line for line in text.splitlines() if line.startswith("| Lily — ours"))
    assert lily_ours.count("—") >= 3  # no record: a dash, never a number
    assert "`run lily_mrpc`" in text and "`run lily_cola`" in text
    lora_ours = next(line for line in text.splitlines() if line.startswith("| LoRA — ours"))
    assert "80.0 (n=1)" in lora_ours and "failed" in lora_ours
    assert "failed: r1.json: Lily ne_1=4 asks for too many A's" in text


def test_paper_numbers_carry_their_provenance_and_the_difference(tmp_path):
    records = write(tmp_path, [record("lily", "mrpc", 0, 0.915)])
    text = markdown(build(SPEC, records, "best_epoch"))
    assert "| Lily — paper† | 0.3M | 90.0 | 60.0 | 75.0 |" in text
    assert "| Lily — Δ |  | +1.5 |" in text
    assert "| FourierFT — paper | 0.02M | 88.0 |" in text
    assert "† secondary" in text and "Lily: paper numbers from a note." in text
    assert "Selection: best evaluation on the validation split" in text


def test_last_epoch_selection_reads_the_last_epoch(tmp_path):
    records = write(tmp_path, [record("lily", "mrpc", 0, best=0.9, last=0.7)])
    assert cells(build(SPEC, records, "last_epoch"), "Lily")["MRPC"].mean == pytest.approx(70)
    assert "Selection: the last evaluation (no selection)." in markdown(build(SPEC, records, "last_epoch"))


def test_a_per_cell_choice_follows_the_stated_rule(tmp_path):
    spec = {**SPEC, "rows": [{**SPEC["rows"][0], "choose": {"over": "method.s", "by": "val/accuracy", "mode": "max",
                                                         "selection": "last_epoch"}}]}
    records = write(tmp_path, [record("lily", "mrpc", 0, best=0.95, last=0.80, s=0.01),
                               record("lily", "mrpc", 0, best=0.90, last=0.85, s=0.1)])
    cell = cells(build(spec, records, "best_epoch"), "Lily")["MRPC"]
    assert cell.chosen == "s=0.1" and cell.mean == pytest.approx(90)  # chosen on the last epoch, reported best
    assert "[s=0.1]" in markdown(build(spec, records, "best_epoch"))


def test_a_joint_choice_with_a_metric_per_selection_rule(tmp_path):
    """VTAB's rule: s and ne chosen together, on the test accuracy under test-selected (the paper's) and on val200
    under val-selected (honest); each record holds the dict its protocol writes."""
    rule = {"over": ["method.s", "method.ne_1"], "by": {"test_selected": "val/accuracy", "val_selected": "val/mcc"}}
    spec = {**SPEC, "rows": [{**SPEC["rows"][0], "choose": rule}]}

    def vtab_records(s, ne, paper, honest_val):  # one run per protocol, as the table4 sweep makes them
        runs = [record("lily", "mrpc", 0, paper, s=s, rule="test_selected"),
                record("lily", "mrpc", 0, paper - 0.1, s=s, rule="val_selected")]
        runs[1]["metrics"]["final"]["val/mcc"] = honest_val
        for r in runs:
            r["config"]["method"]["ne_1"] = ne
        return runs
    records = write(tmp_path, [*vtab_records(0.1, 2, 0.9, 0.5), *vtab_records(1.0, 4, 0.8, 0.7)])
    paper = cells(build(spec, records, "test_selected"), "Lily")["MRPC"]
    honest = cells(build(spec, records, "val_selected"), "Lily")["MRPC"]
    assert paper.chosen == "s=0.1, ne_1=2" and paper.mean == pytest.approx(90)
    assert honest.chosen == "s=1.0, ne_1=4" and honest.mean == pytest.approx(70)


def test_csv_is_long_format_with_every_number_sourced(tmp_path):
    records = write(tmp_path, [record("lily", "mrpc", s, v) for s, v in ((0, 0.9), (1, 0.8))])
    rows = list(csv.DictReader(io.StringIO(csv_text(build(SPEC, records, "best_epoch")))))
    ours = next(r for r in rows if r["row"] == "Lily" and r["column"] == "MRPC" and r["source"] == "ours")
    assert float(ours["value"]) == pytest.approx(85) and ours["n"] == "2" and ours["seeds"] == "0 1"
    paper = next(r for r in rows if r["row"] == "Lily" and r["column"] == "MRPC" and r["source"] == "paper")
    assert paper["provenance"] == "secondary" and float(paper["value"]) == 90.0
    assert {r["status"] for r in rows if r["source"] == "ours" and r["column"] == "CoLA"} == {"missing"}


def latex_document(body: str) -> str:
    return "\\documentclass{article}\n\\begin{document}\n" + body + "\\end{document}\n"


def test_latex_is_well_formed(tmp_path):
    records = write(tmp_path, [record("lily", "mrpc", s, v) for s, v in ((0, 0.9), (1, 0.8))])
    tex = latex(build(SPEC, records, "best_epoch"))
    body = tex.split("\\begin{tabular}")[1].split("\\end{tabular}")[0]
    columns = body.split("}", 1)[0].strip("{")
    data_lines = [line for line in body.split("\n")[1:] if line.endswith("\\\\")]
    assert all(line.count(" & ") == len(columns) - 1 for line in data_lines)
    assert tex.count("{") == tex.count("}") and "±" not in tex and "_" not in tex.replace("\\_", "")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no TeX engine (pdflatex) installed")
def test_latex_compiles(tmp_path):
    records = write(tmp_path, [record("lily", "mrpc", s, v) for s, v in ((0, 0.9), (1, 0.8))])
    engine = shutil.which("pdflatex")
    (tmp_path / "t.tex").write_text(latex_document(latex(build(SPEC, records, "best_epoch"))))
    result = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.parametrize("name", spec_names())
def test_every_packaged_table_renders_from_no_records(name, tmp_path):
    spec = load_spec(name)
    labels = {c["label"] for c in spec["columns"]}
    for column in spec["columns"]:
        assert set(column.get("mean_of", [])) <= labels
    for row in spec["rows"]:
        paper = row.get("paper")
        assert paper is None or paper.get("provenance") in ("primary", "secondary", "repo-derived", "reference",
                                                            "not recovered")
        assert set((paper or {}).get("values", {})) <= labels
        assert row.get("where") is None or row.get("command"), f"{row['label']}: a cell we run needs its command"
    path = render(name, tmp_path / "runs", tmp_path / "tables")
    text = path.read_text()
    assert spec["title"] in text
    assert (tmp_path / "tables" / f"{name}.tex").exists() and (tmp_path / "tables" / f"{name}.csv").exists()


def test_table2_paper_numbers_are_the_recovered_ones(shared_data):
    """Every packaged Table 2 number and provenance equals the project's recovered table (../shared/paper)."""
    recovered = {row["method"]: row for row in yaml.safe_load((shared_data.parent / "paper" / "table02.yaml")
                                                              .read_text())["rows"]}
    spec = load_spec("table2")
    checked = 0
    for row in spec["rows"]:
        paper = row.get("paper") or {}
        for label, value in paper.get("values", {}).items():
            assert recovered[row["label"]][label] == value, (row["label"], label)
            checked += 1
    assert checked >= 40
    marks = {row["label"]: row["paper"]["provenance"] for row in spec["rows"] if row.get("paper")}
    assert marks["Lily"] == "secondary" and {marks[m] for m in ("LoRA", "PiSSA", "MiLoRA", "ChatGPT")} == {"primary"}


def cells_and_commands():
    """One (table, row, column) per distinct experiment file a table's commands name: a column variable that
    picks the experiment file (table3's lily_{task}) is composed per column, one that only overrides a setting
    (task.subset={task}) once per row, the other columns checked to filter on exactly that setting."""
    for name in spec_names():
        spec = load_spec(name)
        for row in spec["rows"]:
            if not row.get("command"):
                continue
            columns = [c for c in spec["columns"] if "mean_of" not in c]
            per_column = "experiment=" in row["command"] and "{" in row["command"].split("experiment=")[1].split()[0]
            for column in columns if per_column else ([columns[0]] if "{" in row["command"] else [None]):
                yield name, spec, row, column
            if row.get("command_all"):  # the one sweep command printed for a row without any record
                yield name, spec, {**row, "command": row["command_all"], "label": row["label"] + " (all)"}, None


def test_override_variables_select_the_column_they_fill():
    for name in spec_names():
        spec = load_spec(name)
        for row in spec["rows"]:
            if "task.subset={task}" in (row.get("command") or ""):
                for column in (c for c in spec["columns"] if "mean_of" not in c):
                    assert column["where"] == {"task.subset": column["vars"]["task"]}, (name, column)


@pytest.mark.parametrize("name,spec,row,column",
                         [pytest.param(*c, id=f"{c[0]}:{c[2]['label']}:{(c[3] or {}).get('label', '')}")
                          for c in cells_and_commands()])
def test_each_cells_command_produces_records_that_land_in_that_cell(name, spec, row, column):
    """Compose the command a table prints for a missing cell: its config must match the cell's filters and
    its records must go to a folder the table reads."""
    from omegaconf import OmegaConf

    from conftest import compose_run
    from lilyexp.tables.build import matches
    command = row["command"].format(**(column or {}).get("vars", {}))
    overrides = [token for token in command.split() if "=" in token]
    cfg = OmegaConf.to_container(compose_run(overrides), resolve=True)
    assert cfg["group"] in spec["groups"]
    assert matches({"config": cfg}, row["where"]), (command, row["where"])
    if column is not None:
        assert matches({"config": cfg}, column.get("where")), (command, column["where"])


def test_a_group_table_scales_scores_by_100_but_prints_losses_as_they_are(tmp_path):
    from lilyexp.tables.build import group_spec

    records = []
    for seed in (0, 1):
        one = record("lily", "mrpc", seed, 0.8)
        one["identity"] = {"method": "lily", "seed": seed}
        one["metrics"]["final"]["val/loss"] = 0.5
        records.append(one)
    records = write(tmp_path, records)
    table = build(group_spec("g", records), records, "best_epoch")
    row = table.rows[0]["cells"]
    assert row["val/accuracy"].mean == pytest.approx(80.0) and row["val/loss"].mean == pytest.approx(0.5)


def test_records_read_into_a_dataframe_with_the_settings_that_differ(tmp_path):
    from lilyexp.records import to_dataframe

    records = []
    for seed, lr in ((0, 1e-3), (1, 1e-3), (0, 1e-2)):
        one = record("lily", "mrpc", seed, 0.7 + lr)
        one["identity"] = {"method": "lily", "seed": seed, "trainer.lr": lr, "task.subset": "mrpc"}
        records.append(one)
    write(tmp_path, records)
    frame = to_dataframe(tmp_path / "runs", "g")
    assert len(frame) == 3 and list(frame.columns[:3]) == ["group", "run", "status"]
    assert "setting.trainer.lr" in frame.columns and "setting.task.subset" not in frame.columns  # same everywhere
    assert sorted(frame["final.val/accuracy"]) == pytest.approx([0.701, 0.701, 0.71])
    with pytest.raises(Exception, match="no record group nope"):
        to_dataframe(tmp_path / "runs", "nope")


def test_parameter_counts_read_at_every_scale():
    from lilyexp.tables.render import fmt_params

    assert fmt_params([128]) == "128" and fmt_params([62_016]) == "62.0K" and fmt_params([533_376]) == "0.533M"
    assert fmt_params([0]) == "0" and fmt_params([128, 62_016]) == "128–62.0K"


def test_a_group_of_mixed_backbones_labels_rows_by_name_not_by_architecture(tmp_path):
    from lilyexp.tables.build import group_spec

    records = []
    for backbone, width in (("tiny_a", 32), ("tiny_b", 64)):
        one = record("lily", "mrpc", 0, 0.8)
        one["identity"] = {"method": "lily", "seed": 0, "backbone": backbone,
                           "backbone.load.config": {"hidden_size": width, "num_hidden_layers": 4, "vocab": 261}}
        records.append(one)
    labels = [row["label"] for row in group_spec("g", write(tmp_path, records))["rows"]]
    assert labels == ["tiny_a lily", "tiny_b lily"]


def test_table4_reads_only_its_own_ne_grid_though_fig5s_cells_share_its_group():
    from lilyexp.tables.build import matches, method_row
    lily = method_row(load_spec("table4"), "lily")
    config = {"backbone": {"name": "vit"}, "method": {"name": "lily", "ne_1": 4}}
    assert matches({"config": config}, lily["where"])
    assert not matches({"config": {**config, "method": {"name": "lily", "ne_1": 6}}}, lily["where"])


def test_a_row_statistic_is_mean_or_median_and_a_choosing_row_prints_the_mean():
    from lilyexp.tables.build import check_statistics
    check_statistics("fixture", {"rows": [{"label": "LoRA", "statistic": "median"}, {"label": "Lily"}]})
    for row in ({"label": "x", "statistic": "mode"}, {"label": "y", "statistic": "median", "choose": {"over": "s"}}):
        with pytest.raises(SystemExit, match="statistic is one of"):
            check_statistics("fixture", {"rows": [row]})
