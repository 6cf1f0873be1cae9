"""logger=tensorboard and logger=mlflow (accelerate's trackers) write what the wandb logger logs: a run per cell named
as the record, the config, every step's metrics under the same names, the final numbers; offline, on this
machine."""

from __future__ import annotations

import json

import pytest

from conftest import compose_run
from lilyexp.errors import ConfigError
from lilyexp.run import execute

STEPS = 3


def tiny_cell(tmp_path, logger: str, tiny_run: list[str]) -> dict:
    overrides = ["backbone=tiny_llama", f"trainer.max_steps={STEPS}", "trainer.eval_every=3", *tiny_run,
                 f"logger={logger}", f"logger.dir={tmp_path / logger}"]
    return json.loads(execute(compose_run(overrides, tmp_path), overrides).read_text())


def test_tensorboard_gets_every_step_the_config_and_the_final_numbers(tmp_path, tiny_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = tiny_cell(tmp_path, "tensorboard", tiny_run)
    folder = tmp_path / "tensorboard" / "adhoc" / record["run_name"]
    events = EventAccumulator(str(folder)).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert "train/lr" in events.Tags()["scalars"]
    final = {k: v for k, v in record["metrics"]["final"].items() if isinstance(v, (int, float))}
    assert {f"final/{k}" for k in final} <= set(events.Tags()["scalars"])
    assert any(path.name != folder.name for path in folder.iterdir())  # the hparams (config) run beside it


def test_mlflow_gets_a_run_per_cell_with_the_config_and_every_step(tmp_path, tiny_run, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):  # unset, as on a fresh machine; the logger
        monkeypatch.setenv(name, "")                                 # sets them, and monkeypatch restores them
        monkeypatch.delenv(name)
    record = tiny_cell(tmp_path, "mlflow", tiny_run)
    client = MlflowClient(tracking_uri=(tmp_path / "mlflow").resolve().as_uri())
    experiment = client.get_experiment_by_name("adhoc")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == record["run_name"] and run.data.tags["lilyexp_run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, STEPS + 1))
    assert float(run.data.params["trainer.lr"]) == record["config"]["trainer"]["lr"]
    assert "final/test/accuracy/avg" in run.data.metrics


def test_a_tracker_whose_package_is_missing_is_refused_before_the_run(monkeypatch):
    import importlib.util

    from lilyexp.loggers import TrackerLogger

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger=mlflow needs mlflow-skinny: pip install mlflow-skinny"):
        TrackerLogger("mlflow")
