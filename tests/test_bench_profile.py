"""`make profile` in miniature: a real discountd under bench.load, sampled by a real py-spy.
Functional only: the section is written where it belongs and names our code; no timing is
asserted."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from bench import profile
from bench.doc import write_section

DOC = "# Benchmarks\n\n## Serving performance\n\ntable\n\n## Soak\n\nsoak\n"


def test_profile_writes_its_section_between_serving_and_soak(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(DOC)
    result = CliRunner().invoke(
        profile.main,
        ["--calls", "offers", "--items", "300", "--users", "40", "--seconds", "1",
         "--concurrency", "4", "--cache", str(tmp_path / "cache"), "--doc", str(doc)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert text.index("table") < text.index("## Serving profile") < text.index("## Soak\n\nsoak")
    section = text[text.index("## Serving profile") : text.index("## Soak")]
    assert "### GetOffers, 20 items, tiered_topk" in section
    event_loop = re.search(r"\| event loop \(main thread\) \| (\d+\.\d+) \|", section)
    assert event_loop and float(event_loop.group(1)) > 0
    assert "| **server, all threads** |" in section
    assert "`get_offers (server/offers.py)`" in section  # the handler, among the top functions


def test_a_rewrite_replaces_the_section_and_keeps_the_others(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(DOC)
    write_section(doc, profile.SECTION, "first", before="## Soak")
    write_section(doc, profile.SECTION, "second", before="## Soak")
    assert doc.read_text() == (
        "# Benchmarks\n\n## Serving performance\n\ntable\n\n## Serving profile\n\nsecond\n\n"
        "## Soak\n\nsoak\n"
    )


def test_raw_stacks_are_cut_at_the_event_loop_and_lines_of_a_function_add_up() -> None:
    loop = "<module> (discountd:6);BaseEventLoop._run_once (asyncio/base_events.py:1922)"
    raw = (
        f"thread (101): MainThread;{loop};get_offers (server/offers.py:190);sign (core/t.py:3) 3\n"
        f"thread (101): MainThread;{loop};get_offers (server/offers.py:200) 1\n"
        "thread (42): asyncio_0;Thread.run (threading.py:982);_write (server/offer_log.py:9) 4\n"
    )
    names, stacks = profile.parse_raw(raw)
    assert names == {101: "MainThread", 42: "asyncio_0"}
    total, inclusive, own = profile.shares(stacks, top=10)
    assert total == 8
    assert dict(inclusive) == {
        "get_offers (server/offers.py)": 0.5,
        "sign (core/t.py)": 0.375,
        "_write (server/offer_log.py)": 0.5,
    }
    assert dict(own) == {
        "sign (core/t.py)": 0.375,
        "get_offers (server/offers.py)": 0.125,
        "_write (server/offer_log.py)": 0.5,
    }
