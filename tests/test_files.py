"""Files that discount-train and discountctl write appear whole or not at all (core/files.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from core.files import replace_files
from trainer.cli import main


def test_files_that_belong_together_are_replaced_together_or_not_at_all(tmp_path: Path) -> None:
    offers, events = tmp_path / "offers.csv", tmp_path / "events.csv"
    offers.write_text("old offers\n")
    events.write_text("old events\n")

    def full_disk(path: Path) -> None:
        path.write_text("half of the ev")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_files({offers: lambda p: p.write_text("new offers\n"), events: full_disk})
    assert (offers.read_text(), events.read_text()) == ("old offers\n", "old events\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "offers.csv"]

    replace_files({offers: lambda p: p.write_text("new offers\n"), events: lambda p: p.touch()})
    assert (offers.read_text(), events.read_text()) == ("new offers\n", "")


def test_a_plot_in_a_format_nobody_draws_is_refused_before_the_evaluation(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["evaluate-policy", "--plot", str(tmp_path / "plot.txt")])
    assert result.exit_code == 2
    assert "name a .png, .svg or .pdf file (the format follows the suffix)" in result.output
    assert not list(tmp_path.iterdir())
