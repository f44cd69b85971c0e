"""Every command's --help states each option's default exactly once."""

import argparse
import importlib
import re

import pytest

from p2ch.config import DefaultsHelpFormatter

COMMANDS = ["synth", "prepcache", "training", "evaluate", "predict"]


def option_helps(parser: argparse.ArgumentParser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._get_help_string(action) % {"default": action.default, "prog": parser.prog}
        yield "/".join(action.option_strings) or action.dest, text


@pytest.mark.parametrize("name", COMMANDS)
def test_each_option_states_its_default_once(name):
    parser = importlib.import_module(f"p2ch.{name}").get_args_parser()
    for option, text in option_helps(parser):
        count = len(re.findall(r"default", text, flags=re.IGNORECASE))
        assert count >= 1, f"p2ch.{name} {option}: help does not state a default: {text!r}"
        assert "(default: None)" not in text or count == 1, f"p2ch.{name} {option}: default stated twice: {text!r}"


def test_formatter_keeps_stated_default_and_adds_missing_one():
    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--a", default=None, help="path (default: $ENV or somewhere)")
    parser.add_argument("--b", default=3, help="count")
    text = parser.format_help()
    assert "(default: None)" not in text
    assert "count (default: 3)" in text


def test_brief_reason_keeps_the_gist_of_an_error_for_a_summary_line():
    from p2ch.cli import brief_reason

    long_name = "1.3.6.1.4.1.14519.5.2.1.6279.6001.263457586692669524372795760886"
    message = (
        f"/data/luna/subset0/{long_name}.mhd: header line 'ElementDataFile = ../../elsewhere/{long_name}… (84 "
        f"characters)' points outside the .mhd's folder (/elsewhere/{long_name}.raw); a data root must be "
        "self-contained: put the data file next to the .mhd, or set P2CH_ALLOW_EXTERNAL_DATA=1"
    )
    assert brief_reason(message) == (
        f"{long_name}.mhd: header line 'ElementDataFile = ../../elsewhere/1.3.6…' points outside the .mhd's folder"
    )
    outside = "/d/annotations.csv: line 2, series 1.2.3: nodule centre (1.5, -2.0, 4644.66) mm is voxel (7160, 5, 7)"
    assert brief_reason(outside + "; fix it") == outside[3:]  # numbers in parentheses stay
    assert brief_reason("x" * 300, limit=50) == "x" * 49 + "…"
