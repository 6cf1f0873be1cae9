"""Figures render from run records alone (fixture records and artifacts here, and tiny real runs with the capture
callbacks and exported adapters) and name the cells they lack with the commands that produce them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lilyexp.figures import fig2, fig3, fig4, fig5, fig6, fig9, fig12, figure_names
from lilyexp.figures.__main__ import main as figures_main
from lilyexp.figures.plots import finished
from lilyexp.run import execute
from lilyexp.records import beside
from conftest import compose_run
from test_captures import CAPTURES, fake_vtab, vit_cell

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
              "config": {"seed": 0, "method": {"name": method}, "backbone": {"name": "tiny_sdxl", "random_init": True},
                         "trainer": {"max_steps": 150},
                         "task": {"subset": subject, "resolution": 64, "metrics": {"dino": "random", "clip": "random"},
                                  "sampling": {"steps": 20, "guidance": 5.0}}},
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
    width, height = grid.size  # label column, reference, two prompts; header, Lily row, LoRA row, caption
    cell = (width - 96) // 3
    header = (height - 2 * cell) // 2
    lily_pixel = grid.getpixel((96 + cell + cell // 2, header + cell // 2))
    lora_pixel = grid.getpixel((96 + cell + cell // 2, header + cell + cell // 2))
    assert lily_pixel[0] > 200 and lora_pixel[2] > 200  # Lily's row above LoRA's
    rows = list(csv.DictReader((tmp_path / "figures" / "fig2.csv").open()))
    assert {(r["subject"], r["method"], r["dino"]) for r in rows} >= {("wolf_plushie", "Lily", "0.7"),
                                                                         ("wolf_plushie", "LoRA", "0.6")}


def test_fig2_captions_say_what_ran_and_flag_random_init_models(tmp_path):
    dreambooth_record(tmp_path, "lily", "wolf_plushie", (255, 0, 0), 0.7)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    text = fig2.caption(record)
    assert text.startswith("tiny_sdxl, 64 px, 150 training steps, seed 0; sampling 20 steps, guidance 5.0")
    assert "RANDOM-INIT BACKBONE AND METRIC MODELS" in text
    record["config"]["backbone"] = {"name": "sdxl", "random_init": False}
    record["config"]["task"]["metrics"] = {"dino": "facebook/dino-vits16", "clip": "openai/clip-vit-large-patch14"}
    assert "RANDOM" not in fig2.caption(record)
    record["config"]["task"]["metrics"]["clip"] = "random"
    assert "RANDOM-INIT METRIC MODELS" in fig2.caption(record)


def test_the_figures_cli_knows_every_figure_and_refuses_others(tmp_path, capsys):
    assert {"fig2", "fig3", "fig4", "fig5", "fig6", "fig9", "fig12"} <= set(figure_names())
    assert "plots" not in figure_names()
    assert figures_main(["fig2", "--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "experiment=dreambooth/lily task.subset=wolf_plushie" in capsys.readouterr().out
    try:
        figures_main(["fig99"])
    except SystemExit as exit:
        assert exit.code == 2


# ------------------------------------------------------------------------ Figs. 3-6, 9, 12-13 (analysis)

def write_record(folder: Path, stem: str, config: dict, *, final: dict | None = None, rule: str = "best_epoch",
                 timing: dict | None = None, params: int = 1000, **extra) -> Path:
    """A finished schema-2 record with the config keys the figures read."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"schema": 2, "status": "finished", "identity": {}, "params": {"adapter": params},
              "config": {"seed": 0, **config}, "timing": timing or {},
              "metrics": {"final": final or {}, "selection": {"rule": rule}}, **extra}
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(record))
    return path


def glue_config(task: str, method: str, **method_settings) -> dict:
    return {"backbone": {"name": "roberta"}, "task": {"name": "glue", "subset": task}, "trainer": {"epochs": 20},
            "method": {"name": method, **method_settings}}


