"""`make bench-eval`: does lilyexp's evaluation (batched, per-sample Lily routing, each prompt prefilled once)
reproduce the official batch-1 commonsense evaluation, and how much faster is it? (A benchmark, not a test.)

The official evaluation (``commonsense-reasoning/evaluate_llama.py``) generates one prompt at a time with 4-beam
search, 32 new tokens, a KV cache and only input_ids; Lily's official router pools over each forward call, so
that is what the answers are defined by. This script builds the backbone, task and method from the
config tree as the runner does (``backbone=smollm2 task=commonsense method=lily``: r 16, 4 A's, 4 B's on q,k,v),
trains the adapter for a few AdamW steps on the real BoolQ and ARC-Easy train files (the task's own tokenisation,
loss on the answer; exported and cached under checkpoints/bench_eval/ so reruns skip it), then answers a fixed
subsample of the real test files with the official prompt and answer extraction. ``--smoke`` runs the same code on
tiny_llama with a few questions in seconds, writing to a temporary folder (the test suite runs it).

The B experts start random (``zero_init_B: false``, as the official SDXL code). From zero (the official LLM
init) all experts get gradients proportional to one another, which Adam's per-coordinate normalisation turns into
near-identical updates: after a few dozen steps they are near copies (``expert_spread`` in the report), routing
hardly moves the outputs, and no evaluation mode could be told apart (``--zero-init-B`` reproduces that case,
written to eval_zero_init_B.*). Modes:

* ``batch1``: the official loop: one prompt per call, ``generate`` as transformers runs it (every beam prefilled),
  official routing (the reference);
* ``batch1_once``: lilyexp's ``generate`` at one prompt per call (each prompt prefilled once);
* ``sample_bN``: lilyexp's ``generate`` with N left-padded prompts per call, ``eval_pooling: sample`` with beam
  routing groups, each prompt prefilled once (what the Table 2 cells run);
* ``official_bN``: N prompts per call with the official whole-call routing (what batching does without the mode).

Questions are sorted by prompt length and cut into rounds; every mode runs on each round in turn, so a change of
machine load (the machine is shared) falls on all modes alike, and batches hold prompts of similar length (with
per-sample routing a prompt's answer does not depend on its batch-mates). Reports the fraction of identical
generations (token ids) per mode against ``batch1``, listing the differing ones, accuracies, wall and CPU times,
the prefill/decode split of the forward time, and speed-ups (torch pinned to ``--threads`` threads, a warm-up
discarded), and the load average before and during each round (the figures are only worth as much as the
machine was quiet). Writes results/bench/eval.json and eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from hydra import compose, initialize_config_dir

from lilyexp.backbones import load_backbone
from lilyexp.compose import CONF_DIR, build_method, build_task, method_node
from lilyexp.methods.routing import evaluation_routing
from lilyexp.recipes.causal_lm import generate, left_pad, supervised, tokenize_for_training
from lilyexp.recipes.prefill import PrefillCount, generating_model
from lilyexp.tasks.commonsense import LLM_ADAPTERS_SETS

REPO = Path(__file__).resolve().parents[1]
TRAIN_SETS = ("boolq", "ARC-Easy")
BEAMS, MAX_NEW_TOKENS = 4, 32  # the official GenerationConfig(num_beams=4), max_new_tokens=32
SETTINGS = {"num_beams": BEAMS, "max_new_tokens": MAX_NEW_TOKENS}
SMOKE = {"questions": 8, "round_size": 8, "batch_sizes": [4], "official_batch": 4, "train_steps": 2,
         "train_batch": 2, "threads": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=240, help="test questions, split evenly over the sets")
    parser.add_argument("--round-size", type=int, default=48, help="questions per round (a multiple of the "
                        "batch sizes keeps batches full)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--official-batch", type=int, default=16, help="also run the official routing at this "
                        "batch size (0: skip)")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--zero-init-B", action="store_true", help="B experts start at zero (official LLM init)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: results/bench (--smoke: a temporary "
                        "folder)")
    parser.add_argument("--cache", type=Path, default=None, help="default: checkpoints/bench_eval (--smoke: in --out)")
    parser.add_argument("--smoke", action="store_true", help="tiny_llama, a few questions, one round (seconds)")
    return finish_args(parser.parse_args(argv))


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.smoke:
        vars(args).update(SMOKE)
        args.out = args.out or Path(tempfile.mkdtemp(prefix="bench_eval_smoke_"))
    args.out = args.out or REPO / "results/bench"
    args.cache = args.cache or (args.out / "cache" if args.smoke else REPO / "checkpoints/bench_eval")
    return args


def data_dir() -> Path:
    return Path(os.environ.get("LILYEXP_SHARED", REPO.parent / "shared")) / "data/commonsense"


def overrides(args: argparse.Namespace) -> list[str]:
    """The cell the benchmark evaluates, as runner overrides (the real backbone, task and method objects)."""
    backbone = ["backbone=tiny_llama", "method.ne_1=2"] if args.smoke else ["backbone=smollm2", "method.ne_1=4"]
    present = [name for name in LLM_ADAPTERS_SETS if (data_dir() / name / "test.json").exists()]
    return [*backbone, "task=commonsense", f"task.data_dir={data_dir()}", f"task.subset=[{','.join(present)}]",
            f"task.train_file='{','.join(f'{name}/train.json' for name in TRAIN_SETS)}'", "task.val_size=0",
            "task.train_on_inputs=false", "method=lily", "method.r=16", "method.ne_2=4", "method.eval_pooling=sample",
            f"method.zero_init_B={str(args.zero_init_B).lower()}", f"seed={args.seed}"]


def build_parts(args: argparse.Namespace):
    """(config, task, backbone, method) as the runner builds them."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=overrides(args))
    task = build_task(cfg.task)
    backbone = load_backbone(cfg.backbone, **task.model_kwargs)
    return cfg, task, backbone, build_method(cfg.method)


