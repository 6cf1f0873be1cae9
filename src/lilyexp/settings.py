"""Typed settings: the schema of every config node, checked before anything is built, and the cell identity a
run's record is filed under.

Every backbone, task, method and trainer yaml names its schema (a dataclass) in ``_schema_``; the run-level keys
have :class:`RunSettings`. A schema's fields are of four kinds (``field`` metadata ``kind``):

* ``knob``: a setting a user or an experiment file changes (``method.r``, ``task.subset``, ``trainer.lr``); typed,
  and part of the cell's identity when it differs from the schema's default;
* ``meta``: facts fixed by the group choice (a backbone's ``provides``, a task's ``modality``), read by other nodes;
* ``plumbing``: the ``_target_`` nodes built from the knobs (``load``, ``adapter``, ``recipe``), never identity;
* ``bookkeeping``: where and how a run is logged or checkpointed (``trainer.resume``), never identity.

:func:`check_settings` refuses, in one sentence each, a key no schema declares (``+method.anything``), a value of
the wrong type (``trainer.lr=abc``, ``seed=2.5``), a value outside a field's ``choices`` and an override of a
group's ``name`` (``task.name=rte`` would only rename the GLUE task: the subset is ``task.subset``).

:func:`cell_identity` is what makes two runs the same cell: each group's choice, the seed, the ``setting`` label,
the backbone's architecture and every knob whose value differs from its schema default. A data folder (or an
exported adapter) beside the folder the command runs in is held relative to it, as ``paths.results_dir`` is: the
same checkout with its data beside it is the same cell wherever it was cloned, and ``../data/glue`` and its
absolute spelling are one cell; a folder elsewhere (``/data/vtab-1k``) is held absolute. A knob added later with a
neutral default therefore keeps every existing cell whole; changing a schema default changes what old records
meant, so it must come with a new ``IDENTITY_VERSION`` (tests/test_settings.py holds the defaults and fails when
one changes silently). Identities of an older version are brought to the current one by :func:`upgrade_identity`
when a record is read, so their cells are found again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, ValidationError

from lilyexp.errors import ConfigError

# 2: data folders relative to the working folder (1 held them absolute, so a clone elsewhere found no cell).
IDENTITY_VERSION = 2
GROUPS = ("backbone", "task", "method", "trainer")
# Where a backbone's weights come from, not what is computed: a local copy and the hub id are the same cell.
LOCATION_KEYS = ("name_or_path", "checkpoint_path", "package", "gguf_file", "revision", "tokenizer_name_or_path",
                 "vae_name_or_path")


def knob(default: Any = None, *, choices: tuple | None = None, help: str = "", passed_as: str | None = None) -> Any:
    """A setting that defines the cell. ``passed_as``: the name the object it configures reads it under, where
    that differs (Lily's ``s`` is peft's ``scaling``); see :func:`lilyexp.compose.settings_arguments`."""
    factory = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(**factory, metadata={"kind": "knob", "choices": choices, "help": help, "passed_as": passed_as})


def meta(default: Any = None) -> Any:
    factory = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(**factory, metadata={"kind": "meta"})


def plumbing() -> Any:
    return field(default=None, metadata={"kind": "plumbing"})


def bookkeeping(default: Any = None) -> Any:
    factory = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(**factory, metadata={"kind": "bookkeeping"})


def kind_of(item: dataclasses.Field) -> str:
    return item.metadata.get("kind", "knob")


@dataclass
class RunSettings:
    """The run-level keys of conf/run.yaml."""

    seed: int = knob(0)
    setting: Optional[str] = knob(None, help="a label naming a variant of a cell (e.g. matched_lr)")
    group: str = bookkeeping("adhoc")
    overwrite: bool = bookkeeping(False)
    objective: Optional[str] = bookkeeping(None)  # the final metric the entry point returns (sweepers); None: selection
    lookup: Any = plumbing()  # free values experiment files interpolate into knobs (e.g. s per GLUE task)


@dataclass
class PathsSettings:
    """conf/paths: where records and checkpoints go (bookkeeping, never identity)."""

    results_dir: str = bookkeeping("results/runs")
    checkpoint_dir: str = bookkeeping("checkpoints")


NESTED = ("backbone", "task", "method", "trainer", "logger", "paths", "hydra")


def schema_of(node: Any, path: str) -> type:
    name = node.get("_schema_") if isinstance(node, (dict, DictConfig)) else None
    if not name:
        raise ConfigError(f"{path} names no _schema_ (every group yaml declares the dataclass of its settings).")
    return get_class(name)


def check_settings(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Refuse a mistyped command before anything is built: unknown keys, wrong types, values outside a field's
    choices, overrides of a group's name."""
    refuse_name_overrides(cfg, overrides or [])
    for group in GROUPS:
        check_node(cfg[group], schema_of(cfg[group], group), group)
    top = {key: plain(cfg, key) for key in cfg if key not in NESTED}
    check_values(top, RunSettings, "")
    check_values(plain(cfg, "paths"), PathsSettings, "paths")
    check_logger(OmegaConf.to_container(cfg.logger, resolve=False))
    if isinstance(top.get("seed"), int) and not 0 <= top["seed"] < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32) (numpy's seeding range), got {top['seed']}.")


def check_logger(node: dict) -> None:
    """The logger node's keys are its class's arguments (``+logger.projcet=x`` would be a TypeError at start)."""
    import inspect

    accepted = inspect.signature(get_class(node["_target_"])).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    unknown = sorted(k for k in node if not (k.startswith("_") and k.endswith("_")) and k not in accepted)
    if unknown:
        raise ConfigError(f"unknown setting logger.{unknown[0]} (the logger takes: "
                          f"{', '.join(k for k in accepted if k != 'self') or 'nothing'}).")


def plain(cfg: DictConfig, key: str) -> Any:
    value = cfg[key]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_node(node: DictConfig, schema: type, path: str) -> None:
    check_values(resolved(node, path), schema, path)


def resolved(node: DictConfig, path: str) -> dict:
    """The node with its ``${...}`` references resolved; a reference to a setting that is gone
    (``~backbone.peft_task_type`` while ``method.adapter.config.task_type`` reads it) is one sentence, not an
    interpolation traceback."""
    try:
        return OmegaConf.to_container(node, resolve=True)
    except InterpolationResolutionError as exc:
        missing = re.search(r"Interpolation key '([^']+)'", str(exc))
        gone = missing.group(1) if missing else "a setting it refers to"
        raise ConfigError(f"{exc.full_key or path} reads {gone}, which is not set (deleted with ~?); give {gone} a "
                          f"value instead.") from None


def check_values(values: dict, schema: type, path: str) -> None:
    data = {k: v for k, v in values.items() if not (k.startswith("_") and k.endswith("_"))}
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - set(fields))
    where = f"{path}." if path else ""
    if unknown:
        raise ConfigError(f"unknown setting {where}{unknown[0]} (nothing reads it); the settings there are: "
                          f"{', '.join(sorted(fields))}.")
    typed = {k: v for k, v in data.items() if kind_of(fields[k]) != "plumbing"}  # plumbing is untyped (Any)
    try:
        OmegaConf.merge(structured(schema), typed)
    except (ValidationError, ConfigKeyError) as exc:
        key = getattr(exc, "full_key", "") or ""
        value = OmegaConf.select(OmegaConf.create(data), key) if key else None
        if key in fields and "list" in str(fields[key].type) and isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}{key} takes a list: write {where}{key}=[{value}].") from None
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{where}{key}: {value!r} is not a valid value ({reason}).") from None
    for name, value in data.items():
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}{name} must be one of {', '.join(map(str, choices))}; got {value!r}.")


