"""Benchmarks that cannot rot: each script's --smoke size runs end to end here (tiny shapes, a few questions or
images, one round) on the project's real task and method objects, writes its JSON to the folder given, and
leaves the committed figures under results/bench untouched."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted((REPO / "results/bench").glob("*"))}


@pytest.fixture
def unchanged_results():
    before = committed()
    yield
    assert committed() == before, "a smoke run rewrote the committed benchmark figures"


@pytest.mark.slow
def test_bench_smoke_writes_ratios_to_its_folder(tmp_path, unchanged_results):
    path = script("bench").main(["--smoke", "--out", str(tmp_path)])
    report = json.loads(path.read_text())
    assert path.parent == tmp_path and \
        {row["method"] for row in report["rows"]} >= {"peft lora", "peft lily (upstream)"}
    assert all(row["ratio_to_lora"] > 0 for row in report["rows"]) and report["eq3_vs_naive"]["speedup"] > 0


@pytest.mark.slow
def test_bench_data_smoke_and_a_size_too_small_for_one_batch(tmp_path, unchanged_results, capsys):
    module = script("bench_data")
    report = json.loads(module.main(["--smoke", "--out", str(tmp_path)]).read_text())
    assert report["images"] == module.BATCH and report["rows"]["cached_epoch"]["images_per_s"] > 0
    with pytest.raises(SystemExit):
        module.main(["--images", "32", "--out", str(tmp_path)])
    assert "fewer than one training batch" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_eval_smoke_reproduces_batch_1_with_the_real_task_and_method(tmp_path, shared_data, unchanged_results,
                                                                        monkeypatch):
    monkeypatch.setenv("LILYEXP_SHARED", str(shared_data.parent))
    path = script("bench_eval").main(["--smoke", "--out", str(tmp_path)])
    report = json.loads(path.read_text())
    modes = report["modes"]
    assert set(modes) == {"batch1", "batch1_once", "sample_b4", "official_b4"}
    for name in ("batch1_once", "sample_b4"):  # lilyexp's evaluation: the official answers, prefilled once
        assert modes[name]["vs_batch1"]["identical_pct"] == 100.0 and modes[name]["prefill"] == "once per prompt"
    assert modes["batch1"]["prefill"] == "every beam" and report["load_before"] >= 0
    work = {name: mode["decode_work"] for name, mode in modes.items()}
    assert work["batch1"]["rows"] == 4 * work["batch1"]["calls"] > 0  # one prompt's four beams per decode call
    # a batch decodes its prompts' beams until the last one's search ends: at least the rows batch 1 needs
    assert work["sample_b4"]["rows"] >= work["batch1"]["rows"] and work["sample_b4"]["rows"] % 4 == 0
    assert (tmp_path / "cache").is_dir()  # the trained adapter is cached in the smoke folder, not checkpoints/
    again = json.loads(script("bench_eval").main(["--smoke", "--out", str(tmp_path)]).read_text())["modes"]
    assert again["sample_b4"]["vs_batch1"]["identical_pct"] == 100.0  # the cached adapter routes per sample too


@pytest.mark.slow
def test_the_independent_stsb_check_trains_plain_peft_on_the_study_examples(shared_data):
    """scripts/check_stsb_plain.py (the README's independent check of the STS-B verdict), on 64 examples."""
    result = script("check_stsb_plain").main(["--train-limit", "64", "--eval-limit", "64",
                                              "--data-dir", str(shared_data / "glue")])
    assert result["steps"] == 4 and result["trainable"] == 74_113  # LoRA r 8 on query and value plus the head
    assert -1 <= result["val_pearson"] <= 1 and -1 <= result["dev_pearson"] <= 1
