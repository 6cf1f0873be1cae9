"""Lily settings within a LoRA budget: how the paper chose its ranks (Lily matched or undercut LoRA's count).

    python -m lilyexp.budget backbone=llama3 lora_r=32 [top=15]

Shapes come from the backbone built on the meta device (no weights): its `architecture` node when the yaml has
one, else its random-init `load` node. Counts use the official sharing rule: per (target, shape)
group of L layers, ceil(L / (L // ne_1))·C_in·r (A's) + ne_2·r·C_out (B's) + L·r·ne_2 (one router per layer).
"""

from __future__ import annotations

import math
import sys
from collections import Counter

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException


from lilyexp.backbones import skeleton
from lilyexp.compose import CONF_DIR, group_options
from lilyexp.errors import ConfigError

RANKS, EXPERTS = (4, 8, 16, 24, 32, 40, 48, 64, 96, 128), range(2, 9)


def target_shapes(model: torch.nn.Module, targets: list[str]) -> Counter:
    """(suffix, in_features, out_features) -> number of Linear layers."""
    shapes: Counter = Counter()
    for name, module in model.named_modules():
        matched = [t for t in targets if name == t or name.endswith(f".{t}")]
        if matched and isinstance(module, torch.nn.Linear):
            shapes[(max(matched, key=len), module.in_features, module.out_features)] += 1
    return shapes


def lora_count(shapes: Counter, r: int) -> int:
    return sum(count * r * (fan_in + fan_out) for (_, fan_in, fan_out), count in shapes.items())


def lily_count(shapes: Counter, r: int, ne_1: int, ne_2: int) -> int:
    total = 0
    for (_, fan_in, fan_out), layers in shapes.items():
        if ne_1 > layers:
            raise ConfigError(f"ne_1={ne_1} exceeds the {layers} layers of a target group.")
        num_a = math.ceil(layers / (layers // ne_1))
        total += num_a * fan_in * r + ne_2 * r * fan_out + layers * r * ne_2
    return total


def within_budget(lora_shapes: Counter, lily_shapes: Counter, lora_r: int, top: int) -> list[dict]:
    budget = lora_count(lora_shapes, lora_r)
    layers = min(lily_shapes.values())
    rows = [{"r": r, "ne_1": ne_1, "ne_2": ne_2, "params": lily_count(lily_shapes, r, ne_1, ne_2)}
            for r in RANKS for ne_1 in range(layers, 0, -1) for ne_2 in EXPERTS]
    unique: dict[tuple, dict] = {}
    for row in rows:  # ne_1 values with the same stride build the same model: keep the largest
        stride = layers // row["ne_1"]
        unique.setdefault((row["r"], stride, row["ne_2"]), {**row, "num_A": math.ceil(layers / stride),
                                                               "of_lora": row["params"] / budget})
    kept = [row for row in unique.values() if row["params"] <= budget]
    return sorted(kept, key=lambda row: -row["params"])[:top]


USAGE = "usage: python -m lilyexp.budget [backbone=<name>] [lora_r=<int>] [top=<int>]"


def parse(argv: list[str]) -> dict[str, str]:
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        raise SystemExit(0)
    bad = [arg for arg in argv if "=" not in arg or arg.split("=", 1)[0] not in ("backbone", "lora_r", "top")]
    if bad:
        raise SystemExit(f"unknown argument(s) {bad}; {USAGE}")
    args = dict(arg.split("=", 1) for arg in argv)
    for key in ("lora_r", "top"):
        if key in args and not (args[key].isdigit() and int(args[key]) > 0):
            raise SystemExit(f"{key} must be a positive integer, got '{args[key]}'; {USAGE}")
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    name = args.get("backbone", "smollm2")
    if name not in group_options("backbone"):
        raise SystemExit(f"no backbone '{name}'; one of: {', '.join(group_options('backbone'))}.")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=[f"backbone={name}"])
    lora_r, top = int(args.get("lora_r", 8)), int(args.get("top", 15))
    try:
        model = skeleton(cfg.backbone)
    except (InstantiationException, NotImplementedError, RuntimeError, TypeError, ValueError) as exc:
        exc = exc.__cause__ or exc
        raise SystemExit(f"cannot count backbone '{name}' without its weights ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); the budget helper counts the text and "
                         f"vision backbones.") from None
    lora_shapes = target_shapes(model, list(cfg.backbone.adapter_targets.lora))
    lily_shapes = target_shapes(model, list(cfg.backbone.adapter_targets.lily))
    print(f"{cfg.backbone.name}: LoRA r={lora_r} on {list(cfg.backbone.adapter_targets.lora)} = "
          f"{lora_count(lora_shapes, lora_r):,} parameters; Lily on {list(cfg.backbone.adapter_targets.lily)}:")
    print("| r | ne_1 | A's built | ne_2 | parameters | of LoRA |\n|---|---|---|---|---|---|")
    for row in within_budget(lora_shapes, lily_shapes, lora_r, top):
        print(f"| {row['r']} | {row['ne_1']} | {row['num_A']} | {row['ne_2']} | {row['params']:,} | "
              f"{100 * row['of_lora']:.1f}% |")


def cli() -> None:
    """The ``lilyexp-budget`` command."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
