"""The pages of the results site, from what is on disk: the run records (and their step logs, predictions and
images), the paper tables built by :mod:`lilyexp.tables` from those records, the studies, the figures and the
benchmarks. Pages are Jinja2 templates; links are relative, so the site opens from disk and can be moved with
the results folder."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markdown_it import MarkdownIt

from lilyexp.records import beside
from lilyexp.site.plots import run_curves, sweep_plot
from lilyexp.tables.build import PROVENANCE_MARKS, SELECTIONS, build, load_spec, read_records, spec_names
from lilyexp.tables.render import (delta_text, fmt, fmt_params, missing_commands, ours_text, paper_value,
                                   provenance)

PREDICTIONS_SHOWN = 12


@dataclass
class Site:
    """Where the site reads from and writes to; ``link`` makes a path relative to a page."""

    results: Path  # results/runs
    out: Path  # results/site
    extra: Path  # results/ (tables, studies, figures, bench beside runs)
    pages: list[Path] = field(default_factory=list)

    def link(self, target: Path, page: Path) -> str:
        return Path(os.path.relpath(target.resolve(), page.parent.resolve())).as_posix()

    def run_page(self, record: dict) -> Path:
        path = Path(record["_path"])
        return self.out / "runs" / path.parent.name / f"{path.stem}.html"


def environment() -> Environment:
    return Environment(loader=PackageLoader("lilyexp.site", "templates"), autoescape=select_autoescape(["html"]),
                       trim_blocks=True, lstrip_blocks=True)


def write(site: Site, env: Environment, template: str, page: Path, **context) -> None:
    page.parent.mkdir(parents=True, exist_ok=True)
    root = site.link(site.out / "index.html", page)
    page.write_text(env.get_template(template).render(root=root, **context))
    site.pages.append(page)


# ------------------------------------------------------------------------------------------------ records

def all_records(results: Path) -> dict[str, list[dict]]:
    """Every group's records (oldest first), by group."""
    groups = sorted(p.name for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
    return {group: read_records(results, [group]) for group in groups}


def varying_settings(records: list[dict]) -> list[str]:
    """The identity keys whose values differ between a group's records (the seed aside)."""
    identities = [r.get("identity") or {} for r in records]
    keys = sorted({k for i in identities for k in i if k not in ("seed", "version")})
    return [k for k in keys if len({json.dumps(i.get(k), sort_keys=True, default=str) for i in identities}) > 1]


def final_numbers(record: dict) -> dict:
    final = (record.get("metrics") or {}).get("final") or {}
    return {k: v for k, v in final.items() if isinstance(v, (int, float))}


def run_row(site: Site, record: dict, page: Path, settings: list[str]) -> dict:
    identity = record.get("identity") or {}
    config = record.get("config") or {}
    return {"name": Path(record["_path"]).stem, "link": site.link(site.run_page(record), page),
            "status": record.get("status"), "seed": config.get("seed"),
            "method": (config.get("method") or {}).get("name"),
            "settings": {k: identity.get(k) for k in settings}, "final": final_numbers(record)}


# ------------------------------------------------------------------------------------------------ run pages

def predictions_sample(record_path: Path) -> list[dict]:
    path = beside(record_path, "predictions.jsonl")
    if not path.exists():
        return []
    lines = path.read_text().splitlines()[:PREDICTIONS_SHOWN]
    return [json.loads(line) for line in lines if line.strip()]


def images_of(site: Site, record: dict, page: Path) -> list[dict]:
    samples = (record.get("dreambooth") or {}).get("samples") or []
    folder = Path(record["_path"]).parent
    return [{"prompt": s.get("prompt"), "src": site.link(folder / s["path"], page)} for s in samples
            if (folder / s.get("path", "")).exists()]


def rerun_command(record: dict) -> str:
    return " ".join(["python -m lilyexp.run", *(record.get("overrides") or [])])


def run_context(site: Site, record: dict) -> dict:
    path, page = Path(record["_path"]), site.run_page(record)
    metrics = record.get("metrics") or {}
    plot = page.with_suffix(".png")
    drawn = run_curves(record, beside(path, "steps.jsonl"), plot)
    adapter = (record.get("adapter") or {}).get("path")
    env = record.get("env") or {}
    return {"record": record, "name": path.stem, "group": path.parent.name, "status": record.get("status"),
            "reason": record.get("error") or (record.get("interrupted") and json.dumps(record["interrupted"])),
            "overrides": record.get("overrides") or [], "identity": record.get("identity") or {},
            "final": final_numbers(record), "selection": metrics.get("selection") or {},
            "best": metrics.get("best") or {}, "params": record.get("params") or {},
            "timing": record.get("timing") or {}, "device": env.get("device"),
            "packages": env.get("packages") or {}, "plot": plot.name if drawn else None,
            "predictions": predictions_sample(path), "images": images_of(site, record, page),
            "adapter": adapter, "rerun": rerun_command(record),
            "record_link": site.link(path, page), "group_link": site.link(group_page(site, path.parent.name), page)}


def group_page(site: Site, group: str) -> Path:
    return site.out / "groups" / f"{group}.html"


# ------------------------------------------------------------------------------------------------ tables

def table_context(site: Site, name: str, records_by_group: dict[str, list[dict]]) -> dict:
    """A paper table under each of its selection rules: per row our value (linked to its runs), the paper's with
    its provenance mark, and the difference; a missing cell shows the command that fills it."""
    spec, page = load_spec(name), site.out / "tables" / f"{name}.html"
    records = [r for group in spec["groups"] for r in records_by_group.get(group, [])]
    labels = [c["label"] for c in spec["columns"]]
    views = []
    for selection in spec.get("selections", ["best_epoch"]):
        table, digits, rows = build(spec, records, selection), spec.get("digits", 1), []
        for entry in table.rows:
            row, cells = entry["row"], entry["cells"]
            mark = PROVENANCE_MARKS.get(provenance(row), "")
            line = {"label": row["label"] + (f" ({row['section']})" if row.get("section") else ""),
                    "commands": missing_commands(entry),
                    "params": fmt_params(sorted({p for c in cells.values() for p in c.params})) if cells else
                    str((row.get("paper") or {}).get("params") or "—"), "cells": []}
            for label in labels:
                cell, paper = cells.get(label), paper_value(row, label)
                line["cells"].append({
                    "ours": ours_text(cell, digits) if cell and (cell.mean is not None or cell.failed) else None,
                    "sort": cell.shown if cell and cell.shown is not None else "",
                    "paper": None if paper is None else f"{fmt(paper, digits)}{mark}",
                    "delta": delta_text(cell, paper, digits) if cell else None,
                    "runs": [site.link(site.run_page({"_path": p}), page) for p in (cell.records if cell else [])],
                    "command": cell.command if cell else None})
            rows.append(line)
        views.append({"selection": selection, "rule": SELECTIONS[selection][2], "rows": rows})
    filled = sum(1 for c in views[0]["rows"] for cell in c["cells"] if cell["ours"] and cell["sort"] != "")
    return {"name": name, "title": spec["title"], "labels": labels, "views": views, "filled": filled,
            "notes": spec.get("notes", []), "groups": spec["groups"]}


def headline(view: dict, labels: list[str]) -> list[dict]:
    """A table's last column (its average, where it has one) per row, for the index."""
    return [{"label": row["label"], **row["cells"][-1],
             "command": row["cells"][-1]["command"] or next(iter(row["commands"]), None)}
            for row in view["rows"]] if labels else []


# ------------------------------------------------------------------------------------------------ studies, bench

def markdown_page(text: str, source_dir: Path, site: Site, page: Path) -> str:
    """A Markdown file as HTML, its relative image and file links rewritten to point from the page."""
    html = MarkdownIt("commonmark").enable("table").render(text)
    return RELATIVE_LINK.sub(lambda m: f'{m.group(1)}="{site.link(source_dir / m.group(2), page)}"', html)


RELATIVE_LINK = re.compile(r'(src|href)="([^"#/:][^":]*)"')  # no scheme, not absolute, not an anchor


def verdicts(study_json: Path) -> list[dict]:
    data = json.loads(study_json.read_text())
    out = []
    for endpoint, entry in (data.get("endpoints") or {}).items():
        for method, numbers in (entry.get("methods") or {}).items():
            if (numbers or {}).get("verdict"):
                ci = ((numbers.get("difference") or {}).get("estimate") or {}).get("ci_t") or [None, None]
                mean = ((numbers.get("difference") or {}).get("estimate") or {}).get("mean")
                out.append({"endpoint": endpoint, "method": method, "reference": data.get("reference"),
                            "verdict": numbers["verdict"], "mean": mean, "ci": ci})
    return out


def studies(site: Site, env: Environment) -> list[dict]:
    listed = []
    for markdown in sorted((site.extra / "studies").glob("*.md")):
        page = site.out / "studies" / f"{markdown.stem}.html"
        data = markdown.with_suffix(".json")
        found = verdicts(data) if data.exists() else []
        group = f"study_{markdown.stem}"
        write(site, env, "page.html", page, title=f"Study {markdown.stem}",
              body=markdown_page(markdown.read_text(), markdown.parent, site, page),
              links=[("the study's runs", site.link(group_page(site, group), page))]
              if (site.results / group).is_dir() else [])
        listed.append({"name": markdown.stem, "link": site.link(page, site.out / "index.html"), "verdicts": found})
    return listed


def benchmarks(site: Site, env: Environment) -> list[dict]:
    listed = []
    for markdown in sorted((site.extra / "bench").glob("*.md")):
        page = site.out / "bench" / f"{markdown.stem}.html"
        text = markdown.read_text()
        write(site, env, "page.html", page, title=f"Benchmark {markdown.stem}",
              body=markdown_page(text, markdown.parent, site, page), links=[])
        title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), markdown.stem)
        listed.append({"name": markdown.stem, "title": title, "link": site.link(page, site.out / "index.html")})
    return listed


