"""The factory under faults, for real: processes killed with SIGKILL, SIGTERM and Ctrl-C in every
phase, a real tmpfs that fills up, damaged checkpoints, two runs at once, a server reached over
a real socket, a hub that cannot be reached, secrets in the environment.

The cheap engine tests run a small pipeline of their own; the model tests share one tiny
Gemma-3 workspace (few records, 4 training steps, Q8_0 only, gates reduced to one criterion
each: the faults are what is tested here, not the learning).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import xxhash
import yaml

from factory.config import parse_config
from factory.errors import UnsafePath
from factory.io import AtomicOutput, drop_in_background
from factory.phase import Phase
from factory.resources import validate
from factory.runner import run_pipeline
from factory.workspace import Workspace, check_replaceable, record_created
from heavy_imports import run_factory

REPO = Path(__file__).resolve().parents[1]
FAKE_HF_TOKEN = "hf_FAKEfaultSUITEtoken0123456789abcdef"
FAKE_OPENAI_KEY = "sk-fake-fault-suite-key-0123456789ABCDEFGH"
ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_TOKEN": FAKE_HF_TOKEN,
       "OPENAI_API_KEY": FAKE_OPENAI_KEY}


def factory(*args, env=None, timeout=900, check_rc=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "factory", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or ENV)


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait_for(condition, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def phase_state(root: Path, name: str) -> str | None:
    doc = read(root / ".factory" / "status.json")
    if not doc or doc["state"] != "running":
        return None
    return next(p["state"] for p in doc["phases"] if p["name"] == name)


def alpaca_lines(n: int) -> str:
    return "".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)}) + "\n"
                   for i in range(n))


# --- a small pipeline of the engine's own ------------------------------------------------------


def _copy(ctx):
    text = ctx.workspace.path("data/raw/in.txt").read_text()
    ctx.workspace.formatted_file.parent.mkdir(parents=True, exist_ok=True)
    ctx.workspace.formatted_file.write_text(text.upper())
    return {"records_out": len(text.split()), "rejected_ratio": 0.0}


# --- status that never lies --------------------------------------------------------------------

SILENT_PHASE = textwrap.dedent("""
    import sys, time
    from factory.config import parse_config
    from factory.phase import Phase
    from factory.runner import run_pipeline
    from factory.workspace import Workspace

    def silent(ctx):  # loads a model, say: no progress for a long while
        ctx.training.update(step=0, total_steps=10)
        time.sleep(float(sys.argv[2]))
        return {}

    run_pipeline(parse_config({}), Workspace.at(sys.argv[1]), (Phase("format", "silent", "format", silent),))
