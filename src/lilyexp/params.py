"""What a model trains, counted and moved: which parameters belong to the task head, the unique parameter counts a
record states (a tensor Lily shares across layers is counted once), and the trainable tensors as a state dict (for
checkpoints, the selected weights and full-weight exports). Below methods, recipes and records, which all use it."""

from __future__ import annotations

import logging

import torch

from lilyexp.errors import ConfigError

log = logging.getLogger("lilyexp")


def in_head(parameter_name: str, head_modules: list[str] | set[str]) -> bool:
    """Whether a parameter belongs to the task head (a module named in ``backbone.head_modules``)."""
    return bool(set(head_modules) & set(parameter_name.split(".")))


def count_parameters(model: torch.nn.Module, head_modules: list[str]) -> dict[str, int]:
    """Unique parameter counts: shared tensors (Lily's A and B) are counted once."""
    counts = {"total": 0, "trainable": 0, "head": 0}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        counts["total"] += param.numel()
        if param.requires_grad:
            counts["trainable"] += param.numel()
            if in_head(name, head_modules):
                counts["head"] += param.numel()
    counts["adapter"] = counts["trainable"] - counts["head"]
    return counts


def warn_if_oversized(params: dict, method: str) -> None:
    """An adapter larger than the frozen backbone it adapts (e.g. a rank far above the layers' width) is almost
    certainly a typo; it runs, but says so."""
    frozen = params["total"] - params["trainable"]
    if 0 < frozen < params["adapter"]:
        log.warning("method '%s' adds %s adapter parameters, more than the %s frozen backbone parameters it adapts: "
                    "is its rank larger than the layers' width?", method, f"{params['adapter']:,}", f"{frozen:,}")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors by (deduplicated) name: a shared A or B appears once. Copied contiguous: safetensors
    refuses strided tensors, such as SVD-initialised factors."""
    return {name: p.detach().cpu().clone(memory_format=torch.contiguous_format)
            for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise ConfigError(f"checkpoint does not match the model: unknown tensors {missing[:3]}.")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
