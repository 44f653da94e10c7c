"""Every `discount-train` command explains itself with an example."""

from __future__ import annotations

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
