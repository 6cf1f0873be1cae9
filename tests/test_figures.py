"""Figures render from run records alone (fixture records here) and name the cells they lack with the commands
that produce them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image

from lilyexp.figures import figure_names
from lilyexp.figures.__main__ import main as figures_main
from lilyexp.figures import fig2

PROMPTS = ["A picture of a duck_toy in the jungle", "A picture of a duck_toy in the snow"]


def dreambooth_record(folder: Path, method: str, subject: str, color: tuple, dino: float) -> None:
    stem = f"tiny_sdxl-dreambooth-{subject}-{method}-seed0-0000000{len(method)}"
    images = folder / f"{stem}.images"
    images.mkdir(parents=True)
    Image.new("RGB", (32, 32), (128, 128, 128)).save(images / "reference.png")
    samples = []
    for number, prompt in enumerate(PROMPTS):
        Image.new("RGB", (32, 32), color).save(images / f"{number:02d}-0.png")
        samples.append({"prompt": prompt, "index": 0, "seed": number, "path": f"{stem}.images/{number:02d}-0.png"})
    record = {"schema": 2, "status": "finished", "identity": {}, "params": {"adapter": 100 * len(method)},
              "config": {"seed": 0, "task": {"subset": subject}, "method": {"name": method}},
              "metrics": {"final": {"test/dino": dino, "test/clip_i": 0.5, "test/clip_t": 0.25},
                          "selection": {"rule": "last"}},
              "dreambooth": {"samples": samples, "per_prompt": [], "prompt": f"a photo of {subject}"}}
    (folder / f"{stem}.json").write_text(json.dumps(record))


def test_fig2_renders_a_panel_per_subject_with_both_methods_and_names_the_missing_cells(tmp_path):
    folder = tmp_path / "runs" / "dreambooth"
    dreambooth_record(folder, "lily", "wolf_plushie", (255, 0, 0), 0.7)
    dreambooth_record(folder, "lora", "wolf_plushie", (0, 0, 255), 0.6)
    dreambooth_record(folder, "lily", "robot_toy", (255, 0, 0), 0.4)
    rendered = fig2.render(tmp_path / "runs", tmp_path / "figures")
    names = {p.name for p in rendered.files}
    assert names == {"fig2_wolf_plushie.png", "fig2.csv"} and (tmp_path / "figures" / "fig2_wolf_plushie.pdf").is_file()
    assert "python -m lilyexp.run -m experiment=dreambooth/lora task.subset=robot_toy" in rendered.missing
    assert "python -m lilyexp.run -m experiment=dreambooth/lily task.subset=rc_car" in rendered.missing
    grid = Image.open(tmp_path / "figures" / "fig2_wolf_plushie.png").convert("RGB")
    width, height = grid.size  # label column, reference, two prompts; header, Lily row, LoRA row
    cell = (width - 96) // 3
    lily_pixel = grid.getpixel((96 + cell + cell // 2, height - cell - cell // 2))
    lora_pixel = grid.getpixel((96 + cell + cell // 2, height - cell // 2))
    assert lily_pixel[0] > 200 and lora_pixel[2] > 200  # Lily's row above LoRA's
    rows = list(csv.DictReader((tmp_path / "figures" / "fig2.csv").open()))
    assert {(r["subject"], r["method"], r["dino"]) for r in rows} >= {("wolf_plushie", "Lily", "0.7"),
                                                                         ("wolf_plushie", "LoRA", "0.6")}


def test_the_figures_cli_knows_every_figure_and_refuses_others(tmp_path, capsys):
    assert "fig2" in figure_names()
    assert figures_main(["fig2", "--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "experiment=dreambooth/lily task.subset=wolf_plushie" in capsys.readouterr().out
    try:
        figures_main(["fig99"])
    except SystemExit as exit:
        assert exit.code == 2
