"""Falcon-Mamba with adapters on ``dt_proj`` that take effect: paper Table 1's "Δ+in" rows (Lily on dt_proj and
in_proj) and its 3.7M LoRA row (r 2 on in_proj and dt_proj, the target list of LoRA's defaults in the official
``commonsense-reasoning/finetune_mamba.py``, github.com/yibozhong/lily).

transformers' ``FalconMambaMixer`` computes the time step as ``dt_proj.weight @ dt``: a module that wraps
``dt_proj`` (a LoRA or Lily layer) never runs, and its parameters get no gradient. The mixer has one branch that
calls the module, ``dt_proj(dt) - dt_proj.bias``, taken for quantized models (whose Linear has no plain weight);
the selective scan then adds the bias back before its softplus, as it does for the plain path.
:func:`route_time_steps_through_dt_proj` takes that branch in every mixer whose ``dt_proj`` is wrapped, decided at
each forward, so it holds however and whenever the adapter was attached (training, an exported adapter loaded for
evaluation) and is undone by a merge. A mixer with a plain ``dt_proj`` keeps transformers' own path, so a model
without adapters there computes what it computed before. The branch is chosen through a copy of the config held by
that mixer alone: the quantized flag never reaches the model's own config (nor a saved ``config.json``).

Two differences from the official runs, both stated where the Table 1 cells are configured:
* The official Falcon-Mamba runs used the fused CUDA kernels, which read ``dt_proj.weight`` too: the dt_proj part
  of their LoRA was counted (3,702,784 parameters) but, by that code path, never ran. Here it runs.
* In half precision the module's output ``W·dt + b`` is rounded before the bias is taken off again, as
  transformers' quantized branch and the pure-PyTorch path of 2024 (``softplus(dt_proj(dt))``) round it; the fused
  kernels add the bias in fp32.
"""

from __future__ import annotations

import copy

import torch

QUANTIZED_BRANCH = "_is_quantized"  # the attribute transformers' mixer checks (hasattr) to call dt_proj


def route_time_steps_through_dt_proj(model: torch.nn.Module) -> torch.nn.Module:
    """Make every Falcon-Mamba mixer of ``model`` call its ``dt_proj`` module whenever an adapter wraps it."""
    for module in model.modules():
        if hasattr(module, "dt_proj") and hasattr(module, "x_proj") and hasattr(module, "config"):
            module.register_forward_pre_hook(choose_time_step_branch)
    return model


def choose_time_step_branch(mixer: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook: the module-calling branch for a wrapped ``dt_proj``, transformers' own otherwise."""
    shared = getattr(mixer, "_lilyexp_shared_config", mixer.config)
    if type(mixer.dt_proj) is torch.nn.Linear:
        mixer.config = shared
        return
    if not hasattr(mixer, "_lilyexp_routed_config"):
        routed = copy.copy(shared)
        setattr(routed, QUANTIZED_BRANCH, True)
        mixer._lilyexp_shared_config, mixer._lilyexp_routed_config = shared, routed
    mixer.config = mixer._lilyexp_routed_config