def delta_w_artifact(record: Path, ranks: dict[int, tuple[int, int]]) -> None:
    """What DeltaWeightCapture writes: per layer the accumulated and final singular values and ranks."""
    layers = []
    for layer, (accumulated, final) in ranks.items():
        values = {name: [1.0] * rank + [0.0] * (8 - rank) for name, rank in (("a", accumulated), ("f", final))}
        layers.append({"name": f"roberta.encoder.layer.{layer}.attention.self.query", "target": "query",
                       "layer": layer, "shape": [8, 8], "rtol": 1e-6,
                       "accumulated": {"rank": accumulated, "singular_values": values["a"]},
                       "final": {"rank": final, "singular_values": values["f"]}})
    beside(record, "delta_w.json").write_text(json.dumps(
        {"rtol": "max(m, n) x float32 epsilon, per matrix", "first_step": 2, "steps": 99, "layers": layers}))


def test_fig3_ranks_each_task_and_layer_and_names_the_missing_cells(tmp_path):
    folder = tmp_path / "runs" / "fig3"
    lily = write_record(folder, "lily-cola", glue_config("cola", "lily", r=32, ne_1=3, ne_2=3), params=297216)
    delta_w_artifact(lily, {0: (96, 32), 1: (90, 32), 2: (88, 31)})
    lora = write_record(folder, "lora-cola", glue_config("cola", "lora", r=8), params=294912)
    delta_w_artifact(lora, {0: (40, 8), 1: (38, 8), 2: (35, 8)})
    write_record(folder, "lora-mrpc-uncaptured", glue_config("mrpc", "lora", r=8))  # a run without the capture
    rendered = fig3.render(tmp_path / "runs", tmp_path / "figures")
    assert {p.name for p in rendered.files} == {"fig3.png", "fig3.pdf", "fig3.csv"}
    rows = list(csv.DictReader((tmp_path / "figures" / "fig3.csv").open()))
    ranks = {(r["method"], r["layer"]): (r["rank_accumulated"], r["rank_final"]) for r in rows}
    assert ranks[("Lily", "0")] == ("96", "32") and ranks[("LoRA", "2")] == ("35", "8") and len(rows) == 6
    assert rows[0]["variant"].startswith("Lily r 32 ne 3/3 (297K)")
    assert "python -m lilyexp.run -m experiment=fig3/lora task.subset=mrpc" in rendered.missing
    assert "python -m lilyexp.run -m experiment=fig3/lily task.subset=sst2" in rendered.missing
    cola = [command for command in rendered.missing if "task.subset=cola" in command]
    assert cola == ["python -m lilyexp.run -m experiment=fig3/lily_small task.subset=cola"]  # the 16.7% bar


def router_artifact(record: Path, sums: dict[int, list[float]], target: str = "qkv.k") -> None:
    layers = [{"name": f"blocks.{layer}.attn.qkv.lily_parts.default.k", "target": target, "layer": layer,
               "sums": values, "tokens": sum(values)} for layer, values in sums.items()]
    beside(record, "router_weights.json").write_text(json.dumps(
        {"first_step": 2, "steps": 10, "layers": layers}))


def test_fig4_shows_expert_shares_of_a_shallow_middle_and_deep_layer(tmp_path):
    folder = tmp_path / "runs" / "fig4"
    config = {"backbone": {"name": "vit"}, "task": {"name": "vtab", "subset": "cifar"}, "method": {"name": "lily"}}
    cifar = write_record(folder, "lily-cifar", config)
    router_artifact(cifar, {layer: [1.0 + layer, 2.0, 1.0] for layer in range(12)})
    rendered = fig4.render(tmp_path / "runs", tmp_path / "figures")
    assert {p.name for p in rendered.files} == {"fig4.png", "fig4.pdf", "fig4.csv"}
    rows = list(csv.DictReader((tmp_path / "figures" / "fig4.csv").open()))
    share = {(int(r["layer"]), r["expert"]): float(r["share"]) for r in rows}
    assert share[(0, "B1")] == pytest.approx(0.25) and share[(11, "B1")] == pytest.approx(0.8)
    assert fig4.shown_layers([r | {"layer": int(r["layer"])} for r in rows]) == ("qkv.k", [0, 6, 11])
    assert ("python -m lilyexp.run -m experiment=fig4/lily task.subset=diabetic_retinopathy "
            "task.data_dir=/path/to/vtab-1k") in rendered.missing
    assert not any("task.subset=cifar " in command for command in rendered.missing)


