"""Exceptions for user and data errors: each message names the thing, the value, and the fix.

Commands catch `P2chError` at their `main` and print its message as one line (exit code 2),
so expected failures never end in a traceback.
"""

from __future__ import annotations


class P2chError(Exception):
    """Base class for errors a user can fix (bad input, missing data, bad settings)."""


class DataNotFoundError(P2chError, FileNotFoundError):
    """A data file or folder the command needs is missing."""


class DataFormatError(P2chError, ValueError):
    """A data file exists but its content is not what LUNA16's format prescribes."""


class ConfigError(P2chError, ValueError):
    """A setting (flag, environment variable, argument) has an unusable value."""


class CandidateOutsideCtError(DataFormatError):
    """A candidate centre lies outside the CT volume it names."""
