"""The results site (python -m lilyexp.site): rendered from the committed records and from fixture records of every
paradigm and status, every page is well-formed HTML, every link and image resolves to a file, regeneration only
redraws what changed, and a real browser (Debian's chromium through playwright) shows the pages without errors."""

from __future__ import annotations

import copy
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from conftest import REPO
from lilyexp.site.__main__ import main as site_main

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Checker(HTMLParser):
    """Tags balanced (void elements aside), and every href/src collected."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.links, self.errors, self.doctype = [], [], [], False

    def handle_decl(self, decl):
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        self.links += [value for key, value in attrs if key in ("href", "src") and value]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()


def check_pages(out: Path) -> list[Path]:
    pages = sorted(out.rglob("*.html"))
    assert pages
    for page in pages:
        checker = Checker()
        checker.feed(page.read_text())
        checker.close()
        assert checker.doctype and not checker.errors and not checker.stack, (page, checker.errors, checker.stack)
        for link in checker.links:
            parsed = urlparse(link)
            if parsed.scheme or link.startswith("#"):
                continue
            target = (page.parent / unquote(parsed.path)).resolve()
            assert target.exists(), f"{page.relative_to(out)} links to a missing {link}"
    return pages


def committed_results(tmp_path: Path) -> Path:
    """A copy of results/ (records, tables, studies, figures, bench), so the site can be written beside it."""
    results = tmp_path / "results"
    for part in ("runs", "tables", "studies", "figures", "bench"):
        if (REPO / "results" / part).exists():
            shutil.copytree(REPO / "results" / part, results / part)
    return results


@pytest.mark.slow  # end to end over every committed record (make test-fast leaves it out)
def test_the_site_renders_from_the_committed_records_with_every_link_resolving(tmp_path):
    results = committed_results(tmp_path)
    assert site_main(["--results", str(results / "runs"), "--out", str(results / "site")]) == 0
    pages = check_pages(results / "site")
    index = (results / "site" / "index.html").read_text()
    for part in ("Paper tables", "Studies", "Figures", "Benchmarks", "Run groups", "table2", "glue_minilm"):
        assert part in index
    runs = list((results / "site" / "runs").rglob("*.html"))
    assert len(runs) == len([p for p in (results / "runs").rglob("*.json") if "." not in p.stem])
    assert len(pages) > len(runs)


def fixture_records(results: Path) -> dict[str, Path]:
    """One record per paradigm and status, made from committed ones: GLUE, commonsense, VTAB, DreamBooth,
    failed, interrupted, and a schema-1 record."""
    source = REPO / "results" / "runs"
    glue = next((source / "study_glue_minilm").glob("minilm-glue-*.json"))
    commonsense = next((source / "commonsense_smollm2").glob("*.json"))
    dreambooth = next(p for p in (source / "dreambooth_cpu").glob("*.json") if "." not in p.stem)
    v1 = next((source / "demo").glob("*lora*.json"))
    made = {}
    for name, path in (("glue", glue), ("commonsense", commonsense), ("dreambooth", dreambooth), ("v1", v1)):
        folder = results / "runs" / f"fixture_{name}"
        folder.mkdir(parents=True)
        for sibling in path.parent.glob(f"{path.stem}*"):
            (shutil.copytree if sibling.is_dir() else shutil.copy)(sibling, folder / sibling.name)
        made[name] = folder / path.name
    record = json.loads(glue.read_text())
    folder = results / "runs" / "fixture_other"
    folder.mkdir(parents=True)
    vtab = copy.deepcopy(record)
    vtab["config"]["task"] = {"name": "vtab", "subset": "caltech101"}
    vtab["metrics"]["final"] = {"test/accuracy": 0.61}
    failed = {**copy.deepcopy(record), "status": "failed", "metrics": {}, "error": "ConfigError: a reason"}
    interrupted = {**copy.deepcopy(record), "status": "interrupted", "metrics": {},
                   "interrupted": {"signal": "SIGTERM", "after_step": 3, "resume": "trainer.resume=true"}}
    for name, body in (("vtab", vtab), ("failed", failed), ("interrupted", interrupted)):
        made[name] = folder / f"x-{name}-seed0-00000000.json"
        made[name].write_text(json.dumps(body))
    return made


def test_the_site_renders_fixture_records_of_every_paradigm_and_status(tmp_path):
    results = tmp_path / "results"
    made = fixture_records(results)
    assert site_main(["--results", str(results / "runs"), "--out", str(results / "site")]) == 0
    check_pages(results / "site")
    pages = {name: results / "site" / "runs" / path.parent.name / f"{path.stem}.html" for name, path in made.items()}
    assert all(page.exists() for page in pages.values())
    assert "ConfigError: a reason" in pages["failed"].read_text()
    assert "SIGTERM" in pages["interrupted"].read_text()
    assert "<img class=\"plot\"" in pages["glue"].read_text()  # the loss curve of a run with a step log
    assert "Predictions" in pages["commonsense"].read_text() and "Samples" in pages["dreambooth"].read_text()
    group = (results / "site" / "groups" / "fixture_other.html").read_text()
    assert "1 failed" in group and "1 interrupted" in group


def test_regenerating_redraws_only_what_changed(tmp_path):
    results = tmp_path / "results"
    made = fixture_records(results)
    arguments = ["--results", str(results / "runs"), "--out", str(results / "site")]
    site_main(arguments)
    plots = {p: p.stat().st_mtime_ns for p in (results / "site").rglob("*.png")}
    assert plots
    made["glue"].touch()  # a newer record: its curves are redrawn, the others kept
    site_main(arguments)
    redrawn = {p for p, stamp in plots.items() if p.stat().st_mtime_ns != stamp}
    assert redrawn == {results / "site" / "runs" / "fixture_glue" / f"{made['glue'].stem}.png"}


@pytest.mark.slow
def test_a_real_browser_shows_the_index_and_a_run_page_without_errors(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is missing (.ci/run installs it: apt-get install chromium)")
    results = tmp_path / "results"
    made = fixture_records(results)
    site_main(["--results", str(results / "runs"), "--out", str(results / "site")])
    run_page = results / "site" / "runs" / "fixture_glue" / f"{made['glue'].stem}.html"
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page, problems = browser.new_page(viewport={"width": 1200, "height": 1600}), []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        for name, path in (("index", results / "site" / "index.html"), ("run", run_page)):
            page.goto(path.as_uri())
            page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
        loaded = page.evaluate("() => { const p = document.querySelector('img.plot'); "
                               "return p !== null && p.complete && p.naturalWidth > 0; }")
        page.goto((results / "site" / "groups" / "fixture_other.html").as_uri())
        page.click("table.sortable th:nth-child(2)")  # the sorting script runs
        browser.close()
    assert loaded, "the run page's loss plot did not load"
    assert problems == [], problems
    assert (tmp_path / "index.png").stat().st_size > 10_000 and (tmp_path / "run.png").stat().st_size > 10_000
