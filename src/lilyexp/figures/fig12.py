"""Paper Figs. 12-13 (App. K "From a feature merging perspective", App. L): what ViT-B/16 adapted to Caltech101
by Lily and by LoRA computes, per image. Fig. 12 (``fig12.png``/``.pdf``): attention maps of several blocks (the
[CLS] token's attention to the patches, averaged over heads, over the image); the paper reads Lily's maps as
less distinct from block to block than LoRA's. Fig. 13 (``fig13.png``/``.pdf``): the element-wise absolute
difference between the token features (block outputs) of two blocks, e.g. 6 vs 1 and 6 vs 9 (blocks counted
from 0), on a common colour scale per pair; the paper reads more low-difference (blue) elements in Lily.
``fig12.csv`` holds per block the attention map's entropy and its mean correlation with the other blocks'
maps; ``fig13.csv`` the difference maps' mean, median and share of elements below the pooled median.

Runs: Table 4's Caltech101 cells under the paper protocol (group ``table4``; ``conf/experiment/fig12``). Lily
is the cell Table 4's rule picks (best test accuracy over s × ne), LoRA its one cell. Each model is rebuilt from
its record (the backbone's config, the seed, the task's head size) and its exported adapter
(``record["adapter"]["path"]``, :func:`lilyexp.load_adapter`). Images: :data:`IMAGES` spread evenly over the
record's test list (the VTAB-1K release the record names) or those :data:`IMAGE_LIST` names, or every image of
``--images DIR``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from lilyexp.errors import ConfigError
from lilyexp.figures import Rendered, save_figure, write_csv
from lilyexp.figures.plots import (caption, command, finished, first_seed, method_label, new_figure, output_name,
                                   setting)
from lilyexp.tables.build import aggregate, load_spec, matches, method_row

GROUP = "table4"
SUBSET, SELECTION, METRIC = "caltech101", "test_selected", "test/accuracy"
EXPERIMENTS = {"lily": "fig12/lily", "lora": "fig12/lora"}
DATA = {"task.data_dir": "/path/to/vtab-1k"}
IMAGES = 3  # images shown, spread evenly over the test list ...
IMAGE_LIST: tuple[str, ...] = ()  # ... unless named here (paths as the test list writes them)
ATTENTION_LAYERS = (0, 3, 6, 9, 11)  # blocks whose attention maps Fig. 12 shows (those the backbone has)
DIFFERENCE_PAIRS = ((6, 1), (6, 9))  # block pairs of Fig. 13
BLOCKS = "blocks"  # the name of the backbone's list of transformer blocks (timm's ViT)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


# ------------------------------------------------------------------------------------------- which runs

def candidates(records: list[dict], method: str) -> list[dict]:
    """The method's Table 4 cells: its row's method settings hold (Lily: ne 2-4; Fig. 5's own ne 6 and 12 cells
    share the group), whatever the backbone (a tiny stand-in in tests and smoke runs)."""
    row = method_row(load_spec("table4"), method) or {"where": {"method.name": method}}
    where = {k: v for k, v in row["where"].items() if k.startswith("method.")}
    return [r for r in records if setting(r, "task.subset") == SUBSET and matches(r, where)
            and r.get("metrics", {}).get("selection", {}).get("rule") == SELECTION and r.get("adapter")]


def chosen(records: list[dict]) -> dict | None:
    """Table 4's rule: group the records by the values the rule chooses over, keep the best group's run."""
    rule = next(row["choose"] for row in load_spec("table4")["rows"] if row.get("choose"))
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(str(setting(record, key)) for key in rule["over"]), []).append(record)
    scored = [(aggregate(group, SELECTION, rule["by"][SELECTION], 1.0).mean, group) for group in groups.values()]
    scored = [(score, group) for score, group in scored if score is not None]
    return first_seed(max(scored, key=lambda item: item[0])[1]) if scored else None


# ---------------------------------------------------------------------------------------- model, images

def rebuild(record: dict) -> tuple[torch.nn.Module, object]:
    """The adapted model of a record (its backbone, seed and task head, its exported adapter) and its task."""
    from accelerate.utils import set_seed

    from lilyexp.compose import build, build_task
    from lilyexp.methods.export import load_adapter

    config = record["config"]
    task = build_task(config["task"])
    set_seed(config["seed"])  # a random-init backbone is rebuilt as the run built it
    backbone = build(config["backbone"]["load"], **task.model_kwargs)
    adapter = Path(record["adapter"]["path"])
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"the adapter {adapter} that {Path(record['_path']).name} exported is missing.")
    return load_adapter(backbone.model, adapter).eval(), task


def image_paths(task: object, folder: Path | None) -> list[Path]:
    if folder is not None:
        return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    listing = task.validation  # the paper protocol's test list
    if IMAGE_LIST:
        return [example.path for example in listing if any(example.path.match(name) for name in IMAGE_LIST)]
    step = max(len(listing) // IMAGES, 1)
    return [example.path for example in listing[::step][:IMAGES]]


def pixels(task: object, paths: list[Path]) -> torch.Tensor:
    """The images as the task feeds them (the official resize, no normalisation unless the task sets it)."""
    from lilyexp.tasks.images import decode, to_float

    return to_float(torch.stack([decode(path, task.image_size) for path in paths]), task.normalize)


# ------------------------------------------------------------------------------------------ the forward

@contextmanager
def recorded(model: torch.nn.Module) -> Iterator[dict]:
    """Per block, the attention probabilities (batch, heads, tokens, tokens) and the block's output features,
    recorded during a forward (fused attention switched off so the probabilities exist)."""
    seen = {"attention": [], "features": []}
    attentions = [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "attn_drop")]
    blocks = next(m for name, m in model.named_modules() if name.split(".")[-1] == BLOCKS)
    previous = [m.fused_attn for m in attentions]
    handles = [m.attn_drop.register_forward_hook(lambda mod, args, out: seen["attention"].append(out.detach()))
               for m in attentions]
    handles += [b.register_forward_hook(lambda mod, args, out: seen["features"].append(out.detach())) for b in blocks]
    try:
        for m in attentions:
            m.fused_attn = False
        yield seen
    finally:
        for m, fused in zip(attentions, previous):
            m.fused_attn = fused
        for handle in handles:
            handle.remove()


def inspect(model: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """attention: (blocks, images, grid, grid) [CLS]-to-patch maps averaged over heads; features: (blocks,
    images, tokens, channels). One image per forward: Lily's official routing pools over a forward call, so the
    shown images would otherwise change each other's maps."""
    parts = [inspect_batch(model, image[None]) for image in images]
    return {key: np.concatenate([part[key] for part in parts], axis=1) for key in parts[0]}


