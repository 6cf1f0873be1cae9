"""The paper's non-adapter baselines: full fine-tuning and linear probing (head only)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lilyexp.errors import ConfigError
from lilyexp.methods.export import WEIGHTS_FILE, write_lilyexp_config
from lilyexp.params import in_head, load_trainable_state, trainable_state

class SavesTrainedWeights:
    """Export and load what the method trains (all weights, the head, an AdaptFormer's bottlenecks) in lilyexp's
    format: the trained tensors and the method's config node (see lilyexp.methods.export)."""

    @staticmethod
    def summary(model: torch.nn.Module) -> None:
        return None

    def check(self, skeleton: torch.nn.Module) -> None:
        """Attach to the backbone's weightless skeleton: what it needs (a head, named modules) must be there."""
        with torch.device("meta"):  # what it adds stays weightless too
            model = self.apply(skeleton)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"{type(self).__name__} would train nothing on this backbone.")

    def export(self, model: torch.nn.Module, directory: str | Path, node: dict) -> None:
        write_lilyexp_config(directory, type(self).__name__, node)
        save_file(trainable_state(model), Path(directory) / WEIGHTS_FILE)

    def load(self, model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
        model = self.apply(model)
        path = Path(directory) / WEIGHTS_FILE
        try:
            state = load_file(path)
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        try:
            load_trainable_state(model, state)
        except RuntimeError as exc:  # a shape mismatch
            raise ConfigError(f"{path} does not match the model: {str(exc).splitlines()[0]}") from None
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
