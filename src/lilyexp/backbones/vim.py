"""Vision Mamba small (Vim-S, "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")
in plain PyTorch, as the official ``vim/models_mamba.py`` builds it: conv patch embedding, a class
token in the middle of the patch sequence, absolute position embedding, 24 blocks of fp32-residual add + RMSNorm +
a bidirectional "v2" Mamba mixer (forward scan and a scan of the flipped sequence with its own ``_b`` parameters,
averaged), final RMSNorm, the class token into the head.

The selective scan and the causal depthwise convolution are transformers' (``models.mamba``), which use the
mamba_ssm / causal_conv1d kernels when installed and a PyTorch reference otherwise; nothing here re-derives them.
Parameter names equal the official checkpoint's, and ``load_checkpoint`` checks every backbone key (the official
loader's ``strict=False`` hides mismatches).

One deliberate difference from the official fused path: ``dt_proj`` is called as a module, softplus(W_dt·dt + b),
instead of reading ``dt_proj.weight`` inside a kernel, so adapters that wrap ``dt_proj`` (Lily's delta adapter)
take part in the forward. The value is the same.
"""

from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lilyexp.backbones import Backbone
from lilyexp.backbones.location import unavailable
from lilyexp.errors import ConfigError

HUB_ID, CHECKPOINT = "hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"


def scan_functions():
    """(selective_scan, causal_conv1d): transformers' Mamba functions (kernels when available)."""
    from transformers.models.mamba.modeling_mamba import causal_conv1d_fn, mamba_selective_scan

    return mamba_selective_scan, causal_conv1d_fn


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class BiMambaV2(nn.Module):
    """The Vim mixer: in_proj, then per direction conv1d → SiLU → x_proj → (dt, B, C) → selective scan gated by
    SiLU(z); the backward direction scans the flipped sequence; out_proj of the mean of both."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
        self.d_inner, self.dt_rank, self.d_state = d_inner, dt_rank, d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        for suffix in ("", "_b"):
            setattr(self, f"conv1d{suffix}", nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1))
            setattr(self, f"x_proj{suffix}", nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{suffix}", nn.Linear(dt_rank, d_inner))
            a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
            self.register_parameter(f"A{suffix}_log", nn.Parameter(torch.log(a)))
            self.register_parameter(f"D{suffix}", nn.Parameter(torch.ones(d_inner)))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def scan(self, xz: torch.Tensor, suffix: str) -> torch.Tensor:
        selective_scan, causal_conv1d = scan_functions()
        conv, x_proj, dt_proj = (getattr(self, f"{n}{suffix}") for n in ("conv1d", "x_proj", "dt_proj"))
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d(x, conv.weight.squeeze(1), conv.bias, activation="silu")
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt_proj(dt).transpose(1, 2)  # the module, bias included: adapters on dt_proj run
        A = -torch.exp(getattr(self, f"A{suffix}_log").float())
        return selective_scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), getattr(self, f"D{suffix}").float(),
                              z=z, delta_bias=None, delta_softplus=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)
        forward_scan = self.scan(xz, "")
        backward_scan = self.scan(xz.flip(-1), "_b").flip(-1)
        return self.out_proj(((forward_scan + backward_scan) / 2).transpose(1, 2))


class DropPath(nn.Module):
    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.rate
        return x * keep.to(x.dtype) / (1 - self.rate)


class Block(nn.Module):
    """residual ← residual + drop_path(hidden) (fp32); hidden ← mixer(RMSNorm(residual))."""

    def __init__(self, d_model: int, drop_path: float, **mixer):
        super().__init__()
        self.mixer, self.norm, self.drop_path = BiMambaV2(d_model, **mixer), RMSNorm(d_model), DropPath(drop_path)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype))), residual


class VisionMamba(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 24,
                 num_classes: int = 1000, drop_path_rate: float = 0.05, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2):
        super().__init__()
        patches = (img_size // patch_size) ** 2
        self.cls_position = patches // 2  # the "middle class token": index 98 of 197 at 224/16
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        rates = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # official: block i, rates[i]
        self.layers = nn.ModuleList(Block(embed_dim, rates[i], d_state=d_state, d_conv=d_conv, expand=expand)
                                    for i in range(depth))
        self.norm_f, self.drop_path = RMSNorm(embed_dim), DropPath(drop_path_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:  # the official models_mamba.py: trunc-normal(0.02) weights, zero bias
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (timm's switch name): the pure-PyTorch selective scan
        then holds one block's intermediate states instead of every block's."""
        self.grad_checkpointing = enable

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :self.cls_position], cls, x[:, self.cls_position:]], dim=1)
        return x + self.pos_embed

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.tokens(images), None
        for layer in self.layers:
            if self.grad_checkpointing and self.training:  # drop-path's mask is replayed: RNG state preserved
                hidden, residual = checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
        residual = residual + self.drop_path(hidden).float()
        return self.norm_f(residual.to(self.norm_f.weight.dtype))[:, self.cls_position]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


def load_checkpoint(model: VisionMamba, path: str | Path) -> None:
    """Load the official checkpoint (weights under ``model``), refusing any missing, unexpected or mis-shaped
    backbone tensor; the classification head is new."""
    try:  # DeiT-style checkpoints also pickle the training argparse.Namespace: allowed, nothing else is
        with torch.serialization.safe_globals([argparse.Namespace]):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise ConfigError(f"cannot read the Vim checkpoint {path}: {str(exc).splitlines()[0]}") from None
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds no state dict (expected the weights under 'model').")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ConfigError(f"{path} does not match Vim: missing {missing[:4]} ({len(missing)}), unexpected "
                          f"{unexpected[:4]} ({len(unexpected)}), wrong shape {shapes[:4]} ({len(shapes)}).")
    model.load_state_dict(state, strict=False)


def load(*, pretrained: bool, num_classes: int = 0, checkpoint_path: str | None = None, hub_id: str = HUB_ID,
         filename: str = CHECKPOINT, **architecture) -> Backbone:
    """Vim with a fresh head of ``num_classes`` (the task's); the official checkpoint from ``checkpoint_path`` or
    the hub."""
    model = VisionMamba(num_classes=num_classes, **architecture)
    if pretrained:
        if checkpoint_path is None:
            from huggingface_hub import hf_hub_download
            try:
                checkpoint_path = hf_hub_download(hub_id, filename)
            except Exception as exc:  # offline, unknown id, gated: one sentence either way
                raise unavailable(f"{hub_id}/{filename}", exc,
                                  f"backbone.load.checkpoint_path=/path/to/{filename}") from None
        load_checkpoint(model, checkpoint_path)
    return Backbone(model, None)