def inspect_batch(model: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad(), recorded(model) as seen:
        model(images)
    cls = torch.stack([a[:, :, 0, 1:].mean(1) for a in seen["attention"]])
    side = int(round(cls.shape[-1] ** 0.5))
    cls = cls[..., -side * side:]  # patch tokens only, past any register tokens
    return {"attention": cls.reshape(*cls.shape[:2], side, side).numpy(),
            "features": torch.stack(seen["features"]).numpy()}


# ------------------------------------------------------------------------------------------- the numbers

def entropy(maps: np.ndarray) -> np.ndarray:
    p = maps.reshape(*maps.shape[:2], -1)
    p = p / p.sum(-1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)


def cross_layer_correlation(maps: np.ndarray, layers: list[int]) -> np.ndarray:
    """(layers, images): each block's map's mean Pearson correlation with the other shown blocks' maps."""
    flat = maps[layers].reshape(len(layers), maps.shape[1], -1)
    result = np.zeros((len(layers), maps.shape[1]))
    for image in range(maps.shape[1]):
        matrix = np.corrcoef(flat[:, image])
        result[:, image] = (matrix.sum(1) - 1) / max(len(layers) - 1, 1)
    return result


def attention_rows(label: str, names: list[str], maps: np.ndarray, layers: list[int]) -> list[dict]:
    correlation, spread = cross_layer_correlation(maps, layers), entropy(maps)
    return [{"image": names[i], "method": label, "block": layer, "attention_entropy": round(float(spread[layer, i]), 4),
             "mean_correlation_with_other_blocks": round(float(correlation[k, i]), 4)}
            for i in range(len(names)) for k, layer in enumerate(layers)]


def difference_rows(names: list[str], differences: dict[tuple[str, tuple], np.ndarray]) -> list[dict]:
    rows = []
    for pair in sorted({pair for _, pair in differences}):
        pooled = np.median(np.concatenate([d.ravel() for (_, p), d in differences.items() if p == pair]))
        for (label, p), values in differences.items():
            if p == pair:
                rows += [{"image": names[i], "method": label, "blocks": f"{pair[0]} vs {pair[1]}",
                          "mean_abs_difference": float(values[i].mean()), "median": float(np.median(values[i])),
                          "share_below_pooled_median": float((values[i] < pooled).mean())}
                         for i in range(len(names))]
    return rows


# ------------------------------------------------------------------------------------------------- drawing

def draw_attention(images: np.ndarray, names: list[str], maps: dict[str, np.ndarray], layers: list[int]):
    lines = [(i, label) for i in range(len(names)) for label in maps]
    figure = new_figure(1.6 * (len(layers) + 1), 1.7 * len(lines) + 0.5)
    axes = figure.subplots(len(lines), len(layers) + 1, squeeze=False)
    for row, (i, label) in zip(axes, lines):
        picture = images[i].transpose(1, 2, 0).clip(0, 1)
        row[0].imshow(picture)
        row[0].set_ylabel(f"{label}\n{names[i][:18]}", fontsize=7)
        for ax, layer in zip(row[1:], layers):
            ax.imshow(picture)
            ax.imshow(maps[label][layer, i], cmap="jet", alpha=0.5, interpolation="bilinear",
                      extent=(-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5))
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], ["input"] + [f"block {layer}" for layer in layers]):
        ax.set_title(title, fontsize=8)
    caption(figure, f"Fig. 12: [CLS] attention to the patches (mean over heads; colour scale per map, blue low, "
                    f"red high), {SUBSET} test images; per image a row for each method. Blocks counted from 0.")
    return figure


