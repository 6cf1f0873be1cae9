"""Render figures from the records that exist: ``python -m lilyexp.figures [figN ...] [--results DIR] [--out DIR]
[--group NAME]`` (no name: every figure). Runs nothing; prints the commands that fill missing cells."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from lilyexp.figures import figure_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", nargs="*", help=f"default: all ({', '.join(figure_names())})")
    parser.add_argument("--results", type=Path, default=Path("results/runs"))
    parser.add_argument("--out", type=Path, default=Path("results/figures"))
    parser.add_argument("--group", default=None, help="read this record group instead of the figure's own")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.figures) - set(figure_names()))
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; known: {', '.join(figure_names())}")
    for name in args.figures or figure_names():
        rendered = importlib.import_module(f"lilyexp.figures.{name}").render(args.results, args.out, args.group)
        for path in rendered.files:
            print(f"rendered {path}")
        if rendered.missing:
            print(f"{name}: cells without a record; these commands produce them:")
            print("\n".join(f"  {command}" for command in rendered.missing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
