"""Training that watches its validation split: the curves' statistics and the
training-completed gate on hand-made curves, the status and history files, the terminal and
report views; then real tiny runs: one that overfits (the gate says so, `best` picks an
adapter that does no worse on the test split than the last one, TensorBoard and Trackio hold
both curves), and one that stops early, is killed with SIGKILL after a checkpoint and
resumes with the same best loss and patience count."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.resources import validate
from status_poller import StatusPoller

ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


def factory(*args, check_rc=None, env=None, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(root: Path, stem: str) -> dict:
    return json.loads((root / "metrics" / f"{stem}.json").read_text())


# --- the statistics, on hand-made curves ---------------------------------------------------


def curve(values, every=10, start=0):
    return [{"step": start + i * every, "eval_loss": v, "epoch": 0.0} for i, v in enumerate(values)]


def train_curve(values, every=5):
    return [{"step": (i + 1) * every, "loss": v, "learning_rate": 0.01, "epoch": 0.0} for i, v in enumerate(values)]


def judged(evals, train, select="best", stopped_early=False):
    from phases.finetune import _point, convergence, select_adapter, validation

    finite = [e for e in evals if e["step"] > 0]
    best_step = min(finite, key=lambda e: e["eval_loss"])["step"]
    best, last = _point(best_step, evals, train), _point(evals[-1]["step"], evals, train)
    selection = select_adapter(select, best, last)
    return selection, convergence(train, evals, selection), validation(evals, train, selection, stopped_early)


def test_fitted_change_is_a_trend_over_the_window_not_two_points():
    from phases.finetune import fitted_change

    # falling overall, with the last point up: two points would say "rising"
    points = [(10, 3.0), (20, 2.6), (30, 2.3), (40, 2.0), (50, 2.1)]
    assert fitted_change(points, 3.0) < -0.2
    # an exact line: slope times span over the reference
    assert fitted_change([(0, 4.0), (10, 3.0), (20, 2.0)], 4.0) == pytest.approx(-0.5)
    assert fitted_change([(5, 1.0)], 1.0) is None and fitted_change([(0, 1.0), (0, 2.0)], 1.0) is None


def test_an_overfitting_curve_fails_the_gate_and_best_is_selected(tmp_path):
    evals = curve([10.0, 4.0, 3.2, 3.0, 3.1, 3.4, 3.7, 4.0, 4.2])
    train = train_curve([9.0 * 0.8 ** i for i in range(16)])
    selection, conv, val = judged(evals, train)
    assert selection["adapter"] == "best" and selection["step"] == 30 and "step 30" in selection["reason"]
    assert selection["last"]["eval_loss"] == 4.2 and selection["best"]["train_loss"] == train[5]["loss"]
    assert conv["curve"] == "validation" and conv["loss_drop"] == pytest.approx(0.7)
    assert conv["last_window_change"] < 0  # falling into the selected adapter
    assert val["rising_while_training_falls"] and val["overfit_rise"] > 0.3 and val["above_best"] == 0.0
    assert val["trend_window"] == {"evaluations": 6, "from_step": 30, "to_step": 80}

    # the same curve through the real gate file
    result = check_training_gate(tmp_path, conv, val)
    failed = {c["metric"]: c for c in result["criteria"] if c["passed"] is False}
    assert set(failed) == {"training-stats.validation.overfit_rise"}
    assert "No overfitting" in failed["training-stats.validation.overfit_rise"]["description"]

    # select: last keeps the overfit adapter, and the gate says that too
    selection, conv, val = judged(evals, train, select="last")
    assert selection["adapter"] == "last" and val["above_best"] == pytest.approx(0.4)
    failed = {c["metric"] for c in check_training_gate(tmp_path, conv, val)["criteria"] if c["passed"] is False}
    assert failed == {"training-stats.convergence.last_window_change", "training-stats.validation.above_best",
                      "training-stats.validation.overfit_rise"}

    # early stopping ended the run on that rise: handled, not a failure
    _, conv, val = judged(evals, train, stopped_early=True)
    assert val["rising_while_training_falls"] and val["overfit_rise"] == 0.0
    assert check_training_gate(tmp_path, conv, val)["passed"]


def test_a_healthy_curve_passes_and_noise_after_the_best_is_not_overfitting(tmp_path):
    evals = curve([10.0, 5.0, 3.5, 3.0, 2.8, 2.7, 2.66, 2.65, 2.66, 2.655])
    train = train_curve([9.0 * 0.9 ** i for i in range(18)])
    selection, conv, val = judged(evals, train)
    assert selection["step"] == 70 and val["trend_window"]["evaluations"] == 3
    assert abs(val["eval_change"]) < 0.01 and val["overfit_rise"] < 0.02
    assert check_training_gate(tmp_path, conv, val)["passed"]
    # the validation loss rising while the training loss rises too is not overfitting (divergence
    # is the training curve's business)
    _, _, val = judged(curve([10.0, 4.0, 3.0, 3.5, 4.0]), train_curve([3.0, 3.2, 3.5, 3.9, 4.4, 5.0, 5.5, 6.0]))
    assert val["eval_change"] > 0 and not val["rising_while_training_falls"] and val["overfit_rise"] == 0.0


def test_without_a_validation_split_the_training_curve_is_judged(tmp_path):
    from phases.finetune import _point, convergence, select_adapter

    train = train_curve([5.0, 4.0, 3.0, 2.5, 2.2, 2.0, 1.9, 1.8, 1.75, 1.7, 1.72, 1.69])
    selection = select_adapter("best", None, _point(60, [], train))
    assert selection["adapter"] == "last" and "no validation split" in selection["reason"]
    conv = convergence(train, [], selection)
    assert conv["curve"] == "training" and conv["window"] == 2 and conv["loss_drop"] == pytest.approx(1 - 1.705 / 4.5)
    assert conv["last_window_change"] < 0.05
    result = check_training_gate(tmp_path, conv, None)
    assert result["passed"] and {c["metric"] for c in result["criteria"] if c["passed"] is None} == {
        "training-stats.validation.above_best", "training-stats.validation.overfit_rise"}


def check_training_gate(tmp_path, conv, val):
    from factory.config import parse_config
    from factory.gates import check_gate, load_gates
    from factory.workspace import Workspace

    ws = Workspace.at(tmp_path)
    ws.metrics_dir.mkdir(exist_ok=True)
    ws.metrics_file("training-stats").write_text(json.dumps(
        {"completed": True, "nonfinite_losses": 0, "convergence": conv, "validation": val}))
    gate = load_gates(ws, parse_config({}))["training-completed"]
    return check_gate(gate, ws, {"training-stats": "finetune"})


# --- files and views -----------------------------------------------------------------------


def test_status_and_history_carry_the_validation_loss(tmp_path):
    from factory.status import TrainingStatus, read_training_history
    from factory.workspace import Workspace

    ws = Workspace.at(tmp_path)
    status = TrainingStatus(ws, "run1", "finetune")
    status.update(step=0, total_steps=20, epoch=0.0, total_epochs=1.0)
    doc = json.loads(ws.training_status_file.read_text())
    validate(doc, "training-status")
    assert doc["eval_loss"] is None and doc["best_eval_loss"] is None  # null until the first evaluation
    status.update(step=0, eval_loss=9.0)
    for step in (10, 20):
        status.update(step=step, epoch=step / 20, loss=5.0 / step, learning_rate=0.01)
        status.update(step=step, eval_loss=4.0 - step / 10, best_eval_loss=4.0 - step / 10)
    status.finish("succeeded")
    validate(json.loads(ws.training_status_file.read_text()), "training-status")
    for line in ws.training_history_file.read_text().splitlines():
        validate(json.loads(line), "training-history")
    history = read_training_history(ws)
    assert [(p["step"], p.get("loss"), p.get("eval_loss")) for p in history] == [(0, None, 9.0), (10, 0.5, 3.0),
                                                                                (20, 0.25, 2.0)]
    with pytest.raises(Exception):  # a line with neither loss is not a history line
        validate({"step": 1, "epoch": 0.0, "run_id": "r", "at": "2026-12-03T00:00:00+00:00"}, "training-history")


def test_watch_view_shows_both_curves_on_one_scale():
    from rich.console import Console

    from factory.watch import SPARK_CHARS, training_view

    training = {"phase": "finetune", "status": "running", "running": True, "step": 40, "total_steps": 40, "epoch": 1.0,
                "total_epochs": 1.0, "loss": 0.5, "learning_rate": 0.01, "eta_seconds": 1.0, "error": None,
                "eval_loss": 3.5, "best_eval_loss": 2.5}
    history = ([{"step": s, "loss": 4.0 - s / 10, "learning_rate": 0.01} for s in range(5, 41, 5)]
               + [{"step": s, "eval_loss": v} for s, v in ((10, 3.0), (20, 2.5), (30, 3.0), (40, 3.5))])
    console = Console(width=140, record=True, color_system=None)
    console.print(training_view(training, sorted(history, key=lambda p: p["step"])))
    text = console.export_text()
    assert "val loss 3.5 (best 2.5)" in text
    val_line = next(line for line in text.splitlines() if line.startswith("val "))
    spark = val_line.split()[1]
    # one scale for both: the validation curve's lowest point is not drawn at the bottom
    assert len(spark) == 4 and spark[1] != SPARK_CHARS[0] and spark[1] == min(spark) and spark[3] == max(spark)
    assert "over 4 evaluations, lowest 2.5" in val_line


def test_report_draws_the_validation_curve_and_the_selection(tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from test_report import evaluation_metrics, training_stats, write_metrics

    from factory.report import _loss_png, write_report
    from factory.workspace import Workspace

    ws = Workspace.at(tmp_path)
    baseline, evaluation = evaluation_metrics()
    stats = training_stats()
    stats["eval_history"] = curve([6.0, 3.0, 2.5, 2.7, 3.2], every=50)
    point = lambda step, loss: {"step": step, "eval_loss": loss, "train_loss": 1.0, "train_loss_step": step}
    stats["selection"] = {"select": "best", "adapter": "best", "step": 100, "eval_loss": 2.5, "train_loss": 1.0,
                          "reason": "the adapter at step 100 has the lowest validation loss (2.5)",
                          "best": point(100, 2.5), "last": point(200, 3.2)}
    write_metrics(ws, baseline=baseline, evaluation=evaluation, training_stats=stats)
    write_report(ws)
    md = (tmp_path / "metrics" / "report.md").read_text()
    assert "![Training loss, validation loss and learning rate over steps](report/loss.png)" in md
    assert "Adapter: best (training.select: best): the adapter at step 100 has the lowest validation loss (2.5)." in md
    assert "| best | 100 | 1 | 2.5 |" in md and "| last | 200 | 1 | 3.2 |" in md
    # the validation curve is drawn: its colour (#047857) is in the figure, and not without it
    def green_pixels(png: bytes) -> int:
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        return int((rgb == (0x04, 0x78, 0x57)).all(axis=-1).sum())

    assert green_pixels((tmp_path / "metrics" / "report" / "loss.png").read_bytes()) > 100
    assert green_pixels(_loss_png(stats["loss_history"], [])) == 0


def test_config_keys_for_validation_and_trackers():
    from factory.config import parse_config
    from factory.errors import ConfigError

    t = parse_config({"training": {"report_to": ["tensorboard", "trackio"], "eval_steps": 25, "select": "last",
                                   "early_stopping_patience": 3}}).training
    assert t.trackers == ["tensorboard", "trackio"] and t.eval_steps == 25 and t.select == "last"
    assert parse_config({}).training.trackers == [] and parse_config({}).training.eval_steps == "auto"
    with pytest.raises(ConfigError) as e:
        parse_config({"training": {"report_to": ["none", "wandb"], "eval_steps": 0, "select": "first",
                                   "early_stopping_patience": 0, "report": "tensorboard"}})
    message = str(e.value)
    for expected in ("training.report_to: `none` cannot be combined", "training.eval_steps: must be at least 1",
                     "training.select: Input should be 'best' or 'last'", "training.early_stopping_patience",
                     "training.report: unknown key; did you mean training.report_to?"):
        assert expected in message, message


def test_accounts_trackers_are_not_imported_unless_asked():
    code = ("import sys; from factory import trackers, cli; from phases import finetune; "
            "print(sorted(m for m in ('wandb', 'mlflow', 'trackio', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True).stdout
    assert out.strip() == "[]"


# --- real tiny runs ------------------------------------------------------------------------

DATE_ORDERS = {"en-US": "month-day-year", "de-DE": "day-month-year", "ja-JP": "year-month-day"}


def date_order_records(n: int, seed: int = 0) -> list[dict]:
    """A small classification task a tiny model learns in a few dozen steps: the order in which
    a locale writes dates. Each request has its own date, which a model can memorise."""
    import random

    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < n:
        locale = rng.choice(sorted(DATE_ORDERS))
        request = f"Locale: {locale}. Date: {rng.randint(1990, 2035)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}."
        if request not in seen:
            seen.add(request)
            records.append({"instruction": "In which order does the locale write dates?", "input": request,
                            "output": DATE_ORDERS[locale]})
    return records


@pytest.fixture(scope="module")
def noisy_workspace(tmp_path_factory):
    """The date-order task with a deliberately tiny train split (48 records) whose answers are
    40% wrong, and clean val (60) and test (132) splits. The rule is learnt first (validation
    loss falls), then the wrong answers are memorised (it rises while the training loss keeps
    falling): overfitting that costs test accuracy. Baseline scored, so evaluate can run."""
    import random

    from factory.example import build_tiny_gemma3, record_texts

    root = tmp_path_factory.mktemp("validation") / "base"
    factory("init", root, check_rc=0)
    records = date_order_records(240)
    raw = root / "data" / "raw" / "date_order.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    build_tiny_gemma3(root / "models" / "base", corpus=record_texts(records), seed=0)
    (root / "factory.yaml").write_text(
        "data: {inputs: [data/raw/date_order.jsonl], split: {train: 0.2, val: 0.25, test: 0.55, seed: 3407}}\n"
        "model: {name: models/base, max_seq_length: 128, load_in_4bit: false}\n"
        "lora: {r: 16, lora_alpha: 32, use_gradient_checkpointing: false}\n"
        "training:\n  per_device_train_batch_size: 16\n  gradient_accumulation_steps: 1\n  warmup_steps: 5\n"
        "  max_steps: 80\n  learning_rate: 0.01\n  weight_decay: 0.0\n  optim: adamw_torch\n  logging_steps: 5\n"
        "  eval_steps: 5\n"
        "evaluation: {metrics: [exact_match], primary: exact_match, max_new_tokens: 8, batch_size: 64}\n")
    factory("run", "baseline", "-C", root, check_rc=0)
    train = root / "data" / "splits" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rng = random.Random(1)
    for i, row in enumerate(rows):
        if i % 5 < 2:
            answer = row["conversations"][-1]
            answer["content"] = rng.choice([o for o in DATE_ORDERS.values() if o != answer["content"]])
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(rows) == 48 and metrics(root, "split")["counts"]["val"] == 60
    return root


def workspace_from(base: Path, tmp_path: Path, extra_training: str = "") -> Path:
    root = tmp_path / "ws"
    shutil.copytree(base, root)
    config = (root / "factory.yaml").read_text().replace("  eval_steps: 5\n", f"  eval_steps: 5\n{extra_training}")
    (root / "factory.yaml").write_text(config)
    return root


@pytest.fixture(scope="module")
def overfit_run(noisy_workspace, tmp_path_factory):
    """The noisy workspace trained for 80 steps, with TensorBoard and Trackio (offline), a
    poller on the live status file; also the early-stopping test's uninterrupted reference."""
    tmp_path = tmp_path_factory.mktemp("overfit")
    root = workspace_from(noisy_workspace, tmp_path, "  report_to: [tensorboard, trackio]\n")
    env = {**ENV, "TRACKIO_DIR": str(tmp_path / "trackio")}
    with StatusPoller(root) as poller:
        # --only: the split phase would rewrite the noisy train split
        proc = factory("run", "--only", "finetune", "-C", root, env=env)
    return root, env, proc, poller


