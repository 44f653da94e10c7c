"""The committed stubs are exactly what `make protos` generates from the .proto files."""

from __future__ import annotations

from pathlib import Path

from tools.protos import ROOT, generate


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    generated = {p.relative_to(tmp_path): p.read_bytes() for p in generate(tmp_path)}
    assert generated, "no stubs generated"
    committed_dir = ROOT / "discount"
    committed = {
        p.relative_to(ROOT): p.read_bytes()
        for p in committed_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    stale = sorted(str(p) for p in generated if committed.get(p) != generated[p])
    extra = sorted(str(p) for p in committed if p not in generated)
    assert not stale and not extra, (
        f"stubs out of date: {stale}, not generated: {extra}; run `make protos`"
    )
