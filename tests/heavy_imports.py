"""Shared by the tests of what a command imports: `python -m factory ARGS` in a subprocess, and
the heavy libraries (a second or more to import, together) it had imported when it exited."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = frozenset({"torch", "transformers", "numpy", "scipy", "datasets", "llama_cpp", "openai", "peft", "trl",
                   "unsloth", "accelerate", "pandas", "pyarrow"})
MARK = "heavy modules at exit: "

# The command as `python -m factory` runs it; at exit (after the command's own sys.exit), what it
# had imported. atexit runs its functions last-registered first: this one runs after all others.
_WRAPPER = (
    "import atexit, json, runpy, sys\n"
    f"heavy = {sorted(HEAVY)!r}\n"
    "atexit.register(lambda: print(" + repr(MARK) + " + json.dumps(sorted({m.split('.')[0] for m in sys.modules} "
    "& set(heavy))), file=sys.stderr))\n"
    "sys.argv = ['factory', *sys.argv[1:]]\n"
    "runpy.run_module('factory', run_name='__main__', alter_sys=True)\n"
)


def run_factory(*args, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The finished command (its output without the report line) and the heavy libraries it imported."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *map(str, args)], capture_output=True, text=True,
                          env=env or os.environ, timeout=timeout)
    lines = proc.stderr.splitlines()
    reports = [line for line in lines if line.startswith(MARK)]
    assert len(reports) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc.stderr = "\n".join(line for line in lines if not line.startswith(MARK)) + "\n"
    return proc, json.loads(reports[0][len(MARK):])
