"""`factory status --watch` in a real terminal (a pty) beside a real run in another process:
it redraws while the run trains, shows the loss sparkline, and exits when the run ends, is
killed, or when nothing is running."""

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

from factory.watch import SPARK_CHARS

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
FAKE_TRAINING = textwrap.dedent("""
    import sys, time
    from factory.config import parse_config
    from factory.phase import Phase
    from factory.runner import run_pipeline
    from factory.workspace import Workspace

    STEPS = int(sys.argv[2])

    def train(ctx):
        ctx.progress.start(STEPS, "steps")
        ctx.training.update(step=0, total_steps=STEPS, epoch=0.0, total_epochs=1.0)
        for step in range(1, STEPS + 1):
            time.sleep(0.05)
            ctx.progress.advance()
            ctx.training.update(step=step, epoch=step / STEPS, loss=5.0 / step, learning_rate=0.01,
                                eta_seconds=(STEPS - step) * 0.05)
            if step % 10 == 0:  # a validation curve that bottoms out at step 40 and rises
                ctx.training.update(step=step, eval_loss=1.0 + abs(step - 40) / 40, best_eval_loss=1.0)
        return {"completed": True, "nonfinite_losses": 0, "convergence": {"loss_drop": 0.9, "last_window_change": 0.0}}

    run_pipeline(parse_config({}), Workspace.at(sys.argv[1]), (Phase("finetune", "fake training", "training-stats", train),))
""")


def start_run(root: Path, steps: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", FAKE_TRAINING, str(root), str(steps)])
    status = root / ".factory" / "training-status.json"
    deadline = time.monotonic() + 30
    while not status.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


def watch_in_terminal(root: Path, timeout: float = 60) -> tuple[int, str]:
    """Run `factory status --watch` on a pty (140 x 50) and return its exit code and screen text."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 140, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    proc = subprocess.Popen([sys.executable, "-m", "factory", "status", "--watch", "-C", str(root)],
                            stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm-256color"})
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    rc = proc.wait(timeout=10)
    return rc, ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


def test_watch_redraws_during_a_run_and_exits_when_it_ends(tmp_path):
    run = start_run(tmp_path, steps=80)
    rc, screen = watch_in_terminal(tmp_path)
    assert run.wait(timeout=60) == 0 and rc == 0, screen[-2000:]
    steps = [int(s) for s in re.findall(r"step (\d+)/80", screen)]
    assert len(set(steps)) >= 3 and steps == sorted(steps), steps  # redrawn while it trained, never backwards
    assert steps[-1] == 80 and "ETA" in screen
    sparklines = re.findall(rf"loss ([{SPARK_CHARS}]+)", screen)
    assert sparklines and len(sparklines[-1]) == 60 and sparklines[-1][0] == "█"  # 80 points in 60 columns, falling
    assert "over 80 logged steps" in screen
    val = re.findall(rf"val  ([{SPARK_CHARS}]+)  \S+ → (\S+) over (\d+) evaluations, lowest (\S+)", screen)
    assert val and val[-1][1:] == ("2", "8", "1")  # every evaluation, the last one and the lowest
    assert len(val[-1][0]) == 8 and val[-1][0][3] == min(val[-1][0])  # the lowest at step 40, drawn as such
    assert "val loss 2 (best 1)" in screen
    assert "pipeline: succeeded" in screen and re.search(r"run \w+: succeeded", screen)
    assert "training-completed ✓" in screen


def test_watch_says_when_the_run_was_killed(tmp_path):
    run = start_run(tmp_path, steps=2000)
    try:
        os.kill(run.pid, signal.SIGKILL)
    finally:
        run.wait()
    rc, screen = watch_in_terminal(tmp_path, timeout=30)
    # the command finds the owner gone and rewrites the files to a final state that says so
    flat = re.sub(r"\s+", " ", screen)
    assert rc == 0 and f"(pid {run.pid} on " in flat and "disappeared without writing its final state" in flat
    assert "pipeline: failed" in flat and "finetune failed" in flat


def test_watch_with_nothing_running_prints_once_and_exits(tmp_path):
    subprocess.run([sys.executable, "-m", "factory", "init", str(tmp_path)], check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "factory", "status", "--watch", "-C", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "pipeline: idle" in proc.stdout and "no run has started" in proc.stdout
    both = subprocess.run([sys.executable, "-m", "factory", "status", "--watch", "--json", "-C", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert both.returncode == 2 and "not both" in both.stderr


def _plain_reporter(monkeypatch):
    """A RunReporter writing to a non-terminal console, its output, and the clock it reads."""
    import io

    from rich.console import Console

    from factory import terminal

    clock = [100.0]
    monkeypatch.setattr(terminal.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    return terminal.RunReporter(Console(file=log, force_terminal=False, width=120)), log, clock


def test_run_prints_plain_progress_lines_with_rate_and_eta_when_not_a_terminal(monkeypatch):
    from factory.phase import Phase

    reporter, log, clock = _plain_reporter(monkeypatch)
    phase = Phase("finetune", "train", "training-stats", None)
    with reporter:
        reporter.phase_started(phase)
        reporter.progress(phase, 0, 1000, "steps")  # counting starts
        for step in range(1, 301):
            clock[0] += 0.125  # 8 steps/s
            reporter.progress(phase, step, 1000, "steps")
        reporter.phase_finished(phase, "succeeded", 30.0, "")
    lines = log.getvalue().splitlines()
    assert lines[0] == "finetune: started (train)"
    assert lines[1:4] == ["finetune: 0/1000 steps", "finetune: 40/1000 steps, 8/s, ETA 2m00s",  # every 5 s, not every step
                          "finetune: 80/1000 steps, 8/s, ETA 1m55s"]
    assert lines[-2] == "finetune: 280/1000 steps, 8/s, ETA 1m30s" and len(lines) == 10
    assert lines[-1] == "finetune: succeeded (30.0s)"
    assert "\x1b[" not in log.getvalue()  # no escape codes in a CI log


def test_a_count_of_unknown_total_prints_no_line_before_it_starts_counting(monkeypatch):
    """"format: 0 records" right after "started" read as the phase's result (it then read 600)."""
    from factory.phase import Phase

    reporter, log, clock = _plain_reporter(monkeypatch)
    phase = Phase("format", "read", "format", None)
    with reporter:
        reporter.phase_started(phase)
        reporter.progress(phase, 0, None, "records")
        clock[0] += 6
        reporter.progress(phase, 600, None, "records")
        reporter.phase_finished(phase, "succeeded", 6.0, "")
    assert log.getvalue().splitlines() == ["format: started (read)", "format: 600 records", "format: succeeded (6.0s)"]
