"""Data-parallel training: two CPU processes (gloo, through torch.distributed.run and accelerate's MULTI_CPU
state) train exactly as one process with the same global batch, and only the main process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO

# Every example truncated to the same 64 tokens with the loss on all of them, and no dropout: per-process mean
# losses then average to the one-process mean exactly.
CELL = ["backbone=tiny_llama", "trainer.max_steps=3", "task.n_train=120", "task.n_eval=2", "task.val_size=8",
        "task.cutoff_len=64", "task.train_on_inputs=true", "task.generation.max_new_tokens=4",
        "method.dropout=0.0", "trainer.eval_every=3",
        "trainer.eval_batch_size=8"]  # one validation batch: the second process evaluates none (no collective may wait)

# real CLI subprocesses, each several processes: under pytest-xdist one worker runs them, one at a time
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]


def free_port() -> int:
    """A port no other test holds now (test workers run side by side under pytest-xdist)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_cell(out, processes: int, cell: list[str]) -> dict:
    """``cell`` run by ``processes`` gloo processes (torch.distributed.run), results under ``out``; its record."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(free_port())] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "lilyexp.run", *cell, f"paths.results_dir={out}/results",
               f"paths.checkpoint_dir={out}/checkpoints", f"hydra.run.dir={out}/hydra"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = list((out / "results").rglob("*.json"))
    assert len(records) == 1
    return json.loads(records[0].read_text())


def launch(tmp_path, processes: int, batch_size: int) -> list[dict]:
    out = tmp_path / f"p{processes}"
    launch_cell(out, processes, [*CELL, f"trainer.batch_size={batch_size}"])
    steps = next((out / "results").rglob("*.steps.jsonl")).read_text().splitlines()
    return [json.loads(line) for line in steps]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = launch(tmp_path, 1, batch_size=4)
    double = launch(tmp_path, 2, batch_size=2)
    assert [s["step"] for s in double] == [s["step"] for s in single]  # one writer: no duplicated lines
    for one, two in zip(single, double):
        assert set(one) == set(two)
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), (one["step"], key)


def test_dreambooth_trains_and_samples_on_two_processes(shared_data, tmp_path):
    """The UNet arrives wrapped in DDP's module; the pipeline needs the bare diffusers UNet."""
    cell = ["experiment=dreambooth_cpu/lora", f"task.data_dir={shared_data / 'dreambooth'}", "task.subset=duck_toy",
            "task.resolution=32", "task.eval_limit=1", "task.sampling.images_per_prompt=1", "task.sampling.steps=2",
            "task.metrics.dino=random", "task.metrics.clip=random", "trainer.max_steps=2", "trainer.batch_size=1",
            "task.train_limit=3"]
    record = launch_cell(tmp_path, 2, cell)
    assert record["status"] == "finished" and record["steps"] == 2 and record["batch"]["processes"] == 2


def test_an_evaluation_only_run_on_two_processes_is_not_wrapped_in_ddp(tmp_path):
    """DDP refuses a model with nothing to train; the loaded adapter is evaluated as one process would."""
    trained = launch_cell(tmp_path / "train", 1, [*CELL, "trainer.batch_size=4"])
    evaluate = [*CELL, "trainer.max_steps=0", f"method.load_from={trained['adapter']['path']}"]
    one, two = launch_cell(tmp_path / "one", 1, evaluate), launch_cell(tmp_path / "two", 2, evaluate)
    assert two["status"] == "finished" and two["metrics"]["final"] == one["metrics"]["final"]


SHARDED_EVALUATION = """
import json, os, sys
from accelerate import Accelerator
from lilyexp.recipes.sharding import map_batches
from lilyexp.recipes.devices import release_processes
state = Accelerator()  # as a recipe creates it before evaluating
seen = []
work = lambda batch: (seen.append(list(batch)), [10 * i for i in batch])[1]
results = map_batches(list(range(7)), 2, work)
by_length = map_batches(list(range(7)), 2, work, length=lambda i: i % 3)  # lengths 0 1 2 0 1 2 0
report = {"rank": state.process_index, "seen": seen, "results": results, "by_length": by_length}
with open(os.path.join(sys.argv[1], f"rank{state.process_index}.json"), "w") as out:  # not stdout: lines interleave
    json.dump(report, out)
release_processes()  # as the runner ends: gloo's threads would otherwise abort the exiting process now and then
"""


def test_evaluation_batches_are_dealt_whole_to_the_processes_and_gathered_in_order(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(tmp_path / "deal.py"), str(tmp_path)]
    (tmp_path / "deal.py").write_text(SHARDED_EVALUATION)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    # the one-process batches, dealt; then those of the items sorted longest first
    assert [r["seen"] for r in reports] == [[[0, 1], [4, 5], [2, 5], [0, 3]], [[2, 3], [6], [1, 4], [6]]]
    assert all(r["results"] == r["by_length"] == [0, 10, 20, 30, 40, 50, 60] for r in reports)
