"""What a run leaves behind: the exported adapter (named in the record) and an evaluation-only run of it that
reproduces the trained run's metrics; the resume checkpoint's optimizer state removed unless kept; per-run peak
memory and time per step; a summary before ``record:``; wandb runs that resume and fail visibly; the entry point's
objective for sweepers (the Optuna example)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from lilyexp.loggers import WandbLogger
from lilyexp.run import execute

from conftest import compose_run, run_cli

GLUE = ["backbone=tiny_roberta", "task=glue", "task.subset=mrpc", "method=lily", "method.ne_1=2",
        "task.train_limit=24", "task.eval_limit=16", "task.max_length=64", "trainer.epochs=2", "trainer.batch_size=8"]


def record_of(path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_an_exported_adapter_evaluates_to_the_trained_runs_metrics(shared_data, tmp_path):
    glue = [*GLUE, f"task.data_dir={shared_data / 'glue'}"]
    trained = record_of(execute(compose_run(glue, tmp_path)))
    adapter = trained["adapter"]["path"]
    assert trained["metrics"]["selection"]["rule"] == "best_epoch"
    assert trained["evaluation"]["routing"] == {"mode": "per_call", "groups": "each example"}  # official coupling
    evaluated = record_of(execute(compose_run([*glue, "trainer.max_steps=0", f"method.load_from={adapter}"],
                                              tmp_path)))
    assert evaluated["metrics"]["final"] == trained["metrics"]["final"]  # the best epoch's weights were exported
    assert evaluated["metrics"]["selection"]["rule"] == "last" and evaluated["steps"] == 0


@pytest.mark.slow
def test_an_exported_causal_lm_adapter_answers_the_test_sets_as_the_trained_run(tiny_run, tmp_path):
    cell = ["backbone=tiny_llama", "method=lora", "method.r=4", "trainer.max_steps=3", "trainer.eval_every=3",
            *tiny_run]
    trained = record_of(execute(compose_run(cell, tmp_path)))
    evaluated = record_of(execute(compose_run([*cell, "trainer.max_steps=0",
                                               f"method.load_from={trained['adapter']['path']}"], tmp_path)))
    assert evaluated["metrics"]["final"] == trained["metrics"]["final"]


@pytest.mark.slow
def test_an_evaluation_only_run_of_a_peft_format_lily_export_routes_per_sample_as_its_command_says(tiny_run,
                                                                                                  tmp_path):
    """A Lily export in peft's format loads through lilyexp's Lily (the cell file proves its settings), so
    eval_pooling=sample batches as the trained run did; upstream peft's Lily would pool over every batch."""
    cell = ["backbone=tiny_llama", "method=lily", "method.r=4", "method.ne_1=2", "method.eval_pooling=sample",
            "method.zero_init_B=false", "trainer.max_steps=3", "trainer.eval_every=3", "task.n_eval=6",
            "task.generation={num_beams:4,batch_size:3,max_new_tokens:4}", *tiny_run]
    trained = record_of(execute(compose_run(cell, tmp_path)))
    assert json.loads((Path(trained["adapter"]["path"]) / "adapter_config.json").read_text())["peft_type"] == "LILY"
    evaluated = record_of(execute(compose_run([*cell, "trainer.max_steps=0",
                                               f"method.load_from={trained['adapter']['path']}"], tmp_path)))
    assert evaluated["generation"]["routing"]["mode"] == trained["generation"]["routing"]["mode"] == "per_group"
    assert evaluated["generation"]["decoding"] == "beam search, settled prompts leave the batch"
    assert evaluated["metrics"]["final"] == trained["metrics"]["final"]


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_the_optimizer_state_is_gone_after_a_finished_run_unless_kept(keep, tiny_run, tmp_path):
    path = execute(compose_run(["backbone=tiny_llama", "trainer.max_steps=2", f"trainer.keep_checkpoint={keep}",
                                *tiny_run], tmp_path))
    work = tmp_path / "checkpoints" / "adhoc" / path.stem
    assert (work / "checkpoint" / "optimizer.pt").exists() == keep
    assert (work / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_peak_memory_and_step_time_are_measured_per_run(tiny_run, tmp_path):
    """Two cells in one process (as a basic-launcher sweep runs them): the second reports its own peak."""
    big = record_of(execute(compose_run(["backbone=tiny_llama", "trainer.max_steps=2", "seed=1", *tiny_run,
                                         "trainer.callbacks=[{_target_:callbacks.HoldMemory,megabytes:600}]"],
                                        tmp_path)))
    small = record_of(execute(compose_run(["backbone=tiny_llama", "trainer.max_steps=2", "seed=2", *tiny_run],
                                          tmp_path)))
    if big["timing"]["peak_mem_kind"] == "cpu_lifetime_max_rss":
        pytest.skip("this system cannot reset the process's peak memory")
    assert big["timing"]["peak_mem_bytes"] - small["timing"]["peak_mem_bytes"] > 400 * 2**20
    assert small["timing"]["step_s"] > 0 and small["timing"]["timed_steps"] == 2


@pytest.mark.slow
def test_the_run_prints_a_summary_before_its_record(tmp_path):
    result = run_cli(["backbone=tiny_llama", "debug=smoke"], tmp_path)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines[-1].startswith("record: ")
    assert lines[-5].startswith("final (val_selected, selected on val/loss): ") and "test/accuracy/avg" in lines[-5]
    assert lines[-4].startswith("parameters: ") and "a training step, peak memory" in lines[-3]
    assert lines[-2].startswith("adapter: ")


class FakeWandb(types.SimpleNamespace):
    """Records what lilyexp asks of wandb."""

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(summary={}, finish=lambda exit_code=0: self.exits.append(exit_code),
                                     log=lambda *a, **k: None)


def test_wandb_runs_have_a_stable_id_resume_and_fail_visibly(monkeypatch, tmp_path):
    fake = FakeWandb(inits=[], exits=[])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = WandbLogger(mode="offline", dir=str(tmp_path))
    from lilyexp.records import RunContext
    run = RunContext.create(compose_run(["backbone=tiny_llama"], tmp_path), [])
    again = RunContext.create(compose_run(["backbone=tiny_llama"], tmp_path), [])
    assert run.wandb_id == again.wandb_id
    logger.start(run.name, {"params": {"adapter": 5}}, run_id=run.wandb_id)
    logger.finish({"status": "failed"}, failed=True)
    assert fake.inits[0]["id"] == run.wandb_id and fake.inits[0]["resume"] == "allow"
    assert fake.inits[0]["config"]["params"] == {"adapter": 5} and fake.exits == [1]


@pytest.mark.slow
def test_the_optuna_example_tunes_lily_through_lilyexp_cells(shared_data, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run_cli(["-m", "experiment=tune/lily_mrpc", "backbone=tiny_roberta",
                      f"task.data_dir={shared_data / 'glue'}", "debug=smoke", "hydra.sweeper.n_trials=2",
                      f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in best and "method.s" in best and "best_value" in best
    assert len(list((tmp_path / "results" / "tune_lily_mrpc").glob("*.json"))) == 2
