"""Scoring a model on a split: what the baseline and evaluate phases share.

Generation is batched and greedy (the same decoding for both models, so the comparison is
paired and fair); every example keeps its prediction and per-metric scores, so evaluate can
compare the two models example by example.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import orjson

from factory import modeling, scoring
from factory.config import FactoryConfig
from factory.errors import InputError
from factory.io import file_sha256
from factory.phase import PhaseContext
from factory.workspace import Workspace


def read_split(path: Path, ws: Workspace, limit: int | None = None) -> list[dict]:
    """The records of a split file; the first `limit` of them when it is set (evaluation.max_examples)."""
    if not path.exists():
        raise InputError(f"{ws.rel(path)} not found; run `factory run split` first")
    records = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    if not records:
        raise InputError(f"{ws.rel(path)} has no records")
    return records[:limit]


def decoding(cfg: FactoryConfig) -> dict[str, Any]:
    return {"strategy": "greedy", "max_new_tokens": cfg.evaluation.max_new_tokens, "batch_size": cfg.evaluation.batch_size}


def score_model(ctx: PhaseContext, model, tokenizer, records: list[dict], *, what: str) -> dict[str, Any]:
    """Generate for every record, score each prediction, and compute the answer loss."""
    cfg = ctx.config.evaluation
    prompts = [modeling.prompt_and_answer(r)[0] for r in records]
    ctx.progress.start(len(records), f"examples ({what})")
    started = time.monotonic()
    predictions = modeling.generate(model, tokenizer, prompts, batch_size=cfg.batch_size,
                                    max_new_tokens=cfg.max_new_tokens, on_batch=ctx.progress.advance)
    result = score_predictions(ctx.config, records, predictions, seconds=time.monotonic() - started)
    if cfg.loss:
        rows = [modeling.answer_labels(tokenizer, r) for r in records]
        # any id pads: answer_loss masks by row length, so the pad id never needs to be unused
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        loss, tokens = modeling.answer_loss(model, rows, batch_size=cfg.batch_size, pad_token_id=pad)
        result.update(loss=loss, perplexity=perplexity(loss), loss_tokens=tokens)
    result["examples"] = result.pop("examples")  # last: the aggregates read first in the file
    return result


def score_predictions(cfg: FactoryConfig, records: list[dict], predictions: list[str], *,
                      seconds: float) -> dict[str, Any]:
    """Score each prediction against its record's final answer with the configured scorers.

    Shared by every model that is scored (HF models here, GGUF files in quantize), so all
    of them are measured the same way.
    """
    scorers = scoring.build_scorers(cfg.evaluation.metrics, regex=cfg.evaluation.regex,
                                    custom=cfg.evaluation.custom_scorer)
    examples = []
    for index, (record, prediction) in enumerate(zip(records, predictions)):
        prompt, reference = modeling.prompt_and_answer(record)
        examples.append({
            "index": index,
            "prompt": prompt[-1]["content"] if prompt else "",
            "reference": reference,
            "prediction": prediction,
            "scores": {name: scorer(prediction, reference) for name, scorer in scorers.items()},
        })
    means = {name: sum(e["scores"][name] for e in examples) / len(examples) for name in scorers}
    return {
        "num_examples": len(examples),
        "scores": means,
        "primary": cfg.evaluation.primary,
        "primary_score": means[cfg.evaluation.primary],
        "generation_seconds": round(seconds, 3),
        "examples_per_second": round(len(examples) / seconds, 2) if seconds else None,
        "decoding": decoding(cfg),
        "examples": examples,
    }


def perplexity(loss: float) -> float | None:
    return math.exp(loss) if math.isfinite(loss) and loss < 50 else None


def split_identity(ws: Workspace, path: Path) -> dict[str, str]:
    return {"file": ws.rel(path), "sha256": file_sha256(path)}
