"""The judge, personas and the comparison statistics without model servers: strict verdict
parsing with retries and counted failures, rubric files, rubric code, Holm's correction
checked against the step-down procedure itself, the seed's success criteria, personas."""

import itertools
import json
import random
import re

import pytest

from factory import compare, conversations, example
from factory.config import parse_config
from factory.endpoints import FunctionChat
from factory.errors import ConfigError, InputError
from factory.judge import Grade, Item, Judge, PairVerdict, load_rubric, parse_preference, parse_rating, reliability, rubric_names
from factory.workspace import Workspace


@pytest.fixture
def ws(tmp_path):
    return Workspace.at(tmp_path)


# --- rubrics and verdicts ---------------------------------------------------------------------


def test_shipped_rubrics_load_and_describe_every_score(ws):
    assert {"helpfulness", "correctness", "safety"} <= set(rubric_names())
    for name in rubric_names():
        rubric = load_rubric(name, ws)
        assert list(rubric.scale) == list(range(rubric.low, rubric.high + 1)) and all(rubric.scale.values())
        assert rubric.normalize(rubric.low) == 0 and rubric.normalize(rubric.high) == 1
    assert load_rubric("correctness", ws).needs_reference


def test_a_rubric_file_of_ones_own_and_its_errors(ws):
    (ws.root / "tone.yaml").write_text("name: tone\ndescription: Friendly.\nscale: {0: rude, 1: neutral, 2: warm}\npass_score: 2\n")
    rubric = load_rubric("tone.yaml", ws)
    assert rubric.pass_threshold == 1.0 and rubric.source == "tone.yaml"
    (ws.root / "bad.yaml").write_text("name: bad\ndescription: x\nscale: {1: a, 2: b}\npass_score: 2\nextra: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid rubric:\n  - extra: Extra inputs"):
        load_rubric("bad.yaml", ws)
    (ws.root / "gap.yaml").write_text("name: gap\ndescription: x\nscale: {1: a, 3: c}\npass_score: 3\n")
    with pytest.raises(ConfigError, match="consecutive whole scores"):
        load_rubric("gap.yaml", ws)
    with pytest.raises(ConfigError, match="neither a shipped rubric"):
        load_rubric("nope", ws)


@pytest.mark.parametrize("text, expected", [
    ("Good answer. Rating: [[4]]", (4, None)),
    ("[[5]] ... so, Rating: [[5]]", (5, None)),  # the same verdict twice is one verdict
    ("Rating: [[ 3 ]]", (3, None)),
])
def test_ratings_parse(ws, text, expected):
    assert parse_rating(text, load_rubric("helpfulness", ws)) == expected


@pytest.mark.parametrize("text, problem", [
    ("I think it deserves a 4.", "no verdict"),
    ("Rating: [[rating]] then [[4]]", "several different verdicts"),
    ("Rating: [[4.5]]", "not a whole-number"),
    ("Rating: [[9]]", "outside the scale 1..5"),
    ("", "no verdict"),
])
def test_unparseable_ratings_say_why(ws, text, problem):
    rating, why = parse_rating(text, load_rubric("helpfulness", ws))
    assert rating is None and problem in why


def test_preferences_parse_strictly():
    assert parse_preference("B is better. [[B]]") == ("B", None)
    assert parse_preference("[[C]]") == ("C", None)
    assert parse_preference("[[A]] or maybe [[B]]")[0] is None
    assert "not [[A]], [[B]] or [[C]]" in parse_preference("[[tie]]")[1]


# --- an LLM judge's retries and failures, with a rule-based model standing in for the LLM --------


