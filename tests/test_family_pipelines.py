"""Every model family through every phase, with its real tokenizer and chat template.

Each family's example (`factory init --example --family F`: a tiny model of the family's real
architecture and vocabulary, random weights) runs format -> split -> baseline -> finetune ->
evaluate -> quantize at a small size. The gates need not pass on these small runs; every
phase must run and every artifact be right, checked here against what the family's real
chat format is known to be (not against what the factory derived):
masks token by token, generation that stops at end of turn, the GGUF's tokenizer and
embedded template, the Modelfile's stop token. A Llama-architecture model with a chat
template of its own (none of the factory's) and no pad token goes through the whole
pipeline too, and so does plain text on a base model without a template.
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


def gguf_stops_at(path: Path, token: str) -> bool:
    """llama.cpp's own word: the GGUF's vocabulary marks `token` as end of generation, so
    llama-server, llama-cli and Ollama stop there."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    (token_id,) = llm.tokenize(token.encode(), add_bos=False, special=True)
    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token_id))


def check_artifacts(root: Path, eot: str) -> None:
    baseline, stats, evaluation, quantization = (metrics(root, METRICS[p]) for p in PHASES)
    assert stats["completed"] and stats["chat_format"]["end_of_turn"] == eot
    for scored in (baseline, evaluation):  # measured; a small run need not have learned to stop yet
        assert scored["stopping"]["end_of_turn"] == eot and scored["stopping"]["rate"] is not None
    for gguf in quantization["types"]:
        assert gguf["tokenizer_agreement"] == 1.0
        assert gguf["chat_template_embedded"] and gguf["generation_stops"] is not None
        assert gguf_stops_at(root / gguf["path"], eot)
    modelfile = (root / "models" / "quantized" / "Modelfile").read_text()
    assert f'PARAMETER stop "{eot}"' in modelfile and "TEMPLATE" in modelfile


@pytest.mark.parametrize("family", list(END_OF_TURN))
def test_family_runs_every_phase(tmp_path, family):
    root = tmp_path / family
    factory("init", "--example", root, "--family", family, "--records", 400, "--steps", 150, check_rc=0)
    small_run(root)
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
    factory("init", "--example", root, "--records", 400, "--steps", 150, check_rc=0)
    small_run(root)
    shutil.rmtree(root / "models" / "base")
    build_custom_template_model(root / "models" / "base")
    base = AutoTokenizer.from_pretrained(root / "models" / "base")
    assert base.pad_token is None and base.chat_template
    assert not any(base.chat_template == p.read_text() for p in (Path(__file__).parents[1] / "factory" / "templates").glob("*.jinja"))
    run_every_phase(root)
    stats, quantization = metrics(root, "training-stats"), metrics(root, "quantization")
    assert stats["completed"] and stats["chat_format"]["template"].startswith("auto")
    assert stats["chat_format"]["pad_token"] not in (None, base.eos_token)
    assert all(g["tokenizer_agreement"] == 1.0 and g["chat_template_embedded"] for g in quantization["types"])
    assert gguf_stops_at(root / quantization["types"][0]["path"], stats["chat_format"]["end_of_turn"])
    assert "TEMPLATE" in (root / "models" / "quantized" / "Modelfile").read_text()


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
