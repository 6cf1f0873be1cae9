"""Checks and helpers the runner uses to turn a composed config into objects, before any model is loaded.

A backbone yaml declares the modalities it `provides` and its `adapter_targets` (module names per target list:
`lora`, `lily`, ...); a task yaml declares the `modality` it needs and its `recipe` (training loop); a method yaml
may name the target list it adapts (`targets`) and the `modalities` it supports. Everything here reads those
fields; nothing branches on component names.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import importlib.util
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from lilyexp.errors import ConfigError
from lilyexp.placement import training_device

CONF_DIR = Path(str(resources.files("lilyexp.conf")))  # the repo's conf/, shipped as package data


def help_text() -> str:
    from lilyexp.describe import usage

    return usage()


if not OmegaConf.has_resolver("lilyexp_help"):  # `--help` prints lilyexp's usage (conf/run.yaml hydra.help)
    OmegaConf.register_new_resolver("lilyexp_help", help_text)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_option(group: str, option: str) -> DictConfig:
    """A group option's yaml with the configs it extends (its defaults list: ``name`` in the same group or
    ``/group/name@_here_``) merged under it, as Hydra composes them; no interpolation is resolved."""
    node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    merged = OmegaConf.create()
    for parent in node.pop("defaults", []):
        if parent == "_self_":
            continue
        name = parent.split("@")[0]
        parent_group, parent_option = name[1:].rsplit("/", 1) if name.startswith("/") else (group, name)
        merged = OmegaConf.merge(merged, load_option(parent_group, parent_option))
    return OmegaConf.merge(merged, node)


def subset_choices(task: str) -> str:
    """``${subsets:<task>}`` in a yaml: every subset the task's schema allows, comma-separated (a sweep over all
    VTAB-1K tasks names them in one place: the task module)."""
    schema = get_class(load_option("task", task)._schema_)
    subset = {item.name: item for item in dataclasses.fields(schema)}["subset"]
    return ",".join(subset.metadata["choices"])


OmegaConf.register_new_resolver("subsets", subset_choices, replace=True)


def backbones_providing(modality: str) -> list[str]:
    return [name for name in group_options("backbone")
            if modality in load_option("backbone", name).get("provides", [])]


def check_gpu_kernels(cfg: DictConfig, device: torch.device | None = None) -> None:
    """A backbone whose GPU training needs fused kernels (``backbone.gpu_kernels``: Mamba's selective scan) is
    refused on a GPU without them, before its weights load, unless activation checkpointing bounds the pure-PyTorch
    fallback's memory to one layer's."""
    needs = cfg.backbone.get("gpu_kernels") or {}
    device = device or training_device()
    if device.type != "cuda" or not needs or cfg.trainer.gradient_checkpointing or cfg.trainer.max_steps == 0:
        return
    missing = [name for name in needs["modules"] if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"backbone '{cfg.backbone.name}' on a GPU needs {', '.join(missing)} ({needs['install']}): "
                          f"without them {needs['why']}; install them, or set trainer.gradient_checkpointing=true.")


def check_combination(cfg: DictConfig) -> None:
    """Refuse a backbone × task × method combination that cannot run, in one sentence naming both sides."""
    backbone, task, method = cfg.backbone, cfg.task, cfg.method
    provides = list(backbone.provides)
    if task.modality not in provides:
        raise ConfigError(
            f"task '{task.name}' needs a backbone that provides '{task.modality}', but backbone "
            f"'{backbone.name}' provides {provides}; choose one of: {', '.join(backbones_providing(task.modality))}.")
    supported = method.get("modalities")
    if supported is not None and task.modality not in supported:
        raise ConfigError(f"method '{method.name}' supports {list(supported)}, not task '{task.name}' "
                          f"('{task.modality}').")
    targets = method.get("targets")
    if targets is not None and targets not in backbone.get("adapter_targets", {}):
        raise ConfigError(
            f"method '{method.name}' adapts the backbone's '{targets}' targets, but backbone '{backbone.name}' "
            f"declares none; add backbone.adapter_targets.{targets}=[module names].")
    if cfg.trainer.get("head_lr") is not None and not backbone.get("head_modules"):
        raise ConfigError(f"trainer.head_lr is set, but backbone '{backbone.name}' has no task head "
                          f"(backbone.head_modules is empty); leave trainer.head_lr unset.")
    check_evaluation_only(cfg)
    check_gpu_kernels(cfg)
    size, wanted = backbone.get("image_size"), task.get("image_size")
    if size is not None and wanted is not None and size != wanted:
        raise ConfigError(f"backbone '{backbone.name}' takes {size}x{size} images, but task.image_size={wanted}; "
                          f"drop the override (the task follows the backbone).")
    if task.get("recipe") is None:
        raise ConfigError(f"task '{task.name}' has no training loop in this version of lilyexp yet.")


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` of a node (without its ``_schema_`` key, which only lilyexp reads) that
    surfaces our ConfigError instead of Hydra's wrapper."""
    if OmegaConf.is_dict(node) and "_schema_" in node:
        node = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_schema_"}
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, (ConfigError, ValueError)):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, ValueError):  # a library's own validation of a setting (e.g. peft configs)
            raise ConfigError(f"{OmegaConf.select(node, '_target_') or 'config'}: {cause}") from None
        raise