""")


def test_heartbeat_refreshes_a_silent_phase_and_a_kill_9_is_finalized_by_the_next_command(tmp_path):
    from factory.status import runner_alive

    (tmp_path / "factory.yaml").write_text("")
    proc = subprocess.Popen([sys.executable, "-c", SILENT_PHASE, str(tmp_path), "60"])
    status_file, training_file = tmp_path / ".factory" / "status.json", tmp_path / ".factory" / "training-status.json"
    try:
        first = wait_for(lambda: (read(training_file) or {}).get("running") and read(status_file), 60, "the phase to start")
        seen = {first["updated_at"]}
        wait_for(lambda: seen.add(read(status_file)["updated_at"]) or len(seen) >= 3, 15, "two heartbeats")
        training = read(training_file)
        assert training["pid"] == proc.pid and training["host"] == socket.gethostname()
        assert time.time() - _epoch(training["updated_at"]) < 5  # its heartbeat too
        doc = read(status_file)
        validate(doc, "status")
        validate(training, "training-status")
        assert doc["pid"] == proc.pid and doc["host"] == socket.gethostname() and runner_alive(doc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    dead = read(status_file)
    assert dead["state"] == "running" and not runner_alive(dead)  # what kill -9 leaves behind

    shown = factory("status", "--json", "-C", tmp_path, check_rc=0)  # any command finalizes it
    doc = json.loads(shown.stdout)
    validate(doc, "status")
    assert doc["state"] == "failed" and doc["error"]["type"] == "ProcessGone" and doc["ended_at"]
    assert f"pid {proc.pid} on {socket.gethostname()}" in doc["error"]["message"]
    assert doc["phases"][0]["state"] == "failed" and doc["phases"][0]["error"]["type"] == "ProcessGone"
    training = read(training_file)
    validate(training, "training-status")
    assert training["running"] is False and training["status"] == "failed" and "disappeared" in training["error"]
    assert "the last run disappeared" in shown.stderr
    assert factory("status", "--json", "-C", tmp_path, check_rc=0).stderr == ""  # once


def _epoch(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp).timestamp()


# --- never destroy what the user did not ask to remove ------------------------------------------


def test_replacing_is_refused_for_the_workspace_its_ancestors_and_foreign_files(tmp_path):
    ws = Workspace.at(tmp_path / "ws")
    (ws.root / "models" / "base").mkdir(parents=True)
    (ws.root / "models" / "base" / "config.json").write_text("{}")
    for path, why in ((ws.root, "is the workspace"), (ws.root.parent, "is the workspace or a folder that contains it"),
                      (Path("/"), "contains it"), (Path.home(), "contains it"),
                      (ws.root / "models", "was not written by the factory")):
        with pytest.raises(UnsafePath, match=why):
            check_replaceable(ws, path, "save.lora_path")
    mine = ws.root / "models" / "lora"
    mine.mkdir()
    (mine / "adapter_config.json").write_text("{}")
    record_created(ws, mine)
    check_replaceable(ws, mine, "save.lora_path")  # the factory's own: fine
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(UnsafePath, match=r"holds files the factory did not write \(notes.txt\)"):
        check_replaceable(ws, mine, "save.lora_path")
    link = ws.root / "models" / "link"
    link.symlink_to(ws.root / "models" / "base")
    with pytest.raises(UnsafePath, match="symbolic link"):
        check_replaceable(ws, link, "save.merged_path")


@pytest.mark.parametrize("setting", ["training.output_dir: .", "save.lora_path: .", "save.lora_path: models",
                                     "save.merged_path: ..", "save.merged_path: models", "save.gguf_path: ."])
def test_config_paths_over_the_workspace_exit_2_at_once_and_remove_nothing(tmp_path, setting):
    """Each of these once led to an rmtree of the workspace or of the user's models folder."""
    root = tmp_path / "ws"
    factory("init", root, check_rc=0)
    (root / "models" / "base").mkdir(parents=True)
    (root / "models" / "base" / "config.json").write_text("{}")
    (root / "models" / "base" / "model.safetensors").write_bytes(b"the user's weights")
    (root / "data" / "raw" / "train.jsonl").write_text(alpaca_lines(300))
    key, value = setting.split(": ")
    section, name = key.split(".")
    (root / "factory.yaml").write_text(f"model: {{name: models/base}}\n{section}: {{{name}: '{value}'}}\n")

    def listing() -> list[str]:
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                      if not {".factory", "logs"} & set(p.relative_to(tmp_path).parts))

    before = listing()
    phase = "finetune" if name in ("lora_path", "output_dir") else "quantize"
    proc = factory("run", "--only", phase, "--restart", "-C", root, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{key} (" in proc.stderr and "internal error" not in proc.stderr
    assert "the factory will not replace it" in proc.stderr or "was not written by the factory" in proc.stderr
    assert listing() == before  # nothing removed, nothing written
    assert (root / "models" / "base" / "model.safetensors").read_bytes() == b"the user's weights"


# --- fingerprints that see every change, cheaply ------------------------------------------------


def _io_read_bytes() -> int:
    """Bytes this process has read through read() so far (Linux /proc accounting)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_an_unchanged_run_does_not_read_big_inputs_again(tmp_path):
    ws = Workspace.at(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "in.txt").write_text("a b c")
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    big = 64 << 20
    (model / "model.safetensors").write_bytes(os.urandom(1 << 20) * 64)
    time.sleep(2.5)  # past the window in which a file's timestamps may not yet tell two writes apart
    pipeline = (Phase("format", "copy", "format", _copy, ("data",),
                      inputs=lambda c, w: [w.path("data/raw/in.txt"), w.path("models/base")],
                      outputs=lambda c, w: [w.formatted_file]),)
    (tmp_path / "gates").mkdir()  # this pipeline's own gate in place of the packaged one
    (tmp_path / "gates" / "data-valid.yaml").write_text(
        "name: data-valid\nafter: format\ncriteria:\n  - {metric: format.records_out, op: '>=', value: 1}\n")
    cfg = parse_config({})

    before = _io_read_bytes()
    assert run_pipeline(cfg, ws, pipeline).ran == ["format"]
    first = _io_read_bytes() - before
    before = _io_read_bytes()
    assert run_pipeline(cfg, ws, pipeline).skipped == ["format"]
    second = _io_read_bytes() - before
    assert first > big and second < big / 64, (first, second)  # hashed once, then recognised by its stat

    with open(model / "model.safetensors", "r+b") as f:  # same size, same inode, new content
        f.seek(12345)
        f.write(b"changed")
    assert run_pipeline(cfg, ws, pipeline).ran == ["format"]


CODE_DIGEST = "from factory import fingerprint; print(fingerprint.code_digest())"


def test_the_code_fingerprint_covers_the_whole_package_and_library_versions(tmp_path):
    copy = tmp_path / "src"
    for package in ("factory", "phases"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(copy)}

    def digest() -> str:
        return subprocess.run([sys.executable, "-c", CODE_DIGEST], env=env, capture_output=True, text=True,
                              check=True, cwd=tmp_path).stdout.strip()

    original = digest()
    scoring = copy / "factory" / "scoring.py"  # not a phase module: a helper the phases use
    scoring.write_text(scoring.read_text() + "\n# a change\n")
    assert digest() != original

    # a library upgrade: a real distribution's metadata, version 1.0 then 2.0
    site = tmp_path / "site"
    (site / "fakelib-1.0.dist-info").mkdir(parents=True)
    (site / "fakelib-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakelib\nVersion: 1.0\n")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from factory import fingerprint; from factory.config import "
              "parse_config; from factory.phase import Phase; from factory.workspace import Workspace; "
              "ws = Workspace.at(sys.argv[2]); cfg = parse_config({'training': {'seed': int(sys.argv[3])}}); "
              "p = Phase('finetune', '', 'training-stats', None, ('training',), libraries=('fakelib',)); "
              "import json; print(json.dumps(fingerprint.compute(p, cfg, ws, fingerprint.HashCache(ws))))")

    def fingerprint(seed: int = 1) -> dict:
        out = subprocess.run([sys.executable, "-c", script, str(site), str(tmp_path), str(seed)], env=env,
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    assert fingerprint()["libraries"] == {"fakelib": "1.0"}
    shutil.move(site / "fakelib-1.0.dist-info", site / "fakelib-2.0.dist-info")
    (site / "fakelib-2.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakelib\nVersion: 2.0\n")
    assert fingerprint()["libraries"] == {"fakelib": "2.0"}
    assert fingerprint(7)["config"]["training"]["seed"] == 7  # the seed is part of it


def test_a_hub_id_is_pinned_to_its_revision(tmp_path):
    """A hub cache laid out as huggingface_hub lays it out; HF_HUB_OFFLINE reads the cached commit."""
    cache = tmp_path / "hub"
    repo = cache / "models--some-org--some-model"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    script = ("from factory import fingerprint; from factory.config import parse_config; import phases, sys; "
              "from factory.workspace import Workspace; ws = Workspace.at(sys.argv[1]); "
              "cfg = parse_config({'model': {'name': 'some-org/some-model'}}); "
              "print(fingerprint.compute(phases.BY_NAME['baseline'], cfg, ws, fingerprint.HashCache(ws))['model_revision'])")
    env = {**ENV, "HF_HUB_CACHE": str(cache)}
    revisions = []
    for commit in ("a" * 40, "b" * 40):
        (repo / "refs" / "main").write_text(commit)
        revisions.append(subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True,
                                        text=True, check=True).stdout.strip())
    assert revisions == ["a" * 40, "b" * 40]


# --- usage errors, an unreachable hub: exit 2 at once -------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["run", "--bogus"], "No such option: --bogus"),
    (["rnu"], "No such command 'rnu'"),
    (["run", "--only"], "Option '--only' requires an argument"),
    (["serve", "--port", "http"], "Invalid value for '--port'"),
    (["status", "extra"], "unexpected extra argument"),
])
def test_usage_errors_exit_2_with_the_usage(args, says):
    proc = factory(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    assert "Usage: factory" in proc.stderr or "factory --help" in proc.stderr


@pytest.fixture(scope="module")
def data_ready(tmp_path_factory) -> Path:
    """A workspace whose format and split have run (no model phase yet)."""
    root = tmp_path_factory.mktemp("data") / "ws"
    factory("init", root, check_rc=0)
    (root / "data" / "raw" / "train.jsonl").write_text(alpaca_lines(300))
    factory("run", "split", "-C", root, check_rc=0)
    return root


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_an_unreachable_hub_id_exits_2_at_once_naming_model_name(data_ready, tmp_path, hub):
    root = tmp_path / "ws"
    shutil.copytree(data_ready, root)
    (root / "factory.yaml").write_text("model: {name: no-such-org/no-such-model-xyz}\n")
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE")
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    proc = factory("run", "baseline", "-C", root, env=env, timeout=120)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert "model.name 'no-such-org/no-such-model-xyz'" in proc.stderr and "internal error" not in proc.stderr
    assert ("HF_HUB_OFFLINE is set" if hub == "offline" else "cannot be reached") in proc.stderr
    assert "local folder" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert seconds < 30, seconds  # no library retries first (about 30 s before)
    status = read(root / ".factory" / "status.json")
    assert status["state"] == "failed" and status["error"]["type"] == "InputError"


def test_an_image_text_model_that_transformers_loads_only_as_such_exits_2_naming_it(data_ready, tmp_path):
    """Qwen2.5-VL (like Mistral Small 3.1, LLaVA or SmolVLM) is no AutoModelForCausalLM: the
    baseline phase stopped with exit 3, ValueError "Unrecognized configuration class"."""
    from transformers import Qwen2_5_VLConfig

    root = tmp_path / "ws"
    shutil.copytree(data_ready, root)
    config = Qwen2_5_VLConfig()
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(root / "models" / "vl")
    (root / "factory.yaml").write_text("model: {name: models/vl}\n")
    proc = factory("run", "baseline", "-C", root, timeout=120)
    assert proc.returncode == 2 and "internal error" not in proc.stderr, proc.stderr
    assert "model.name 'models/vl' is a Qwen2_5_VLForConditionalGeneration (qwen2_5_vl)" in " ".join(proc.stderr.split())


def test_a_model_folder_without_its_tokenizer_exits_2_instead_of_training_on_an_empty_one(tmp_path):
    """A checkpoint saved without its tokenizer files: transformers 5 makes a tokenizer of the
    special tokens alone, and the run went on (with a template set, on text that was all
    unknown tokens). Now exit 2 at the first model phase, naming what is missing."""
    root = tmp_path / "ws"
    factory("init", "--example", root, check_rc=0)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        (root / "models" / "base" / name).unlink(missing_ok=True)
    config = yaml.safe_load((root / "factory.yaml").read_text())
    config.setdefault("dataset", {})["chat_template"] = "gemma-3"  # so that nothing else stops it
    (root / "factory.yaml").write_text(yaml.safe_dump(config))
    proc = factory("run", "baseline", "-C", root, timeout=300)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "internal error" not in message, proc.stderr[-2000:]
    assert "model.name 'models/base': its tokenizer has 5 tokens and the model a vocabulary of 400" in message


@pytest.mark.parametrize("damage", ["weights missing", "weights cut", "tokenizer cut", "config of other weights"])
def test_model_files_missing_or_cut_short_exit_2_naming_model_name(tmp_path, damage):
    """A download that never finished, or a config.json that is not the weights' own: exit 3
    before ("internal error: OSError ... no file named model.safetensors", "SafetensorError: ...
    incomplete metadata", "JSONDecodeError", "RuntimeError: ... ignore_mismatched_sizes")."""
    root = tmp_path / "ws"
    factory("init", "--example", root, check_rc=0)
    path = root / "models" / "base" / {"tokenizer": "tokenizer.json", "weights": "model.safetensors",
                                       "config": "config.json"}[damage.split()[0]]
    if damage.endswith("missing"):
        path.unlink()
    elif damage.startswith("config"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "intermediate_size": 96}))
    else:
        os.truncate(path, path.stat().st_size // 2)
    proc = factory("run", "baseline", "-C", root, timeout=300)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "internal error" not in message, proc.stderr[-2000:]
    assert "model.name 'models/base' cannot be loaded" in message and "download it again" in message


# --- two runs, one workspace --------------------------------------------------------------------


def test_a_second_run_in_the_workspace_is_refused_at_once_with_the_owners_pid(tmp_path):
    (tmp_path / "factory.yaml").write_text("")
    first = subprocess.Popen([sys.executable, "-c", SILENT_PHASE, str(tmp_path), "60"])
    try:
        wait_for(lambda: phase_state(tmp_path, "format") == "running", 60, "the first run")
        started = time.monotonic()
        second = factory("run", "-C", tmp_path, timeout=60)
        assert time.monotonic() - started < 15
        assert second.returncode == 2 and f"another factory run (pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert phase_state(tmp_path, "format") == "running"  # the first run's status is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert read(tmp_path / ".factory" / "status.json")["state"] == "cancelled"


# --- the dashboard off localhost ----------------------------------------------------------------


class Served:
    def __init__(self, root: Path, *args: str):
        self.proc = start("serve", "-C", root, "--port", "0", *args)
        line = self.proc.stdout.readline()
        match = re.search(r"http://([^/\s]+):(\d+)/(\?token=(\S+))?", line)
        assert match, line + self.proc.stderr.read()
        self.port, self.token = int(match.group(2)), match.group(4)

    def get(self, path: str, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)  # loopback only
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_serve_off_loopback_needs_its_token_and_loopback_keeps_the_host_check(data_ready):
    server = Served(data_ready, "--host", "0.0.0.0")
    try:
        assert server.token and len(server.token) >= 24  # generated and printed in the URL
        for path in ("/api/status", "/api/metrics/split", "/", "/static/app.js"):
            status, headers, body = server.get(path)
            assert status == 401 and headers.get("WWW-Authenticate") == "Bearer", path
            assert b"split" not in body or path == "/" and b"token" in body
        assert server.get("/api/status", {"Authorization": "Bearer wrong-token"})[0] == 401
        assert server.get("/api/status?token=wrong")[0] == 401
        status, _, body = server.get("/api/status", {"Authorization": f"Bearer {server.token}"})
        assert status == 200 and json.loads(body)["state"] == "succeeded"
        status, headers, page = server.get(f"/?token={server.token}")  # the printed URL
        assert status == 200 and b"app.js" in page
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        status, _, body = server.get("/api/metrics/split", {"Cookie": cookie.split(";")[0]})  # the page's polls
        assert status == 200 and json.loads(body)["phase"] == "split"
    finally:
        server.stop()

    given = Served(data_ready, "--host", "0.0.0.0", "--token", "my-own-token-1234")
    try:
        assert given.token == "my-own-token-1234"
        assert given.get("/api/status")[0] == 401
        assert given.get("/api/status", {"Authorization": "Bearer my-own-token-1234"})[0] == 200
    finally:
        given.stop()

    local = Served(data_ready)  # loopback: no token, but only requests addressed to it
    try:
        assert local.token is None and local.get("/api/status")[0] == 200
        assert local.get("/api/status", {"Host": "evil.example:80"})[0] == 403
    finally:
        local.stop()


# --- engine hygiene -----------------------------------------------------------------------------


def test_one_phase_list(tmp_path):
    """The CLI's names, the schemas' enums and the gates' phases come from the phase lists."""
    import phases
    from factory import resources
    from factory.gates import load_gates

    names = [p.name for p in phases.PIPELINE]
    every_phase = names + [p.name for p in phases.ON_REQUEST]  # compare runs only when asked
    assert resources.schema("status")["$defs"]["phase"]["properties"]["name"]["enum"] == every_phase
    assert {g.after for g in load_gates(Workspace.at(tmp_path), parse_config({})).values()} <= set(every_phase)
    help_text = factory("--help", timeout=60).stdout + factory("run", "--help", timeout=60).stdout
    assert " -> ".join(names) in re.sub(r"\s+", " ", help_text.replace("│", " "))
    status = json.loads(factory("status", "--json", "-C", tmp_path, timeout=60).stdout)
    assert [p["name"] for p in status["phases"]] == names
    assert phases.BY_NAME["quantize"].after_gates is not None  # model cards: written by the pipeline


def test_csv_field_size_limit_is_restored_after_a_csv_input(tmp_path):
    import csv

    import phases

    ws = Workspace.at(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "qa.csv").write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(150)))
    before = csv.field_size_limit()
    cfg = parse_config({"data": {"inputs": [{"path": "data/raw/qa.csv", "mapping": {"user": "question", "assistant": "answer"}}]}})
    run_pipeline(cfg, ws, phases.PIPELINE, target="format")
    assert read(ws.metrics_file("format"))["records_out"] == 150
    assert csv.field_size_limit() == before


