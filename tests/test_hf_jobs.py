"""`factory submit --hf-jobs`, as far as it runs without the Hugging Face network: the dry run
(the PEP 723 script, the command with its options before the script, the uploads, no token
anywhere), the job script run locally and unchanged by `uv run` on the example workspace
(offline: uv takes the active environment, whose packages satisfy the script's header, and
resolves nothing), and the job stages mapped onto .factory/status.json from huggingface_hub's
own JobInfo objects. Not run here: the submission itself, --logs, --cancel, the push to a repo
or a bucket (a bucket is a folder mounted in the job: the local run copies to a folder)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from factory import __version__
from factory.resources import validate

TOKEN = "hf_notARealTokenButSecret123456"
ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_TOKEN": TOKEN}
UV = Path(sys.executable).with_name("uv")


def factory(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The example workspace with its splits, trained for 4 steps when run."""
    root = tmp_path_factory.mktemp("jobs") / "ws"
    assert factory("init", "--example", root, "--records", 300, "--steps", 4).returncode == 0
    factory("run", "split", "-C", root)  # its small test split fails a gate; the splits are there
    assert (root / "data" / "splits" / "train.jsonl").exists()
    return root


def test_dry_run_prints_the_script_the_command_and_the_uploads_and_never_the_token(example):
    proc = factory("submit", "--hf-jobs", "--dry-run", "--flavor", "a100-large", "--push-to", "me/my-adapter",
                   "-C", example)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"# dependencies = ['factory[train]=={__version__}']" in out and "# /// script" in out
    command = next(line for line in out.splitlines() if line.startswith("hf jobs uv run"))
    words = command.split()
    script = words.index(str(example / ".factory" / "hf-jobs" / "job.py"))
    # options before the script (seed 002: after it they are ignored), the token as a secret, a timeout
    assert words[script + 1:] == [str(example / ".factory" / "hf-jobs" / "workspace.tar.gz")]
    assert {"--flavor", "--timeout", "--secrets"} <= set(words[:script])
    assert words[words.index("--secrets") + 1] == "HF_TOKEN" and words[words.index("--timeout") + 1] == "6h"
    assert words[words.index("--flavor") + 1] == "a100-large"
    for member in ("factory.yaml", "data/splits/train.jsonl", "data/splits/val.jsonl", "models/base/config.json",
                   "gates/training-completed.yaml"):
        assert f"  {member}  " in out
    with tarfile.open(example / ".factory" / "hf-jobs" / "workspace.tar.gz") as archive:
        names = archive.getnames()
    assert "data/splits/train.jsonl" in names and "models/base/model.safetensors" in names
    assert not any(n.startswith(("data/raw", ".factory", "outputs")) for n in names)
    # the token of the login never lands in the output or a file; no login() call
    script = (example / ".factory" / "hf-jobs" / "job.py").read_text()
    assert "login(" not in script and "PUSH_TO = 'me/my-adapter'" in script
    for path in [p for p in (example / ".factory").rglob("*") if p.is_file()]:
        assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in out + proc.stderr


def test_a_bucket_is_mounted_and_a_timeout_must_be_a_duration(example):
    proc = factory("submit", "--hf-jobs", "--dry-run", "--push-to", "bucket:me/results", "--timeout", "90m",
                   "-C", example)
    assert proc.returncode == 0, proc.stderr
    assert ("--volume hf://buckets/me/results:/results --env FACTORY_RESULTS_DIR=/results" in proc.stdout
            and "--timeout 90m" in proc.stdout)
    assert "PUSH_TO = None" in proc.stdout
    bad = factory("submit", "--hf-jobs", "--dry-run", "--timeout", "forever", "-C", example)
    assert bad.returncode == 2 and "--timeout 'forever'" in bad.stderr
    missing = factory("submit", "--dry-run", "-C", example)
    assert missing.returncode == 2 and "--hf-jobs" in missing.stderr


