"""Every model family through every phase, with its real tokenizer and chat template.

Each family's example (`factory init --example --family F`: a tiny model of the family's real
architecture and vocabulary, random weights) runs format -> split -> baseline -> finetune ->
evaluate -> quantize at a small size. The gates need not pass on these small runs; every
phase must run and every artifact be right, checked here against what the family's real
chat format is known to be (not against what the factory derived):
masks token by token, generation that stops at end of turn, the GGUF's tokenizer and
embedded template, the Modelfile's stop token. A Llama-architecture model with a chat
template of its own (none of the factory's) and no pad token goes through the whole
pipeline too, and one family other than Gemma runs the demo-sized pipeline with its gates
passing honestly.
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

# The end-of-turn token of each family's real instruct model (model cards / tokenizer configs).
END_OF_TURN = {
    "gemma-3": "<end_of_turn>",
    "llama-3.1": "<|eot_id|>",
    "qwen-2.5": "<|im_end|>",
    "mistral": "</s>",
    "phi-3": "<|end|>",
}
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


def run_every_phase(root: Path) -> None:
    """format and split (their gates must pass), then each model phase on its own: a failed
    gate (exit 1) on a small run does not stop the next phase from being tried."""
    factory("run", "split", "-C", root, check_rc=0)
    for phase in PHASES:
        factory("run", "--only", phase, "-C", root, check_rc=(0, 1))
        assert (root / "metrics" / f"{METRICS[phase]}.json").exists(), phase


def check_masks(root: Path, eot: str) -> None:
    """Prompt tokens -100, every answer trained, each followed by the end-of-turn token."""
    from transformers import AutoTokenizer

    from factory.chat import ChatFormat

    tokenizer = AutoTokenizer.from_pretrained(root / "models" / "base")
    chat = ChatFormat.from_tokenizer(tokenizer)
    assert chat.eot_token == eot
    answers = ["07.03.2024 | 1.234,50 €", "Sure: 2024/03/07"]
    record = {"conversations": [
        {"role": "user", "content": "Locale: de-DE. Date: 2024-03-07. Amount: 1234.50 EUR."},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "And for ja-JP?"},
        {"role": "assistant", "content": answers[1]},
    ]}
    example = chat.training_example(record)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert len(spans) == 2, [tokenizer.decode(s) for s in spans]
    for span, answer in zip(spans, answers):
        text = tokenizer.decode(span)
        assert text.startswith(answer) and text[len(answer):].strip() == eot, text
    untrained = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
    assert "de-DE" in untrained and "ja-JP" in untrained and answers[0] not in untrained
    assert ids.count(tokenizer.bos_token_id) <= 1 if tokenizer.bos_token_id is not None else True
    assert chat.pad_token_id not in ids


def check_artifacts(root: Path, eot: str) -> None:
    baseline, evaluation, stats, quantization = (metrics(root, METRICS[p]) for p in PHASES)
    assert stats["completed"] and stats["chat_format"]["end_of_turn"] == eot
    for scored in (baseline, evaluation):
        assert scored["stopping"]["end_of_turn"] == eot and scored["stopping"]["rate"] is not None
    # generation stops at end of turn once trained (the base model, untrained, rarely does)
    assert evaluation["stopping"]["rate"] >= 0.9, evaluation["stopping"]
    (gguf,) = quantization["types"]
    assert gguf["tokenizer_agreement"] == 1.0
    assert gguf["chat_template_embedded"]
    assert gguf["generation_stops"] == 1.0  # llama.cpp's chat completion with the embedded template
    modelfile = (root / "models" / "quantized" / "Modelfile").read_text()
    assert f'PARAMETER stop "{eot}"' in modelfile and "TEMPLATE" in modelfile


@pytest.mark.parametrize("family", list(END_OF_TURN))
def test_family_runs_every_phase(tmp_path, family):
    root = tmp_path / family
    factory("init", "--example", root, "--family", family, "--records", 600, "--steps", 150, check_rc=0)
    check_masks(root, END_OF_TURN[family])
    run_every_phase(root)
    check_artifacts(root, END_OF_TURN[family])


def test_a_model_with_a_template_of_its_own_and_no_pad_token_runs_every_phase(tmp_path):
    """A Llama-architecture folder with a SentencePiece tokenizer, an Alpaca-style chat template
    that is none of the factory's, and no pad token: what a user brings from the hub."""
    import shutil

    from transformers import AutoTokenizer

    from factory.example import build_custom_template_model

    root = tmp_path / "custom"
    factory("init", "--example", root, "--records", 600, "--steps", 150, check_rc=0)
    shutil.rmtree(root / "models" / "base")
    build_custom_template_model(root / "models" / "base")
    base = AutoTokenizer.from_pretrained(root / "models" / "base")
    assert base.pad_token is None and base.chat_template
    assert not any(base.chat_template == p.read_text() for p in (Path(__file__).parents[1] / "factory" / "templates").glob("*.jinja"))
    run_every_phase(root)
    stats, quantization = metrics(root, "training-stats"), metrics(root, "quantization")
    assert stats["completed"] and stats["chat_format"]["template"].startswith("auto")
    assert stats["chat_format"]["pad_token"] not in (None, base.eos_token)
    (gguf,) = quantization["types"]
    assert gguf["tokenizer_agreement"] == 1.0 and gguf["chat_template_embedded"]
    assert "TEMPLATE" in (root / "models" / "quantized" / "Modelfile").read_text()


def test_mistral_demo_sized_pipeline_passes_every_gate_honestly(tmp_path):
    """A family other than Gemma, at the demo's size, through `factory run` with every gate."""
    root = tmp_path / "mistral"
    factory("init", "--example", root, "--family", "mistral", check_rc=0)
    proc = factory("run", "-C", root, check_rc=0)
    assert "gate quantization-verified: passed" in proc.stderr
    baseline, evaluation = metrics(root, "baseline"), metrics(root, "evaluation")
    assert baseline["scores"]["exact_match"] <= 0.05 and evaluation["scores"]["exact_match"] >= 0.8
    assert evaluation["stopping"]["rate"] >= 0.95 and evaluation["stopping"]["end_of_turn"] == "</s>"
    train = (root / "data" / "splits" / "train.jsonl").read_text()
    assert all(e["prompt"] not in train for e in evaluation["examples"])  # learned, not memorised
