"""Every ``autoguide`` subcommand parses and prints its help."""

import pytest

from autoguide_fast.cli import build_parser

COMMANDS = [
    "toy",
    "train",
    "ema",
    "generate",
    "convert",
    "presets",
    "eval",
    "classifier",
    "experiment",
    "sweep",
    "metrics",
    "metrics ref",
    "metrics calc",
    "metrics gen",
    "dataset",
    "dataset convert",
    "dataset encode",
]


def test_every_command_is_listed():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(c for c in COMMANDS if " " not in c)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert f"usage: autoguide {command}" in capsys.readouterr().out
