"""`make gpu-check`: the paper-scale paths no CPU test can run, in one command, on a GPU machine (minutes).

Each cell is an ordinary runner cell (`lilyexp.run.execute`) of two optimizer steps, checkpointed after each, at the
paper's real shapes and precision:

* LLaMA3-8B with Lily and with PiSSA (its SVDs on the GPU), fp16 autocast with a GradScaler (Table 2's precision);
* Falcon-Mamba-7B with Lily in fp16 (Table 1; with activation checkpointing when the `mamba` kernels are missing);
* RoBERTa-large with Lily (fp32, Table 3) and fully fine-tuned in fp16 (fp32 master weights);
* ViT-B/16 and Vim-S with Lily on VTAB-shaped images (Tables 4 and 5; bf16 for Vim);
* DreamBooth (tiny SDXL UNet, fp16, sampling and DINO/CLIP scoring on the GPU) when ``--dreambooth-dir`` names the
  dataset's folder;
* LLaMA3-8B with Lily under DDP on two processes when two GPUs are visible.

The hub is often unreachable from GPU machines, so the backbones are built with random weights from their real
configurations (``backbone.architecture``): the check is about whether the paths run and what they cost, not about
accuracy. GLUE, VTAB and commonsense data are generated. Reports, per cell: status (a failure's reason), steps,
seconds per step, peak GPU memory and trainable parameters, in ``<out>/gpu_check.{json,md}``; exit status 1 if any
cell failed. ``--tiny`` runs the same cells on the tiny backbones (on a CPU, in seconds; the tests use it) and
``--dry-run`` only composes and checks every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ["trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.eval_every=2", "trainer.log_every=1"]
COMMONSENSE = ["task=commonsense_synthetic", "task.n_train=64", "task.n_eval=4", "task.val_size=8",
               "task.subset=[syn_boolq]", "task.generation.max_new_tokens=4", "trainer.batch_size=4"]
GLUE = ["task=glue", "task.subset=sst2", "task.max_length=128", "trainer.batch_size=8"]
VTAB = ["task=vtab", "task.subset=eurosat", "task.protocol=paper", "trainer.batch_size=16"]
LILY_LLM = ["method=lily", "method.ne_1=4", "method.ne_2=4"]

CELLS: dict[str, list[str]] = {
    "llama3-lily-fp16": ["backbone=llama3", *COMMONSENSE, *LILY_LLM, "trainer.mixed_precision=fp16"],
    "llama3-pissa-fp16": ["backbone=llama3", *COMMONSENSE, "method=pissa", "trainer.mixed_precision=fp16"],
    "falcon_mamba-lily-fp16": ["backbone=falcon_mamba", *COMMONSENSE, *LILY_LLM, "trainer.mixed_precision=fp16"],
    "roberta_large-lily-fp32": ["backbone=roberta_large", *GLUE, "method=lily"],
    "roberta_large-full-fp16": ["backbone=roberta_large", *GLUE, "method=full", "trainer.mixed_precision=fp16"],
    "vit-lily-fp32": ["backbone=vit", *VTAB, "method=lily"],
    "vim-lily-bf16": ["backbone=vim", *VTAB, "method=lily", "trainer.mixed_precision=bf16"],
    "dreambooth-tiny_sdxl-lily-fp16": ["backbone=tiny_sdxl", "task=dreambooth", "method=lily", "task.subset=dog",
                                       "task.resolution=32", "task.eval_limit=2", "task.sampling.images_per_prompt=1",
                                       "task.sampling.steps=2", "task.metrics.dino=random", "task.metrics.clip=random",
                                       "trainer.batch_size=1", "trainer.mixed_precision=fp16"],
    "llama3-lily-fp16-ddp2": ["backbone=llama3", *COMMONSENSE, *LILY_LLM, "trainer.mixed_precision=fp16",
                              "trainer.batch_size=2"],
}
TINY = {"llama3": "tiny_llama", "falcon_mamba": "tiny_falcon_mamba", "roberta_large": "tiny_roberta",
        "vit": "tiny_vit", "vim": "tiny_vim", "tiny_sdxl": "tiny_sdxl"}
TINY_LILY = ["method.ne_1=2", "method.ne_2=2"]  # few experts: the tiny backbones are 4 layers deep and narrow
CELL_TIMEOUT_S = 1800  # a hung cell (e.g. a collective one process never joins) is reported, not waited for


# ------------------------------------------------------------------------------------------------ data

def fake_glue(root: Path) -> Path:
    """SST-2 in the classic TSV layout: short sentences, balanced labels."""
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{'a fine film' if i % 2 else 'a dull film'} number {i}\t{i % 2}" for i in range(64)]
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return root / "glue"


def fake_vtab(root: Path) -> Path:
    """eurosat (10 classes) in the VTAB-1K list-file layout, with small random images (the task resizes them)."""
    from PIL import Image
    import numpy as np

    folder = root / "vtab" / "eurosat"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    generator, lines = np.random.default_rng(0), {}
    for split, count in {"train800": 32, "val200": 16, "test": 16}.items():
        lines[split] = []
        for i in range(count):
            name = f"images/{split}_{i}.png"
            Image.fromarray(generator.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
            lines[split].append(f"{name} {i % 10}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root / "vtab"


# ------------------------------------------------------------------------------------------------ cells

def overrides_of(name: str, out: Path, tiny: bool, dreambooth_dir: str | None) -> list[str]:
    cell = list(CELLS[name])
    if tiny:
        cell = [f"backbone={TINY[o.split('=', 1)[1]]}" if o.startswith("backbone=") else o for o in cell]
        cell += TINY_LILY if "method=lily" in cell else []
        cell += ["task.image_size=32"] if "task=vtab" in cell else []
    if "task=glue" in cell:
        cell.append(f"task.data_dir={fake_glue(out / 'data')}")
    if "task=vtab" in cell:
        cell.append(f"task.data_dir={fake_vtab(out / 'data')}")
    if "task=dreambooth" in cell:
        cell.append(f"task.data_dir={dreambooth_dir}")
    return [*cell, *STEPS, f"paths.results_dir={out}/results", f"paths.checkpoint_dir={out}/checkpoints",
            "group=gpu_check"]


def random_weights(cfg) -> None:
    """Swap a pretrained backbone's loader for random weights of its real shapes (``backbone.architecture``)."""
    from omegaconf import OmegaConf, open_dict

    backbone = cfg.backbone
    if backbone.get("random_init") or backbone.get("architecture") is None:
        return
    architecture = OmegaConf.to_container(backbone.architecture)
    with open_dict(cfg):
        if architecture["_target_"].startswith("transformers."):  # a config class: build the model from it
            style = "encoder" if "Roberta" in architecture["_target_"] else "causal"
            backbone.load = {"_target_": "lilyexp.backbones.hf.from_config", "auto_class": backbone.load.auto_class,
                             "config": architecture, "dtype": backbone.load.get("dtype"), "pad_token_id": 0,
                             "tokenizer": {"_target_": "lilyexp.backbones.byte_tokenizer.build", "style": style}}
        else:  # a loader call that downloads nothing (timm / Vim with pretrained: false)
            keep = {k: v for k, v in OmegaConf.to_container(backbone.load).items() if k not in ("pretrained",
                                                                                                "checkpoint_path",
                                                                                                "model_name")}
            backbone.load = {**keep, **architecture}


