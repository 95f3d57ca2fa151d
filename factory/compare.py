"""The statistics of `factory compare`: several models, the same items, paired.

Per model: mean, standard deviation and pass rate of the judge's scores (single mode), or
wins, losses and ties (pairwise mode). Every pair of models: the paired comparison of the
evaluate phase (t-test, Wilcoxon, bootstrap interval of the mean difference) on the items
both were graded on, with p-values corrected for the number of comparisons by Holm's
step-down method. A breakdown by category (persona group, rubric criterion). Seed 002's
success criteria for every model against the baseline: improvement >= min_improvement,
Holm-corrected p < alpha, no safety regression.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from factory import scoring


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input's order.

    Sorted ascending, the i-th smallest (from 0) is multiplied by (m - i), capped at 1, and
    made non-decreasing: a hypothesis is rejected at level alpha exactly when its adjusted
    p-value is below alpha and Holm's step-down procedure rejects it.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def model_summary(scores: Sequence[float | None], pass_threshold: float) -> dict[str, Any]:
    import numpy as np

    graded = np.array([s for s in scores if s is not None], dtype=float)
    n = int(graded.size)
    return {
        "n": n,
        "failures": len(scores) - n,
        "mean": float(graded.mean()) if n else None,
        "sd": float(graded.std(ddof=1)) if n > 1 else None,
        "pass_rate": float((graded >= pass_threshold - 1e-12).mean()) if n else None,
        "min": float(graded.min()) if n else None,
        "max": float(graded.max()) if n else None,
    }


def paired(a: Sequence[float | None], b: Sequence[float | None], *, bootstrap: int, seed: int) -> dict[str, Any]:
    """The evaluate phase's paired comparison on the items both a and b have scores for;
    `improvement` is b - a. No pair: every statistic null."""
    stats = scoring.compare(a, b, bootstrap=bootstrap, seed=seed)
    stats.pop("significant")  # decided on the Holm-corrected p-value (with_holm)
    stats.setdefault("unpaired", 0)
    return {"mean_a": stats.pop("baseline"), "mean_b": stats.pop("finetuned"), **stats}


def preference_scores(winners: Sequence[str | None]) -> tuple[list[float | None], list[float | None]]:
    """Pairwise verdicts as paired scores: a win 1, a tie 0.5, a loss 0 (None: no verdict)."""
    b = [None if w is None else {"a": 0.0, "tie": 0.5, "b": 1.0}[w] for w in winners]
    return [None if s is None else 1.0 - s for s in b], b


def with_holm(comparisons: list[dict[str, Any]], alpha: float) -> list[dict[str, Any]]:
    tested = [c for c in comparisons if c["p_value"] is not None]
    for c, adjusted in zip(tested, holm([c["p_value"] for c in tested])):
        c["p_holm"] = adjusted
    for c in comparisons:
        c.setdefault("p_holm", None)
        c["significant"] = bool(c["p_holm"] is not None and c["p_holm"] < alpha)
    return comparisons


def breakdown(categories: Sequence[str | None], scores: dict[str, Sequence[float | None]], by: str) -> list[dict]:
    """Mean score of every model per category (items without a category are left out)."""
    rows = []
    for category in sorted({c for c in categories if c is not None}):
        per_model = {}
        for name, values in scores.items():
            chosen = [v for c, v in zip(categories, values) if c == category and v is not None]
            per_model[name] = {"n": len(chosen), "mean": sum(chosen) / len(chosen) if chosen else None}
        rows.append({"by": by, "category": category, "per_model": per_model})
    return rows


def criterion_breakdown(criteria: dict[str, Sequence[dict[str, float] | None]]) -> list[dict]:
    """Mean of each rubric criterion a function judge scored, per model."""
    names = sorted({k for values in criteria.values() for c in values if c for k in c})
    rows = []
    for criterion in names:
        per_model = {}
        for model, values in criteria.items():
            chosen = [c[criterion] for c in values if c and criterion in c]
            per_model[model] = {"n": len(chosen), "mean": sum(chosen) / len(chosen) if chosen else None}
        rows.append({"by": "criterion", "category": criterion, "per_model": per_model})
    return rows


def safety_regressions(baseline: Sequence[float | None], candidate: Sequence[float | None],
                       threshold: float) -> dict[str, Any]:
    """Items the baseline passed on safety and the candidate did not; the mean drop."""
    pairs = [(b, c) for b, c in zip(baseline, candidate) if b is not None and c is not None]
    regressions = sum(1 for b, c in pairs if b >= threshold - 1e-12 > c)
    drop = (sum(b for b, _ in pairs) - sum(c for _, c in pairs)) / len(pairs) if pairs else None
    return {"n": len(pairs), "regressions": regressions, "mean_drop": drop}


def success_criteria(comparisons: list[dict], baseline: str, candidates: list[str], safety: dict[str, dict] | None,
                     *, min_improvement: float, alpha: float) -> dict[str, Any]:
    """Seed 002's table, one row per model against the baseline."""
    rows = []
    for name in candidates:
        c = next(c for c in comparisons if {c["a"], c["b"]} == {baseline, name})
        sign = 1 if c["b"] == name else -1  # improvement of `name` over the baseline
        improvement = None if c["improvement"] is None else sign * c["improvement"]
        row = {
            "model": name,
            "improvement": improvement,
            "improvement_ok": improvement is not None and improvement >= min_improvement - 1e-12,
            "p_holm": c["p_holm"],
            "significant": bool(c["p_holm"] is not None and c["p_holm"] < alpha and (improvement or 0) > 0),
        }
        if safety is None:
            row["safety_regressions"] = None
            row["no_safety_regression"] = None  # not measured: said so, never taken as a pass
        else:
            row["safety_regressions"] = safety[name]["regressions"]
            row["safety_mean_drop"] = safety[name]["mean_drop"]
            row["no_safety_regression"] = safety[name]["n"] > 0 and safety[name]["regressions"] == 0
        row["passed"] = bool(row["improvement_ok"] and row["significant"] and row["no_safety_regression"] is not False)
        rows.append(row)
    passing = [r["model"] for r in rows if r["passed"]]
    return {"baseline": baseline, "min_improvement": min_improvement, "alpha": alpha,
            "safety_measured": safety is not None, "rows": rows, "passing_models": passing, "passed": bool(passing)}


def clean(value: Any) -> Any:
    """NaN and infinities as null: JSON has no place for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value
