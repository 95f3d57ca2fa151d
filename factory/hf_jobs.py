"""Remote runs on Hugging Face Jobs (`factory submit --hf-jobs`), through huggingface_hub's
`run_uv_job`: nothing of our own between the workspace and the job but a script and an archive.

- The job script is a uv script with a PEP 723 header: this factory version with its `train`
  extra is its one dependency. It unpacks the workspace archive, runs `factory run --only PHASE`
  for each phase asked, and pushes the results (the adapter, metrics, status files, logs) to the
  model repo the user names, or copies them into a mounted bucket. It reads the token from
  $HF_TOKEN like every huggingface_hub call does: no login() (seed 002, issue 5).
- The archive holds what those phases read: factory.yaml, gates/, data/splits/, metrics/, and
  the base model folder when model.name is a folder inside the workspace.
- Submitting passes the user's login token as the job's HF_TOKEN secret (never written to any
  file), always sets a timeout (the default, 30 minutes, ends most trainings), and puts the
  options before the script (seed 002, issue 1), as `run_uv_job` does.
- `--status`, `--logs` and `--cancel` act on the last job submitted from the workspace (or
  --job); `--status` maps the job's stage onto .factory/status.json, so `factory status`, the
  dashboard and `factory watch` show the remote run.
"""

from __future__ import annotations

import re
import shlex
import tarfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from factory import __version__
from factory.config import FactoryConfig
from factory.errors import FactoryError, InputError
from factory.io import read_json_if_exists, write_json
from factory.workspace import Workspace

TIMEOUT_FORMAT = re.compile(r"^\d+(\.\d+)?[smhd]?$")
RESULTS_MOUNT = "/results"  # where a bucket named by --push-to bucket:NAME is mounted in the job
REQUIREMENT = f"factory[train]=={__version__}"

SCRIPT = '''\
# /// script
# requires-python = ">=3.10"
# dependencies = [{requirement!r}]
# ///
"""A factory run on Hugging Face Jobs, written by `factory submit --hf-jobs`.

Usage: uv run job.py WORKSPACE.tar.gz
Unpacks the workspace, runs `factory run --only PHASE` for each of PHASES, then pushes the results
to PUSH_TO (a model repo) and/or copies them to $FACTORY_RESULTS_DIR (a mounted bucket). The
Hugging Face token comes from $HF_TOKEN, read by huggingface_hub itself.
"""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PHASES = {phases!r}
PUSH_TO = {push_to!r}
RESULTS = {results!r}


def main(archive: str) -> int:
    workspace = Path("workspace").resolve()
    with tarfile.open(archive) as bundle:
        bundle.extractall(workspace, filter="data")
    code = 0
    for phase in PHASES:
        code = subprocess.call([sys.executable, "-m", "factory", "run", "--only", phase, "-C", str(workspace)])
        if code:
            break
    # the results go out whatever the outcome: a failed run's status, metrics and logs say why
    kept = [p for p in RESULTS if (workspace / p).exists()]
    if os.environ.get("FACTORY_RESULTS_DIR"):
        target = Path(os.environ["FACTORY_RESULTS_DIR"])
        for path in kept:
            source, copy = workspace / path, target / path
            copy.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, copy, dirs_exist_ok=True)
            else:
                shutil.copy2(source, copy)
    if PUSH_TO:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(PUSH_TO, private=True, exist_ok=True)
        api.upload_folder(repo_id=PUSH_TO, folder_path=workspace, commit_message=f"factory run: {{' '.join(PHASES)}}",
                          allow_patterns=[f"{{p}}/**" if (workspace / p).is_dir() else p for p in kept])
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
'''


def job_dir(ws: Workspace) -> Path:
    return ws.state_dir / "hf-jobs"


def results(cfg: FactoryConfig) -> list[str]:
    """What the job sends back, relative to the workspace."""
    return [cfg.save.lora_path, "models/checkpoints/best", "models/checkpoints/last", "metrics",
            ".factory/status.json", ".factory/training-status.json", ".factory/training-history.jsonl", "logs"]


