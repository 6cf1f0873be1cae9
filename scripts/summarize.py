"""Markdown tables of the finished run records in a folder. Every number comes from a record.

    python scripts/summarize.py results/runs/demo --out results/demo.md
        one row per record (plus the untuned model where a record tested it first), one column per test metric

Seed aggregation and paper layouts: ``python -m lilyexp.tables``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_records(folder: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return [r for r in records if r.get("status") == "finished"]


def short(key: str) -> str:
    return key.removeprefix("test/").replace("/", " ")


def rows_of(records: list[dict], prefix: str) -> list[tuple[str, dict]]:
    """The untuned model once per distinct result (every run of a group tests the same base), then each run."""
    untuned, runs = [], []
    for record in records:
        cfg, metrics = record["config"], record["metrics"]
        if "initial" in metrics and metrics["initial"] not in [values for _, values in untuned]:
            untuned.append((f"untuned {cfg['backbone']['name']}", metrics["initial"]))
        runs.append((f"{cfg['method']['name']} (seed {cfg['seed']}, {record['params']['adapter']:,} params)",
                     metrics["final"]))
    return [(name, {k: v for k, v in values.items() if k.startswith(prefix)}) for name, values in untuned + runs]


def table(records: list[dict], prefix: str = "test/") -> str:
    rows = rows_of(records, prefix)
    if not rows:
        return "(no finished records)\n"
    columns = sorted({k for _, values in rows for k in values}, key=lambda k: (k.endswith("/avg"), k))
    lines = ["| run | " + " | ".join(short(c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows:
        cells = [f"{100 * values[c]:.1f}" if c in values else "—" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    records = load_records(args.folder)
    text = f"Accuracy (%) from the records in {args.folder}\n\n" + table(records)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
