"""The contracts are true: every method, task and recipe the config tree builds keeps its protocol
(lilyexp.contracts), a part that does not is refused before any model loads, and a task's scoring version decides
whether a record still counts as finished."""

from __future__ import annotations

import json

import pytest
from conftest import compose_run
from test_captures import fake_vtab

from lilyexp import contracts
from lilyexp.compose import CONF_DIR, build, build_task
from lilyexp.errors import ConfigError
from lilyexp.records import read_record
from lilyexp.run import execute
from lilyexp.tasks.commonsense import CommonsenseTask

METHODS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
TASKS = sorted(path.stem for path in (CONF_DIR / "task").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_yaml_builds_a_method(method):
    built = build(compose_run(["backbone=tiny_roberta", "task=glue", f"method={method}"]).method.adapter)
    assert isinstance(built, contracts.Method) and not contracts.missing(built, contracts.Method)


def task_overrides(task: str, shared_data, tmp_path) -> list[str]:
    data = {"glue": ["task.subset=mrpc", f"task.data_dir={shared_data / 'glue'}", "task.train_limit=8",
                     "task.eval_limit=4"],
            "vtab": ["backbone=tiny_vit", "task.subset=caltech101", f"task.data_dir={fake_vtab(tmp_path / 'vtab')}"],
            "commonsense": ["backbone=tiny_llama", f"task.data_dir={shared_data / 'commonsense'}",
                            "task.train_file=boolq/train.json", "task.subset=[boolq,piqa]", "task.train_limit=8"],
            "commonsense_synthetic": ["backbone=tiny_llama", "task.n_train=16", "task.n_eval=2", "task.val_size=4"],
            "dreambooth": ["backbone=tiny_sdxl", f"task.data_dir={shared_data / 'dreambooth'}", "task.resolution=32",
                           "task.metrics.dino=random", "task.metrics.clip=random"]}
    return [f"task={task}", *data[task]]


@pytest.mark.parametrize("task", TASKS)
def test_every_task_yaml_builds_a_task_its_recipe_can_train(task, shared_data, tmp_path):
    cfg = compose_run(task_overrides(task, shared_data, tmp_path), tmp_path)
    recipe, built = build(cfg.task.recipe), build_task(cfg.task)
    protocol = contracts.task_protocol(recipe)
    assert protocol is not contracts.Task, "every recipe names the task protocol it trains on"
    assert isinstance(recipe, contracts.Recipe)
    assert isinstance(built, protocol) and not contracts.missing(built, protocol)
    assert isinstance(built.scoring_version, int) and built.scoring_version >= 1


def test_the_protocols_list_what_the_runner_and_recipes_call():
    assert contracts.members(contracts.Method) == ["check", "apply", "summary", "export", "load"]
    assert contracts.members(contracts.InstructionTask)[:3] == ["scoring_version", "model_kwargs", "score"]
    assert "logits" in contracts.members(contracts.ClassificationTask)
    assert contracts.members(contracts.Recipe) == ["__call__"]


class MethodWithoutExport:
    def __init__(self, **kwargs):
        pass

    def check(self, skeleton):
        pass

    def apply(self, model):
        return model

    def summary(self, model):
        return None

    def load(self, model, directory):
        return model


@pytest.mark.parametrize("overrides, message", [
    (["method.adapter._target_=test_contracts.MethodWithoutExport"],
     "method.adapter built a MethodWithoutExport, which lacks export of lilyexp.contracts.Method"),
    (["task.recipe._target_=lilyexp.recipes.classify.run"],
     "task.load built a CommonsenseTask, which lacks final, splits, .* of lilyexp.contracts.ClassificationTask"),
])
def test_a_part_that_breaks_its_contract_is_refused_before_any_model(overrides, message, tiny_run, tmp_path,
                                                                    no_model_loading):
    cfg = compose_run(["backbone=tiny_llama", "method=full", *tiny_run, *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message):
        execute(cfg)


def test_a_record_scored_under_an_older_scoring_version_is_outdated_and_its_cell_runs_again(tiny_run, tmp_path,
                                                                                         monkeypatch):
    cfg = compose_run(["backbone=tiny_llama", "trainer.max_steps=1", *tiny_run], tmp_path)
    path = execute(cfg)
    written = json.loads(path.read_text())
    assert written["scoring_version"] == CommonsenseTask.scoring_version == 1
    del written["scoring_version"]  # a record from before versions were kept reads as version 1
    path.write_text(json.dumps(written))
    assert read_record(path)["status"] == "finished"

    monkeypatch.setattr(CommonsenseTask, "scoring_version", 2)
    stale = read_record(path)
    assert stale["status"] == "outdated" and stale["outdated"] == {"scoring_version": 1, "current": 2}
    assert stale["metrics"]["final"] == written["metrics"]["final"]  # its numbers stay readable

    monkeypatch.setattr(CommonsenseTask, "score", lambda *args: (_ for _ in ()).throw(RuntimeError("rescoring")))
    with pytest.raises(RuntimeError, match="rescoring"):
        execute(cfg)
    assert json.loads(path.read_text())["metrics"] == written["metrics"], "a failed rerun keeps the outdated record"

    monkeypatch.undo()
    monkeypatch.setattr(CommonsenseTask, "scoring_version", 2)
    rerun = json.loads(execute(cfg).read_text())
    assert rerun["scoring_version"] == 2 and rerun["status"] == "finished"
    assert read_record(path)["status"] == "finished"
