"""The runner's engine on a small pipeline of its own: skip by fingerprint, re-run on change,
gates stop the run, status stays schema-valid, and a final state is written on SIGTERM and
Ctrl-C in a real subprocess."""

import builtins
import io
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import xxhash

from factory.config import parse_config
from factory.errors import GateFailed, InputError
from factory.phase import Phase
from factory.resources import validate
from factory.runner import run_pipeline
from factory.workspace import Workspace


def _copy_upper(ctx):
    """A phase: data/raw/in.txt -> data/formatted/all.jsonl, upper-cased."""
    text = ctx.workspace.path("data/raw/in.txt").read_text()
    ctx.progress.start(len(text), "chars")
    out = ctx.workspace.formatted_file
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.upper())
    ctx.progress.advance(len(text))
    return {"records_out": len(text.split()), "rejected_ratio": 0.0, "files_incomplete": 0}


def _missing_model(ctx):
    raise InputError("models/base has no config.json")


def _count(ctx):
    words = ctx.workspace.formatted_file.read_text().split()
    return {"counts": {"test": len(words), "train": 1}, "leakage": {"total": 0},
            "decontamination": {"remaining_in_train": 0}, "accounting": {"balanced": True}}


PIPELINE = (
    Phase("format", "upper-case", "format", _copy_upper, ("data",),
          inputs=lambda c, w: [w.path("data/raw/in.txt")], outputs=lambda c, w: [w.formatted_file]),
    Phase("split", "count", "split", _count, (),
          inputs=lambda c, w: [w.formatted_file], outputs=lambda c, w: []),
    Phase("baseline", "needs a model", "baseline", _missing_model),
)
CFG = parse_config({"gates": {"data-valid": {"format.records_out": 2}, "splits-ready": {"split.counts.test": 2}}})


@pytest.fixture
def ws(tmp_path):
    ws = Workspace.at(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "in.txt").write_text("a b c")
    return ws


def status(ws):
    doc = json.loads(ws.status_file.read_text())
    validate(doc, "status")
    return doc


def test_runs_then_skips_unchanged_then_reruns_changed(ws):
    first = run_pipeline(CFG, ws, PIPELINE, target="split")
    assert first.ran == ["format", "split"] and [g["passed"] for g in first.gates] == [True, True]
    doc = status(ws)
    assert doc["state"] == "succeeded" and [p["state"] for p in doc["phases"]] == ["succeeded", "succeeded", "pending"]
    assert json.loads(ws.metrics_file("format").read_text())["records_out"] == 3

    second = run_pipeline(CFG, ws, PIPELINE, target="split")
    assert second.ran == [] and second.skipped == ["format", "split"]
    assert len(second.gates) == 2  # gates are re-checked on a skip
    assert status(ws)["seq"] > doc["seq"]

    (ws.root / "data" / "raw" / "in.txt").write_text("a b c d")  # input changed
    assert run_pipeline(CFG, ws, PIPELINE, target="split").ran == ["format", "split"]

    ws.formatted_file.write_text("tampered")  # an output changed behind our back
    rerun = run_pipeline(CFG, ws, PIPELINE, target="split")
    # format restores the same output, so split's input is unchanged again
    assert rerun.ran == ["format"] and rerun.skipped == ["split"]

    workers = parse_config({**CFG.model_dump(), "data": {"workers": 2}})  # changes how, not what: nothing re-runs
    assert run_pipeline(workers, ws, PIPELINE, target="split").ran == []
    changed_cfg = parse_config({**CFG.model_dump(), "data": {"split": {"seed": 1, "train": 0.8, "val": 0.1, "test": 0.1}}})
    assert run_pipeline(changed_cfg, ws, PIPELINE, target="split").ran == ["format"]  # only format reads `data`

    assert run_pipeline(changed_cfg, ws, PIPELINE, target="split", force=True).ran == ["format", "split"]
    assert run_pipeline(changed_cfg, ws, PIPELINE, only="split", force=True).ran == ["split"]


def test_failed_gate_stops_the_run_and_is_recorded(ws):
    strict = parse_config({"gates": {"data-valid": {"format.records_out": 10}}})
    with pytest.raises(GateFailed) as info:
        run_pipeline(strict, ws, PIPELINE, target="split")
    assert info.value.exit_code == 1
    doc = status(ws)
    assert doc["state"] == "failed" and doc["error"]["type"] == "GateFailed"
    fmt, split = doc["phases"][0], doc["phases"][1]
    assert fmt["state"] == "succeeded" and fmt["gates"][0] == {
        "name": "data-valid", "passed": False, "failed_criteria": ["format.records_out"],
        "result_file": "metrics/gates/data-valid.json",
    }
    assert split["state"] == "pending"


def test_a_failing_phase_is_recorded_and_the_ones_before_it_kept(ws):
    with pytest.raises(InputError, match="models/base has no config.json"):
        run_pipeline(CFG, ws, PIPELINE)
    doc = status(ws)
    assert doc["state"] == "failed" and doc["error"]["message"] == "models/base has no config.json"
    assert [p["state"] for p in doc["phases"]] == ["succeeded", "succeeded", "failed"]
    assert doc["phases"][2]["error"]["type"] == "InputError"
    assert run_pipeline(CFG, ws, PIPELINE, target="split").skipped == ["format", "split"]


