"""AdaptFormer (Chen et al. 2022), the VTAB baseline of paper Tables 4-5: a bottleneck MLP (down, ReLU, up)
beside each block's MLP, fed with the block's input to the MLP branch (before ``norm2``) and added, scaled,
outside the MLP's drop-path, as AdaptFormer's ``parallel`` option; up-projection zero-initialised, down
kaiming-uniform (its ``lora`` init). V-PETL's VTAB-1K setting: bottleneck 8, scale 0.1 (156,768 parameters on
ViT-B/16).

peft has no AdaptFormer. The adapter attaches through forward hooks on modules the backbone names
(``adapter_targets.adaptformer``: the blocks, the module whose input the adapter reads, the module whose output
it adds to), so no timm code is copied or patched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lilyexp.errors import ConfigError
from lilyexp.methods import MethodSettings
from lilyexp.methods.baselines import SavesTrainedWeights
from lilyexp.records import in_head
from lilyexp.settings import knob


@dataclass
class AdaptFormerSettings(MethodSettings):
    """method=adaptformer: where it attaches comes from the backbone's ``adapter_targets.adaptformer``."""

    bottleneck: int = knob(8)
    scale: float = knob(0.1)
    dropout: float = knob(0.0)


class Bottleneck(nn.Module):
    def __init__(self, width: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        self.dropout, self.scale = nn.Dropout(dropout), scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(x)))) * self.scale


def width_of(module: nn.Module) -> int:
    shape = getattr(module, "normalized_shape", None) or (getattr(module, "in_features", None),)
    if shape[-1] is None:
        raise ConfigError(f"cannot tell the AdaptFormer input width from a {type(module).__name__}.")
    return int(shape[-1])


class AdaptFormerMethod(SavesTrainedWeights):
    """``method=adaptformer``: the head and one bottleneck per block train; everything else is frozen."""

    def __init__(self, blocks: str, input: str, output: str, head_modules: list[str], bottleneck: int = 8,
                 scale: float = 0.1, dropout: float = 0.0):
        if bottleneck <= 0:
            raise ConfigError(f"AdaptFormer bottleneck must be positive, got {bottleneck}.")
        self.blocks, self.input, self.output = blocks, input, output
        self.head_modules, self.bottleneck, self.scale, self.dropout = set(head_modules), bottleneck, scale, dropout

    def apply(self, model: nn.Module) -> nn.Module:
        try:
            blocks = model.get_submodule(self.blocks)
        except AttributeError:
            raise ConfigError(f"the backbone has no '{self.blocks}' to attach AdaptFormer to.") from None
        for name, param in model.named_parameters():
            param.requires_grad = in_head(name, self.head_modules)
        for block in blocks:
            self.attach(block)
        return model

    def attach(self, block: nn.Module) -> None:
        try:
            source, target = block.get_submodule(self.input), block.get_submodule(self.output)
        except AttributeError as exc:
            raise ConfigError(f"AdaptFormer: {exc}.") from None
        block.adaptformer = Bottleneck(width_of(source), self.bottleneck, self.scale, self.dropout)
        captured: dict[str, torch.Tensor] = {}
        source.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
        target.register_forward_hook(lambda module, args, out: out + block.adaptformer(captured.pop("x")))