def build_task(task: DictConfig | dict) -> Any:
    """The task object of a composed ``task`` node (or a record's resolved one): its ``load`` node, given every
    setting of the task's schema that the target's signature names and the load node does not set itself. A task
    setting is thus declared in its dataclass and its yaml, and read by the constructor under the same name,
    without a forwarding line."""
    task = task if isinstance(task, DictConfig) else OmegaConf.create(task)
    return build(task.load, **settings_arguments(task, task.load))


def method_node(method: DictConfig) -> dict:
    """The resolved node that builds a composed method's object: its ``adapter`` node, where the object the
    method configures (the ``config`` sub-node where there is one, as peft's configs; else the adapter itself)
    is given every setting of the method's schema its signature names, under the name it reads (``passed_as``:
    Lily's ``s`` is peft's ``scaling``), unless the node sets it itself. This whole node is saved with every
    export, so an export rebuilds its method on its own (:func:`lilyexp.load_adapter`)."""
    node = OmegaConf.to_container(method.adapter, resolve=True)
    inner = node.get("config")
    configured = inner if isinstance(inner, dict) and "_target_" in inner else node
    given = settings_arguments(method, configured)
    refuse_unreached_settings(method, configured, given)
    configured.update(given)
    return node


def refuse_unreached_settings(method: DictConfig, configured: dict, given: dict) -> None:
    """A knob of the method's schema that reaches nothing (the object takes no argument of its name, the adapter
    node does not set it, and no ``${method.<knob>}`` reads it) would name two cells that build the same model."""
    from lilyexp.settings import kind_of

    schema = method.get("_schema_")
    if schema is None:
        return
    text = OmegaConf.to_yaml(method)  # unresolved: the ${method.<knob>} references show
    for item in dataclasses.fields(get_class(schema)):
        passed = argument_name(item)
        if (kind_of(item) == "knob" and item.name != "load_from" and passed not in given
                and passed not in configured and f"method.{item.name}" not in text):
            raise ConfigError(f"method.{item.name} reaches nothing: {configured.get('_target_')} takes no argument "
                              f"'{passed}' and the method's yaml does not read it; give the schema field "
                              f"passed_as=<the argument's name>, or read it in the yaml.")


def argument_name(item: dataclasses.Field) -> str:
    """The name the configured object reads a setting under: the field's ``passed_as``, else its own name."""
    return item.metadata.get("passed_as") or item.name


def build_method(method: DictConfig) -> Any:
    """The method object of a composed ``method`` node (:func:`method_node`)."""
    return build(method_node(method))


