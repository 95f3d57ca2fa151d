"""`factory serve` as a user runs it: a real server in a subprocess, real HTTP, every route,
absent and damaged files, a missing workspace, and attempts to reach files outside the
workspace's known outputs."""

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.resources import validate
from factory.status import TrainingStatus, now_iso
from factory.workspace import Workspace

ENV = {**os.environ, "COLUMNS": "200"}
SECRET = "secret-outside-the-api"


def factory(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True, env=ENV)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


class Server:
    """`factory serve --port 0` in a subprocess; requests go over a real socket."""

    def __init__(self, root: Path, *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "factory", "serve", "-C", str(root), "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        line = self.proc.stdout.readline()
        match = re.search(r"http://([\d.]+):(\d+)/", line)
        assert match, line + self.proc.stderr.read()
        self.host, self.port = match.group(1), int(match.group(2))
        self.url = match.group(0)

    def request(self, path: str, method: str = "GET", headers: dict | None = None):
        """Sends `path` byte for byte (no client-side normalisation of `..`)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def json(self, path: str):
        status, headers, body = self.request(path)
        assert headers["Content-Type"] == "application/json; charset=utf-8", (path, headers)
        return status, headers, json.loads(body)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "ws"
    factory("init", root, check_rc=0)
    (root / "data" / "raw" / "train.jsonl").write_text("".join(
        json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)}) + "\n"
        for i in range(300)))
    factory("run", "split", "-C", root, check_rc=0)
    (root / "factory.yaml").write_text((root / "factory.yaml").read_text() + f"# {SECRET}\n")
    (tmp_path / "outside.json").write_text(json.dumps({"secret": SECRET}))
    return root


@pytest.fixture
def server(workspace):
    s = Server(workspace)
    yield s
    s.stop()


def _train(ws: Workspace, run_id: str, start: int, steps: range) -> TrainingStatus:
    """What the runner does for a training phase: the real writer, with losses at `steps`."""
    training = TrainingStatus(ws, run_id, "finetune")
    training.update(backend="hf", backend_reason="test")
    training.update(step=start, total_steps=100, epoch=0.0, total_epochs=1.0)
    for step in steps:
        training.update(step=step, epoch=step / 100, loss=10.0 / step, learning_rate=0.01 * (1 - step / 100),
                        eta_seconds=1.0)
    return training


def test_every_route_serves_the_workspace_files_exactly(workspace, server):
    ws = Workspace.at(workspace)
    _train(ws, "run1", 0, range(10, 60, 10)).finish("succeeded")

    status, headers, body = server.request("/api/status")
    assert status == 200 and body == ws.status_file.read_bytes()
    validate(json.loads(body), "status")
    assert headers["Cache-Control"] == "no-store" and headers["X-Factory-Run-Alive"] == "false"

    status, headers, body = server.request("/api/training")
    assert status == 200 and body == ws.training_status_file.read_bytes()
    validate(json.loads(body), "training-status")

    status, _, history = server.json("/api/training/history")
    assert status == 200 and [p["step"] for p in history] == [10, 20, 30, 40, 50]
    for point in history:
        validate(point, "training-history")

    for phase, stem in (("format", "format"), ("split", "split")):
        status, headers, body = server.request(f"/api/metrics/{phase}")
        assert status == 200 and body == (workspace / "metrics" / f"{stem}.json").read_bytes()
        assert headers["Cache-Control"] == "no-store"

    status, _, gates = server.json("/api/gates")
    assert status == 200 and [g["gate"] for g in gates] == ["data-valid", "splits-ready"]  # pipeline order
    for gate in gates:
        validate(gate, "gate-result")
        assert gate == json.loads((workspace / "metrics" / "gates" / f"{gate['gate']}.json").read_text())

    status, headers, page = server.request("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/static/app.js"' in page and b'href="/static/app.css"' in page
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert not re.search(rb"(src|href)=\"(https?:)?//", page)  # nothing from elsewhere
    for asset, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        status, headers, body = server.request(f"/static/{asset}")
        assert status == 200 and headers["Content-Type"].startswith(kind) and body
        # the SVG namespace is a name, not a fetch; the browser test checks that nothing else loads
        assert set(re.findall(rb"https?://[^\s\"'`]+", body)) <= {b"http://www.w3.org/2000/svg"}, asset

    # HEAD: the same headers, no body
    status, headers, body = server.request("/api/status", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == ws.status_file.stat().st_size


def test_no_caching_surprises_each_request_reads_the_file_again(workspace, server):
    ws = Workspace.at(workspace)
    training = _train(ws, "run1", 0, range(10, 30, 10))
    first = server.json("/api/training")[2]
    training.update(step=30, loss=0.5)
    second = server.json("/api/training")[2]
    assert (first["step"], second["step"]) == (20, 30) and second["seq"] > first["seq"]
    assert [p["step"] for p in server.json("/api/training/history")[2]] == [10, 20, 30]


def test_fresh_workspace_is_idle_and_absent_files_are_json_404(tmp_path):
    root = tmp_path / "fresh"
    factory("init", root, check_rc=0)
    server = Server(root)
    try:
        status, headers, doc = server.json("/api/status")
        assert status == 200 and doc["state"] == "idle" and headers["X-Factory-Run-Alive"] == "false"
        validate(doc, "status")
        for path, words in (("/api/training", "no training has started"),
                            ("/api/metrics/evaluate", "metrics/evaluation.json does not exist yet"),
                            ("/api/metrics/quantize", "metrics/quantization.json does not exist yet"),
                            ("/report", "no report yet")):
            status, _, error = server.json(path)
            assert status == 404 and error["status"] == 404 and words in error["error"], (path, error)
        assert server.json("/api/gates")[2] == [] and server.json("/api/training/history")[2] == []

        shutil.rmtree(root)  # the workspace disappears under a running server
        for path in ("/api/status", "/api/training", "/api/gates", "/api/training/history", "/api/metrics/format"):
            status, _, error = server.json(path)
            assert status == 404 and "does not exist" in error["error"], (path, error)
        assert server.request("/")[0] == 200  # the page still loads and says so
    finally:
        server.stop()


def test_missing_workspace_and_busy_port_are_usage_errors(tmp_path, server):
    proc = factory("serve", "-C", tmp_path / "nowhere", "--port", "0", check_rc=2)
    assert "does not exist" in proc.stderr
    proc = factory("serve", "-C", tmp_path / "ws", "--port", server.port, check_rc=2)
    assert f"port {server.port}" in proc.stderr and "in use" in proc.stderr


def test_torn_or_damaged_files_are_503_and_a_torn_history_line_is_skipped(workspace, server):
    ws = Workspace.at(workspace)
    _train(ws, "run1", 0, range(10, 40, 10))
    whole = ws.status_file.read_bytes()
    ws.status_file.write_bytes(whole[: len(whole) // 2])  # as if a writer had not been atomic
    status, headers, error = server.json("/api/status")
    assert status == 503 and headers["Retry-After"] == "1" and ".factory/status.json is not valid JSON" in error["error"]
    ws.training_status_file.write_bytes(b'{"running": tr')
    assert server.json("/api/training")[0] == 503
    (workspace / "metrics" / "gates" / "data-valid.json").write_bytes(b"{")
    assert server.json("/api/gates")[0] == 503

    with open(ws.training_history_file, "ab") as f:
        f.write(b'{"step": 40, "loss": 0.')  # a line cut by kill -9
    assert [p["step"] for p in server.json("/api/training/history")[2]] == [10, 20, 30]

    ws.status_file.unlink()  # absent again: idle, as `factory status` shows it
    status, _, doc = server.json("/api/status")
    assert status == 200 and doc["state"] == "idle"


TRAVERSALS = [
    "/../factory.yaml",
    "/static/../factory.yaml",
    "/static/../../factory.yaml",
    "/static/%2e%2e/%2e%2e/factory.yaml",
    "/static/..%2f..%2ffactory.yaml",
    "/static//etc/passwd",
    "/static/server.py",
    "/static/",
    "/api/metrics/../../factory.yaml",
    "/api/metrics/..%2f..%2ffactory.yaml",
    "/api/metrics/%2e%2e%2f%2e%2e%2f..%2foutside",
    "/api/metrics/..\\..\\factory.yaml",
    "/api/metrics/format/../../../factory.yaml",
    "/api/metrics/format%00.yaml",
    "/api/metrics/",
    "/api/metrics/gates/data-valid",
    "/api/gates/../../factory.yaml",
    "/api/training/../../factory.yaml",
    "/report/../factory.yaml",
    "//etc/passwd",
    "/factory.yaml",
    "/metrics/format.json",
    "/.factory/status.json",
    "/%2e%2e/%2e%2e/etc/passwd",
]


def test_no_request_path_reaches_a_file_outside_the_known_outputs(server):
    for path in TRAVERSALS:
        status, headers, body = server.request(path)
        assert status == 404, (path, status, body[:200])
        assert headers["Content-Type"] == "application/json; charset=utf-8", path
        assert json.loads(body)["status"] == 404
        assert SECRET.encode() not in body and b"root:" not in body, path


def test_read_only_and_answers_only_its_own_host_name(server):
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        status, headers, body = server.request("/api/status", method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD" and json.loads(body)["status"] == 405, method
    status, _, body = server.request("/api/status", headers={"Host": "attacker.example:8765"})
    assert status == 403 and "is not this server" in json.loads(body)["error"]  # DNS rebinding
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
        assert server.request("/api/status", headers={"Host": host})[0] == 200


def test_run_alive_header_tells_a_killed_run_from_a_running_one(workspace, server):
    ws = Workspace.at(workspace)
    doc = json.loads(ws.status_file.read_text())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(1.1)  # the process runs the run: it started before the run's started_at
        running = {**doc, "state": "running", "pid": sleeper.pid, "started_at": now_iso(), "updated_at": now_iso()}
        ws.status_file.write_text(json.dumps(running))
        assert server.request("/api/status")[1]["X-Factory-Run-Alive"] == "true"
        # a process that started after the run did has only reused its pid
        ws.status_file.write_text(json.dumps({**running, "started_at": "2026-01-01T00:00:00.000+00:00"}))
        assert server.request("/api/status")[1]["X-Factory-Run-Alive"] == "false"
        # on another host only the heartbeat tells: fresh is alive, 30 s old is dead
        ws.status_file.write_text(json.dumps({**running, "host": "elsewhere", "pid": 1}))
        assert server.request("/api/status")[1]["X-Factory-Run-Alive"] == "true"
        ws.status_file.write_text(json.dumps({**running, "host": "elsewhere", "updated_at": "2026-01-01T00:00:00.000+00:00"}))
        assert server.request("/api/status")[1]["X-Factory-Run-Alive"] == "false"
        ws.status_file.write_text(json.dumps(running))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert server.request("/api/status")[1]["X-Factory-Run-Alive"] == "false"  # says running, but the pid is gone


# --- the training history the chart draws ---------------------------------------------------


def test_history_survives_a_resume_and_a_fresh_start_replaces_it(tmp_path):
    ws = Workspace.at(tmp_path)
    _train(ws, "run1", 0, range(10, 60, 10))  # killed after step 50, with a checkpoint at 30
    history = [json.loads(line) for line in ws.training_history_file.read_text().splitlines()]
    assert [p["step"] for p in history] == [10, 20, 30, 40, 50]

    _train(ws, "run2", 30, range(40, 80, 10))  # resumed from step 30: 40 and 50 are trained again
    from factory.status import read_training_history

    points = read_training_history(ws)
    assert [p["step"] for p in points] == [10, 20, 30, 40, 50, 60, 70]
    assert [p["run_id"] for p in points] == ["run1"] * 3 + ["run2"] * 4
    for point in points:
        validate(point, "training-history")
    assert len(ws.training_history_file.read_text().splitlines()) == 7  # the re-trained steps were dropped

    _train(ws, "run3", 0, range(10, 30, 10))  # a fresh training (--restart, or new data)
    assert [(p["step"], p["run_id"]) for p in read_training_history(ws)] == [(10, "run3"), (20, "run3")]


def test_nonfinite_loss_is_kept_as_null(tmp_path):
    ws = Workspace.at(tmp_path)
    training = _train(ws, "run1", 0, range(10, 20, 10))
    training.update(step=20, loss=float("nan"), learning_rate=0.001)
    from factory.status import read_training_history

    last = read_training_history(ws)[-1]
    assert last["step"] == 20 and last["loss"] is None
    validate(last, "training-history")