@functools.lru_cache(maxsize=None)
def structured(schema: type) -> DictConfig:
    """The schema as an OmegaConf structured config (built once; merging into it leaves it unchanged)."""
    return OmegaConf.structured(schema)


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def refuse_name_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    for override in overrides:
        key = override_key(override)
        group = key.split(".", 1)[0]
        if group in GROUPS and key == f"{group}.name" and not cfg[group].get("nameable"):
            hint = " (its subset is task.subset)" if "subset" in cfg[group] else ""
            chosen = [o.split("=", 1)[1] for o in overrides if override_key(o) == group]
            choice = f" ({group}={chosen[-1]})" if chosen else ""
            raise ConfigError(f"{key} is fixed by the {group}= choice{choice}{hint}; choose another {group} with "
                              f"{group}=<option>.")


# --------------------------------------------------------------------------------------------------- identity

@functools.lru_cache(maxsize=None)
def option_schema(group: str, option: str) -> type | None:
    """The schema of a group option as the current config tree declares it (for records that predate
    ``_schema_``); ``None`` when the option no longer exists."""
    from lilyexp.compose import CONF_DIR, load_option

    if not (CONF_DIR / group / f"{option}.yaml").exists():
        return None
    name = load_option(group, option).get("_schema_")
    return get_class(name) if name else None