def settings_arguments(node: DictConfig, target: DictConfig | dict) -> dict[str, Any]:
    """The settings of a group node (its ``_schema_``'s knobs and bookkeeping fields) that ``target`` (a node
    with a ``_target_``) takes by name and does not set itself, resolved and under the name the target reads
    (``passed_as``); a setting the node lacks (deleted with ``~``) is given its schema default, the value the
    cell's identity assumes. A setting is thus declared in its dataclass and its yaml, without forwarding lines."""
    from lilyexp.settings import default_of, kind_of, plain

    schema = node.get("_schema_")
    if schema is None:  # a record from before schemas: its nodes spelled every argument out
        return {}
    try:
        accepted = inspect.signature(get_method(target["_target_"])).parameters
        fields = [f for f in dataclasses.fields(get_class(schema)) if kind_of(f) in ("knob", "bookkeeping")]
    except Exception as exc:  # a misspelt _target_ or _schema_
        raise ConfigError(f"cannot find what {node.get('name', 'the group')}'s yaml names ({target['_target_']} or "
                          f"{schema}): {exc}") from None
    passed = {f.name: argument_name(f) for f in fields}
    return {passed[f.name]: plain(node, f.name) if f.name in node else default_of(f)
            for f in fields if passed[f.name] in accepted and passed[f.name] not in target}


def check_evaluation_only(cfg: DictConfig) -> None:
    """``method.load_from`` evaluates an exported adapter: it goes with ``trainer.max_steps=0``, and the folder
    must hold one."""
    load_from, steps = cfg.method.get("load_from"), cfg.trainer.get("max_steps")
    if load_from is None and steps == 0:
        raise ConfigError("trainer.max_steps=0 evaluates a saved adapter: set method.load_from=<adapter folder>.")
    if load_from is None:
        return
    if steps != 0:
        raise ConfigError(f"method.load_from evaluates the adapter in {load_from}: add trainer.max_steps=0.")
    if not (Path(load_from).expanduser() / "adapter_config.json").is_file():
        raise ConfigError(f"method.load_from={load_from} holds no exported adapter (adapter_config.json).")
    from lilyexp.methods.export import check_export_matches
    from lilyexp.settings import cell_identity

    check_export_matches(Path(load_from).expanduser(), cell_identity(OmegaConf.to_container(cfg, resolve=True)) or {})


SWEEP_SYNTAX = ("(", "[", "{")  # range(...), glob(...), choice(...), lists: left to Hydra


def check_override_keys(args: list[str]) -> None:
    """Before Hydra composes: an override of a setting the config lacks (``trainer.max_step=2``) would get Hydra's
    hint to append it with ``+`` (which the settings check then refuses) and exit 1; name the setting and its nearest
    existing neighbours instead, as every other unknown setting is (a ConfigError)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    pairs = [arg.split("=", 1) for arg in args if "=" in arg and not arg.startswith(("-", "+", "~", "hydra"))]
    choices = [f"{key}={value.split(',')[0]}" for key, value in pairs
               if (CONF_DIR / key).is_dir() and not value.startswith(SWEEP_SYNTAX)]
    swept = {key for key, value in pairs if (CONF_DIR / key).is_dir() and "," in value}  # its keys differ per value
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="run", overrides=choices)
    except HydraException:  # a group option that does not exist: Hydra's own message names the choices
        return
    for key, _ in pairs:
        parent, _, leaf = key.rpartition(".")
        if (CONF_DIR / key).is_dir() or key.split(".")[0] in swept:
            continue
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf not in node:
            known = sorted(str(k) for k in node.keys() if not str(k).startswith("_") and
                           not (not parent and isinstance(node[k], DictConfig)))
            near = difflib.get_close_matches(leaf, known, n=2)
            where = f"under {parent}" if parent else "at the top level"
            hint = f"did you mean {' or '.join('.'.join(filter(None, (parent, n))) for n in near)}? " if near else ""
            raise ConfigError(f"unknown setting {key}; {hint}the settings {where} are: {', '.join(known)}.")
