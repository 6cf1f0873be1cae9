"""Hostile inputs and faults, as a careless user (or a cluster) produces them: every one ends in one clear sentence
before expensive work, or in a record that says what happened; none ends in a traceback, a silently wrong
"finished" result, or a lost run. Tiny models, CPU."""

from __future__ import annotations

import json
import logging
import re
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lilyexp.errors import CellBusy, ConfigError, DiskFull, RunInterrupted, TrainingDiverged
from lilyexp.run import execute
from lilyexp.tasks import commonsense as cs
from lilyexp.tasks.glue import GlueTask

from conftest import REPO, compose_run, run_cli

GLUE_TINY = ["backbone=tiny_roberta", "task=glue", "task.subset=mrpc", "method=lily", "method.ne_1=2",
             "task.max_length=64", "trainer.epochs=1", "trainer.batch_size=4"]


def glue_folder(tmp_path: Path, train: str | None = None, dev: str | None = None) -> Path:
    """A glue_data/MRPC folder with a few valid rows (or the given file texts)."""
    folder = tmp_path / "glue" / "MRPC"
    folder.mkdir(parents=True)
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    rows = "".join(f"{i % 2}\t{i}\t{i + 100}\tsentence {i} a\tsentence {i} b\n" for i in range(8))
    (folder / "train.tsv").write_text(train if train is not None else header + rows)
    (folder / "dev.tsv").write_text(dev if dev is not None else header + rows)
    return folder.parent