@pytest.mark.slow
def test_a_run_that_overfits_fails_the_gate_and_best_beats_last_on_test(overfit_run):
    root, env, proc, poller = overfit_run
    tmp_path = root.parent
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "gate training-completed failed after finetune on: training-stats.validation.overfit_rise" in out
    assert "No overfitting" in out  # the gate table says why
    # the terminal has the factory's lines, not the trainer's log dicts or the libraries' chatter
    assert "{'loss'" not in out and "'eval_loss'" not in out and "Tokenizing" not in out and "Trackio" not in out
    log_lines = [json.loads(line) for line in (root / "logs" / "training.log").read_text().splitlines()]
    assert any("eval_loss" in entry for entry in log_lines) and any("grad_norm" in entry for entry in log_lines)
    assert any("Trackio" in entry.get("output", "") for entry in log_lines)  # its banner went here instead

    # the live status validated at every read, and carried the validation loss
    assert poller.problems == [] and len(poller.training()) > 5
    running = [r for r in poller.training() if r["status"] == "running"]
    assert running[0]["best_eval_loss"] is None and any(r["eval_loss"] is not None for r in running)
    final = poller.training()[-1]
    stats = metrics(root, "training-stats")
    evals = stats["eval_history"]
    assert final["eval_loss"] == evals[-1]["eval_loss"] and final["best_eval_loss"] == stats["validation"]["best_loss"]

    # the validation loss fell, then rose while the training loss kept falling
    assert evals[0]["step"] == 0 and stats["steps"] == 80 and stats["stop_reason"] == "max_steps"
    assert [e["step"] for e in evals] == list(range(0, 81, 5))  # before the first step and every 5 (checkpoints too)
    best = min(evals[1:], key=lambda e: e["eval_loss"])
    assert best["step"] < 80 and evals[-1]["eval_loss"] > best["eval_loss"] * 1.2
    assert stats["loss_history"][-1]["loss"] < stats["selection"]["best"]["train_loss"] / 2
    validation = stats["validation"]
    assert validation["rising_while_training_falls"] and validation["overfit_rise"] > 0.02

    # best is selected, saved where the metrics say, and it is the adapter in save.lora_path
    selection = stats["selection"]
    assert selection["adapter"] == "best" and selection["step"] == best["step"]
    assert selection["eval_loss"] == best["eval_loss"] and selection["last"]["step"] == 80
    checkpoints = root / "models" / "checkpoints"
    state = lambda name: json.loads((checkpoints / name / "training_state.json").read_text())
    assert state("best")["step"] == best["step"] and state("last")["step"] == 80 and state("lora")["step"] == best["step"]
    weights = lambda name: (checkpoints / name / "adapter_model.safetensors").read_bytes()
    assert weights("lora") == weights("best") != weights("last")
    gate = json.loads((root / "metrics" / "gates" / "training-completed.json").read_text())
    assert [c["metric"] for c in gate["criteria"] if c["passed"] is False] == ["training-stats.validation.overfit_rise"]

    # trackers, offline: TensorBoard's event files and Trackio's local store hold both series,
    # and the factory's gate result was logged to the same run at the end
    assert "results logged to tensorboard, trackio" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(root / stats["trackers"]["tensorboard_dir"]))
    board.Reload()
    scalars = board.Tags()["scalars"]
    assert {"train/loss", "eval/loss", "factory/gate/training-completed"} <= set(scalars), scalars
    assert [e.step for e in board.Scalars("eval/loss")] == [e["step"] for e in evals]
    assert [e.value for e in board.Scalars("eval/loss")] == pytest.approx([e["eval_loss"] for e in evals])
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx([h["loss"] for h in stats["loss_history"]])
    assert board.Scalars("factory/gate/training-completed")[-1].value == 0.0
    assert stats["trackers"]["run_name"].startswith("ws-") and stats["trackers"]["project"] == "ws"
    trackio_rows = trackio_metrics(tmp_path / "trackio", stats["trackers"]["project"], stats["trackers"]["run_name"])
    assert [row["eval/loss"] for row in trackio_rows if "eval/loss" in row] == pytest.approx([e["eval_loss"] for e in evals])
    assert [row["train/loss"] for row in trackio_rows if "train/loss" in row] == pytest.approx(
        [h["loss"] for h in stats["loss_history"]])
    assert any(row.get("factory/gate/training-completed") == 0.0 for row in trackio_rows)

    # independently of the selection: the evaluate phase on the clean test split, best vs last
    scores = {}
    for name in ("lora", "last"):
        if name == "last":
            (root / "factory.yaml").write_text((root / "factory.yaml").read_text()
                                               + "save: {lora_path: models/checkpoints/last}\n")
        factory("run", "--only", "evaluate", "-C", root, env=env)  # its gate fails (training-completed did)
        evaluation = metrics(root, "evaluation")
        assert evaluation["adapter"] == f"models/checkpoints/{name}" and evaluation["num_examples"] == 132
        scores[name] = evaluation
    assert scores["lora"]["scores"]["exact_match"] >= scores["last"]["scores"]["exact_match"], scores
    assert scores["lora"]["loss"] < scores["last"]["loss"]  # the test loss agrees with the validation loss


