"""Secrets from the environment (HF_TOKEN, OPENAI_API_KEY, ...) never reach a file the factory
writes: the log, the status files and error messages pass through `redact`."""

from __future__ import annotations

import logging
import os
import re

# Variable names that hold credentials: a part TOKEN, KEY, SECRET, PASSWORD, ... of NAME_PARTS.
SECRET_NAME = re.compile(r"(^|_)(TOKEN|KEY|APIKEY|SECRET|PASSWORD|PASSWD|PASS|CREDENTIALS?|AUTH)(_|$)", re.I)
MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") would blank out ordinary words
MASK = "[redacted]"


def secret_values(environ=None) -> list[str]:
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items() if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)  # a secret containing another is masked whole


def redact(text: str, environ=None) -> str:
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return text


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output (message, arguments, traceback) has the secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