SLOW_RUN = textwrap.dedent("""
    import sys, time
    from factory.config import parse_config
    from factory.phase import Phase
    from factory.runner import run_pipeline
    from factory.workspace import Workspace

    def slow(ctx):
        ctx.progress.start(1000, "ticks")
        try:
            for _ in range(1000):
                time.sleep(0.01)
                ctx.progress.advance()
        finally:
            if sys.argv[2:] == ["broken-cleanup"]:  # a library's cleanup that fails when interrupted
                raise RuntimeError("trying to pop from empty mode stack")
        return {}

    run_pipeline(parse_config({}), Workspace.at(sys.argv[1]), (Phase("format", "slow", "format", slow),))
""")


@pytest.mark.parametrize("sig, cleanup", [(signal.SIGTERM, "clean"), (signal.SIGINT, "clean"),
                                          (signal.SIGTERM, "broken-cleanup"), (signal.SIGINT, "broken-cleanup")])
def test_final_state_written_when_killed_mid_phase(ws, sig, cleanup):
    """Cancelled, with the final state written, also when the interrupted code's cleanup
    raises an error of its own on the way out (torch's mode stack did, while loading a model:
    the run then ended as a model that cannot be loaded)."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(ws.root), cleanup], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ws.status_file.exists() and (status(ws)["phases"][0].get("progress") or {}).get("done", 0) > 20:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    doc = status(ws)
    assert doc["state"] == "cancelled"
    assert doc["phases"][0]["state"] == "cancelled" and doc["phases"][0]["error"]["type"] in ("Cancelled", "Interrupted")
    assert doc["ended_at"] is not None


def test_second_run_on_same_workspace_is_refused(ws):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(ws.root)])
    try:
        deadline = time.monotonic() + 30
        while not (ws.status_file.exists() and status(ws)["state"] == "running") and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(Exception, match=rf"another factory run \(pid {proc.pid} on "):
            run_pipeline(CFG, ws, PIPELINE, target="split")
    finally:
        proc.kill()
        proc.wait()


def test_a_file_written_this_run_is_hashed_once_in_it_and_again_in_the_next(ws):
    """A phase's output, hashed as the phase ends, is the next phase's input: its digest is
    kept for the run (not read again), but not saved for the next run, since a change in the
    same clock tick would leave its key as it was. A change of the file is still seen."""
    from factory.fingerprint import HashCache

    path = ws.root / "data" / "formatted" / "all.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"first\n")
    cache = HashCache(ws)
    digest = cache.file_digest(path)
    assert list(cache.racy) == [str(path)] and cache.file_digest(path) == digest
    cache.save()
    assert str(path) not in HashCache(ws).entries
    path.write_bytes(b"second\n")
    assert cache.file_digest(path) != digest


def test_an_output_is_hashed_as_it_is_written_and_read_again_once_changed(ws, monkeypatch):
    """The digest AtomicOutput keeps while writing is the digest of the file read back, and the
    hash cache takes it without reading the file (format's 900 MB output at 1M records); a file
    changed since is read."""
    from factory import fingerprint
    from factory.io import AtomicOutput

    path = ws.root / "data" / "formatted" / "all.jsonl"
    with AtomicOutput(path) as out:
        for i in range(1000):
            out.write(f"line {i}\n".encode())
    reads = []

    def read(p):
        reads.append(Path(p))
        return real_read(p)

    real_read = fingerprint.file_digest
    monkeypatch.setattr(fingerprint, "file_digest", read)
    assert fingerprint.HashCache(ws).file_digest(path) == xxhash.xxh3_128(path.read_bytes()).hexdigest()
    assert reads == []
    path.write_bytes(b"changed\n")
    assert fingerprint.HashCache(ws).file_digest(path) == xxhash.xxh3_128(b"changed\n").hexdigest()
    assert reads == [path]


def test_the_model_phases_take_a_split_files_digest_from_the_runs_hash_cache(ws, monkeypatch):
    """baseline and evaluate name the test split by its digest, finetune the train and val
    splits (and its checkpoints' fingerprint by theirs): the digest the runner's hash cache
    holds, not the file read again (a 700 MB train split at 1M records, which the checkpoint
    fingerprint also held whole in memory); a split changed since is read."""
    from factory import evaluation, fingerprint

    path = ws.split_file("test")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'{"conversations": []}\n' * 100)
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0.0)  # as if written a while ago: the cache keeps it
    cache = fingerprint.HashCache(ws)
    cache.file_digest(path)  # as the runner fingerprints the phase's inputs
    cache.save()
    expected = xxhash.xxh3_128(path.read_bytes()).hexdigest()
    reads = []
    real_open = io.open

    def opened(file, *args, **kwargs):  # any read of the split, by whatever function
        if Path(str(file)) == path:
            reads.append(path)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", opened)
    monkeypatch.setattr(builtins, "open", opened)
    assert evaluation.split_identity(ws, path)["xxh3_128"] == expected
    assert reads == []
    monkeypatch.undo()
    path.write_bytes(b'{"conversations": []}\n')
    assert evaluation.split_identity(ws, path)["xxh3_128"] == xxhash.xxh3_128(b'{"conversations": []}\n').hexdigest()
