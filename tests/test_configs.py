"""Every backbone × task × method composes; the runner accepts exactly the combinations whose modalities
match and refuses the rest in one sentence; every `_target_` node binds to its callable's signature."""

from __future__ import annotations

import inspect

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

from lilyexp.compose import CONF_DIR, check_combination, group_options, load_option
from lilyexp.errors import ConfigError

from conftest import compose_run

BACKBONES, TASKS, METHODS = group_options("backbone"), group_options("task"), group_options("method")
PAPER_OPTIONS = {
    "backbone": {"roberta", "roberta_large", "llama3", "falcon_mamba", "vit", "sdxl", "smollm2", "minilm",
                 "tiny_roberta", "tiny_llama", "tiny_falcon_mamba", "tiny_vit", "tiny_sdxl"},
    "task": {"glue", "commonsense", "commonsense_synthetic", "vtab", "dreambooth"},
    "method": {"lora"},
}


@pytest.mark.parametrize("group", sorted(PAPER_OPTIONS))
def test_the_documented_options_exist(group):
    assert PAPER_OPTIONS[group] <= set(group_options(group))


def expected_ok(cfg: DictConfig) -> bool:
    modality_ok = cfg.task.modality in cfg.backbone.provides
    method_ok = cfg.method.get("modalities") is None or cfg.task.modality in cfg.method.modalities
    family_ok = cfg.method.get("targets") is None or cfg.method.targets in cfg.backbone.adapter_targets
    return modality_ok and method_ok and family_ok and cfg.task.recipe is not None


def native_task(backbone: str) -> str:
    """The first task (by name) whose modality the backbone provides: with it, a method's own checks are reached
    (a task the backbone cannot run is refused before them)."""
    provides = list(load_option("backbone", backbone).get("provides", []))
    return next((t for t in TASKS if load_option("task", t).modality in provides), TASKS[0])


def every_pairing() -> list[tuple[str, str, str]]:
    """Every backbone x task, backbone x method and task x method pairing at least once. Each check a composition
    goes through depends on two groups (task modality vs backbone, method modalities vs task, method targets vs
    backbone), and group yamls interpolate only the backbone's settings, so pairs cover what the full product
    (675 compositions) would, in a third of the time."""
    combos = {(b, t, "lora") for b in BACKBONES for t in TASKS}
    combos |= {(b, native_task(b), m) for b in BACKBONES for m in METHODS}
    combos |= {("tiny_llama", t, m) for t in TASKS for m in METHODS}
    return sorted(combos)


def each_option_once() -> list[tuple[str, str, str]]:
    """Every backbone, task and method at least once, each with the others' first options (the fast tier)."""
    combos = [(b, "commonsense_synthetic", "lora") for b in BACKBONES] + [("tiny_llama", t, "lora") for t in TASKS]
    return sorted(set(combos + [("tiny_llama", "commonsense_synthetic", m) for m in METHODS]))


@pytest.mark.parametrize("backbone,task,method", each_option_once())
def test_each_option_composes_and_is_checked(backbone, task, method):
    test_every_pairing_composes_binds_and_is_checked(backbone, task, method)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,task,method", every_pairing())
def test_every_pairing_composes_binds_and_is_checked(backbone, task, method):
    """Composes, every interpolation resolves, every ``_target_`` node binds to its callable's signature, and the
    runner accepts it exactly when modalities and targets match (else one sentence)."""
    cfg = compose_run([f"backbone={backbone}", f"task={task}", f"method={method}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    for path, node in target_nodes(cfg):
        bind(node)
    if expected_ok(cfg):
        check_combination(cfg)
    else:
        with pytest.raises(ConfigError) as info:
            check_combination(cfg)
        assert "\n" not in str(info.value) and str(info.value).endswith(".")


def test_mismatch_names_both_sides_and_the_valid_choices():
    cfg = compose_run(["backbone=tiny_roberta", "task=commonsense_synthetic"])
    with pytest.raises(ConfigError, match="commonsense_synthetic.*causal-lm.*tiny_roberta.*llama3"):
        check_combination(cfg)


def test_linear_probe_refuses_a_generation_task():
    cfg = compose_run(["backbone=tiny_llama", "method=linear_probe"])
    with pytest.raises(ConfigError, match="linear_probe"):
        check_combination(cfg)


def test_unknown_option_is_hydras_error_with_choices():
    with pytest.raises(ConfigCompositionException, match="lora"):
        compose_run(["method=not_a_method"])


def target_nodes(node, path=""):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from target_nodes(node[key], f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from target_nodes(item, f"{path}[{i}]")


def bind(node: DictConfig) -> None:
    target = get_method(node._target_)
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    signature = inspect.signature(target)
    params = signature.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    signature.bind_partial(**kwargs)


EXPERIMENTS = sorted(str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
                     for p in (CONF_DIR / "experiment").rglob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_file_composes_to_a_runnable_cell(experiment):
    cfg = compose_run([f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)
    check_combination(cfg)
    assert cfg.group != "adhoc", "experiment files name the group their records go to"