def train_batches(tokenizer, task, steps: int, batch: int, seed: int) -> list[dict]:
    """Shuffled training records of the task, tokenized by the recipe's own code (loss on the answer)."""
    records = list(task.train)
    random.Random(seed).shuffle(records)
    features = supervised(tokenize_for_training(tokenizer, task, r) for r in records[:steps * batch * 2])
    return [left_pad(features[i * batch:(i + 1) * batch], tokenizer.pad_token_id) for i in range(steps)]


def train_adapter(model, tokenizer, task, args: argparse.Namespace) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses = []
    for step, batch in enumerate(train_batches(tokenizer, task, args.train_steps, args.train_batch, args.seed)):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
        print(f"train step {step + 1}/{args.train_steps} loss {losses[-1]:.4f}", flush=True)
    return losses


def trained_adapter(args: argparse.Namespace):
    """(adapted model, tokenizer, task, training info): the cached export of these training settings, trained and
    exported on first use. The cache loads through the method's own ``load`` (lilyexp's Lily with the bench's
    ``eval_pooling: sample``; ``load_adapter`` would give upstream peft's Lily, which pools over every call), and
    it refuses an export whose weights do not fit."""
    cfg, task, backbone, method = build_parts(args)
    init = "zero" if args.zero_init_B else "random"
    name = "tiny_llama" if args.smoke else "smollm2"
    directory = args.cache / (f"{name}_lily_r16_ne4_{init}B_steps{args.train_steps}_b{args.train_batch}_lr{args.lr:g}"
                              f"_s{args.seed}")
    info_path = directory / "training.json"
    if info_path.exists():
        model = method.load(backbone.model, directory)
        return model.eval(), backbone.processor, task, json.loads(info_path.read_text())
    torch.manual_seed(args.seed)
    model = method.apply(backbone.model)
    start = time.perf_counter()
    losses = train_adapter(model, backbone.processor, task, args)
    method.export(model, directory, method_node(cfg.method))
    info = {"init_B": init, "steps": args.train_steps, "batch": args.train_batch, "lr": args.lr,
            "backbone": name, "ne_1": int(cfg.method.ne_1), "train_sets": list(TRAIN_SETS),
            "loss_first5": losses[:5], "loss_last5": losses[-5:], "seconds": round(time.perf_counter() - start, 1)}
    info_path.write_text(json.dumps(info, indent=2))
    return model.eval(), backbone.processor, task, info


def expert_spread(tuner: torch.nn.Module) -> float:
    """Mean over the model's B groups of mean_e ||B_e - mean B|| / ||mean B||: 0 when the experts are copies, in
    which case routing cannot change the outputs."""
    spreads = []
    for group in {id(m.lily_B["default"]): m for m in tuner.modules() if hasattr(m, "lily_B")}.values():
        weight = group.lily_B["default"].weight
        experts = weight.reshape(group.num_B["default"], -1, weight.shape[1])
        mean = experts.mean(0)
        spreads.append(((experts - mean).flatten(1).norm(dim=1) / mean.norm()).mean().item())
    return round(sum(spreads) / len(spreads), 4)