class Scripted:
    """Answers from a list, in order; records what it was asked (a model of the ChatModel kind)."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, messages):
        self.calls.append(messages)
        return self.answers.pop(0)


def llm_judge(ws, answers, **kwargs):
    script = Scripted(answers)
    chat = FunctionChat("judge", "json:dumps")
    chat.function = script
    return Judge(load_rubric(kwargs.pop("rubric", "helpfulness"), ws), model=chat, **kwargs), script


ITEM = Item("q1", [{"role": "user", "content": "What is 2 + 2?"}], answer="4", reference="4")


def test_unparseable_verdict_is_retried_then_parsed(ws):
    judge, script = llm_judge(ws, ["no idea", "Rating: [[5]]"], retries=2)
    grade = judge.grade(ITEM)
    assert grade.score == 1.0 and grade.rating == 5 and grade.attempts == 2 and len(script.calls) == 2
    system, user = script.calls[0]
    assert "1: Unhelpful" in system["content"] and "[[rating]]" in system["content"]
    assert "What is 2 + 2?" in user["content"] and "[The Start of Assistant's Answer]\n4" in user["content"]


def test_a_verdict_that_never_parses_is_a_counted_failure_with_its_text(ws):
    judge, script = llm_judge(ws, ["ccccc", "Rating: 4", "[[great]]"], retries=2)
    grade = judge.grade(ITEM)
    assert grade.score is None and grade.attempts == 3 and len(script.calls) == 3
    assert "unparseable verdict after 3 attempt(s)" in grade.failure and grade.raw == "[[great]]"
    stats = reliability(judge, [grade, Grade(0.5, rating=3, attempts=1)], keys=["a", "b"])
    assert stats["failures"] == 1 and stats["failure_rate"] == 0.5 and stats["requests"] == 4 and stats["failed_examples"][0]["text"] == "[[great]]"


def test_reference_rubric_without_reference_fails_without_asking(ws):
    judge, script = llm_judge(ws, [], rubric="correctness")
    grade = judge.grade(Item("q", [{"role": "user", "content": "hi"}], answer="hello"))
    assert grade.score is None and "needs a reference" in grade.failure and script.calls == []


def test_pairwise_is_judged_in_both_orders_and_a_flip_is_an_inconsistent_tie(ws):
    a = Item("q1", ITEM.messages, answer="4")
    b = Item("q1", ITEM.messages, answer="5")
    # consistent: a wins when first ([[A]]) and when second ([[B]])
    judge, script = llm_judge(ws, ["[[A]]", "[[B]]"])
    verdict = judge.compare(a, b)
    assert verdict.winner == "a" and not verdict.inconsistent and verdict.orders == ("A", "B")
    first, second = script.calls[0][1]["content"], script.calls[1][1]["content"]
    assert first.index("Assistant A's Answer]\n4") < first.index("Assistant B's Answer]\n5")
    assert second.index("Assistant A's Answer]\n5") < second.index("Assistant B's Answer]\n4")
    # position bias: "A" both times
    judge, _ = llm_judge(ws, ["[[A]]", "[[A]]"])
    verdict = judge.compare(a, b)
    assert verdict.winner == "tie" and verdict.inconsistent
    stats = reliability(judge, verdicts=[verdict, PairVerdict("a", ("A", "B"), attempts=2)], keys=["x", "y"])
    assert stats["inconsistent"] == 1 and stats["inconsistency_rate"] == 0.5 and stats["failure_rate"] == 0.0
    # a failure in one order is a failure of the pair, not a guess
    judge, _ = llm_judge(ws, ["[[A]]", "hmm", "hmm"], retries=1)
    verdict = judge.compare(a, b)
    assert verdict.winner is None and "unparseable" in verdict.failure


def test_rubric_code_scores_criteria_and_its_failures_are_counted(ws):
    rubric = load_rubric("correctness", ws)
    records = example.generate_task_records(3, seed=5)
    right = Item("e0", [{"role": "user", "content": records[0]["input"]}], answer=records[0]["output"], reference=records[0]["output"])
    date_only = records[1]["output"].split(" | ")[0] + " | 0,00 X"
    half = Item("e1", [{"role": "user", "content": records[1]["input"]}], answer=date_only, reference=records[1]["output"])
    judge = Judge(rubric, function=example.judge, spec="factory.example:judge")
    assert judge.grade(right).score == 1.0 and judge.grade(right).criteria == {"date": 1.0, "amount": 1.0}
    assert judge.grade(half).criteria == {"date": 1.0, "amount": 0.0} and judge.grade(half).score == 0.5
    # a whole conversation: each user request with the reply after it
    transcript = [{"role": "user", "content": records[0]["input"]}, {"role": "assistant", "content": records[0]["output"]},
                  {"role": "user", "content": records[2]["input"]}, {"role": "assistant", "content": "no idea"}]
    grade = judge.grade(Item("p/0", transcript, reference="refs"))
    assert grade.criteria == {"date": 0.5, "amount": 0.5}
    # nothing of the task in it: the code raises, the judge counts a failure
    grade = judge.grade(Item("p/1", [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}], reference="r"))
    assert grade.score is None and "no request of the localization task" in grade.failure
    out_of_range = Judge(rubric, function=lambda item: 3, spec="m:f").grade(right)
    assert out_of_range.score is None and "not a score in 0..1" in out_of_range.failure


# --- statistics ------------------------------------------------------------------------------


def step_down_rejections(p_values, alpha):
    """Holm's procedure as written: reject the smallest p while p_(k) <= alpha / (m - k)."""
    m = len(p_values)
    rejected = set()
    for k, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        if p_values[i] > alpha / (m - k):
            break
        rejected.add(i)
    return rejected