def test_fig2_shows_the_papers_highlighted_prompts_first():
    sampled = [f"A picture of a duck_toy {c}" for c in ("in the jungle", "in the snow", "on the beach",
                                                          "floating on top of water", "on a cobblestone street")]
    assert fig2.shown_prompts(sampled, count=3) == [sampled[3], sampled[1], sampled[0]]
    assert fig2.shown_prompts(sampled[:1]) == sampled[:1]


def test_fig4_shows_the_papers_blocks_of_a_24_block_model():
    rows = [{"target": "in_proj", "layer": layer} for layer in range(24)]
    assert fig4.shown_layers(rows) == ("in_proj", [2, 13, 22])


def test_fig4_renders_from_the_papers_vim_cells_in_miniature(tmp_path):
    """experiment=fig4/lily (Vim-S Lily-S, three B experts) on tiny_vim and a fake CIFAR-100: its router capture
    draws the figure."""
    data = fake_vtab(tmp_path / "vtab", task="cifar")
    overrides = ["experiment=fig4/lily", "backbone=tiny_vim", "method.ne_1=4", "task.subset=cifar",
                 "task.protocol=paper", f"task.data_dir={data}", "debug=smoke", "trainer.max_steps=2"]
    record = execute(compose_run(overrides, tmp_path), overrides)
    assert json.loads(record.read_text())["status"] == "finished"
    rendered = fig4.render(record.parent.parent, tmp_path / "figures")
    assert {p.name for p in rendered.files} == {"fig4.png", "fig4.pdf", "fig4.csv"}
    rows = list(csv.DictReader((tmp_path / "figures" / "fig4.csv").open()))
    assert {r["expert"] for r in rows} == {"B1", "B2", "B3"} and {r["target"] for r in rows} == {"in_proj"}
    assert {int(r["layer"]) for r in rows} == {0, 1, 2, 3}
    assert any("task.subset=diabetic_retinopathy" in command for command in rendered.missing)


def vtab_record(folder: Path, task: str, s: float, ne: int, accuracy: float, rule: str = "test_selected",
                seed: int = 0) -> Path:
    config = {"seed": seed, "backbone": {"name": "vit"}, "task": {"name": "vtab", "subset": task},
              "method": {"name": "lily", "s": s, "ne_1": ne, "ne_2": ne}}
    metric = "test/accuracy"
    final = {metric: accuracy, "val/accuracy": accuracy} if rule == "val_selected" else {metric: accuracy}
    return write_record(folder, f"lily-{task}-s{s}-ne{ne}-{rule}-{seed}", config, final=final, rule=rule)


def test_fig12_picks_among_table4s_own_cells_not_fig5s_extra_ne(tmp_path):
    folder = tmp_path / "runs" / "table4"
    for ne, accuracy in ((2, 0.80), (4, 0.85), (12, 0.90)):  # ne 12 is one of Fig. 5's own cells
        record = vtab_record(folder, fig12.SUBSET, 1.0, ne, accuracy)
        stored = json.loads(record.read_text())
        record.write_text(json.dumps({**stored, "adapter": {"path": str(tmp_path / "adapter")}}))
    records = finished(tmp_path / "runs", ["table4"])
    assert fig12.chosen(fig12.candidates(records, "lily"))["config"]["method"]["ne_1"] == 4


