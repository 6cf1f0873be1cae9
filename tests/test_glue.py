"""GLUE: the TSV quirks, hub-format and TSV-format inputs agreeing, metrics against scikit-learn/SciPy, the
real GLUE files in shared/, and 2-step runs for single-sentence, pair (string labels) and regression tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lilyexp.errors import ConfigError
from lilyexp.run import execute
from lilyexp.tasks.glue import SUBSETS, GlueTask, from_hub_rows, read_tsv

from conftest import compose_run



def write(path: Path, text: str, encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)


@pytest.fixture
def glue_dir(tmp_path) -> Path:
    """Tiny GLUE folders with every quirk of the real files."""
    root = tmp_path / "glue_data"
    cola = "".join(f"gj04\t{i % 2}\t{'*' if i % 2 == 0 else ''}\tThe cat {'sat' if i % 2 else 'sat sat'} {i}.\n"
                   for i in range(12))
    write(root / "CoLA" / "train.tsv", cola)
    write(root / "CoLA" / "dev.tsv", cola.rstrip("\n"))  # no trailing newline, no header
    sst = "sentence\tlabel\n" + "".join(f"a {'good' if i % 2 else 'bad'} film {i} \t{i % 2}\n" for i in range(12))
    write(root / "SST-2" / "train.tsv", sst)
    write(root / "SST-2" / "dev.tsv", sst)
    mrpc = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
        f"{i % 2}\t{i}\t{i + 100}\tHe said \"hi {i}\tHe said hello {i}\n" for i in range(12))
    write(root / "MRPC" / "train.tsv", mrpc, encoding="utf-8-sig")  # BOM
    write(root / "MRPC" / "dev.tsv", mrpc, encoding="utf-8-sig")
    stsb = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n" + "".join(
        f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\tA man plays {i}.\tA man is playing {i}.\t{(i % 6) * 0.8:.3f}\n"
        for i in range(12))
    write(root / "STS-B" / "train.tsv", stsb)
    write(root / "STS-B" / "dev.tsv", stsb)
    rte = "index\tsentence1\tsentence2\tlabel\n" + "".join(
        f"{i}\t\"Quoted premise {i}\tHypothesis {i}\t{'entailment' if i % 2 else 'not_entailment'}\n"
        for i in range(12))
    write(root / "RTE" / "train.tsv", rte)
    write(root / "RTE" / "dev.tsv", rte)
    return root


def test_tsv_quirks_are_read(glue_dir):
    cola = read_tsv(glue_dir / "CoLA" / "dev.tsv", SUBSETS["cola"])
    assert len(cola) == 12 and cola[0] == {"text_a": "The cat sat sat 0.", "text_b": None, "label": 0}
    mrpc = read_tsv(glue_dir / "MRPC" / "train.tsv", SUBSETS["mrpc"])
    assert mrpc[1] == {"text_a": 'He said "hi 1', "text_b": "He said hello 1", "label": 1}
    stsb = read_tsv(glue_dir / "STS-B" / "train.tsv", SUBSETS["stsb"])
    assert stsb[2]["label"] == pytest.approx(1.6) and stsb[2]["text_b"] == "A man is playing 2."
    rte = read_tsv(glue_dir / "RTE" / "train.tsv", SUBSETS["rte"])
    assert [r["label"] for r in rte[:2]] == [1, 0] and rte[0]["text_a"].startswith('"Quoted')
    assert read_tsv(glue_dir / "SST-2" / "dev.tsv", SUBSETS["sst2"])[1]["text_a"] == "a good film 1 "


def test_hub_and_tsv_formats_agree(glue_dir):
    hub_rte = [{"sentence1": f'"Quoted premise {i}', "sentence2": f"Hypothesis {i}", "label": 0 if i % 2 else 1,
                "idx": i} for i in range(12)]
    assert from_hub_rows(hub_rte, SUBSETS["rte"]) == read_tsv(glue_dir / "RTE" / "train.tsv", SUBSETS["rte"])
    hub_stsb = [{"sentence1": f"A man plays {i}.", "sentence2": f"A man is playing {i}.", "label": (i % 6) * 0.8,
                 "idx": i} for i in range(12)]
    tsv = read_tsv(glue_dir / "STS-B" / "train.tsv", SUBSETS["stsb"])
    hub = from_hub_rows(hub_stsb, SUBSETS["stsb"])
    assert [r["text_a"] for r in hub] == [r["text_a"] for r in tsv]
    assert np.allclose([r["label"] for r in hub], [r["label"] for r in tsv], atol=1e-3)


def test_real_glue_files_in_shared_load_with_their_documented_sizes(shared_data):
    SHARED_GLUE = shared_data / "glue"
    sizes = {"cola": (8551, 1043), "mrpc": (3668, 408), "stsb": (5749, 1500), "sst2": (67349, 872)}
    for name, (train, dev) in sizes.items():
        task = GlueTask(name, data_dir=str(SHARED_GLUE))
        assert (len(task.train), len(task.validation)) == (train, dev), name
    mrpc = GlueTask("mrpc", data_dir=str(SHARED_GLUE))
    assert sum(r["label"] for r in mrpc.train) == 2474
    qnli = read_tsv(SHARED_GLUE / "QNLI" / "dev.tsv", SUBSETS["qnli"])
    assert len(qnli) == 5463 and sum(r["label"] == 0 for r in qnli) == 2702


@pytest.mark.parametrize("name", ["cola", "sst2", "mrpc", "stsb", "rte", "qqp", "mnli"])
def test_metrics_match_sklearn_and_scipy(name, glue_dir):
    rng = np.random.default_rng(0)
    task = GlueTask.__new__(GlueTask)
    task.name, task.subset = name, SUBSETS[name]
    if name == "stsb":
        refs, preds = rng.uniform(0, 5, 50), rng.uniform(0, 5, 50)
        scores = task.score("val", preds.tolist(), refs.tolist())
        assert scores["val/pearson"] == pytest.approx(pearsonr(preds, refs)[0], abs=1e-5)
        assert scores["val/spearmanr"] == pytest.approx(spearmanr(preds, refs)[0], abs=1e-5)
        return
    classes = SUBSETS[name].num_labels
    refs, preds = rng.integers(0, classes, 60), rng.integers(0, classes, 60)
    scores = task.score("val", preds.tolist(), refs.tolist())
    if name == "cola":
        assert scores == {"val/matthews_correlation": pytest.approx(matthews_corrcoef(refs, preds))}
        return
    assert scores["val/accuracy"] == pytest.approx(accuracy_score(refs, preds))
    if name in ("mrpc", "qqp"):
        assert scores["val/f1"] == pytest.approx(f1_score(refs, preds))


def test_missing_or_bad_glue_input_is_a_clear_error(glue_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown GLUE task"):
        GlueTask("boolq", data_dir=str(glue_dir))
    with pytest.raises(ConfigError, match="GLUE file missing"):
        GlueTask("qnli", data_dir=str(glue_dir))
    with pytest.raises(ConfigError, match="does not exist"):
        GlueTask("cola", data_dir=str(tmp_path / "nowhere"))
    write(tmp_path / "bad" / "STS-B" / "train.tsv", "header\nonly one column\n")
    write(tmp_path / "bad" / "STS-B" / "dev.tsv", "header\n")
    with pytest.raises(ConfigError, match="line 2 does not fit the STS-B GLUE layout"):
        GlueTask("stsb", data_dir=str(tmp_path / "bad"))


@pytest.mark.slow
@pytest.mark.parametrize("name,metric", [("cola", "matthews_correlation"), ("rte", "accuracy"), ("stsb", "pearson")])
def test_two_epoch_runs_keep_best_and_last(name, metric, glue_dir, tmp_path):
    cfg = compose_run(["backbone=tiny_roberta", "task=glue", f"task.subset={name}", f"task.data_dir={glue_dir}",
                       "task.max_length=64", "trainer.epochs=2", "trainer.batch_size=6", "trainer.lr=5e-3",
                       "trainer.head_lr=1e-2", "trainer.warmup_ratio=0.06", "method=lora", "method.r=4"], tmp_path)
    record = json.loads(execute(cfg).read_text())
    metrics = record["metrics"]
    assert [h["step"] for h in metrics["history"]] == [2, 4]  # one validation per epoch
    values = [h[f"val/{metric}"] for h in metrics["history"]]
    assert metrics["final"][f"val/{metric}"] == max(v for v in values if v == v)
    assert metrics["last"][f"val/{metric}"] == values[-1] or values[-1] != values[-1]
    assert record["params"]["head"] > 0 and record["params"]["adapter"] > 0
    assert record["params"]["trainable"] == record["params"]["head"] + record["params"]["adapter"]


@pytest.mark.slow
def test_table3_cell_runs_on_a_tiny_backbone_from_the_command_line(tmp_path, shared_data):
    """The experiment's sweep (roberta, roberta_large) yields to a backbone given on the command line."""
    from conftest import run_cli
    result = run_cli(["-m", "experiment=table3/lily", "task.subset=mrpc", "backbone=tiny_roberta",
                      f"task.data_dir={shared_data / 'glue'}",
                      "task.train_limit=24", "task.eval_limit=16", "task.max_length=64", "trainer.epochs=1",
                      "method.ne_1=2", "method.ne_2=2", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = list((tmp_path / "results" / "table3").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["config"]["trainer"]["batch_size"] == 50 and record["config"]["method"]["s"] == 0.1


def test_train_limit_is_a_fixed_random_subsample(shared_data):
    SHARED_GLUE = shared_data / "glue"
    first = GlueTask("mrpc", data_dir=str(SHARED_GLUE), train_limit=100)
    again = GlueTask("mrpc", data_dir=str(SHARED_GLUE), train_limit=100)
    full = GlueTask("mrpc", data_dir=str(SHARED_GLUE))
    assert first.train == again.train and len(first.train) == 100 and first.train != full.train[:100]
    assert all(example in full.train for example in first.train)
    assert GlueTask("mrpc", data_dir=str(SHARED_GLUE), train_limit=100, subsample_seed=1).train != first.train
