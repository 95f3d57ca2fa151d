"""The judge: grades answers and whole conversations with a rubric, as MT-Bench does.

- Single-answer grading: the judge reads the rubric (a description for every score of its
  scale), the item (a question and an answer, or a whole conversation) and the reference
  answer when there is one, explains, and ends with `[[N]]`. Scores are scaled to 0..1
  ((N - min) / (max - min)) so that they pair with every other per-example score.
- Pairwise grading: two models' answers to the same item, shown as A and B, verdict
  `[[A]]`, `[[B]]` or `[[C]]` (tie). Every pair is judged in both orders; a pair whose
  verdict follows the position rather than the answer is a tie, and counted as inconsistent.
- Verdicts are parsed strictly: exactly one verdict (repeats of the same one allowed), of the
  scale or A/B/C. An unparseable one is asked again (at retry_temperature, with a new seed),
  then recorded as a failure with the judge's text: never dropped, never guessed. The
  failure and inconsistency rates are metrics a gate reads.
- A judge may be Python code (`module:function`): it gets the item as a dict and returns a
  score in 0..1, or a dict of criterion scores in 0..1 (the score is their mean, and the
  report breaks them down). Deterministic rubric code, for tasks with a checkable answer.

Rubrics are YAML files: the ones in factory/rubrics/ (helpfulness, correctness, safety) by
name, or a file of the user's own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from factory.errors import ConfigError
from factory.io import load_yaml
from factory.workspace import Workspace

RUBRICS_DIR = Path(__file__).resolve().parent / "rubrics"
VERDICT = re.compile(r"\[\[([^\[\]]*)\]\]")
FAILED_SHOWN = 10  # failed verdicts listed in the metrics, with the judge's text
RAW_KEPT = 600  # characters of a failed verdict's text kept


# --- rubrics ---------------------------------------------------------------------------------


class RubricFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    criteria: list[str] = Field(default_factory=list)
    needs_reference: bool = False
    scale: dict[int, str]
    pass_score: int

    @model_validator(mode="after")
    def _scale(self) -> "RubricFile":
        scores = sorted(self.scale)
        if len(scores) < 2 or scores != list(range(scores[0], scores[-1] + 1)):
            raise ValueError(f"scale must be consecutive whole scores, at least two (got {scores})")
        if self.pass_score not in self.scale:
            raise ValueError(f"pass_score {self.pass_score} is not on the scale {scores[0]}..{scores[-1]}")
        return self


@dataclass(frozen=True)
class Rubric:
    name: str
    description: str
    criteria: tuple[str, ...]
    needs_reference: bool
    scale: dict[int, str]
    pass_score: int
    source: str

    @property
    def low(self) -> int:
        return min(self.scale)

    @property
    def high(self) -> int:
        return max(self.scale)

    def normalize(self, rating: int) -> float:
        return (rating - self.low) / (self.high - self.low)

    @property
    def pass_threshold(self) -> float:
        return self.normalize(self.pass_score)


def rubric_names() -> list[str]:
    return sorted(p.stem for p in RUBRICS_DIR.glob("*.yaml"))


def load_rubric(spec: str, ws: Workspace) -> Rubric:
    """A shipped rubric by name, or a YAML file (relative to the workspace)."""
    path = RUBRICS_DIR / f"{spec}.yaml" if spec in rubric_names() else ws.path(spec)
    if not path.is_file():
        raise ConfigError(f"evaluation.judge.rubric: {spec!r} is neither a shipped rubric ({', '.join(rubric_names())}) "
                          f"nor a file ({path} does not exist)")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
        parsed = RubricFile.model_validate(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ValidationError as e:
        problems = "\n".join(f"  - {'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: invalid rubric:\n{problems}") from None
    source = spec if path.parent == RUBRICS_DIR else ws.rel(path)
    return Rubric(parsed.name, parsed.description.strip(), tuple(parsed.criteria), parsed.needs_reference,
                  {int(k): v.strip() for k, v in sorted(parsed.scale.items())}, parsed.pass_score, source)


# --- what is judged ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One thing to grade: a prompt and its answer, or a whole conversation (answer None)."""

    key: str
    messages: list[dict]
    answer: str | None = None
    reference: str | None = None
    category: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    """What a function judge may need besides the text (the persona, the conversation's
    requests with their references)."""

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "messages": self.messages, "answer": self.answer, "reference": self.reference,
                "category": self.category, "context": self.context}


@dataclass
class Grade:
    score: float | None  # 0..1; None when the judge failed
    rating: int | None = None  # on the rubric's scale (LLM judges)
    criteria: dict[str, float] | None = None  # criterion scores (function judges)
    failure: str | None = None
    attempts: int = 0
    raw: str | None = None  # the judge's text when it failed


