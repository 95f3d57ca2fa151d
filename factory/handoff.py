"""The handoff after quantize (seed 004 "Next steps"): model cards and how to run the model.

Written by the pipeline (the quantize phase's `after_gates` step) once the quantize gates
have passed, so a card only ever describes a model that earned it, with every gate's result,
and a caller of the Python API gets them as the CLI does. It reads the metrics and gate result
files of the run; it computes nothing new.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factory.config import FactoryConfig
from factory.io import atomic_write_bytes, read_json_if_exists
from factory.workspace import Workspace, record_created

CARD = "README.md"


def model_card_paths(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    """Where the cards go: README.md in the merged and in the quantized folder."""
    return [ws.path(cfg.save.merged_path) / CARD, ws.path(cfg.save.gguf_path) / CARD]


def write_model_cards(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    """README.md in the merged and the quantized folders; returns the cards whose content
    changed (an unchanged card is not rewritten, so an unchanged run stays unchanged)."""
    from factory.gates import last_results

    metrics = {name: read_json_if_exists(ws.metrics_file(name)) or {}
               for name in ("split", "training-stats", "evaluation", "quantization")}
    gates = last_results(ws)
    written = []
    for path, what in zip(model_card_paths(cfg, ws), ("merged", "quantized")):
        if not path.parent.is_dir():
            continue
        card = _card(cfg, ws, what, metrics, gates).encode()
        if path.exists() and path.read_bytes() == card:
            continue
        atomic_write_bytes(path, card)
        record_created(ws, path.parent if what == "merged" else path)  # the merged folder is replaced whole later
        written.append(path)
    return written


def _card(cfg: FactoryConfig, ws: Workspace, what: str, m: dict[str, dict], gates: list[dict]) -> str:
    split, train, evaluation, quant = m["split"], m["training-stats"], m["evaluation"], m["quantization"]
    comparison = evaluation.get("comparison", {})
    lines = [
        "---",
        f"base_model: {cfg.model.name}",
        "library_name: " + ("transformers" if what == "merged" else "gguf"),
        "tags: [factory, lora, " + ("merged" if what == "merged" else "gguf, llama.cpp") + "]",
        "---",
        f"# {Path(cfg.model.name).name} fine-tuned ({what})",
        "",
        f"Made by `factory` from the base model `{cfg.model.name}` with a LoRA adapter "
        f"(r={train.get('resolved', {}).get('rank', cfg.lora.r)}, alpha={cfg.lora.lora_alpha}) merged in "
        f"{quant.get('merge', {}).get('dtype', cfg.save.merged_dtype)}.",
        "",
        "## Data",
        "",
        "| split | records | xxh3-128 |",
        "|---|---|---|",
        *(f"| {name} | {f.get('records')} | `{f.get('xxh3_128')}` |" for name, f in split.get("files", {}).items()),
        "",
        "## Training",
        "",
        f"- backend: {train.get('backend')} on {train.get('device')} ({train.get('backend_reason')})",
        f"- steps: {train.get('steps')} of {train.get('total_steps')}, epochs {_num(train.get('epochs'))}, "
        f"final loss {_num(train.get('final_loss'))}",
        f"- learning rate {cfg.training.learning_rate}, batch {train.get('resolved', {}).get('batch_size')} x "
        f"{train.get('resolved', {}).get('gradient_accumulation_steps')} accumulation, "
        f"max length {train.get('resolved', {}).get('max_seq_length')}, seed {cfg.training.seed}",
        "",
        "## Evaluation (test split, greedy decoding)",
        "",
        f"- {comparison.get('metric')}: base {_num(comparison.get('baseline'))} -> fine-tuned "
        f"{_num(comparison.get('finetuned'))} on {evaluation.get('num_examples')} examples; "
        f"{comparison.get('test_name', 'paired test')} p = {_num(comparison.get('p_value'))}, "
        f"95% bootstrap interval of the gain {comparison.get('ci95')}",
        "",
        "## GGUF files",
        "",
        "| type | file | size (MB) | bits/weight | score | drop vs merged | perplexity ratio | mean KL | stops at end of turn |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {t['type']} | {Path(t['path']).name} | {t['size_bytes'] / 1e6:.2f} | {t['bits_per_weight']:.2f} | "
          f"{_num(t['score'])} | {t['relative_score_drop']:.1%} | {_num(t.get('perplexity_ratio'))} | "
          f"{_num(t.get('mean_kl'))} | {_share(t.get('generation_stops'))} |" for t in quant.get("types", [])),
        "",
        "## Gates",
        "",
        "| gate | result | criteria |",
        "|---|---|---|",
        *(f"| {g['gate']} | {'passed' if g['passed'] else 'FAILED'} | "
          + "; ".join(_criterion(c) for c in g["criteria"])
          + " |" for g in gates),
        "",
        "## Run it",
        "",
        *(f"- {name.replace('_', ' ')}: `{command}`" for name, command in quant.get("commands", {}).items()),
        "",
    ]
    if what == "merged":
        lines += ["With transformers:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'model = AutoModelForCausalLM.from_pretrained("{ws.rel(ws.path(cfg.save.merged_path))}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{ws.rel(ws.path(cfg.save.merged_path))}")', "```", ""]
    return "\n".join(lines)


def _criterion(c: dict) -> str:
    if c.get("passed") is None:  # an optional criterion whose metric this run does not have
        return f"{c['metric']}: not applicable"
    return f"{c['metric']} {c['op']} {_num(c.get('required'))} (observed {_num(c.get('observed'))})"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _share(value: float | None) -> str:
    return "not applicable (plain text)" if value is None else f"{value:.0%}"


def summary_lines(cfg: FactoryConfig, ws: Workspace) -> list[str]:
    """Where each artifact is and how to run it, for the end of `factory run`."""
    quant = read_json_if_exists(ws.metrics_file("quantization")) or {}
    lines = [f"merged model: {ws.rel(ws.path(cfg.save.merged_path))}/"]
    lines += [f"GGUF {t['type']}: {t['path']} ({t['size_bytes'] / 1e6:.1f} MB, score drop {t['relative_score_drop']:.1%})"
              for t in quant.get("types", [])]
    if quant.get("modelfile"):
        lines.append(f"Ollama Modelfile: {quant['modelfile']}")
    lines += [f"{name.replace('_', ' ')}: {command}" for name, command in quant.get("commands", {}).items()]
    return lines
