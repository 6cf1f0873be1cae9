"""Saving and loading a trained Lily (:class:`lilyexp.methods.lily.LilyVariantModel`) in two formats.

* Upstream peft's format, when the trained variant is one peft's own Lily tuner computes (whole Linear targets,
  a router per layer, the batch/token-mean routing, one A stride for every group, s applied or 1): the config is
  a ``peft.LilyConfig`` and the tensors carry peft's names, each layer's copy of a shared A or B included (peft
  shares them again when it injects, and warns about any key it misses). ``PeftModel.from_pretrained`` loads it.
* lilyexp's format for every other variant (k/v slices, parallel MLP adapters, per-target ranks, other routing,
  per-group strides such as SDXL's): shared tensors stored once, the other names listed as aliases in the
  safetensors metadata, and a config upstream peft refuses (:func:`lilyexp.methods.export.refusal`);
  ``lilyexp.load_adapter`` loads it.

Both hold the task head too (``modules_to_save``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from peft import LilyConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lilyexp.errors import ConfigError
from lilyexp.methods.export import WEIGHTS_FILE, write_lilyexp_config

ADAPTER = "default"


def trained_parameters(tuner: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable parameter by name, shared ones under each name that holds them."""
    return {name: param for name, param in tuner.named_parameters(remove_duplicate=False) if param.requires_grad}


def upstream_name(name: str) -> str:
    """lilyexp's parameter name (``model.<path>.lily_A.default.weight``) as upstream peft saves it."""
    return "base_model." + name.replace(f".modules_to_save.{ADAPTER}.", ".").replace(f".{ADAPTER}.", ".")


def why_not_upstream(tuner: nn.Module) -> str | None:
    """None when upstream peft's Lily computes what this trained variant computes; else the reason.
    ``eval_pooling`` is not a reason: the weights are the same, and upstream's pooling over each forward call is
    what per-sample routing reproduces when an upstream user evaluates one sample per call."""
    config = tuner.peft_config[ADAPTER]
    strides = {group.stride for group in tuner.groups}
    checks = {
        "k/v slices or parallel adapters": bool(config.slices or config.parallel),
        "per-target settings": bool(config.per_target),
        f"router '{config.router}'": config.router != "layer",
        f"pooling '{config.pooling}'": config.pooling != "batch_mean",
        "padding left out of routing": config.mask_padding,
        "no router": not config.use_router,
        f"several A strides {sorted(strides)}": len(strides) != 1,
        "s not applied with s != 1": not config.apply_scaling and config.scaling != 1.0,
    }
    reasons = [reason for reason, applies in checks.items() if applies]
    return "; ".join(reasons) or None


def upstream_config(tuner: nn.Module) -> LilyConfig:
    config = tuner.peft_config[ADAPTER]
    return LilyConfig(r=config.r, stride_A=next(iter({g.stride for g in tuner.groups})), num_B=config.num_B,
                      scaling=config.scaling if config.apply_scaling else 1.0,
                      target_modules=sorted(config.target_modules), modules_to_save=config.modules_to_save,
                      task_type=config.task_type, init_weights=True)


def export_upstream(tuner: nn.Module, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    upstream_config(tuner).save_pretrained(str(directory))
    tensors = {upstream_name(n): p.detach().cpu().clone().contiguous() for n, p in trained_parameters(tuner).items()}
    save_file(tensors, directory / WEIGHTS_FILE)


def method_node(tuner: nn.Module) -> dict:
    """The config node that rebuilds this Lily (``lilyexp.load_adapter`` instantiates it)."""
    config = {k: v for k, v in dataclasses.asdict(tuner.peft_config[ADAPTER]).items()
              if k in {f.name for f in dataclasses.fields(type(tuner.peft_config[ADAPTER])) if f.init}}
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return {"_target_": "lilyexp.methods.lily.LilyMethod",
            "config": {"_target_": "lilyexp.methods.lily.LilyVariantConfig", **config}}


def export_lilyexp(tuner: nn.Module, directory: str | Path) -> None:
    """Shared tensors once (under the first name holding them), the other names as aliases."""
    directory = Path(directory)
    tensors, aliases, first = {}, {}, {}
    for name, param in trained_parameters(tuner).items():
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
            tensors[name] = param.detach().cpu().contiguous()
    write_lilyexp_config(directory, "lily", method_node(tuner))
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"aliases": json.dumps(aliases)})


def export(tuner: nn.Module, directory: str | Path) -> str:
    """Write the adapter in the upstream format when peft expresses it, else lilyexp's; returns which."""
    directory = Path(directory)
    if why_not_upstream(tuner) is None:
        export_upstream(tuner, directory)
        return "peft"
    export_lilyexp(tuner, directory)
    return "lilyexp"


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"cannot read the Lily adapter {path}: {exc}") from None
    return {**tensors, **{alias: tensors[key] for alias, key in aliases.items()}}


def load_tensors(tuner: nn.Module, directory: str | Path) -> nn.Module:
    """Copy an export's tensors into ``tuner`` (built with the saved config): lilyexp's format, or peft's (the
    names :func:`export_upstream` writes), so a peft-format export can be evaluated with lilyexp's own Lily
    (e.g. per-sample routing, which upstream peft's Lily lacks)."""
    expected, tensors = trained_parameters(tuner), read_tensors(Path(directory))
    layout = "lilyexp's"
    if not set(expected) & set(tensors):
        expected, layout = {upstream_name(name): param for name, param in expected.items()}, "peft's"
    copy_into(expected, tensors, Path(directory), layout)
    return tuner


def copy_into(expected: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], directory: Path,
              layout: str = "lilyexp's") -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"the Lily adapter in {directory} does not match the model (read in {layout} tensor "
                          f"names): missing {missing[:3]}, unexpected {unexpected[:3]}.")
    with torch.no_grad():
        for key, param in expected.items():
            if tensors[key].shape != param.shape:
                raise ConfigError(f"the saved Lily tensor '{key}' has shape {tuple(tensors[key].shape)}, the model "
                                  f"expects {tuple(param.shape)}.")
            param.copy_(tensors[key])
