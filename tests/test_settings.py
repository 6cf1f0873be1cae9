"""Typed settings and cell identity: a mistyped command is refused in one sentence before anything is built (and
writes no record), an override nothing reads is an error, a knob added at its neutral default keeps old cells
whole, and records of the previous schema are still found and read."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from hydra.utils import get_class

from lilyexp.compose import group_options, load_option
from lilyexp.errors import ConfigError
from lilyexp.records import RunContext, read_record
from lilyexp.run import execute
from lilyexp.settings import IDENTITY_VERSION, cell_identity, check_settings, default_of, kind_of

from conftest import REPO, compose_run, run_cli

SNAPSHOT = Path(__file__).with_name("data") / "schema_defaults.json"


@pytest.mark.parametrize("overrides,message", [
    (["task=glue", "task.name=rte"], r"task.name is fixed by the task= choice \(task=glue\).*task.subset"),
    (["trainer.lr=abc"], "trainer.lr: 'abc' is not a valid value"),
    (["seed=abc"], "seed: 'abc' is not a valid value"),
    (["trainer.max_steps=2.5"], "trainer.max_steps: 2.5 is not a valid value"),
    (["method=lily", "method.ne_1=2.5"], "method.ne_1: 2.5 is not a valid value"),
    (["+method.anything=1"], "unknown setting method.anything .*settings there are: .*alpha"),
    (["+trainer.lrr=1"], "unknown setting trainer.lrr"),
    (["method=lily", "method.router=everywhere"], "method.router must be one of layer, A, group"),
    (["trainer.scheduler=wavy"], "trainer.scheduler must be one of"),
    (["backbone=tiny_llama", "trainer.head_lr=0.1"],
     "trainer.head_lr is set, but backbone 'tiny_llama' has no task head"),
])
def test_a_mistyped_command_is_one_sentence_before_anything_and_writes_no_record(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        execute(compose_run(overrides, tmp_path), overrides)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "results").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("overrides,fragment", [(["trainer.lr=abc"], "trainer.lr"),
                                               (["task.data_dir=/data"], "task.data_dir")])
def test_the_cli_says_it_without_a_traceback(overrides, fragment, tmp_path):
    """An override of a key the task does not have (task.data_dir on commonsense_synthetic) is Hydra's refusal."""
    result = run_cli(overrides, tmp_path)
    assert result.returncode != 0 and fragment in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def test_every_group_option_declares_a_schema_that_accepts_it():
    for group in ("backbone", "task", "method", "trainer"):
        for option in group_options(group):
            node = load_option(group, option)
            schema = get_class(node._schema_)
            fields = {f.name for f in dataclasses.fields(schema)}
            keys = {k for k in node if not (k.startswith("_") and k.endswith("_"))}
            assert keys <= fields, f"{group}/{option}: {sorted(keys - fields)} not in {schema.__name__}"


def test_every_knob_of_every_composition_checks():
    for backbone in ("tiny_llama", "tiny_roberta", "tiny_vit", "tiny_vim", "tiny_sdxl"):
        for method in group_options("method"):
            check_settings(compose_run([f"backbone={backbone}", f"method={method}"]))