def test_holm_matches_the_step_down_procedure_and_a_worked_example():
    assert compare.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = random.Random(0)
    for _ in range(300):
        p = [rng.random() ** rng.choice([1, 3, 6]) for _ in range(rng.randint(1, 7))]
        adjusted = compare.holm(p)
        assert all(a >= x for a, x in zip(adjusted, p)) and all(a <= 1 for a in adjusted)
        for alpha in (0.01, 0.05, 0.2):
            assert {i for i, a in enumerate(adjusted) if a <= alpha} == step_down_rejections(p, alpha)


def test_paired_statistics_skip_unjudged_items_and_the_success_table():
    base = [0.0, 0.2, 0.0, None, 0.1, 0.0, 0.1, 0.0]
    tuned = [0.9, 1.0, 0.8, 1.0, None, 0.7, 1.0, 0.9]
    summary = compare.model_summary(tuned, pass_threshold=0.8)
    assert summary["n"] == 7 and summary["failures"] == 1 and summary["pass_rate"] == pytest.approx(6 / 7)  # 0.7 is the one below 0.8
    result = compare.paired(base, tuned, bootstrap=2000, seed=0)
    assert result["n"] == 6 and result["unpaired"] == 2
    assert result["improvement"] == pytest.approx((0.9 + 0.8 + 0.8 + 0.7 + 0.9 + 0.9) / 6)
    other = compare.paired(base, [0.0] * 8, bootstrap=2000, seed=0)
    comparisons = compare.with_holm([{"a": "base", "b": "tuned", **result}, {"a": "base", "b": "other", **other}], 0.05)
    assert comparisons[0]["p_holm"] == pytest.approx(min(1, 2 * result["p_value"]))
    safety = {"tuned": compare.safety_regressions([1, 1, 1], [1, 0.5, 1], threshold=0.75),
              "other": compare.safety_regressions([1, 1, 1], [1, 1, 1], threshold=0.75)}
    table = compare.success_criteria(comparisons, "base", ["tuned", "other"], safety, min_improvement=0.1, alpha=0.05)
    tuned_row, other_row = table["rows"]
    assert tuned_row["improvement_ok"] and tuned_row["significant"] and tuned_row["safety_regressions"] == 1
    assert not tuned_row["passed"] and not tuned_row["no_safety_regression"]  # better, but less safe
    assert not other_row["improvement_ok"] and not other_row["passed"] and not table["passed"]
    unmeasured = compare.success_criteria(comparisons, "base", ["tuned"], None, min_improvement=0.1, alpha=0.05)
    assert unmeasured["rows"][0]["no_safety_regression"] is None and unmeasured["passed"]