def test_fig5_plots_accuracy_against_ne_at_the_s_table4s_rule_picks(tmp_path):
    folder = tmp_path / "runs" / "table4"
    for ne, (low, high) in {2: (0.60, 0.70), 3: (0.72, 0.65), 4: (0.50, 0.55)}.items():
        vtab_record(folder, "dtd", 0.1, ne, low)
        vtab_record(folder, "dtd", 1.0, ne, high)
    vtab_record(folder, "dtd", 1.0, 2, 0.40, rule="val_selected")
    rendered = fig5.render(tmp_path / "runs", tmp_path / "figures")
    assert {p.name for p in rendered.files} == {"fig5.png", "fig5.pdf", "fig5.csv"}
    rows = list(csv.DictReader((tmp_path / "figures" / "fig5.csv").open()))
    paper = {int(r["ne"]): (float(r["accuracy"]), r["chosen"]) for r in rows if r["selection"] == "test_selected"}
    assert paper == {2: (70.0, "s=1.0"), 3: (72.0, "s=0.1"), 4: (55.0, "s=1.0")}
    assert [r["accuracy"] for r in rows if r["selection"] == "val_selected"] == ["40.0"]
    assert len(rendered.missing) == 11 * 5 + 2  # every other task at each ne of the grid, dtd at 6 and 12
    assert "python -m lilyexp.run -m experiment=fig5/lily task.subset=dtd method.ne_1=12 " \
        "task.data_dir=/path/to/vtab-1k" in rendered.missing  # past Table 4's grid
    assert ("python -m lilyexp.run -m experiment=fig5/lily task.subset=cifar method.ne_1=2 "
            "task.data_dir=/path/to/vtab-1k") in rendered.missing


def test_fig6_reads_time_and_memory_from_the_records_of_both_settings(tmp_path):
    timing = {"step_s": 0.5, "train_s": 600.0, "peak_mem_bytes": 3 * 2**30, "peak_mem_kind": "cuda_max_allocated"}
    nlu = {"backbone": {"name": "roberta"}, "task": {"name": "glue", "subset": "cola"}, "trainer": {"epochs": 10}}
    write_record(tmp_path / "runs" / "fig6", "lily", {**nlu, "method": {"name": "lily"}}, timing=timing)
    write_record(tmp_path / "runs" / "fig6", "lily-seed1", {**nlu, "seed": 1, "method": {"name": "lily"}},
                 timing={**timing, "step_s": 0.7})
    write_record(tmp_path / "runs" / "fig6", "lora", {**nlu, "method": {"name": "lora"}},
                 timing={**timing, "step_s": 0.4, "peak_mem_bytes": 2**30})
    llm = {"backbone": {"name": "falcon_mamba"}, "task": {"name": "commonsense"}, "trainer": {"epochs": 1}}
    for name, method in (("lily", "lily"), ("lora-in", "lora")):  # LoRA (in) is the control, not the figure's LoRA
        config = {**llm, "method": {"name": method, "target_modules": ["in_proj"]}}
        write_record(tmp_path / "runs" / "table1", name, config, timing=timing)
    rendered = fig6.render(tmp_path / "runs", tmp_path / "figures")
    assert {p.name for p in rendered.files} == {"fig6.png", "fig6.pdf", "fig6.csv"}
    rows = {(r["setting"][:3], r["method"]): r for r in csv.DictReader((tmp_path / "figures" / "fig6.csv").open())}
    assert float(rows[("NLU", "Lily")]["step_s"]) == pytest.approx(0.6) and rows[("NLU", "Lily")]["seeds"] == "2"
    assert float(rows[("NLU", "LoRA")]["peak_mem_gib"]) == pytest.approx(1.0)
    assert float(rows[("LLM", "Lily")]["train_min"]) == pytest.approx(10.0)
    assert rendered.missing == ["python -m lilyexp.run -m experiment=table1/lora_dt_in"]


