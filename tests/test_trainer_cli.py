"""Every `discount-train` command explains itself with an example."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from trainer.cli import main


def test_every_command_has_help_with_an_example() -> None:
    assert isinstance(main, click.Group)
    for name in main.commands:
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, result.output
        assert f"Example: discount-train {name} " in result.output, name


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["train"])
    assert result.exit_code == 2
    assert "No such command 'train'" in result.output


def test_without_the_training_extra_the_command_says_what_to_install() -> None:
    """A serving install has discount-train but not pandas or torch: one line, no traceback."""
    probe = (
        "import sys; sys.modules['pandas'] = sys.modules['torch'] = None; "
        "sys.argv = ['discount-train', '--help']; from trainer.entry import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "pip install 'discountd[train]'" in done.stderr


def test_with_the_training_extra_the_entry_point_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from trainer.entry import main; main()", "--help"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "fit" in done.stdout
