"""The gates engine: declarative gate files checked against metrics files.

A gate file (gates/NAME.yaml) names the phase it follows and its criteria. Each criterion
compares a metric (metrics file stem + key path, e.g. `format.rejected_ratio`) with a value:
a number, a boolean, or an expression over other metrics (`baseline.exact_match + 0.10`).
Results go to metrics/gates/NAME.json. A file in the workspace's gates/ overrides the
packaged one of the same name, and factory.yaml's `gates:` section overrides single values.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import yaml

from factory import resources
from factory.config import FactoryConfig
from factory.errors import ConfigError, InputError
from factory.io import load_yaml, read_json_if_exists, write_json
from factory.workspace import Workspace

OPERATORS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}

# A metric reference inside an expression: stem.key[.key...]; hyphens only between letters,
# so `a.b-0.1` reads as a.b minus 0.1 while `gates.training-completed.passed` is one name.
_NAME = r"[A-Za-z_]\w*(?:-[A-Za-z_]\w*)*"
_METRIC_REF = re.compile(rf"{_NAME}(?:\.(?:{_NAME}|\d+))+")
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass(frozen=True)
class Criterion:
    metric: str
    op: str
    value: float | bool | str
    description: str = ""
    optional: bool = False


@dataclass(frozen=True)
class Gate:
    name: str
    after: str
    criteria: tuple[Criterion, ...]
    source: Path
    description: str = ""


class MissingMetric(InputError):
    """A metrics file or key a gate needs is not there (exit 2, with how to produce it)."""


# --- loading -----------------------------------------------------------------------------


def gate_files(ws: Workspace) -> dict[str, Path]:
    """Every gate by name: packaged ones, overridden by the workspace's gates/ folder."""
    files = {p.stem: p for p in sorted(resources.data_dir("gates").glob("*.yaml"))}
    if ws.gates_dir.is_dir():
        files.update({p.stem: p for p in sorted(ws.gates_dir.glob("*.y*ml"))})
    return files


def load_gates(ws: Workspace, cfg: FactoryConfig) -> dict[str, Gate]:
    """Load and validate every gate file; all problems in one ConfigError."""
    gates, problems = {}, []
    for name, path in gate_files(ws).items():
        try:
            gates[name] = _load_gate(path, cfg.gates.get(name, {}))
        except ConfigError as e:
            problems.append(str(e))
    unknown = sorted(set(cfg.gates) - set(gates))
    problems += [f"factory.yaml gates.{n}: no gate of that name (gates: {', '.join(sorted(gates))})" for n in unknown]
    if problems:
        raise ConfigError("\n".join(problems))
    return gates