# ------------------------------------------------------------------------------------------------ the site

def build_site(results: Path, out: Path) -> Site:
    """Every page; returns the site with the pages written."""
    site, env = Site(results=results, out=out, extra=results.parent), environment()
    out.mkdir(parents=True, exist_ok=True)
    by_group = all_records(results)
    counts = {}
    for group, records in by_group.items():
        counts[group] = Counter(r.get("status") for r in records)
        settings = varying_settings(records)
        page = group_page(site, group)
        rows = [run_row(site, r, page, settings) for r in records]
        metrics = sorted({m for row in rows for m in row["final"]})[:8]
        swept = next((s for s in settings if all(isinstance(row["settings"].get(s), (int, float))
                                                  for row in rows if row["settings"].get(s) is not None)
                      and any(row["settings"].get(s) is not None for row in rows)), None)
        plot = page.with_suffix(".png")
        sources = [Path(r["_path"]) for r in records]
        drawn = bool(swept and metrics and sweep_plot(rows, swept, metrics[0], plot, sources))
        write(site, env, "group.html", page, group=group, rows=rows, settings=settings, metrics=metrics,
              plot=plot.name if drawn else None, counts=counts[group])
        for record in records:
            write(site, env, "run.html", site.run_page(record), **run_context(site, record))
    index = out / "index.html"
    tables = [table_context(site, name, by_group) for name in spec_names()]
    for table in tables:
        page = site.out / "tables" / f"{table['name']}.html"
        write(site, env, "table.html", page, **table)
        table["link"], table["headline"] = site.link(page, index), headline(table["views"][0], table["labels"])
        table["headline_label"] = table["labels"][-1] if table["labels"] else ""
        for row in table["headline"]:  # the index sits two folders above the run pages the table links to
            row["runs"] = [site.link(site.out / "tables" / link, index) for link in row["runs"]]
    figures = [{"name": p.stem, "src": site.link(p, index)} for p in sorted((site.extra / "figures").glob("*.png"))]
    write(site, env, "index.html", index, tables=tables, studies=studies(site, env), figures=figures,
          benchmarks=benchmarks(site, env),
          groups=[{"name": g, "link": site.link(group_page(site, g), index), "counts": dict(c)}
                  for g, c in counts.items()],
          totals=dict(sum(counts.values(), Counter())))
    return site
