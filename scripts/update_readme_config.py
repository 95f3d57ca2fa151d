"""Regenerate README.md's configuration reference from the config models' docstrings."""

from pathlib import Path

from factory.config import commented_template

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
head, rest = text.split(START)
_, tail = rest.split(END)
readme.write_text(f"{head}{START}\n```yaml\n{commented_template()}\n```\n{END}{tail}")
