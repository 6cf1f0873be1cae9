"""diffusers UNet backbones (SDXL and the random-init `tiny_sdxl`); needs the `diffusion` extra."""

from __future__ import annotations

from typing import Any

from lilyexp.backbones import Backbone
from lilyexp.backbones.location import torch_dtype, unavailable
from lilyexp.errors import ConfigError


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError("the SDXL backbones need diffusers: pip install -e '.[diffusion]'.") from None
    return diffusers


def load_unet(name_or_path: str, *, subfolder: str = "unet", dtype: str = "float32", **_: Any) -> Backbone:
    diffusers = _diffusers()
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(name_or_path, subfolder=subfolder,
                                                              torch_dtype=torch_dtype(dtype))
    except OSError as exc:
        raise unavailable(name_or_path, exc) from None
    return Backbone(unet, None)


def unet_from_config(config: dict[str, Any], **_: Any) -> Backbone:
    return Backbone(_diffusers().UNet2DConditionModel(**config), None)
