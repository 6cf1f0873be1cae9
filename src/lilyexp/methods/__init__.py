"""Adaptation methods: each yaml in conf/method builds one of these objects before the model is loaded
(so bad settings fail early); the runner then calls ``apply(model)``. Every method yaml declares its schema, a
subclass of :class:`MethodSettings`."""

from dataclasses import dataclass
from typing import Any, Optional

from lilyexp.settings import knob, meta, plumbing


@dataclass
class MethodSettings:
    """What every method yaml declares: its name, which of the backbone's target lists it adapts (``targets``, a
    key of the backbone's ``adapter_targets``, e.g. ``lora``; None = no targets), the task modalities it supports
    (None = all) and the ``adapter`` node that builds the method object."""

    name: str = meta("")
    targets: Optional[str] = meta(None)
    modalities: Optional[list] = meta(None)
    adapter: Any = plumbing()
    load_from: Optional[str] = knob(None, help="an exported adapter to evaluate (with trainer.max_steps=0)")