def test_the_split_runs_on_4_kb_pages_and_restores_numpys_setting(tmp_path, monkeypatch):
    from numpy._core.multiarray import _set_madvise_hugepage

    import phases
    import phases.split

    def huge_pages() -> bool:
        state = _set_madvise_hugepage(True)
        _set_madvise_hugepage(state)
        return state

    during = []
    split = phases.split._split
    monkeypatch.setattr(phases.split, "_split", lambda *args: during.append(huge_pages()) or split(*args))
    ws = Workspace.at(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "qa.jsonl").write_text(
        "".join(json.dumps({"instruction": f"question number {i} here", "output": f"a{i}"}) + "\n" for i in range(300)))
    before = huge_pages()
    run_pipeline(parse_config({}), ws, phases.PIPELINE, target="split")
    assert read(ws.metrics_file("split"))["records_in"] == 300
    assert during == [False] and huge_pages() == before


NATIVE_STDERR = textwrap.dedent("""
    import os, sys
    from factory import cli, llama_cpp
    with llama_cpp._native_stderr_to(sys.argv[1]):
        os.write(2, b"native chatter\\n")
        cli.err.print("progress line for the user")
""")


def test_a_native_stderr_redirect_does_not_swallow_the_terminal(tmp_path):
    log = tmp_path / "native.log"
    proc = subprocess.run([sys.executable, "-c", NATIVE_STDERR, str(log)], capture_output=True, text=True, check=True)
    assert "progress line for the user" in proc.stderr and "native chatter" not in proc.stderr
    assert log.read_text() == "native chatter\n"


