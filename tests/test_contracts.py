"""The contracts are true: every method, task and recipe the config tree builds keeps its protocol
(lilyexp.contracts), a part that does not is refused before any model loads, and a task's scoring version decides
whether a record still counts as finished."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from conftest import compose_run
from test_captures import fake_vtab

from lilyexp import contracts
from lilyexp.compose import CONF_DIR, build, build_method, build_task, method_node
from lilyexp.errors import ConfigError
from lilyexp.methods import MethodSettings
from lilyexp.records import read_record
from lilyexp.run import execute
from lilyexp.settings import knob, knobs_of
from lilyexp.tasks.commonsense import CommonsenseTask

METHODS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
TASKS = sorted(path.stem for path in (CONF_DIR / "task").glob("*.yaml"))
VISION_ONLY = ("adaptformer", "lora_sliced")  # modalities: [image-classification]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_yaml_builds_a_method(method):
    built = build_method(compose_run(["backbone=tiny_roberta", "task=glue", f"method={method}"]).method)
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
    assert settings_arguments(cfg.task, cfg.task.load)["max_length"] == 512  # GlueSettings' default


@pytest.mark.parametrize("method", METHODS)
def test_every_method_setting_reaches_the_object_it_configures_under_its_name(method):
    """A knob the built object does not take, and that the adapter node does not read, would be silently dead;
    a knob the node sets itself is not overridden; peft's names (passed_as) replace the paper's."""
    import dataclasses

    from hydra.utils import get_class

    from lilyexp.settings import kind_of, plain

    cfg = compose_run(["backbone=tiny_llama", f"method={method}"] if method not in VISION_ONLY else
                      ["backbone=tiny_vit", "task=vtab", f"method={method}"])
    node = method_node(cfg.method)
    configured = node["config"] if "_target_" in node.get("config", {}) else node
    for field in dataclasses.fields(get_class(cfg.method._schema_)):
        name = field.metadata.get("passed_as") or field.name
        if kind_of(field) == "knob" and field.name not in ("load_from", "config"):
            assert name in configured, f"{method}: {field.name} does not reach {configured['_target_']}"
            assert configured[name] == plain(cfg.method, field.name), f"{method}: {field.name}"


def test_a_deleted_method_setting_is_its_schema_default_and_the_paper_names_become_peft_names():
    lily = method_node(compose_run(["method=lily", "method.s=0.1", "method.ne_2=3", "~method.r"]).method)["config"]
    assert (lily["r"], lily["scaling"], lily["num_B"]) == (16, 0.1, 3) and "s" not in lily and "ne_2" not in lily
    lora = method_node(compose_run(["method=pissa", "method.alpha=8"]).method)["config"]
    assert (lora["lora_alpha"], lora["init_lora_weights"], lora["target_modules"][0]) == (8, "pissa", "q_proj")
    kept = method_node(compose_run(["method=lora", "+method.adapter.config.r=2"]).method)["config"]
    assert kept["r"] == 2  # what the adapter node sets itself wins


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


@dataclass
class RankedSettings(MethodSettings):
    """A user's method schema, as the README's "A setting of the method's own" describes it."""

    rank: int = knob(8, passed_as="r")
    scale: float = knob(1.0)


class Ranked:
    def __init__(self, r: int, scale: float, head_modules: list):
        self.r, self.scale = r, scale


def test_a_users_method_setting_reaches_its_object_by_name_and_enters_the_identity():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"_schema_": "test_contracts.RankedSettings", "name": "ranked", "rank": 4,
                             "adapter": {"_target_": "test_contracts.Ranked", "head_modules": []}})
    assert method_node(node) == {"_target_": "test_contracts.Ranked", "head_modules": [], "r": 4, "scale": 1.0}
    assert knobs_of(OmegaConf.to_container(node), RankedSettings, "method") == {"method.rank": 4}  # identity part


@dataclass
class MisnamedSettings(MethodSettings):
    rank: int = knob(8)  # Ranked takes r: without passed_as the setting would reach nothing


def test_a_method_setting_that_reaches_nothing_is_refused_in_one_sentence():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"_schema_": "test_contracts.MisnamedSettings", "name": "ranked", "rank": 4,
                             "adapter": {"_target_": "test_contracts.Ranked", "head_modules": [], "scale": 1.0}})
    with pytest.raises(ConfigError, match="method.rank reaches nothing: test_contracts.Ranked takes no argument"):
        method_node(node)