@dataclass
class PairVerdict:
    winner: Literal["a", "b", "tie"] | None  # None when the judge failed
    orders: tuple[str | None, str | None] = (None, None)  # verdicts with a first, then with b first
    inconsistent: bool = False
    failure: str | None = None
    attempts: int = 0
    raw: str | None = None


# --- prompts (MT-Bench's, with the rubric's scale spelled out) ----------------------------------


def _rubric_text(rubric: Rubric) -> str:
    lines = [rubric.description]
    if rubric.criteria:
        lines.append(f"Consider: {', '.join(rubric.criteria)}.")
    return "\n".join(lines)


def _scale_text(rubric: Rubric) -> str:
    return "\n".join(f"{score}: {text}" for score, text in rubric.scale.items())


def _conversation_text(messages: list[dict]) -> str:
    return "\n\n".join(f"### {m['role'].capitalize()}:\n{m['content']}" for m in messages)


def _what(item: Item) -> tuple[str, str]:
    """(what is graded, what it answers)"""
    return ("the assistant's side of the conversation", "the whole conversation") if item.answer is None \
        else ("the response", "the user question")


def single_prompt(rubric: Rubric, item: Item) -> list[dict]:
    graded, _ = _what(item)
    reference = ("You are given a reference answer: the assistant must agree with it.\n" if item.reference else "")
    system = (f"Please act as an impartial judge and evaluate {graded} displayed below, as an AI assistant "
              f"produced it.\n{_rubric_text(rubric)}\n{reference}Scores:\n{_scale_text(rubric)}\n"
              "Begin your evaluation with a short explanation. Be as objective as possible. After your explanation, "
              f"rate it from {rubric.low} to {rubric.high} by strictly following this format: \"[[rating]]\", for "
              f"example: \"Rating: [[{rubric.high - 1}]]\". Write the double brackets only once.")
    parts = []
    if item.answer is None:
        parts.append(f"[The Start of Conversation]\n{_conversation_text(item.messages)}\n[The End of Conversation]")
    else:
        parts.append(f"[The Start of the Conversation so far]\n{_conversation_text(item.messages)}\n"
                     "[The End of the Conversation so far]")
    if item.reference:
        parts.append(f"[The Start of Reference Answer]\n{item.reference}\n[The End of Reference Answer]")
    if item.answer is not None:
        parts.append(f"[The Start of Assistant's Answer]\n{item.answer}\n[The End of Assistant's Answer]")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def pairwise_prompt(rubric: Rubric, first: Item, second: Item) -> list[dict]:
    graded, answered = _what(first)
    reference = ("You are given a reference answer: the better assistant agrees with it.\n" if first.reference else "")
    system = (f"Please act as an impartial judge and evaluate {graded} of two AI assistants, A and B, for "
              f"{answered} displayed below. Choose the assistant that does better by this rubric:\n"
              f"{_rubric_text(rubric)}\n{reference}"
              "Begin your evaluation by comparing the two and give a short explanation. Avoid any position biases "
              "and ensure that the order in which the responses were presented does not influence your decision. "
              "Do not allow the length of the responses to influence your evaluation. Be as objective as possible. "
              "After your explanation, output your final verdict by strictly following this format: \"[[A]]\" if "
              "assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.")
    parts = []
    if first.answer is None:
        for label, item in (("A", first), ("B", second)):
            parts.append(f"[The Start of Conversation with Assistant {label}]\n{_conversation_text(item.messages)}\n"
                         f"[The End of Conversation with Assistant {label}]")
    else:
        parts.append(f"[User Question]\n{_conversation_text(first.messages)}")
    if first.reference:
        parts.append(f"[The Start of Reference Answer]\n{first.reference}\n[The End of Reference Answer]")
    if first.answer is not None:
        for label, item in (("A", first), ("B", second)):
            parts.append(f"[The Start of Assistant {label}'s Answer]\n{item.answer}\n[The End of Assistant {label}'s Answer]")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


# --- strict parsing ------------------------------------------------------------------------------


def parse_rating(text: str, rubric: Rubric) -> tuple[int | None, str | None]:
    """(rating, None), or (None, why the text is not a verdict)."""
    value, problem = _one_verdict(text)
    if problem:
        return None, problem
    if not re.fullmatch(r"\d+", value):
        return None, f"[[{value}]] is not a whole-number rating"
    rating = int(value)
    if rating not in rubric.scale:
        return None, f"[[{rating}]] is outside the scale {rubric.low}..{rubric.high}"
    return rating, None


