"""Scorers and the paired statistics against hand-computed values and scipy directly."""

import pytest
from scipy import stats

from factory.scoring import build_scorers, compare, flips, regex_match, rouge_l, token_f1


def test_builtin_scorers():
    s = build_scorers(["exact_match", "normalized_exact_match", "token_f1", "rouge_l", "bleu", "chrf", "json_valid"])
    assert s["exact_match"](" 07.03.2024 ", "07.03.2024") == 1.0
    assert s["exact_match"]("07.03.2024.", "07.03.2024") == 0.0
    assert s["normalized_exact_match"]("The Answer!", "answer") == 1.0
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)  # p=1, r=2/3
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))
    assert s["bleu"]("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert 0 < s["chrf"]("the cat sat", "the cat sits") < 1
    assert s["json_valid"]('{"a": 1}', "") == 1.0 and s["json_valid"]("{a: 1}", "") == 0.0


def test_regex_scorer_extracts_gsm8k_answers():
    score = regex_match(r"####\s*(-?[\d,\.]+)")
    assert score("so 3 + 4 = 7\n#### 1,234", "work...\n#### 1234") == 1.0
    assert score("#### 12.", "#### 12") == 1.0
    assert score("no final answer", "#### 3") == 0.0
    assert score("#### 4", "#### 3") == 0.0


def test_custom_scorer_module_function():
    scorer = build_scorers(["custom"], custom="operator:eq")["custom"]
    assert scorer("x", "x") == 1.0 and scorer("x", "y") == 0.0
    with pytest.raises(ValueError, match="module:function"):
        build_scorers(["custom"], custom="nocolon")
    with pytest.raises(ValueError, match="regex"):
        build_scorers(["regex_match"])


def test_compare_matches_scipy_and_reports_ci():
    base = [0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
    tuned = [1, 1, 1, 1, 0, 1, 1, 1, 0, 1]
    result = compare(base, tuned, seed=1)
    assert result["improvement"] == pytest.approx(0.6)
    assert result["test"] == "mcnemar_exact"  # 0/1 scores: 6 discordant pairs, all improved
    assert result["p_value"] == pytest.approx(stats.binomtest(6, 6, 0.5).pvalue)
    assert result["wilcoxon_p_value"] == pytest.approx(stats.wilcoxon(tuned, base).pvalue)
    low, high = result["ci95"]
    assert low <= 0.6 <= high and low > 0
    assert result["significant"] is True
    assert flips(base, tuned) == {"improved": [0, 1, 3, 5, 7, 9], "regressed": []}
    # five of ten is not enough for McNemar's exact test (p = 2 / 2**5), though a t-test says p = 0.01
    assert compare(base[:9] + [1], tuned, seed=1)["significant"] is False


def test_compare_degenerate_cases():
    assert compare([0] * 6, [0] * 6)["p_value"] == 1.0
    assert compare([0] * 6, [1] * 6)["p_value"] == pytest.approx(2 / 2**6)  # never 0 on a finite sample
    with pytest.raises(ValueError, match="same non-zero length"):
        compare([1, 0], [1])