def test_pairwise_preferences_as_paired_scores():
    a, b = compare.preference_scores(["b", "b", "tie", "a", None])
    assert b == [1.0, 1.0, 0.5, 0.0, None] and a == [0.0, 0.0, 0.5, 1.0, None]
    result = compare.paired(a, b, bootstrap=1000, seed=0)
    assert result["improvement"] == pytest.approx((1 + 1 + 0 - 1) / 4)  # (wins - losses) / n


# --- personas ----------------------------------------------------------------------------------


def test_generated_personas_are_reproducible_from_their_seed_range_and_use_held_out_prompts():
    records = [{"conversations": [{"role": "system", "content": "Sys."}, {"role": "user", "content": f"q{i}"},
                                  {"role": "assistant", "content": f"a{i}"}]} for i in range(40)]
    personas = conversations.generate_personas(records, count=15, per_persona=3, requests=2, first_seed=9000)
    again = conversations.generate_personas(records, count=15, per_persona=3, requests=2, first_seed=9000)
    assert [p.model_dump() for p in personas] == [p.model_dump() for p in again]
    assert [p.seed for p in personas] == list(range(9000, 9015)) and len({p.id for p in personas}) == 15
    for p in personas:
        assert p.system == "Sys." and p.group in conversations.STYLES and len(p.conversations) == 3
        asked = [r.text for c in p.conversations for r in c.requests]
        assert len(asked) == 6 == len(set(asked))  # no request twice within a persona
        assert all(r.reference == "a" + r.text[1:] for c in p.conversations for r in c.requests)
    shifted = conversations.generate_personas(records, count=15, per_persona=3, requests=2, first_seed=9001)
    assert shifted[0].model_dump() == personas[1].model_dump()


def test_scripted_user_asks_each_request_once_then_stops():
    plan = {"goal": "g", "requests": [{"text": "r1"}, {"text": "r2"}]}
    transcript = []
    said = []
    while (message := conversations.scripted_user({}, plan, transcript, "<STOP>")) != "<STOP>":
        said.append(message)
        transcript += [{"role": "user", "content": message}, {"role": "assistant", "content": "ok"}]
    assert said == ["r1", "r2"]


def test_a_personas_file_is_validated_whole(ws):
    path = ws.root / "personas.json"
    path.write_text(json.dumps([{"id": "p1", "description": "A nurse.", "goal": "Find a shift plan."},
                                {"id": "p1", "description": "dup", "goal": "x"},
                                {"id": "p3", "description": "No goal."},
                                {"name": "no id", "description": "d", "goal": "g", "mood": "odd"}]))
    with pytest.raises(InputError) as e:
        conversations.read_personas_file(path, ws)
    message = str(e.value)
    assert "persona id 'p1' appears more than once" in message and "[2]: give a `goal`" in message
    assert "[3].id" in message and "[3].mood" in message
    path.write_text(json.dumps([{"id": "p1", "description": "A nurse.", "goal": "Find a shift plan.", "group": "health"}]))
    (persona,) = conversations.read_personas_file(path, ws)
    assert conversations.conversation_plan(persona, 2).goal == "Find a shift plan."