def draw_differences(names: list[str], differences: dict[tuple[str, tuple], np.ndarray], pairs: list[tuple]):
    labels = sorted({label for label, _ in differences})
    figure = new_figure(max(3.0 * len(pairs) + 0.8, 5.0), 1.9 * len(names) * len(labels) + 0.5)
    axes = figure.subplots(len(names) * len(labels), len(pairs), squeeze=False)
    for column, pair in enumerate(pairs):
        top = max(np.percentile(differences[(label, pair)], 99) for label in labels)
        for line, (i, label) in enumerate((i, label) for i in range(len(names)) for label in labels):
            ax = axes[line, column]
            image = ax.imshow(differences[(label, pair)][i], cmap="coolwarm", vmin=0, vmax=top, aspect="auto",
                              interpolation="nearest")
            ax.set_title(f"{label}: |block {pair[0]} − block {pair[1]}|", fontsize=8)
            ax.set_ylabel(f"{names[i][:18]}\ntoken", fontsize=7)
            ax.set_xlabel("channel", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=axes[:, column].tolist(), label="absolute difference", shrink=0.8)
    caption(figure, "Fig. 13: element-wise absolute difference between two blocks' token features (rows: tokens, "
                    "[CLS] first; columns: channels), common colour scale per pair (blue: low). Blocks counted from 0.")
    return figure


# -------------------------------------------------------------------------------------------------- render

def runs(records: list[dict]) -> tuple[dict[str, dict], list[str]]:
    found, missing = {}, []
    for method, experiment in EXPERIMENTS.items():
        pick = chosen(candidates(records, method))
        if pick is None:
            missing.append(command(experiment, **DATA))
        else:
            found[method_label(pick)] = pick
    return found, missing


def computed(found: dict[str, dict], folder: Path | None) -> tuple[list[str], np.ndarray, dict]:
    """The images, and per method its attention maps and features on them."""
    results, paths, images = {}, None, None
    for label, record in found.items():
        model, task = rebuild(record)
        if paths is None:
            paths = image_paths(task, folder)
            if not paths:
                raise ConfigError(f"no image to show in {folder or task.splits}.")
            images = pixels(task, paths)
        results[label] = inspect(model, images)
    return [p.name for p in paths], images.numpy(), results


def render(results_dir: Path, out_dir: Path, group: str | None = None, images: Path | None = None) -> Rendered:
    name = output_name("fig12", group)
    found, missing = runs(finished(results_dir, [group or GROUP]))
    rendered = Rendered(missing=missing)
    if len(found) < len(EXPERIMENTS):
        return rendered
    try:
        names, pictures, results = computed(found, images)
    except ConfigError as exc:
        rendered.missing.append(f"# fig12 cannot be drawn: {exc}")
        return rendered
    blocks = next(iter(results.values()))["attention"].shape[0]
    layers = [layer for layer in ATTENTION_LAYERS if layer < blocks]
    pairs = [pair for pair in DIFFERENCE_PAIRS if max(pair) < blocks]
    maps = {label: result["attention"] for label, result in results.items()}
    differences = {(label, pair): np.abs(result["features"][pair[0]] - result["features"][pair[1]])
                   for label, result in results.items() for pair in pairs}
    out = Path(out_dir)
    rendered.files += save_figure(draw_attention(pictures, names, maps, layers), out, name)
    rows = [row for label, m in maps.items() for row in attention_rows(label, names, m, layers)]
    rendered.files.append(write_csv(rows, out / f"{name}.csv"))
    if pairs:
        thirteen = name.replace("fig12", "fig13")
        rendered.files += save_figure(draw_differences(names, differences, pairs), out, thirteen)
        rendered.files.append(write_csv(difference_rows(names, differences), out / f"{thirteen}.csv"))
    return rendered
