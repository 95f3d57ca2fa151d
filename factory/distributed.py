"""Several training processes for a phase (finetune), on the engines that exist: torchrun
(torch.distributed.run) starts and watches the processes, one machine or several; transformers'
Trainer with accelerate runs DDP, FSDP or DeepSpeed inside them.

The runner (`factory run`, machine 0) still owns the status files. For a phase marked
`distributed`, when training.distributed asks for more than one process, it calls `run_phase`:

1. `python -m factory.distributed launch` runs torchrun's own argument parser and `run()`; it
   starts one `python -m factory.distributed worker` per process and, when one fails, writes
   what torchrun observed (exit code or signal, per rank) to a file;
2. each worker runs the phase with its rank; rank 0 alone writes the phase's artifacts, and sends
   what it would tell the runner in-process (training-status fields, progress, log records) as
   JSON lines to .factory/distributed/events.jsonl, which `run_phase` hands to the runner's
   TrainingStatus, progress and log as they come; every rank also logs to logs/rank-N.log;
3. rank 0 writes the phase's metrics to .factory/distributed/metrics.json for `run_phase` to
   return, or a failed rank's error (its own, or torchrun's word on a signal) becomes the
   phase's error: RankFailed, or the rank's own FactoryError.

Other machines (node_rank > 0) `join`: the same torchrun launch, without the pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from factory.config import FactoryConfig
from factory.errors import EXIT_INTERNAL, ConfigError, FactoryError
from factory.io import write_json
from factory.workspace import Workspace

POLL_SECONDS = 0.2
STOP_WAIT_SECONDS = 60  # for torchrun to stop its workers after SIGTERM, before SIGKILL
EVENTS, METRICS = "events.jsonl", "metrics.json"


class RankFailed(FactoryError):
    """A training process died (a signal: the out-of-memory killer, kill -9) or failed; the next
    `factory run` resumes from the last checkpoint."""


def processes_per_node(cfg: FactoryConfig) -> int:
    value = cfg.training.distributed.nproc_per_node
    if value != "auto":
        return value
    import torch

    return max(1, torch.cuda.device_count())


def world_size(cfg: FactoryConfig) -> int:
    return processes_per_node(cfg) * cfg.training.distributed.nnodes


def launches(phase, cfg: FactoryConfig) -> bool:
    """Whether the runner runs `phase` under torchrun rather than in its own process."""
    return phase.distributed and world_size(cfg) > 1


def check(cfg: FactoryConfig, phases) -> None:
    """Refuse what the engines would not do as asked, before any of `phases` runs. Plain DDP runs
    anywhere: then neither the processes nor the GPUs are counted (importing torch for that would
    make a run where nothing changed take seconds)."""
    strategy = cfg.training.distributed.strategy
    if strategy == "ddp" or not any(launches(phase, cfg) for phase in phases):
        return
    import torch

    if not torch.cuda.is_available():
        # accelerate (1.16) runs FSDP and DeepSpeed on GPUs only: with the Trainer's use_cpu it runs plain DDP
        raise ConfigError(f"training.distributed.strategy {strategy} needs CUDA GPUs: accelerate shards models only "
                          "there, and on CPUs would run plain DDP instead. Use strategy ddp on this machine")


def channel_dir(ws: Workspace) -> Path:
    return ws.state_dir / "distributed"


def rank_log(ws: Workspace, rank: int) -> Path:
    return ws.logs_dir / f"rank-{rank}.log"


def torchrun_arguments(cfg: FactoryConfig, ws: Workspace) -> list[str]:
    d = cfg.training.distributed
    return ["--nnodes", str(d.nnodes), "--nproc-per-node", str(processes_per_node(cfg)), "--node-rank", str(d.node_rank),
            "--master-addr", d.master_addr, "--master-port", str(d.master_port),
            "--max-restarts", "0",  # a failed process ends the run; `factory run` resumes it
            # each process's stdout and stderr, tracebacks included, in its own files
            "--log-dir", str(ws.logs_dir / "torchrun"), "--redirects", "3"]


def launch_command(cfg: FactoryConfig, ws: Workspace, phase: str, run_id: str, options: dict) -> list[str]:
    channel = channel_dir(ws)
    failures = channel / f"failures-node{cfg.training.distributed.node_rank}.json"
    worker = ["--module", "factory.distributed", "worker", "--workspace", str(ws.root), "--phase", phase,
              "--run-id", run_id, *(["--restart"] if options.get("restart") else [])]
    return [sys.executable, "-m", "factory.distributed", "launch", "--failures", str(failures), "--",
            *torchrun_arguments(cfg, ws), *worker]


# --- the runner's side -------------------------------------------------------------------------


def run_phase(phase, ctx) -> dict[str, Any]:
    """Run `phase` in world_size processes; return rank 0's metrics (see the module docstring)."""
    from factory import plan

    cfg, ws = ctx.config, ctx.workspace
    size = world_size(cfg)
    plan.resolve(cfg, plan.accelerator_memory_gib(), world_size=size)  # an impossible batch split fails here, at once
    channel = channel_dir(ws)
    for name in (EVENTS, METRICS):
        (channel / name).unlink(missing_ok=True)
    for stale in [*channel.glob("rank-*.error.json"), *channel.glob("failures-node*.json")]:
        stale.unlink()
    channel.mkdir(parents=True, exist_ok=True)
    (channel / EVENTS).touch()
    d = cfg.training.distributed
    ctx.log.info("%s: %d processes (%d per machine x %d machines, strategy %s) under torchrun, meeting at %s:%d",
                 phase.name, size, processes_per_node(cfg), d.nnodes, d.strategy, d.master_addr, d.master_port)
    events = _EventFollower(channel / EVENTS, ctx)
    returncode = _run_launcher(launch_command(cfg, ws, phase.name, ctx.run_id, ctx.options), ws, poll=events.read)
    events.read()
    if returncode == 0:
        return json.loads((channel / METRICS).read_text())
    raise first_failure(channel, ws)


