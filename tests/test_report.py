"""metrics/report.md and report.html: from hand-written metrics through `factory report`, and
written by the runner after the gates of split, evaluate (passed or not) and quantize."""

import base64
import io
import json
import os
import subprocess
import sys

import orjson
import pytest
from PIL import Image

from factory.config import parse_config
from factory.errors import GateFailed
from factory.phase import Phase
from factory.runner import run_pipeline
from factory.workspace import Workspace

XSS = "<script>alert(1)</script> | a pipe\nand a newline"
QUANTIZATION = {
    "version": 1, "merge": {"path": "models/merged"}, "gguf_files": 2, "worst_relative_score_drop": 0.031,
    "all_sizes_within_bounds": True,
    "types": [
        {"type": "Q8_0", "path": "models/quantized/model-Q8_0.gguf", "size_bytes": 3 * 2**20, "bits_per_weight": 8.5,
         "score": 0.97, "relative_score_drop": 0.0, "perplexity_ratio": 1.001, "mean_kl": 0.0004,
         "tokenizer_agreement": 1.0, "generation_stops": True},
        {"type": "Q4_K_M", "path": "models/quantized/model-Q4_K_M.gguf", "size_bytes": 2 * 2**20, "bits_per_weight": 4.9,
         "score": 0.94, "relative_score_drop": 0.031, "generation_stops": True, "new_measure": 7,
         "scores": {"exact_match": 0.94, "chrf": 0.99}, "examples": [{"index": 0, "prediction": "p"}] * 30},
    ],
}


def factory(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def evaluation_metrics(n=40, right=34):
    base = [{"index": i, "prompt": XSS if i == 0 else f"prompt {i}", "reference": f"ref {i}", "prediction": "x",
             "scores": {"exact_match": 0.0}} for i in range(n)]
    tuned = [{**e, "prediction": e["reference"] if i < right else "y",
              "scores": {"exact_match": 1.0 if i < right else 0.0}} for i, e in enumerate(base)]
    flipped = [{"index": i, "prompt": base[i]["prompt"], "reference": base[i]["reference"], "baseline": "x",
                "finetuned": base[i]["reference"], "baseline_score": 0.0, "finetuned_score": 1.0} for i in range(right)]
    baseline = {"num_examples": n, "scores": {"exact_match": 0.0}, "primary": "exact_match", "examples": base}
    evaluation = {
        "model": "models/base", "adapter": "models/checkpoints/lora", "num_examples": n,
        "test_split": {"file": "data/splits/test.jsonl", "xxh3_128": "0" * 32}, "primary": "exact_match",
        "scores": {"exact_match": right / n},
        "comparison": {"metric": "exact_match", "n": n, "baseline": 0.0, "finetuned": right / n,
                       "improvement": right / n, "relative_improvement": None, "test": "mcnemar_exact",
                       "test_name": "McNemar's exact test", "p_value": 1.5e-18, "wilcoxon_p_value": 2.0e-9, "ci95": [0.72, 0.95], "significant": True},
        "per_metric": {"exact_match": {"baseline": 0.0, "finetuned": right / n, "improvement": right / n}},
        "flipped": {"improved": right, "regressed": 0, "examples": {"improved": flipped[:20], "regressed": []}},
        "examples": tuned,
    }
    return baseline, evaluation


def training_stats(steps=200):
    history = [{"step": s, "loss": 5.0 / (1 + s / 20), "learning_rate": 0.01 * (1 - s / steps), "epoch": s / steps}
               for s in range(10, steps + 1, 10)]
    return {"completed": True, "steps": steps, "total_steps": steps, "final_loss": history[-1]["loss"],
            "loss_history": history, "convergence": {"loss_drop": 0.8}, "tokens_per_second": 900.0,
            "train_seconds": 20.0, "backend": "hf"}


def write_metrics(ws: Workspace, **files):
    for stem, doc in files.items():
        path = ws.metrics_file(stem.replace("_", "-"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"schema_version": 1, "run_id": "r1", **doc}))


