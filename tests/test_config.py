"""factory.yaml parsing: the seed's training config loads as printed, errors are collected
and name the key path with a close match."""

from pathlib import Path

import pytest
import yaml

from factory.config import FactoryConfig, commented_template, load_config, parse_config
from factory.errors import ConfigError

SEED_004 = Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "004_a38248012908c2c3.txt"

# The block printed in seed 004, comments and all (kept here so the test runs without ../shared).
SEED_TRAINING_CONFIG = """
{
  "model": {
    "name": "unsloth/gemma-3-4b-it",
    "max_seq_length": 2048,
    "dtype": null,  # Auto-detect (float16 for T4/V100, bfloat16 for Ampere+)
    "load_in_4bit": true
  },
  "lora": {
    "r": 8,  # LoRA rank (8, 16, 32, 64, 128)
    "lora_alpha": 16,
    "lora_dropout": 0,
    "target_modules": [
      "q_proj", "k_proj", "v_proj", "o_proj",
      "gate_proj", "up_proj", "down_proj"
    ],
    "bias": "none",
    "use_gradient_checkpointing": "unsloth",
    "finetune_vision_layers": false,
    "finetune_language_layers": true,
    "finetune_attention_modules": true,
    "finetune_mlp_modules": true
  },
  "training": {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "warmup_steps": 5,
    "max_steps": null,  # null for full training, or set specific number
    "num_train_epochs": 3,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "linear",
    "optim": "adamw_8bit",
    "weight_decay": 0.01,
    "logging_steps": 1,
    "seed": 3407,
    "output_dir": "outputs"
  },
  "dataset": {
    "path": "data/splits/train.jsonl",
    "text_field": "text",
    "chat_template": "gemma-3"
  },
  "save": {
    "lora_path": "models/checkpoints/lora",
    "merged_path": "models/checkpoints/merged",
    "gguf_path": "models/quantized",
    "gguf_quantization": "Q8_0"  # Q8_0, f16, bf16
  }
}
"""


def test_seed_training_config_loads_as_printed(tmp_path):
    path = tmp_path / "factory.yaml"
    path.write_text(SEED_TRAINING_CONFIG)
    cfg = load_config(path)
    assert cfg.model.name == "unsloth/gemma-3-4b-it"
    assert cfg.model.dtype is None and cfg.model.load_in_4bit is True
    assert cfg.lora.r == 8 and cfg.lora.use_gradient_checkpointing == "unsloth"
    assert cfg.training.learning_rate == pytest.approx(2e-4)  # YAML reads 2e-4 as a string
    assert cfg.training.max_steps is None
    assert cfg.save.gguf_quantization == ["Q8_0"]


@pytest.mark.skipif(not SEED_004.exists(), reason="../shared/seeds not present")
def test_copy_matches_the_seed():
    text = SEED_004.read_text()
    block = text.split("# training-config.yaml (or training-config.json)\n")[1].split("```")[0]
    assert yaml.safe_load(block) == yaml.safe_load(SEED_TRAINING_CONFIG)


def test_unknown_keys_named_with_close_match_and_all_errors_at_once():
    with pytest.raises(ConfigError) as info:
        parse_config({
            "lora": {"rnak": 8},
            "modle": {},
            "training": {"learning_rate": "fast"},
            "data": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}, "inputs": [{"pth": "x"}]},
        }, source="factory.yaml")
    message = str(info.value)
    assert message.startswith("factory.yaml: 5 problem(s)")
    assert "lora.rnak: unknown key; did you mean lora.r?" in message
    assert "modle: unknown key; did you mean model?" in message
    assert "training.learning_rate:" in message and "'fast'" in message
    assert "data.split: train + val + test must be 1.0, got 0.7" in message
    assert "data.inputs.0.pth: unknown key; did you mean data.inputs.0.path?" in message


def test_an_unknown_key_is_named_whatever_it_looks_like():
    """A capitalised key or one in brackets is the user's key, not a validator's tag (they were
    dropped from the path: a wrong key named, or an IndexError, exit 3)."""
    with pytest.raises(ConfigError) as info:
        parse_config({"lora": {"R": 8}, "[/INST]": 1})
    message = str(info.value)
    assert "lora.R: unknown key; did you mean lora.r?" in message
    assert "[/INST]: unknown key; valid keys: data, model" in message


def test_a_messages_field_with_a_mapping_or_another_format_is_refused():
    for spec in ({"path": "x", "messages": "dialog", "mapping": {"user": "q", "assistant": "a"}},
                 {"path": "x", "messages": "dialog", "format": "alpaca"}):
        with pytest.raises(ConfigError, match=r"data.inputs.0: .*`messages` names the conversation's field"):
            parse_config({"data": {"inputs": [spec]}})
    assert parse_config({"data": {"inputs": [{"path": "x", "messages": "dialog", "format": "sharegpt"}]}})


def test_a_negative_column_number_is_refused_naming_its_key():
    for spec, key in (({"meta": [0, -1]}, "meta"), ({"header": False, "mapping": {"user": [0, -2], "assistant": 1}},
                                                     "mapping.user")):
        with pytest.raises(ConfigError, match=rf"data.inputs.0: {key}: column numbers start at 0, got -"):
            parse_config({"data": {"inputs": [{"path": "x", **spec}]}})
    assert parse_config({"data": {"inputs": [{"path": "x", "header": False, "meta": [2],
                                              "mapping": {"user": [0, 1], "assistant": 3}}]}})


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "factory.yaml"
    path.write_text("data:\n  inputs: [a\n  split: {}\n")
    with pytest.raises(ConfigError, match=r"factory.yaml:\d+:\d+: not valid YAML"):
        load_config(path)


def test_inputs_accept_strings_and_objects():
    cfg = parse_config({"data": {"inputs": ["a.jsonl", {"path": "b.tsv", "mapping": {"user": "s", "assistant": "l"}}]}})
    assert [i.path for i in cfg.data.inputs] == ["a.jsonl", "b.tsv"]
    assert cfg.data.inputs[1].mapping == {"user": "s", "assistant": "l"}


def test_commented_template_round_trips_to_defaults():
    text = commented_template()
    assert "# LoRA rank" in text and "# The same seed and data give byte-identical splits." in text
    assert parse_config(yaml.safe_load(text)) == FactoryConfig()


def test_readme_config_reference_is_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    assert section.strip() == f"```yaml\n{commented_template()}\n```", (
        "README's config reference is stale: run `make docs`"
    )
