"""docs/BENCHMARKS.md is written by several commands, each owning one '## ' section."""

from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, heading: str, body: str, *, keep: str = "", before: str = "") -> None:
    """Replace the section that starts at heading (up to the next '## ' heading) with heading
    and body; the part of the old section from the line `keep` on (hand-written notes) stays at
    its end. A new section goes before the heading `before` when the file has it, else last."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.strip(chr(10))}\n"
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        stop = end + 1 if end >= 0 else len(text)
        kept = text.find(keep, start, stop) if keep else -1
        if kept >= 0:
            section += "\n" + text[kept:stop].rstrip() + "\n"
        head, tail = text[:start], text[stop:]
    else:
        at = text.find("\n" + before) + 1 if before and "\n" + before in text else len(text)
        head, tail = text[:at].rstrip() + "\n\n", text[at:]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(head + section + ("\n" + tail if tail.strip() else ""))
