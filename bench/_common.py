"""Helpers the model benchmarks share: waiting for a quiet machine, subprocess timing, medians.

The benchmark machines are small and sometimes shared. Before every timed run,
`wait_until_quiet` waits (up to a limit) until no other process (a `spike/` job, `pytest`,
another `factory run`, anything outside this benchmark's process tree) is using CPU, and
returns what it saw, so each result can say whether the machine was quiet.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def _own_tree() -> set[int]:
    me = psutil.Process()
    pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
    parent = me.parent()
    while parent is not None:  # the shell that started us is not "another job"
        pids.add(parent.pid)
        parent = parent.parent()
    return pids


def busy_processes(sample_s: float = 1.0, min_cpu: float = 10.0) -> list[str]:
    """Other processes that used more than `min_cpu`% of a core over `sample_s`: any process
    outside this benchmark's own tree counts, not only `spike/`, `pytest` or
    `factory run` by name (a job started as `python train.py` from /tmp/spike has none of them)."""
    own = _own_tree()
    candidates = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid in own:
            continue
        try:
            proc.cpu_percent(None)
            candidates.append((proc, " ".join(proc.info["cmdline"] or []) or proc.name()))
        except psutil.Error:
            pass
    time.sleep(sample_s)
    busy = []
    for proc, cmdline in candidates:
        try:
            cpu = proc.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu > min_cpu:
            busy.append(f"pid {proc.pid} {cpu:.0f}% {cmdline[:120]}")
    return busy


def wait_until_quiet(max_wait_s: float = 600.0, poll_s: float = 10.0, quiet: bool = False) -> dict:
    """Wait until busy_processes() is empty, at most `max_wait_s`. Returns what was seen."""
    started = time.monotonic()
    busy = busy_processes()
    announced = False
    while busy and time.monotonic() - started < max_wait_s:
        if not announced and not quiet:
            print(f"  waiting for a quiet machine (up to {max_wait_s:.0f}s): {busy[0]}", flush=True)
            announced = True
        time.sleep(poll_s)
        busy = busy_processes()
    waited = time.monotonic() - started
    if busy and not quiet:
        print(f"  still busy after {waited:.0f}s, measuring anyway: {busy}", flush=True)
    return {"waited_s": round(waited, 1), "busy": busy, "loadavg_1m": round(os.getloadavg()[0], 2)}


def _machine_busy_s() -> float:
    t = psutil.cpu_times()  # the whole machine, all cores, since boot
    return t.user + t.nice + t.system + t.irq + t.softirq


def _own_cpu_s() -> float:
    t = os.times()  # this process (all its threads) and its waited-for children
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """Wall time, and the CPU other processes used meanwhile: the machine's busy time minus
    this process tree's. It sees a job that started and ended inside the interval, which a
    look at the process list before and after would miss."""

    def __enter__(self) -> "CpuWatch":
        self._t, self._machine, self._own = time.monotonic(), _machine_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.monotonic() - self._t
        self.cpu_s = _own_cpu_s() - self._own
        self.other_cpu_s = max(0.0, _machine_busy_s() - self._machine - self.cpu_s)

    @property
    def other_share(self) -> float:
        """Other processes' CPU as a fraction of one core over the interval."""
        return self.other_cpu_s / self.wall_s if self.wall_s else 0.0


def timed_run(command: list[str], *, env: dict | None = None, cwd: Path | None = None,
              log: Path | None = None, ok: tuple[int, ...] = (0,)) -> dict:
    """Run `command`: wall seconds, CPU seconds of the child tree, other processes' CPU
    seconds meanwhile, and the exit code. An exit code outside `ok` stops the benchmark."""
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        with CpuWatch() as watch:
            proc = subprocess.run(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()
    if proc.returncode not in ok:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(map(str, command))}\n{tail}")
    return {"wall_s": watch.wall_s, "cpu_s": watch.cpu_s, "other_cpu_s": watch.other_cpu_s,
            "other_share": watch.other_share, "rc": proc.returncode}


def quiet_run(measure, *, max_wait_s: float = 600.0, tries: int = 3, max_other_share: float = 0.1) -> dict:
    """`measure()` (returning a dict with other_share) after waiting for a quiet machine;
    again (up to `tries` times) when other processes used more than `max_other_share` of a
    core meanwhile. The result carries what was seen and whether it stayed quiet."""
    for attempt in range(1, tries + 1):
        seen = wait_until_quiet(max_wait_s)
        result = measure()
        result.update(machine=seen, attempt=attempt, clean=result["other_share"] <= max_other_share)
        if result["clean"]:
            return result
        print(f"  other processes used {100 * result['other_share']:.0f}% of a core during the run;"
              f" {'measuring again' if attempt < tries else 'keeping it, marked unclean'}", flush=True)
    return result


def thread_env(threads: int | None) -> dict:
    """The environment for a child: OMP_NUM_THREADS=threads, or unset for torch's default."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def torch_threads(env: dict) -> int:
    """What torch.get_num_threads() says in a child started with `env`."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def median(values: list[float]) -> float:
    return statistics.median(values)


def factory_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "factory", *args]


def run_cli(*args: str, env: dict | None = None, log: Path | None = None) -> None:
    """A factory command that must succeed (setup, not timed)."""
    timed_run(factory_cli(*args), env=env or thread_env(None), cwd=ROOT, log=log)
