"""Paper Fig. 2 (subject-driven generation on SDXL, Lily vs LoRA), from DreamBooth run records: per subject, the
reference photo, then a row of Lily's and of LoRA's samples for the same prompts and seeds
(``fig2_<subject>.png``/``.pdf``), and the quantitative metrics the paper did not report (DINO, CLIP-I, CLIP-T,
``fig2.csv``). The images are the PNGs each run saved beside its record (``<record stem>.images/``)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lilyexp.figures import Rendered, write_csv
from lilyexp.figures.grid import make_grid, save_grid
from lilyexp.figures.plots import swept
from lilyexp.tables.build import newest_per_seed, read_records

GROUP = "dreambooth"
METHODS = {"Lily": "lily", "LoRA": "lora"}
PROMPTS_SHOWN = 6
# The contexts the paper's Fig. 2 highlights ("floating on water", "in the snow", as the prompt list words them):
# a panel shows the sampled prompts holding them first, then the others in sampling order.
HIGHLIGHTED = ("floating on top of water", "in the snow")


def shown_prompts(sampled: list[str], highlighted: tuple[str, ...] = HIGHLIGHTED,
                  count: int = PROMPTS_SHOWN) -> list[str]:
    picked = [prompt for text in highlighted for prompt in sampled if text in prompt]
    return list(dict.fromkeys([*picked, *sampled]))[:count]


def newest(records: list[dict]) -> dict[tuple[str, str], dict]:
    """(subject, method name) -> the newest finished record of seed 0 (or the lowest seed)."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        if record.get("status") == "finished" and record.get("dreambooth"):
            cells.setdefault((record["config"]["task"]["subset"],
                              record["config"]["method"]["name"]), []).append(record)
    return {key: newest_per_seed(group)[0] for key, group in cells.items()}


def first_images(record: dict, prompts: list[str]) -> list[Image.Image]:
    folder = Path(record["_path"]).parent
    by_prompt = {s["prompt"]: folder / s["path"] for s in record["dreambooth"]["samples"] if s["index"] == 0}
    return [Image.open(by_prompt[prompt]).convert("RGB") for prompt in prompts]


def caption(record: dict) -> str:
    """What the samples come from, read off a record: backbone, resolution, training steps, sampling, seed, and
    whether the backbone (its yaml's ``random_init``) and the metric models (``random``) are random-init."""
    config = record["config"]
    task, backbone = config["task"], config["backbone"]["name"]
    sampling = task["sampling"]
    random_parts = [part for part, random in (("backbone", config["backbone"].get("random_init", False)),
                                              ("metric models", "random" in task["metrics"].values())) if random]
    warning = f" RANDOM-INIT {' AND '.join(random_parts).upper()}: shows the machinery, not image quality." \
        if random_parts else ""
    return (f"{backbone}, {task['resolution']} px, {config['trainer']['max_steps']} training steps, seed "
            f"{config['seed']}; sampling {sampling['steps']} steps, guidance {sampling['guidance']}, image 0 of "
            f"each prompt.{warning}")


def subject_grid(subject: str, runs: dict[str, dict], out: Path) -> Path:
    """The Fig. 2 panel of one subject: prompts every method sampled, the highlighted contexts first."""
    orders = [[s["prompt"] for s in run["dreambooth"]["samples"] if s["index"] == 0] for run in runs.values()]
    prompts = shown_prompts([p for p in orders[0] if all(p in order for order in orders)])
    reference_run = next(iter(runs.values()))
    reference = Image.open(Path(reference_run["_path"]).with_suffix(".images") / "reference.png")
    grid = make_grid(reference, {label: first_images(run, prompts) for label, run in runs.items()}, prompts,
                     cell=192, caption=caption(reference_run))
    path = save_grid(grid, out)
    grid.save(out.with_suffix(".pdf"))
    return path


def metric_rows(subject: str, runs: dict[str, dict]) -> list[dict]:
    return [{"subject": subject, "method": label, "adapter_params": run["params"].get("adapter"),
             "dino": run["metrics"]["final"].get("test/dino"), "clip_i": run["metrics"]["final"].get("test/clip_i"),
             "clip_t": run["metrics"]["final"].get("test/clip_t"), "record": Path(run["_path"]).name}
            for label, run in runs.items()]


def render(results_dir: Path, out_dir: Path, group: str | None = None) -> Rendered:
    group = group or GROUP
    cells = newest(read_records(Path(results_dir), [group]))
    # the subjects its experiment file sweeps (the default: train_lily.sh's and duck_toy), run or not, then any other
    subjects = list(dict.fromkeys([*(swept(f"{group}/lily", "task.subset") or []), *sorted(s for s, _ in cells)]))
    rendered, rows = Rendered(), []
    prefix = "fig2" if group == GROUP else f"fig2_{group}"
    for subject in subjects:
        runs = {label: cells[(subject, name)] for label, name in METHODS.items() if (subject, name) in cells}
        rendered.missing += [f"python -m lilyexp.run -m experiment={group}/{name} task.subset={subject}"
                             for label, name in METHODS.items() if label not in runs]
        if len(runs) == len(METHODS):
            rendered.files.append(subject_grid(subject, runs, Path(out_dir) / f"{prefix}_{subject}.png"))
        rows += metric_rows(subject, runs)
    if rows:
        rendered.files.append(write_csv(rows, Path(out_dir) / f"{prefix}.csv"))
    return rendered