def test_conversation_seeds_depend_on_persona_and_index_only():
    records = [{"conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
               for i in range(10)]
    p, q = conversations.generate_personas(records, count=2, per_persona=2, requests=1, first_seed=9000)
    seeds = {conversations.conversation_seed(0, x, k) for x, k in itertools.product((p, q), (0, 1))}
    assert len(seeds) == 4 and conversations.conversation_seed(0, p, 1) == conversations.conversation_seed(0, p, 1)


# --- config ---------------------------------------------------------------------------------------


def test_model_sources_from_strings_and_their_errors():
    cfg = parse_config({"evaluation": {
        "judge": {"rubric": "safety", "model": "http://127.0.0.1:9/v1"},
        "compare": {"models": ["base=models/base", "ft=models/quantized/model-Q8_0.gguf",
                               {"name": "api", "base_url": "https://example.invalid/v1", "model": "m",
                                "api_key_env": "MY_KEY"}, "rules=my_rules:answer"], "baseline": "ft"}}})
    kinds = [(m.name, m.hf, m.gguf, m.base_url, m.function) for m in cfg.evaluation.compare.models]
    assert kinds == [("base", "models/base", None, None, None), ("ft", None, "models/quantized/model-Q8_0.gguf", None, None),
                     ("api", None, None, "https://example.invalid/v1", None), ("rules", None, None, None, "my_rules:answer")]
    assert cfg.evaluation.judge.model.base_url == "http://127.0.0.1:9/v1"
    assert cfg.evaluation.conversations.simulator.function == "factory.conversations:scripted_user"
    with pytest.raises(ConfigError) as e:
        parse_config({"evaluation": {"compare": {"models": ["a=x.gguf", "a=y.gguf", "zz", {"name": "b", "gguf": "g",
                                                                                            "base_url": "u"}]}}})
    message = str(e.value)
    assert "models.2: write a model as NAME=SOURCE" in message and "got gguf, base_url" in message
    for section, problem in (({"compare": {"models": ["a=x.gguf", "a=y.gguf"]}}, "repeated: a"),
                             ({"compare": {"models": ["a=x.gguf", "b=y.gguf"], "baseline": "q"}}, "baseline 'q' is not one"),
                             ({"metrics": ["judge"], "primary": "judge"}, "metrics has judge: set `judge`"),
                             ({"judge": {"rubric": "helpfulness"}}, "evaluation.judge.model: Field required")):
        with pytest.raises(ConfigError, match=re.escape(problem)):
            parse_config({"evaluation": section})


# --- the commands' input errors (no model needed) ------------------------------------------------


def run_factory(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)


def test_compare_and_serve_model_input_errors_exit_2(tmp_path):
    ws = tmp_path / "ws"
    assert run_factory("init", ws).returncode == 0
    proc = run_factory("compare", "-C", ws, "-m", "a=a.gguf", "-m", "b=b.gguf")
    assert proc.returncode == 2 and "factory compare needs evaluation.judge" in proc.stderr
    proc = run_factory("compare", "-C", ws, "-m", "a.gguf")
    assert proc.returncode == 2 and "write a model as NAME=SOURCE" in proc.stderr
    proc = run_factory("serve-model", "missing.gguf", "-C", ws)
    assert proc.returncode == 2 and "neither a GGUF file nor a Hugging Face model folder" in proc.stderr
    status = json.loads((ws / ".factory" / "status.json").read_text())  # the first one got as far as the phase
    phase = next(p for p in status["phases"] if p["name"] == "compare")
    assert status["state"] == "failed" and phase["state"] == "failed" and phase["error"]["type"] == "ConfigError"


def test_run_concurrently_keeps_order_reports_each_completion_and_stops_at_the_first_error():
    import threading
    import time

    from factory.endpoints import run_concurrently

    ticks, active, peak, lock = [], [0], [0], threading.Lock()

    def work(i):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02 * (i % 3))
        with lock:
            active[0] -= 1
        return i * i

    assert run_concurrently(range(12), work, concurrency=3, on_done=lambda n: ticks.append(time.monotonic())) == \
        [i * i for i in range(12)]
    assert len(ticks) == 12 and peak[0] == 3 and ticks[-1] - ticks[0] > 0.05  # ticked as they finished
    started = []

    def fail_at_two(i):
        started.append(i)
        if i == 2:
            raise ValueError("boom")
        time.sleep(0.05)
        return i

    with pytest.raises(ValueError, match="boom"):
        run_concurrently(range(50), fail_at_two, concurrency=2)
    assert len(started) < 50  # the queued rest was cancelled
