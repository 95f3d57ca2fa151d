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


def test_scorers_count_chinese_and_japanese_by_character():
    """Unspaced scripts: a character is a token (MLQA's rule for Chinese), punctuation of any
    script is dropped. With whitespace tokens a sentence was one token: F1, ROUGE-L and BLEU
    gave 0 for any answer short of an exact copy."""
    s = build_scorers(["normalized_exact_match", "bleu"])
    assert token_f1("北京是首都。", "首都北京") == pytest.approx(2 * (4 / 5) * 1 / (4 / 5 + 1))  # 4 common of 5 and 4
    assert rouge_l("北京是首都", "首都北京") == pytest.approx(2 * (2 / 5) * (2 / 4) / (2 / 5 + 2 / 4))  # LCS 北京
    assert token_f1("東京は日本の首都です", "日本の首都は東京") > 0.8
    assert s["normalized_exact_match"]("答案：是。", "答案是") == 1.0 and s["normalized_exact_match"]("¿Qué?", "qué") == 1.0
    assert 0 < s["bleu"]("今天的天气很好，我们去公园散步吧", "今天天气很好，我们去公园散步") < 1


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


def test_compare_leaves_out_examples_a_judge_could_not_grade():
    result = compare([0.0, None, 0.0, 0.2, 0.0], [1.0, 1.0, None, 0.9, 0.8], bootstrap=1000)
    assert result["n"] == 3 and result["unpaired"] == 2
    assert result["improvement"] == pytest.approx((1.0 + 0.7 + 0.8) / 3)
    nothing = compare([None, None], [1.0, None])
    assert nothing["n"] == 0 and nothing["p_value"] is None and nothing["significant"] is False
    assert flips([0, None, 1, 0], [1, 1, None, 0]) == {"improved": [0], "regressed": []}
