"""VTAB-1K on tiny generated image folders in the release layout: list files, clear errors (missing folder,
missing list, corrupt image), both protocols and their records, the paper's group average, the timm schedule the
official code steps per epoch, AdaptFormer, and a 2-step run per ViT method."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import compose_run
from lilyexp.errors import ConfigError
from lilyexp.recipes.core import timm_cosine_epoch_lr
from lilyexp.run import execute
from lilyexp.tables.build import load_spec
from lilyexp.tasks.images import IMAGENET_MEAN, IMAGENET_STD
from lilyexp.tasks.vtab import TASKS, VtabTask, group_average

SPLITS = {"train800": 8, "val200": 4, "test": 6}


@pytest.fixture
def vtab_dir(tmp_path):
    """A 'eurosat' folder (10 classes) with small random images and the four list files."""
    root = tmp_path / "vtab-1k"
    folder = root / "eurosat" / "images"
    folder.mkdir(parents=True)
    lines = {}
    generator = torch.Generator().manual_seed(0)
    for split, count in SPLITS.items():
        lines[split] = []
        for i in range(count):
            pixels = (torch.rand(20, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
            name = f"{split}_{i}.png"
            Image.fromarray(pixels).save(folder / name)
            lines[split].append(f"images/{name} {i % 10}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (root / "eurosat" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def test_every_list_file_is_read_per_protocol(vtab_dir):
    paper = VtabTask("eurosat", str(vtab_dir), protocol="paper", image_size=32)
    assert (len(paper.train), len(paper.validation), paper.final) == (12, 6, None)
    assert paper.main_metric == "test/accuracy" and paper.selection_rule == "test_selected"
    honest = VtabTask("eurosat", str(vtab_dir), protocol="honest", image_size=32)
    assert (len(honest.train), len(honest.validation), len(honest.final)) == (8, 4, 6)
    assert honest.main_metric == "val/accuracy" and honest.selection_rule == "val_selected"
    batch = honest.collate(None, honest.prepare(None, honest.train)[:3])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["labels"].tolist() == [0, 1, 2]
    assert batch["pixel_values"].dtype == torch.uint8  # the host hands over uint8; /255 runs on the device
    pixels = honest.logits(lambda x: x, batch)  # what the model receives
    assert pixels.dtype == torch.float32 and 0.0 <= pixels.min() and pixels.max() <= 1.0  # not normalised (official)
    normalised = VtabTask("eurosat", str(vtab_dir), protocol="honest", image_size=32, normalize=True)
    torch.testing.assert_close(normalised.logits(lambda x: x, batch),
                               (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
                               / torch.tensor(IMAGENET_STD).view(3, 1, 1))


def test_missing_data_and_corrupt_images_are_clear_errors(vtab_dir):
    with pytest.raises(ConfigError, match="task folder .*dtd is missing.*VTAB-1K release"):
        VtabTask("dtd", str(vtab_dir))
    with pytest.raises(ConfigError, match="unknown VTAB-1K task 'cifar10'"):
        VtabTask("cifar10", str(vtab_dir))
    (vtab_dir / "eurosat" / "val200.txt").unlink()
    with pytest.raises(ConfigError, match="val200.txt is missing"):
        VtabTask("eurosat", str(vtab_dir), protocol="honest")
    task = VtabTask("eurosat", str(vtab_dir), protocol="paper", image_cache="memory", decode_workers=2)
    (vtab_dir / "eurosat" / "images" / "train800_1.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="^cannot read image .*train800_1.png") as info:
        task.prepare(None, task.train)  # found when the split is decoded (in a worker), before training
    assert "\n" not in str(info.value)
    (vtab_dir / "eurosat" / "test.txt").write_text("images/test_0.png 12\n")
    with pytest.raises(ConfigError, match="label 12 is outside the task's 10 classes"):
        VtabTask("eurosat", str(vtab_dir), protocol="paper")


def test_group_average_is_the_mean_of_the_three_group_means():
    """Checked on the paper's own Table 5 row: Lily-L's per-task numbers give its printed 72.3."""
    spec = load_spec("table5")
    row = next(r for r in spec["rows"] if r["label"] == "Lily-L")
    columns = [c for c in spec["columns"] if "where" in c]
    per_task = {c["vars"]["task"]: row["paper"]["values"][c["label"]] for c in columns}
    assert set(per_task) == set(TASKS)
    assert round(group_average(per_task), 1) == row["paper"]["values"]["Average"] == 72.3
    assert round(sum(per_task.values()) / 19, 1) != 72.3  # the plain 19-task mean is a different number


def test_timm_schedule_matches_timms_own_scheduler_stepped_per_epoch():
    from timm.scheduler import CosineLRScheduler
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    timm_scheduler = CosineLRScheduler(optimizer, t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6)
    expected = []
    for epoch in range(100):  # the official loop: train an epoch, then scheduler.step(epoch)
        expected.append(optimizer.param_groups[0]["lr"])
        timm_scheduler.step(epoch)
    ours = [timm_cosine_epoch_lr(epoch, 1e-3, 100, 10) for epoch in range(100)]
    assert ours == pytest.approx(expected, rel=1e-9)
    assert ours[0] == ours[1] == pytest.approx(1e-6)


def test_adaptformer_counts_and_starts_as_the_identity():
    import timm
    from lilyexp.methods.adaptformer import AdaptFormerMethod
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    AdaptFormerMethod("blocks", "norm2", "drop_path2", ["head"]).apply(vit)
    assert sum(p.numel() for p in vit.parameters() if p.requires_grad) == 147_456  # 12 x 2 x 768 x 8 (0.147M)
    base = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2)
    x = torch.rand(2, 3, 32, 32)
    before = base.eval()(x)
    adapted = AdaptFormerMethod("blocks", "norm2", "drop_path2", ["head"], scale=0.1).apply(base).eval()
    torch.testing.assert_close(adapted(x), before)  # zero up-projection
    block = adapted.blocks[0]
    torch.nn.init.normal_(block.adaptformer.up.weight)
    seen = {}
    block.norm2.register_forward_pre_hook(lambda m, args: seen.__setitem__("norm2_in", args[0]))
    block.drop_path2.register_forward_hook(lambda m, args, out: seen.__setitem__("branch", out))
    adapted(x)
    # the adapter reads the MLP branch's input (before norm2) and is added after the branch's drop-path
    branch_input, adapted_branch = seen["norm2_in"], seen["branch"]  # .forward: no hooks
    mlp_branch = block.drop_path2.forward(block.ls2(block.mlp(block.norm2.forward(branch_input))))
    torch.testing.assert_close(adapted_branch, mlp_branch + block.adaptformer(branch_input))
    assert not torch.allclose(adapted_branch, mlp_branch)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in adapted.named_parameters() if "adaptformer" in n or n.startswith("head")}


METHODS = {
    "table4/lily": ["method.ne_1=2"],
    "table4/lora": [],
    "table4/adaptformer": [],
    "table4/full": [],
    "table4/linear_probe": [],
    "table15/lily_qv": ["method.ne_1=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["paper", "honest"])
@pytest.mark.parametrize("experiment", sorted(METHODS))
def test_two_step_run_per_method_and_protocol(experiment, protocol, vtab_dir, tmp_path):
    cfg = compose_run([f"experiment={experiment}", "backbone=tiny_vit", "task.subset=eurosat",
                       f"task.data_dir={vtab_dir}", f"task.protocol={protocol}", "task.image_size=32",
                       "trainer.batch_size=4", "trainer.epochs=2", "task.eval_every_epochs=1",
                       *METHODS[experiment]], tmp_path)
    record = json.loads(execute(cfg).read_text())
    images = 12 if protocol == "paper" else 8  # train800val200 or train800
    assert record["status"] == "finished" and record["steps"] == 2 * (images // 4)
    metrics = record["metrics"]
    rule = "test_selected" if protocol == "paper" else "val_selected"
    assert metrics["selection"]["rule"] == rule and "test/accuracy" in metrics["final"]
    assert len(metrics["history"]) == 2  # evaluated every epoch here (every 10 in the paper's recipe)
    if protocol == "honest":
        assert "val/accuracy" in metrics["final"] and record["splits"] == {"train": "train800", "selection": "val200",
                                                                            "final": "test"}
    else:
        assert metrics["final"]["test/accuracy"] == max(h["test/accuracy"] for h in metrics["history"])
    assert record["config"]["trainer"]["scheduler"] == "timm_cosine_epochs"


def test_decoded_once_pixels_equal_the_official_transform(vtab_dir, tmp_path):
    """uint8 decode + /255 per batch is exactly Resize((S, S), bicubic) + ToTensor, in every cache mode."""
    from torchvision import transforms

    official = transforms.Compose([transforms.Resize((32, 32), interpolation=transforms.InterpolationMode.BICUBIC),
                                   transforms.ToTensor()])
    from PIL import Image
    examples = VtabTask("eurosat", str(vtab_dir), protocol="honest", image_size=32).train
    expected = torch.stack([official(Image.open(e.path).convert("RGB")) for e in examples])
    for mode in ("memory", "disk", "off"):
        task = VtabTask("eurosat", str(vtab_dir), protocol="honest", image_size=32, image_cache=mode,
                        decode_workers=0, cache_dir=str(tmp_path / "cache"))
        split = task.prepare(None, task.train)
        batch = task.collate(None, split[0:len(split)])
        torch.testing.assert_close(task.logits(lambda x: x, batch), expected, atol=0, rtol=0)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # the disk cache, keyed by list and transform
