"""The model phases on a real tiny Gemma-3 trained on this CPU: masking, the whole pipeline
with an honest gate, kill -9 and resume, a live poller on training-status.json, and the real
datasets for a few steps."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from factory.resources import validate

pytestmark = pytest.mark.slow
DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


def factory(*args, check_rc=None, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(ws, stem):
    return json.loads((ws / "metrics" / f"{stem}.json").read_text())


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The demo's example workspace at its default size (4,200 records, 1,000 steps, about 70 s
    of training here). Smaller sizes were tried and learn unreliably across seeds and thread
    counts (EM 0.29 to 1.0 at 3 locales / 500 steps), which would make the gate test flaky."""
    root = tmp_path_factory.mktemp("example") / "ws"
    factory("init", "--example", root, check_rc=0)
    factory("run", "split", "-C", root, check_rc=0)
    return root


def test_prompt_tokens_get_label_minus_100_on_both_data_paths(example):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from factory import modeling
    from phases.finetune import _cpu_safe_trainer
    from transformers import AutoModelForCausalLM

    record = json.loads((example / "data" / "splits" / "train.jsonl").read_text().splitlines()[0])
    answer = record["conversations"][-1]["content"]
    tokenizer = AutoTokenizer.from_pretrained(example / "models" / "base")

    # hf: TRL's assistant_only_loss through the factory's trainer class
    model = AutoModelForCausalLM.from_pretrained(example / "models" / "base")
    trainer = _cpu_safe_trainer()(
        model=model, processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"messages": modeling.chat_messages(record["conversations"])}]),
        args=SFTConfig(output_dir=str(example / "tmp-mask"), assistant_only_loss=True, use_cpu=True, report_to="none",
                       max_length=128),
    )
    row = trainer.train_dataset[0]
    labels = trainer.data_collator([row])["labels"][0].tolist()
    trained = [i for i, label in zip(row["input_ids"], labels) if label != -100]
    assert tokenizer.decode(trained) == answer + "<end_of_turn>\n"  # the answer and its end-of-turn, nothing else
    first_trained = labels.index(next(label for label in labels if label != -100))
    prompt_ids = row["input_ids"][:first_trained]
    assert "<start_of_turn>model" in tokenizer.decode(prompt_ids) and all(label == -100 for label in labels[:first_trained])

    # unsloth: seed 004's text (no leading <bos>) with exactly one response marker per answer,
    # which is what train_on_responses_only masks around
    text = modeling.unsloth_text(tokenizer, record["conversations"])
    instruction, response = modeling.RESPONSE_PARTS["gemma-3"]
    assert not text.startswith("<bos>") and text.count(response) == 1 and text.count(instruction) == 1
    assert text.split(response, 1)[1].startswith(answer)

    # evaluation's own answer labels agree
    ids, eval_labels = modeling.answer_labels(tokenizer, record)
    assert tokenizer.decode([i for i, l in zip(ids, eval_labels) if l != -100]).startswith(answer)


def test_pipeline_to_evaluate_passes_the_gate_honestly(example):
    proc = factory("run", "evaluate", "-C", example, check_rc=0)
    assert "gate model-performance: passed" in proc.stderr
    baseline, evaluation, stats = metrics(example, "baseline"), metrics(example, "evaluation"), metrics(example, "training-stats")
    assert baseline["scores"]["exact_match"] <= 0.05
    assert evaluation["scores"]["exact_match"] >= 0.8, evaluation["examples"][:5]
    comparison = evaluation["comparison"]
    assert comparison["p_value"] < 0.05 and comparison["ci95"][0] > 0.5
    assert stats["completed"] and stats["backend"] == "hf" and "no CUDA device" in stats["backend_reason"]
    assert stats["convergence"]["loss_drop"] > 0.5
    # learned, not hard-coded: the test prompts never appear in the training data
    train = (example / "data" / "splits" / "train.jsonl").read_text()
    assert all(e["prompt"] not in train for e in evaluation["examples"])
    # artifacts of seed 004
    lora = example / "models" / "checkpoints" / "lora"
    assert (lora / "adapter_config.json").exists() and (lora / "adapter_model.safetensors").exists()
    assert (lora / "tokenizer.json").exists() or (lora / "tokenizer.model").exists()
    assert (example / "logs" / "training.log").exists()
    checkpoints = example.glob("outputs/checkpoint-*/training_state.json")
    assert sorted(json.loads(p.read_text())["progress_pct"] for p in checkpoints) == [25.0, 50.0, 75.0, 100.0]
    training = json.loads((example / ".factory" / "training-status.json").read_text())
    validate(training, "training-status")
    assert training["status"] == "succeeded" and training["step"] == training["total_steps"] == 1000
    assert factory("run", "evaluate", "-C", example, check_rc=0).stderr.count("skipped") >= 5