def parse_preference(text: str) -> tuple[str | None, str | None]:
    """('A' | 'B' | 'C', None), or (None, why the text is not a verdict)."""
    value, problem = _one_verdict(text)
    if problem:
        return None, problem
    if value not in ("A", "B", "C"):
        return None, f"[[{value}]] is not [[A]], [[B]] or [[C]]"
    return value, None


def _one_verdict(text: str) -> tuple[str, str | None]:
    found = {v.strip() for v in VERDICT.findall(text)}
    if not found:
        return "", "no verdict in double brackets"
    if len(found) > 1:
        return "", f"several different verdicts: {', '.join(f'[[{v}]]' for v in sorted(found))}"
    return found.pop(), None


# --- judges --------------------------------------------------------------------------------------


class Judge:
    """Grades items with a rubric: an LLM (a ChatModel) or a function."""

    def __init__(self, rubric: Rubric, *, model=None, function: Callable | None = None, spec: str = "",
                 retries: int = 2, temperature: float = 0.0, retry_temperature: float = 0.7, max_tokens: int = 512,
                 seed: int = 0, pass_threshold: float | None = None):
        self.rubric, self.model, self.function, self.spec = rubric, model, function, spec
        self.retries, self.temperature, self.retry_temperature = retries, temperature, retry_temperature
        self.max_tokens, self.seed = max_tokens, seed
        self.pass_threshold = rubric.pass_threshold if pass_threshold is None else pass_threshold
        self.kind = "function" if function is not None else "llm"

    def describe(self) -> dict[str, Any]:
        source = {"kind": "function", "function": self.spec} if self.function is not None else self.model.describe()
        return {"kind": self.kind, "rubric": self.rubric.name, "rubric_source": self.rubric.source,
                "pass_threshold": self.pass_threshold, "source": source}

    # single-answer grading

    def grade(self, item: Item) -> Grade:
        if self.rubric.needs_reference and not item.reference:
            return Grade(None, failure=f"the {self.rubric.name} rubric needs a reference answer; this item has none")
        if self.function is not None:
            return self._grade_with_function(item)
        rating, attempts, raw, problem = self._ask(single_prompt(self.rubric, item),
                                                   lambda text: parse_rating(text, self.rubric), item.key)
        if rating is None:
            return Grade(None, failure=problem, attempts=attempts, raw=raw)
        return Grade(self.rubric.normalize(rating), rating=rating, attempts=attempts)

    def _grade_with_function(self, item: Item) -> Grade:
        try:
            result = self.function(item.as_dict())
        except Exception as e:  # the rubric code's own failure on this item: counted, not fatal
            return Grade(None, failure=f"{self.spec} raised {type(e).__name__}: {e}", attempts=1)
        criteria = None
        if isinstance(result, dict):
            criteria = result
            values = list(result.values())
            result = sum(values) / len(values) if values and all(_unit(v) for v in values) else None
        if not _unit(result):
            return Grade(None, failure=f"{self.spec} returned {result!r}, not a score in 0..1 "
                                       "(or a dict of criterion scores in 0..1)", attempts=1)
        return Grade(float(result), criteria={k: float(v) for k, v in criteria.items()} if criteria else None, attempts=1)

    # pairwise grading

    def compare(self, a: Item, b: Item) -> PairVerdict:
        """Which of two answers to the same item is better: judged with a first, then b first."""
        if self.rubric.needs_reference and not a.reference:
            return PairVerdict(None, failure=f"the {self.rubric.name} rubric needs a reference answer; this item has none")
        if self.function is not None:
            # a function grades each answer on its own: the order cannot matter
            ga, gb = self._grade_with_function(a), self._grade_with_function(b)
            if ga.score is None or gb.score is None:
                return PairVerdict(None, failure=ga.failure or gb.failure, attempts=2)
            winner = "a" if ga.score > gb.score + 1e-12 else "b" if gb.score > ga.score + 1e-12 else "tie"
            letter = {"a": "A", "b": "B", "tie": "C"}[winner]
            return PairVerdict(winner, (letter, {"A": "B", "B": "A", "C": "C"}[letter]), attempts=2)
        first, n1, raw1, problem1 = self._ask(pairwise_prompt(self.rubric, a, b), parse_preference, f"{a.key}/ab")
        second, n2, raw2, problem2 = self._ask(pairwise_prompt(self.rubric, b, a), parse_preference, f"{a.key}/ba")
        if first is None or second is None:
            return PairVerdict(None, (first, second), failure=problem1 or problem2, attempts=n1 + n2,
                               raw=raw1 if first is None else raw2)
        winner_first = {"A": "a", "B": "b", "C": "tie"}[first]
        winner_second = {"A": "b", "B": "a", "C": "tie"}[second]
        if winner_first == winner_second:
            return PairVerdict(winner_first, (first, second), attempts=n1 + n2)
        return PairVerdict("tie", (first, second), inconsistent=True, attempts=n1 + n2)

    def _ask(self, messages: list[dict], parse, key: str) -> tuple[Any, int, str | None, str | None]:
        """(verdict, attempts, None, None) or (None, attempts, the last text, what was wrong)."""
        text, problem = "", ""
        for attempt in range(1 + self.retries):
            temperature = self.temperature if attempt == 0 else max(self.temperature, self.retry_temperature)
            text = self.model.chat(messages, max_tokens=self.max_tokens, temperature=temperature,
                                   seed=_seed(self.seed, key, attempt))
            value, problem = parse(text)
            if value is not None:
                return value, attempt + 1, None, None
        attempts = 1 + self.retries
        return None, attempts, text[:RAW_KEPT], f"unparseable verdict after {attempts} attempt(s): {problem}"


