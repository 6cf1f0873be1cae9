"""The README's "Extending lilyexp" steps, followed as a pip user would: a peft method as one YAML, a method as one
module plus one YAML, a backbone as one YAML, all from a folder of one's own (--config-dir), run and put in a table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_RUN, run_cli

EXAMPLES = REPO / "tests" / "data" / "extending"
STEPS = ["trainer.max_steps=2", "trainer.eval_every=2"]

pytestmark = pytest.mark.slow  # real CLI subprocesses


def run_mine(args: list[str], tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(REPO / "tests")])}
    result = run_cli(["--config-dir", str(EXAMPLES / "conf"), *args, *STEPS], tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2500:]
    return result


def records(tmp_path) -> dict[str, dict]:
    found = {}
    for path in (tmp_path / "results" / "adhoc").glob("*.json"):
        record = json.loads(path.read_text())
        found[record["config"]["method"]["name"]] = record
    return found


def test_my_peft_method_my_method_module_and_my_backbone_run_and_land_in_a_table(shared_data, tmp_path):
    glue = ["task=glue", "task.subset=mrpc", f"task.data_dir={shared_data / 'glue'}", "task.train_limit=32",
            "task.eval_limit=16", "task.max_length=64", "trainer.batch_size=8"]
    run_mine(["backbone=tiny_llama", "method=loha", *TINY_RUN], tmp_path)
    run_mine(["backbone=tiny_roberta", "method=norm_tuning", *glue], tmp_path)
    run_mine(["backbone=tiny_bert", "method=lily", "method.ne_1=2", "method.ne_2=2", *glue], tmp_path)
    done = records(tmp_path)
    assert {name: r["status"] for name, r in done.items()} == {"loha": "finished", "norm_tuning": "finished",
                                                              "lily": "finished"}
    assert done["loha"]["config"]["method"]["config"]["_target_"] == "peft.LoHaConfig"
    params = done["norm_tuning"]["params"]
    assert 0 < params["trainable"] < params["total"] / 10  # the norms and the head
    assert done["lily"]["config"]["backbone"]["name"] == "tiny_bert"
    table = subprocess.run([sys.executable, "-m", "lilyexp.tables", "--group", "adhoc", "--results",
                            str(tmp_path / "results"), "--out", str(tmp_path / "tables")], capture_output=True,
                           text=True, timeout=120, cwd=REPO)
    assert table.returncode == 0, table.stderr[-1500:]
    assert "loha" in table.stdout and "norm_tuning" in table.stdout


def test_my_task_as_one_module_and_one_yaml_trains_scores_and_keeps_its_contract(tmp_path):
    data = EXAMPLES / "data"
    run_mine(["backbone=tiny_roberta", "task=jsonl_classification", f"task.data_dir={data}", "method=lora"], tmp_path)
    record = next(iter(json.loads(p.read_text()) for p in (tmp_path / "results" / "adhoc").glob("*.json")))
    assert record["status"] == "finished" and record["scoring_version"] == 1
    assert record["metrics"]["selection"]["rule"] == "best_epoch"
    assert 0 <= record["metrics"]["final"]["val/accuracy"] <= 1
    assert record["data"]["train"] == 24

