"""The Markdown summaries of run records: every number from a record, seeds aggregated correctly."""

from __future__ import annotations

import sys


from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import summarize  # noqa: E402


def test_untuned_row_appears_once_per_distinct_result():
    base = {"status": "finished", "params": {"adapter": 5}, "config": {"method": {"name": "m"}, "seed": 0,
            "backbone": {"name": "b"}}}
    first = {**base, "metrics": {"initial": {"test/accuracy/a": 0.0}, "final": {"test/accuracy/a": 0.5}}}
    second = {**base, "metrics": {"initial": {"test/accuracy/a": 0.0}, "final": {"test/accuracy/a": 0.7}}}
    text = summarize.table([first, second])
    assert text.count("untuned b") == 1 and "50.0" in text and "70.0" in text