def join(cfg: FactoryConfig, ws: Workspace, phase) -> None:
    """Machine node_rank > 0: take part in machine 0's training of `phase`, nothing else."""
    check(cfg, [phase])
    if _run_launcher(launch_command(cfg, ws, phase.name, "", {}), ws, poll=lambda: None) != 0:
        raise first_failure(channel_dir(ws), ws)


def _run_launcher(command: list[str], ws: Workspace, poll) -> int:
    ws.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(ws.logs_dir / "torchrun.log", "ab") as output:  # torchrun's own messages; the processes' are in logs/torchrun/
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while proc.poll() is None:
                poll()
                time.sleep(POLL_SECONDS)
        except BaseException:  # Ctrl-C, SIGTERM (Cancelled), a status write that failed: stop the processes
            proc.terminate()  # torchrun passes it on to its workers
            try:
                proc.wait(STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    return proc.returncode


class _EventFollower:
    """Reads rank 0's events as they are appended and hands them to the runner."""

    def __init__(self, path: Path, ctx):
        self.path, self.ctx, self.offset, self.partial = path, ctx, 0, b""

    def read(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            if line.strip():
                self._apply(json.loads(line))

    def _apply(self, event: dict) -> None:
        if "training" in event:
            self.ctx.training.update(**event["training"])
        elif event.get("progress") == "start":
            self.ctx.progress.start(event["total"], event["unit"])
        elif event.get("progress") == "advance":
            self.ctx.progress.advance(event["n"])
        elif "log" in event:
            logging.getLogger(event["log"]["name"]).log(event["log"]["level"], "%s", event["log"]["message"])


def first_failure(channel: Path, ws: Workspace) -> FactoryError | Exception:
    """The error of the rank whose failure ended the run: one killed by a signal comes first
    (the others only lost it), except SIGTERM, which torchrun sends the survivors to stop them;
    else the earliest error a rank wrote itself."""
    observed = [f for file in sorted(channel.glob("failures-node*.json")) for f in json.loads(file.read_text())]
    errors = {}
    for file in channel.glob("rank-*.error.json"):
        error = json.loads(file.read_text())
        errors[error["rank"]] = error
    signalled = sorted((f for f in observed if f.get("signal") and f["rank"] not in errors),
                       key=lambda f: (f["signal"] == "SIGTERM", f["rank"]))
    if signalled and (signalled[0]["signal"] != "SIGTERM" or not errors):
        f = signalled[0]
        return RankFailed(f"training process rank {f['rank']} was killed by {f['signal']} (the out-of-memory killer, "
                          f"kill, or its machine stopping); the processes' output is in "
                          f"{ws.rel(ws.logs_dir / 'torchrun')}. `factory run` resumes from the last checkpoint")
    if errors:
        error = min(errors.values(), key=lambda e: e["time"])
        message = f"training process rank {error['rank']}: {error['message']}"
        if error["exit_code"] == EXIT_INTERNAL:  # a bug, as in one process
            return RuntimeError(f"{error['type']}: {message} (traceback in {ws.rel(rank_log(ws, error['rank']))})")
        from factory import errors as error_types

        kind = getattr(error_types, error["type"], None)
        user_error = (kind if isinstance(kind, type) and issubclass(kind, FactoryError) else RankFailed)(message)
        user_error.exit_code = error["exit_code"]
        return user_error
    failed = ", ".join(f"rank {f['rank']} exit code {f['exitcode']}" for f in observed) or "no process reported why"
    return RankFailed(f"the training processes failed ({failed}); see {ws.rel(ws.logs_dir / 'torchrun.log')} and "
                      f"{ws.rel(ws.logs_dir / 'torchrun')}")


# --- the launcher: torchrun, and what it observed ------------------------------------------------


def _launch(failures_file: Path, torchrun_args: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _stop_with_parent()
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as e:
        write_json(failures_file, [
            {"rank": rank, "exitcode": f.exitcode, "signal": f.signal_name() if f.exitcode < 0 else None,
             "message": f.message} for rank, f in sorted(e.failures.items())])
        return 1
    return 0


def _stop_with_parent() -> None:
    """The runner killed outright (kill -9) must not leave its training running: torchrun's
    SIGTERM handler stops the workers."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


# --- a worker: one rank --------------------------------------------------------------------------


class _Events:
    """Rank 0's reports to the runner (TrainingReporter and Progress), as JSON lines."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def send(self, **event: Any) -> None:
        with self._lock:
            self._file.write(json.dumps(event, default=str) + "\n")
            self._file.flush()

    def update(self, **fields: Any) -> None:
        self.send(training=fields)

    def start(self, total: int | None, unit: str) -> None:
        self.send(progress="start", total=total, unit=unit)

    def advance(self, n: int = 1) -> None:
        self.send(progress="advance", n=n)


class _Ignored:
    """What a rank other than 0 reports to: nothing."""

    def update(self, **fields: Any) -> None: pass
    def start(self, total: int | None, unit: str) -> None: pass
    def advance(self, n: int = 1) -> None: pass


class _EventLogHandler(logging.Handler):
    def __init__(self, events: _Events):
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        self.events.send(log={"name": record.name, "level": record.levelno, "message": record.getMessage()})


def _worker(args: argparse.Namespace) -> int:
    import phases
    from factory.config import load_config
    from factory.phase import PhaseContext
    from factory.redact import RedactingFormatter

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ws = Workspace.at(Path(args.workspace))
    channel = channel_dir(ws)
    root = logging.getLogger("factory")
    root.setLevel(logging.INFO)
    ws.logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(rank_log(ws, rank), encoding="utf-8")
    handler.setFormatter(RedactingFormatter(f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s"))
    root.addHandler(handler)
    events = _Events(channel / EVENTS) if rank == 0 else None
    if events:
        root.addHandler(_EventLogHandler(events))
    try:
        cfg = load_config(ws.config_file, os.environ)
        phase = phases.BY_NAME[args.phase]
        ctx = PhaseContext(cfg, ws, events or _Ignored(), logging.getLogger(f"factory.{phase.name}"), args.run_id,
                           events or _Ignored(), {"restart": args.restart}, rank=rank, world_size=size)
        metrics = phase.run(ctx)
        if rank == 0:
            write_json(channel / METRICS, metrics)
    except BaseException as exc:
        root.exception("rank %d failed", rank)
        write_json(channel / f"rank-{rank}.error.json", {
            "rank": rank, "time": time.time(), "type": type(exc).__name__, "message": str(exc),
            "exit_code": exc.exit_code if isinstance(exc, FactoryError) else EXIT_INTERNAL,
            "traceback": traceback.format_exc()})
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m factory.distributed", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser("launch", help="torchrun, recording which process failed and how")
    launch.add_argument("--failures", type=Path, required=True)
    launch.add_argument("torchrun_args", nargs=argparse.REMAINDER)
    worker = commands.add_parser("worker", help="one training process (started by torchrun)")
    worker.add_argument("--workspace", required=True)
    worker.add_argument("--phase", required=True)
    worker.add_argument("--run-id", default="")
    worker.add_argument("--restart", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "launch":
        torchrun_args = args.torchrun_args[1:] if args.torchrun_args[:1] == ["--"] else args.torchrun_args
        return _launch(args.failures, torchrun_args)
    return _worker(args)


if __name__ == "__main__":
    sys.exit(main())