def test_a_gguf_that_llama_cpp_cannot_load_is_an_input_error_with_llama_cpps_reason():
    """A converted file this llama.cpp cannot read (seen: a Gemma 4 text model whose embedding has
    more rows than its tokenizer, 'token_embd.weight has wrong shape') stopped quantize with exit
    3, "ValueError: Failed to load model from file". Now exit 2 with llama.cpp's own reason, read
    from its log, here for a vocabulary-only GGUF; a loadable file loads afterwards as before."""
    from factory import llama_cpp
    from factory.errors import InputError

    with pytest.raises(InputError, match=r"cannot load .*ggml-vocab-llama-bpe\.gguf: llama_model_load: error loading "
                                         r"model: .*'token_embd\.weight' not found"):
        llama_cpp.load(llama_cpp.vocab_file("llama-bpe"), n_ctx=64)
    assert llama_cpp.runtime()._logger.logger.level == logging.ERROR  # llama.cpp's log back to errors only


# --- the model phases: one tiny Gemma-3 workspace ------------------------------------------------

MODEL_CONFIG = """\
data:
  inputs: [data/raw/localization.jsonl]
  split: {train: 0.9, val: 0.05, test: 0.05, seed: 3407}
model: {name: models/base, max_seq_length: 128, load_in_4bit: false}
lora: {r: 8, lora_alpha: 16, use_gradient_checkpointing: false}
training: {per_device_train_batch_size: 8, gradient_accumulation_steps: 1, warmup_steps: 0, max_steps: 4,
           learning_rate: 0.01, weight_decay: 0.0, optim: adamw_torch, logging_steps: 1}
save: {gguf_quantization: [Q8_0]}
evaluation: {metrics: [exact_match], primary: exact_match, max_new_tokens: 8, batch_size: 8, loss: false,
             bootstrap_samples: 200}
"""
# One criterion per gate: the faults are under test here, not the learning of 4 steps.
GATES = {"data-valid": ("format", "format.records_out", ">=", 50),
         "splits-ready": ("split", "split.counts.test", ">=", 3),
         "baseline-established": ("baseline", "baseline.num_examples", ">=", 1),
         "training-completed": ("finetune", "training-stats.completed", "==", "true"),
         "model-performance": ("evaluate", "evaluation.num_examples", ">=", 1),
         "quantization-verified": ("quantize", "quantization.gguf_files", ">=", 1)}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """The example's data (120 records) and tiny Gemma-3, nothing run yet."""
    root = tmp_path_factory.mktemp("model") / "ws"
    factory("init", "--example", root, "--records", 120, check_rc=0)
    (root / "factory.yaml").write_text(MODEL_CONFIG)
    for name, (after, metric, op, value) in GATES.items():
        (root / "gates" / f"{name}.yaml").write_text(
            f"name: {name}\nafter: {after}\ncriteria:\n  - metric: {metric}\n    op: \"{op}\"\n    value: {value}\n")
    return root


@pytest.fixture(scope="module")
def trained(fresh, tmp_path_factory) -> Path:
    """`fresh` run up to finetune: an adapter and the 4 progress checkpoints."""
    root = tmp_path_factory.mktemp("trained") / "ws"
    shutil.copytree(fresh, root)
    factory("run", "finetune", "-C", root, check_rc=0)
    return root


