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
    adapter_targets: dict = meta({})  # per method family, the module names it adapts
    bypassed_modules: dict = meta({})  # module name -> why an adapter on it would never run
    token_scale: int = meta(1)  # tokens per BPE token of its tokenizer (byte-level tiny backbones: 4)
    latent_scale: Optional[int] = meta(None)  # pixels per latent of an image generator's VAE (SDXL: 8)
    architecture: Any = plumbing()  # shapes only, for parameter accounting on the meta device
    load: Any = plumbing()
