"""Experiment trackers (`training.report_to`): TensorBoard, Trackio, Weights & Biases, MLflow.

The Trainer's own integrations log the training and validation losses while finetune runs;
this module only names the run and tells them where to write, and at the end of `factory run`
logs the factory's own results (baseline vs fine-tuned scores, gate results) to the same run.
A tracker's package is imported only when it is asked for: wandb and mlflow need an account or
a server and are not dependencies; tensorboard and trackio (the `trackers` extra) work offline.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

from factory.errors import InputError
from factory.io import read_json_if_exists
from factory.workspace import Workspace

log = logging.getLogger("factory.trackers")

PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}


def run_name(ws: Workspace, run_id: str) -> str:
    """WORKSPACE-RUNID: the workspace folder and the factory run that started the training."""
    return f"{_safe(ws.root.name)}-{run_id}"


def project(ws: Workspace) -> str:
    return _safe(ws.root.name)


def tensorboard_dir(ws: Workspace, name: str) -> Path:
    return ws.logs_dir / "tensorboard" / name


def check_installed(trackers: list[str]) -> None:
    """Fail before loading a model when a tracker's package is missing."""
    import importlib.util

    missing = [t for t in trackers if importlib.util.find_spec(PACKAGES[t]) is None]
    if missing:
        raise InputError(f"training.report_to asks for {', '.join(missing)}, not installed: "
                         f"pip install {' '.join(PACKAGES[t] for t in missing)} (tensorboard and trackio: "
                         f"pip install -e \".[trackers]\")")


def trainer_arguments(trackers: list[str], ws: Workspace, name: str) -> dict[str, Any]:
    """The TrainingArguments that route the Trainer's logs to the trackers."""
    return {"report_to": trackers or "none", "run_name": name, "project": project(ws)}


@contextlib.contextmanager
def environment(trackers: list[str], ws: Workspace, name: str) -> Iterator[None]:
    """Settings the Trainer's tracker callbacks read from the environment, for the time of the
    training; a variable the user has set wins."""
    wanted = {}
    if "tensorboard" in trackers:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir(ws, name))
    if "wandb" in trackers:
        wanted.update(WANDB_PROJECT=project(ws), WANDB_RUN_ID=name, WANDB_RESUME="allow")
    if "mlflow" in trackers:
        wanted.update(MLFLOW_EXPERIMENT_NAME=project(ws))
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def run_info(trackers: list[str], ws: Workspace, name: str) -> dict[str, Any]:
    """Where each tracker's run is, for metrics/training-stats.json and log_results."""
    info: dict[str, Any] = {"report_to": trackers, "run_name": name, "project": project(ws)}
    if "tensorboard" in trackers:
        info["tensorboard_dir"] = ws.rel(Path(os.environ.get("TENSORBOARD_LOGGING_DIR") or tensorboard_dir(ws, name)))
    if "mlflow" in trackers:
        import mlflow

        run = mlflow.last_active_run()
        info["mlflow_run_id"] = run.info.run_id if run else None
    return info


# --- the factory's results, at the end of `factory run` --------------------------------------


def results(ws: Workspace) -> dict[str, float]:
    """Baseline vs fine-tuned scores, the paired statistics and every gate's verdict, as flat
    scalar metrics named factory/...; whatever of them exists yet."""
    from factory.gates import last_results

    values: dict[str, Any] = {}
    evaluation = read_json_if_exists(ws.metrics_file("evaluation")) or {}
    for metric, m in (evaluation.get("per_metric") or {}).items():
        for side in ("baseline", "finetuned", "improvement"):
            values[f"factory/{metric}/{side}"] = m.get(side)
    comparison = evaluation.get("comparison") or {}
    for key in ("p_value", "wilcoxon_p_value", "relative_improvement"):
        values[f"factory/comparison/{key}"] = comparison.get(key)
    quantization = read_json_if_exists(ws.metrics_file("quantization")) or {}
    values["factory/quantization/worst_relative_score_drop"] = quantization.get("worst_relative_score_drop")
    for gate in last_results(ws):
        values[f"factory/gate/{gate['gate']}"] = 1.0 if gate["passed"] else 0.0
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def gate_table(ws: Workspace) -> str:
    """Every gate criterion as a Markdown table (TensorBoard's text panel)."""
    from factory.gates import last_results

    rows = ["| gate | metric | observed | op | required | result |", "|---|---|---|---|---|---|"]
    for gate in last_results(ws):
        for c in gate["criteria"]:
            verdict = {True: "pass", False: "FAIL", None: "skipped"}[c["passed"]]
            rows.append(f"| {gate['gate']} | {c['metric']} | {c['observed']} | {c['op']} | "
                        f"{c['required'] if c['required'] is not None else c['value']} | {verdict} |")
    return "\n".join(rows)


def log_results(ws: Workspace) -> list[str]:
    """Log results(ws) to the run(s) the last training reported to; returns the trackers logged
    to. Each tracker is tried on its own, and a failure is a warning, never a failed run."""
    stats = read_json_if_exists(ws.metrics_file("training-stats")) or {}
    info = stats.get("trackers") or {}
    trackers = info.get("report_to") or []
    values = results(ws)
    step = int(stats.get("steps") or 0)
    done = []
    for tracker in trackers:
        try:
            globals()[f"_log_{tracker}"](ws, info, values, step)
            done.append(tracker)
        except Exception as exc:  # a tracker is a view; the run's results are in metrics/
            log.warning("could not log the results to %s: %s: %s", tracker, type(exc).__name__, exc, exc_info=True)
    return done


def _log_tensorboard(ws: Workspace, info: dict, values: dict[str, float], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(ws.path(info["tensorboard_dir"])))
    try:
        for key, value in values.items():
            writer.add_scalar(key, value, step)
        writer.add_text("factory/gates", gate_table(ws), step)
    finally:
        writer.close()


def _log_trackio(ws: Workspace, info: dict, values: dict[str, float], step: int) -> None:
    with _quiet():
        import trackio

        trackio.init(project=info["project"], name=info["run_name"], resume="must")
        try:
            trackio.log(values, step=step)
        finally:
            trackio.finish()


def _log_wandb(ws: Workspace, info: dict, values: dict[str, float], step: int) -> None:
    import wandb

    run = wandb.init(project=info["project"], id=info["run_name"], resume="must")
    try:
        run.summary.update(values)
    finally:
        run.finish()


def _log_mlflow(ws: Workspace, info: dict, values: dict[str, float], step: int) -> None:
    import mlflow

    if not info.get("mlflow_run_id"):
        raise InputError("the training recorded no MLflow run id")
    with mlflow.start_run(run_id=info["mlflow_run_id"]):
        mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Trackio prints its banner on stdout; it goes to the log instead of the terminal."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        if buffer.getvalue().strip():
            log.info("trackio: %s", buffer.getvalue().strip())


def _safe(name: str) -> str:
    # run and project names end up in URLs, folder names and wandb ids: letters, digits, - _ .
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "factory"