def compose_cell(name: str, out: Path, tiny: bool, dreambooth_dir: str | None):
    from hydra import compose, initialize_config_dir

    from lilyexp.compose import CONF_DIR, check_gpu_kernels
    from lilyexp.errors import ConfigError

    overrides = overrides_of(name, out, tiny, dreambooth_dir)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=overrides)
    try:
        check_gpu_kernels(cfg)
    except ConfigError:  # no `mamba` kernels here: the fallback the refusal offers
        cfg.trainer.gradient_checkpointing = True
        overrides.append("trainer.gradient_checkpointing=true")
    if not tiny:
        random_weights(cfg)
    return cfg, overrides


def run_cell(name: str, out: Path, tiny: bool, dreambooth_dir: str | None) -> None:
    """In this process (launched once per cell, so every cell gets its own accelerate state)."""
    from lilyexp.run import execute

    cfg, overrides = compose_cell(name, out, tiny, dreambooth_dir)
    path = execute(cfg, overrides)
    print(f"record: {path}", flush=True)


def launch(name: str, out: Path, tiny: bool, dreambooth_dir: str | None) -> dict:
    """One cell in a fresh process (two under torch.distributed.run for a DDP cell); its record, or the reason."""
    script = [str(Path(__file__).resolve()), "--cell", name, "--out", str(out)] + (["--tiny"] if tiny else []) \
        + (["--dreambooth-dir", dreambooth_dir] if dreambooth_dir else [])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if name.endswith("ddp2") \
        else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"ACCELERATE_USE_CPU": "true"} if tiny else {})}
    try:
        done = subprocess.run([*launcher, *script], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=CELL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"cell": name, "status": "failed", "reason": f"no result after {CELL_TIMEOUT_S} s (hung?)"}
    records = [line.split("record: ", 1)[1] for line in done.stdout.splitlines() if line.startswith("record: ")]
    if done.returncode != 0 or not records:
        return {"cell": name, "status": "failed", "reason": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return summary(name, json.loads(Path(records[-1]).read_text()))


def summary(name: str, record: dict) -> dict:
    timing = record.get("timing", {})
    return {"cell": name, "status": record["status"], "steps": record.get("steps"), "step_s": timing.get("step_s"),
            "peak_mem_gib": round(timing.get("peak_mem_bytes", 0) / 2**30, 2),
            "peak_mem_kind": timing.get("peak_mem_kind"),
            "trainable": record.get("params", {}).get("trainable"), "device": record.get("env", {}).get("device"),
            "processes": record.get("batch", {}).get("processes"), "overrides": record.get("overrides")}


def markdown(rows: list[dict]) -> str:
    lines = ["| cell | status | steps | s/step | peak memory (GiB) | trainable | processes |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] != "finished":
            lines.append(f"| {row['cell']} | **{row['status']}**: {row.get('reason', '')} | | | | | |")
            continue
        lines.append(f"| {row['cell']} | finished | {row['steps']} | {row['step_s']:.3f} | {row['peak_mem_gib']} "
                     f"({row['peak_mem_kind']}) | {row['trainable']:,} | {row['processes']} |")
    return "\n".join(lines) + "\n"


def chosen_cells(only: list[str] | None, dreambooth_dir: str | None, gpus: int, tiny: bool) -> list[str]:
    names = list(only or CELLS)
    unknown = [n for n in names if n not in CELLS]
    if unknown:
        sys.exit(f"error: unknown cell(s) {', '.join(unknown)}; the cells are: {', '.join(CELLS)}.")
    if not dreambooth_dir and not only:
        names.remove("dreambooth-tiny_sdxl-lily-fp16")
        print("skipping the DreamBooth cell: --dreambooth-dir names no DreamBooth dataset folder", flush=True)
    if gpus < 2 and not tiny and not only and "llama3-lily-fp16-ddp2" in names:  # tiny: two gloo processes
        names.remove("llama3-lily-fp16-ddp2")
        print(f"skipping the DDP cell: {gpus} GPU(s) visible, it needs 2", flush=True)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu_check")
    parser.add_argument("--only", nargs="+", help="run these cells only")
    parser.add_argument("--tiny", action="store_true", help="the tiny backbones (runs on a CPU)")
    parser.add_argument("--dry-run", action="store_true", help="compose and check every cell, run nothing")
    parser.add_argument("--dreambooth-dir", help="a DreamBooth dataset/ folder (subject folders, prompts file)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell in this process
    args = parser.parse_args()
    out = args.out.resolve()
    if args.cell:
        return run_cell(args.cell, out, args.tiny, args.dreambooth_dir)
    import torch

    if not torch.cuda.is_available() and not (args.tiny or args.dry_run):
        sys.exit("error: no GPU visible; gpu-check runs the paper-scale cells on a GPU (--tiny runs them on the "
                 "tiny backbones here, --dry-run composes them).")
    names = chosen_cells(args.only, args.dreambooth_dir, torch.cuda.device_count(), args.tiny)
    if args.dry_run:
        from lilyexp.compose import check_combination
        from lilyexp.settings import check_settings

        for name in names:
            cfg, overrides = compose_cell(name, out, args.tiny, args.dreambooth_dir)
            check_settings(cfg, overrides)
            check_combination(cfg)
            print(f"{name}: {cfg.backbone.load._target_} {' '.join(overrides)}", flush=True)
        return None
    rows = []
    for name in names:
        print(f"running {name} ...", flush=True)
        rows.append(launch(name, out, args.tiny, args.dreambooth_dir))
        print(f"  {rows[-1]['status']} {rows[-1].get('reason', '')}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(rows))
    print(markdown(rows) + f"written: {out / 'gpu_check.md'}", flush=True)
    sys.exit(1 if any(row["status"] != "finished" for row in rows) else 0)


if __name__ == "__main__":
    main()