FOLDER_KNOBS = ("data_dir", "load_from")  # knobs naming a local folder (or, for load_from, possibly a hub id)


def canonical(key: str, value: Any) -> Any:
    if isinstance(value, str) and key.endswith(FOLDER_KNOBS):
        return from_working_folder(value)
    return value


def from_working_folder(path: str) -> str:
    """A folder as a cell knows it: relative to the folder the command runs in when it lies beside it (under that
    folder's parent, as ``../shared/data/glue`` lies beside a clone), else absolute (``/data/vtab-1k`` is the same
    cell from clones at any depth). Symlinks are left as they are: a clone whose data folder links to a shared copy
    is laid out as any other clone."""
    absolute, here = os.path.abspath(os.path.expanduser(path)), os.getcwd()
    beside = os.path.dirname(here)
    if beside != os.path.dirname(beside) and os.path.commonpath([absolute, beside]) == beside:
        return os.path.relpath(absolute, here)
    return absolute


def knobs_of(node: dict, schema: type, prefix: str) -> dict[str, Any]:
    out = {}
    for item in dataclasses.fields(schema):
        if kind_of(item) != "knob" or item.name not in node:
            continue
        value = canonical(item.name, node[item.name])
        if value != default_of(item):
            out[f"{prefix}.{item.name}"] = value
    return out


def default_of(item: dataclasses.Field) -> Any:
    default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
    return dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default


def architecture_of(backbone: dict) -> dict[str, Any]:
    load = backbone.get("load") or {}
    return {f"backbone.load.{k}": v for k, v in load.items() if k not in LOCATION_KEYS and not k.startswith("_")}


def cell_identity(config: dict) -> dict | None:
    """The identity of a resolved config (a record's ``config``, current schema version); ``None`` when one of
    its group options no longer exists."""
    cell: dict[str, Any] = {"version": IDENTITY_VERSION, "seed": config.get("seed"), "setting": config.get("setting")}
    for group in GROUPS:
        node = config.get(group) or {}
        cell[group] = node.get("name")
        schema = get_class(node["_schema_"]) if node.get("_schema_") else option_schema(group, str(node.get("name")))
        if schema is None:
            return None
        cell.update(knobs_of(node, schema, group))
    cell.update(architecture_of(config.get("backbone") or {}))
    return cell


def upgrade_identity(identity: dict | None, config: dict | None) -> dict | None:
    """A recorded identity in the current version. Version 1 held folders as absolute paths; version 2 holds what
    :func:`from_working_folder` gave in the folder the run ran in: a folder the run's config spelled relative
    (the study's ``../shared/data/glue``) keeps that spelling, any other is placed from this folder."""
    if not identity or identity.get("version") != 1:
        return identity
    upgraded = {**identity, "version": IDENTITY_VERSION}
    for key, value in identity.items():
        if key.endswith(FOLDER_KNOBS) and isinstance(value, str) and os.path.isabs(value):
            group, _, knob = key.partition(".")
            spelled = ((config or {}).get(group) or {}).get(knob)
            relative = isinstance(spelled, str) and not os.path.isabs(os.path.expanduser(spelled))
            upgraded[key] = os.path.normpath(spelled) if relative else from_working_folder(value)
    return upgraded


def identity_hash(identity: dict) -> str:
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