def test_kill_9_during_finetune_then_resume_with_live_poller(tmp_path):
    root = tmp_path / "ws"
    factory("init", "--example", root, "--records", 600, "--steps", 120, check_rc=0)
    factory("run", "split", "-C", root, check_rc=0)
    status_file = root / ".factory" / "training-status.json"
    reads, problems, stop = [], [], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                doc = json.loads(status_file.read_bytes())
                validate(doc, "training-status")
                reads.append(doc)
            except FileNotFoundError:
                pass
            except Exception as e:
                problems.append(repr(e))
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "factory", "run", "--only", "finetune", "-C", str(root)],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while not list(root.glob("outputs/checkpoint-*/training_state.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = max(json.loads(p.read_text())["step"] for p in root.glob("outputs/checkpoint-*/training_state.json"))
        assert 0 < killed_at < 120
        factory("run", "--only", "finetune", "-C", root, check_rc=0)
    finally:
        stop.set()
        poller.join()
    stats = metrics(root, "training-stats")
    assert stats["resumed_from_step"] >= killed_at and stats["completed"] and stats["steps"] == 120
    assert problems == [] and len(reads) > 3
    resumed = [r for r in reads if r["run_id"] == reads[-1]["run_id"] and r["eta_seconds"] is not None]
    assert resumed and resumed[-1]["status"] == "succeeded"
    seqs = [r["seq"] for r in reads]
    assert seqs == sorted(seqs)
    # the chart's history is one curve across the kill: the first run's points up to the step
    # it resumed from, the second run's after it, none missing or repeated
    from factory.status import read_training_history
    from factory.workspace import Workspace

    history = read_training_history(Workspace.at(root))
    assert [p["step"] for p in history] == list(range(10, 121, 10))
    before = {p["run_id"] for p in history if p["step"] <= stats["resumed_from_step"]}
    after = {p["run_id"] for p in history if p["step"] > stats["resumed_from_step"]}
    assert len(before) == len(after) == 1 and before != after and after == {reads[-1]["run_id"]}


def _dataset_workspace(tmp_path, inputs: dict, evaluation: dict) -> Path:
    """A workspace over a real dataset with a tiny Gemma-3 whose tokenizer learnt that data."""
    from factory.example import build_tiny_gemma3

    root = tmp_path / "ws"
    factory("init", root, check_rc=0)
    import yaml

    config = {
        "data": {"inputs": [inputs], "split": {"train": 0.8, "val": 0.1, "test": 0.1}},
        "model": {"name": "models/base", "max_seq_length": 256, "load_in_4bit": False},
        "lora": {"r": 8, "lora_alpha": 16, "use_gradient_checkpointing": False},
        "training": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 6,
                     "learning_rate": 0.01, "optim": "adamw_torch", "logging_steps": 1, "warmup_steps": 0},
        "evaluation": {"max_new_tokens": 8, "batch_size": 64, **evaluation},
        "gates": {"data-valid": {"format.records_out": 50}},
    }
    (root / "factory.yaml").write_text(yaml.safe_dump(config))
    factory("run", "split", "-C", root, check_rc=0)
    texts = [line for line in (root / "data" / "formatted" / "all.jsonl").read_text().splitlines()[:2000]]
    build_tiny_gemma3(root / "models" / "base", corpus=texts, vocab_size=600)
    return root


@pytest.mark.datasets
@pytest.mark.skipif(not DATASETS.exists(), reason=f"{DATASETS} not present")
def test_sst2_classification_through_finetune(tmp_path):
    import shutil

    raw = tmp_path / "ws" / "data" / "raw"
    raw.mkdir(parents=True)
    lines = (DATASETS / "sst2" / "dev.tsv").read_text().splitlines()[:801]
    (raw / "sst2.tsv").write_text("\n".join(lines) + "\n")
    root = _dataset_workspace(tmp_path, {"path": "data/raw/sst2.tsv", "mapping": {"user": "sentence", "assistant": "label"},
                                         "label_map": {"0": "negative", "1": "positive"},
                                         "user_template": "Sentiment of: {text}"},
                              {"metrics": ["exact_match", "token_f1"]})
    factory("run", "finetune", "-C", root)  # the gate may fail after 6 steps; the artifacts are what count
    stats = metrics(root, "training-stats")
    assert stats["steps"] == 6 and stats["completed"] and stats["nonfinite_losses"] == 0
    assert metrics(root, "baseline")["num_examples"] == metrics(root, "split")["counts"]["test"]
    assert {e["reference"] for e in metrics(root, "baseline")["examples"]} <= {"negative", "positive"}
    shutil.rmtree(root / "outputs")


@pytest.mark.datasets
@pytest.mark.skipif(not DATASETS.exists(), reason=f"{DATASETS} not present")
def test_gsm8k_regex_scorer_through_finetune(tmp_path):
    raw = tmp_path / "ws" / "data" / "raw"
    raw.mkdir(parents=True)
    lines = (DATASETS / "gsm8k" / "test.jsonl").read_text().splitlines()[:600]
    (raw / "gsm8k.jsonl").write_text("\n".join(lines) + "\n")
    root = _dataset_workspace(tmp_path, {"path": "data/raw/gsm8k.jsonl", "mapping": {"user": "question", "assistant": "answer"}},
                              {"metrics": ["regex_match", "exact_match"], "primary": "regex_match",
                               "regex": "####\\s*(-?[\\d,\\.]+)"})
    factory("run", "finetune", "-C", root)
    assert metrics(root, "training-stats")["steps"] == 6
    baseline = metrics(root, "baseline")
    assert baseline["primary"] == "regex_match" and "regex_match" in baseline["examples"][0]["scores"]
    assert all("####" in e["reference"] for e in baseline["examples"])


def test_sample_streams_the_learned_answer(example):
    factory("run", "evaluate", "-C", example, check_rc=0)  # a no-op when the pipeline test ran first
    evaluation = metrics(example, "evaluation")
    right = next(e for e in evaluation["examples"] if e["scores"]["exact_match"] == 1.0)
    # the example's prompt is a system instruction plus the request, as the format phase made it
    system = "Format the date and amount for the locale."
    proc = factory("sample", "-C", example, "--system", system, "-p", right["prompt"], "--temperature", "0",
                   "--max-new-tokens", "32", check_rc=0)
    assert right["reference"] in proc.stdout
    base = factory("sample", "-C", example, "-m", "base", "--system", system, "-p", right["prompt"],
                   "--temperature", "0", "--max-new-tokens", "32", check_rc=0)
    assert right["reference"] not in base.stdout