def _load_gate(path: Path, overrides: dict[str, Any]) -> Gate:
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    validator = jsonschema.Draft202012Validator(resources.schema("gate"))
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  - {'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors]
        raise ConfigError(f"{path}: invalid gate file:\n" + "\n".join(lines))
    if raw["name"] != path.stem:
        raise ConfigError(f"{path}: name {raw['name']!r} must match the file name {path.stem!r}")
    criteria = [Criterion(**c) for c in raw["criteria"]]
    known = {c.metric for c in criteria}
    for metric in overrides:
        if metric not in known:
            raise ConfigError(
                f"factory.yaml gates.{raw['name']}.{metric}: the gate has no criterion on that metric "
                f"(it has: {', '.join(sorted(known))})"
            )
    criteria = [
        Criterion(c.metric, c.op, overrides[c.metric], c.description, c.optional) if c.metric in overrides else c
        for c in criteria
    ]
    for c in criteria:
        if isinstance(c.value, str):
            _parse_expression(c.value, where=f"{path}: criterion {c.metric}")
    return Gate(raw["name"], raw["after"], tuple(criteria), path, raw.get("description", ""))


def in_pipeline_order(results: list[dict], phase_names: list[str]) -> list[dict]:
    """Gate results (metrics/gates/*.json) ordered by the phase each follows, then by name."""
    order = {name: i for i, name in enumerate(phase_names)}
    return sorted(results, key=lambda r: (order.get(r.get("after"), len(order)), r.get("gate", "")))


def last_results(ws: Workspace) -> list[dict]:
    """Every gate's last result (metrics/gates/*.json), in pipeline order: what the report and
    the model cards list."""
    import phases

    results = [g for g in (read_json_if_exists(p) for p in ws.gate_results_dir.glob("*.json")) if g is not None]
    return in_pipeline_order(results, [phase.name for phase in phases.PIPELINE])


def gates_after(gates: dict[str, Gate], phase: str) -> list[Gate]:
    return [g for g in gates.values() if g.after == phase]


# --- checking ----------------------------------------------------------------------------


class MetricReader:
    """Reads metric paths from the workspace's metrics files, each file once per check."""

    def __init__(self, ws: Workspace, producers: dict[str, str]):
        self.ws = ws
        self.producers = producers  # metrics stem -> phase that writes it
        self._files: dict[Path, Any] = {}

    def get(self, path: str) -> Any:
        stem, *keys = path.split(".")
        if stem == "gates":
            file = self.ws.gate_results_dir / f"{keys[0]}.json"
            keys = keys[1:]
            how = f"check that gate first: `factory gate check {path.split('.')[1]}`"
        else:
            file = self.ws.metrics_file(stem)
            producer = self.producers.get(stem)
            how = f"run `factory run {producer}` to produce it" if producer else "no phase writes it; check the metric name"
        data = self._load(file, how)
        value: Any = data
        for i, key in enumerate(keys):
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                have = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
                raise MissingMetric(
                    f"{self.ws.rel(file)}: no key {'.'.join(keys[: i + 1])!r} for metric {path!r} (available: {have})"
                )
        return value

    def _load(self, file: Path, how: str) -> Any:
        if file not in self._files:
            if not file.exists():
                raise MissingMetric(f"{self.ws.rel(file)} not found; {how}")
            try:
                self._files[file] = orjson.loads(file.read_bytes())
            except orjson.JSONDecodeError as e:
                raise MissingMetric(f"{self.ws.rel(file)} is not valid JSON ({e}); re-run the phase that writes it") from None
        return self._files[file]


def check_gate(gate: Gate, ws: Workspace, producers: dict[str, str], run_id: str | None = None) -> dict:
    """Evaluate every criterion, write metrics/gates/NAME.json, return that result."""
    reader = MetricReader(ws, producers)
    rows = [_check_criterion(c, reader) for c in gate.criteria]
    result = {
        "schema_version": 1,
        "gate": gate.name,
        "after": gate.after,
        "passed": all(r["passed"] is not False for r in rows),
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": ws.rel(gate.source),
        "run_id": run_id,
        "criteria": rows,
    }
    write_json(ws.gate_results_dir / f"{gate.name}.json", result)
    return result


def _check_criterion(c: Criterion, reader: MetricReader) -> dict:
    row = {"metric": c.metric, "op": c.op, "value": c.value, "observed": None, "required": None, "passed": None}
    if c.description:
        row["description"] = c.description
    try:
        observed = reader.get(c.metric)
        # a null observation fails as it is (a judge that could not judge): nothing to compute against
        required = _evaluate(c.value, reader) if isinstance(c.value, str) and observed is not None else c.value
    except MissingMetric as e:
        if c.optional:
            row["note"] = f"skipped: {e}"
            return row
        raise
    row["observed"] = observed if isinstance(observed, (int, float, bool, str)) else repr(observed)
    row["required"] = required
    if isinstance(observed, bool) != isinstance(required, bool) and c.op in ("==", "!="):
        row["passed"] = False
        row["note"] = f"observed {type(observed).__name__}, required {type(required).__name__}"
    elif not isinstance(observed, (int, float)) or (isinstance(observed, float) and math.isnan(observed)):
        row["passed"] = c.op == "==" and observed == required or c.op == "!=" and observed != required
        if not isinstance(observed, bool):
            row["note"] = f"observed value is not a number: {observed!r}"
    else:
        row["passed"] = bool(OPERATORS[c.op](observed, required))
    return row


# --- expressions -------------------------------------------------------------------------


def _parse_expression(text: str, where: str) -> tuple[ast.expr, list[str]]:
    """Parse 'baseline.exact_match + 0.10' into an AST whose names are metric references."""
    refs: list[str] = []

    def placeholder(match: re.Match) -> str:
        refs.append(match.group(0))
        return f"__m{len(refs) - 1}"

    try:
        tree = ast.parse(_METRIC_REF.sub(placeholder, text.strip()), mode="eval").body
    except SyntaxError:
        tree = None
    if tree is None or not _allowed(tree):
        raise ConfigError(
            f"{where}: cannot read value {text!r}; use a number, true/false, or metric paths with + - * / "
            "and numbers, e.g. 'baseline.exact_match + 0.10'"
        )
    return tree, refs


def _allowed(node: ast.AST) -> bool:
    if isinstance(node, ast.BinOp):
        return type(node.op) in _ARITHMETIC and _allowed(node.left) and _allowed(node.right)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.USub, ast.UAdd)) and _allowed(node.operand)
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    return isinstance(node, ast.Name) and node.id.startswith("__m")


def _evaluate(text: str, reader: MetricReader) -> float:
    tree, refs = _parse_expression(text, where="gate")
    values = [reader.get(r) for r in refs]

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.BinOp):
            return _ARITHMETIC[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.Constant):
            return node.value
        value = values[int(node.id[3:])]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MissingMetric(f"metric {refs[int(node.id[3:])]!r} is {value!r}, not a number, in {text!r}")
        return value

    return ev(tree)
