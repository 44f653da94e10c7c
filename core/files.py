"""Files discount-train and discountctl write appear whole or not at all: each is written beside
its final name and renamed over it once complete, so an interrupted or failed run (Ctrl-C, a
full disk) leaves the previous files, never a truncated one that reads as valid."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path


def replace_files(writers: Mapping[Path, Callable[[Path], object]]) -> None:
    """Call each writer on a temporary path beside its target; only once every one has
    succeeded are they renamed into place, one rename after another, so a failed or interrupted
    write leaves every target as it was (only a crash between two renames, an instant, could
    split files that belong together)."""
    written: dict[Path, Path] = {}
    try:
        for target, write in writers.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Created by the writer, so with the user's umask; the suffix kept, since matplotlib
            # picks the image format by it.
            temporary = target.with_name(f".{target.stem}.{secrets.token_hex(6)}{target.suffix}")
            written[target] = temporary
            write(temporary)
        for target, temporary in written.items():
            os.replace(temporary, target)
    finally:
        for temporary in written.values():
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()


def replace_text(path: Path, text: str) -> None:
    replace_files({path: lambda tmp: tmp.write_text(text)})
