"""Files that ship with the package: JSON Schemas and the default gate files.

In the repo they sit at the top level (`schemas/`, `gates/`); in a wheel they are inside
`factory/_data/`. Look in the wheel location first, then the source tree.
"""

from __future__ import annotations

import functools
from pathlib import Path

import orjson

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"packaged folder {name!r} not found; is factory installed correctly?")


@functools.cache
def schema(name: str) -> dict:
    """A JSON Schema by stem, e.g. schema("status") for schemas/status.schema.json."""
    return orjson.loads((data_dir("schemas") / f"{name}.schema.json").read_bytes())


def validate(instance: object, schema_name: str) -> None:
    """Raise jsonschema.ValidationError when `instance` does not match the schema."""
    import jsonschema

    jsonschema.validate(instance, schema(schema_name), cls=jsonschema.Draft202012Validator)
