"""Checks and helpers the runner uses to turn a composed config into objects, before any model is loaded.

A backbone yaml declares the modalities it `provides`, per method family its `adapter_targets`, and the
`bypassed_modules` an adapter cannot reach (with the reason); a task
yaml declares the `modality` it needs and its `recipe` (training loop); a method yaml may name its `family`
and the `modalities` it supports. Everything here reads those fields; nothing branches on component names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lilyexp.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def backbones_providing(modality: str) -> list[str]:
    names = []
    for name in group_options("backbone"):
        provides = OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml").get("provides", [])
        if modality in provides:
            names.append(name)
    return names


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
    family = method.get("family")
    if family is not None and family not in backbone.get("adapter_targets", {}):
        raise ConfigError(
            f"method '{method.name}' adapts the backbone's '{family}' targets, but backbone '{backbone.name}' "
            f"declares none; add backbone.adapter_targets.{family}=[module names].")
    bypassed = backbone.get("bypassed_modules") or {}
    for target in method.get("target_modules") or []:
        if target in bypassed:
            raise ConfigError(f"backbone '{backbone.name}' cannot adapt '{target}': {bypassed[target]}")
    if task.get("recipe") is None:
        raise ConfigError(f"task '{task.name}' has no training loop in this version of lilyexp yet.")


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that surfaces our ConfigError instead of Hydra's wrapper."""
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
