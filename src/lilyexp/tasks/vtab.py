"""VTAB-1K as the official ViT/Vim code runs it (visual-adaptation-benchmark/{vit,vim}/main.py): the NOAH/RepAdapter
release layout ``<data_dir>/<task>/{train800,val200,train800val200,test}.txt`` (lines ``<relative path> <label>``),
images resized to 224 with bicubic interpolation and NOT normalised (the official choice), group averages as the
mean of the three group means.

Two protocols, one per run (``protocol``), so a table cell holds both:
- ``paper``: train on train800val200, test every ``eval_every_epochs`` epochs, report the best test accuracy
  (selection on the test split, what the paper prints; recorded as ``test_selected``);
- ``honest``: train on train800, select the epoch on val200, test that model once (``val_selected``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lilyexp.errors import ConfigError
from lilyexp.settings import bookkeeping, knob
from lilyexp.tasks import TaskSettings
from lilyexp.tasks.images import CACHE_MODES, ImageSplit, decoded_split, to_float

# name: (group, classes), as the official vtab.py
TASKS = {
    "cifar": ("natural", 100), "caltech101": ("natural", 102), "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102), "oxford_iiit_pet": ("natural", 37), "svhn": ("natural", 10),
    "sun397": ("natural", 397), "patch_camelyon": ("specialized", 2), "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45), "diabetic_retinopathy": ("specialized", 5), "clevr_count": ("structured", 8),
    "clevr_dist": ("structured", 6), "dmlab": ("structured", 6), "kitti": ("structured", 4),
    "dsprites_loc": ("structured", 16), "dsprites_ori": ("structured", 16), "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}
RELEASE = ("the VTAB-1K release of NOAH/RepAdapter (the 'vtab-1k' archive linked from "
           "github.com/ZhangYuanhan-AI/NOAH), one folder per task")
PROTOCOLS = {"paper": ("train800val200", "test", None, "test_selected"),
             "honest": ("train800", "val200", "test", "val_selected")}


@dataclass
class VtabSettings(TaskSettings):
    """task=vtab: one VTAB-1K task under one protocol."""

    subset: str = knob("cifar", choices=tuple(TASKS), help="the VTAB-1K task")
    data_dir: Optional[str] = knob(None, help="the VTAB-1K release, one folder per task")
    protocol: str = knob("paper", choices=tuple(PROTOCOLS))
    image_size: int = knob(224)
    normalize: bool = knob(False, help="ImageNet mean/std (the official code feeds [0, 1] pixels)")
    eval_every_epochs: int = knob(10)
    test_batch_size: int = knob(256)
    image_cache: str = bookkeeping("auto")  # memory | disk | off | auto (lilyexp.tasks.images): the pixels are equal
    decode_workers: int = bookkeeping(2)
    cache_dir: Optional[str] = bookkeeping(None)  # the disk cache; None: <HF cache root>/lilyexp/images


def default_cache_dir() -> Path:
    from lilyexp.downloads import cache_root

    return cache_root().parent / "images"


def group_average(accuracies: dict[str, float]) -> float:
    """The paper's average: the mean of the Natural, Specialized and Structured means."""
    groups: dict[str, list[float]] = {}
    for task, value in accuracies.items():
        groups.setdefault(TASKS[task][0], []).append(value)
    if set(groups) != {"natural", "specialized", "structured"}:
        raise ValueError(f"a group average needs tasks of all three groups, got {sorted(groups)}.")
    means = [sum(values) / len(values) for values in groups.values()]
    return sum(means) / len(means)


@dataclass(frozen=True)
class Example:
    path: Path
    label: int


def read_list(folder: Path, split: str, classes: int) -> list[Example]:
    listing = folder / f"{split}.txt"
    if not listing.exists():
        raise ConfigError(f"VTAB-1K list file {listing} is missing; the release ({RELEASE}) has "
                          f"train800.txt, val200.txt, train800val200.txt and test.txt in each task folder.")
    examples = [list_entry(listing, number, line, classes)
                for number, line in enumerate(read_lines(listing), 1) if line.strip()]
    if not examples:
        raise ConfigError(f"VTAB-1K list file {listing} names no image.")
    return examples


def read_lines(listing: Path) -> list[str]:
    try:
        return listing.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{listing} is not UTF-8 text (byte {exc.start}: {exc.reason}).") from None


