"""Evaluation split across the processes of a distributed launch: the batches one process would form are dealt
out whole (batch i to process i mod N), so a batch-coupled routing sees exactly the batches it sees on one
process, and the per-example results are gathered back, in order, on every process (so every process selects the
same checkpoint). One process runs everything itself."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

Item, Result = TypeVar("Item"), TypeVar("Result")


def map_batches(items: Sequence[Item], batch_size: int, work: Callable[[Sequence[Item]], list[Result]],
                desc: str = "eval") -> list[Result]:
    """``work(batch)`` (one result per item) over ``items`` in batches of ``batch_size``; the results of all
    items, in order."""
    starts = range(0, len(items), batch_size)
    state = PartialState() if PartialState._shared_state else None
    world, rank = (state.num_processes, state.process_index) if state is not None else (1, 0)
    mine = starts[rank::world]
    done = [work(items[start:start + batch_size]) for start in tqdm(mine, desc=desc, leave=False)]
    if world == 1:
        return [result for batch in done for result in batch]
    dealt = gather_object([done])  # one list of batch results per process
    ordered = [None] * len(starts)
    for process, batches in enumerate(dealt):
        ordered[process::world] = batches
    return [result for batch in ordered for result in batch]
