"""timm image backbones (ViT-B/16 and the random-init `tiny_vit`); the VTAB task supplies the transform."""

from __future__ import annotations

from typing import Any

from lilyexp.backbones import Backbone
from lilyexp.backbones.location import unavailable


def load(model_name: str, *, pretrained: bool, num_classes: int = 0, checkpoint_path: str | None = None,
         **architecture: Any) -> Backbone:
    """``timm.create_model`` with a fresh head of ``num_classes`` (given by the task), made by
    ``reset_classifier`` as the official VTAB code does (nn.Linear's default init, not timm's trunc-normal)."""
    import timm

    try:
        model = timm.create_model(model_name, pretrained=pretrained and not checkpoint_path,
                                  num_classes=num_classes, checkpoint_path=checkpoint_path or "", **architecture)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        raise unavailable(model_name, exc, "backbone.load.checkpoint_path=/path/to/the/weights (.npz or "
                          "timm .safetensors)") from None
    if num_classes:  # the official main.py's reset_classifier: a new head with nn.Linear's own initialisation
        model.reset_classifier(num_classes)
    return Backbone(model, None)
