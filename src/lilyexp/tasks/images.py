"""Image splits decoded once: the official VTAB transform (``Resize((S, S), bicubic)`` + ``ToTensor``) cut in two,
the PIL decode-and-resize done once per split into a uint8 tensor, the ``/255`` (and the optional ImageNet
normalisation) done per batch on the device the training step runs on. ``uint8 / 255`` is exactly what
``ToTensor`` computes, so the pixels equal the official pipeline's; only the decoding stops being repeated every
epoch and at every periodic test, and the host hands the device uint8 batches (a quarter of float32's bytes).

The decoding pass runs in a ``DataLoader`` with worker processes. Where the decoded split lives
(``task.image_cache``): ``memory``; ``disk`` (a ``.npy`` file read memory-mapped, keyed by the file list, the files'
sizes and times and the transform, so a changed list or image is decoded again); ``auto`` (memory up to 2 GiB, disk
beyond: a large test split, e.g. 70,000 images at 224 px, is 10 GiB); ``off`` (decode every batch, as the
official loop does).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lilyexp.errors import ConfigError

CACHE_MODES = ("auto", "memory", "disk", "off")
MEMORY_LIMIT = 2 * 2**30
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def decode(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) uint8: RGB, resized with PIL's bicubic filter (the official ``Resize((size, size))``)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_float(images: torch.Tensor, normalize: bool) -> torch.Tensor:
    """uint8 (..., 3, S, S) -> float in [0, 1] as ``ToTensor`` gives it (+ ImageNet statistics when asked)."""
    pixels = images.float().div(255)
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
        pixels = (pixels - mean) / torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return pixels


class Decode(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode(self.paths[index], self.size)


def decoded_chunks(paths: Sequence[Path], size: int, workers: int) -> Iterator[torch.Tensor]:
    """The split's images in list order, a chunk of up to 64 at a time, decoded by ``workers`` processes (0: this
    one)."""
    loader = torch.utils.data.DataLoader(Decode(paths, size), batch_size=64, num_workers=workers,
                                         collate_fn=torch.stack)
    # A bar updated by hand: wrapping the loader itself in tqdm made a 1,000-image pass ~20% slower (bench-data).
    bar = tqdm(total=len(paths), desc=f"decode {len(paths)} images", leave=False)
    try:
        for chunk in loader:
            yield chunk
            bar.update(len(chunk))
    except ConfigError as exc:  # raised in a worker, re-raised here with the worker's traceback in the message
        raise ConfigError(str(exc).strip().splitlines()[-1].split("ConfigError: ", 1)[-1]) from None
    finally:
        bar.close()


def fill(target, chunks: Iterator[torch.Tensor]) -> None:
    """Write the chunks one after another into ``target`` (a tensor or a memory-mapped array): the split is
    never held twice."""
    start = 0
    for chunk in chunks:
        target[start:start + len(chunk)] = chunk if isinstance(target, torch.Tensor) else chunk.numpy()
        start += len(chunk)


def decode_all(paths: Sequence[Path], size: int, workers: int) -> torch.Tensor:
    """Every image of a split as one uint8 tensor (N, 3, size, size)."""
    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    fill(images, decoded_chunks(paths, size, workers))
    return images


def cache_key(paths: Sequence[Path], size: int) -> str:
    digest = hashlib.sha1(f"bicubic-rgb-{size}".encode())
    for path in paths:
        status = path.stat()
        digest.update(f"{path.resolve()}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def from_disk(paths: Sequence[Path], size: int, workers: int, folder: Path) -> torch.Tensor:
    """The split from ``<folder>/<key>.npy`` (decoded and written once, atomically), read memory-mapped."""
    path = folder / f"{cache_key(paths, size)}.npy"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".npy.tmp")
        os.close(handle)
        try:  # decoded straight into the file, chunk by chunk: a split larger than memory never sits in it
            array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
            fill(array, decoded_chunks(paths, size, workers))
            array.flush()
            del array
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write: never written, no warning


def decoded_split(paths: Sequence[Path], size: int, mode: str, workers: int, folder: Path) -> torch.Tensor | None:
    """The split's uint8 images (N, 3, size, size), or None with ``mode='off'`` (decode per batch)."""
    if mode not in CACHE_MODES:
        raise ConfigError(f"task.image_cache must be one of {', '.join(CACHE_MODES)}, got '{mode}'.")
    if mode == "auto":
        mode = "memory" if len(paths) * 3 * size * size <= MEMORY_LIMIT else "disk"
    if mode == "off":
        return None
    return decode_all(paths, size, workers) if mode == "memory" else from_disk(paths, size, workers, folder)


class ImageSplit:
    """A split as the classification loop indexes it: ``split[i]`` and ``split[a:b]`` give (uint8 image, label)
    items, from the decoded tensor or, without one, decoded on the spot."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], size: int, images: torch.Tensor | None):
        self.paths, self.labels, self.size, self.images = list(paths), list(labels), size, images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        image = self.images[index] if self.images is not None else decode(self.paths[index], self.size)
        return image, self.labels[index]
