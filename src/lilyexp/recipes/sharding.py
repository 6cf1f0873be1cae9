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
                desc: str = "eval", length: Callable[[Item], int] | None = None) -> list[Result]:
    """``work(batch)`` (one result per item) over ``items`` in batches of ``batch_size``; the results of all
    items, in order. With ``length``, batches are formed from the items sorted longest first (stable), so a batch
    pads little and the first batch is the largest (memory runs out at once, not at the end); the results still
    come back in the items' order. Only for work whose per-item result does not depend on its batch-mates."""
    order = sorted(range(len(items)), key=lambda i: -length(items[i])) if length else list(range(len(items)))
    arranged = [items[i] for i in order]
    results = [None] * len(items)
    for position, result in zip(order, batch_results(arranged, batch_size, work, desc)):
        results[position] = result
    return results


def batch_results(items: Sequence[Item], batch_size: int, work: Callable[[Sequence[Item]], list[Result]],
                  desc: str) -> list[Result]:
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