def copy_of(workspace: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(workspace, root)
    return root


def partial_files(root: Path) -> list[str]:
    """Half-written things where a phase or a user could take them for good ones."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".partial" in p.name or p.name.endswith(".old"))


def metrics(root: Path, stem: str) -> dict:
    return json.loads((root / "metrics" / f"{stem}.json").read_text())


@pytest.mark.slow
def test_kill_9_after_force_restart_is_never_taken_for_the_earlier_success(trained, tmp_path):
    """The reported bug: after a kill -9 of `run --force --restart`, the next run answered
    "Nothing to do" and training-status.json said running forever. Then the re-run trains
    from the same seed as the first training: the adapter is the same, byte for byte."""
    root = copy_of(trained, tmp_path)
    status_file, training_file = root / ".factory" / "status.json", root / ".factory" / "training-status.json"
    proc = start("run", "finetune", "--force", "--restart", "-C", root)
    try:
        run_id = wait_for(lambda: phase_state(root, "finetune") == "running" and read(status_file)["run_id"], 300,
                          "finetune to start")
        wait_for(lambda: (read(training_file) or {}).get("run_id") == run_id and read(training_file)["running"], 300,
                 "the training status of this run")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read(training_file)["running"] is True  # what the killed process left

    doc = json.loads(factory("status", "--json", "-C", root, check_rc=0).stdout)
    validate(doc, "status")
    finetune = next(p for p in doc["phases"] if p["name"] == "finetune")
    assert doc["state"] == "failed" and finetune["state"] == "failed" and finetune["error"]["type"] == "ProcessGone"
    training = read(training_file)
    validate(training, "training-status")
    assert training["running"] is False and training["status"] == "failed" and f"pid {proc.pid}" in training["error"]

    # --restart removes the checkpoints the factory recorded and nothing else: a checkpoint-N
    # it did not write is refused (a resume could take it), a user's file stays
    (root / "outputs" / "notes.txt").write_text("the user's notes")
    stranger = root / "outputs" / "checkpoint-99"
    stranger.mkdir()
    refused = factory("run", "finetune", "--restart", "-C", root)
    assert refused.returncode == 2 and "outputs/checkpoint-99" in refused.stderr
    assert "not written by the factory" in refused.stderr and len(list((root / "outputs").glob("checkpoint-*"))) == 5
    stranger.rmdir()

    # no --force: the phase runs because the killed run had already forgotten the earlier success
    # (--restart: trained from scratch, not resumed from the checkpoints the first training left)
    again = factory("run", "finetune", "--restart", "-C", root, check_rc=0)
    assert "Nothing to do" not in again.stderr and "finetune: succeeded" in again.stderr
    assert (root / "outputs" / "notes.txt").read_text() == "the user's notes"
    stats = metrics(root, "training-stats")
    assert stats["resumed_from_step"] == 0 and stats["steps"] == 4
    fingerprint = read(root / ".factory" / "fingerprints" / "finetune.json")["fingerprint"]
    assert fingerprint["config"]["training"]["seed"] == 3407 and fingerprint["libraries"]["torch"]
    # same seed, same data: the same adapter as the first training, byte for byte
    adapter = "models/checkpoints/lora/adapter_model.safetensors"
    assert (root / adapter).read_bytes() == (trained / adapter).read_bytes()
    assert [h["loss"] for h in stats["loss_history"]] == [h["loss"] for h in metrics(trained, "training-stats")["loss_history"]]


@pytest.mark.slow
def test_damaged_checkpoints_are_skipped_for_the_one_before(trained, tmp_path):
    root = copy_of(trained, tmp_path)
    outputs = root / "outputs"
    assert sorted(p.name for p in outputs.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3",
                                                                     "checkpoint-4"]
    weights = outputs / "checkpoint-4" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:  # truncated, as by a full disk or a copy cut short
        f.truncate(weights.stat().st_size // 2)
    (outputs / "checkpoint-3" / "training_state.json").unlink()  # died while saving
    factory("run", "finetune", "--force", "-C", root, check_rc=0)
    assert metrics(root, "training-stats")["resumed_from_step"] == 2
    log = (root / "logs" / "factory.log").read_text()
    assert re.search(r"WARNING factory.finetune: skipping checkpoint checkpoint-4: adapter_model.safetensors is damaged: "
                     r"\d+ bytes where its header describes \d+ \(truncated\)", log)
    assert "skipping checkpoint checkpoint-3: incomplete: no training_state.json" in log


@pytest.mark.slow
def test_checkpoints_of_other_trained_layers_are_not_resumed(trained, tmp_path):
    """Same config and data, but the model in model.name's folder has other layers (replaced, or
    another factory or PEFT version adapts others): the checkpoints' optimizer state fits none of
    the new adapter, so training starts over; it was exit 3 (the optimizer refused the state)."""
    from factory.example import build_tiny_gemma3, generate_task_records, record_texts

    root = copy_of(trained, tmp_path)
    base = root / "models" / "base"
    shutil.rmtree(base)
    build_tiny_gemma3(base, corpus=record_texts(generate_task_records(120)), layers=3)
    factory("run", "finetune", "--force", "-C", root, check_rc=0)
    assert metrics(root, "training-stats")["resumed_from_step"] == 0
    assert "are from another config, data, base model or trained layers; starting over" in (root / "logs" / "factory.log").read_text()


@pytest.mark.slow
def test_checkpoints_of_another_base_model_are_not_resumed(trained, tmp_path):
    """model.name's folder now holds other weights of the same shapes (rebuilt, or replaced by a
    newer download): an adapter trained on the old weights fits none of the new ones, so the
    run starts over. It resumed, and finished on the old model's adapter."""
    from safetensors.torch import load_file, save_file

    root = copy_of(trained, tmp_path)
    weights_file = root / "models" / "base" / "model.safetensors"
    weights = load_file(weights_file)
    save_file({name: -w for name, w in weights.items()}, weights_file, metadata={"format": "pt"})
    factory("run", "finetune", "-C", root, check_rc=0)  # no --force: the runner sees the model changed
    assert metrics(root, "training-stats")["resumed_from_step"] == 0
    assert "are from another config, data, base model or trained layers; starting over" in (root / "logs" / "factory.log").read_text()


