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
    assert contracts.members(contracts.InstructionTask)[:2] == ["model_kwargs", "score"]
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


class GenerationOnlyTask:
    """An instruction task of a user's, written before scoring versions and log-likelihood scoring existed."""

    model_kwargs: dict = {}
    train = validation = []
    eval_sets: dict = {}
    cutoff_len, train_on_inputs, align_eval_prompt, generation, scoring = 64, True, False, {}, "generation"

    def score(self, split, predictions, references):
        return {}

    def train_text(self, example):
        return ""

    def train_prompt(self, example):
        return ""

    def prompt(self, example):
        return ""

    def extract(self, split, decoded):
        return decoded, decoded

    def is_correct(self, prediction, answer):
        return prediction == answer


def test_a_task_needs_only_what_its_scoring_uses_and_no_scoring_version():
    from lilyexp.recipes.causal_lm import run as causal_lm
    from lilyexp.methods.baselines import FullFineTune

    method, task = FullFineTune(), GenerationOnlyTask()
    contracts.check_parts(method, task, causal_lm)  # no choices(), no scoring_version: accepted
    task.scoring = "both"
    with pytest.raises(ConfigError, match="lacks choices of lilyexp.contracts.AnswerChoices"):
        contracts.check_parts(method, task, causal_lm)


def test_every_task_setting_reaches_its_constructor_and_a_deleted_one_is_its_schema_default():
    """A setting the constructor does not take, and that the load node does not read, would be silently dead."""
    import dataclasses
    import inspect

    from hydra.utils import get_class, get_method
    from omegaconf import OmegaConf

    from lilyexp.compose import load_option, settings_arguments
    from lilyexp.settings import kind_of

    for task in TASKS:
        node = load_option("task", task)
        accepted = inspect.signature(get_method(node.load._target_)).parameters
        read_in_load = OmegaConf.to_yaml(node.load)
        for field in dataclasses.fields(get_class(node._schema_)):
            if kind_of(field) in ("knob", "bookkeeping"):
                assert field.name in accepted or f"task.{field.name}" in read_in_load, f"{task}: {field.name}"
    cfg = compose_run(["task=glue", "~task.max_length"])
    assert settings_arguments(cfg.task)["max_length"] == 512  # GlueSettings' default


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


@pytest.mark.parametrize("record", [
    {"status": "finished", "config": {"task": "glue"}, "metrics": {"final": {}}},
    {"status": "finished", "config": "x", "metrics": {"final": {}}},
    {"status": "finished", "scoring_version": "2", "metrics": {"final": {}},
     "config": {"task": {"load": {"_target_": "lilyexp.tasks.glue.GlueTask"}}}},
    {"status": "finished", "metrics": {"final": {}}, "config": {"task": {"load": {"_target_": "nowhere.Task"}}}},
], ids=["task-not-a-node", "config-not-a-node", "version-not-a-number", "task-class-not-here"])
def test_a_record_whose_scoring_cannot_be_judged_is_read_as_it_says(record, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": 2, "identity": {"version": 2}, **record}))
    assert read_record(path)["status"] == "finished"
