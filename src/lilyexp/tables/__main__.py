"""Render tables from the records that exist: ``python -m lilyexp.tables [table ...] [--results DIR] [--out DIR]``.

Writes ``<out>/<table>.md``, ``.tex`` and ``.csv``; with no table named, every table. ``--group <name>`` renders a
summary of any record group instead (one row per cell). Runs nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lilyexp.tables.build import build, group_spec, load_spec, read_records, spec_names
from lilyexp.tables.render import csv_text, latex, markdown


def render(name: str, results_dir: Path, out_dir: Path, spec: dict | None = None) -> Path:
    spec = spec or load_spec(name)
    records = read_records(results_dir, spec["groups"])
    tables = [build(spec, records, selection) for selection in spec.get("selections", ["best_epoch"])]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text("\n".join(markdown(t) for t in tables))
    (out_dir / f"{name}.tex").write_text("\n".join(latex(t) for t in tables))
    texts = [csv_text(t) for t in tables]
    (out_dir / f"{name}.csv").write_text(texts[0] + "".join(t.split("\n", 1)[1] for t in texts[1:]))
    return out_dir / f"{name}.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lilyexp.tables", description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="*", help=f"default: all ({', '.join(spec_names())})")
    parser.add_argument("--results", type=Path, default=Path("results/runs"))
    parser.add_argument("--out", type=Path, default=Path("results/tables"))
    parser.add_argument("--group", help="summarise the records of this group (results/runs/<group>) instead")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a folder of run records (results/runs/<group>/*.json).")
    if args.group and not (args.results / args.group).is_dir():
        groups = sorted(p.name for p in args.results.iterdir() if p.is_dir())
        parser.error(f"no record group '{args.group}' in {args.results}; groups there: {', '.join(groups)}.")
    if args.group:
        spec = group_spec(args.group, read_records(args.results, [args.group]))
        print(Path(render(spec["name"], args.results, args.out, spec)).read_text())
        return
    for name in args.tables or spec_names():
        print(f"rendered {render(name, args.results, args.out)}")


if __name__ == "__main__":
    main()