def test_submitting_without_a_login_says_how_to_log_in(example, tmp_path):
    env = {k: v for k, v in ENV.items() if k != "HF_TOKEN"}
    proc = factory("submit", "--hf-jobs", "-C", example, env={**env, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and "hf auth login" in proc.stderr
    assert not (example / ".factory" / "hf-jobs" / "job.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not UV.exists(), reason="uv is not installed beside this Python (the dev extra has it)")
def test_the_job_script_runs_locally_unchanged_with_uv(example, tmp_path):
    """`uv run --offline --active` with this environment active: uv reads the script's PEP 723
    header, finds every requirement (factory[train]==VERSION and its dependencies) satisfied by the
    active environment, and runs the script there, resolving nothing."""
    assert factory("submit", "--hf-jobs", "--dry-run", "-C", example).returncode == 0
    job = tmp_path / "job"
    job.mkdir()
    shutil.copy(example / ".factory" / "hf-jobs" / "job.py", job)
    shutil.copy(example / ".factory" / "hf-jobs" / "workspace.tar.gz", job)
    results = tmp_path / "results"  # a bucket mounted in the job
    env = {**ENV, "VIRTUAL_ENV": sys.prefix, "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
           "FACTORY_RESULTS_DIR": str(results)}
    proc = subprocess.run([str(UV), "run", "--offline", "--active", "-v", "job.py", "workspace.tar.gz"], cwd=job,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Using active virtual environment `{sys.prefix}`" in proc.stderr
    assert "All requirements satisfied" in proc.stderr and f"factory[train]=={__version__}" in proc.stderr
    stats = json.loads((results / "metrics" / "training-stats.json").read_text())
    assert stats["steps"] == 4 and stats["completed"]
    assert (results / "models" / "checkpoints" / "lora" / "adapter_model.safetensors").exists()
    status = json.loads((results / ".factory" / "status.json").read_text())
    validate(status, "status")
    assert status["state"] == "succeeded"
    assert [p["state"] for p in status["phases"] if p["name"] == "finetune"] == ["succeeded"]


def job_info(stage: str, message: str | None = None):
    from huggingface_hub import JobInfo

    return JobInfo(id="6936a1b2c3", owner={"id": "u1", "name": "me", "type": "user"},
                   status={"stage": stage, "message": message}, createdAt="2026-12-03T10:00:00.000Z",
                   startedAt=None if stage == "SCHEDULING" else "2026-12-03T10:01:00.000Z",
                   finishedAt="2026-12-03T11:00:00.000Z" if stage in ("COMPLETED", "ERROR", "CANCELED") else None,
                   flavor="a10g-large", command=["uv", "run", "job.py"])


@pytest.mark.parametrize("stage,state,phase_state", [
    ("SCHEDULING", "running", "pending"), ("RUNNING", "running", "running"), ("COMPLETED", "succeeded", "succeeded"),
    ("ERROR", "failed", "failed"), ("CANCELED", "cancelled", "cancelled"), ("DELETED", "cancelled", "cancelled")])
def test_job_stages_map_onto_a_valid_status(stage, state, phase_state):
    from factory.hf_jobs import status_from_job

    doc = status_from_job(job_info(stage, "CUDA out of memory" if stage == "ERROR" else None), ["finetune", "evaluate"],
                          {"seq": 41})
    validate(doc, "status")
    assert (doc["state"], doc["run_id"], doc["seq"], doc["target"]) == (state, "6936a1b2c3", 42, "evaluate")
    by_name = {p["name"]: p for p in doc["phases"]}
    assert by_name["finetune"]["state"] == by_name["evaluate"]["state"] == phase_state
    assert by_name["split"]["state"] == "pending" and "huggingface.co/jobs/me/6936a1b2c3" in by_name["finetune"]["reason"]
    if stage == "ERROR":
        assert doc["error"] == {"type": "HFJobError", "message": "CUDA out of memory"}
        assert by_name["finetune"]["error"] == doc["error"]


def test_a_remote_running_status_is_not_taken_for_a_dead_local_run(tmp_path):
    from factory.hf_jobs import status_from_job
    from factory.io import write_json
    from factory.status import finalize_abandoned, read_status, runner_alive
    from factory.workspace import Workspace

    ws = Workspace.at(tmp_path)
    ws.state_dir.mkdir(parents=True)
    doc = status_from_job(job_info("RUNNING"), ["finetune"], None)
    doc["updated_at"] = "2026-12-01T00:00:00.000+00:00"  # no heartbeat for days: a local run would be dead
    write_json(ws.status_file, doc)
    assert finalize_abandoned(ws) == [] and read_status(ws)["state"] == "running"
    assert runner_alive(read_status(ws))
