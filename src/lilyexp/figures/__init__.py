"""The paper's figures from run records: ``python -m lilyexp.figures figN [--results DIR] [--out DIR]``.

Each figure is a module ``lilyexp.figures.<name>`` (found by its name, no list to edit) with a
``render(results_dir, out_dir, group=None) -> Rendered``: it reads only run records and the artifacts runs saved,
writes ``<out>/<name>*.png`` and ``.pdf`` with the numbers behind it as ``.csv``, and says which cells are missing
and the commands that fill them.
"""

from __future__ import annotations

import csv
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Rendered:
    """What a figure wrote, and the commands that produce the records it lacks."""

    files: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def figure_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("fig"))


def write_csv(rows: list[dict], path: Path) -> Path:
    """The numbers behind a figure, one row per plotted value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_figure(figure, out_dir: Path, name: str) -> list[Path]:
    """A matplotlib figure as ``<name>.png`` (150 dpi) and ``<name>.pdf``."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(figure)
    return paths
