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
    if not path.exists():
        raise InputError(f"{ws.rel(path)} not found; run `factory run split` first")
    records = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    if not records:
        raise InputError(f"{ws.rel(path)} has no records")
    return records[:limit] if limit else records


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
    result = score_predictions(ctx.config, records, predictions, seconds=time.monotonic() - started,
                               ws=ctx.workspace)
    if cfg.loss:
        loss, tokens = modeling.answer_loss(model, tokenizer, records, batch_size=cfg.batch_size)
        result.update(loss=loss, perplexity=perplexity(loss), loss_tokens=tokens)
    result["examples"] = result.pop("examples")  # last: the aggregates read first in the file
    return result


def score_predictions(cfg: FactoryConfig, records: list[dict], predictions: list[str], *,
                      seconds: float, ws: Workspace) -> dict[str, Any]:
    """Score each prediction against its record's final answer with the configured scorers.

    Shared by every model that is scored (HF models here, GGUF files in quantize), so all
    of them are measured the same way. The `judge` metric is evaluation.judge's grade; an
    example whose verdict failed has the score None (left out of means and paired tests) and
    the judge's failure rate is in the result.
    """
    names = [name for name in cfg.evaluation.metrics if name != "judge"]
    scorers = scoring.build_scorers(names, regex=cfg.evaluation.regex, custom=cfg.evaluation.custom_scorer)
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
    extra: dict[str, Any] = {}
    if "judge" in cfg.evaluation.metrics:
        from factory.judge import grade_answers

        prompts = [modeling.prompt_and_answer(r) for r in records]
        scores, extra["judge"] = grade_answers(cfg, ws, [p for p, _ in prompts], predictions, [r for _, r in prompts])
        for example, score in zip(examples, scores):
            example["scores"]["judge"] = score
    means = {name: _mean([e["scores"][name] for e in examples]) for name in cfg.evaluation.metrics}
    return {
        **extra,
        "num_examples": len(examples),
        "scores": means,
        "primary": cfg.evaluation.primary,
        "primary_score": means[cfg.evaluation.primary],
        "generation_seconds": round(seconds, 3),
        "examples_per_second": round(len(examples) / seconds, 2) if seconds else None,
        "decoding": decoding(cfg),
        "examples": examples,
    }


def _mean(values: list[float | None]) -> float | None:
    """The mean of the scores there are (None when there are none: a judge that judged nothing)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def difference(a: float | None, b: float | None) -> float | None:
    """a - b, or None when either is unknown."""
    return None if a is None or b is None else a - b


def perplexity(loss: float) -> float | None:
    return math.exp(loss) if math.isfinite(loss) and loss < 50 else None


def split_identity(ws: Workspace, path: Path) -> dict[str, str]:
    return {"file": ws.rel(path), "sha256": file_sha256(path)}
