"""The paper's non-adapter baselines: full fine-tuning and linear probing (head only)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lilyexp.errors import ConfigError
from lilyexp.recipes.core import load_trainable_state, trainable_state
from lilyexp.records import in_head

WEIGHTS = "trained_weights.safetensors"


class SavesTrainedWeights:
    """Save and load what the method trains (all weights, or the head) as one safetensors file."""

    @staticmethod
    def summary(model: torch.nn.Module) -> None:
        return None

    @staticmethod
    def save(model: torch.nn.Module, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(model), Path(directory) / WEIGHTS)

    def load(self, model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
        model = self.apply(model)
        try:
            state = load_file(Path(directory) / WEIGHTS)
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"cannot read {Path(directory) / WEIGHTS}: {exc}") from None
        try:
            load_trainable_state(model, state)
        except RuntimeError as exc:  # a shape mismatch
            raise ConfigError(f"{Path(directory) / WEIGHTS} does not match the model: {str(exc).splitlines()[0]}") from None
        return model


class FullFineTune(SavesTrainedWeights):
    """Every parameter trains."""

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(True)
        return model


class LinearProbe(SavesTrainedWeights):
    """Only the task head trains (``backbone.head_modules``)."""

    def __init__(self, head_modules: list[str]):
        if not head_modules:
            raise ConfigError("linear probing needs a task head, and this backbone declares no head_modules.")
        self.head_modules = set(head_modules)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, param in model.named_parameters():
            param.requires_grad = in_head(name, self.head_modules)
        return model