def _default_sigint():
    # A shell's background job starts with SIGINT ignored, which a child would inherit: Ctrl-C
    # must reach the run as it does from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_during(root: Path, phase: str, sig: signal.Signals, *args: str) -> subprocess.CompletedProcess:
    """Start `factory run`, send `sig` once `phase` is running, and wait for the process."""
    proc = subprocess.Popen([sys.executable, "-m", "factory", "run", *args, "-C", str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_default_sigint)
    try:
        wait_for(lambda: phase_state(root, phase) == "running" or proc.poll() is not None, 600, f"{phase} to start")
        assert proc.poll() is None, f"the run ended before {phase} started: {proc.stderr.read()[-2000:]}"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_cancelled_in(root: Path, phase: str, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "interrupted" in proc.stderr and "internal error" not in proc.stderr
    doc = read(root / ".factory" / "status.json")
    validate(doc, "status")
    entry = next(p for p in doc["phases"] if p["name"] == phase)
    assert doc["state"] == "cancelled" and entry["state"] == "cancelled", (doc["state"], entry)
    assert entry["error"]["type"] in ("Cancelled", "Interrupted")
    training = read(root / ".factory" / "training-status.json")
    if training:
        validate(training, "training-status")
        assert training["running"] is False
    assert not (root / ".factory" / "fingerprints" / f"{phase}.json").exists()  # not taken for a success
    assert partial_files(root) == []


def test_a_ctrl_c_while_a_staging_folder_is_recorded_leaves_no_folder(tmp_path, monkeypatch):
    """`factory run` interrupted right after quantize started left models/checkpoints/.merged.partial
    behind now and then: the staging folder was made before it was recorded, so an interruption
    between the two left a folder no run knew to remove."""
    from factory import workspace

    ws = Workspace.at(tmp_path)
    target = tmp_path / "models" / "checkpoints" / "merged"
    save = workspace._save_created

    def interrupted(*args):
        monkeypatch.setattr(workspace, "_save_created", save)
        raise KeyboardInterrupt

    monkeypatch.setattr(workspace, "_save_created", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with workspace.staged_dir(ws, target, "save.merged_path"):
            pass
    workspace.discard_unfinished(ws)  # what the runner does after any failure
    assert not target.with_name(".merged.partial").exists() and not target.exists()


SIGNAL_IN_A_FINALIZER = textwrap.dedent("""
    import os, signal, sys
    from factory.config import parse_config
    from factory.phase import Phase
    from factory.runner import run_pipeline
    from factory.workspace import Workspace

    class SignalsWhenCollected:
        def __del__(self):  # as a weakref callback during garbage collection in quantize
            os.kill(os.getpid(), getattr(signal, sys.argv[2]))
            sum(range(1000))  # the handler runs here; Python drops what it raises ("Exception ignored in")

    def phase(ctx):
        SignalsWhenCollected()
        print("the phase went on", flush=True)
        ctx.progress.start(3, "steps")
        ctx.progress.advance()
        print("past a progress step", flush=True)
        return {}

    try:
        run_pipeline(parse_config({}), Workspace.at(sys.argv[1]), (Phase("format", "", "format", phase),))
        print("completed")
    except BaseException as e:
        print("stopped by", type(e).__name__)
""")


@pytest.mark.parametrize("signame, raised", [("SIGINT", "KeyboardInterrupt"), ("SIGTERM", "Cancelled")])
def test_a_signal_that_lands_in_a_finalizer_still_cancels_the_run(tmp_path, signame, raised):
    """Python drops an exception raised while a finalizer runs, so a Ctrl-C or SIGTERM that
    arrives then was lost and the run went on to succeed (a Ctrl-C in quantize, seen in the
    suite). The runner remembers the signal and stops at the phase's next progress step."""
    (tmp_path / "factory.yaml").write_text("")
    proc = subprocess.run([sys.executable, "-c", SIGNAL_IN_A_FINALIZER, str(tmp_path), signame],
                          capture_output=True, text=True, timeout=120)
    assert "Exception ignored" in proc.stderr and raised in proc.stderr  # the real thing: the first raise was lost
    assert proc.stdout.splitlines() == ["the phase went on", f"stopped by {raised}"], proc.stdout + proc.stderr
    status = read(tmp_path / ".factory" / "status.json")
    assert status["state"] == "cancelled" and [p["state"] for p in status["phases"]] == ["cancelled"], status


@pytest.mark.slow
def test_sigterm_and_ctrl_c_in_every_model_phase_then_a_clean_resume_and_no_secret_written(fresh, tmp_path):
    root = copy_of(fresh, tmp_path)
    for phase, sig in (("baseline", signal.SIGTERM), ("finetune", signal.SIGINT), ("evaluate", signal.SIGTERM),
                       ("quantize", signal.SIGINT)):
        assert_cancelled_in(root, phase, interrupt_during(root, phase, sig))
    final = factory("run", "-C", root, check_rc=0)
    doc = read(root / ".factory" / "status.json")
    assert doc["state"] == "succeeded" and all(p["state"] in ("succeeded", "skipped") for p in doc["phases"])
    assert "gate quantization-verified: passed" in final.stderr and partial_files(root) == []
    # the model cards come from the pipeline, after the quantize gate
    for card in (root / "models" / "checkpoints" / "merged" / "README.md", root / "models" / "quantized" / "README.md"):
        assert "| quantization-verified | passed |" in card.read_text()
    noop, heavy = run_factory("run", "-C", root, env=ENV)
    assert noop.returncode == 0 and "Nothing to do" in noop.stderr, noop.stderr  # the cards did not count as a change
    assert heavy == []  # nor any phase's libraries (torch via finetune's process count, numpy...): under a second

    # the fake credentials in every run's environment are in no file any run wrote
    written = [p for p in root.rglob("*") if p.is_file()]
    assert len(written) > 40
    for path in written:
        data = path.read_bytes()
        assert FAKE_HF_TOKEN.encode() not in data and FAKE_OPENAI_KEY.encode() not in data, path


@pytest.mark.slow
def test_sigterm_and_ctrl_c_in_the_data_phases_then_a_clean_resume(tmp_path):
    root = tmp_path / "ws"
    factory("init", root, check_rc=0)
    (root / "data" / "raw" / "train.jsonl").write_text(alpaca_lines(400_000))
    config = yaml.safe_load((root / "factory.yaml").read_text())
    config["data"]["workers"] = 2  # the file is small: worker processes only when asked for
    (root / "factory.yaml").write_text(yaml.safe_dump(config))
    for phase, sig in (("format", signal.SIGINT), ("split", signal.SIGTERM)):
        proc = interrupt_during(root, phase, sig, "split")
        assert_cancelled_in(root, phase, proc)
        assert not (root / "data" / "splits" / "train.jsonl").exists()
    # a worker of the split killed from outside, as the out-of-memory killer does
    proc = kill_a_worker_during(root, "split")
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = re.sub(r"\s*\n\s*", " ", proc.stderr)
    assert "a worker process was killed by SIGKILL" in message and "set data.workers: 1" in message, proc.stderr[-3000:]
    doc = read(root / ".factory" / "status.json")
    assert doc["state"] == "failed" and doc["error"]["type"] == "WorkerKilled", doc["error"]
    assert not (root / "data" / "splits" / "train.jsonl").exists() and partial_files(root) == []
    factory("run", "split", "-C", root, check_rc=0)
    assert metrics(root, "split")["counts"]["train"] > 300_000


def kill_a_worker_during(root: Path, phase: str) -> subprocess.CompletedProcess:
    """Start `factory run`, SIGKILL one of `phase`'s worker processes once they run, and wait."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "factory", "run", phase, "-C", str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(lambda: phase_state(root, phase) == "running" or proc.poll() is not None, 600, f"{phase} to start")
        workers = wait_for(lambda: proc.poll() is not None or [  # a resource tracker is no worker
            c for c in psutil.Process(proc.pid).children() if "resource_tracker" not in " ".join(c.cmdline())], 60, "its workers")
        assert proc.poll() is None, f"the run ended before its workers were seen: {proc.stderr.read()[-2000:]}"
        workers[0].kill()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


WRITE_80_MB = """
import sys
from factory.io import AtomicOutput
chunk = bytes(range(256)) * 4096 * 3  # 3 MiB: the writes straddle each 32 MiB mark
with AtomicOutput(sys.argv[1]) as out:
    for i in range(27):
        out.write(chunk[i:] + chunk[:i])
print(out.digest.hexdigest())
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_large_output_is_handed_to_the_disk_as_it_comes_and_keeps_every_byte(tmp_path):
    """AtomicOutput starts the disk writes of each 32 MiB as it comes (sync_file_range), so
    that its fsync does not wait for the whole file: seen from the system calls themselves."""
    target, trace = tmp_path / "out.bin", tmp_path / "trace"
    proc = subprocess.run(["strace", "-f", "-e", "trace=sync_file_range,fsync", "-o", str(trace),
                           sys.executable, "-c", WRITE_80_MB, str(target)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    chunk = bytes(range(256)) * 4096 * 3
    expected = b"".join(chunk[i:] + chunk[:i] for i in range(27))
    assert target.read_bytes() == expected
    assert proc.stdout.strip() == xxhash.xxh3_128(expected).hexdigest()
    calls = re.findall(r"sync_file_range\(\d+, (\d+), (\d+), SYNC_FILE_RANGE_WRITE\) = 0", trace.read_text())
    ranges = [(int(start), int(count)) for start, count in calls]
    assert len(ranges) == 2 and ranges[0][0] == 0 and ranges[1][0] == sum(ranges[0]), ranges
    assert all(count >= 32 << 20 for _, count in ranges), ranges
    assert "fsync(" in trace.read_text()


# --- a full disk, for real ----------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs (root only; skipped elsewhere). `resize(mount, free)` leaves `free` bytes."""
    mounts = []

    def mount(name: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point)],
                                               capture_output=True).returncode != 0:
            pytest.skip("needs root to mount a tmpfs")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def resize(point: Path, free: int) -> None:
    size_kib = (shutil.disk_usage(point).used + free) // 1024 + 1
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(point)], check=True)


def assert_disk_full(root: Path, point: Path, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"no space left on the disk mounted at {point}" in re.sub(r"\s*\n\s*", " ", proc.stderr), proc.stderr
    assert "internal error" not in proc.stderr
    doc = read(root / ".factory" / "status.json")
    assert doc["state"] == "failed" and doc["error"]["type"] == "DiskFull", doc["error"]
    training = read(root / ".factory" / "training-status.json")
    assert training is None or training["running"] is False
    assert partial_files(root) == []


def test_a_large_output_that_drops_its_old_version_is_replaced_on_a_disk_with_room_for_one(tmpfs):
    """format's large output drops its last version when writing starts
    (AtomicOutput(drop_old=True)): 40 MB replaced on a 64 MB disk, where keeping the old file
    until the new one is complete runs out of space (and then keeps the old one whole)."""
    import errno

    point = tmpfs("disk")
    target = point / "all.jsonl"
    old, new = b"old line\n" * ((40 << 20) // 9), b"new line\n" * ((40 << 20) // 9)
    target.write_bytes(old)
    with pytest.raises(OSError) as raised:
        with AtomicOutput(target) as out:
            for lo in range(0, len(new), 1 << 20):
                out.write(new[lo:lo + (1 << 20)])
    assert raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == old and [p.name for p in point.iterdir()] == ["all.jsonl"]
    with AtomicOutput(target, drop_old=True) as out:
        assert not target.exists()  # gone as writing starts
        for lo in range(0, len(new), 1 << 20):
            out.write(new[lo:lo + (1 << 20)])
    assert target.read_bytes() == new and [p.name for p in point.iterdir()] == ["all.jsonl"]


def test_outputs_dropped_in_the_background_make_room_and_leave_nothing(tmpfs):
    """The split drops its last split files while it searches (drop_in_background): moved
    aside at once, removed by a thread, with what a killed run left aside; then a new 40 MB
    file fits on the 64 MB disk that held a 40 MB old one."""
    point = tmpfs("disk")
    old, leftover, absent = point / "train.jsonl", point / ".val.jsonl.dropped", point / "test.jsonl"
    old.write_bytes(b"old line\n" * ((40 << 20) // 9))
    leftover.write_bytes(b"killed run\n")
    dropping = drop_in_background([old, point / "val.jsonl", absent])
    assert not old.exists()  # at once
    dropping.join()
    assert list(point.iterdir()) == []
    with AtomicOutput(old) as out:
        for _ in range(40):
            out.write(b"x" * (1 << 20))
    assert old.stat().st_size == 40 << 20


def test_ctrl_c_while_an_output_opens_leaves_no_partial_file(tmp_path, monkeypatch):
    """Ctrl-C can land inside AtomicOutput.__enter__, after its partial file is created, where
    `with` calls no __exit__ (the data phases' Ctrl-C test met it once: `.rejects.jsonl.partial`
    was left): the partial file goes, and the outputs opened before it are discarded as usual."""
    import factory.io

    real, calls = factory.io._open_outputs, []

    def interrupted_once():
        calls.append(1)
        if len(calls) == 2:  # the second output's registration
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(factory.io, "_open_outputs", interrupted_once)
    (tmp_path / "all.jsonl").write_bytes(b"old\n")
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutput(tmp_path / "all.jsonl", drop_old=True) as out, AtomicOutput(tmp_path / "rejects.jsonl"):
            out.write(b"never\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert real() == []


def test_a_full_disk_while_workers_convert_ranges_leaves_nothing_behind(tmp_path, tmpfs, monkeypatch):
    """Format's workers write each range's records to a file of their own beside the output:
    when the disk fills there, the error is a full disk and neither the ranges nor a partial
    output stay; with space, the same run writes the output and removes the ranges."""
    import phases
    import phases.format as fmt
    from factory.errors import DiskFull

    monkeypatch.setattr(fmt, "RANGE_BYTES", 4 << 10)
    disk = tmpfs("disk")
    ws = Workspace.at(disk / "ws")
    raw = disk / "ws" / "data" / "raw" / "a.jsonl"
    raw.parent.mkdir(parents=True)
    raw.write_text("".join(json.dumps({"instruction": f"question {n}", "input": "", "output": "an answer " * 20}) + "\n"
                           for n in range(2000)))
    resize(disk, 200 << 10)  # the output is about 500 KB
    two_workers = parse_config({"data": {"workers": 2}})  # the file is small: workers only when asked for
    with pytest.raises(DiskFull, match="no space left on the disk mounted at"):
        run_pipeline(two_workers, ws, phases.PIPELINE, target="format")
    assert partial_files(ws.root) == [] and not ws.formatted_file.exists()
    resize(disk, 8 << 20)
    run_pipeline(two_workers, ws, phases.PIPELINE, target="format")
    assert read(ws.metrics_file("format"))["records_out"] == 2000
    assert sorted(p.name for p in ws.formatted_dir.iterdir()) == ["all.jsonl", "rejects.jsonl"]


@pytest.mark.slow
def test_a_full_disk_in_every_writing_phase_then_a_run_after_freeing_space(fresh, tmp_path, tmpfs):
    disk = tmpfs("disk")
    root = disk / "ws"
    shutil.copytree(fresh, root)

    resize(disk, 16 << 10)  # format's output (about 32 KB) does not fit
    assert_disk_full(root, disk, factory("run", "format", "-C", root))
    assert not (root / "data" / "formatted" / "all.jsonl").exists()
    resize(disk, 64 << 20)
    factory("run", "format", "-C", root, check_rc=0)

    resize(disk, 16 << 10)  # nor do the splits
    assert_disk_full(root, disk, factory("run", "split", "-C", root))
    assert not list((root / "data" / "splits").glob("*.jsonl"))
    resize(disk, 64 << 20)
    factory("run", "baseline", "-C", root, check_rc=0)

    resize(disk, 128 << 10)  # a progress checkpoint (adapter, optimizer state: about 900 KB) does not fit
    assert_disk_full(root, disk, factory("run", "finetune", "-C", root))
    assert not list((root / "outputs").glob("checkpoint-*")) and not (root / "models" / "checkpoints" / "lora").exists()
    resize(disk, 64 << 20)
    factory("run", "evaluate", "-C", root, check_rc=0)

    resize(disk, 256 << 10)  # the merged 16-bit model (about 800 KB) does not fit
    assert_disk_full(root, disk, factory("run", "quantize", "-C", root))
    assert not (root / "models" / "checkpoints" / "merged").exists()

    # the GGUF file (about 440 KB) goes to a disk of its own that is too small for it
    resize(disk, 64 << 20)
    small = tmpfs("gguf-disk")
    subprocess.run(["mount", "-o", "remount,size=256k", str(small)], check=True)
    (root / "factory.yaml").write_text(MODEL_CONFIG.replace("save: {", f"save: {{gguf_path: {small}/quantized, "))
    assert_disk_full(root, small, factory("run", "quantize", "-C", root))
    assert partial_files(small) == [] and not list(small.rglob("*.gguf"))

    subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
    final = factory("run", "-C", root, check_rc=0)
    assert "gate quantization-verified: passed" in final.stderr
    assert (small / "quantized" / "model-Q8_0.gguf").is_file() and partial_files(root) == []


FORKS_BESIDE_THE_DISPLAY = textwrap.dedent("""
    import io, logging, sys
    from rich.console import Console
    from factory.phase import Phase
    from factory.status import fork_is_safe
    from factory.terminal import RunReporter
    from factory.workers import worker_pool

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    reporter = RunReporter(Console(file=io.StringIO(), force_terminal=True, width=100))
    reporter._bars.live.refresh_per_second = 200  # redraw all the time
    with reporter:
        reporter.phase_started(Phase("format", "converts", "format", lambda ctx: {}))
        assert reporter._refresher is not None and reporter._refresher.is_alive() and fork_is_safe()
        for _ in range(5):
            with worker_pool(2, logging.getLogger("test"), "format") as pool:
                assert sorted(pool.map(abs, range(-50, 0))) == list(range(1, 51))
    assert fork_is_safe()
    print("done")
""")


def test_worker_processes_are_forked_beside_the_live_progress_display():
    """The terminal's progress display redraws from a thread of its own: guarded by the
    display's lock, forks stay safe (spawned workers import numpy and the phase again), and
    children forked while it redraws many times a second neither hang nor inherit it held. In
    a fresh interpreter, as `factory run` has it (a test process has other tests' threads)."""
    proc = subprocess.run([sys.executable, "-c", FORKS_BESIDE_THE_DISPLAY], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("2 worker processes (fork)") == 5 and proc.stdout.rstrip().endswith("done")


POOL_UNDER_FAULTS = textwrap.dedent("""
    import logging, multiprocessing, os, signal, sys, time
    from factory.errors import WorkerKilled
    from factory.workers import worker_pool

    def mark(i):
        time.sleep(0.05)
        open(os.path.join(sys.argv[1], str(i)), "w").close()

    try:  # an error in the phase's process while 200 jobs are queued
        with worker_pool(2, logging.getLogger("test"), "split") as pool:
            futures = [pool.submit(mark, i) for i in range(200)]
            futures[0].result()
            raise RuntimeError("stop")
    except RuntimeError:
        print("done after error", len(os.listdir(sys.argv[1])), "children", len(multiprocessing.active_children()))

    try:  # a worker killed from outside while the pool works
        with worker_pool(2, logging.getLogger("test"), "split") as pool:
            os.kill(pool.submit(os.getpid).result(), signal.SIGKILL)
            list(pool.map(time.sleep, [0.01] * 100))
    except WorkerKilled as error:
        print("error:", error)
    print("children", len(multiprocessing.active_children()))

    import threading, psutil
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # the spawned workers' helper process: not a worker
    known = {p.pid for p in psutil.Process().children()}

    def kill_the_first_worker():
        while True:
            workers = [p for p in psutil.Process().children() if p.pid not in known]
            if workers:
                return workers[0].kill()
            time.sleep(0.001)

    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()  # another thread: the workers are spawned, one by one
    threading.Thread(target=kill_the_first_worker, daemon=True).start()
    try:  # killed while it starts, before the pool has done anything
        with worker_pool(2, logging.getLogger("test"), "split") as pool:
            list(pool.map(abs, range(100)))
    except WorkerKilled as error:
        print("error:", error)
    stop.set()
""")


def test_worker_pool_stops_its_workers_on_an_error_and_names_a_worker_killed_from_outside(tmp_path):
    """On an error in the phase's process the workers are stopped, not left to work through
    the queue (concurrent.futures' pool waits for it on exit); a worker killed by SIGKILL (the
    out-of-memory killer) fails the phase with an error that says so, where multiprocessing's
    pool waited forever for the lost job: forked and at work, or spawned and still starting."""
    proc = subprocess.run([sys.executable, "-c", POOL_UNDER_FAULTS, str(tmp_path)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    first, error, last, starting = proc.stdout.splitlines()
    done, children = re.fullmatch(r"done after error (\d+) children (\d+)", first).groups()
    assert 1 <= int(done) < 50 and children == "0", first  # 200 queued, 2 workers: at most a few ran
    for line in (error, starting):
        assert line.startswith("error: split: a worker process was killed by SIGKILL (most likely by the system, "
                               "for lack of memory)"), line
    assert last == "children 0"


@pytest.mark.slow
def test_the_run_killed_by_sigkill_takes_its_data_workers_with_it(tmp_path):
    """`factory run` killed by SIGKILL (the out-of-memory killer, `kill -9`) while the split's
    workers scan: they end with it, instead of waiting forever on the pool's pipes with their
    memory held; then a run after it completes."""
    import psutil

    root = tmp_path / "ws"
    factory("init", root, check_rc=0)
    (root / "data" / "raw" / "train.jsonl").write_text(alpaca_lines(400_000))
    config = yaml.safe_load((root / "factory.yaml").read_text())
    config["data"]["workers"] = 2
    (root / "factory.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "factory", "run", "split", "-C", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    workers = []

    def both_workers():  # a resource tracker is no worker
        found = [c for c in psutil.Process(proc.pid).children() if "resource_tracker" not in " ".join(c.cmdline())]
        return len(found) == 2 and found

    try:
        wait_for(lambda: phase_state(root, "split") == "running" or proc.poll() is not None, 600, "split to start")
        found = wait_for(lambda: proc.poll() is not None or both_workers(), 60, "its workers")
        assert proc.poll() is None, "the run ended before its workers were seen"
        workers = found
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert len(gone) == len(workers) == 2 and not alive, [p.pid for p in alive]
    finally:
        proc.kill()
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                worker.kill()
    factory("run", "split", "-C", root, check_rc=0)
    assert metrics(root, "split")["counts"]["train"] > 300_000
