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
from factory.chat import is_plain_text, last_user_text, messages as chat_messages, reference
from factory.config import FactoryConfig
from factory.errors import InputError
from factory.fingerprint import HashCache
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


def score_model(ctx: PhaseContext, model, chat, records: list[dict], *, what: str) -> dict[str, Any]:
    """Generate for every record, score each prediction, and compute the answer loss. A test
    split of plain text (the `text` input format) is scored as language modelling instead."""
    cfg = ctx.config.evaluation
    if all(is_plain_text(r) for r in records):
        return score_language_model(ctx, model, chat, records, what=what)
    ctx.progress.start(len(records), f"examples ({what})")
    started = time.monotonic()
    generations = modeling.generate(model, chat, records, batch_size=cfg.batch_size,
                                    max_new_tokens=cfg.max_new_tokens, on_batch=ctx.progress.advance)
    result = score_predictions(ctx.config, chat, records, [g.text for g in generations],
                               seconds=time.monotonic() - started, ws=ctx.workspace)
    for example, generation in zip(result["examples"], generations):
        example["stopped"] = generation.stopped
    result["stopping"] = stopping(chat, records, generations, cfg.max_new_tokens)
    if cfg.loss:
        loss, tokens = modeling.answer_loss(model, [chat.answer_example(r) for r in records], batch_size=cfg.batch_size,
                                            pad_token_id=chat.pad_token_id)
        result.update(loss=loss, perplexity=perplexity(loss), loss_tokens=tokens)
    result["examples"] = result.pop("examples")  # last: the aggregates read first in the file
    return result


LANGUAGE_MODELLING_METRIC = "token_probability"
"""Per document, exp(-mean token loss): the geometric mean probability the model gives each
token, 1 / perplexity, between 0 and 1, higher is better, so the paired statistics and the
model-performance gate read it like any other score."""


def score_language_model(ctx: PhaseContext, model, chat, records: list[dict], *, what: str) -> dict[str, Any]:
    """Plain-text documents: loss and perplexity per document, nothing generated."""
    ctx.progress.start(len(records), f"documents ({what})")
    started = time.monotonic()
    examples, total, tokens = [], 0.0, 0
    for index, record in enumerate(records):
        loss, count = modeling.answer_loss(model, [chat.answer_example(record)], batch_size=1,
                                           pad_token_id=chat.pad_token_id)
        total, tokens = total + loss * count, tokens + count
        text = record["conversations"][0]["content"]
        examples.append({"index": index, "prompt": text[:200], "reference": "", "prediction": "", "loss": loss,
                         "scores": {LANGUAGE_MODELLING_METRIC: math.exp(-loss) if math.isfinite(loss) else 0.0}})
        ctx.progress.advance()
    score = sum(e["scores"][LANGUAGE_MODELLING_METRIC] for e in examples) / len(examples)
    loss = total / tokens if tokens else float("nan")
    seconds = time.monotonic() - started
    return {
        "num_examples": len(examples),
        "language_modelling": True,
        "scores": {LANGUAGE_MODELLING_METRIC: score},
        "primary": LANGUAGE_MODELLING_METRIC,
        "primary_score": score,
        "loss": loss, "perplexity": perplexity(loss), "loss_tokens": tokens,
        "generation_seconds": round(seconds, 3),
        "examples_per_second": round(len(examples) / seconds, 2) if seconds else None,
        "decoding": decoding(ctx.config),
        "stopping": None,
        "examples": examples,
    }


def score_predictions(cfg: FactoryConfig, chat, records: list[dict], predictions: list[str], *,
                      seconds: float, ws: Workspace) -> dict[str, Any]:
    """Score each prediction against its record's final answer with the configured scorers
    (both without a reasoning block, when the chat format writes one: chat.answer_text).

    Shared by every model that is scored (HF models here, GGUF files in quantize), so all
    of them are measured the same way. The `judge` metric is evaluation.judge's grade; an
    example whose verdict failed has the score None (left out of means and paired tests) and
    the judge's failure rate is in the result.
    """
    names = [name for name in cfg.evaluation.metrics if name != "judge"]
    scorers = scoring.build_scorers(names, regex=cfg.evaluation.regex, custom=cfg.evaluation.custom_scorer)
    examples = []
    for index, (record, prediction) in enumerate(zip(records, predictions)):
        answer, prediction = chat.answer_text(reference(record)), chat.answer_text(prediction)
        examples.append({
            "index": index,
            "prompt": last_user_text(record),
            "reference": answer,
            "prediction": prediction,
            "scores": {name: scorer(prediction, answer) for name, scorer in scorers.items()},
        })
    extra: dict[str, Any] = {}
    if "judge" in cfg.evaluation.metrics:
        from factory.judge import grade_answers

        prompts = [chat_messages(r["conversations"][:-1]) for r in records]
        scores, extra["judge"] = grade_answers(cfg, ws, prompts, predictions, [e["reference"] for e in examples])
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


STOP_RATE_WARNING = 0.9  # below this share of answers ending at end of turn, the metrics say why


def stopping(chat, records: list[dict], generations: list, max_new_tokens: int) -> dict[str, Any]:
    """How many answers ended with the end-of-turn token rather than at max_new_tokens, and
    when too few did, the likely causes, checked rather than guessed."""
    rate = sum(g.stopped for g in generations) / len(generations) if generations else None
    out: dict[str, Any] = {"rate": rate, "end_of_turn": chat.eot_token, "stop_token_ids": chat.stop_token_ids,
                           "max_new_tokens": max_new_tokens, "causes": []}
    if rate is None or rate >= STOP_RATE_WARNING:
        return out
    causes = out["causes"]
    sample = records[: min(len(records), 50)]
    trained = [chat.eot_token_id in chat.training_examples(r)[-1]["labels"] for r in sample]
    if not all(trained):
        causes.append(f"the end-of-turn token {chat.eot_token!r} is not in the trained span of "
                      f"{trained.count(False)} of {len(sample)} examples: the template's end token is outside the "
                      "answer, so training never taught the model to stop")
    lengths = sorted(len(chat.tokenizer(reference(r), add_special_tokens=False)["input_ids"]) for r in sample)
    longest = lengths[-1] if lengths else 0
    if longest + 1 > max_new_tokens:
        causes.append(f"reference answers run to {longest} tokens, more than evaluation.max_new_tokens "
                      f"({max_new_tokens}) allows with the end token: raise it")
    thinking = [g for g in generations if not g.stopped and chat.reasoning_end and chat.reasoning_end not in g.text]
    if thinking:  # a reasoning model cut off inside its reasoning block
        causes.append(f"{len(thinking)} of {len(generations)} answers ran to max_new_tokens ({max_new_tokens}) before "
                      f"closing the reasoning block with {chat.reasoning_end!r}: the model reasons before it answers; "
                      "raise evaluation.max_new_tokens (reasoning models use hundreds to thousands of tokens)")
    if chat.eot_appended:
        causes.append(f"the template writes no end-of-turn token; the factory appends {chat.eot_token!r} in training, "
                      "so a base model that was not trained this way will not stop")
    if not causes:
        causes.append(f"the model has not (yet) learned to end answers with {chat.eot_token!r}: too few training "
                      "steps, or a learning rate too low for the end token to be learned")
    return out


def perplexity(loss: float) -> float | None:
    return math.exp(loss) if math.isfinite(loss) and loss < 50 else None


def split_identity(ws: Workspace, path: Path) -> dict[str, str]:
    return {"file": ws.rel(path), "xxh3_128": HashCache(ws).file_digest(path)}  # known to the run: not read again
