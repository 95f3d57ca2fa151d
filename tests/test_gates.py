"""The gates engine on crafted metrics: pass, fail, expressions, overrides, missing files."""

import json

import pytest

from factory.config import parse_config
from factory.errors import ConfigError
from factory.gates import MissingMetric, check_gate, load_gates
from factory.resources import validate
from factory.workspace import Workspace

PRODUCERS = {"format": "format", "split": "split", "baseline": "baseline", "evaluation": "evaluate"}


def metrics(ws, stem, data):
    ws.metrics_dir.mkdir(parents=True, exist_ok=True)
    ws.metrics_file(stem).write_text(json.dumps(data))


@pytest.fixture
def ws(tmp_path):
    return Workspace.at(tmp_path)


def test_shipped_gate_files_are_valid(ws):
    gates = load_gates(ws, parse_config({}))
    assert {"data-valid", "splits-ready", "baseline-established", "model-performance", "quantization-verified"} <= set(gates)
    assert gates["data-valid"].after == "format"


def test_data_valid_passes_and_fails(ws):
    gate = load_gates(ws, parse_config({}))["data-valid"]
    metrics(ws, "format", {"files_incomplete": 0, "rejected_ratio": 0.005, "records_out": 500})
    result = check_gate(gate, ws, PRODUCERS)
    assert result["passed"] is True
    validate(result, "gate-result")
    assert json.loads((ws.gate_results_dir / "data-valid.json").read_text()) == result

    metrics(ws, "format", {"files_incomplete": 0, "rejected_ratio": 0.2, "records_out": 500})
    result = check_gate(gate, ws, PRODUCERS)
    assert result["passed"] is False
    row = next(c for c in result["criteria"] if c["metric"] == "format.rejected_ratio")
    assert (row["observed"], row["required"], row["passed"]) == (0.2, 0.01, False)


def test_threshold_expression_references_another_metric(ws):
    gate = load_gates(ws, parse_config({}))["model-performance"]
    metrics(ws, "evaluation", {"comparison": {"baseline": 0.05, "finetuned": 0.14, "p_value": 0.01}})
    (ws.gate_results_dir).mkdir(parents=True)
    (ws.gate_results_dir / "training-completed.json").write_text(json.dumps({"passed": True}))
    result = check_gate(gate, ws, PRODUCERS)
    row = result["criteria"][0]
    assert row["required"] == pytest.approx(0.15) and row["passed"] is False
    # the optional regression criterion has no metric: skipped, not failed
    assert result["criteria"][3]["passed"] is None and "skipped" in result["criteria"][3]["note"]

    metrics(ws, "evaluation", {"comparison": {"baseline": 0.05, "finetuned": 0.9, "p_value": 0.001}})
    assert check_gate(gate, ws, PRODUCERS)["passed"] is True


def test_missing_metrics_file_says_how_to_produce_it(ws):
    gate = load_gates(ws, parse_config({}))["splits-ready"]
    with pytest.raises(MissingMetric, match=r"metrics/split.json not found; run `factory run split`"):
        check_gate(gate, ws, PRODUCERS)
    metrics(ws, "split", {"counts": {"test": 30, "train": 100}})
    with pytest.raises(MissingMetric, match=r"no key 'leakage' for metric 'split.leakage.total' \(available: counts\)"):
        check_gate(gate, ws, PRODUCERS)


def test_config_overrides_a_threshold(ws):
    cfg = parse_config({"gates": {"data-valid": {"format.records_out": 5}}})
    gate = load_gates(ws, cfg)["data-valid"]
    metrics(ws, "format", {"files_incomplete": 0, "rejected_ratio": 0.0, "records_out": 7})
    assert check_gate(gate, ws, PRODUCERS)["passed"] is True
    with pytest.raises(ConfigError, match="gates.data-valid.format.nope: the gate has no criterion"):
        load_gates(ws, parse_config({"gates": {"data-valid": {"format.nope": 1}}}))
    with pytest.raises(ConfigError, match="gates.no-such-gate: no gate of that name"):
        load_gates(ws, parse_config({"gates": {"no-such-gate": {}}}))


def test_workspace_gate_file_overrides_packaged_and_is_validated(ws):
    ws.gates_dir.mkdir()
    (ws.gates_dir / "data-valid.yaml").write_text(
        "name: data-valid\nafter: format\ncriteria:\n  - {metric: format.records_out, op: '>=', value: 3}\n"
    )
    gate = load_gates(ws, parse_config({}))["data-valid"]
    assert len(gate.criteria) == 1 and gate.source == ws.gates_dir / "data-valid.yaml"

    (ws.gates_dir / "broken.yaml").write_text("name: broken\nafter: formatt\ncriteria:\n  - {metric: x, op: '=>', value: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_gates(ws, parse_config({}))
    message = str(info.value)
    assert "broken.yaml: invalid gate file" in message and "after" in message and "'=>'" in message


def test_bad_expression_is_a_config_error(ws):
    ws.gates_dir.mkdir()
    (ws.gates_dir / "custom.yaml").write_text(
        "name: custom\nafter: split\ncriteria:\n  - {metric: split.counts.test, op: '>=', value: '__import__(\"os\")'}\n"
    )
    with pytest.raises(ConfigError, match="cannot read value"):
        load_gates(ws, parse_config({}))
