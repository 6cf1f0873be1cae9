"""What a finished run leaves for other tools: the selected adapter in peft's file layout
(``adapter_config.json`` + ``adapter_model.safetensors``), and :func:`load_adapter`, which loads any lilyexp export.

* Methods peft expresses (LoRA, PiSSA, MiLoRA, any peft config, and the Lily variants upstream peft's Lily tuner
  computes) export in peft's own format: ``peft.PeftModel.from_pretrained(base, directory)`` loads them. PiSSA and
  MiLoRA train on a residual base; they export the form peft documents for that (``save_pretrained(...,
  path_initial_model_for_weight_conversion=...)``): a LoRA of twice the rank that applies to the ORIGINAL weights.
* Everything else (Lily's sliced, parallel, per-target or Vim variants, AdaptFormer, full fine-tuning, linear
  probing) exports in lilyexp's format: ``adapter_config.json`` names the method's config node under
  ``lilyexp_method``, and its ``peft_type`` is a sentence upstream peft cannot resolve, so ``PeftModel`` refuses the
  directory (it would otherwise load an untrained adapter and warn) and the error says what to call instead.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from lilyexp.errors import ConfigError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def refusal(method: str) -> str:
    """The ``peft_type`` of a lilyexp-format export: what upstream peft shows when it refuses it."""
    return (f"lilyexp:{method} -- not a peft adapter type: this directory holds a lilyexp export; load it with "
            f"lilyexp.load_adapter(model, directory)")


def write_lilyexp_config(directory: str | Path, method: str, node: dict, **details: Any) -> None:
    """``adapter_config.json`` of a lilyexp-format export: the method's config node (``_target_`` and arguments)
    and whatever the loader needs beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": refusal(method), "lilyexp_method": node, **details}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list) + "\n")


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable adapter config ({exc}); is {directory} an exported adapter?"
                          ) from None


MISSING_KEYS_WARNING = "Found missing adapter keys"


def load_adapter(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """``model`` adapted with the exported adapter in ``directory``, whichever method made it: a lilyexp-format
    export through its method's own ``load``, a peft-format one through ``peft.PeftModel.from_pretrained``."""
    config = read_config(directory)
    node = config.get("lilyexp_method")
    if node is None:
        return load_peft(model, directory)
    return instantiate(node, _convert_="all").load(model, directory)


def load_peft(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    from peft import PeftModel

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(model, str(directory))
    except Exception as exc:  # peft raises OSError, ValueError, RuntimeError or safetensors errors here
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"cannot load the adapter in {directory}: {type(exc).__name__}: {first}") from None
    for warning in caught:
        if str(warning.message).startswith(MISSING_KEYS_WARNING):
            # peft only warns and leaves those weights at their initialisation: every output would be silently
            # wrong (e.g. an adapter written by an older lilyexp in peft's layout with lilyexp-only fields).
            raise ConfigError(f"cannot load the adapter in {directory}: its weights do not match the adapter its "
                              f"adapter_config.json builds (peft found missing adapter keys); re-export it.")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return loaded
