"""The paper's non-adapter baselines: full fine-tuning and linear probing (head only)."""

from __future__ import annotations

import torch

from lilyexp.errors import ConfigError


class FullFineTune:
    """Every parameter trains."""

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(True)
        return model


class LinearProbe:
    """Only the task head trains (``backbone.head_modules``)."""

    def __init__(self, head_modules: list[str]):
        if not head_modules:
            raise ConfigError("linear probing needs a task head, and this backbone declares no head_modules.")
        self.head_modules = set(head_modules)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, param in model.named_parameters():
            param.requires_grad = bool(self.head_modules & set(name.split(".")))
        return model
