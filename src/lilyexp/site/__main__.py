"""``python -m lilyexp.site [--results DIR] [--out DIR]``: write the static results site (default
results/site/index.html) from the records under ``--results`` (default results/runs) and the tables, studies,
figures and benchmarks beside them. Plots are redrawn only when their records changed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lilyexp.site.build import build_site


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lilyexp.site", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results/runs"), help="the run records' folder")
    parser.add_argument("--out", type=Path, default=Path("results/site"), help="where the site is written")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a folder of run records (results/runs/<group>/*.json).")
    started = time.perf_counter()
    site = build_site(args.results, args.out)
    print(f"wrote {len(site.pages)} pages in {time.perf_counter() - started:.1f} s: {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
