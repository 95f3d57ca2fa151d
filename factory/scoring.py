"""Per-example scorers and the paired comparison of two models on the same examples.

Every scorer maps (prediction, reference) to a number in [0, 1], so that per-example
scores of the base and fine-tuned models can be compared pairwise (seed 002): McNemar's
exact test for 0/1 scores, the paired t-test for continuous ones.
"""

from __future__ import annotations

import importlib
import re
import string
import unicodedata
from collections import Counter
from typing import Any, Callable, Sequence

Scorer = Callable[[str, str], float]

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lower case, no punctuation or symbols (of any script, as
    MLQA's), no English articles, single spaces."""
    text = text.lower()
    if text.isascii():
        text = text.translate(_PUNCT)  # ASCII's punctuation and symbols: string.punctuation
    else:
        text = "".join(c for c in text if unicodedata.category(c)[0] not in "PS")
    return " ".join(_ARTICLES.sub(" ", text).split())


def words(text: str) -> list[str]:
    """Whitespace tokens, each character of Chinese, Japanese, Thai and other scripts written
    without spaces being one (as MLQA scores Chinese): a sentence there is otherwise one token,
    and token F1 or ROUGE-L can only say 0 or 1."""
    from factory.textsim import space_out

    return space_out(text).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalized_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = words(normalize_answer(prediction)), words(normalize_answer(reference))
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over `words` (longest common subsequence)."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu(prediction: str, reference: str) -> float:
    import sacrebleu

    from factory.textsim import space_out

    # sacrebleu's default tokenizer (13a) splits on spaces: unspaced scripts go in as characters
    return min(1.0, sacrebleu.sentence_bleu(space_out(prediction), [space_out(reference)]).score / 100.0)


def chrf(prediction: str, reference: str) -> float:
    import sacrebleu

    return min(1.0, sacrebleu.sentence_chrf(prediction, [reference]).score / 100.0)


def json_valid(prediction: str, reference: str) -> float:
    import json

    try:
        json.loads(prediction)
    except ValueError:
        return 0.0
    return 1.0


def regex_match(pattern: str) -> Scorer:
    """Extract the first group of `pattern` from both texts and compare (numbers numerically).

    The GSM8K convention: `#### (-?[\\d,.]+)` pulls the final answer out of a worked solution.
    A prediction with no match scores 0.
    """
    compiled = re.compile(pattern)

    def extract(text: str) -> str | None:
        match = compiled.search(text)
        if not match:
            return None
        value = (match.group(1) if compiled.groups else match.group(0)).strip()
        number = value.replace(",", "").rstrip(".")
        try:
            return repr(float(number))
        except ValueError:
            return value

    def score(prediction: str, reference: str) -> float:
        expected = extract(reference)
        if expected is None:
            expected = reference.strip()
        got = extract(prediction)
        return float(got is not None and got == expected)

    return score


BUILTIN: dict[str, Scorer] = {
    "exact_match": exact_match,
    "normalized_exact_match": normalized_exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "bleu": bleu,
    "chrf": chrf,
    "json_valid": json_valid,
}


def build_scorers(names: Sequence[str], regex: str | None = None, custom: str | None = None) -> dict[str, Scorer]:
    """The scorers named in the config. `regex_match` needs `regex`; `custom` is module:function."""
    scorers: dict[str, Scorer] = {}
    for name in names:
        if name == "regex_match":
            if not regex:
                raise ValueError("evaluation.metrics has regex_match but evaluation.regex is not set")
            scorers[name] = regex_match(regex)
        elif name == "custom":
            scorers[name] = load_custom(custom)
        else:
            scorers[name] = BUILTIN[name]
    return scorers


def load_custom(spec: str | None) -> Scorer:
    """Import a scorer given as 'module:function' (the module must be importable)."""
    if not spec or ":" not in spec:
        raise ValueError(f"evaluation.custom_scorer must be 'module:function', got {spec!r}")
    module_name, function_name = spec.split(":", 1)
    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise ValueError(f"evaluation.custom_scorer: {spec!r} is not a function")
    return lambda prediction, reference: float(function(prediction, reference))


# --- paired comparison -------------------------------------------------------------------


BOOTSTRAP_BATCH_VALUES = 1 << 22  # resampled values held at once (32 MB of float64), whatever n is


def compare(baseline: Sequence[float], finetuned: Sequence[float], *, bootstrap: int = 10_000,
            seed: int = 0) -> dict[str, Any]:
    """Paired comparison of per-example scores on the same examples (seed 002).

    Improvement (absolute and relative), the paired test (`test`, `p_value`), Wilcoxon
    signed-rank, and a bootstrap 95% confidence interval of the mean difference.

    The paired test: McNemar's exact test when every score is 0 or 1 (exact match, regex
    match, JSON validity): a two-sided binomial test on the discordant pairs; the paired
    t-test otherwise. When the differences have zero variance the t statistic is undefined
    and the exact sign test stands in (p = 1 for identical scores, 2 / 2**n for a constant
    shift on all n examples), so no finite sample ever gives p = 0.

    An example without a score on either side (None: a judge's verdict that failed) is left
    out and counted as `unpaired`; with no pair left every statistic is None and nothing is
    significant.
    """
    import numpy as np
    from scipy import stats

    if len(baseline) != len(finetuned) or not len(baseline):
        raise ValueError(f"paired scores must have the same non-zero length ({len(baseline)} vs {len(finetuned)})")
    pairs = [(b, f) for b, f in zip(baseline, finetuned) if b is not None and f is not None]
    unpaired = {"unpaired": len(baseline) - len(pairs)} if len(pairs) < len(baseline) else {}
    if not pairs:
        return {"n": 0, **unpaired, "baseline": None, "finetuned": None, "improvement": None, "relative_improvement": None,
                "test": None, "test_name": None, "p_value": None, "wilcoxon_p_value": None, "ci95": None,
                "significant": False}
    base = np.asarray([b for b, _ in pairs], dtype=float)
    tuned = np.asarray([f for _, f in pairs], dtype=float)
    diff = tuned - base
    base_mean, tuned_mean = float(base.mean()), float(tuned.mean())
    result: dict[str, Any] = {
        "n": int(base.size),
        **unpaired,
        "baseline": base_mean,
        "finetuned": tuned_mean,
        "improvement": tuned_mean - base_mean,
        "relative_improvement": (tuned_mean - base_mean) / base_mean if base_mean else None,
    }
    improved, regressed = int((diff > 0).sum()), int((diff < 0).sum())
    if np.isin(base, (0.0, 1.0)).all() and np.isin(tuned, (0.0, 1.0)).all():
        result["test"] = "mcnemar_exact"
        result["discordant"] = {"improved": improved, "regressed": regressed}
        result["p_value"] = _sign_test(improved, regressed)
    elif np.allclose(diff, diff[0]):
        result["test"] = "sign_test"
        result["test_note"] = "the differences have zero variance (no t statistic): exact sign test instead"
        result["p_value"] = _sign_test(improved, regressed)
    else:
        t = stats.ttest_rel(tuned, base)
        result["test"] = "paired_t"
        result["t_statistic"] = float(t.statistic)
        result["p_value"] = float(t.pvalue)
    if improved or regressed:
        w = stats.wilcoxon(tuned, base, zero_method="wilcox")
        result["wilcoxon_p_value"] = float(w.pvalue)
    else:
        result["wilcoxon_p_value"] = 1.0
    result["ci95"] = bootstrap_ci95(diff, resamples=bootstrap, seed=seed)
    result["test_name"] = TEST_NAMES[result["test"]]
    result["significant"] = bool(result["p_value"] < 0.05 and result["improvement"] > 0)
    return result


TEST_NAMES = {"mcnemar_exact": "McNemar's exact test", "paired_t": "paired t-test", "sign_test": "exact sign test"}


def _sign_test(up: int, down: int) -> float:
    """Two-sided exact binomial test of up vs down counts at p = 1/2 (McNemar's exact test
    on discordant pairs; the sign test on non-zero differences). No discordance: p = 1."""
    from scipy import stats

    return float(stats.binomtest(up, up + down, 0.5).pvalue) if up + down else 1.0


def bootstrap_ci95(diff: np.ndarray, *, resamples: int, seed: int) -> list[float]:
    """Percentile bootstrap 95% interval of the mean of `diff`, resampled in batches so that
    memory stays bounded (BOOTSTRAP_BATCH_VALUES) at any number of examples."""
    import numpy as np
    from scipy import stats

    found = stats.bootstrap((diff,), np.mean, n_resamples=resamples, batch=max(1, BOOTSTRAP_BATCH_VALUES // diff.size),
                            method="percentile", confidence_level=0.95, rng=np.random.default_rng(seed))
    return [float(found.confidence_interval.low), float(found.confidence_interval.high)]


def flips(baseline: Sequence[float], finetuned: Sequence[float]) -> dict[str, list[int]]:
    """Indices of examples whose score went up (improved) or down (regressed); examples
    without a score on either side are neither."""
    pairs = [(i, b, f) for i, (b, f) in enumerate(zip(baseline, finetuned)) if b is not None and f is not None]
    improved = [i for i, b, f in pairs if f > b + 1e-12]
    regressed = [i for i, b, f in pairs if f < b - 1e-12]
    return {"improved": improved, "regressed": regressed}

