"""Any peft method from its config (LoRA, PiSSA, Lily, DoRA, FourierFT, AdaLoRA, ...): ``get_peft_model``."""

from __future__ import annotations

import torch
from peft import PeftConfig, get_peft_model

from lilyexp.errors import ConfigError


class PeftMethod:
    """Wrap the backbone with ``config`` (a peft config object built by Hydra from the method yaml)."""

    def __init__(self, config: PeftConfig):
        rank = getattr(config, "r", None)
        if isinstance(rank, int) and rank <= 0:
            raise ConfigError(f"the adapter rank r must be a positive integer, got {rank}.")
        if not getattr(config, "target_modules", True):
            raise ConfigError("the method has no target modules; set method.target_modules.")
        self.config = config

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            return get_peft_model(model, self.config)
        except ValueError as exc:  # e.g. a target module name the backbone does not have
            raise ConfigError(f"peft could not adapt the backbone: {exc}") from None