def sentence(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ------------------------------------------------------------------------------------- silently wrong or lost

@pytest.mark.parametrize("which,row,message", [
    ("dev", "7\t1\t2\ta\tb\n", "dev.tsv line 2 .*label '7' is outside the task's 2 classes"),
    ("train", "5\t1\t2\ta\tb\n", "train.tsv line 2 .*label '5' is outside the task's 2 classes"),
    ("dev", "x\t1\t2\ta\tb\n", "dev.tsv line 2 .*invalid literal"),
])
def test_every_glue_label_is_range_checked_when_loaded(which, row, message, tmp_path):
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    data = glue_folder(tmp_path, **{which: header + row + "1\t3\t4\tc\td\n"})
    with pytest.raises(ConfigError, match=message) as info:
        GlueTask("mrpc", data_dir=str(data))
    sentence(info)


def test_a_stsb_score_outside_its_range_is_refused(tmp_path):
    folder = tmp_path / "glue" / "STS-B"
    folder.mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (folder / "train.tsv").write_text(header + "0\tg\tf\ty\t0\ts\ts\ta\tb\t7.5\n")
    (folder / "dev.tsv").write_text(header + "0\tg\tf\ty\t0\ts\ts\ta\tb\t2.5\n")
    with pytest.raises(ConfigError, match="train.tsv line 2 .*outside STS-B's"):
        GlueTask("stsb", data_dir=str(tmp_path / "glue"))


def commonsense_files(tmp_path: Path, test: object, train: object | None = None) -> Path:
    good = [{"instruction": f"q{i}", "input": "", "output": "the correct answer is true", "answer": "true"}
            for i in range(10)]
    (tmp_path / "data" / "boolq").mkdir(parents=True)
    (tmp_path / "data" / "boolq" / "test.json").write_text(json.dumps(test))
    (tmp_path / "data" / "train.json").write_text(json.dumps(train if train is not None else good))
    return tmp_path / "data"


@pytest.mark.parametrize("test,train,message", [
    ([], None, "test.json holds no records"),
    ([{"instruction": "q", "input": "", "output": None, "answer": "true"}], None, "record 0: 'output' is None"),
    (None, [{"instruction": "q", "output": "o", "answer": "a"}] * 6 + [{"instruction": "q", "answer": "a"}],
     "train.json record 6: 'output' is None"),
    (None, [], "train.json holds no records"),
])
def test_every_commonsense_record_is_checked_and_empty_splits_refused(test, train, message, tmp_path):
    good = [{"instruction": "q", "input": "", "output": "the correct answer is true", "answer": "true"}]
    data = commonsense_files(tmp_path, test if test is not None else good, train)
    with pytest.raises(ConfigError, match=message) as info:
        cs.llm_adapters_files(str(data), "train.json", ["boolq"])
    sentence(info)


@pytest.mark.slow
def test_a_second_run_of_a_running_cell_says_who_holds_it_and_touches_nothing(tiny_run, tmp_path):
    cell = ["backbone=tiny_llama", "trainer.max_steps=2", *tiny_run]
    first = subprocess.Popen([sys.executable, "-m", "lilyexp.run", *cell,
                              "trainer.callbacks=[{_target_:callbacks.SleepAtStep,step:1,seconds:60}]",
                              f"paths.results_dir={tmp_path}/results", f"paths.checkpoint_dir={tmp_path}/checkpoints",
                              f"hydra.run.dir={tmp_path}/hydra"], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(REPO / "tests"), "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((tmp_path / "checkpoints").rglob("steps.jsonl")):
            time.sleep(0.5)
        steps = next((tmp_path / "checkpoints").rglob("steps.jsonl"))
        before = steps.read_text()
        with pytest.raises(CellBusy, match=f"is running in process {first.pid} on ") as info:
            execute(compose_run(cell, tmp_path))
        sentence(info)
        assert steps.read_text() == before and not list((tmp_path / "results").rglob("*.json"))
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_an_interrupted_run_writes_an_interrupted_record_that_resume_completes(name, code, tiny_run, tmp_path):
    common = ["backbone=tiny_llama", "trainer.max_steps=5", "trainer.checkpoint_every=4", "trainer.eval_every=5",
              "method.dropout=0.1", *tiny_run]
    straight = run_cli(common, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = run_cli([*common, f"trainer.callbacks=[{{_target_:callbacks.SignalAtStep,step:3,signal:{name}}}]"],
                      tmp_path / "stopped")
    assert stopped.returncode == code and "Traceback" not in stopped.stderr
    assert "resume with the same command and trainer.resume=true" in stopped.stderr
    record = json.loads(next((tmp_path / "stopped" / "results").rglob("*.json")).read_text())
    assert record["status"] == "interrupted" and record["interrupted"]["after_step"] == 3
    resumed = run_cli([*common, "trainer.resume=true"], tmp_path / "stopped")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = json.loads(next((tmp_path / "stopped" / "results").rglob("*.json")).read_text())
    first = json.loads(next((tmp_path / "straight" / "results").rglob("*.json")).read_text())
    assert done["status"] == "finished" and done["resumed_from_step"] == 3
    assert done["metrics"] == first["metrics"]


def test_an_unwritable_results_folder_is_found_before_any_model_loads(no_model_loading, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    cfg = compose_run(["backbone=tiny_llama"], tmp_path)
    cfg.paths.results_dir = str(tmp_path / "a_file" / "runs")
    with pytest.raises(ConfigError, match="cannot write to .*a_file/runs/adhoc.*writable folder") as info:
        execute(cfg)
    sentence(info)


@pytest.mark.parametrize("overrides,message", [
    (["group=../../somewhere"], "group '../../somewhere' cannot be a file name"),
    (["group=a/b"], "group 'a/b' cannot be a file name"),
])
def test_names_that_become_paths_stay_inside_their_folder(overrides, message, no_model_loading, tmp_path):
    with pytest.raises(ConfigError, match=message):
        execute(compose_run(["backbone=tiny_llama", *overrides], tmp_path))
    assert not (tmp_path.parent / "somewhere").exists()


# ------------------------------------------------------------------------ one sentence, before expensive work

@pytest.mark.parametrize("overrides,message", [
    (["trainer.max_steps=2.5"], "trainer.max_steps: 2.5 is not a valid value"),
    (["seed=abc"], "seed: 'abc' is not a valid value"),
    (["method=lily", "method.ne_1=2.5"], "method.ne_1: 2.5 is not a valid value"),
    (["+method.anything=1"], "unknown setting method.anything"),
    (["trainer.head_lr=0.1"], "trainer.head_lr is set, but backbone 'tiny_llama' has no task head"),
])
def test_type_errors_and_dead_overrides_are_refused_at_composition(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        execute(compose_run(["backbone=tiny_llama", *overrides], tmp_path), overrides)
    sentence(info)
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_an_overflowing_learning_rate_is_a_divergence(tiny_run, tmp_path):
    cfg = compose_run(["backbone=tiny_llama", "trainer.max_steps=3", "trainer.lr=1e38", *tiny_run], tmp_path)
    with pytest.raises(TrainingDiverged, match="overflowed at step 1 .*lower trainer.lr"):
        execute(cfg)
    record = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    assert record["status"] == "failed" and record["error_type"] == "TrainingDiverged"


@pytest.mark.parametrize("which", ["train", "dev"])
def test_an_empty_glue_file_names_the_file(which, tmp_path):
    data = glue_folder(tmp_path, **{which: "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"})
    with pytest.raises(ConfigError, match=f"MRPC/{which}.tsv holds no examples"):
        GlueTask("mrpc", data_dir=str(data))


def test_a_non_utf8_data_file_names_the_file(tmp_path):
    data = glue_folder(tmp_path)
    (data / "MRPC" / "dev.tsv").write_bytes(b"Quality\t#1 ID\n\xff\xfe\x00bad\n")
    with pytest.raises(ConfigError, match="MRPC/dev.tsv is not UTF-8 text"):
        GlueTask("mrpc", data_dir=str(data))
    (tmp_path / "bad.json").write_bytes(b"[\xff]")
    with pytest.raises(ConfigError, match="bad.json is not UTF-8 text"):
        cs.read_examples(tmp_path / "bad.json")


def vtab_folder(tmp_path: Path, listing: str) -> Path:
    from PIL import Image
    folder = tmp_path / "vtab" / "eurosat"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "images" / "a.png")
    for split in ("train800", "val200", "train800val200", "test"):
        (folder / f"{split}.txt").write_text(listing)
    return tmp_path / "vtab"


@pytest.mark.parametrize("listing,message", [
    ("images/a.png 1\nimages/missing.png 2\n", "line 2 names .*missing.png, which does not exist"),
    ("", "names no image"),
    ("images/a.png 99\n", "label 99 is outside the task's 10 classes"),
])
def test_vtab_lists_are_checked_when_a_split_loads(listing, message, tmp_path):
    from lilyexp.tasks.vtab import VtabTask
    with pytest.raises(ConfigError, match=message):
        VtabTask("eurosat", str(vtab_folder(tmp_path, listing)), image_size=8)


def test_the_image_size_follows_the_backbone_and_a_mismatch_is_refused(tmp_path, no_model_loading):
    cfg = compose_run(["backbone=tiny_vit", "task=vtab", "method=lora"], tmp_path)
    assert cfg.task.image_size == 32  # tiny_vit is built for 32 x 32: the task's default follows it
    with pytest.raises(ConfigError, match="takes 32x32 images, but task.image_size=224"):
        execute(compose_run(["backbone=tiny_vit", "task=vtab", "method=lora", "task.image_size=224"], tmp_path))


@pytest.mark.slow
def test_a_truncated_checkpoint_on_resume_is_called_corrupt(tiny_run, tmp_path):
    cell = ["backbone=tiny_llama", "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoint=true",
            *tiny_run]
    run_cli([*cell, "trainer.callbacks=[{_target_:callbacks.SignalAtStep,step:2,signal:SIGTERM}]"], tmp_path)
    checkpoint = next((tmp_path / "checkpoints").rglob("trainable.safetensors"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(ConfigError, match="checkpoint .* is corrupt or incomplete .*delete it to start over"):
        execute(compose_run([*cell, "trainer.resume=true"], tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("overrides,message", [
    (["method=lily", "method.ne_1=64"], "ne_1=64 asks for more A's than the 32 'q_proj' layers"),
    (["method=lora", "method.target_modules=[not_a_module]"], "not_a_module"),
    (["method=milora", "method.r=8192"], "rank 8192 exceeds the rank of"),
])
def test_impossible_settings_are_refused_on_the_architecture_before_weights_load(overrides, message,
                                                                                   no_model_loading, tmp_path):
    """LLaMA3-8B's weights are not here: the refusal comes from its weightless skeleton (minutes saved)."""
    cfg = compose_run(["backbone=llama3", "task=commonsense", f"task.data_dir={tmp_path}", "task.val_size=2",
                       *overrides], tmp_path)
    commonsense_files(tmp_path, [{"instruction": "q", "input": "", "output": "o", "answer": "true"}])
    answers = {"boolq": "true", "piqa": "solution1", "social_i_qa": "answer1", "hellaswag": "ending1",
               "winogrande": "option1", "ARC-Easy": "answer1", "ARC-Challenge": "answer1", "openbookqa": "answer1"}
    for name, answer in answers.items():  # each set's answer in its own format (checked when the data loads)
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.json").write_text(json.dumps([{"instruction": "q", "input": "", "output": "o",
                                                                 "answer": answer}]))
    cfg.task.train_file = str(tmp_path / "data" / "train.json")
    with pytest.raises(ConfigError, match=message) as info:
        execute(cfg)
    sentence(info)


# ------------------------------------------------------------------------------------------------------ also

def test_records_are_written_with_the_umask(tmp_path):
    from lilyexp.records import atomic_write_text
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


@pytest.mark.slow
def test_resume_without_a_checkpoint_says_so(tiny_run, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lilyexp"):
        execute(compose_run(["backbone=tiny_llama", "trainer.max_steps=1", "trainer.resume=true", *tiny_run],
                            tmp_path))
    assert any("holds no checkpoint: starting from step 0" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_collapse_to_the_uniform_prediction_is_warned(tiny_run, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lilyexp"):
        execute(compose_run(["backbone=tiny_llama", "trainer.max_steps=24", "trainer.lr=1e6", "trainer.eval_every=24",
                             "trainer.warmup_steps=0", *tiny_run], tmp_path))
    assert any("a uniform prediction, for 20 steps" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("losses,total,warned_at", [
    ([0.69] * 25, 100, None),  # a binary classifier starting at ln 2: not yet
    ([0.69] * 50, 100, 50),  # half the run without leaving it: it learns nothing
    ([0.3] * 5 + [0.69] * 20, 100, 25),  # left it, then collapsed back for 20 steps
])
def test_the_collapse_warning_waits_until_the_loss_has_had_time_to_move(losses, total, warned_at, caplog):
    import math
    from types import SimpleNamespace

    from lilyexp.recipes.loop import TrainingLoop

    loop = TrainingLoop.__new__(TrainingLoop)
    loop.objective, loop.trainer = SimpleNamespace(chance_loss=math.log(2)), SimpleNamespace(lr=1e-3)
    loop.total, loop.collapsed, loop.left_chance, loop.warned_collapse = total, 0, False, False
    with caplog.at_level(logging.WARNING, logger="lilyexp"):
        for step, loss in enumerate(losses, start=1):
            loop.watch_for_collapse(step, loss)
    warnings = [r.getMessage() for r in caplog.records if "uniform prediction" in r.getMessage()]
    assert len(warnings) == (warned_at is not None)
    if warned_at:
        assert f"(step {warned_at})" in warnings[0]


# ---- round 2 -------------------------------------------------------------------------------------------------------

def test_an_evaluation_only_run_of_another_methods_export_is_refused(tiny_run, tmp_path):
    trained = ["backbone=tiny_llama", *tiny_run, "trainer.max_steps=1", "method=lora", "method.r=4"]
    record = json.loads(execute(compose_run(trained, tmp_path), trained).read_text())
    export = record["adapter"]["path"]
    evaluate = ["backbone=tiny_llama", *tiny_run, "trainer.max_steps=0", f"method.load_from={export}"]
    for wrong, message in ((["method=lily", "method.ne_1=2"], "made with method=lora"),
                           (["method=lora"], "method.r=4")):  # the same method at other settings: another cell
        overrides = [*evaluate, *wrong]
        with pytest.raises(ConfigError, match=message):
            execute(compose_run(overrides, tmp_path), overrides)
    right = [*evaluate, "method=lora", "method.r=4"]
    evaluated = json.loads(execute(compose_run(right, tmp_path), right).read_text())
    assert evaluated["status"] == "finished"
    assert evaluated["params"]["adapter"] == record["params"]["adapter"] > 0  # the trained counts, not 0


def test_a_commonsense_answer_that_is_none_of_its_options_is_refused_when_loaded(tmp_path):
    record = {"instruction": "Is it?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is yes",
              "answer": "yes"}
    data = cs.InstructionData([dict(record, answer="true")] * 4, {"boolq": [dict(record, answer="true"), record]})
    with pytest.raises(ConfigError, match="'boolq' record 1: answer 'yes' is none of its options true/false"):
        cs.CommonsenseTask(data, formats={"boolq": "true_false"}, val_size=0)


@pytest.mark.parametrize("key", ["num_beams", "max_new_tokens", "batch_size"])
def test_generation_settings_of_zero_are_refused_before_training(key, tiny_run, tmp_path, no_model_loading):
    overrides = ["backbone=tiny_llama", *tiny_run, f"task.generation.{key}=0"]
    with pytest.raises(ConfigError, match=f"task.generation.{key} must be positive"):
        execute(compose_run(overrides, tmp_path), overrides)


def test_a_negative_seed_is_refused_in_one_sentence(tiny_run, tmp_path, no_model_loading):
    overrides = ["backbone=tiny_llama", *tiny_run, "seed=-1"]
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32\)"):
        execute(compose_run(overrides, tmp_path), overrides)


def test_an_export_loaded_into_a_base_with_fewer_layers_is_refused(tmp_path):
    import copy

    from hydra.utils import instantiate

    from lilyexp.compose import method_node
    from lilyexp.methods.export import load_adapter

    def base(layers: int):
        cfg = compose_run(["backbone=tiny_llama", "method=lora", "method.r=4",
                           f"backbone.load.config.num_hidden_layers={layers}"])
        return cfg, instantiate(cfg.backbone.load).model

    cfg, deep = base(4)
    node = method_node(cfg.method)
    method = instantiate(node)
    method.export(method.apply(copy.deepcopy(deep)), tmp_path / "adapter", node)
    with pytest.raises(ConfigError, match="fit no module of this model.*another base model"):
        load_adapter(base(2)[1], tmp_path / "adapter")
    assert load_adapter(base(4)[1], tmp_path / "adapter") is not None


@pytest.mark.parametrize("overrides, message", [
    (["method=lily", "method.ne_2=0"], "lily ne_2 \\(B experts per target\\) must be at least 2"),
    (["task=commonsense", "task.subset=boolq"], "task.subset takes a list: write task.subset=\\[boolq\\]"),
])
def test_messages_name_the_setting_the_user_typed(overrides, message, tmp_path, no_model_loading):
    overrides = ["backbone=tiny_llama", "debug=smoke", *overrides]
    with pytest.raises(ConfigError, match=message):
        execute(compose_run(overrides, tmp_path), overrides)


def test_a_cutoff_too_short_is_quoted_as_typed(tiny_run, tmp_path):
    overrides = ["backbone=tiny_llama", *tiny_run, "task.cutoff_len=1"]
    with pytest.raises(ConfigError, match="task.cutoff_len=1 \\(4 tokens of this backbone's tokenizer"):
        execute(compose_run(overrides, tmp_path), overrides)


def budget(backbone: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lilyexp.budget", f"backbone={backbone}"], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_the_budget_helper_refuses_in_one_sentence():
    result = budget("nope")
    assert result.returncode == 1 and "no backbone 'nope'; one of: " in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # a subprocess (make test-fast leaves these out)
def test_the_budget_helper_counts_the_tiny_sdxl_unet_from_its_meta_skeleton():
    result = budget("tiny_sdxl")
    assert result.returncode == 0 and "| 32 |" in result.stdout, result.stderr[-1500:]


def test_tables_refuse_a_missing_results_folder_or_group_and_name_foreign_files(tmp_path, caplog):
    from lilyexp.tables.__main__ import main as tables
    from lilyexp.tables.build import read_records

    for argv, message in ((["table3", "--results", str(tmp_path / "none")], "is not a folder of run records"),
                          (["--group", "nosuchgroup", "--results", str(tmp_path)], "no record group 'nosuchgroup'")):
        with pytest.raises(SystemExit):
            tables([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing rendered, nothing overwritten
    group = tmp_path / "g"
    group.mkdir()
    (group / "broken.json").write_text("{not json")
    (group / "foreign.json").write_text('{"hello": 1}')
    (group / "run.json").write_text('{"status": "finished", "config": {}}')
    (group / "run.delta_w.json").write_text('{"side": "file"}')  # beside a record: not one, not warned about
    with caplog.at_level(logging.WARNING, logger="lilyexp.tables"):
        assert [Path(r["_path"]).name for r in read_records(tmp_path, ["g"])] == ["run.json"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "broken.json" in warned and "foreign.json" in warned and "delta_w" not in warned


@pytest.mark.parametrize("override, message", [("+paths.result_dir=/tmp/x", "unknown setting paths.result_dir"),
                                               ("+logger.projcet=foo", "unknown setting logger.projcet")])
def test_paths_and_logger_keys_are_checked(override, message, tiny_run, tmp_path, no_model_loading):
    overrides = ["backbone=tiny_llama", *tiny_run, override]
    with pytest.raises(ConfigError, match=message):
        execute(compose_run(overrides, tmp_path), overrides)
    wandb = ["backbone=tiny_llama", *tiny_run, "logger=wandb", "+logger.projcet=foo"]
    with pytest.raises(ConfigError, match="unknown setting logger.projcet \\(the logger takes: project"):
        execute(compose_run(wandb, tmp_path), wandb)


def test_fp16_asked_for_on_a_cpu_warns_and_the_record_says_fp32_ran(tiny_run, tmp_path, caplog):
    """accelerate silently runs fp16 as fp32 on a CPU (no autocast, no scaler): the record must not say fp16."""
    overrides = ["backbone=tiny_llama", "trainer.max_steps=1", "trainer.mixed_precision=fp16", *tiny_run]
    with caplog.at_level(logging.WARNING, logger="lilyexp"):
        record = json.loads(execute(compose_run(overrides, tmp_path), overrides).read_text())
    assert record["precision"] == {"requested": "fp16", "autocast": "no", "grad_scaler": False}
    assert any("trainer.mixed_precision=fp16 does not run on cpu" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- interruptions outside the loop

INTERRUPTIBLE = ["backbone=tiny_llama", "trainer.max_steps=3", "trainer.checkpoint_every=100", "trainer.eval_every=3"]


@pytest.mark.slow
@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_after_training_before_the_test_writes_an_interrupted_record_that_resume_completes(
        name, code, tiny_run, tmp_path):
    stopped = run_cli([*INTERRUPTIBLE, *tiny_run,
                       f"trainer.callbacks=[{{_target_:callbacks.SignalAtTrainEnd,signal:{name}}}]"], tmp_path)
    assert stopped.returncode == code and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    record = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    assert record["status"] == "interrupted" and record["interrupted"]["after_step"] == 3
    resumed = run_cli([*INTERRUPTIBLE, *tiny_run, "trainer.resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    assert done["status"] == "finished" and done["resumed_from_step"] == 3 and "test/accuracy/avg" in \
        done["metrics"]["final"]


def test_ctrl_c_during_the_evaluation_before_training_ends_in_an_interrupted_record(monkeypatch, tiny_run,
                                                                                       tmp_path):
    import os

    import lilyexp.recipes.causal_lm as causal_lm

    def interrupted_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal should have stopped the evaluation")
    monkeypatch.setattr(causal_lm, "generation_accuracy", interrupted_evaluation)
    overrides = [*INTERRUPTIBLE, *tiny_run, "trainer.eval_before_training=true"]
    with pytest.raises(RunInterrupted) as info:
        execute(compose_run(overrides, tmp_path), overrides)
    record = json.loads(info.value.record.read_text())
    assert record["status"] == "interrupted" and record["interrupted"]["signal"] == "SIGINT"
    assert record["interrupted"]["after_step"] == 0


@pytest.mark.slow
def test_two_ctrl_c_in_quick_succession_leave_a_correct_record_and_no_traceback(tiny_run, tmp_path):
    stopped = run_cli([*INTERRUPTIBLE, *tiny_run, "trainer.callbacks=[{_target_:callbacks.SignalTwice,step:2}]"],
                      tmp_path)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr and "Exception ignored" not in stopped.stderr, stopped.stderr[-2000:]
    record = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    assert record["status"] == "interrupted" and record["interrupted"]["after_step"] == 2


@pytest.mark.parametrize("damage", ["emptied", "deleted", "not_a_dict"])
def test_a_damaged_state_json_is_refused_as_corrupt_on_resume(damage, tiny_run, tmp_path):
    overrides = [*INTERRUPTIBLE, *tiny_run, "trainer.checkpoint_every=1", "trainer.keep_checkpoint=true"]
    path = execute(compose_run(overrides, tmp_path), overrides)
    state = next((tmp_path / "checkpoints").rglob("checkpoint/state.json"))
    {"emptied": lambda: state.write_text("{}"), "deleted": state.unlink,
     "not_a_dict": lambda: state.write_text("[]")}[damage]()
    resume = [*overrides, "trainer.resume=true", "overwrite=true"]
    with pytest.raises(ConfigError, match=r"^checkpoint .*checkpoint is corrupt or incomplete .*delete it to start "
                                          r"over\.$") as info:
        execute(compose_run(resume, tmp_path), resume)
    sentence(info)
    assert json.loads(path.read_text())["status"] == "finished"  # the finished record is kept


@pytest.mark.slow
def test_a_reader_that_went_away_does_not_fail_the_run_and_sigterm_still_checkpoints(tiny_run, tmp_path):
    """A dropped ssh session or a killed `| tail`: every later write to stdout/stderr hits a closed pipe."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    command = [sys.executable, "-m", "lilyexp.run", *INTERRUPTIBLE, *tiny_run, "trainer.max_steps=4",
               "trainer.callbacks=[{_target_:callbacks.SignalAtStep,step:2,signal:SIGTERM}]",
               f"paths.results_dir={tmp_path}/results", f"paths.checkpoint_dir={tmp_path}/checkpoints",
               f"hydra.run.dir={tmp_path}/hydra"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "tests")}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    child.stdout.close()
    child.stderr.close()
    assert child.wait(timeout=300) == 143
    record = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    assert record["status"] == "interrupted" and record["interrupted"]["after_step"] == 2
    assert list((tmp_path / "checkpoints").rglob("checkpoint/state.json"))


# --------------------------------------------------------------------------------------------- full disks

def no_space(*args, **kwargs):
    import errno
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_checkpoint_disk_stops_in_one_sentence_keeping_the_last_checkpoint(monkeypatch, tiny_run, tmp_path):
    import lilyexp.recipes.loop as loop
    from safetensors import SafetensorError

    writes = []
    real = loop.save_file

    def fills_up(tensors, path, *args, **kwargs):
        writes.append(path)
        if len(writes) > 1:  # the second checkpoint finds the disk full (safetensors' own wrapping of ENOSPC)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, path, *args, **kwargs)
    monkeypatch.setattr(loop, "save_file", fills_up)
    overrides = [*INTERRUPTIBLE, *tiny_run, "trainer.checkpoint_every=1", "trainer.eval_every=100",
                 "trainer.eval_at_end=false"]
    with pytest.raises(DiskFull, match=r"^no space left on the device while writing this run's files "
                                       r"\(checkpoints under .*\); the checkpoint of step 1 is kept: free some space "
                                       r"and rerun the same command with trainer.resume=true\.$"):
        execute(compose_run(overrides, tmp_path), overrides)
    monkeypatch.setattr(loop, "save_file", real)  # space freed
    resumed = [*overrides, "trainer.resume=true"]
    record = json.loads(execute(compose_run(resumed, tmp_path), resumed).read_text())
    assert record["status"] == "finished" and record["resumed_from_step"] == 1


def test_a_full_results_disk_at_the_record_keeps_the_checkpoint_and_resume_writes_the_record(monkeypatch, tiny_run,
                                                                                             tmp_path):
    import lilyexp.records as records

    overrides = [*INTERRUPTIBLE, *tiny_run]
    monkeypatch.setattr(records, "atomic_write_text", no_space)
    with pytest.raises(DiskFull, match="the checkpoint of step 3 is kept"):
        execute(compose_run(overrides, tmp_path), overrides)
    monkeypatch.undo()
    resumed = [*overrides, "trainer.resume=true"]
    record = json.loads(execute(compose_run(resumed, tmp_path), resumed).read_text())
    assert record["status"] == "finished" and record["resumed_from_step"] == 3


@pytest.mark.slow  # a subprocess (make test-fast leaves these out)
@pytest.mark.parametrize("args,message", [
    (["trainer.max_step=2"], "unknown setting trainer.max_step; did you mean trainer.max_steps"),
    (["method=lora", "method.alhpa=4"], "unknown setting method.alhpa; did you mean method.alpha"),
    (["trainer.lr=1e-3,1e-4", "task.n_trian=3", "-m"], "unknown setting task.n_trian; did you mean task.n_train"),
])
def test_a_misspelt_setting_is_named_with_its_neighbours_not_hydras_append_hint(args, message, tmp_path):
    result = run_cli(args, tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr[-1500:]
    assert "+" not in result.stderr and "Traceback" not in result.stderr


def test_a_record_that_says_finished_without_metrics_does_not_skip_its_cell(tiny_run, tmp_path, caplog):
    overrides = ["backbone=tiny_llama", "trainer.max_steps=1", *tiny_run]
    path = execute(compose_run(overrides, tmp_path), overrides)
    path.write_text('{"status": "finished"}')
    with caplog.at_level(logging.WARNING, logger="lilyexp"):
        again = execute(compose_run(overrides, tmp_path), overrides)
    assert again == path and "final" in json.loads(path.read_text())["metrics"]
    assert any("says finished but holds no final metrics" in r.getMessage() for r in caplog.records)


def test_an_adapter_larger_than_its_backbone_is_warned_about(tiny_run, tmp_path, caplog):
    overrides = ["backbone=tiny_llama", "trainer.max_steps=1", "method=lora", "method.r=512", *tiny_run]
    with caplog.at_level(logging.WARNING, logger="lilyexp"):
        execute(compose_run(overrides, tmp_path), overrides)
    assert any("more than the" in r.getMessage() and "frozen backbone parameters" in r.getMessage()
               for r in caplog.records)


def test_figures_refuse_a_missing_group_and_say_when_nothing_was_drawn(tmp_path, capsys):
    from lilyexp.figures.__main__ import main as figures

    (tmp_path / "runs" / "empty").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        figures(["fig3", "--results", str(tmp_path / "runs"), "--group", "nosuch"])
    assert info.value.code == 2 and "no records folder" in capsys.readouterr().err
    assert figures(["fig3", "--results", str(tmp_path / "runs"), "--group", "empty", "--out", str(tmp_path)]) == 1
    assert "fig3: nothing drawn: none of its cells has a record" in capsys.readouterr().out


@pytest.mark.slow  # a subprocess (make test-fast leaves these out)
def test_a_deleted_setting_that_another_reads_is_named(tmp_path):
    result = run_cli(["~backbone.peft_task_type", "method=lora", "backbone=tiny_llama"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: method.adapter.config.task_type reads backbone.peft_task_type, which is "
                                     "not set (deleted with ~?); give backbone.peft_task_type a value instead.")


def test_make_demo_trains_every_time_into_an_ignored_folder_and_prints_beside_the_reference():
    import subprocess

    from conftest import REPO
    recipe = subprocess.run(["make", "-n", "demo"], capture_output=True, text=True, cwd=REPO, timeout=60).stdout
    runs = [line for line in recipe.splitlines() if "-m lilyexp.run" in line]
    assert len(runs) == 2 and all("overwrite=true" in line and "paths.results_dir=outputs/demo/runs" in line
                                  for line in runs)
    ignored = subprocess.run(["git", "check-ignore", "-q", "outputs/demo/runs/demo/x.json"], cwd=REPO)
    assert ignored.returncode == 0  # its records never land in git
    assert "cat outputs/demo/tables/demo.md" in recipe and "cat results/tables/demo.md" in recipe


def test_dreambooth_on_tiny_sdxl_takes_its_size_and_finds_its_metric_models_before_training(shared_data, tmp_path,
                                                                                             no_model_loading,
                                                                                             monkeypatch):
    import huggingface_hub.constants

    from lilyexp.compose import build_task

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # never cached

    cfg = compose_run(["backbone=tiny_sdxl", "task=dreambooth", f"task.data_dir={shared_data / 'dreambooth'}",
                       "task.subset=dog"], tmp_path)
    assert cfg.task.resolution == 32 and compose_run(["backbone=sdxl", "task=dreambooth"]).task.resolution == 1024
    with pytest.raises(ConfigError, match="facebook/dino-vits16.*task.metrics.dino=") as info:
        build_task(cfg.task)  # the task is built before any model loads; offline and not cached: refused now
    sentence(info)


@pytest.mark.parametrize("backbone,task", [("tiny_vit", "vtab"), ("tiny_vim", "vtab"), ("tiny_roberta", "glue"),
                                           ("tiny_llama", "commonsense_synthetic"),
                                           ("tiny_falcon_mamba", "commonsense_synthetic")])
@pytest.mark.parametrize("method", ["lily", "lora", "pissa", "milora"])
def test_every_method_s_defaults_fit_every_tiny_backbone(backbone, task, method):
    """A newcomer's first `backbone=tiny_vit task=vtab method=lily` must not be refused for too few layers."""
    from hydra.utils import instantiate

    from lilyexp.compose import build_method

    cfg = compose_run([f"backbone={backbone}", f"task={task}", f"method={method}"])
    kwargs = {"vtab": {"num_classes": 3}, "glue": {"num_labels": 2}}.get(task, {})
    model = instantiate(cfg.backbone.load, **kwargs).model
    build_method(cfg.method).check(model)


def test_a_pissa_rank_the_weights_cannot_hold_is_refused_before_the_tiny_model_is_built(tmp_path, monkeypatch):
    """On the meta skeleton, as for the paper's backbones: before any SVD, training or export."""
    import lilyexp.methods.peft_method as peft_method

    monkeypatch.setattr(peft_method.PeftMethod, "apply", lambda *a: pytest.fail("the method was applied"))
    overrides = ["backbone=tiny_llama", "method=pissa", "method.r=100"]
    with pytest.raises(ConfigError, match=r"^rank 100 exceeds the rank of .*q_proj' \(\(64, 64\) weight\)\.$") as info:
        execute(compose_run(overrides, tmp_path), overrides)
    sentence(info)


DREAMBOOTH_TASK = ["task=dreambooth", "task.subset=dog", "task.metrics.dino=random", "task.metrics.clip=random"]
VTAB_TASK = ["task=vtab", "task.subset=eurosat", "backbone=tiny_vit"]


@pytest.mark.parametrize("cell,folder,setting,message", [
    (DREAMBOOTH_TASK, "dreambooth", "task.train_limit=0", "task.train_limit must be positive, got 0."),
    (DREAMBOOTH_TASK, "dreambooth", "task.eval_limit=0", "task.eval_limit must be positive, got 0."),
    (VTAB_TASK, None, "task.image_cache=gpu", "task.image_cache must be one of auto, memory, disk, off, got 'gpu'."),
])
def test_settings_only_used_late_are_refused_when_the_task_is_built(cell, folder, setting, message, shared_data,
                                                                     tmp_path):
    from lilyexp.compose import build_task

    data = shared_data / folder if folder else tmp_path
    cfg = compose_run([*cell, f"task.data_dir={data}", setting], tmp_path)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        build_task(cfg.task)


def test_torch_s_own_report_of_a_full_disk_is_recognised(monkeypatch, tiny_run, tmp_path):
    """torch.save says "basic_ios::clear: iostream error" when the disk fills; with no space left, that is it."""
    import shutil as shutil_module
    from collections import namedtuple

    import torch as torch_module

    real, calls = torch_module.save, []

    def fills_up(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # the second checkpoint (rng, then optimizer per checkpoint)
            raise RuntimeError("basic_ios::clear: iostream error")
        return real(obj, path, *args, **kwargs)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch_module, "save", fills_up)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(100, 100, 0))
    overrides = [*INTERRUPTIBLE, *tiny_run, "trainer.checkpoint_every=1", "trainer.eval_every=100",
                 "trainer.eval_at_end=false"]
    with pytest.raises(DiskFull, match="the checkpoint of step 1 is kept"):
        execute(compose_run(overrides, tmp_path), overrides)


def test_ctrl_c_twice_during_dreambooth_sampling_ends_in_an_interrupted_record(monkeypatch, shared_data, tmp_path):
    """After training, while images are sampled: the first signal stops the run at once, the second is ignored
    while the interrupted record is written."""
    import os

    import lilyexp.recipes.diffusion as diffusion

    def interrupted_sampling(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal should have stopped the sampling")
    monkeypatch.setattr(diffusion, "sample_images", interrupted_sampling)
    overrides = ["experiment=dreambooth_cpu/lora", f"task.data_dir={shared_data / 'dreambooth'}",
                 "task.subset=duck_toy", "task.resolution=32", "task.eval_limit=1", "task.metrics.dino=random",
                 "task.metrics.clip=random", "trainer.max_steps=2", "trainer.batch_size=1", "task.train_limit=2"]
    with pytest.raises(RunInterrupted) as info:
        execute(compose_run(overrides, tmp_path), overrides)
    record = json.loads(info.value.record.read_text())
    assert record["status"] == "interrupted" and record["interrupted"]["after_step"] == 2
