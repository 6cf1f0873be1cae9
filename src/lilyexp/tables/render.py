"""Markdown, LaTeX and CSV renderings of a built table in the paper's layout: per method our value (mean ± std
over seeds, n), the paper's value with its provenance mark, and the difference; parameter counts beside them."""

from __future__ import annotations

import csv
import io

from lilyexp.tables.build import PROVENANCE_MARKS, SELECTIONS, Cell, Table

MISSING = "—"


def fmt(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def fmt_count(count: int) -> str:
    """A parameter count readable at every scale: 0.533M, 62.0K, 128."""
    if count >= 100_000:
        return f"{count / 1e6:.3f}M"
    return f"{count / 1e3:.1f}K" if count >= 1_000 else str(count)


def fmt_params(counts: list[int]) -> str:
    if not counts:
        return MISSING
    low, high = min(counts), max(counts)
    return fmt_count(low) if low == high else f"{fmt_count(low)}–{fmt_count(high)}"


def ours_text(cell: Cell, digits: int) -> str:
    if cell.mean is None:
        return "failed" if cell.failed else MISSING
    chosen = f" [{cell.chosen}]" if cell.chosen else ""
    if cell.statistic == "median":
        return f"{cell.median:.{digits}f} (median, n={cell.n}){chosen}"
    spread = f" ± {cell.std:.{digits}f}" if cell.std is not None and cell.n > 1 else ""
    return f"{cell.mean:.{digits}f}{spread} (n={cell.n}){chosen}"


def paper_value(row: dict, label: str) -> float | None:
    return (row.get("paper") or {}).get("values", {}).get(label)


def provenance(row: dict) -> str:
    return (row.get("paper") or {}).get("provenance", "not recovered")


def delta_text(cell: Cell | None, paper: float | None, digits: int) -> str:
    if cell is None or cell.shown is None or paper is None:
        return MISSING
    return f"{cell.shown - paper:+.{digits}f}"


def lines_of(table: Table) -> list[tuple[str, str, list[str]]]:
    """(row label, params, cells) per printed line: ours, paper, Δ for rows we run; paper only for the rest."""
    digits = table.spec.get("digits", 1)
    labels = [c["label"] for c in table.spec["columns"]]
    out = []
    for entry in table.rows:
        row, cells = entry["row"], entry["cells"]
        name = f"{row['label']} ({row['section']})" if row.get("section") else row["label"]
        paper = row.get("paper") or {}
        if cells:
            params = sorted({p for c in cells.values() for p in c.params})
            out.append((f"{name} — ours", fmt_params(params), [ours_text(cells[label], digits) for label in labels]))
        if paper.get("values") or not cells:
            mark = PROVENANCE_MARKS.get(provenance(row), "")
            values = [fmt(paper_value(row, label), digits) for label in labels]
            out.append((f"{name} — paper{mark}", str(paper.get("params") or MISSING), values))
            if any(c.mean is not None for c in cells.values()):
                out.append((f"{name} — Δ", "",
                            [delta_text(cells[label], paper_value(row, label), digits) for label in labels]))
    return out


def notes_of(table: Table) -> list[str]:
    spec = table.spec
    notes = [f"Selection: {SELECTIONS[table.selection][2]}.", *spec.get("notes", [])]
    marks = sorted({provenance(e["row"]) for e in table.rows if (e["row"].get("paper") or {}).get("values")})
    legend = [f"{PROVENANCE_MARKS[m] or '(no mark)'} {m}" for m in marks if m in PROVENANCE_MARKS]
    if legend:
        notes.append("Paper numbers' provenance: " + "; ".join(legend) + " (see lilyexp/tables/specs/"
                     f"{spec['name']}.yaml for each source).")
    for entry in table.rows:
        if entry["row"].get("paper", {}).get("source"):
            notes.append(f"{entry['row']['label']}: paper numbers from {entry['row']['paper']['source']}.")
    failed = sorted({reason for e in table.rows for c in e["cells"].values() for reason in c.failed})
    notes += [f"failed: {reason}" for reason in failed]
    commands = sorted({command for e in table.rows for command in missing_commands(e)})
    if commands:
        notes.append("Cells shown as — have no record yet; these commands produce them:")
        notes += [f"    {command}" for command in commands]
    blocked = sorted({e["row"]["blocked"] for e in table.rows if e["row"].get("blocked")})
    notes += [f"Not runnable yet: {reason}" for reason in blocked]
    return notes


def missing_commands(entry: dict) -> list[str]:
    """The commands that fill a row's missing cells; one sweep command (``command_all``) when none has a record."""
    cells = entry["cells"].values()
    if entry["row"].get("command_all") and cells and all(c.mean is None and not c.failed for c in cells):
        return [entry["row"]["command_all"]]
    return [c.command for c in cells if c.command]


def markdown(table: Table) -> str:
    labels = [c["label"] for c in table.spec["columns"]]
    head = f"## {table.spec['title']}\n\n"
    lines = ["| method | params | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
    lines += [f"| {name} | {params} | " + " | ".join(cells) + " |" for name, params, cells in lines_of(table)]
    notes = "\n".join(f"- {n}" if not n.startswith("    ") else f"  `{n.strip()}`" for n in notes_of(table))
    return head + "\n".join(lines) + "\n\n" + notes + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
LATEX_SYMBOLS = {"±": r"$\pm$", "—": "--", "–": "--", "Δ": r"$\Delta$", "†": r"$^\dagger$", "‡": r"$^\ddagger$",
                 "§": r"\S{}", "×": r"$\times$"}


def latex_escape(text: str) -> str:
    escaped = "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)
    for symbol, command in LATEX_SYMBOLS.items():
        escaped = escaped.replace(symbol, command)
    return escaped.encode("ascii", "replace").decode()


def latex(table: Table) -> str:
    labels = [c["label"] for c in table.spec["columns"]]
    body = [r"\begin{table}[t]", r"\centering", r"\scriptsize",
            r"\begin{tabular}{ll" + "r" * len(labels) + "}", r"\hline",
            " & ".join(["Method", "Params", *map(latex_escape, labels)]) + r" \\", r"\hline"]
    for name, params, cells in lines_of(table):
        body.append(" & ".join(latex_escape(x) for x in (name, params, *cells)) + r" \\")
    body += [r"\hline", r"\end{tabular}",
             r"\caption{" + latex_escape(table.spec["title"] + ". " + SELECTIONS[table.selection][2]) + "}",
             r"\end{table}"]
    return "\n".join(body) + "\n"


def csv_text(table: Table) -> str:
    """Long format: one line per (row, column, source), for spreadsheets and plots."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "selection", "row", "section", "column", "source", "value", "std", "n", "seeds",
                     "params", "chosen", "status", "provenance", "median"])
    for entry in table.rows:
        row, cells = entry["row"], entry["cells"]
        base = [table.spec["name"], table.selection, row["label"], row.get("section", "")]
        for column in table.spec["columns"]:
            label = column["label"]
            cell = cells.get(label)
            if cell is not None:
                status = "ok" if cell.mean is not None else ("failed" if cell.failed else "missing")
                writer.writerow([*base, label, "ours", "" if cell.mean is None else f"{cell.mean:.4f}",
                                 "" if cell.std is None else f"{cell.std:.4f}", cell.n,
                                 " ".join(map(str, cell.seeds)), " ".join(map(str, sorted(set(cell.params)))),
                                 cell.chosen or "", status, "", "" if cell.median is None else f"{cell.median:.4f}"])
            value = paper_value(row, label)
            if value is not None:
                writer.writerow([*base, label, "paper", value, "", "", "", (row.get("paper") or {}).get("params", ""),
                                 "", "ok", provenance(row), ""])
    return buffer.getvalue()