def trackio_metrics(store: Path, project: str, run: str) -> list[dict]:
    """The metric rows of one run, read from Trackio's SQLite store without trackio's code."""
    import sqlite3

    databases = list(store.glob(f"{project}.db"))
    assert databases, sorted(str(p) for p in store.rglob("*"))
    with sqlite3.connect(databases[0]) as db:
        runs = [name for (name,) in db.execute("SELECT DISTINCT run_name FROM metrics")]
        assert runs == [run], runs
        return [json.loads(metrics) for (metrics,) in db.execute(
            "SELECT metrics FROM metrics WHERE run_name = ? ORDER BY step, timestamp", (run,))]


def early_stopping(evals: list[dict], patience: int) -> tuple[int, int] | None:
    """Where transformers' rule stops a curve: (best step, stop step), or None if it does not.
    The evaluation before the first step is the curve's start, not a candidate."""
    best, count = None, 0
    for e in evals:
        if e["step"] == 0:
            continue
        if best is None or e["eval_loss"] < best[1]:
            best, count = (e["step"], e["eval_loss"]), 0
        else:
            count += 1
            if count == patience:
                return best[0], e["step"]
    return None


@pytest.mark.slow
def test_early_stopping_survives_kill_9_with_its_best_loss_and_patience(noisy_workspace, overfit_run, tmp_path):
    # The overfitting run's settings with early stopping: up to the stop, the same training. Its
    # curve says where the stop comes; the run is killed at the last checkpoint between its best
    # evaluation and the stop, so a lost best or count would move the stop.
    patience = 5
    reference = metrics(overfit_run[0], "training-stats")
    stop = early_stopping(reference["eval_history"], patience)
    assert stop, "the reference curve does not trigger early stopping"
    best_step, stop_step = stop
    save_every = reference["total_steps"] // 4
    kill_at = max(step for step in range(save_every, stop_step, save_every) if step > best_step)
    root = workspace_from(noisy_workspace, tmp_path, f"  early_stopping_patience: {patience}\n")
    marker = root / "outputs" / f"checkpoint-{kill_at}" / "training_state.json"

    with StatusPoller(root) as poller:
        proc = subprocess.Popen([sys.executable, "-m", "factory", "run", "--only", "finetune", "-C", str(root)],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert marker.exists() and not (root / "metrics" / "training-stats.json").exists(), \
            f"the run ended before it could be killed at its checkpoint-{kill_at}"

        # what the checkpoint holds: the trainer's best loss and step, and early stopping's count
        checkpoint = marker.parent
        trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
        counter = trainer_state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"]
        assert trainer_state["best_global_step"] == best_step
        assert counter == sum(1 for e in reference["eval_history"] if best_step < e["step"] <= kill_at) > 0
        best_copy = (checkpoint / "best_adapter.safetensors").read_bytes()
        # nothing in it the Trainer could take for a second adapter (it would not load the trained one)
        assert not list(checkpoint.glob("*/adapter_model.safetensors"))
        # the best adapter as of the kill is restored from the checkpoint when it is gone
        shutil.rmtree(root / "models" / "checkpoints" / "best")

        resumed = factory("run", "--only", "finetune", "-C", root)  # stopped early at its best: the gate passes
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    stats = metrics(root, "training-stats")
    evals = stats["eval_history"]
    assert stats["resumed_from_step"] == kill_at and stats["stop_reason"] == "early_stopping" and stats["completed"]
    # the same stop, best and curve as the uninterrupted run: without the restored count it would
    # stop `patience` evaluations after the resume; without the best loss, later still
    assert stats["steps"] == stop_step < reference["total_steps"] and stats["selection"]["best"]["step"] == best_step
    expected = [e for e in reference["eval_history"] if e["step"] <= stop_step]
    assert [e["step"] for e in evals] == [e["step"] for e in expected]
    assert [e["eval_loss"] for e in evals] == pytest.approx([e["eval_loss"] for e in expected], rel=1e-3)
    assert stats["validation"]["stopped_early"] and stats["validation"]["overfit_rise"] == 0.0
    checkpoints = root / "models" / "checkpoints"
    assert json.loads((checkpoints / "lora" / "training_state.json").read_text())["step"] == best_step
    assert (checkpoints / "lora" / "adapter_model.safetensors").read_bytes() == \
           (checkpoints / "best" / "adapter_model.safetensors").read_bytes() == best_copy
    assert poller.problems == []
    training = poller.training()
    resumed_reads = [r for r in training if r["run_id"] == training[-1]["run_id"] and r["step"] >= kill_at]
    assert resumed_reads[0]["best_eval_loss"] == trainer_state["best_metric"]  # known from the resumed step on