def test_questions(task, total: int, seed: int) -> list[dict]:
    """A fixed subsample of the task's test sets: ``total / sets`` questions per set, drawn with ``seed``."""
    questions = []
    for name, records in task.eval_sets.items():
        for index in sorted(random.Random(seed).sample(range(len(records)), total // len(task.eval_sets))):
            questions.append({"set": name, "index": index, **records[index]})
    return questions


def official_generate(model, tokenizer, encoded: dict) -> list[str]:
    """transformers' ``generate`` as the official evaluate_llama.py calls it (every beam prefilled)."""
    output = model.generate(**encoded, num_beams=BEAMS, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(output, skip_special_tokens=True)


def run_official(model, tokenizer, prompts: list[str], size: int) -> list[str]:
    """The official loop (size 1: one prompt per call, only input_ids) or its batched form, whole-call routing."""
    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(prompts), size):
        chunk = prompts[start:start + size]
        encoded = (dict(tokenizer(chunk, return_tensors="pt")) if size == 1 else
                   dict(tokenizer(chunk, return_tensors="pt", padding=True)))
        outputs += official_generate(model, tokenizer, {k: v for k, v in encoded.items()
                                                        if size > 1 or k == "input_ids"})
    return outputs


def run_lilyexp(model, tokenizer, prompts: list[str], size: int, prefill: PrefillCount) -> list[str]:
    """lilyexp's evaluation: causal_lm.generate (beam routing groups, each prompt prefilled once)."""
    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(prompts), size):
        outputs += generate(model, tokenizer, prompts[start:start + size], SETTINGS, "cpu", prefill)
    return outputs


class ForwardClock:
    """Seconds spent in the model's forward calls, split into prefill (several new tokens) and decode steps, and
    the rows the decode steps computed (a batch decodes every row until its last prompt's beam search ends)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = self.zero()
        self._start, self._phase = 0.0, "decode"
        model.register_forward_pre_hook(self._begin, with_kwargs=True)
        model.register_forward_hook(self._end, with_kwargs=True)

    @staticmethod
    def zero() -> dict[str, float]:
        return {"prefill": 0.0, "decode": 0.0, "decode_calls": 0, "decode_rows": 0}

    def _begin(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        self._phase = "prefill" if ids is not None and ids.shape[-1] > 1 else "decode"
        if self._phase == "decode" and ids is not None:
            self.seconds["decode_calls"] += 1
            self.seconds["decode_rows"] += ids.shape[0]
        self._start = time.perf_counter()

    def _end(self, module, args, kwargs, output) -> None:
        self.seconds[self._phase] += time.perf_counter() - self._start

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, self.zero()
        return taken


def timed(clock: ForwardClock, function, *args) -> tuple[list[list[int]], dict[str, float]]:
    clock.take()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        result = function(*args)
    return result, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, **clock.take()}


def scored(task, questions: list[dict], outputs: list[str]) -> list[dict]:
    """The task's official scoring: the text after "### Response:", first answer-pattern match."""
    rows = []
    for question, decoded in zip(questions, outputs):
        response, prediction = task.extract(question["set"], decoded)
        rows.append({"response": response, "prediction": prediction,
                     "correct": task.is_correct(prediction, question["answer"])})
    return rows


def accuracy(rows: list[dict], questions: list[dict]) -> dict:
    per_set: dict[str, list[bool]] = {}
    for row, question in zip(rows, questions):
        per_set.setdefault(question["set"], []).append(row["correct"])
    result = {name: round(100 * sum(v) / len(v), 2) for name, v in per_set.items()}
    return {"all": round(100 * sum(r["correct"] for r in rows) / len(rows), 2), **result}


def compare(reference: list[str], other: list[str], ref_rows: list[dict], rows: list[dict],
            questions: list[dict]) -> dict:
    differing = [{"set": q["set"], "index": q["index"], "answer": q["answer"],
                  "batch1": a["response"], "batched": b["response"], "batch1_correct": a["correct"],
                  "batched_correct": b["correct"]}
                 for q, x, y, a, b in zip(questions, reference, other, ref_rows, rows) if x != y]
    same = len(reference) - len(differing)
    return {"identical": same, "total": len(reference), "identical_pct": round(100 * same / len(reference), 2),
            "same_prediction_pct": round(100 * sum(a["prediction"] == b["prediction"]
                                                   for a, b in zip(ref_rows, rows)) / len(rows), 2),
            "differing": differing}


def modes(args: argparse.Namespace) -> list[tuple[str, int, bool]]:
    """(name, prompts per call, lilyexp's evaluation) of every timed run; batch1 first, the reference."""
    runs = [("batch1", 1, False), ("batch1_once", 1, True)] + [(f"sample_b{n}", n, True) for n in args.batch_sizes]
    return runs + ([(f"official_b{args.official_batch}", args.official_batch, False)] if args.official_batch else [])


def run_mode(model, tokenizer, prompts: list[str], size: int, ours: bool, prefill: PrefillCount) -> list[str]:
    if ours:
        return run_lilyexp(model, tokenizer, prompts, size, prefill)
    return run_official(model, tokenizer, prompts, size)


def warm_up(model, tokenizer, prompts: list[str], args: argparse.Namespace) -> None:
    """Each mode once on a few prompts, discarded (allocator, thread pools, lazy inits)."""
    with torch.no_grad():
        for _, size, ours in modes(args):
            run_mode(model, tokenizer, prompts[:size], size, ours, PrefillCount())
    print("warm-up done", flush=True)


def run_rounds(model, tokenizer, prompts: list[str], args: argparse.Namespace) -> tuple[dict, dict]:
    """Every mode on each round of length-sorted prompts in turn: (outputs, summed times, each round's wall time
    and load average, and how the prefills ran) per mode, in the prompts' order."""
    clock = ForwardClock(generating_model(model))
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i])["input_ids"]))
    outputs = {name: [""] * len(prompts) for name, _, _ in modes(args)}
    times = {name: {"wall": 0.0, "cpu": 0.0, **ForwardClock.zero()} for name in outputs}
    rounds: dict[str, list[float]] = {name: [] for name in outputs}
    loads: dict[str, list[float]] = {name: [] for name in outputs}
    prefills = {name: PrefillCount() for name in outputs}
    warm_up(model, tokenizer, [prompts[i] for i in order[:max(args.batch_sizes)]], args)
    for start in range(0, len(order), args.round_size):
        chunk = order[start:start + args.round_size]
        batch = [prompts[i] for i in chunk]
        for name, size, ours in modes(args):
            result, spent = timed(clock, run_mode, model, tokenizer, batch, size, ours, prefills[name])
            for i, text in zip(chunk, result):
                outputs[name][i] = text
            times[name] = {key: times[name][key] + value for key, value in spent.items()}
            rounds[name].append(round(spent["wall"], 1))
            loads[name].append(round(os.getloadavg()[0], 2))
            print(f"round {start // args.round_size + 1}: {name} {spent['wall']:.1f}s "
                  f"(load {loads[name][-1]:.2f})", flush=True)
    return outputs, {name: {**times[name], "round_wall": rounds[name], "round_load": loads[name],
                            "prefill_mode": prefills[name].mode if modes_by_name(args)[name] else "every beam"}
                     for name in outputs}