def commonsense_record(folder: Path, r: int, ne: int, accuracy: float) -> Path:
    sets = [column["metric"] for column in fig9.columns()]
    config = {"backbone": {"name": "llama3"}, "task": {"name": "commonsense"},
              "method": {"name": "lily", "r": r, "ne_1": ne, "ne_2": ne}}
    return write_record(folder, f"lily-r{r}", config, final={m: accuracy for m in sets}, rule="val_selected",
                        params=1185792)


def test_fig9_compares_rank_and_experts_at_one_budget_and_reads_table2s_cell(tmp_path):
    commonsense_record(tmp_path / "runs" / "fig9", 32, 2, 0.80)
    commonsense_record(tmp_path / "runs" / "fig9", 8, 8, 0.75)
    commonsense_record(tmp_path / "runs" / "table2", 16, 4, 0.82)
    rendered = fig9.render(tmp_path / "runs", tmp_path / "figures")
    assert {p.name for p in rendered.files} == {"fig9.png", "fig9.pdf", "fig9.csv"}
    rows = list(csv.DictReader((tmp_path / "figures" / "fig9.csv").open()))
    average = {(r["r"], r["ne_1"]): float(r["accuracy"]) for r in rows if r["test_set"] == "Avg"}
    assert average == {("32", "2"): 80.0, ("16", "4"): 82.0, ("8", "8"): 75.0}
    assert rendered.missing == ["python -m lilyexp.run -m experiment=fig9/lily method.r=4"]
    assert len(rows) == 3 * 9


def test_the_figures_list_what_to_run_when_no_record_exists(tmp_path):
    for module in (fig3, fig4, fig5, fig6, fig9, fig12):
        rendered = module.render(tmp_path / "runs", tmp_path / "figures")
        assert rendered.files == [] and rendered.missing, module.__name__
        assert all(c.startswith("python -m lilyexp.run -m experiment=") for c in rendered.missing)
    assert "python -m lilyexp.run -m experiment=table2/lily" in fig9.render(tmp_path, tmp_path).missing
    assert "python -m lilyexp.run -m experiment=fig12/lily task.data_dir=/path/to/vtab-1k" in \
        fig12.render(tmp_path, tmp_path).missing


@pytest.fixture
def vit_runs(tmp_path, monkeypatch):
    """Table 4's Caltech101 cells in miniature: tiny ViT runs of Lily (two s) and LoRA with their exports."""
    for s in (0.1, 1.0):
        vit_cell(tmp_path, "lily", "group=table4", "method.ne_1=2", "method.ne_2=2", f"method.s={s}")
    vit_cell(tmp_path, "lora", "group=table4", "method.r=2")
    monkeypatch.setattr(fig12, "ATTENTION_LAYERS", (0, 1, 5))
    monkeypatch.setattr(fig12, "DIFFERENCE_PAIRS", ((1, 0), (6, 1)))
    monkeypatch.setattr(fig12, "IMAGES", 2)
    monkeypatch.setattr(fig12, "IMAGE_LIST", ())
    return tmp_path


def test_fig12_and_13_draw_attention_maps_and_feature_differences_from_the_exported_adapters(vit_runs):
    rendered = fig12.render(vit_runs / "runs", vit_runs / "figures")
    assert rendered.missing == []
    assert {p.name for p in rendered.files} == {"fig12.png", "fig12.pdf", "fig12.csv", "fig13.png", "fig13.pdf",
                                                "fig13.csv"}
    attention = list(csv.DictReader((vit_runs / "figures" / "fig12.csv").open()))
    assert {(r["method"], r["block"]) for r in attention} == {(m, b) for m in ("Lily", "LoRA") for b in ("0", "1")}
    assert {r["image"] for r in attention} == {"0.png", "2.png"}  # spread over the 4 test images the run used
    assert all(0 < float(r["attention_entropy"]) <= torch.log(torch.tensor(16.0)) + 1e-4 for r in attention)
    differences = list(csv.DictReader((vit_runs / "figures" / "fig13.csv").open()))
    assert {r["blocks"] for r in differences} == {"1 vs 0"} and len(differences) == 4