def archive_members(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    """The workspace files the remote phases read."""
    splits = sorted(ws.splits_dir.glob("*.jsonl")) if ws.splits_dir.is_dir() else []
    if not splits:
        raise InputError(f"no splits in {ws.rel(ws.splits_dir)}: run `factory run split` before submitting")
    members = [ws.config_file, *sorted(ws.gates_dir.glob("*.yaml")), *splits,
               *sorted(ws.metrics_dir.glob("*.json"))]
    model = ws.path(cfg.model.name)
    if model.is_dir():
        if not model.resolve().is_relative_to(ws.root.resolve()):
            raise InputError(f"model.name {cfg.model.name!r} is a folder outside the workspace, which the job cannot "
                             "see: use a hub id, or put the folder inside the workspace")
        members += sorted(p for p in model.rglob("*") if p.is_file())
    return members


def write_job(cfg: FactoryConfig, ws: Workspace, phases: list[str], push_to: str | None) -> tuple[Path, Path]:
    """The job script and the workspace archive, in .factory/hf-jobs/."""
    folder = job_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "job.py"
    repo = push_to if push_to and not push_to.startswith("bucket:") else None
    script.write_text(SCRIPT.format(requirement=REQUIREMENT, phases=phases, push_to=repo, results=results(cfg)),
                      encoding="utf-8")
    archive = folder / "workspace.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        for member in archive_members(cfg, ws):
            bundle.add(member, arcname=ws.rel(member), recursive=False)
    return script, archive


def check_timeout(timeout: str) -> str:
    if not TIMEOUT_FORMAT.match(timeout):
        raise FactoryError(f"--timeout {timeout!r}: a number with s, m, h or d, e.g. 6h (Jobs' own default, 30 minutes, "
                           "is too short for most trainings)")
    return timeout


def submission(script: Path, archive: Path, *, flavor: str, timeout: str, push_to: str | None) -> dict[str, Any]:
    """run_uv_job's arguments, and the `hf jobs uv run` command that says the same (options first)."""
    from huggingface_hub import Volume

    volumes, env = [], {}
    if push_to and push_to.startswith("bucket:"):
        volumes = [Volume(type="bucket", source=push_to.removeprefix("bucket:"), mount_path=RESULTS_MOUNT)]
        env = {"FACTORY_RESULTS_DIR": RESULTS_MOUNT}
    command = ["hf", "jobs", "uv", "run", "--flavor", flavor, "--timeout", timeout, "--secrets", "HF_TOKEN",
               *[f for v in volumes for f in ("--volume", f"hf://buckets/{v.source}:{v.mount_path}")],
               *[f for k, v in env.items() for f in ("--env", f"{k}={v}")], str(script), str(archive)]
    return {"arguments": {"script": str(script), "script_args": [str(archive)], "flavor": flavor, "timeout": timeout,
                          "env": env, "volumes": volumes or None, "labels": {"factory": __version__}},
            "command": command}


def submit(cfg: FactoryConfig, ws: Workspace, *, phases: list[str], flavor: str, timeout: str, push_to: str | None,
           dry_run: bool) -> dict[str, Any]:
    """Write the job and submit it (unless dry_run). Returns what was (or would be) done."""
    check_timeout(timeout)
    script, archive = write_job(cfg, ws, phases, push_to)
    plan = submission(script, archive, flavor=flavor, timeout=timeout, push_to=push_to)
    plan.update(script_path=script, archive=archive, script_text=script.read_text(encoding="utf-8"),
                uploads=[(ws.rel(m), m.stat().st_size) for m in archive_members(cfg, ws)])
    if dry_run:
        return plan
    from huggingface_hub import get_token, run_uv_job

    token = get_token()  # the user's login (`hf auth login`) or $HF_TOKEN
    if not token:
        raise InputError("not logged in to Hugging Face: run `hf auth login` (or set HF_TOKEN), then submit again")
    job = run_uv_job(**plan["arguments"], secrets={"HF_TOKEN": token})
    write_json(job_dir(ws) / "job.json", {"schema_version": 1, "id": job.id, "url": job.url, "owner": job.owner.name,
                                          "flavor": flavor, "timeout": timeout, "phases": phases, "push_to": push_to,
                                          "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    plan["job"] = job
    write_status(ws, job, phases)
    return plan


def last_job(ws: Workspace, job_id: str | None) -> dict[str, Any]:
    recorded = read_json_if_exists(job_dir(ws) / "job.json")
    if job_id:
        return {**(recorded or {}), "id": job_id} if recorded and recorded["id"] == job_id else {"id": job_id}
    if not recorded:
        raise InputError(f"no job submitted from {ws.root}: `factory submit --hf-jobs` first, or name one with --job")
    return recorded


def status_from_job(job, phases: list[str], previous: dict | None) -> dict[str, Any]:
    """.factory/status.json for a remote run, from a huggingface_hub JobInfo: SCHEDULING is a run
    whose phases wait, RUNNING runs them, COMPLETED succeeded, ERROR failed with the job's
    message, CANCELED and DELETED cancelled."""
    import phases as pipeline
    from factory.status import HEARTBEAT_SECONDS, REMOTE_HOST_PREFIX, idle_status, now_iso

    stage = getattr(job.status.stage, "value", job.status.stage)
    state, phase_state = {"SCHEDULING": ("running", "pending"), "RUNNING": ("running", "running"),
                          "COMPLETED": ("succeeded", "succeeded"), "ERROR": ("failed", "failed"),
                          "CANCELED": ("cancelled", "cancelled"), "DELETED": ("cancelled", "cancelled")}[stage]
    doc = idle_status([p.name for p in pipeline.PIPELINE], {p.name: p.summary for p in pipeline.PIPELINE})
    error = None
    if state in ("failed", "cancelled"):
        error = {"type": f"HFJob{stage.title()}", "message": job.status.message or f"the job ended with stage {stage}"}
    iso = lambda t: t.isoformat(timespec="milliseconds") if t else None  # noqa: E731
    for phase in doc["phases"]:
        if phase["name"] in phases:
            phase.update(state=phase_state, started_at=iso(job.started_at) if phase_state != "pending" else None,
                         ended_at=iso(job.finished_at), error=error if phase_state == "failed" else None,
                         reason=f"on Hugging Face Jobs: {job.url}")
    doc.update(run_id=job.id, seq=(previous or {}).get("seq", 0) + 1, state=state, target=phases[-1],
               started_at=iso(job.started_at or job.created_at), ended_at=iso(job.finished_at),
               updated_at=now_iso(), host=f"{REMOTE_HOST_PREFIX}{job.id}", heartbeat_seconds=HEARTBEAT_SECONDS, error=error)
    return doc


def write_status(ws: Workspace, job, phases: list[str]) -> dict[str, Any]:
    from factory.status import read_status

    doc = status_from_job(job, phases, read_status(ws))
    write_json(ws.status_file, doc)
    return doc


def inspect(ws: Workspace, job_id: str | None) -> tuple[Any, dict[str, Any]]:
    from huggingface_hub import inspect_job

    recorded = last_job(ws, job_id)
    job = inspect_job(job_id=recorded["id"], namespace=recorded.get("owner"))
    return job, write_status(ws, job, recorded.get("phases") or ["finetune"])


def logs(ws: Workspace, job_id: str | None):
    from huggingface_hub import fetch_job_logs

    recorded = last_job(ws, job_id)
    return fetch_job_logs(job_id=recorded["id"], namespace=recorded.get("owner"))


def cancel(ws: Workspace, job_id: str | None) -> tuple[Any, dict[str, Any]]:
    from huggingface_hub import cancel_job

    recorded = last_job(ws, job_id)
    cancel_job(job_id=recorded["id"], namespace=recorded.get("owner"))
    return inspect(ws, recorded["id"])


def shell_command(command: list[str]) -> str:
    return shlex.join(command)