def passed_gate(ws: Workspace, name: str, after: str):
    path = ws.gate_results_dir / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": 1, "gate": name, "after": after, "passed": True,
                                "checked_at": "2026-01-01T00:00:00+00:00", "source": f"gates/{name}.yaml", "run_id": "r1",
                                "criteria": [{"metric": "training-stats.completed", "op": "==", "value": True,
                                              "observed": True, "required": True, "passed": True}]}))


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data)).size


def test_factory_report_renders_every_section_from_the_metrics(tmp_path):
    ws = Workspace.at(tmp_path)
    baseline, evaluation = evaluation_metrics()
    write_metrics(ws, baseline=baseline, evaluation=evaluation, training_stats=training_stats(), quantization=QUANTIZATION)
    passed_gate(ws, "training-completed", "finetune")

    proc = factory("report", "-C", tmp_path, check_rc=0)
    assert "wrote metrics/report.md" in proc.stdout and "wrote metrics/report.html" in proc.stdout

    loss_png, scores_png = (tmp_path / "metrics" / "report" / "loss.png").read_bytes(), (tmp_path / "metrics" / "report" / "scores.png").read_bytes()
    assert png_size(loss_png) == png_size(scores_png) == (800, 360)

    md = (tmp_path / "metrics" / "report.md").read_text()
    for heading in ("# Fine-tuning report", "## Training", "## Scores: baseline vs fine-tuned", "## Statistics", "## Gates",
                    "## Examples that flipped", "## Quantization"):
        assert f"\n{heading}\n" in f"\n{md}", heading
    assert "![Training loss and learning rate over steps](report/loss.png)" in md and "(report/scores.png)" in md
    assert "| exact_match (primary) | 0 | 0.85 | 0.85 |" in md
    assert "| McNemar's exact test p | 1.5e-18 |" in md and "| bootstrap 95% interval | [0.72, 0.95] |" in md
    assert "| training-completed | finetune | training-stats.completed | yes | == | yes | pass |" in md
    assert "34 improved, 0 regressed" in md
    # example text is data: escaped, and unable to break the table
    assert "&lt;script>alert(1)&lt;/script> \\| a pipe<br>and a newline" in md and "<script" not in md
    # the quantization table from whatever keys are present, unknown ones last
    assert "| type | size bytes | bits per weight | score | relative score drop | perplexity ratio | mean kl | " \
           "tokenizer agreement | generation stops | path | examples | new measure | scores |" in md
    assert "| Q8_0 | 3.0 MiB | 8.5 | 0.97 | 0 | 1.001 | 0.0004 | 1 | yes | models/quantized/model-Q8_0.gguf | — | — | — |" in md
    assert "| Q4_K_M | 2.0 MiB | 4.9 | 0.94 | 0.031 | — | — | — | yes | models/quantized/model-Q4_K_M.gguf | 30 entries | 7 | " \
           "exact_match 0.94, chrf 0.99 |" in md

    page = (tmp_path / "metrics" / "report.html").read_text()
    images = [base64.b64decode(m) for m in __import__("re").findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert [png_size(i) for i in images] == [(800, 360), (800, 360)]  # self-contained
    assert "&lt;script&gt;" in page and "<script" not in page
    assert "<td>Q4_K_M</td>" in page and "<h2>Quantization</h2>" in page


def test_report_before_quantize_says_so_and_without_evaluation_is_a_usage_error(tmp_path):
    factory("init", tmp_path, check_rc=0)
    proc = factory("report", "-C", tmp_path, check_rc=2)
    assert "nothing to report yet: neither metrics/split.json nor metrics/evaluation.json exists" in proc.stderr

    ws = Workspace.at(tmp_path)
    baseline, evaluation = evaluation_metrics()
    write_metrics(ws, baseline=baseline, evaluation=evaluation)
    factory("report", "-C", tmp_path, check_rc=0)
    md = (tmp_path / "metrics" / "report.md").read_text()
    assert "Not quantized yet" in md and "No training statistics" in md and not (tmp_path / "metrics" / "report" / "loss.png").exists()


def test_a_failed_splits_ready_writes_a_data_report_with_the_leaking_pairs(tmp_path):
    """`factory run split` (the CLI, format then split) leaks on purpose; the gate fails, and
    the runner writes the report from the data's metrics alone: the equations, the gate's
    failed row, and the pairs the check found, as split:line text of the files written."""
    factory("init", tmp_path, check_rc=0)
    config = tmp_path / "factory.yaml"
    config.write_text(config.read_text().replace("group_by_prompt: true", "group_by_prompt: false", 1))
    questions = [f"How do I reverse list number {i} in Python?" for i in range(60)]
    messages = [[("user", q), ("assistant", f"Use reversed() on list {i}.")] for i, q in enumerate(questions)]
    messages += [[("user", f"Hello, I have a coding problem {i}"), ("assistant", f"Sure {i}."),
                  ("user", questions[i]), ("assistant", f"Call reverse() {i}.")] for i in range(60)]
    messages += [[("user", f"question number {i}: what is {i} plus {i}?"), ("assistant", f"It is {2 * i}.")]
                 for i in range(100)]
    (tmp_path / "data" / "raw" / "chats.jsonl").write_bytes(b"".join(
        orjson.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + b"\n" for turns in messages))

    proc = factory("run", "split", "-C", tmp_path, check_rc=1)
    assert "gate splits-ready failed after split" in proc.stderr
    assert "report: metrics/report.md, metrics/report.html" in proc.stderr + proc.stdout
    md = (tmp_path / "metrics" / "report.md").read_text()
    m = orjson.loads((tmp_path / "metrics" / "split.json").read_bytes())
    assert m["leakage"]["user_turns"] > 0
    assert md.startswith("# Data report") and "## Data" in md and "## Training" not in md
    assert m["accounting"]["equation"] in md
    assert f"| splits-ready | split | split.leakage.total | {m['leakage']['total']} | == | 0 | FAIL |" in md
    # each example pair is the text at that line of that split file, as written
    example = m["leakage"]["examples"][0]["pair"][0]
    assert f"{example['split']}:{example['line']} {example['text']}" in md
    line = (tmp_path / "data" / "splits" / f"{example['split']}.jsonl").read_bytes().splitlines()[example["line"] - 1]
    assert example["text"] in [t["content"] for t in orjson.loads(line)["conversations"] if t["role"] == "user"]
    assert "<h1>Data report</h1>" in (tmp_path / "metrics" / "report.html").read_text()
    factory("report", "-C", tmp_path, check_rc=0)  # and on demand


def _phase(name, stem, doc):
    return Phase(name, f"hand-written {stem}", stem, lambda ctx: doc)


def test_runner_writes_the_report_after_evaluate_even_when_its_gate_fails_and_again_after_quantize(tmp_path):
    ws = Workspace.at(tmp_path)
    baseline, evaluation = evaluation_metrics()
    write_metrics(ws, baseline=baseline, training_stats=training_stats())
    passed_gate(ws, "training-completed", "finetune")
    losing = {**evaluation, "comparison": {**evaluation["comparison"], "finetuned": 0.05, "p_value": 0.4}}
    pipeline = (_phase("evaluate", "evaluation", losing), _phase("quantize", "quantization", QUANTIZATION))

    with pytest.raises(GateFailed):
        run_pipeline(parse_config({}), ws, pipeline)
    md = (tmp_path / "metrics" / "report.md").read_text()
    assert "| model-performance | evaluate | evaluation.comparison.finetuned | 0.05 | >= | 0.1 (evaluation.comparison.baseline + 0.10) | FAIL |" in md
    assert "Not quantized yet" in md

    # the quantize gate's own criteria are the quantize phase's business; here one criterion will do
    (tmp_path / "gates").mkdir()
    (tmp_path / "gates" / "quantization-verified.yaml").write_text(
        "name: quantization-verified\nafter: quantize\ncriteria:\n"
        "  - {metric: quantization.gguf_files, op: '>=', value: 1}\n")
    pipeline = (_phase("evaluate", "evaluation", evaluation), _phase("quantize", "quantization", QUANTIZATION))
    run_pipeline(parse_config({}), ws, pipeline, force=True)
    md = (tmp_path / "metrics" / "report.md").read_text()
    assert "| model-performance | evaluate | evaluation.comparison.finetuned | 0.85 |" in md and "FAIL" not in md
    assert "| Q4_K_M | 2.0 MiB |" in md and "| quantization-verified | quantize |" in md
    assert md.index("| training-completed |") < md.index("| model-performance |") < md.index("| quantization-verified |")
