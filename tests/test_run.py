"""End-to-end runs on tiny backbones: a 2-step smoke run per causal-LM architecture, the record schema, the
CLI's last line, resume after SIGKILL, and the clear one-sentence errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path
import signal

import pytest

import lilyexp.recipes.causal_lm as causal_lm
from lilyexp.errors import BackboneUnavailable, ConfigError, TrainingDiverged
from lilyexp.run import execute
from lilyexp.records import beside

from callbacks import kill_after
from conftest import compose_run, run_cli


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["tiny_llama", "tiny_falcon_mamba"])
def test_two_step_smoke_run_writes_a_complete_record(backbone, tiny_run, tmp_path):
    cfg = compose_run([f"backbone={backbone}", "trainer.max_steps=2", "trainer.eval_before_training=true",
                       *tiny_run], tmp_path)
    path = execute(cfg, ["example=override"])
    record = json.loads(path.read_text())
    assert record["status"] == "finished" and record["overrides"] == ["example=override"]
    assert record["config"]["backbone"]["name"] == backbone
    assert {"final", "best", "history", "initial"} <= set(record["metrics"])
    assert "test/accuracy/avg" in record["metrics"]["final"] and "val/loss" in record["metrics"]["final"]
    assert [h["step"] for h in record["metrics"]["history"]] == [2]
    assert 0 < record["params"]["adapter"] == record["params"]["trainable"] < record["params"]["total"]
    assert {"git_sha", "packages", "device", "torch_threads"} <= set(record["env"])
    assert record["timing"]["wall_s"] > 0 and record["timing"]["peak_mem_bytes"] > 0
    steps = [json.loads(line) for line in beside(path, "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "train/loss" in s] == [1, 2]
    predictions = beside(path, "predictions.jsonl").read_text().splitlines()
    assert {"id", "eval_set", "generation", "prediction", "answer"} <= set(json.loads(predictions[0]))
    assert len(predictions) == 16  # 8 sets × n_eval=2


@pytest.mark.slow
def test_finished_record_is_kept_unless_overwrite(tiny_run, tmp_path):
    cfg = compose_run(["backbone=tiny_llama", "trainer.max_steps=1", *tiny_run], tmp_path)
    path = execute(cfg)
    stamp = path.stat().st_mtime_ns
    assert execute(cfg) == path and path.stat().st_mtime_ns == stamp
    assert execute(compose_run(["backbone=tiny_llama", "trainer.max_steps=1", "overwrite=true", *tiny_run],
                               tmp_path)) == path
    assert path.stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_run, tmp_path):
    common = ["backbone=tiny_llama", "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.eval_every=3",
              "method.dropout=0.1", *tiny_run]
    straight = run_cli(common, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_cli([*common, kill_after(5)], tmp_path / "resumed")
    assert killed.returncode == -signal.SIGKILL
    assert not list((tmp_path / "resumed" / "results").rglob("*.json")), "a killed run must leave no record"
    resumed = run_cli([*common, "trainer.resume=true"], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.strip().splitlines()[-1].startswith("record: ")
    first = json.loads(next((tmp_path / "straight" / "results").rglob("*.json")).read_text())
    second = json.loads(next((tmp_path / "resumed" / "results").rglob("*.json")).read_text())
    assert second["resumed_from_step"] == 4 and first["resumed_from_step"] is None
    assert second["timing"]["timed_steps"] == first["timing"]["timed_steps"] == 6  # the steps before the kill too
    assert second["metrics"] == first["metrics"]
    def steps(r):
        return [json.loads(line)
                for line in (tmp_path / r / "results").rglob("*.steps.jsonl").__next__().read_text().splitlines()]
    assert steps("resumed") == steps("straight")


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_a_failed_record(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(causal_lm, "language_model_loss", lambda model, batch: model(**batch).loss * float("nan"))
    cfg = compose_run(["backbone=tiny_llama", "trainer.max_steps=3", *tiny_run], tmp_path)
    with pytest.raises(TrainingDiverged, match="at step 1"):
        execute(cfg)
    record = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    assert record["status"] == "failed" and "step 1" in record["error"]


@pytest.mark.parametrize("overrides,message", [
    (["method.r=-4"], "rank r must be a positive integer"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 evaluates a saved adapter: set method.load_from"),
    (["trainer.max_steps=-1"], "trainer.max_steps must be 0"),
    (["trainer.lr=-1"], "learning rates must be positive"),
    (["task=commonsense", "task.data_dir=/does/not/exist"], "does not exist"),
    (["backbone=tiny_roberta"], "needs a backbone that provides 'causal-lm'"),
    (["task.eval_limit=0"], "eval_limit must be positive"),
])
def test_bad_input_is_one_sentence_before_any_model(overrides, message, no_model_loading, tmp_path):
    cfg = compose_run(["backbone=tiny_llama", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        execute(cfg)
    assert "\n" not in str(info.value)


def test_unreachable_hub_is_one_sentence_naming_the_id(tmp_path):
    cfg = compose_run(["backbone=llama3", "trainer.max_steps=1"], tmp_path)
    with pytest.raises(BackboneUnavailable, match="meta-llama/Meta-Llama-3-8B.*backbone.load.name_or_path"):
        execute(cfg)


@pytest.mark.slow
def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    result = run_cli(["backbone=tiny_llama", "trainer.max_steps=0"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: trainer.max_steps=0 evaluates a saved adapter: set "
                                                     "method.load_from=<adapter folder>.")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sweep_with_hydras_basic_launcher(tiny_run, tmp_path):
    result = run_cli(["-m", "backbone=tiny_llama", "method=lily,lora", "seed=0,1", "trainer.max_steps=1",
                      f"hydra.sweep.dir={tmp_path}/sweep", *tiny_run], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = sorted(p.name.split("-seed")[0] + p.name.split("-")[-2][:5]
                     for p in (tmp_path / "results").rglob("*.json"))
    assert len(records) == 4 and sum("lily" in r for r in records) == 2
    assert result.stdout.count("record: ") == 4


@pytest.mark.slow
def test_wandb_logger_runs_offline(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_run(["backbone=tiny_llama", "logger=wandb", "trainer.max_steps=2", "group=table2", *tiny_run],
                      tmp_path)
    assert cfg.logger.tags == ["table2", "tiny_llama", "commonsense_synthetic", "lora"]
    assert cfg.logger.group == "table2"  # every run of a table's sweep shares the wandb group
    path = execute(cfg)
    assert json.loads(path.read_text())["status"] == "finished"
    runs = list((tmp_path / "checkpoints").rglob("offline-run-*"))
    assert runs, "wandb wrote no offline run"


@pytest.mark.slow
def test_without_a_validation_split_the_last_weights_are_kept(tiny_run, tmp_path):
    cfg = compose_run(["backbone=tiny_llama", "trainer.max_steps=2", *tiny_run, "task.val_size=0"], tmp_path)
    record = json.loads(execute(cfg).read_text())
    assert record["metrics"]["best"] == {} and record["metrics"]["history"] == []
    assert "val/loss" not in record["metrics"]["final"] and record["data"]["validation"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("generation,expected", [({"num_beams": 2, "batch_size": 1}, (2, 1)),
                                                 ({"num_beams": 1, "batch_size": 8}, (1, 8))])
def test_beam_and_batched_greedy_generation_are_recorded(generation, expected, tiny_run, tmp_path):
    settings = ",".join(f"{k}:{v}" for k, v in generation.items())
    cfg = compose_run(["backbone=tiny_llama", "trainer.max_steps=1", *tiny_run,
                       f"task.generation={{{settings},max_new_tokens:4}}"], tmp_path)
    record = json.loads(execute(cfg).read_text())
    assert (record["generation"]["num_beams"], record["generation"]["batch_size"]) == expected
    lines = (tmp_path / "results").rglob("*.predictions.jsonl").__next__().read_text().splitlines()
    assert len(lines) == 16


@pytest.mark.slow
def test_the_record_names_the_adapter_absolutely_with_its_size_and_the_hydra_folder_holds_the_summary(tiny_run,
                                                                                                      tmp_path):
    from conftest import run_cli

    result = run_cli(["backbone=tiny_llama", "trainer.max_steps=1", *tiny_run], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    adapter = Path(record["adapter"]["path"])
    assert adapter.is_absolute() and adapter.is_dir()
    assert record["adapter"]["size_bytes"] == sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file())
    assert Path(record["hydra_dir"]) == (tmp_path / "hydra").resolve()
    logged = next((tmp_path / "hydra").glob("*.log")).read_text()
    assert f"record: {next((tmp_path / 'results').rglob('*.json'))}" in logged
