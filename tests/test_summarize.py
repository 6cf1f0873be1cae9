"""The Markdown summaries of run records: every number from a record, seeds aggregated correctly."""

from __future__ import annotations

import json
import statistics
import sys


from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import summarize  # noqa: E402


def record(task: str, method: str, seed: int, best: float, last: float, status: str = "finished") -> dict:
    return {"status": status, "main_metric": "val/accuracy", "params": {"adapter": 1000},
            "config": {"task": {"name": "glue", "task_name": task}, "method": {"name": method}, "seed": seed,
                       "backbone": {"name": "minilm"}},
            "metrics": {"final": {"val/accuracy": best}, "last": {"val/accuracy": last}}}


def test_seed_table_aggregates_per_task_and_method(tmp_path):
    rows = [record("mrpc", "lily", s, b, l) for s, b, l in ((0, 0.8, 0.7), (1, 0.9, 0.85), (2, 0.85, 0.8))]
    rows += [record("mrpc", "lora", 0, 0.75, 0.75), record("mrpc", "lora", 1, 0.1, 0.1, status="failed")]
    for i, r in enumerate(rows):
        (tmp_path / f"r{i}.json").write_text(json.dumps(r))
    text = summarize.seed_table(summarize.load_records(tmp_path))
    lily = next(line for line in text.splitlines() if "| lily |" in line)
    assert f"{100 * statistics.mean([0.8, 0.9, 0.85]):.2f} ± {100 * statistics.stdev([0.8, 0.9, 0.85]):.2f}" in lily
    assert "3 (0, 1, 2)" in lily
    lora = next(line for line in text.splitlines() if "| lora |" in line)
    assert "1 (0)" in lora and "75.00 ± 0.00" in lora  # the failed run is left out


def test_untuned_row_appears_once_per_distinct_result():
    base = {"status": "finished", "params": {"adapter": 5}, "config": {"method": {"name": "m"}, "seed": 0,
            "backbone": {"name": "b"}}}
    first = {**base, "metrics": {"initial": {"test/accuracy/a": 0.0}, "final": {"test/accuracy/a": 0.5}}}
    second = {**base, "metrics": {"initial": {"test/accuracy/a": 0.0}, "final": {"test/accuracy/a": 0.7}}}
    text = summarize.table([first, second])
    assert text.count("untuned b") == 1 and "50.0" in text and "70.0" in text
