"""Backbone loaders: each returns a :class:`Backbone` (model + processor). Heavy libraries import lazily.

A backbone yaml is metadata other nodes read (``provides``, ``adapter_targets``, ...) plus a ``load`` node; its
schema is :class:`BackboneSettings`."""

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lilyexp.settings import meta, plumbing


@dataclass
class Backbone:
    model: torch.nn.Module
    processor: Any = None  # tokenizer for text, None where the task builds its own transform


@dataclass
class BackboneSettings:
    """What a backbone yaml declares. ``load`` is the loader node: its non-location entries (architecture, dtype,
    drop-path, ...) are part of a cell's identity; where the weights come from (hub id or local path) is not."""

    name: str = meta("")
    provides: list = meta([])  # modalities (a task's `modality` must be one of them)
    peft_task_type: Optional[str] = meta(None)
    head_modules: list = meta([])  # the task head's module names (trained by every method)
    adapter_targets: dict = meta({})  # per target list (a method's ``targets``), the module names
    token_scale: int = meta(1)  # tokens per BPE token of its tokenizer (byte-level tiny backbones: 4)
    latent_scale: Optional[int] = meta(None)  # pixels per latent of an image generator's VAE (SDXL: 8)
    image_size: Optional[int] = meta(None)  # the image size it was built for (ViT-B/16: 224; tiny_sdxl: 32)
    random_init: bool = meta(False)  # random weights built from a config (the tiny_* test backbones)
    hub_id: Optional[str] = meta(None)  # where the base model is published, whatever copy a run loads
    card_note: Optional[str] = meta(None)  # what loading an export needs beyond peft, for its model card
    # modules a GPU run needs unless trainer.gradient_checkpointing=true: {modules, install, why} (Mamba's kernels)
    gpu_kernels: dict = meta({})
    architecture: Any = plumbing()  # shapes only, for parameter accounting on the meta device
    load: Any = plumbing()
    prepare: Any = plumbing()  # a callable on the loaded model, before a method adapts it (Falcon-Mamba's dt_proj)


def load_backbone(backbone: Any, **task_kwargs: Any) -> Backbone:
    """The backbone its ``load`` node builds (``task_kwargs``: e.g. a classifier's ``num_labels``), with the
    family's ``prepare`` step applied to the model."""
    from lilyexp.compose import build

    loaded = build(backbone.load, **task_kwargs)
    if backbone.get("prepare") is not None:
        build(backbone.prepare)(loaded.model)
    return loaded


def skeleton(backbone: Any, **task_kwargs: Any) -> torch.nn.Module:
    """The backbone's modules on the meta device (shapes, no memory, no weights): its ``architecture`` node (a
    transformers config, or a loader call that downloads nothing), a pretrained backbone's own config, or its
    random-init ``load`` node. Checks against the architecture (layer counts, module names) run on it before any
    weights load."""
    from hydra.utils import get_class, instantiate

    from lilyexp.backbones.hf import pretrained_config

    load = backbone.load
    with torch.device("meta"):
        if "architecture" in backbone and backbone.architecture is not None:
            built = instantiate(backbone.architecture, **task_kwargs) if "auto_class" not in load else \
                instantiate(backbone.architecture)
        elif "name_or_path" in load and "auto_class" in load:
            built = pretrained_config(**{k: v for k, v in load.items() if not k.startswith("_")})
        else:
            built = instantiate(load, **task_kwargs)
        if isinstance(built, Backbone):
            return built.model
        if isinstance(built, torch.nn.Module):
            return built
        for key, value in task_kwargs.items():  # e.g. num_labels for a classifier head
            setattr(built, key, value)
        return get_class(load.auto_class).from_config(built)
