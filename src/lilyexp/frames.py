"""Run records as a table for a researcher's own analysis: ``lilyexp.records.to_dataframe(results_dir,
group=...)`` gives one pandas row per record with its identity, the settings that differ between the records, its
final metrics, parameter counts, timing and status (pandas is imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lilyexp.errors import ConfigError
from lilyexp.tables.build import read_records

IDENTITY_COLUMNS = ("backbone", "task", "method", "seed")


def flat(prefix: str, values: dict | None) -> dict[str, Any]:
    return {f"{prefix}{key}": value for key, value in (values or {}).items()
            if isinstance(value, (int, float, str, bool)) or value is None}


def row_of(record: dict) -> dict[str, Any]:
    path = Path(record["_path"])
    identity = record.get("identity") or {}
    row = {"group": path.parent.name, "run": path.stem, "status": record.get("status"), "path": str(path),
           **{column: identity.get(column, (record.get("config") or {}).get(column)) for column in IDENTITY_COLUMNS}}
    settings = {key: value for key, value in identity.items() if key not in (*IDENTITY_COLUMNS, "version")}
    row.update({f"setting.{key}": value if not isinstance(value, (list, dict)) else str(value)
                for key, value in settings.items()})
    metrics = record.get("metrics") or {}
    row.update(flat("final.", metrics.get("final")))
    row["selection"] = (metrics.get("selection") or {}).get("rule")
    row.update(flat("params.", record.get("params")))
    row.update(flat("timing.", record.get("timing")))
    row["error"] = record.get("error")
    return row


def to_dataframe(results_dir: str | Path = "results/runs", group: str | list[str] | None = None):
    """One row per record under ``results_dir`` (every group, or ``group``: a name or a list). Setting columns
    that hold the same value in every row are dropped, so what is left is what the runs differ in."""
    try:
        import pandas as pd
    except ImportError:
        raise ConfigError("to_dataframe needs pandas: pip install pandas.") from None
    results = Path(results_dir)
    groups = [group] if isinstance(group, str) else list(group or sorted(p.name for p in results.iterdir()
                                                                         if p.is_dir()))
    missing = [g for g in groups if not (results / g).is_dir()]
    if missing:
        raise ConfigError(f"no record group {', '.join(missing)} in {results}.")
    frame = pd.DataFrame([row_of(record) for record in read_records(results, groups)])
    if frame.empty:
        return frame
    constant = [c for c in frame.columns if c.startswith("setting.") and frame[c].astype(str).nunique() <= 1]
    frame = frame.drop(columns=constant)
    return frame[sorted(frame.columns, key=column_order)]


ORDER = ("group", "run", "status", *IDENTITY_COLUMNS, "setting.", "final.", "selection", "params.", "timing.",
         "error", "path")


def column_order(column: str) -> tuple[int, str]:
    """Identity first, then the settings that differ, metrics, cost, and where the record is."""
    rank = next(i for i, start in enumerate(ORDER) if column == start or (start.endswith(".")
                                                                           and column.startswith(start)))
    return rank, column if ORDER[rank].endswith(".") else ""
