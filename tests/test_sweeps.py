"""Sweeps as the table targets run them: a failing cell is recorded and does not stop the others, a second run
skips finished cells and retries failed ones, an ``overwrite`` rerun that fails keeps the finished record, and
the same sweep through submitit's local launcher (real subprocesses, the SLURM code path)."""

from __future__ import annotations

import json

import pytest

from conftest import compose_run, run_cli
from lilyexp import run as run_module
from lilyexp.run import execute

TINY = ["backbone=tiny_llama", "trainer.max_steps=1", "task.n_train=120", "task.n_eval=2", "task.val_size=8",
        "task.cutoff_len=512", "task.generation.max_new_tokens=4", "trainer.batch_size=4"]

pytestmark = pytest.mark.slow  # real CLI subprocesses


def records(tmp_path) -> dict[float, dict]:
    out = {}
    for path in (tmp_path / "results").rglob("*.json"):
        record = json.loads(path.read_text())
        out[record["config"]["trainer"]["lr"]] = {**record, "_mtime": path.stat().st_mtime_ns}
    return out


def test_failing_cell_is_recorded_the_rest_run_and_a_rerun_retries_only_it(tmp_path):
    sweep = ["-m", "trainer.lr=-1,1e-3", *TINY, f"hydra.sweep.dir={tmp_path}/sweep"]
    first = run_cli(sweep, tmp_path)
    assert first.returncode != 0  # the sweep reports its failure, after every cell ran
    assert "1 cell(s) of the sweep failed" in first.stderr and "Traceback" not in first.stderr
    assert "trainer.lr=-1" in first.stderr and "ConfigError: learning rates must be positive" in first.stderr
    done = records(tmp_path)
    assert done[1e-3]["status"] == "finished"
    assert done[-1]["status"] == "failed" and "learning rates must be positive" in done[-1]["error"]
    assert done[-1]["error_type"] == "ConfigError"

    second = run_cli(sweep, tmp_path)
    again = records(tmp_path)
    assert again[1e-3]["_mtime"] == done[1e-3]["_mtime"]  # finished: skipped, untouched
    assert "finished record exists, skipping" in second.stdout + second.stderr
    assert again[-1]["_mtime"] > done[-1]["_mtime"]  # failed: retried


def test_a_second_run_of_a_finished_sweep_runs_nothing(tmp_path):
    sweep = ["-m", "seed=0,1", *TINY, f"hydra.sweep.dir={tmp_path}/sweep"]
    assert run_cli(sweep, tmp_path).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.json")}
    second = run_cli(sweep, tmp_path)
    assert second.returncode == 0 and (second.stdout + second.stderr).count("finished record exists, skipping") == 2
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.json")} == before


def test_a_failed_overwrite_rerun_keeps_the_finished_record(tmp_path, monkeypatch):
    cfg = compose_run(TINY, tmp_path)
    path = execute(cfg)
    finished = path.read_text()

    def broken_recipe(inputs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(run_module, "build", lambda node, **kw: broken_recipe if node is cfg.task.recipe
                        else original_build(node, **kw))
    cfg.overwrite = True
    with pytest.raises(RuntimeError, match="disk full"):
        execute(cfg)
    assert path.read_text() == finished
    failure = json.loads(next((tmp_path / "checkpoints").rglob("failed_record.json")).read_text())
    assert failure["status"] == "failed" and failure["error"] == "disk full" and "Traceback" in failure["traceback"]


original_build = run_module.build


def test_sweep_through_submitits_local_launcher(tmp_path):
    result = run_cli(["-m", "hydra/launcher=local", "seed=0,1", *TINY, f"hydra.sweep.dir={tmp_path}/sweep"],
                     tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")]
    assert sorted(r["config"]["seed"] for r in found) == [0, 1]
    assert all(r["status"] == "finished" for r in found)
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # submitit's own job folders: it really ran them


def test_a_record_made_with_another_path_to_the_same_data_counts_as_finished(tmp_path, monkeypatch):
    """Cells are identified by what they compute: ../shared/data and /abs/shared/data are the same data."""
    import os

    from lilyexp.records import RunContext
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "shared")
    relative = compose_run(["task=commonsense", "task.data_dir=./data"], tmp_path)
    absolute = compose_run(["task=commonsense", f"task.data_dir={os.path.realpath(data)}"], tmp_path)
    made = RunContext.create(absolute, [])
    made.write_record(status="finished", metrics={"final": {}}, params={})
    again = RunContext.create(relative, [])
    assert again.identity == made.identity and again.record_path == made.record_path  # paths are made absolute
    assert again.finished_record() is not None
    other = RunContext.create(compose_run(["task=commonsense", "task.data_dir=./data", "seed=3"], tmp_path), [])
    assert other.finished_record() is None


def test_a_sweep_with_several_failing_cells_names_each_of_them(tmp_path):
    sweep = ["-m", "trainer.lr=-1,-2,1e-3", *TINY, f"hydra.sweep.dir={tmp_path}/sweep"]
    result = run_cli(sweep, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    summary = result.stderr[result.stderr.index("2 cell(s) of the sweep failed"):]
    assert "trainer.lr=-1 " in summary and "trainer.lr=-2 " in summary and "trainer.lr=0.001" not in summary
    assert records(tmp_path)[1e-3]["status"] == "finished"  # the good cell ran
