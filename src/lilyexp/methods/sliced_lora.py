"""The ViT LoRA baseline as the official visual-adaptation-benchmark/vit/lora.py builds it (paper Table 4): on each
attention's fused qkv projection, separate low-rank branches for chosen output slices (q and v), each
down (no bias) -> dropout 0.1 -> up (no bias, zero-initialised), added to its slice scaled by s; the qkv bias is
kept. This is not peft's LoRA on the whole fused layer (which would adapt k too, with one rank for all three).

peft has no slice-wise LoRA; the branches wrap the fused Linear (no forward is patched), and the run exports in
lilyexp's format (:mod:`lilyexp.methods.export`).
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
class SlicedLoraSettings(MethodSettings):
    """method=lora_sliced."""

    r: int = knob(8)
    scale: float = knob(1.0, help="s: each branch's output is multiplied by it (lora.py's --scale)")
    dropout: float = knob(0.1)
    parts: list = knob(["q", "k", "v"], help="the fused projection's output slices, in order")
    adapt: list = knob(["q", "v"], help="the slices that get a branch")
    target_modules: list = knob([], help="the fused projections (suffixes); the backbone's adapter_targets.lora")


class LowRankBranch(nn.Module):
    def __init__(self, width_in: int, width_out: int, rank: int, dropout: float):
        super().__init__()
        self.down, self.up = nn.Linear(width_in, rank, bias=False), nn.Linear(rank, width_out, bias=False)
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.down(x)))


class SlicedLowRank(nn.Module):
    """A fused Linear whose output slices ``adapt`` get ``scale`` x a low-rank branch of the same input."""

    def __init__(self, base_layer: nn.Linear, parts: list[str], adapt: list[str], rank: int, scale: float,
                 dropout: float):
        super().__init__()
        if base_layer.out_features % len(parts):
            raise ConfigError(f"a {base_layer.out_features}-wide projection does not split into {len(parts)} parts.")
        self.base_layer, self.parts, self.scale = base_layer, list(parts), scale
        self.width = base_layer.out_features // len(parts)
        self.branches = nn.ModuleDict({p: LowRankBranch(base_layer.in_features, self.width, rank, dropout)
                                       for p in adapt})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = list(self.base_layer(x).split(self.width, dim=-1))
        for part, branch in self.branches.items():
            index = self.parts.index(part)
            pieces[index] = pieces[index] + self.scale * branch(x).to(pieces[index].dtype)
        return torch.cat(pieces, dim=-1)


class SlicedLoraMethod(SavesTrainedWeights):
    """``method=lora_sliced``: the branches and the task head train; everything else is frozen."""

    def __init__(self, target_modules: list[str], head_modules: list[str], r: int = 8, scale: float = 1.0,
                 dropout: float = 0.1, parts: list[str] = ("q", "k", "v"), adapt: list[str] = ("q", "v")):
        if r <= 0 or not 0 <= dropout < 1:
            raise ConfigError(f"lora_sliced needs r >= 1 and dropout in [0, 1), got r={r}, dropout={dropout}.")
        if not adapt or not set(adapt) <= set(parts):
            raise ConfigError(f"lora_sliced: adapt={list(adapt)} must be a non-empty subset of parts={list(parts)}.")
        self.targets, self.head_modules = list(target_modules), set(head_modules)
        self.r, self.scale, self.dropout, self.parts, self.adapt = r, scale, dropout, list(parts), list(adapt)

    def apply(self, model: nn.Module) -> nn.Module:
        for name, param in model.named_parameters():
            param.requires_grad = in_head(name, self.head_modules)
        wrapped = [self.wrap(model, name) for name, module in list(model.named_modules())
                   if isinstance(module, nn.Linear) and name.split(".")[-1] in self.targets]
        if not wrapped:
            raise ConfigError(f"lora_sliced found no Linear named {self.targets} in the backbone.")
        return model

    def wrap(self, model: nn.Module, name: str) -> str:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SlicedLowRank(getattr(parent, child), self.parts, self.adapt, self.r, self.scale,
                                             self.dropout))
        return name
