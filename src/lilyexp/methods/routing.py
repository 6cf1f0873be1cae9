"""Routing groups: batched evaluation that reproduces batch-1 evaluation for adapters whose routing pools over
the rows of a forward call.

Lily's official router (``pooling: batch_mean``) averages its per-token softmax over every row and token of a
forward call, so a sample's output depends on what else is in the batch. The official commonsense evaluation
(``commonsense-reasoning/evaluate_llama.py``) generates one prompt at a time with 4-beam search: each forward
call then holds exactly that prompt's beams. Evaluating several prompts per call gives the same answers only if
the pooling is done per *group of rows* that a batch-1 call would have held together:

* beam search: ``generate`` repeats each prompt ``num_beams`` times in contiguous rows and only ever reorders
  rows within a prompt's block (its beam indices carry a ``batch * num_beams`` offset), so row ``i`` belongs to
  prompt ``i // num_beams`` for the whole generation (:func:`beam_groups`);
* classifier-free guidance batched as ``[uncond_0..uncond_{n-1}, cond_0..cond_{n-1}]``: a batch-1 call holds
  one prompt's uncond and cond rows, so row ``i`` belongs to group ``i mod n`` (:func:`cfg_groups`);
* classification: a batch-1 call holds one row (:func:`row_groups`).

A recipe states the groups with :func:`routing_groups` around its evaluation forwards or ``generate`` call,
without knowing which method it runs: modules that support groups define ``set_routing_groups(group_ids)``
(returning the previous setting) and ``evaluation_routing()`` (what they pool over); on any other model the context
does nothing. Whether the groups are used is the method's own setting (Lily: ``eval_pooling``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


def grouped_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that accept routing groups."""
    return [module for module in model.modules() if callable(getattr(module, "set_routing_groups", None))]


def supports_routing_groups(model: nn.Module) -> bool:
    return bool(grouped_modules(model))


@contextmanager
def routing_groups(model: nn.Module, group_ids: torch.Tensor) -> Iterator[int]:
    """Within the block, every forward call of ``model`` has ``len(group_ids)`` rows and row ``i`` belongs to
    group ``group_ids[i]`` (any integers; rows sharing an id form a group). Yields how many modules took the
    groups (0: a no-op, e.g. a model without Lily). The previous setting is restored on exit."""
    group_ids = torch.as_tensor(group_ids)
    if group_ids.dim() != 1 or group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be a 1-D integer tensor (one id per row), got {group_ids.dtype} "
                         f"of shape {tuple(group_ids.shape)}.")
    modules = grouped_modules(model)
    previous = [module.set_routing_groups(group_ids) for module in modules]
    try:
        yield len(modules)
    finally:  # reverse order: modules that share one routing state restore it to what the first one saw
        for module, value in reversed(list(zip(modules, previous))):
            module.set_routing_groups(value)


def current_routing_groups(model: nn.Module) -> torch.Tensor | None:
    """The group ids the model's routing modules hold now (None: none set), leaving them as they are."""
    modules = grouped_modules(model)
    previous = [module.set_routing_groups(None) for module in modules]
    for module, value in reversed(list(zip(modules, previous))):
        module.set_routing_groups(value)
    return next((value for value in previous if value is not None), None)


def evaluation_routing(model: nn.Module) -> str | None:
    """What the model's batch-coupled routers pool over in evaluation, for the record: ``per_group`` (a batched
    evaluation reproduces batch 1), ``per_call`` (the official coupling to the whole forward call; also upstream
    peft's Lily layers, from a peft-format export loaded with peft, which take no groups), ``per_row``, ``none``,
    several joined by ``+``; None when no module routes (nothing depends on the batch)."""
    from peft.tuners.lily import LilyLayer

    modes = set()
    for module in model.modules():
        if callable(getattr(module, "set_routing_groups", None)):
            modes.add(module.evaluation_routing())
        elif isinstance(module, LilyLayer):
            modes.add("per_call")
    return "+".join(sorted(modes)) if modes else None


def routing_record(model: nn.Module, groups: str) -> dict:
    """The record's statement of evaluation routing: the mode (:func:`evaluation_routing`) and the groups the
    recipe gave (used only in the ``per_group`` mode)."""
    return {"mode": evaluation_routing(model), "groups": groups}


def batch_coupled(model: nn.Module) -> bool:
    """Whether a router of the model pools over the whole forward call, so a sample's output depends on the
    other samples of its batch."""
    return "per_call" in (evaluation_routing(model) or "")


def length_order(model: nn.Module, length):
    """``length`` (an item's length, for batches of similar lengths) unless a router couples the batch, whose
    results then depend on which items share it: None, the items' own order."""
    return None if batch_coupled(model) else length


def warn_if_batch_coupled(model: nn.Module, samples_per_call: int, official: str) -> None:
    """A warning when several samples share a forward call while a router pools over the whole call: the
    results then depend on the batch and differ from the official protocol (``official``)."""
    if samples_per_call > 1 and batch_coupled(model):
        log.warning("%d samples per forward call with routing pooled over the whole call: results depend on the "
                    "batch, unlike %s; the method's eval_pooling=sample reproduces it batched.",
                    samples_per_call, official)


def beam_groups(batch_size: int, num_beams: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Groups of ``generate`` with ``num_beams`` beams (or any input expansion by contiguous copies, e.g.
    ``num_return_sequences`` when sampling): rows ``[k * num_beams, (k + 1) * num_beams)`` are prompt ``k``."""
    return torch.arange(batch_size * num_beams, device=device) // num_beams


def cfg_groups(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Groups of a classifier-free-guidance batch ``[uncond_0..uncond_{n-1}, cond_0..cond_{n-1}]``: row ``i``
    belongs to prompt ``i mod n``, so each prompt's uncond and cond rows route together as at batch 1."""
    return torch.arange(2 * batch_size, device=device) % batch_size


def row_groups(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every row its own group (classification: a batch-1 forward holds one example)."""
    return torch.arange(batch_size, device=device)
