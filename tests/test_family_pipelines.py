"""Data and models beyond the example's chat task, through every phase.

Plain text (the `text` input format) on a base model without a chat template: language
modelling on the text itself, scored by loss and perplexity, exported to GGUF and checked.
(The per-family small pipeline runs are not here yet: they had not run to the end on this
machine when this was written; tests/test_families.py checks every family's model, and
tests/test_models.py the chat format's masks against TRL's.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
# One thread: on 2 cores shared with other work, two OpenMP threads train far slower.
ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

PHASES = ("baseline", "finetune", "evaluate", "quantize")
METRICS = {"baseline": "baseline", "finetune": "training-stats", "evaluate": "evaluation", "quantize": "quantization"}


def factory(*args, check_rc=None, timeout=1500):
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode in ((check_rc,) if isinstance(check_rc, int) else check_rc), \
            proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(ws: Path, stem: str) -> dict:
    return json.loads((ws / "metrics" / f"{stem}.json").read_text())


def small_run(root: Path) -> None:
    """Batches of 4 and one GGUF type: a full vocabulary (up to Qwen's 151,936) makes every
    token's logits cost, and these runs check that each phase works, not how well."""
    config = root / "factory.yaml"
    text = config.read_text().replace("per_device_train_batch_size: 16", "per_device_train_batch_size: 4")
    config.write_text(text.replace("gguf_quantization: [Q8_0, Q4_K_M]", "gguf_quantization: [Q8_0]"))


def run_every_phase(root: Path) -> None:
    """format and split (their gates must pass), then each model phase on its own: a failed
    gate (exit 1) on a small run does not stop the next phase from being tried."""
    factory("run", "split", "-C", root, check_rc=0)
    for phase in PHASES:
        factory("run", "--only", phase, "-C", root, check_rc=(0, 1))
        assert (root / "metrics" / f"{METRICS[phase]}.json").exists(), phase


def test_plain_text_trains_as_language_modelling_on_a_base_model_without_chat_template(tmp_path):
    """The `text` input format (seed 000's plain corpus) on a base model with no chat template:
    language modelling on the text itself, scored by loss and perplexity, exported to GGUF."""
    import random

    from factory.example import generate_task_records

    root = tmp_path / "text"
    factory("init", "--example", root, "--records", 300, "--steps", 120, check_rc=0)
    small_run(root)
    raw = root / "data" / "raw"
    for f in raw.iterdir():
        f.unlink()
    rng = random.Random(0)
    for i, r in enumerate(generate_task_records(400, seed=1)):
        (raw / f"doc{i:04d}.txt").write_text(f"{r['input']} -> {r['output']}\n" * rng.randint(1, 3))
    yaml_file = root / "factory.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("data/raw/localization.jsonl", "data/raw"))
    base = root / "models" / "base"
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    run_every_phase(root)
    baseline, stats, evaluation, quantization = (metrics(root, METRICS[p]) for p in PHASES)
    assert stats["completed"] and stats["chat_format"]["template"] == "none"
    assert baseline["language_modelling"] and evaluation["language_modelling"]
    assert evaluation["primary"] == "token_probability" and evaluation["perplexity"] < baseline["perplexity"]
    assert evaluation["comparison"]["finetuned"] > evaluation["comparison"]["baseline"]
    assert "all_generations_stop" not in quantization
    assert all(g["tokenizer_agreement"] == 1.0 and g["perplexity_ratio"] < 1.1 for g in quantization["types"])
    assert "TEMPLATE" not in (root / "models" / "quantized" / "Modelfile").read_text()
