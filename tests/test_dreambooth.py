"""DreamBooth through the runner: a tiny SDXL cell trains on a real subject, samples, saves images and scores them
for Lily and LoRA; the subject's files come from the pinned google/dreambooth commit when no data folder is
given; bad input is one sentence before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import lilyexp.backbones.sdxl as sdxl  # noqa: E402
from lilyexp.errors import ConfigError  # noqa: E402
from lilyexp.run import execute  # noqa: E402
from lilyexp.records import beside

from conftest import compose_run  # noqa: E402

SMALL = ["task.resolution=32", "task.eval_limit=2", "task.sampling.images_per_prompt=1", "task.sampling.steps=2",
         "task.metrics.dino=random", "task.metrics.clip=random", "trainer.max_steps=3", "trainer.batch_size=1",
         "trainer.grad_accum=2", "trainer.mixed_precision=no", "trainer.checkpoint_every=3", "task.train_limit=3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["dreambooth_cpu/lily", "dreambooth_cpu/lora"])
def test_a_tiny_sdxl_cell_trains_samples_and_scores(experiment, shared_data, tmp_path):
    cfg = compose_run([f"experiment={experiment}", f"task.data_dir={shared_data / 'dreambooth'}",
                       "task.subset=duck_toy", *SMALL], tmp_path)
    path = execute(cfg)
    record = json.loads(path.read_text())
    assert record["status"] == "finished" and record["metrics"]["selection"]["rule"] == "last"
    assert set(record["metrics"]["final"]) == {"test/dino", "test/clip_i", "test/clip_t"}
    details = record["dreambooth"]
    assert details["prompt"] == "a photo of duck_toy" and len(details["samples"]) == 2
    assert all((path.parent / sample["path"]).is_file() for sample in details["samples"])
    assert [p["prompt"] for p in details["per_prompt"]] == ["A picture of a duck_toy in the jungle",
                                                            "A picture of a duck_toy in the snow"]
    steps = [json.loads(line) for line in beside(path, "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "train/loss" in s] == [1, 2, 3]
    expected = 468_736 if "lily" in experiment else 5_806_080  # on the real SDXL; the tiny UNet is smaller
    assert 0 < record["params"]["adapter"] < expected


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(sdxl, "tiny_pipeline", refuse)


def corrupt_subject(root: Path, shared_data: Path) -> Path:
    (root / "broken").mkdir(parents=True)
    (root / "prompts_and_classes.txt").write_text(
        (shared_data / "dreambooth" / "prompts_and_classes.txt").read_text().replace("backpack,backpack",
                                                                                     "backpack,backpack\nbroken,toy"))
    (root / "broken" / "00.jpg").write_bytes((shared_data / "dreambooth" / "dog" / "00.jpg").read_bytes()[:2000])
    return root


@pytest.mark.parametrize("overrides,message", [
    (["task.subset=no_such_subject"], "no_such_subject.*not in the class table"),
    (["task.resolution=33"], "resolution 33 must be a positive multiple of the VAE scale factor 2"),
    (["task.subset=broken"], "broken/00.jpg is not a readable image"),
    (["task.sampling.cfg_routing=sideways"], "task.sampling.cfg_routing must be one of"),
])
def test_bad_input_is_one_sentence_before_any_model_loads(overrides, message, shared_data, tmp_path,
                                                          no_model_loading):
    root = corrupt_subject(tmp_path / "data", shared_data)
    for subject in ("dog",):
        (root / subject).symlink_to(shared_data / "dreambooth" / subject)
    cfg = compose_run(["backbone=tiny_sdxl", "task=dreambooth", "method=lily", "task.subset=dog",
                       f"task.data_dir={root}", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        execute(cfg)
    assert "\n" not in str(info.value)


def test_a_subject_folder_that_does_not_exist(shared_data, tmp_path, no_model_loading):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts_and_classes.txt").write_text(
        (shared_data / "dreambooth" / "prompts_and_classes.txt").read_text())
    cfg = compose_run(["backbone=tiny_sdxl", "task=dreambooth", f"task.data_dir={tmp_path / 'data'}"], tmp_path)
    with pytest.raises(ConfigError, match="wolf_plushie does not exist"):
        execute(cfg)


@pytest.mark.parametrize("backbone", ["sdxl", "tiny_sdxl"])
def test_the_unet_skeleton_builds_with_the_dreambooth_task_s_arguments(backbone):
    """The structure check before any weights load builds the UNet on the meta device with the task's model
    arguments (sample_vae), as `backbone=sdxl task=dreambooth` does."""
    from lilyexp.backbones import skeleton

    cfg = compose_run([f"backbone={backbone}", "task=dreambooth"])
    unet = skeleton(cfg.backbone, sample_vae="base")
    assert next(unet.parameters()).device.type == "meta"