def list_entry(listing: Path, number: int, line: str, classes: int) -> Example:
    """One line ``<relative path> <label>``: the label in range and the image present (found now, not when the
    image is first sampled mid-training)."""
    try:
        relative, label = line.rsplit(" ", 1)
        entry = Example(listing.parent / relative, int(label))
    except ValueError:
        raise ConfigError(f"{listing} line {number} is not '<relative path> <label>': {line!r}.") from None
    if not 0 <= entry.label < classes:
        raise ConfigError(f"{listing} line {number}: label {label} is outside the task's {classes} classes.")
    if not entry.path.is_file():
        raise ConfigError(f"{listing} line {number} names {entry.path}, which does not exist.")
    return entry


class VtabTask:
    """One VTAB-1K task under one protocol; each split decoded once (:mod:`lilyexp.tasks.images`)."""

    scoring_version = 1  # bump when how this task scores changes: older records then count as outdated

    def __init__(self, subset: str, data_dir: str | None, *, protocol: str = "paper", image_size: int = 224,
                 normalize: bool = False, eval_every_epochs: int = 10, test_batch_size: int = 256,
                 train_limit: int | None = None, eval_limit: int | None = None, image_cache: str = "auto",
                 decode_workers: int = 2, cache_dir: str | None = None):
        if subset not in TASKS:
            raise ConfigError(f"unknown VTAB-1K task '{subset}'; one of {sorted(TASKS)}.")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"task.protocol must be one of {sorted(PROTOCOLS)}, got '{protocol}'.")
        for key, value in {"image_size": image_size, "eval_every_epochs": eval_every_epochs,
                           "test_batch_size": test_batch_size, "train_limit": train_limit,
                           "eval_limit": eval_limit}.items():
            if value is not None and value <= 0:
                raise ConfigError(f"task.{key} must be positive, got {value}.")
        if image_cache not in CACHE_MODES:  # checked now, not when the first split decodes after the model loads
            raise ConfigError(f"task.image_cache must be one of {', '.join(CACHE_MODES)}, got '{image_cache}'.")
        if data_dir is None:
            raise ConfigError(f"task.data_dir is not set: point it at {RELEASE}.")
        folder = Path(data_dir).expanduser() / subset
        if not folder.is_dir():
            raise ConfigError(f"VTAB-1K task folder {folder} is missing: task.data_dir must hold {RELEASE}.")
        self.name, self.protocol, self.group = subset, protocol, TASKS[subset][0]
        classes = TASKS[subset][1]
        train_split, select_split, final_split, self.selection_rule = PROTOCOLS[protocol]
        self.train = read_list(folder, train_split, classes)[:train_limit]
        self.validation = read_list(folder, select_split, classes)[:eval_limit]
        self.final = read_list(folder, final_split, classes)[:eval_limit] if final_split else None
        self.selection_split = "test" if select_split == "test" else "val"
        self.splits = {"train": train_split, "selection": select_split, "final": final_split}
        self.image_size, self.normalize = image_size, normalize
        self.image_cache, self.decode_workers = image_cache, decode_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.eval_every_epochs, self.eval_batch_size = eval_every_epochs, test_batch_size
        self.model_kwargs = {"num_classes": classes}
        self.num_classes, self.is_regression = classes, False

    @property
    def main_metric(self) -> str:
        return f"{self.selection_split}/accuracy"

    def prepare(self, processor: Any, examples: list[Example]) -> ImageSplit:
        paths = [e.path for e in examples]
        images = decoded_split(paths, self.image_size, self.image_cache, self.decode_workers, self.cache_dir)
        return ImageSplit(paths, [e.label for e in examples], self.image_size, images)

    def collate(self, processor: Any, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        """uint8 pixels: the ``/255`` (and optional normalisation) runs in :meth:`logits`, on the device the batch
        was moved to, so the host copies a quarter of the bytes and does no float work per batch."""
        return {"pixel_values": torch.stack([image for image, _ in items]),
                "labels": torch.tensor([label for _, label in items])}

    def logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(to_float(batch["pixel_values"], self.normalize))

    def score(self, split: str, predictions: list, references: list) -> dict[str, float]:
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {f"{split}/accuracy": correct / max(len(references), 1)}
