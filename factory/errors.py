"""The errors a user can cause, and the exit code each maps to.

Everything a user can fix (bad config, bad input, a missing file, a failed gate) raises a
subclass of FactoryError; the CLI turns it into a message and an exit code in one place.
Any other exception is a bug and is reported as one.
"""

from __future__ import annotations

EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class FactoryError(Exception):
    """Base class for problems the user can fix. The message says what and how."""

    exit_code = EXIT_USAGE


class ConfigError(FactoryError):
    """factory.yaml (or a gate file) is invalid; the message lists every problem."""


class InputError(FactoryError):
    """Input data or a required file is missing or unusable."""


class GateFailed(FactoryError):
    """A gate's criteria were not met. Carries the results for the report."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, results: list | None = None):
        super().__init__(message)
        self.results = results or []


class Cancelled(BaseException):
    """Raised on SIGTERM so that the runner can record a final state, like Ctrl-C."""
