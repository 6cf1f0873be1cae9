"""`make bench`: step time and peak memory of Lily against LoRA at equal adapter budgets (a benchmark, not a test).

For each model shape (random init: RoBERTa-base-shaped; a small LLaMA-shaped model for a CPU step of seconds; on
CUDA also LLaMA3-8B-shaped, in bf16), each method's forward + backward + AdamW step is timed in rounds: every
round runs every method once (order rotated), after a discarded warm-up, with the torch thread count pinned. A
method's ratio to LoRA is the median of its per-round ratios (each method's step over LoRA's step of the same
round, so a slow phase of the machine hits both), with a bootstrap 95% interval; rounds continue until the
intervals of the comparisons that matter (our Lily vs LoRA, our Lily vs upstream peft Lily) are within
``--halfwidth`` (2%) or ``--max-rounds`` is reached. Peak memory is parameters, buffers and optimizer state plus the
peak a training step allocates on top. Also times the Eq. 3 expert combination against the naive N_e-matmul one at
the paper's example size. Writes results/bench/latest.json and latest.md (``--out`` elsewhere; ``--smoke``: tiny
shapes, one round, a temporary folder, for the test suite).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LilyConfig, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, RobertaConfig

from lilyexp.budget import target_shapes, within_budget
from lilyexp.methods.lily import LilyVariantConfig, LilyVariantModel, mix_experts

OUT = Path("results/bench")
OURS, LORA, UPSTREAM = "lily (batch_mean, official)", "peft lora", "peft lily (upstream)"
LORA_AT_LILY_R = "peft lora at Lily's r"
SHAPES = {
    "roberta-base": dict(cls=AutoModelForSequenceClassification, targets=["query", "value"], lora_r=8,
                         config=RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                                              num_attention_heads=12, intermediate_size=3072,
                                              max_position_embeddings=514, type_vocab_size=1)),
    "llama-4x2048": dict(cls=AutoModelForCausalLM, targets=["q_proj", "k_proj", "v_proj"], lora_r=8,
                         config=LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                            num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4)),
    "llama3-8b": dict(cls=AutoModelForCausalLM, targets=["q_proj", "k_proj", "v_proj"], lora_r=32,
                      cuda_only=True, one_at_a_time=True,
                      config=LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)),
    # --smoke: the same code on tiny shapes (seconds), for the test suite
    "tiny-roberta": dict(cls=AutoModelForSequenceClassification, targets=["query", "value"], lora_r=8, smoke=True,
                         config=RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4,
                                              num_attention_heads=2, intermediate_size=128,
                                              max_position_embeddings=64, type_vocab_size=1)),
    "tiny-llama": dict(cls=AutoModelForCausalLM, targets=["q_proj", "k_proj", "v_proj"], lora_r=8, smoke=True,
                       config=LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2)),
}


@functools.cache
def equal_budget_lily(shape: str) -> tuple[int, int, int]:
    """The largest Lily (r in 16/32, ne_2 <= 4) whose parameter count stays within the LoRA's, on the same targets."""
    spec = SHAPES[shape]
    with torch.device("meta"):
        shapes = target_shapes(spec["cls"].from_config(spec["config"]), spec["targets"])
    rows = [row for row in within_budget(shapes, shapes, spec["lora_r"], top=10_000)
            if row["r"] in (16, 32) and row["ne_2"] <= 4]
    best = rows[0]
    return best["r"], best["ne_1"], best["ne_2"]


def naive_mix(hidden, experts, router, pooling, token_weights=None):
    """The reference the paper's Eq. 3 avoids: one matmul per expert, then the weighted sum."""
    weights = router(hidden).softmax(-1).reshape(-1, experts.shape[0]).mean(0)
    return sum(weights[e] * (hidden @ experts[e]) for e in range(experts.shape[0]))


def lily_variant(base, shape, **switches):
    spec = SHAPES[shape]
    r, ne_1, ne_2 = equal_budget_lily(shape)
    return LilyVariantModel(base, LilyVariantConfig(r=r, ne_1=ne_1, num_B=ne_2, target_modules=spec["targets"],
                                                    **switches))


