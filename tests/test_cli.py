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