def identity_of(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf
    return cell_identity(OmegaConf.to_container(compose_run(overrides), resolve=True))


def test_identity_holds_the_choices_seed_and_the_knobs_off_their_defaults():
    identity = identity_of(["backbone=tiny_llama", "method=lily"])
    assert identity["backbone"] == "tiny_llama" and identity["method"] == "lily" and identity["seed"] == 0
    assert "method.r" not in identity and "trainer.lr" not in identity  # at their schema defaults
    assert identity_of(["backbone=tiny_llama", "method=lily", "method.r=8"])["method.r"] == 8
    bookkeeping = identity_of(["backbone=tiny_llama", "method=lily", "trainer.checkpoint_every=7",
                               "trainer.resume=true", "group=elsewhere", "paths.results_dir=/x"])
    assert bookkeeping == identity


def test_where_the_weights_come_from_is_not_part_of_the_cell():
    hub = identity_of(["backbone=llama3"])
    local = identity_of(["backbone=llama3", "backbone.load.name_or_path=/models/llama3"])
    fp32 = identity_of(["backbone=llama3", "backbone.load.dtype=float32"])
    assert hub == local and hub != fp32


def test_a_knob_added_later_at_its_neutral_default_keeps_old_cells_whole():
    from omegaconf import OmegaConf
    config = OmegaConf.to_container(compose_run(["backbone=tiny_llama", "method=lily"]), resolve=True)
    older = json.loads(json.dumps(config))
    del older["method"]["mask_padding"], older["trainer"]["gradient_checkpointing"]  # keys an older version lacked
    assert cell_identity(older) == cell_identity(config)


def schema_defaults() -> dict:
    """Every schema's knob defaults, by schema class."""
    out = {}
    for group in ("backbone", "task", "method", "trainer"):
        for option in group_options(group):
            schema = get_class(load_option(group, option)._schema_)
            out[f"{schema.__module__}.{schema.__qualname__}"] = {
                f.name: default_of(f) for f in dataclasses.fields(schema) if kind_of(f) == "knob"}
    return json.loads(json.dumps(out, default=str, sort_keys=True))


def test_schema_defaults_only_change_with_a_new_identity_version():
    """A knob's default decides whether it is part of a cell's identity: changing one silently would file new
    runs under old cells. Change a default only with a new IDENTITY_VERSION and a refreshed snapshot
    (LILYEXP_REFRESH_SNAPSHOT=1 pytest tests/test_settings.py); a new knob is added to the snapshot the same way."""
    current = {"version": IDENTITY_VERSION, "defaults": schema_defaults()}
    import os
    if os.environ.get("LILYEXP_REFRESH_SNAPSHOT") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    saved = json.loads(SNAPSHOT.read_text())
    changed = [f"{schema}.{knob}" for schema, knobs in current["defaults"].items()
               for knob, value in knobs.items() if knob in saved["defaults"].get(schema, {})
               and saved["defaults"][schema][knob] != value]
    assert not changed or saved["version"] != IDENTITY_VERSION, f"defaults changed without a new version: {changed}"
    added = [f"{schema}.{knob}" for schema, knobs in current["defaults"].items() for knob in knobs
             if knob not in saved["defaults"].get(schema, {})]
    assert not added, f"new knobs {added}: check their defaults are neutral, then refresh the snapshot"


def test_a_record_of_the_previous_schema_is_found_under_its_old_name_and_read(tmp_path):
    """The committed demo records predate the current schema and naming; the demo command still finds them."""
    source = REPO / "results" / "runs" / "demo" / "smollm2-commonsense_synthetic-lora-seed0-25969514.json"
    (tmp_path / "results" / "demo").mkdir(parents=True)
    shutil.copy(source, tmp_path / "results" / "demo" / source.name)
    cfg = compose_run(["experiment=demo", "method=lora", "method.r=8", "method.alpha=16"], tmp_path)
    run = RunContext.create(cfg, [])
    assert run.record_path.name != source.name
    found = run.finished_record()
    assert found is not None and Path(found["_path"]).name == source.name and run.record_path.name == source.name
    record = read_record(run.record_path)
    assert record["schema"] == 2 and record["metrics"]["selection"]["rule"] == "val_selected"
    assert record["metrics"]["last"] == record["metrics"]["history"][-1]
    assert record["config"]["task"]["subset"] is None and "eval_sets" not in record["config"]["task"]


CURRENT_GROUPS = ("study_glue_minilm", "figures_minilm", "dreambooth_cpu")  # records written by today's schema


@pytest.mark.parametrize("group", CURRENT_GROUPS)
def test_every_committed_record_is_still_found_as_the_same_cell(group):
    """A change to a default, a schema or a backbone yaml must not move a committed record to another cell (its
    study or table would lose it): the command each record states composes to the identity it holds."""
    records = [p for p in (REPO / "results" / "runs" / group).glob("*.json") if "." not in p.stem]
    assert records
    for path in records:
        assert json.loads(path.read_text())["identity"]["version"] == IDENTITY_VERSION, path.name  # as committed
        record = read_record(path)
        overrides = record.get("overrides") or []
        cfg = compose_run([o for o in overrides if not o.startswith(("paths.", "hydra."))])
        assert RunContext.create(cfg, overrides).identity == record["identity"], path.name


def test_a_data_folder_is_the_same_cell_from_any_clone_and_any_spelling(tmp_path, monkeypatch):
    """Identities hold data folders relative to the working folder: two clones, each with its data beside it,
    file a run under the same cell, and a relative and an absolute spelling of one folder are one cell."""
    seen = []
    for clone in ("a", "deeper/b"):
        (tmp_path / clone / "shared" / "glue").mkdir(parents=True)
        (tmp_path / clone / "main").mkdir()
        monkeypatch.chdir(tmp_path / clone / "main")
        relative = identity_of(["backbone=tiny_roberta", "task=glue", "task.data_dir=../shared/glue"])
        folder = tmp_path / clone / "shared" / "glue"
        absolute = identity_of(["backbone=tiny_roberta", "task=glue", f"task.data_dir={folder}"])
        assert relative == absolute
        seen.append(relative)
    assert seen[0] == seen[1] and seen[0]["task.data_dir"] == "../shared/glue"


def test_a_folder_elsewhere_is_the_same_cell_from_clones_at_any_depth(tmp_path, monkeypatch):
    from lilyexp.settings import from_working_folder
    seen = set()
    for clone in ("a/main", "b/c/d/main"):
        (tmp_path / clone).mkdir(parents=True)
        monkeypatch.chdir(tmp_path / clone)
        seen.add(from_working_folder("/data/vtab-1k"))
    assert seen == {"/data/vtab-1k"}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert from_working_folder("~/data") == str(tmp_path / "home" / "data")


def test_a_version_1_identity_is_read_with_its_folders_as_version_2_holds_them(tmp_path, monkeypatch):
    from lilyexp.settings import upgrade_identity
    (tmp_path / "main").mkdir()
    monkeypatch.chdir(tmp_path / "main")
    old = {"version": 1, "seed": 0, "task": "glue", "task.data_dir": str(tmp_path / "shared" / "glue")}
    spelled = {"task": {"data_dir": "../shared/./glue"}}
    assert upgrade_identity(old, spelled)["task.data_dir"] == "../shared/glue"  # as the run spelled it
    upgraded = upgrade_identity(old, {"task": {"data_dir": old["task.data_dir"]}})
    assert upgraded == {**old, "version": IDENTITY_VERSION, "task.data_dir": "../shared/glue"}
    assert upgrade_identity(old, None)["task.data_dir"] == "../shared/glue"  # no config: placed from here
    assert upgrade_identity(upgraded, None) is upgraded


def test_a_cell_filed_under_a_version_1_name_is_found_whatever_its_status(tmp_path, monkeypatch):
    """A study must find a diverged cell filed by an older version too (a diverged cell is not run again), and
    prefer the finished record when both exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "glue").mkdir(parents=True)
    overrides = ["backbone=tiny_roberta", "task=glue", "task.subset=mrpc", "task.data_dir=data/glue"]
    run = RunContext.create(compose_run(overrides, tmp_path), overrides)
    old_identity = {**run.identity, "version": 1, "task.data_dir": str(tmp_path / "data" / "glue")}
    folder = run.record_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    diverged = {"schema": 2, "status": "failed", "error_type": "TrainingDiverged", "identity": old_identity,
                "overrides": overrides, "config": run.config, "metrics": {}}  # config spells data/glue
    (folder / "tiny_roberta-glue-mrpc-lora-seed0-0000aaaa.json").write_text(json.dumps(diverged))
    assert run.finished_record() is None and run.own_record()["error_type"] == "TrainingDiverged"
    finished = {**diverged, "status": "finished", "metrics": {"final": {"accuracy": 0.5}}}
    (folder / "tiny_roberta-glue-mrpc-lora-seed0-0000bbbb.json").write_text(json.dumps(finished))
    again = RunContext.create(compose_run(overrides, tmp_path), overrides)
    assert again.finished_record()["metrics"]["final"] == {"accuracy": 0.5}
    assert again.record_path.name.endswith("0000bbbb.json")
    assert again.name == "tiny_roberta-glue-mrpc-lora-seed0-0000bbbb" and again.work_dir.name == again.name


def test_describe_lists_every_setting_with_type_default_kind_and_help(capsys):
    from lilyexp.describe import describe, main

    text = describe(["method=lily", "task=glue"])
    assert "| method.ne_1 | 4 | int | 4 | cell | A's per (target, shape) group" in text
    assert "| trainer.tf32 | None | bool or None | None | cell |" in text
    assert "| trainer.resume | False | bool | False | bookkeeping |" in text
    assert "(one of: cola, sst2, mrpc" in text
    assert main(["trainer.nope=1"]) == 2 and "unknown setting trainer.nope" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess (make test-fast leaves these out)
def test_help_lists_the_choosable_groups_not_the_internal_fragments(tmp_path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0
    assert "backbone: falcon_mamba, llama3" in result.stdout and "python -m lilyexp.describe" in result.stdout
    assert "family" not in result.stdout and "accelerate" not in result.stdout
