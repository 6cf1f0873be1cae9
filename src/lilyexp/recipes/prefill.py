"""Beam search that prefills each prompt once: ``generate`` repeats every prompt ``num_beams`` times before its
first forward call, so the prompt's tokens are computed ``num_beams`` times over (about 40% of the official
batch-1 evaluation on a CPU). Within :func:`prefill_once`, that first call runs on one copy of each prompt and its
outputs (logits and the cache) are repeated to the beams; every later step is transformers' own beam search.

Why the answers do not change: the copies are identical rows, so every layer computes the same values for them,
and a router that pools over rows sees the same mixture over one copy as over ``num_beams`` identical ones —
Lily's official ``batch_mean`` (over the call, and per group under ``eval_pooling=sample``, where each prompt's
beams are one group), the paper's per-sample ``sample_sum`` and per-token routing alike (tests/test_prefill.py
checks generations token for token). The hooks are torch's forward hooks (the pre-hook first, so hooks that read
the inputs, such as Lily's padding capture, see the one-copy call) on the transformers model that
``generate`` calls, so no part of transformers' generation is replaced; a first call that is not a prefill of
identical copies (another cache, another layout, a Falcon-Mamba state transformers cannot repeat) runs unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from lilyexp.methods.routing import current_routing_groups, routing_groups

BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")
SHARED_KEYS = ("cache_position",)  # one entry per position, whatever its length


@dataclass
class PrefillCount:
    """How many first calls ran on one copy per prompt (``once``) or on every beam (``per_beam``)."""

    once: int = 0
    per_beam: int = 0

    @property
    def mode(self) -> str:
        if not self.once and not self.per_beam:
            return "none (no beam search ran)"
        if self.once and not self.per_beam:
            return "once per prompt"
        return "per beam" if not self.once else "mixed"


def generating_model(model: nn.Module) -> PreTrainedModel | None:
    """The outermost transformers model inside ``model`` (a PeftModel wraps it): the module ``generate`` calls."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def cache_of(kwargs: dict) -> Cache | None:
    return next((v for v in kwargs.values() if isinstance(v, Cache)), None)


def expandable(cache: Cache | None) -> bool:
    """Whether every layer of the cache can be repeated to the beams through transformers' own API. Falcon-Mamba's
    recurrent state (``LinearAttentionLayer`` in transformers 5) has no ``batch_repeat_interleave``, so its beams
    keep the four-copy prefill rather than lilyexp reaching into the state's tensors."""
    layers = getattr(cache, "layers", None)
    return (cache is not None and layers is not None
            and all(hasattr(layer, "batch_repeat_interleave") for layer in layers))


def repeats_rows(tensor: torch.Tensor | None, copies: int) -> bool:
    """Rows come in runs of ``copies`` identical rows."""
    if tensor is None:
        return True
    grouped = tensor.reshape(-1, copies, *tensor.shape[1:])
    return bool(torch.equal(grouped, grouped[:, :1].expand_as(grouped)))


def per_row(kwargs: dict, rows: int) -> list[str]:
    """The inputs that hold one entry per row (a position tensor of shape (1, length) is shared, not per row)."""
    return [k for k in BATCH_KEYS if torch.is_tensor(kwargs.get(k)) and kwargs[k].dim() and kwargs[k].shape[0] == rows]


def is_beam_prefill(kwargs: dict, copies: int, groups: torch.Tensor | None) -> bool:
    """The first call of a generation whose rows (and routing groups) come in runs of identical copies, with no
    other per-row input the hook would not shrink."""
    ids = kwargs.get("input_ids")
    cache = cache_of(kwargs)
    if ids is None or not expandable(cache) or cache.get_seq_length() != 0 or ids.shape[0] % copies:
        return False
    rows = ids.shape[0]
    unknown = [k for k, v in kwargs.items() if torch.is_tensor(v) and v.dim() and v.shape[0] == rows
               and k not in BATCH_KEYS + SHARED_KEYS]
    return (not unknown and all(repeats_rows(kwargs[k], copies) for k in per_row(kwargs, rows))
            and (groups is None or (len(groups) == rows and repeats_rows(groups, copies))))


def expand_output(output: Any, copies: int, rows: int) -> Any:
    """Repeat every per-row tensor of the output and the cache (in place) ``copies`` times per row."""
    for key, value in output.items():
        if isinstance(value, Cache):
            value.batch_repeat_interleave(copies)
        elif torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows:
            output[key] = value.repeat_interleave(copies, dim=0)
    return output


@contextlib.contextmanager
def prefill_once(model: nn.Module, num_beams: int) -> Iterator[PrefillCount]:
    """Within the block, ``model.generate(..., num_beams=num_beams)`` prefills one copy of each prompt."""
    count = PrefillCount()
    target = generating_model(model)
    if num_beams <= 1 or target is None:
        yield count
        return
    pending: list[contextlib.ExitStack] = []

    def before(module: nn.Module, args: tuple, kwargs: dict):
        cache = cache_of(kwargs)
        if args or cache is None or cache.get_seq_length() != 0:  # a decode step: the common, cheap exit
            return None
        groups = current_routing_groups(model)
        if not is_beam_prefill(kwargs, num_beams, groups):
            count.per_beam += 1
            return None
        keys = per_row(kwargs, kwargs["input_ids"].shape[0])
        shrunk = {k: v[::num_beams] if k in keys else v for k, v in kwargs.items()}
        stack = contextlib.ExitStack()
        rows = shrunk["input_ids"].shape[0]
        if groups is not None:  # one copy per group; without groups the call pools over all rows, as before
            stack.enter_context(routing_groups(model, groups[::num_beams]))
        stack.rows = rows  # type: ignore[attr-defined]
        pending.append(stack)
        count.once += 1
        return args, shrunk

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if not pending:
            return None
        stack = pending.pop()
        stack.close()
        return expand_output(output, num_beams, stack.rows)  # type: ignore[attr-defined]

    handles = [target.register_forward_pre_hook(before, with_kwargs=True, prepend=True),  # before others' hooks
               target.register_forward_hook(after, with_kwargs=True)]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()
        for stack in pending:
            stack.close()
