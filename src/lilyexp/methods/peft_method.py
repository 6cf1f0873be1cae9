"""Any peft method from its config (LoRA, PiSSA, Lily, DoRA, FourierFT, AdaLoRA, ...): ``get_peft_model``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from peft import PeftConfig, PeftModel, get_peft_model

from lilyexp.errors import ConfigError
from lilyexp.methods import MethodSettings
from lilyexp.settings import knob


@dataclass
class LoraSettings(MethodSettings):
    """method=lora and method=milora: a peft LoraConfig."""

    r: int = knob(32)
    alpha: float = knob(64)
    dropout: float = knob(0.05)
    target_modules: Optional[list] = knob(None, help="None: the backbone's adapter_targets.lora")
    init: Any = knob(True, help="peft's init_lora_weights: true (kaiming A, zero B), gaussian, pissa, ...")


@dataclass
class PissaSettings(LoraSettings):
    """method=pissa: LoRA initialised from the principal singular components (peft's init_lora_weights)."""

    init: Any = knob("pissa", help="pissa (full SVD) or pissa_niter_<K> (randomised SVD, K iterations)")


@dataclass
class PeftSettings(MethodSettings):
    """method=peft: any peft config, given whole under ``config`` (its ``_target_`` names the class)."""

    target_modules: Optional[list] = knob(None)
    config: Any = knob(None)


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

    @staticmethod
    def summary(model: torch.nn.Module) -> None:
        return None

    @staticmethod
    def save(model: PeftModel, directory: str | Path) -> None:
        """peft's ``save_pretrained`` (safetensors)."""
        model.save_pretrained(str(directory), safe_serialization=True)

    @staticmethod
    def load(model: torch.nn.Module, directory: str | Path) -> PeftModel:
        """Adapt ``model`` with a saved adapter; a corrupt or mismatched one is a clear error."""
        try:
            return PeftModel.from_pretrained(model, str(directory))
        except Exception as exc:  # peft raises OSError, ValueError, RuntimeError or safetensors errors here
            raise ConfigError(f"cannot load the adapter in {directory}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
