"""Data-parallel training: two CPU processes (gloo, through torch.distributed.run and accelerate's MULTI_CPU
state) train exactly as one process with the same global batch, and only the main process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# Every example truncated to the same 64 tokens with the loss on all of them, and no dropout: per-process mean
# losses then average to the one-process mean exactly.
CELL = ["backbone=tiny_llama", "trainer.max_steps=3", "task.n_train=120", "task.n_eval=2", "task.val_size=8",
        "task.cutoff_len=64", "task.train_on_inputs=true", "task.generation.max_new_tokens=4",
        "method.dropout=0.0", "trainer.eval_every=3"]

pytestmark = pytest.mark.slow  # real CLI subprocesses


def launch(tmp_path, processes: int, batch_size: int) -> list[dict]:
    out = tmp_path / f"p{processes}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(29500 + processes)] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "lilyexp.run", *CELL, f"trainer.batch_size={batch_size}",
               f"paths.results_dir={out}/results", f"paths.checkpoint_dir={out}/checkpoints", f"hydra.run.dir={out}/hydra"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = list((out / "results").rglob("*.json"))
    assert len(records) == 1
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
