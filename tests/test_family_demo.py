"""A family other than Gemma through the whole demo-sized pipeline, every gate passed honestly:
Qwen 3 (its architecture, tied embeddings, ChatML template with think blocks and special
tokens) with a vocabulary trained on the task, as the Gemma example's is."""

import json
import os
import subprocess
import sys

import pytest

from factory import example

pytestmark = pytest.mark.slow
ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
GATES = ("data-valid", "splits-ready", "baseline-established", "training-completed", "model-performance",
         "quantization-verified")


def test_a_demo_sized_qwen3_passes_every_gate_honestly(tmp_path):
    root = tmp_path / "ws"
    subprocess.run([sys.executable, "-m", "factory", "init", "--example", str(root), "--family", "qwen-3", "--vocab",
                    "task"], env=ENV, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "factory", "run", "-C", str(root)], env=ENV, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for gate in GATES:
        assert f"gate {gate}: passed" in proc.stderr, gate

    # the model is the family's: read from its files, not through the pipeline
    base = root / "models" / "base"
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"] and config["num_hidden_layers"] == 6
    spec = json.loads((base / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(special) and config["vocab_size"] < 500
    template = json.loads((base / "tokenizer_config.json").read_text())["chat_template"]
    assert template == example.read_named_template("qwen-3")

    # learned, and scored right: exact match recounted from the answers, each reference checked
    # against the task's own rule, no test prompt in the training data
    baseline = json.loads((root / "metrics" / "baseline.json").read_text())
    evaluation = json.loads((root / "metrics" / "evaluation.json").read_text())
    examples = evaluation["examples"]
    assert len(examples) == evaluation["num_examples"] >= 200
    for e in examples:
        locale, date, amount, currency = example.REQUEST.search(e["prompt"]).groups()
        assert e["reference"] == example.localize(locale, date, amount, currency)
    recounted = sum(e["prediction"] == e["reference"] for e in examples) / len(examples)
    assert recounted == pytest.approx(evaluation["scores"]["exact_match"]) and recounted >= 0.3, examples[:3]
    assert baseline["scores"]["exact_match"] <= 0.05
    assert evaluation["comparison"]["p_value"] < 0.05 and evaluation["stopping"]["rate"] >= 0.9
    train = (root / "data" / "splits" / "train.jsonl").read_text()
    assert all(json.dumps(e["prompt"])[1:-1] not in train for e in examples)

    # the GGUF, read with gguf's own reader: Qwen 3, the turn end as its EOS and a control token
    from gguf import GGUFReader

    reader = GGUFReader(root / "models" / "quantized" / "model-Q8_0.gguf")

    def value(key):
        field = reader.fields[key]
        return field.parts[field.data[0]]

    assert bytes(value("general.architecture")).decode() == "qwen3"
    assert int(value("tokenizer.ggml.eos_token_id")[0]) == special["<|im_end|>"]
    assert int(reader.fields["tokenizer.ggml.token_type"].parts[reader.fields["tokenizer.ggml.token_type"].data[
        special["<|im_end|>"]]][0]) == 3  # llama.cpp's CONTROL
    # no dummy prefix in the tokenizer.model: none in the GGUF (the converter writes none for Qwen)
    assert bool(value("tokenizer.ggml.add_space_prefix")[0]) is False
    assert 'PARAMETER stop "<|im_end|>"' in (root / "models" / "quantized" / "Modelfile").read_text()
