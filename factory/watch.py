"""`factory status --watch`: the pipeline table and the training progress (losses on the training
and validation splits), redrawn until the run ends.

Reads the same files a web page would poll (status.json, training-status.json and the
training history), so it works from any terminal beside a running `factory run`.
"""

from __future__ import annotations

import time

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from factory.status import idle_status, read_status, read_training_history, read_training_status, runner_alive
from factory.terminal import STATE_STYLE, duration, status_table
from factory.workspace import Workspace

SPARK_CHARS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 60


def watch(ws: Workspace, console: Console, phase_names: list[str], summaries: dict[str, str],
          interval: float = 0.5) -> dict:
    """Redraw until no run is in progress; return the last status read."""
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            doc = read_status(ws) or idle_status(phase_names, summaries)
            alive = runner_alive(doc)
            live.update(view(doc, read_training_status(ws), read_training_history(ws)), refresh=True)
            if not alive:
                break
            time.sleep(interval)
    if doc["state"] == "running":
        console.print(f"[red]the run (pid {doc['pid']}) is gone without writing its final state[/] (killed?); "
                      "`factory run` resumes it")
    elif doc["state"] == "idle":
        console.print("no run has started in this workspace")
    else:
        console.print(f"run {doc['run_id']}: [{STATE_STYLE.get(doc['state'], '')}]{doc['state']}[/]")
    return doc


def view(doc: dict, training: dict | None, history: list[dict]) -> RenderableType:
    parts: list[RenderableType] = [status_table(doc)]
    if training:
        parts.append(training_view(training, history))
    return Group(*parts)


def training_view(training: dict, history: list[dict]) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    style = STATE_STYLE.get(training["status"], "")
    total = training["total_steps"]
    facts = [f"[bold]{training['phase']}[/] [{style}]{training['status']}[/]",
             f"step {training['step']}/{total if total is not None else '?'}",
             f"epoch {training['epoch']:.2f}" + (f"/{training['total_epochs']:g}" if training["total_epochs"] else ""),
             f"loss {_num(training['loss'])}"]
    if training.get("eval_loss") is not None:
        facts.append(f"val loss {_num(training['eval_loss'])} (best {_num(training.get('best_eval_loss'))})")
    facts.append(f"lr {_num(training['learning_rate'])}")
    if training["eta_seconds"] is not None and training["running"]:
        facts.append(f"ETA {duration(training['eta_seconds'])}")
    grid.add_row(Text.from_markup("  ".join(facts)))
    if total:
        grid.add_row(ProgressBar(total=total, completed=training["step"], width=SPARK_WIDTH))
    # A history point has the training loss, the validation loss, or both; both curves share
    # one scale, so a validation curve that turns up while the training loss falls shows.
    losses = [p["loss"] for p in history if p.get("loss") is not None]
    evals = [p["eval_loss"] for p in history if p.get("eval_loss") is not None]
    scale = (min(losses + evals), max(losses + evals)) if losses or evals else None
    if losses:
        grid.add_row(Text.assemble(("loss ", "dim"), (sparkline(losses, SPARK_WIDTH, scale), "yellow"),
                                   (f"  {losses[0]:.4g} → {losses[-1]:.4g} over {len(losses)} logged steps", "dim")))
    if evals:
        grid.add_row(Text.assemble(("val  ", "dim"), (sparkline(evals, SPARK_WIDTH, scale), "green"),
                                   (f"  {evals[0]:.4g} → {evals[-1]:.4g} over {len(evals)} evaluations, "
                                    f"lowest {min(evals):.4g}", "dim")))
    if training["error"]:
        grid.add_row(Text(training["error"], style="red"))
    return grid


def sparkline(values: list[float], width: int, scale: tuple[float, float] | None = None) -> str:
    """One character per bucket of consecutive values (their mean), scaled min..max of the
    values or of `scale` (low, high)."""
    n = min(width, len(values))
    buckets = [values[i * len(values) // n:(i + 1) * len(values) // n] for i in range(n)]
    means = [sum(b) / len(b) for b in buckets]
    low, high = scale or (min(means), max(means))
    span = high - low or 1.0
    return "".join(SPARK_CHARS[round((m - low) / span * (len(SPARK_CHARS) - 1))] for m in means)


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"