def modes_by_name(args: argparse.Namespace) -> dict[str, bool]:
    return {name: ours for name, _, ours in modes(args)}


WORK_KEYS = ("prefill_mode", "decode_calls", "decode_rows")


def evaluate(model, tokenizer, task, questions: list[dict], args: argparse.Namespace) -> dict:
    prompts = [task.prompt(q) for q in questions]
    outputs, times = run_rounds(model, tokenizer, prompts, args)
    reference = scored(task, questions, outputs["batch1"])
    results = {}
    for name, size, ours in modes(args):
        rows = scored(task, questions, outputs[name])
        results[name] = {"batch_size": size, "routing": "per-sample groups" if ours and size > 1 else "official",
                         "prefill": times[name]["prefill_mode"],
                         "seconds": {key: value if key.startswith("round_") else round(value, 1)
                                     for key, value in times[name].items() if key not in WORK_KEYS},
                         "decode_work": {"calls": times[name]["decode_calls"], "rows": times[name]["decode_rows"]},
                         "accuracy": accuracy(rows, questions)}
        if name != "batch1":
            results[name]["vs_batch1"] = compare(outputs["batch1"], outputs[name], reference, rows, questions)
            results[name]["speedup"] = {key: round(times["batch1"][key] / max(times[name][key], 1e-9), 2)
                                        for key in ("wall", "prefill", "decode")}
            # the machine is shared: a load burst inflates one round of one mode, the median ignores it
            results[name]["speedup"]["median_round"] = round(statistics.median(
                a / b for a, b in zip(times["batch1"]["round_wall"], times[name]["round_wall"])), 2)
    return results


