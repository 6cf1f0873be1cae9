"""lilyexp.study: the held-out split never leaks the reported split, selection by the best validation mean,
intervals against hand computations and scipy, the verdict rule, resume of a half-finished study, and a tiny
end-to-end study (tiny_roberta on real GLUE files)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from lilyexp.errors import ConfigError, RunInterrupted
from lilyexp.study import __main__ as study_cli
from lilyexp.study.analyse import Seeds, analyse, compare, select
from lilyexp.study.plan import Cell, confirm_cells, grid_points, tune_cells
from lilyexp.study.run_cells import CellIndex, CellState, run_cell
from lilyexp.study.render import markdown
from lilyexp.study.settings import SecondaryPool, StudyMethod, StudySettings, StudyTask, check_study, load_study
from lilyexp.study.stats import bootstrap_interval, estimate, paired_differences, t_interval, verdict
from lilyexp.tasks.glue import GlueTask, carve_validation
from lilyexp.records import beside

TINY = Path(__file__).with_name("data") / "tiny_study.yaml"


# ------------------------------------------------------------------------------------------------ the split

def test_carving_is_disjoint_seeded_by_its_own_seed_and_capped():
    examples = list(range(1000))
    train, held = carve_validation(examples, 0.1, None, seed=3)
    assert len(held) == 100 and not set(train) & set(held) and sorted(train + held) == examples
    assert carve_validation(examples, 0.1, None, seed=3) == (train, held)
    assert carve_validation(examples, 0.1, None, seed=4)[1] != held
    assert len(carve_validation(examples, 0.1, 40, seed=3)[1]) == 40


def test_held_out_split_never_leaks_the_reported_split(shared_data):
    plain = GlueTask("mrpc", data_dir=str(shared_data / "glue"))
    carved = GlueTask("mrpc", data_dir=str(shared_data / "glue"), val_fraction=0.1, val_max=200, train_limit=500)
    key = lambda e: (e["text_a"], e["text_b"], e["label"])  # noqa: E731
    train, held, dev = map(lambda split: {key(e) for e in split}, (carved.train, carved.validation, carved.final))
    assert carved.final == plain.validation  # the reported split is GLUE dev, whole
    assert len(carved.validation) == 200 and len(carved.train) == 500
    assert not train & held  # selection examples are never trained on
    assert {key(e) for e in plain.train} >= train | held  # both come from the training file
    assert carved.selection_rule == "val_selected" and plain.selection_rule == "best_epoch"
    # the same held-out split and subsample for every run, whatever the training seed
    again = GlueTask("mrpc", data_dir=str(shared_data / "glue"), val_fraction=0.1, val_max=200, train_limit=500)
    assert again.validation == carved.validation and again.train == carved.train


def test_bad_held_out_fraction_is_refused():
    with pytest.raises(ConfigError, match="val_fraction"):
        GlueTask("mrpc", data_dir="/nonexistent", val_fraction=1.5)


# ------------------------------------------------------------------------------------------------ selection

class FakeIndex:
    """Cell states from a table (what the records would say)."""

    def __init__(self, states: dict[Cell, CellState]):
        self.states = states

    def state(self, cell: Cell) -> CellState:
        return self.states.get(cell, CellState("missing", None, Path("/nonexistent")))


def finished(value: float, key: str = "val/accuracy") -> CellState:
    return CellState("finished", {"metrics": {"final": {key: value}}, "timing": {"wall_s": 1.0}}, Path("r.json"))


def small_study(mode: str = "max") -> StudySettings:
    return StudySettings(
        name="s", group="s", tune_seeds=[0, 1], confirm_seeds=[2, 3], reference="a",
        tasks={"t": StudyTask(tune_metric="val/accuracy", tune_mode=mode, report={"T": "test/accuracy"})},
        methods={"a": StudyMethod(grid={"trainer.lr": [1, 2, 3]}), "b": StudyMethod(grid={"trainer.lr": [1, 2]})})


def tune_table(study: StudySettings, values: dict[tuple[str, str, int], object]) -> FakeIndex:
    states = {}
    for cell in tune_cells(study, "t"):
        value = values.get((cell.method, dict(cell.point)["trainer.lr"], cell.seed))
        if value == "diverged":
            states[cell] = CellState("diverged", {"status": "failed"}, Path("r.json"))
        elif value is not None:
            states[cell] = finished(value)
    return FakeIndex(states)


def test_selection_picks_the_best_validation_mean_and_states_ties_and_divergence():
    study = small_study()
    values = {("a", "1", 0): 0.5, ("a", "1", 1): 0.9,   # mean 0.70
              ("a", "2", 0): 0.8, ("a", "2", 1): 0.7,   # mean 0.75: best, though not the best single seed
              ("a", "3", 0): "diverged", ("a", "3", 1): 0.99,
              ("b", "1", 0): 0.6, ("b", "1", 1): 0.6, ("b", "2", 0): 0.6, ("b", "2", 1): 0.6}  # a tie
    chosen = select(study, "t", tune_table(study, values))
    assert dict(chosen["a"].chosen) == {"trainer.lr": "2"}
    assert chosen["a"].points[2]["mean"] == -math.inf  # a diverged run makes its point the worst
    assert dict(chosen["b"].chosen) == {"trainer.lr": "1"}  # ties go to the point listed first


def test_selection_minimises_a_loss_and_waits_for_every_tune_cell():
    study = small_study(mode="min")
    values = {(m, str(lr), s): float(lr) for m in "ab" for lr in (1, 2, 3) for s in (0, 1)}
    assert dict(select(study, "t", tune_table(study, values))["a"].chosen) == {"trainer.lr": "1"}
    del values[("b", "2", 1)]
    pending = select(study, "t", tune_table(study, values))
    assert pending["b"].chosen is None and pending["a"].chosen is not None


def test_a_metric_that_is_not_a_number_is_the_worst_and_a_missing_key_is_refused():
    study = small_study()
    values = {(m, str(lr), s): 0.5 for m in "ab" for lr in (1, 2, 3) for s in (0, 1)}
    values[("a", "1", 0)] = float("nan")  # e.g. STS-B's Pearson of constant predictions
    values[("a", "2", 1)] = 0.9
    chosen = select(study, "t", tune_table(study, values))
    assert chosen["a"].points[0]["mean"] == -math.inf and dict(chosen["a"].chosen) == {"trainer.lr": "2"}
    states = tune_table(study, values).states
    first = next(iter(states))
    states[first] = CellState("finished", {"status": "finished", "run_name": "x", "metrics": {"final": {"v": 1}}},
                              Path("r.json"))
    with pytest.raises(ConfigError, match="reports no 'val/accuracy' \\(it has v\\)"):
        select(study, "t", FakeIndex(states))


def test_no_point_is_chosen_when_every_point_diverged_and_an_edge_choice_is_flagged():
    study = small_study()
    values = {(m, str(lr), s): "diverged" for m in "ab" for lr in (1, 2, 3) for s in (0, 1)}
    values.update({("b", "2", 0): 0.7, ("b", "2", 1): 0.7})
    chosen = select(study, "t", tune_table(study, values))
    assert chosen["a"].chosen is None and chosen["a"].all_diverged
    assert dict(chosen["b"].chosen) == {"trainer.lr": "2"} and chosen["b"].at_edge  # b's grid is [1, 2]


def test_a_seed_that_ended_without_a_number_withholds_the_verdict():
    study = small_study()
    seeds = {"a": Seeds({2: 50.0, 3: 52.0}), "b": Seeds({2: 60.0}, lost=[3])}
    entry = compare(study, seeds)["b"]["difference"]
    assert entry["verdict"].startswith("no verdict: seeds [3]")  # b diverged on seed 3: not judged on seed 2 alone
    pending = compare(study, {"a": Seeds({2: 50.0, 3: 52.0}), "b": Seeds({2: 60.0})})["b"]["difference"]
    assert pending["verdict"] == "pending (1 of 2 seeds)"
    done = compare(study, {"a": Seeds({2: 50.0, 3: 52.0}), "b": Seeds({2: 60.0, 3: 63.0})})["b"]["difference"]
    assert done["verdict"] == "better" or done["verdict"].startswith("no detectable")


def test_overlapping_tune_and_confirm_seeds_are_refused(tmp_path):
    path = tmp_path / "overlap.yaml"
    path.write_text(TINY.read_text().replace("confirm_seeds: [1, 2]", "confirm_seeds: [0, 1]"))
    with pytest.raises(ConfigError, match="confirm seeds must differ from its tune seeds"):
        load_study(str(path))


def test_confirm_cells_use_the_chosen_point_and_the_confirm_seeds():
    study = small_study()
    cells = confirm_cells(study, "t", {"a": grid_points(study, "a")[1]})
    assert [(c.method, dict(c.point), c.seed) for c in cells] == [("a", {"trainer.lr": "2"}, 2),
                                                                 ("a", {"trainer.lr": "2"}, 3)]
    assert "trainer.lr=2" in cells[0].overrides(study) and "seed=2" in cells[0].overrides(study)


def test_confirm_cells_run_seed_by_seed_so_a_stopped_study_has_complete_pairs():
    study = small_study()
    cells = confirm_cells(study, "t", {"a": grid_points(study, "a")[0], "b": grid_points(study, "b")[1]})
    assert [(c.seed, c.method) for c in cells] == [(2, "a"), (2, "b"), (3, "a"), (3, "b")]


def two_task_study(**secondary) -> StudySettings:
    task = {"tune_metric": "val/accuracy", "report": {}}
    return StudySettings(
        name="s", group="s", tune_seeds=[0], confirm_seeds=[1, 2, 3], reference="a",
        tasks={"t": StudyTask(**{**task, "report": {"T": "test/accuracy"}}),
               "u": StudyTask(**{**task, "report": {"U": "test/accuracy"}})},
        methods={"a": StudyMethod(grid={"trainer.lr": [1]}), "b": StudyMethod(grid={"trainer.lr": [1]})},
        pools={"both": ["T", "U"]}, secondary_pools=secondary)


def test_a_secondary_pool_is_reported_beside_the_verdicts_and_never_as_one():
    study = two_task_study(**{"only T": SecondaryPool(endpoints=["T"], why="a sensitivity check")})
    values = {("t", "a"): [0.50, 0.51, 0.52], ("t", "b"): [0.55, 0.57, 0.56],
              ("u", "a"): [0.60, 0.61, 0.62], ("u", "b"): [0.50, 0.52, 0.51]}
    states = {cell: finished(values[cell.task, cell.method][cell.seed - 1], "test/accuracy")
              for task in study.tasks
              for cell in confirm_cells(study, task, {m: grid_points(study, m)[0] for m in study.methods})}
    result = analyse(study, FakeIndex(states))
    secondary = result["secondary_pools"]["only T"]
    assert secondary["methods"]["b"]["estimate"]["mean"] == pytest.approx(5.0)  # T alone: b is 5 points up
    assert result["pools"]["both"]["b"]["estimate"]["mean"] == pytest.approx(-2.5)  # T and U: 2.5 points down
    text = markdown(study, result, [])
    verdicts, rest = text.split("Not verdicts:")
    assert "**b vs a, both**: -2.50" in verdicts and "only T" not in verdicts
    assert "*only T* (a sensitivity check):" in rest.split("## Protocol")[0]


def test_answer_concentration_reads_each_seeds_predictions_and_renders_beside_the_gold_share(tmp_path):
    study = two_task_study()
    answers = ["yes", "yes", "yes", "no"]
    predictions = {("a", 1): ["yes"] * 4, ("a", 2): ["yes", "yes", "yes", "no"], ("b", 1): ["", "yes", "", ""],
                   ("b", 2): ["no", "no", "yes", "no"]}
    states = {}
    for cell in confirm_cells(study, "t", {m: grid_points(study, m)[0] for m in study.methods}):
        path = tmp_path / f"{cell.method}-{cell.seed}.json"
        if (cell.method, cell.seed) in predictions:
            rows = [{"eval_set": "qa", "prediction": p, "answer": g}
                    for p, g in zip(predictions[cell.method, cell.seed], answers)]
            beside(path, "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        states[cell] = CellState("finished", {"metrics": {"final": {"test/accuracy": 0.5}}}, path)
    result = analyse(study, FakeIndex(states))
    qa = result["answer_concentration"]["qa"]
    assert (qa["questions"], qa["gold_answer"], qa["gold_share"]) == (4, "yes", 0.75)
    assert qa["methods"]["a"] == {"answers": {"yes": 2}, "share": pytest.approx((1.0 + 0.75) / 2), "n": 2}
    # seed 1 of b: nothing the official extraction accepts; seed 2: "no". Each seed's top answer is named, not
    # one label with the other seed's share beside it.
    assert qa["methods"]["b"] == {"answers": {"": 1, "no": 1}, "share": 0.75, "n": 2}
    table = markdown(study, result, []).split("## Answer concentration")[1].split("## Selection")[0]
    assert "| qa (4) | yes (75%) | yes (87.5%, n=2) | (none extracted) at 1 seed, no at 1 (75.0%, n=2) |" in table
    assert "## Answer concentration" not in markdown(study, analyse(study, FakeIndex({})), [])


def test_a_secondary_pool_without_its_reason_or_with_an_unknown_endpoint_is_refused():
    with pytest.raises(ConfigError, match="secondary pool only T needs endpoints and a why"):
        check_study(two_task_study(**{"only T": SecondaryPool(endpoints=["T"])}), Path("s.yaml"))
    with pytest.raises(ConfigError, match=r"pool V names unknown endpoints \['V'\]"):
        check_study(two_task_study(V=SecondaryPool(endpoints=["V"], why="x")), Path("s.yaml"))


# ------------------------------------------------------------------------------------------------ intervals

def test_t_interval_matches_a_hand_computation_and_scipy():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    low, high = t_interval(values)
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975, 4} · sd / √n
    assert (low, high) == pytest.approx((3 - half, 3 + half))
    expected = scipy_stats.t.interval(0.95, 4, loc=3, scale=scipy_stats.sem(values))
    assert (low, high) == pytest.approx(expected)
    assert t_interval([1.0]) == (-math.inf, math.inf)


def test_bootstrap_interval_against_scipy_percentile_bootstrap():
    values = [0.61, 0.64, 0.58, 0.66, 0.63, 0.60, 0.65]
    low, high = bootstrap_interval(values)
    reference = scipy_stats.bootstrap((values,), lambda x, axis: x.mean(axis=axis), method="percentile",
                                      n_resamples=20_000, random_state=1).confidence_interval
    assert low == pytest.approx(reference.low, abs=0.003) and high == pytest.approx(reference.high, abs=0.003)
    assert bootstrap_interval(values) == (low, high)  # a fixed generator: the same report every time


def test_paired_differences_and_the_verdict_rule():
    diffs = paired_differences({1: 5.0, 2: 6.0, 3: 7.0, 4: 9.0}, {1: 1.0, 2: 2.0, 3: 3.0, 5: 0.0})
    assert diffs == {1: 4.0, 2: 4.0, 3: 4.0}  # only seeds both have
    assert verdict(estimate([1.0, 2.0, 1.5, 1.2])) == "better"
    assert verdict(estimate([-1.0, -2.0, -1.5])) == "worse"
    unsure = estimate([1.0, -1.0, 0.5, -0.2])
    assert verdict(unsure) == f"no detectable difference (±{unsure.halfwidth:.2f})"
    assert verdict(estimate([3.0])) == "not enough seeds"


# ------------------------------------------------------------------------------------------------ configs

def test_the_committed_studies_load_and_plan_their_cells():
    study = load_study("glue_minilm")
    assert set(study.methods) == {"lily", "lora", "pissa", "milora"} and len(study.confirm_seeds) >= 5
    for name, method in study.methods.items():
        rates = [float(v) for v in method.grid["trainer.lr"]]
        assert len(rates) >= 4 and max(rates) / min(rates) >= 10, name
    assert len(tune_cells(study, "cola")) == 16
    assert not set(study.tune_seeds) & set(study.confirm_seeds)  # confirm runs are fresh seeds


def test_a_bad_study_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ngroup: g\nreference: nope\nmethods: {a: {grid: {trainer.lr: [1]}}}\n")
    with pytest.raises(ConfigError, match="reference 'nope'"):
        load_study(str(path))
    with pytest.raises(ConfigError, match="no study 'nosuch'"):
        load_study("nosuch")


# ------------------------------------------------------------------------------------------------ end to end

def study_args(shared_data: Path, tmp_path: Path) -> list[str]:
    return [str(TINY), f"task.data_dir={shared_data / 'glue'}", f"paths.results_dir={tmp_path}/runs",
            f"paths.checkpoint_dir={tmp_path}/checkpoints", "--out", str(tmp_path / "studies")]


@pytest.mark.slow
def test_a_tiny_study_end_to_end_and_its_resume(shared_data, tmp_path, monkeypatch, one_torch_thread):
    ran: list[Cell] = []
    real_run_cell = study_cli.run_cell

    def interrupt_after_five(index, cell):
        if len(ran) == 5:
            raise RunInterrupted("SIGTERM", 0)
        ran.append(cell)
        real_run_cell(index, cell)

    monkeypatch.setattr(study_cli, "run_cell", interrupt_after_five)
    assert study_cli.main(study_args(shared_data, tmp_path)) == 143  # stopped half-way, with the hint
    assert len(list((tmp_path / "runs" / "tiny_study").glob("*-seed*.json"))) == 5

    ran.clear()
    monkeypatch.setattr(study_cli, "run_cell", lambda index, cell: (ran.append(cell), real_run_cell(index, cell)))
    assert study_cli.main(study_args(shared_data, tmp_path)) == 0
    assert len(ran) == 16 - 5  # the same command ran only what was missing
    result = json.loads((tmp_path / "studies" / "tiny_study.json").read_text())
    assert result["cells"] == {"planned": 16, "finished": 16}
    pooled = result["pools"]["both"]["lily"]
    assert pooled["estimate"]["n"] == 2 and "verdict" in pooled
    for task in ("mrpc", "stsb"):
        assert all(sel["chosen"] for sel in result["selection"][task].values())
    for suffix in ("md", "csv", "selection.json", "json"):
        assert (tmp_path / "studies" / f"tiny_study.{suffix}").stat().st_size > 0
    for figure in ("sensitivity", "forest"):
        assert (tmp_path / "studies" / f"tiny_study_{figure}.png").stat().st_size > 5000
    text = (tmp_path / "studies" / "tiny_study.md").read_text()
    assert "## Verdicts" in text and "Lily vs LoRA, both" in text

    ran.clear()
    assert study_cli.main([*study_args(shared_data, tmp_path), "--report"]) == 0 and not ran

    # A change to GLUE's scoring outdates every cell: the study runs them again, and a rerun refused for a reason
    # of its own (here: the data folder is gone) is a failed cell, not a reason to stop the study.
    monkeypatch.setattr(GlueTask, "scoring_version", 2)
    index = CellIndex(load_study(str(TINY)), tuple(study_args(shared_data, tmp_path)[1:-2]))
    cell = tune_cells(index.study, next(iter(index.study.tasks)))[0]
    assert index.state(cell).status == "outdated"
    monkeypatch.setattr("lilyexp.run.execute", lambda *a, **k: (_ for _ in ()).throw(ConfigError("data gone")))
    run_cell(index, cell)  # logged, not raised
    assert index.state(cell).status == "outdated"


@pytest.mark.slow
def test_a_sweep_printed_by_the_study_runs_the_study_cells(shared_data, tmp_path, capsys):
    """--sweeps prints Hydra multiruns (any launcher); the cells they run are the study's own cells."""
    import shlex
    import subprocess
    import sys

    from conftest import REPO

    args = study_args(shared_data, tmp_path)[:-2]
    assert study_cli.main([*args, "--sweeps"]) == 0
    sweeps = capsys.readouterr().out.strip().splitlines()
    assert len(sweeps) == 4 and all(" -m " in line and "trainer.lr=0.001,0.01" in line for line in sweeps)
    words = shlex.split(sweeps[0])[1:] + [f"hydra.sweep.dir={tmp_path}/sweep"]
    result = subprocess.run([sys.executable, *words], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert study_cli.main([*args, "--commands"]) == 0
    remaining = capsys.readouterr().out.strip().splitlines()
    swept = [line for line in remaining if "subset=mrpc" in line and "method=lora" in line and "seed=0" in line]
    assert not swept  # the sweep's two cells are found as the study's tune cells ...
    confirm = [line for line in remaining if "subset=mrpc" in line and "method=lora" in line]
    assert len(confirm) == 2  # ... so LoRA's point on MRPC is chosen and its confirm cells are due


def test_the_forest_plot_marks_an_interval_over_fewer_than_all_seeds_as_interim():
    """Read from the committed report, whose MRPC Lily comparison had four of five confirm seeds."""
    from conftest import REPO
    from lilyexp.study.render import is_interim
    result = json.loads((REPO / "results" / "studies" / "glue_minilm.json").read_text())
    mrpc = result["endpoints"]["MRPC (accuracy)"]["methods"]
    assert not is_interim(mrpc["pissa"]["difference"])
    assert is_interim({**mrpc["pissa"]["difference"], "verdict": "pending (4 of 5 seeds)"})
