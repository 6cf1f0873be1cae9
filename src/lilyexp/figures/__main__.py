"""Render figures from the records that exist: ``python -m lilyexp.figures [figN ...] [--results DIR] [--out DIR]
[--group NAME[,NAME]] [--images DIR]`` (no name: every figure). Runs nothing; prints the commands that fill
missing cells. ``--images`` gives the figures that show images (``fig12``) a folder to take them from."""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path

from lilyexp.figures import figure_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", nargs="*", help=f"default: all ({', '.join(figure_names())})")
    parser.add_argument("--results", type=Path, default=Path("results/runs"))
    parser.add_argument("--out", type=Path, default=Path("results/figures"))
    parser.add_argument("--group", default=None, help="read this record group (or groups: a,b) instead of the "
                                                      "figure's own")
    parser.add_argument("--images", type=Path, default=None, help="a folder of images, for figures that show some")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.figures) - set(figure_names()))
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; known: {', '.join(figure_names())}")
    missing_folders = [str(folder) for folder in folders(args.results, args.group) if not folder.is_dir()]
    if missing_folders:
        parser.error(f"no records folder {', '.join(missing_folders)}; pass --results (and --group) of existing "
                     f"record folders.")
    empty = []
    for name in args.figures or figure_names():
        render = importlib.import_module(f"lilyexp.figures.{name}").render
        options = {"images": args.images} if args.images and "images" in inspect.signature(render).parameters else {}
        rendered = render(args.results, args.out, args.group, **options)
        for path in rendered.files:
            print(f"rendered {path}")
        if not rendered.files and not rendered.missing:  # nothing drawn, and no command to offer: the wrong folder
            empty.append(name)
            print(f"{name}: nothing drawn: none of its cells has a record under {args.results}"
                  + (f" (group {args.group})" if args.group else ""))
        if rendered.missing:
            print(f"{name}: cells without a record; these commands produce them:")
            print("\n".join(f"  {command}" for command in rendered.missing))
    return 1 if args.figures and set(args.figures) <= set(empty) else 0


def folders(results: Path, group: str | None) -> list[Path]:
    """The folders a figure reads: the results folder, and each named group's folder in it."""
    return [results] + [results / name for name in (group.split(",") if group else [])]


if __name__ == "__main__":
    raise SystemExit(main())