def markdown(report: dict) -> str:
    adapter = report["adapter"]
    lines = ["# lilyexp's commonsense evaluation vs the official batch-1 evaluation", "",
             f"{'SmolLM2-135M-Instruct' if adapter.get('backbone', 'smollm2') == 'smollm2' else adapter['backbone']} "
             f"+ trained Lily (r 16, {adapter.get('ne_1', 4)} A's, 4 B's on q,k,v; B experts initialised "
             f"{adapter['init_B']}, {adapter['steps']} AdamW steps, expert spread {adapter['expert_spread']}), "
             f"{report['questions']} test questions ({', '.join(report['sets'])}), official prompt "
             f"and answer extraction, {BEAMS}-beam search, {MAX_NEW_TOKENS} new tokens, "
             f"{report['threads']} CPU threads; questions sorted by prompt length, every mode run on each round "
             f"of {report['round_size']} in turn.", "",
             f"Load average (1 min) before the run: {report.get('load_before')}; prefill share of the reference's "
             f"forward time: {report.get('reference_prefill_share')}.", "",
             "| mode | batch | routing | prefill | identical generations | same prediction | accuracy | "
             "wall s (CPU s) | prefill s | decode s | decode rows (calls) | speed-up wall / prefill / decode / "
             "median round |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, mode in report["modes"].items():
        versus, t, work = mode.get("vs_batch1", {}), mode["seconds"], mode.get("decode_work", {})
        identical = f"{versus['identical']}/{versus['total']} ({versus['identical_pct']}%)" if versus else "reference"
        same = f"{versus['same_prediction_pct']}%" if versus else "reference"
        speedup = "/".join(f"{v}x" for v in mode["speedup"].values()) if "speedup" in mode else "1x"
        lines.append(f"| {name} | {mode['batch_size']} | {mode['routing']} | {mode['prefill']} | {identical} | "
                     f"{same} | {mode['accuracy']['all']} | {t['wall']} ({t['cpu']}) | {t['prefill']} | "
                     f"{t['decode']} | {work.get('rows', '?')} ({work.get('calls', '?')}) | {speedup} |")
    lines += ["", "Decode rows: the rows the decode steps computed (beams x prompts per call, summed over calls). A "
              "batch decodes every row until the last of its prompts' beam searches ends (transformers keeps the "
              "rows of a prompt whose result is settled), so a batched mode can compute more rows than batch 1 "
              "needs."]
    lines += ["", "Wall seconds per round (questions sorted by prompt length, so the last round holds the longest "
              "prompts; a load burst shows as an outlier with a higher load average below): " + "; ".join(
        f"{name} {mode['seconds']['round_wall']}" for name, mode in report["modes"].items())]
    lines += ["", "Load average after each mode's round: " + "; ".join(
        f"{name} {mode['seconds']['round_load']}" for name, mode in report["modes"].items())]
    lines += [f"\n{note}" for note in report.get("notes", [])]
    for name, mode in report["modes"].items():
        differing = mode.get("vs_batch1", {}).get("differing", [])
        if differing and name.startswith("sample"):
            lines += ["", f"## {name}: generations that differ from batch 1", ""]
            lines += [f"- {d['set']} #{d['index']} (answer {d['answer']}): batch 1 `{d['batch1']!r}` / batched "
                      f"`{d['batched']!r}`" for d in differing]
    return "\n".join(lines) + "\n"


def commit() -> str | None:
    """The checkout's commit (with ``+changes`` when the tree differs from it), so a result names its code."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=30).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "") if head else None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = round(os.getloadavg()[0], 2)
    tuner, tokenizer, task, training = trained_adapter(args)
    if evaluation_routing(tuner) != "per_group":  # the sample modes would silently measure the coupled routing
        raise SystemExit(f"bench_eval: the adapter routes {evaluation_routing(tuner)}, not per group; the sample "
                         f"modes need lilyexp's Lily with eval_pooling=sample.")
    training["expert_spread"] = expert_spread(tuner)
    questions = test_questions(task, args.questions, args.seed)
    results = evaluate(tuner, tokenizer, task, questions, args)
    reference = results["batch1"]["seconds"]
    share = round(reference["prefill"] / max(reference["prefill"] + reference["decode"], 1e-9), 3)
    report = {"questions": len(questions), "sets": sorted({q["set"] for q in questions}), "threads": args.threads,
              "round_size": args.round_size, "smoke": args.smoke, "load_before": load_before,
              "reference_prefill_share": share,
              "beams": BEAMS, "max_new_tokens": MAX_NEW_TOKENS, "adapter": training, "modes": results,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version(), "lilyexp_commit": commit()},
              "machine": platform.processor() or platform.machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "eval_zero_init_B" if args.zero_init_B else "eval"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return args.out / f"{stem}.json"


if __name__ == "__main__":
    main()