def methods(shape: str) -> dict:
    spec = SHAPES[shape]
    r, ne_1, ne_2 = equal_budget_lily(shape)
    layers = spec["config"].num_hidden_layers

    def naive(base):
        model = lily_variant(base, shape)
        for module in model.modules():
            if hasattr(module, "variant"):
                module.mix = naive_mix
        return model

    def frozen(base):
        base.requires_grad_(False)
        base.enable_input_require_grads()
        return base

    return {
        "frozen base": frozen,
        "peft lora": lambda base: get_peft_model(base, LoraConfig(r=spec["lora_r"], target_modules=spec["targets"])),
        # LoRA at Lily's rank (more parameters than the budget): separates the cost of Lily's larger rank, which
        # an equal budget buys, from the cost of its routing.
        LORA_AT_LILY_R: lambda base: get_peft_model(base, LoraConfig(r=r, target_modules=spec["targets"])),
        "peft lily (upstream)": lambda base: get_peft_model(base, LilyConfig(
            r=r, stride_A=layers // ne_1, num_B=ne_2, target_modules=spec["targets"])),
        "lily (batch_mean, official)": lambda base: lily_variant(base, shape),
        "lily (sample_sum, Eq. 2)": lambda base: lily_variant(base, shape, pooling="sample_sum"),
        "lily (token, Vim)": lambda base: lily_variant(base, shape, pooling="token"),
        "lily (router per A)": lambda base: lily_variant(base, shape, router="A"),
        "lily naive N_e matmuls": naive,
    }


def build(name: str, shape: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    spec = SHAPES[shape]
    torch.manual_seed(0)
    base = spec["cls"].from_config(spec["config"]).to(device=device, dtype=dtype)
    model = methods(shape)[name](base)
    for param in model.parameters():  # adapters train in fp32 (official and peft autocast behaviour)
        if param.requires_grad:
            param.data = param.data.float()
    return model


def batch_for(spec, device, args) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (args.batch, args.seq), generator=generator).to(device)
    labels = ids if spec["cls"] is AutoModelForCausalLM else torch.zeros(args.batch, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
    step.optimizer = optimizer
    return step


def timed(step, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def adapter_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bootstrap_median(values: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """(median, low, high): the median and its bootstrap 95% interval."""
    rng = np.random.default_rng(0)
    data = np.asarray(values)
    medians = np.median(rng.choice(data, size=(resamples, len(data)), replace=True), axis=1)
    return float(np.median(data)), float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def halfwidth(values: list[float]) -> float:
    median, low, high = bootstrap_median(values)
    return (high - low) / 2 / median


def run_rounds(steps: dict, device: str, rounds: int, times: dict) -> None:
    names = list(steps)
    for _ in range(rounds):
        done = len(times[names[0]])
        for name in names[done % len(names):] + names[:done % len(names)]:  # rotate the order each round
            times[name].append(timed(steps[name], device))


def paired(times: dict, numerator: str, denominator: str) -> list[float]:
    return [a / b for a, b in zip(times[numerator], times[denominator])]


def time_until_tight(steps: dict, device: str, args) -> dict:
    """Rounds of steps until the key ratios' intervals are within ``args.halfwidth`` (or ``args.max_rounds``)."""
    times = {name: [] for name in steps}
    run_rounds(steps, device, args.min_rounds, times)
    while len(times[LORA]) < args.max_rounds and max(
            halfwidth(paired(times, OURS, LORA)), halfwidth(paired(times, OURS, UPSTREAM))) > args.halfwidth:
        run_rounds(steps, device, 10, times)
    return times


def time_shape(shape: str, args, device, dtype) -> list[dict]:
    """Every method's rows for one model shape: interleaved rounds with all models resident, or, for a shape too
    large to hold one model per method (LLaMA3-8B: ~16 GB each in bf16), one model at a time."""
    batch = batch_for(SHAPES[shape], device, args)
    if SHAPES[shape].get("one_at_a_time"):
        times, measured = time_one_at_a_time(shape, batch, args, device, dtype)
    else:
        models = {name: build(name, shape, device, dtype) for name in methods(shape)}
        steps = {name: step_fn(model, batch) for name, model in models.items()}
        for step in steps.values():
            step()  # warm-up, discarded
        times = time_until_tight(steps, device, args)
        measured = {name: measure(models[name], steps[name], device) for name in steps}
        del models, steps
    return [{"model": shape, "method": name, "lily_r_ne1_ne2": equal_budget_lily(shape), **measured[name],
             "step_s_median": statistics.median(times[name]), "step_s_all": times[name], "rounds": len(times[name]),
             **ratio_fields(times, name)} for name in times]


def time_one_at_a_time(shape: str, batch: dict, args, device, dtype) -> tuple[dict, dict]:
    """Each method built alone, warmed up, timed for ``args.min_rounds`` steps and freed; step i of each method
    forms round i (on a GPU, free of other load, consecutive blocks time as stably as interleaved rounds)."""
    times, measured = {}, {}
    for name in methods(shape):
        model = build(name, shape, device, dtype)
        step = step_fn(model, batch)
        step()  # warm-up, discarded
        times[name] = [timed(step, device) for _ in range(args.min_rounds)]
        measured[name] = measure(model, step, device)
        del model, step
        if device == "cuda":
            torch.cuda.empty_cache()
    return times, measured


def measure(model, step, device) -> dict:
    step_mem = step_peak_bytes(step, device)
    return {"adapter_params": adapter_params(model), "step_mem_bytes": step_mem,
            "peak_mem_bytes": static_bytes(model, step.optimizer) + step_mem}


def ratio_fields(times: dict, name: str) -> dict:
    ratio = bootstrap_median(paired(times, name, LORA))
    return {"ratio_to_lora": ratio[0], "ratio_to_lora_ci": ratio[1:],
            "ratio_to_upstream": bootstrap_median(paired(times, name, UPSTREAM)),
            "ratio_to_lora_at_lily_r": bootstrap_median(paired(times, name, LORA_AT_LILY_R))}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def static_bytes(model, optimizer) -> int:
    """Parameters, buffers and optimizer state: what stays allocated between steps."""
    state = [v for per_param in (optimizer.state.values() if optimizer else []) for v in per_param.values()
             if torch.is_tensor(v)]
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()) + tensor_bytes(state)


def step_peak_bytes(step, device) -> int:
    """Peak of the memory one training step allocates on top of what was already there (activations, gradients,
    workspace): CUDA's allocator statistics, or on CPU the running sum of the profiler's allocation events."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def eq3_vs_naive(device, repeats: int = 30) -> dict:
    """The paper's example size: N=1024 tokens, d=16, C=768, N_e=4; forward + backward."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 1024, 16, device=device, requires_grad=True)
    experts = torch.randn(4, 16, 768, device=device, requires_grad=True)
    router = torch.nn.Linear(16, 4, bias=False).to(device)
    results = {}
    for label, fn in (("eq3", lambda: mix_experts(hidden, experts, router, "batch_mean")),
                      ("naive", lambda: naive_mix(hidden, experts, router, "batch_mean"))):
        for _ in range(5):
            fn().sum().backward()
        results[label] = statistics.median(timed(lambda: fn().sum().backward(), device) for _ in range(repeats))
    return {"eq3_s": results["eq3"], "naive_s": results["naive"], "speedup": results["naive"] / results["eq3"]}


def device_and_dtype():
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def verdicts(rows: list[dict], target: float) -> list[str]:
    """The goals: our Lily <= 1.02x LoRA at the interval's upper end; not slower than upstream peft's Lily beyond
    the interval (its lower end <= 1)."""
    lines = []
    for row in rows:
        if row["method"] != OURS:
            continue
        low, high = row["ratio_to_lora_ci"]
        upstream, same_rank = row["ratio_to_upstream"], row["ratio_to_lora_at_lily_r"]
        lines.append(f"- {row['model']}: our Lily / LoRA = {row['ratio_to_lora']:.3f} [{low:.3f}, {high:.3f}] "
                     f"({'meets' if high <= 1 + target else 'misses'} <= {1 + target:.2f}); our Lily / upstream Lily = "
                     f"{upstream[0]:.3f} [{upstream[1]:.3f}, {upstream[2]:.3f}] "
                     f"({'not slower' if upstream[1] <= 1 else 'slower'} beyond the interval); our Lily / LoRA at "
                     f"Lily's r {row['lily_r_ne1_ne2'][0]} = {same_rank[0]:.3f} [{same_rank[1]:.3f}, "
                     f"{same_rank[2]:.3f}] (the routing's own cost); {row['rounds']} rounds")
    return lines


def markdown(rows: list[dict], eq3: dict, meta: dict) -> str:
    lines = [f"# Lily vs LoRA: step time and peak memory ({meta['device']}, {meta['dtype']}, batch {meta['batch']}"
             f" × {meta['seq']} tokens, interleaved rounds, {meta['threads']} pinned threads)", "",
             "| model | method | adapter params | step (s) | × LoRA time [95% CI] | peak mem (MiB) | × LoRA | "
             "step's own mem (MiB) | × LoRA |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        low, high = row["ratio_to_lora_ci"]
        lines.append(f"| {row['model']} | {row['method']} | {row['adapter_params']:,} | {row['step_s_median']:.4f} | "
                     f"{row['ratio_to_lora']:.3f} [{low:.3f}, {high:.3f}] | {row['peak_mem_bytes'] / 2**20:.0f} | "
                     f"{row['mem_ratio_to_lora']:.3f} | {row['step_mem_bytes'] / 2**20:.1f} | "
                     f"{row['step_mem_ratio_to_lora']:.3f} |")
    lines += ["", "Goals:", *verdicts(rows, meta["halfwidth"]), "",
              f"Eq. 3 combination vs naive N_e matmuls (N=1024, d=16, C=768, N_e=4, forward+backward): "
              f"{eq3['eq3_s'] * 1e3:.3f} ms vs {eq3['naive_s'] * 1e3:.3f} ms, **{eq3['speedup']:.2f}× faster**.", "",
              "A time ratio is the median of per-round ratios (each method's step over LoRA's step in the same round),"
              " with a bootstrap 95% interval; rounds continue until the intervals of our Lily vs LoRA and vs upstream"
              f" peft Lily are within ±{meta['halfwidth']:.0%} (or {meta['max_rounds']} rounds). Peak memory = "
              "parameters + buffers + optimizer state + the peak one training step allocates on top (activations, "
              "gradients, workspace; CUDA: allocator statistics, CPU: the profiler's allocation events). The step's "
              "own memory is that last part alone. Lily's settings are the largest (r in 16/32, ne_2 <= 4) within the "
              "LoRA's parameter count on the same targets; \"peft lora at Lily's r\" spends more parameters than that "
              "budget, to separate the cost of Lily's rank from the cost of its routing. Regenerate: make bench.", ""]
    return "\n".join(lines)


def wanted(spec: dict, device: str, smoke: bool) -> bool:
    return bool(spec.get("smoke")) == smoke and (device == "cuda" or not spec.get("cuda_only"))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-rounds", type=int, default=20)
    parser.add_argument("--max-rounds", type=int, default=150)
    parser.add_argument("--halfwidth", type=float, default=0.02, help="stop when the key intervals are this tight")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--render", action="store_true", help="only re-render latest.md from latest.json")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {OUT} (--smoke: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.min_rounds = args.max_rounds = 1
        args.batch, args.seq, args.threads = args.batch or 2, args.seq or 8, 1
        args.out = args.out or Path(tempfile.mkdtemp(prefix="bench_smoke_"))
    out = args.out or OUT
    if args.render:
        saved = json.loads((out / "latest.json").read_text())
        (out / "latest.md").write_text(markdown(saved["rows"], saved["eq3_vs_naive"], saved["meta"]))
        return out / "latest.json"
    device, dtype = device_and_dtype()
    args.batch = args.batch or (16 if device == "cuda" else 4)
    args.seq = args.seq or (512 if device == "cuda" else 128)
    torch.set_num_threads(args.threads)
    rows = []
    for shape, spec in SHAPES.items():
        if not wanted(spec, device, args.smoke):
            continue
        shape_rows = time_shape(shape, args, device, dtype)
        lora = next(r for r in shape_rows if r["method"] == "peft lora")
        for row in shape_rows:
            row["mem_ratio_to_lora"] = row["peak_mem_bytes"] / lora["peak_mem_bytes"]
            row["step_mem_ratio_to_lora"] = row["step_mem_bytes"] / lora["step_mem_bytes"]
            print(f"{shape:14s} {row['method']:30s} {row['step_s_median']:.4f}s ×{row['ratio_to_lora']:.3f} "
                  f"mem ×{row['mem_ratio_to_lora']:.3f}", flush=True)
        rows += shape_rows
    eq3 = eq3_vs_naive(device, repeats=2 if args.smoke else 30)
    meta = {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.machine()}, "
            f"{torch.get_num_threads()} threads)", "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
            "seq": args.seq, "threads": args.threads, "halfwidth": args.halfwidth, "max_rounds": args.max_rounds,
            "torch": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"meta": meta, "rows": rows, "eq3_vs_naive": eq3}, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(rows, eq3, meta))
    print(markdown(rows, eq3, meta))
    return out / "latest.json"


if __name__ == "__main__":
    main()
