"""Benchmarks: each task module reads its data, scores predictions, and declares the schema of its yaml."""

from dataclasses import dataclass
from typing import Any, Optional

from lilyexp.settings import knob, meta, plumbing


@dataclass
class TaskSettings:
    """What every task yaml declares: its family name, the modality it needs, its training loop (``recipe``)
    and the loader node, plus the two size limits every task honours."""

    name: str = meta("")
    modality: str = meta("")
    recipe: Any = plumbing()
    load: Any = plumbing()
    train_limit: Optional[int] = knob(None, help="keep this many training examples")
    eval_limit: Optional[int] = knob(None, help="keep this many examples per evaluation split")