def test_fig12_maps_are_those_of_the_exported_adapter_on_the_rebuilt_model(vit_runs):
    records = fig12.finished(vit_runs / "runs", ["table4"])
    lora = fig12.chosen(fig12.candidates(records, "lora"))
    model, task = fig12.rebuild(lora)
    images = fig12.pixels(task, fig12.image_paths(task, None))
    maps = fig12.inspect(model, images)
    assert maps["attention"].shape == (4, 2, 4, 4) and maps["features"].shape == (4, 2, 17, 32)
    fig12.IMAGE_LIST = ("images/3.png",)  # the monkeypatched settings are restored after the test
    assert [p.name for p in fig12.image_paths(task, None)] == ["3.png"]
    torch.testing.assert_close(torch.tensor(maps["attention"]).sum((-1, -2)) > 0, torch.ones(4, 2, dtype=bool))
    with torch.no_grad():  # the recorded forward is the model's own: same logits with the hooks as without
        plain = model(images)
        with fig12.recorded(model):
            hooked = model(images)
    torch.testing.assert_close(plain, hooked)
    accuracy = {r["config"]["method"]["s"]: r["metrics"]["final"]["test/accuracy"]
                for r in fig12.candidates(records, "lily")}
    assert fig12.chosen(fig12.candidates(records, "lily"))["config"]["method"]["s"] == max(accuracy, key=accuracy.get)


def test_fig12_takes_its_images_from_a_folder_given_on_the_command_line(vit_runs, capsys):
    folder = vit_runs / "mine"
    folder.mkdir()
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (20, 30), (200, 10, 10)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    assert figures_main(["fig12", "--results", str(vit_runs / "runs"), "--out", str(vit_runs / "out"),
                         "--images", str(folder)]) == 0
    assert "rendered" in capsys.readouterr().out
    rows = list(csv.DictReader((vit_runs / "out" / "fig12.csv").open()))
    assert sorted({r["image"] for r in rows}) == ["a.jpg", "b.png"]


def test_figs_3_4_and_6_render_from_real_captured_runs_of_another_group(tmp_path):
    """Lily and LoRA runs with the capture callbacks (what figures-cpu runs, in miniature), rendered with
    --group: the figures read the artifacts the captures wrote."""
    lily = vit_cell(tmp_path, "lily", "group=figtest", "method.ne_1=2", "method.ne_2=3", "trainer.max_steps=4",
                    CAPTURES)
    vit_cell(tmp_path, "lora", "group=figtest", "method.r=2", "trainer.max_steps=4", CAPTURES)
    results, out = tmp_path / "runs", tmp_path / "figures"
    for module in (fig3, fig4, fig6):
        rendered = module.render(results, out, "figtest")
        assert any(p.name == f"{module.__name__.rsplit('.', 1)[-1]}_figtest.png" for p in rendered.files)
    ranks = list(csv.DictReader((out / "fig3_figtest.csv").open()))
    captured = json.loads(beside(lily, "delta_w.json").read_text())["layers"]
    assert {(r["method"], r["layer"]) for r in ranks} == {(m, layer) for m in ("Lily", "LoRA") for layer in ("0", "1")}
    assert [int(r["rank_accumulated"]) for r in ranks if r["method"] == "Lily"] == \
        [layer["accumulated"]["rank"] for layer in captured]
    assert {r["rank_final"] for r in ranks if r["method"] == "LoRA"} == {"2"}  # a rank-2 LoRA's last update
    shares = list(csv.DictReader((out / "fig4_figtest.csv").open()))
    assert len(shares) == 4 * 3 and {r["expert"] for r in shares} == {"B1", "B2", "B3"}
    timing = {r["method"]: r for r in csv.DictReader((out / "fig6_figtest.csv").open())}
    assert set(timing) == {"Lily", "LoRA"} and float(timing["Lily"]["step_s"]) > 0
    assert timing["Lily"]["peak_mem_kind"] in ("cpu_peak_rss", "cpu_lifetime_max_rss", "cuda_max_allocated")
