"""Resolve `auto` training values and estimate memory before a run (`factory plan`).

`auto` follows the Unsloth spec's VRAM table; the estimate adds weights, LoRA parameters,
optimizer state, activations and the logits (vocab x sequence x 4 bytes, seed 002), which
dominate for Gemma 3's 262k vocabulary at long context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from factory.config import FactoryConfig
from factory.errors import ConfigError

# Seed 004, "Parameter Guidelines": (max GiB, rank, batch size, gradient accumulation, sequence length)
VRAM_TABLE = (
    (8, 8, 2, 8, 1024),
    (16, 16, 4, 4, 2048),
    (float("inf"), 32, 8, 2, 4096),
)


@dataclass(frozen=True)
class Resolved:
    rank: int
    batch_size: int
    gradient_accumulation_steps: int
    """Per process: the configured accumulation divided by world_size, so that the effective
    batch stays batch_size x the configured accumulation."""
    max_seq_length: int
    memory_gib: float | None
    """The accelerator's memory the table was read with (None: CPU, read as the smallest row)."""
    world_size: int = 1
    """Training processes in all (training.distributed: nproc_per_node x nnodes)."""

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.world_size


def resolve(cfg: FactoryConfig, memory_gib: float | None, world_size: int = 1) -> Resolved:
    row = next(r for r in VRAM_TABLE if (memory_gib or 0) <= r[0])
    pick = lambda value, auto: auto if value == "auto" else value  # noqa: E731
    batch = pick(cfg.training.per_device_train_batch_size, row[2])
    accumulation = pick(cfg.training.gradient_accumulation_steps, row[3])
    if accumulation % world_size:
        multiples = ", ".join(str(world_size * k) for k in range(1, 4))
        raise ConfigError(
            f"training.gradient_accumulation_steps {accumulation} cannot be shared by {world_size} training processes "
            f"(training.distributed): the effective batch of {batch} x {accumulation} would change. Set "
            f"gradient_accumulation_steps to a multiple of {world_size} ({multiples}), or use fewer processes")
    return Resolved(
        rank=pick(cfg.lora.r, row[1]),
        batch_size=batch,
        gradient_accumulation_steps=accumulation // world_size,
        max_seq_length=pick(cfg.model.max_seq_length, row[4]),
        memory_gib=memory_gib,
        world_size=world_size,
    )


def context_length(cfg: FactoryConfig) -> int:
    """The sequence length the model is trained and served at: model.max_seq_length, or what
    `auto` resolves to on this machine (what GGUF verification, `factory sample` and the
    Modelfile's num_ctx use)."""
    return resolve(cfg, accelerator_memory_gib()).max_seq_length


def accelerator_memory_gib() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return None


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    weights_gib: float
    lora_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    total_gib: float


def estimate(model_config: dict, resolved: Resolved, *, load_in_4bit: bool, n_targets: int = 7,
             trained_whole: tuple[str, ...] = (), gradient_checkpointing: bool = True) -> MemoryEstimate:
    """Rough training memory for a decoder-only model from its config.json values;
    `trained_whole` is lora.modules_to_save (its embeddings counted, one when tied)."""
    text = model_config.get("text_config", model_config)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    vocab, inter = text["vocab_size"], text.get("intermediate_size", 4 * hidden)
    heads, kv = text.get("num_attention_heads", 1), text.get("num_key_value_heads", text.get("num_attention_heads", 1))
    head_dim = text.get("head_dim", hidden // heads)
    attn = hidden * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * hidden * inter
    params = layers * (attn + mlp) + vocab * hidden
    bytes_per_weight = 0.5 + 0.0625 if load_in_4bit else 2  # nf4 + scales, or 16-bit
    weights = params * bytes_per_weight
    embeddings = len({"embed_tokens", "lm_head"} & set(trained_whole))
    if model_config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)):
        embeddings = min(embeddings, 1)
    lora_params = layers * resolved.rank * n_targets * (hidden + max(hidden, inter)) + embeddings * vocab * hidden
    lora = lora_params * 4  # fp32 master copy
    optimizer = lora_params * 8  # Adam moments
    tokens = resolved.batch_size * resolved.max_seq_length
    per_layer = tokens * hidden * 2 * (2 if gradient_checkpointing else 16)
    activations = layers * per_layer
    logits = vocab * tokens * 4
    gib = lambda b: round(b / 2**30, 3)  # noqa: E731
    return MemoryEstimate(params, gib(weights), gib(lora), gib(optimizer), gib(activations), gib(logits),
                          gib(weights + lora + optimizer + activations + logits))


def read_model_config(path: Path) -> dict | None:
    config = Path(path) / "config.json"
    return json.loads(config.read_text()) if config.exists() else None

