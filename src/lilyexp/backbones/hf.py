"""Hugging Face transformers loaders: pretrained (hub id, local folder, package folder, GGUF) or random-init
from a config (the `tiny_*` backbones, which keep the real architecture's module names)."""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class

from lilyexp.backbones import Backbone
from lilyexp.backbones.location import resolve, torch_dtype, unavailable


def load_pretrained(
    name_or_path: str,
    *,
    auto_class: str,
    package: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    pad_token_id: int | None = None,
    tokenizer_name_or_path: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **task_model_kwargs: Any,
) -> Backbone:
    """Load model and tokenizer with ``auto_class`` (e.g. AutoModelForCausalLM).

    ``task_model_kwargs`` come from the task (e.g. ``num_labels`` for a classifier head).
    """
    from transformers import AutoTokenizer

    location = resolve(name_or_path, package)
    common = {"revision": revision, **({"gguf_file": gguf_file} if gguf_file else {})}
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path or location, **common)
        model = get_class(auto_class).from_pretrained(
            location, dtype=torch_dtype(dtype), **common, **(model_kwargs or {}), **task_model_kwargs)
    except OSError as exc:
        raise unavailable(name_or_path, exc) from None
    return Backbone(model, _with_pad_token(tokenizer, model, pad_token_id))


def pretrained_config(name_or_path: str, *, package: str | None = None, gguf_file: str | None = None,
                      revision: str | None = None, **_: Any) -> Any:
    """The architecture config of a pretrained backbone (no weights), e.g. to build it on the meta device."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(name_or_path, package), revision=revision,
                                          **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as exc:
        raise unavailable(name_or_path, exc) from None


def from_config(config: Any, *, auto_class: str, tokenizer: Any, pad_token_id: int | None = None,
                dtype: str | None = None, **task_model_kwargs: Any) -> Backbone:
    """Random-init model of ``config`` (a transformers config object), in ``dtype`` when given; no download."""
    for key, value in task_model_kwargs.items():
        setattr(config, key, value)
    model = get_class(auto_class).from_config(config)
    if dtype is not None:
        model.to(torch_dtype(dtype))
    return Backbone(model, _with_pad_token(tokenizer, model, pad_token_id))


def _with_pad_token(tokenizer: Any, model: Any, pad_token_id: int | None) -> Any:
    # The official commonsense scripts pad with id 0 (LLaMA-3 has no pad token); a yaml states which id.
    if pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_token_id)
    elif tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer
