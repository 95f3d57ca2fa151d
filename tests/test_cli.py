"""The `factory` command as a user runs it: a real subprocess, real files, exit codes."""

import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from factory.resources import validate
from heavy_imports import HEAVY, run_factory

REPO = Path(__file__).resolve().parents[1]


def factory(*args, cwd=None, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "COLUMNS": "200"})
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def alpaca_lines(n, start=0):
    return "".join(
        json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)}) + "\n"
        for i in range(start, start + n)
    )


def local_model(root):
    """A local model folder (only its config is read before the phase's own checks), so that
    model.name is not a hub id that would be resolved first."""
    (root / "models" / "base").mkdir(parents=True, exist_ok=True)
    (root / "models" / "base" / "config.json").write_text("{}")


@pytest.fixture
def ws(tmp_path):
    factory("init", tmp_path / "ws", check_rc=0)
    root = tmp_path / "ws"
    (root / "data" / "raw" / "train.jsonl").write_text(alpaca_lines(300))
    return root


def test_help_teaches_without_heavy_imports():
    proc, heavy = run_factory("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("init", "run", "status", "validate", "gate"):
        assert command in proc.stdout
    assert heavy == []
    proc, heavy = run_factory("run", "--help")
    assert proc.returncode == 0 and "--force" in proc.stdout and heavy == [], (proc.stderr, heavy)
    imported = subprocess.run(  # what every command imports: the CLI and the phase list
        [sys.executable, "-c", "import sys, factory.cli, phases; "
         f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert imported == "[]"


def test_a_run_with_nothing_to_do_imports_no_heavy_library(ws):
    """What keeps a no-op `factory run` under a second (bench/noop_run.py times it): the phases'
    modules, the config, the runner and the gates import no numpy, torch, ... until a phase runs.
    tests/test_faults.py checks the same for every phase of a finished pipeline."""
    factory("run", "split", "-C", ws, check_rc=0)
    proc, heavy = run_factory("run", "split", "-C", ws)
    assert proc.returncode == 0 and "Nothing to do" in proc.stderr, proc.stderr
    assert heavy == []


def test_run_split_end_to_end_then_skip(ws):
    proc = factory("run", "split", "-C", ws, check_rc=0)
    assert "format: succeeded" in proc.stderr and "gate splits-ready: passed" in proc.stderr
    for name in ("train", "val", "test"):
        assert (ws / "data" / "splits" / f"{name}.jsonl").stat().st_size > 0
    status = json.loads(factory("status", "--json", "-C", ws, check_rc=0).stdout)
    validate(status, "status")
    assert status["state"] == "succeeded" and [p["state"] for p in status["phases"][:2]] == ["succeeded", "succeeded"]

    again = factory("run", "split", "-C", ws, check_rc=0)
    assert "format: skipped" in again.stderr and "Nothing to do" in again.stderr
    assert "split" in factory("status", "-C", ws, check_rc=0).stdout


def test_a_phase_warning_reaches_the_terminal_and_the_log(tmp_path):
    """Phase warnings (data read by guessed field names, leakage, reasoning left out of training)
    went to logs/factory.log only: a user at the terminal never saw them."""
    factory("init", tmp_path / "ws", check_rc=0)
    root = tmp_path / "ws"
    (root / "data" / "raw" / "dolly.jsonl").write_text("".join(
        json.dumps({"instruction": f"Add {i} and {i + 1}.", "context": "", "response": str(2 * i + 1),
                    "category": "closed_qa"}) + "\n" for i in range(300)))
    proc = factory("run", "format", "-C", root, check_rc=0)
    shown = " ".join(proc.stderr.split())  # the terminal wraps long lines
    assert ('warning: format: data/raw/dolly.jsonl has none of the named formats; read by its field names as '
            'mapping: {"user":["instruction","context"],"assistant":"response"}') in shown, proc.stderr
    assert "WARNING factory.format: format: data/raw/dolly.jsonl has none" in (root / "logs/factory.log").read_text()


def test_gate_failure_exit_1_with_table(ws):
    (ws / "data" / "raw" / "bad.jsonl").write_text('{"instruction": "x", "output": ""}\n' * 20)  # 20 empty answers
    proc = factory("run", "split", "-C", ws, check_rc=1)
    assert "gate data-valid (after format): FAILED" in proc.stdout
    assert "format.rejected_ratio" in proc.stdout and "0.0625" in proc.stdout and "0.01" in proc.stdout
    assert "gate data-valid failed after format on: format.rejected_ratio" in proc.stderr
    check = factory("gate", "check", "data-valid", "--json", "-C", ws, check_rc=1)
    result = json.loads(check.stdout)
    validate(result, "gate-result")
    assert result["passed"] is False


def test_exit_2_for_bad_config_missing_metrics_and_unknown_phase(ws):
    factory("gate", "check", "splits-ready", "-C", ws, check_rc=2)
    (ws / "factory.yaml").write_text("lora:\n  rnak: 8\ntraining:\n  epochs: 2\n")
    proc = factory("validate", "-C", ws, check_rc=2)
    assert "lora.rnak: unknown key; did you mean lora.r?" in proc.stderr
    assert "training.epochs: unknown key; did you mean training.num_train_epochs?" in proc.stderr
    assert "Traceback" not in proc.stderr
    factory("run", "-C", ws, check_rc=2)
    local_model(ws)
    (ws / "factory.yaml").write_text("model: {name: models/base}\n")
    assert "unknown phase 'nosuch'" in factory("run", "nosuch", "-C", ws, check_rc=2).stderr
    assert "has no adapter; run `factory run finetune` first" in factory("run", "--only", "quantize", "-C", ws, check_rc=2).stderr
    factory("validate", "-C", ws, check_rc=0)
    factory("run", "-C", ws / "nowhere", check_rc=2)


def test_empty_input_is_a_clear_error(tmp_path):
    factory("init", tmp_path, check_rc=0)
    proc = factory("run", "format", "-C", tmp_path, check_rc=2)
    assert "data/raw" in proc.stderr and "Traceback" not in proc.stderr


def test_status_file_valid_at_every_read_during_a_run(ws):
    (ws / "data" / "raw" / "train.jsonl").write_text(alpaca_lines(200_000))
    status_file = ws / ".factory" / "status.json"
    reads, problems, stop = [], [], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                doc = json.loads(status_file.read_bytes())
                validate(doc, "status")
                reads.append((doc["seq"], doc["state"]))
            except FileNotFoundError:
                pass
            except Exception as e:  # a torn or invalid file
                problems.append(repr(e))
            time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        factory("run", "split", "--force", "-C", ws, check_rc=0)
    finally:
        stop.set()
        poller.join()
    assert problems == []
    assert any(state == "running" for _, state in reads) and reads[-1][1] == "succeeded"
    seqs = [seq for seq, _ in reads]
    assert seqs == sorted(seqs)


def test_wheel_ships_schemas_and_gates(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path, REPO], check=True,
                   capture_output=True)
    wheel = next(tmp_path.glob("factory-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "factory/_data/schemas/status.schema.json" in names
    assert "factory/_data/gates/data-valid.yaml" in names
    assert {"factory/static/index.html", "factory/static/app.js", "factory/static/app.css"} <= set(names)  # the dashboard
    assert "factory/_data/schemas/training-history.schema.json" in names
    assert {"factory/_data/schemas/comparison.schema.json", "factory/_data/gates/model-comparison.yaml"} <= set(names)
    assert {f"factory/rubrics/{r}.yaml" for r in ("helpfulness", "correctness", "safety")} <= set(names)  # the judge's
    assert any(n.startswith("phases/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    proc = subprocess.run(
        [sys.executable, "-c", "from factory import resources; print(resources.data_dir('schemas'), resources.data_dir('gates'))"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True)
    assert str(site) in proc.stdout and str(REPO) not in proc.stdout


def test_plan_resolves_auto_and_warns_when_it_will_not_fit(tmp_path):
    factory("init", tmp_path, check_rc=0)
    model = tmp_path / "models" / "gemma-3-4b-config"
    model.mkdir(parents=True)
    # the text part of google/gemma-3-4b-it's config.json: no weights are needed for a plan
    (model / "config.json").write_text(json.dumps({"text_config": {
        "hidden_size": 2560, "num_hidden_layers": 34, "vocab_size": 262208, "intermediate_size": 10240,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}}))
    (tmp_path / "factory.yaml").write_text(
        "model: {name: models/gemma-3-4b-config, max_seq_length: 16384}\n"
        "lora: {r: auto}\ntraining: {per_device_train_batch_size: 2}\n")
    proc = factory("plan", "-C", tmp_path, check_rc=0)
    assert "backend hf on cpu" in proc.stdout and "LoRA rank" in proc.stdout
    assert "│ LoRA rank             │ 8 " in proc.stdout  # auto: the smallest row of the VRAM table on a CPU
    logits_gib = 262208 * 2 * 16384 * 4 / 2**30  # vocab x batch x sequence x 4 bytes (seed 002)
    assert f"{logits_gib:.3f}" in proc.stdout
    assert "warning" in proc.stderr and "exceeds the available" in proc.stderr
    # the head trained whole: its fp32 copy, once, since Gemma ties it to the input embedding
    (tmp_path / "factory.yaml").write_text(
        "model: {name: models/gemma-3-4b-config, max_seq_length: 16384}\n"
        "lora: {r: auto, modules_to_save: [lm_head, embed_tokens]}\ntraining: {per_device_train_batch_size: 2}\n")
    whole = factory("plan", "-C", tmp_path, check_rc=0)
    lora_gib = [float(re.search(r"│ lora \(GiB\)\s+│ ([\d.]+)", p.stdout)[1]) for p in (proc, whole)]
    assert lora_gib[1] - lora_gib[0] == pytest.approx(262208 * 2560 * 4 / 2**30, abs=2e-3)


def test_quantize_without_llama_cpp_names_the_install_command(ws, tmp_path):
    empty = tmp_path / "no-llama.cpp"
    empty.mkdir()
    # from the config file
    local_model(ws)
    (ws / "factory.yaml").write_text(f"model: {{name: models/base}}\nsave:\n  llama_cpp_dir: {empty}\n")
    proc = factory("run", "--only", "quantize", "-C", ws, check_rc=2)
    assert f"save.llama_cpp_dir {empty} has no convert_hf_to_gguf.py" in proc.stderr
    assert "factory setup-gguf" in proc.stderr and "Traceback" not in proc.stderr
    # from the environment, when the file leaves it unset
    (ws / "factory.yaml").write_text("model: {name: models/base}\n")
    env_run = subprocess.run([sys.executable, "-m", "factory", "run", "--only", "quantize", "-C", str(ws)],
                             capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "300", "FACTORY_LLAMA_CPP": str(empty)})
    assert env_run.returncode == 2 and str(empty) in env_run.stderr and "factory setup-gguf" in env_run.stderr
    # an unknown type is a config error that lists the known ones
    (ws / "factory.yaml").write_text("save:\n  gguf_quantization: [q8_0, q9_9]\n")
    proc = factory("validate", "-C", ws, check_rc=2)
    assert "save.gguf_quantization: unknown GGUF type(s) 'q9_9'" in proc.stderr and "Q4_K_M" in proc.stderr


def test_messages_that_quote_brackets_print_as_text(tmp_path):
    """Errors quote templates and keys: "[/INST]" is text to the terminal, not a rich closing
    tag (on the first Unsloth run, a Mistral error crashed the error printer itself)."""
    (tmp_path / "factory.yaml").write_text('data:\n  inputs: [a.jsonl]\n"[/INST]": 1\n')
    proc = subprocess.run([sys.executable, "-m", "factory", "validate", "-C", str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "[/INST]: unknown key; valid keys: data, model" in proc.stderr