def _unit(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _seed(base: int, key: str, attempt: int) -> int:
    import xxhash

    return xxhash.xxh32_intdigest(f"{base}/{key}/{attempt}".encode()) & 0x7FFFFFFF


def make_judge(config, cfg, ws: Workspace, model=None, *, name: str = "judge") -> Judge:
    """The Judge for a JudgeConfig: its function, or the LLM `model` (a ChatModel opened from
    config.model by factory.endpoints)."""
    from factory.endpoints import load_function

    rubric = load_rubric(config.rubric, ws)
    common = dict(retries=config.retries, temperature=config.temperature, retry_temperature=config.retry_temperature,
                  max_tokens=config.max_tokens, seed=cfg.evaluation.compare.seed, pass_threshold=config.pass_threshold)
    if config.model.function:
        return Judge(rubric, function=load_function(config.model.function, what=name), spec=config.model.function,
                     **common)
    return Judge(rubric, model=model, **common)


def grade_answers(cfg, ws: Workspace, prompts: list[list[dict]], answers: list[str],
                  references: list[str | None]) -> tuple[list[float | None], dict[str, Any]]:
    """The evaluate phases' `judge` metric: every answer graded by evaluation.judge (its server,
    if it is a GGUF, runs for this call), concurrently; (scores, the judge's reliability)."""
    import logging
    from contextlib import ExitStack

    from factory.endpoints import EndpointSettings, open_models, run_concurrently

    settings = cfg.evaluation.compare
    connection = EndpointSettings(settings.request_timeout, settings.max_retries, settings.n_ctx,
                                  settings.startup_timeout, settings.threads)
    items = [Item(f"example-{i}", prompt, answer=answer, reference=reference)
             for i, (prompt, answer, reference) in enumerate(zip(prompts, answers, references))]
    config = cfg.evaluation.judge
    with ExitStack() as servers:
        model = None if config.model.function else \
            open_models({"judge": config.model}, cfg, ws, servers, connection, logging.getLogger("factory.judge"))["judge"]
        judge = make_judge(config, cfg, ws, model)
        grades = run_concurrently(items, judge.grade, concurrency=settings.concurrency)
    return [g.score for g in grades], reliability(judge, grades, keys=[item.key for item in items])


# --- what the metrics say about the judge ------------------------------------------------------


def reliability(judge: Judge, grades: list[Grade] | None = None, verdicts: list[PairVerdict] | None = None,
                keys: list[str] | None = None) -> dict[str, Any]:
    """Failure and inconsistency rates (gate metrics), with the failed verdicts' texts."""
    outcomes: list[Grade | PairVerdict] = list(grades or []) + list(verdicts or [])
    failed = [(k, o) for k, o in zip(keys or [""] * len(outcomes), outcomes) if o.failure]
    result: dict[str, Any] = {
        **judge.describe(),
        "verdicts": len(outcomes),
        "requests": sum(o.attempts for o in outcomes) if judge.kind == "llm" else 0,
        "retried": sum(1 for o in outcomes if judge.kind == "llm" and o.attempts > (2 if isinstance(o, PairVerdict) else 1)),
        "failures": len(failed),
        "failure_rate": len(failed) / len(outcomes) if outcomes else 1.0,
        "failed_examples": [{"key": k, "reason": o.failure, **({"text": o.raw} if o.raw is not None else {})}
                            for k, o in failed[:FAILED_SHOWN]],
    }
    if verdicts is not None:
        judged = [v for v in verdicts if v.failure is None]
        inconsistent = sum(1 for v in judged if v.inconsistent)
        result["inconsistent"] = inconsistent
        result["inconsistency_rate"] = inconsistent / len(judged) if judged else 1.0
    return result
