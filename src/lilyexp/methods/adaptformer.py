"""AdaptFormer (Chen et al. 2022), the VTAB baseline of paper Tables 4-5, as the official
visual-adaptation-benchmark/vit/adaptformer.py builds it: a bottleneck MLP (down, ReLU, dropout 0.1, up; no
biases) beside each block's MLP, fed with the block's input to the MLP branch (before ``norm2``) and added, scaled,
outside the MLP's drop-path; up-projection zero-initialised, down as ``nn.Linear`` initialises it. Bottleneck 8:
12 x 2 x 768 x 8 = 147,456 parameters on ViT-B/16 (the paper's Table 5 prints 0.147M). Scale 0.1 is the
AdaptFormer paper's VTAB setting (the official script's --scale defaults to 1, but its AdaptFormer path cannot run:
it passes an undefined ``args.bit``).

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
from lilyexp.params import in_head
from lilyexp.settings import knob


@dataclass
class AdaptFormerSettings(MethodSettings):
    """method=adaptformer: where it attaches comes from the backbone's ``adapter_targets.adaptformer``."""

    bottleneck: int = knob(8)
    scale: float = knob(0.1)
    dropout: float = knob(0.1)


class Bottleneck(nn.Module):
    def __init__(self, width: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck, bias=False), nn.Linear(bottleneck, width, bias=False)
        self.dropout, self.scale = nn.Dropout(dropout), scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

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
                 scale: float = 0.1, dropout: float = 0.1):
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
