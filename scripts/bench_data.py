"""Benchmark (not a test) of the VTAB-1K image pipeline: images per second to produce one epoch of VTAB-1K-sized
training batches (1,000 generated images of a real-world size, batch 64, 224 px bicubic, the official transform).

Rows: the anchor, a torchvision ImageFolder-style DataLoader with 2 workers (what the official code uses); lilyexp
before this change (every batch decoded, and made float, in the training process); lilyexp now, its first epoch
(the split decoded once by 2 DataLoader workers into a uint8 cache, then batched) and a later epoch (uint8 batches
from the cache; the /255 runs on the training device), plus a later epoch with the /255 on this CPU.
Interleaved repeats, the median reported. Writes results/bench/data.json and data.md.

    python scripts/bench_data.py [--images 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lilyexp.tasks.images import ImageSplit, decode, decoded_split, to_float

BATCH, SIZE, WORKERS = 64, 224, 2


def make_images(folder: Path, count: int) -> list[Path]:
    """JPEGs of 500 x 375 px (a typical photo in the VTAB natural tasks): smooth colour fields plus noise."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        y, x = np.mgrid[0:375, 0:500]
        base = np.stack([(x * (i % 7 + 1)) % 256, (y * (i % 5 + 1)) % 256, (x + y + 13 * i) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


class Official(torch.utils.data.Dataset):
    """The official pipeline per image: PIL open, Resize((224, 224), bicubic), ToTensor."""

    def __init__(self, paths: list[Path]):
        from torchvision import transforms
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize((SIZE, SIZE), interpolation=transforms.InterpolationMode.BICUBIC), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), index % 10


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def anchor_epoch(paths: list[Path]) -> None:
    loader = torch.utils.data.DataLoader(Official(paths), batch_size=BATCH, shuffle=True, drop_last=True,
                                         num_workers=WORKERS)
    for pixels, labels in loader:
        pass


def batches(split: ImageSplit, host_float: bool) -> None:
    """One epoch of shuffled batches as VtabTask.collate builds them (uint8; the /255 runs on the training
    device), or with the /255 on this CPU (``host_float``: what lilyexp did before, and what the official
    ToTensor does)."""
    order = torch.randperm(len(split)).tolist()
    for start in range(0, len(order) - BATCH + 1, BATCH):
        pixels = torch.stack([split[i][0] for i in order[start:start + BATCH]])
        if host_float:
            to_float(pixels, normalize=False)


def before_epoch(paths: list[Path]) -> None:
    """lilyexp before: every batch decoded, and turned into floats, in the training process."""
    batches(ImageSplit(paths, [0] * len(paths), SIZE, None), host_float=True)


def first_epoch(paths: list[Path]) -> ImageSplit:
    split = ImageSplit(paths, [0] * len(paths), SIZE, decoded_split(paths, SIZE, "memory", WORKERS, Path()))
    batches(split, host_float=False)
    return split


def measure(paths: list[Path], repeats: int) -> dict[str, list[float]]:
    seconds = {"anchor": [], "before": [], "first_epoch": [], "cached_epoch": [], "cached_epoch_host_float": []}
    for _ in range(repeats):  # interleaved, so drift in the machine's load hits every row alike
        seconds["anchor"].append(timed(lambda: anchor_epoch(paths)))
        seconds["before"].append(timed(lambda: before_epoch(paths)))
        holder = {}
        seconds["first_epoch"].append(timed(lambda: holder.setdefault("split", first_epoch(paths))))
        seconds["cached_epoch"].append(timed(lambda: batches(holder["split"], host_float=False)))
        seconds["cached_epoch_host_float"].append(timed(lambda: batches(holder["split"], host_float=True)))
    return seconds


def report(seconds: dict[str, list[float]], images: int) -> dict:
    epoch = images // BATCH * BATCH
    rows = {name: {"median_s": statistics.median(values), "images_per_s": epoch / statistics.median(values),
                   "runs_s": values} for name, values in seconds.items()}
    anchor = rows["anchor"]["images_per_s"]
    for row in rows.values():
        row["of_anchor"] = row["images_per_s"] / anchor
    return {"images": images, "batch": BATCH, "size": SIZE, "workers": WORKERS,
            "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "rows": rows}


def goal_lines(rows: dict) -> list[str]:
    """The issue's goals: later epochs >= 10x the anchor's throughput; the first epoch no slower than the anchor."""
    cached, first = rows["cached_epoch"]["of_anchor"], rows["first_epoch"]["of_anchor"]
    return [f"- later epoch {cached:.1f}x the anchor ({'meets' if cached >= 10 else 'misses'} >= 10x)",
            f"- first epoch {first:.2f}x the anchor ({'meets' if first >= 1 else 'misses'} >= 1x, no slower)"]


def markdown(result: dict) -> str:
    labels = {"anchor": "torchvision DataLoader, 2 workers (official)", "before": "lilyexp before: decode per batch",
              "first_epoch": "lilyexp: first epoch (decode once, 2 workers; uint8 batches)",
              "cached_epoch": "lilyexp: later epoch (uint8 batches; /255 on the device)",
              "cached_epoch_host_float": "lilyexp: later epoch with the /255 on this CPU (a CPU-only run)"}
    lines = [f"# VTAB-1K image pipeline: images/s for one epoch ({result['images']} generated 500x375 JPEGs, "
             f"batch {result['batch']}, {result['size']} px bicubic)", "",
             "| pipeline | median s | images/s | × anchor |", "|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {labels[name]} | {row['median_s']:.2f} | {row['images_per_s']:.0f} | {row['of_anchor']:.2f} |")
    lines += ["", "The anchor's batches are float32 (ToTensor in the workers); lilyexp's are uint8, turned into "
              "floats by VtabTask.logits on the training device (exactly ToTensor's values), so a GPU receives a "
              "quarter of the bytes. On a CPU-only run that /255 is paid inside the step: the last row counts it.",
              "", "Goals:", *goal_lines(result["rows"]),
              "", "Regenerate: `make bench-data` (`python scripts/bench_data.py`); medians of interleaved repeats on "
              f"{result['machine']} with {result['torch_threads']} torch threads."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default: results/bench (--smoke: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help=f"{BATCH} images, one repeat (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.repeats = BATCH, 1
        args.out = args.out or Path(tempfile.mkdtemp(prefix="bench_data_smoke_"))
    args.out = args.out or Path("results/bench")
    if args.images < BATCH:
        parser.error(f"--images {args.images} is fewer than one training batch of {BATCH}: the epoch would be empty.")
    with tempfile.TemporaryDirectory() as folder:
        paths = make_images(Path(folder), args.images)
        torch.set_num_threads(1)  # batching is memory-bound; one thread, like each DataLoader worker
        decode(paths[0], SIZE)  # warm-up: imports and PIL plugins
        result = report(measure(paths, args.repeats), args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "data.md").write_text(markdown(result))
    print(markdown(result))
    return args.out / "data.json"


if __name__ == "__main__":
    main(sys.argv[1:])
