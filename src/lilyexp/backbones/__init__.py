"""Backbone loaders: each returns a :class:`Backbone` (model + processor). Heavy libraries import lazily."""

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Backbone:
    model: torch.nn.Module
    processor: Any = None  # tokenizer for text, None where the task builds its own transform
