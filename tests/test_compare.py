"""`factory compare` and `factory serve-model` for real: the example's base and fine-tuned GGUFs
served by llama-cpp-python's server on ports of 127.0.0.1, conversations with simulated users,
rubric code and an LLM judge served from a GGUF, an endpoint behind an API key, base + adapter
in process, and every way a model server fails: it cannot start, its port is taken, it does
not answer in time, it dies mid-run."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import yaml

from factory.example import localize
from factory.resources import validate
from test_dashboard_browser import browser  # noqa: F401  (the headless chromium fixture)

pytestmark = pytest.mark.slow
# One torch thread: with other processes on a 2-core machine, two spinning threads trained the
# example at 0.05 steps/s against 1.1 with one (measured here, batch 16).
ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
REQUEST = re.compile(r"Locale: (\S+)\. Date: (\S+)\. Amount: (\S+) (\S+)\.")


def factory(*args, check_rc=None, env=None, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def read(ws, relative):
    return json.loads((ws / relative).read_text())


def servers_of(ws) -> list[psutil.Process]:
    """llama.cpp servers still running for files of this workspace."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "factory.llama_server" in cmdline and str(ws) in cmdline:
            found.append(p)
    return found


def port_open(url: str) -> bool:
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def set_config(ws, **evaluation):
    config = yaml.safe_load((ws / "factory.yaml").read_text())
    for key, value in evaluation.items():
        config["evaluation"][key] = value
    (ws / "factory.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo's example, the quick variant (3 locales, 720 steps), through quantize (one GGUF,
    Q8_0, checked on 20 test examples); the baseline and evaluate phases are left to the test
    that needs them. With 480 steps the fine-tune's exact match on the test split was 0.17 to
    0.63 over split seeds 3404-3409, so these tests passed or failed with the split's draw;
    720 steps gave 0.83 and 0.96 on the two worst draws measured (see BENCHMARKS.md)."""
    root = tmp_path_factory.mktemp("compare") / "ws"
    factory("init", "--example", root, "--locales", "en-US,de-DE,ja-JP", "--records", 1500, "--steps", 720, check_rc=0)
    config = (root / "factory.yaml").read_text().replace("gguf_quantization: [Q8_0, Q4_K_M]", "gguf_quantization: [Q8_0]")
    (root / "factory.yaml").write_text(config)
    set_config(root, max_examples=20)
    factory("run", "split", "-C", root, check_rc=0)
    factory("run", "--only", "finetune", "-C", root)  # the gates may say what they like: the adapter is what counts
    assert (root / "models" / "checkpoints" / "lora" / "adapter_config.json").exists()
    factory("run", "--only", "quantize", "-C", root)
    assert (root / "models" / "quantized" / "model-Q8_0.gguf").is_file()
    return root


@pytest.fixture
def copy(trained, tmp_path):
    """A copy of the trained workspace whose factory.yaml a test may change."""
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws, ignore=shutil.ignore_patterns("outputs", "run.lock", "eval", "report*", "comparison.json",
                                                           "compare.json", "model-comparison.json"))
    return ws


def right_answers(transcript: dict) -> int:
    """Replies that are exactly the reference implementation's answer to the request before them."""
    count = 0
    messages = transcript["messages"]
    for user, reply in zip(messages[::2], messages[1::2]):
        locale, date, amount, currency = REQUEST.search(user["content"]).groups()
        count += reply["content"].strip() == localize(locale, date, amount, currency)
    return count


# --- the documented command, and the fine-tuned model winning -----------------------------------


def test_the_documented_command_compares_base_and_fine_tuned_in_conversations(trained):
    started = time.monotonic()
    proc = factory("compare", "-C", trained, check_rc=0)
    seconds = time.monotonic() - started
    c = read(trained, "metrics/comparison.json")
    validate(c, "comparison")
    assert c["task"] == "conversations" and c["mode"] == "single" and c["baseline"] == "base"
    assert [m["source"]["kind"] for m in c["models"]] == ["gguf", "gguf"]
    assert c["models"][0]["source"]["gguf"].endswith("models/gguf/base-F16.gguf")  # model.name, converted once
    assert c["personas"]["count"] == 15 and c["personas"]["per_persona"] == 3 and c["personas"]["seeds"] == [9000, 9014]
    assert c["items_per_model"] == 45 and c["judge"]["kind"] == "function" and c["judge"]["failure_rate"] == 0

    # transcripts: every persona's conversations with each model, paired by persona and index,
    # the same simulated user's first message for both models
    transcripts = {name: [json.loads(line) for line in (trained / path).read_text().splitlines()]
                   for name, path in c["transcripts"].items()}
    base, tuned = transcripts["base"], transcripts["fine-tuned"]
    assert len(base) == len(tuned) == 45
    for b, t in zip(base, tuned):
        assert (b["persona"], b["conversation"], b["seed"]) == (t["persona"], t["conversation"], t["seed"])
        assert b["messages"][0] == t["messages"][0] and b["stopped_by"] == t["stopped_by"] == "stop_token"
        assert b["user_turns"] == t["user_turns"] == 2 and b["system"] == "Format the date and amount for the locale."
    train = (trained / "data" / "splits" / "train.jsonl").read_text()
    assert not any(m["content"] in train for t in tuned for m in t["messages"] if m["role"] == "user")

    # the judge's means, measured independently on the raw transcripts
    for name, rows in transcripts.items():
        model_row = next(r for r in c["per_model"] if r["name"] == name)
        assert model_row["n"] == 45
        exact = sum(right_answers(t) for t in rows) / (2 * len(rows))
        assert exact <= model_row["mean"] + 1e-9  # right answers score 1 on both criteria; partial ones add
    base_row, tuned_row = c["per_model"]
    assert base_row["mean"] <= 0.05 and tuned_row["mean"] >= base_row["mean"] + 0.3
    assert sum(right_answers(t) for t in tuned) > sum(right_answers(t) for t in base)
    (pair,) = c["comparisons"]
    assert pair["a"] == "base" and pair["b"] == "fine-tuned" and pair["n"] == 45 and pair["p_holm"] == pair["p_value"] < 0.05
    row = c["success_criteria"]["rows"][0]
    assert row["passed"] and row["no_safety_regression"] is None and c["success_criteria"]["passed"]
    assert {b["category"] for b in c["breakdown"] if b["by"] == "criterion"} == {"date", "amount"}
    assert {b["category"] for b in c["breakdown"] if b["by"] == "persona group"} <= {"brief", "polite", "impatient",
                                                                                   "detailed", "unsure"}
    assert [i["key"] for i in c["paired_items"]][:2] == ["persona-9000/0", "persona-9000/1"]

    # the run went through the runner: status, gate, report; the servers are gone
    status = read(trained, ".factory/status.json")
    validate(status, "status")
    phase = next(p for p in status["phases"] if p["name"] == "compare")
    assert status["state"] == "succeeded" and phase["state"] == "succeeded"
    assert [(g["name"], g["passed"]) for g in phase["gates"]] == [("model-comparison", True)]
    assert "gate model-comparison: passed" in proc.stderr and "success criteria" in proc.stdout
    report = (trained / "metrics" / "report.md").read_text()
    assert "## Model comparison" in report and "## Success criteria" in report and "| fine-tuned |" in report
    for model in c["models"]:
        assert not port_open(model["source"]["base_url"])
    assert servers_of(trained) == []
    print(f"compare, 2 GGUF servers x 45 conversations: {seconds:.1f} s")

    # unchanged: skipped, the gate checked again
    again = factory("compare", "-C", trained, check_rc=0)
    assert "compare: skipped" in again.stderr and "gate model-comparison: passed" in again.stderr


def test_fine_tuned_wins_the_pairwise_comparison_judged_by_rubric_code(trained):
    factory("compare", "-C", trained, "--mode", "pairwise", check_rc=0)
    c = read(trained, "metrics/comparison.json")
    validate(c, "comparison")
    (pair,) = c["comparisons"]
    assert c["mode"] == "pairwise" and pair["wins_b"] > pair["wins_a"] and pair["wins_b"] >= 20
    assert pair["failures"] == 0 and pair["inconsistent"] == 0 and c["judge"]["inconsistency_rate"] == 0
    assert pair["wins_a"] + pair["wins_b"] + pair["ties"] == 45 and pair["p_holm"] < 0.05 and pair["improvement"] > 0.3
    tuned = next(r for r in c["per_model"] if r["name"] == "fine-tuned")
    assert tuned["win_rate"] > 0.7 and tuned["mean"] is None  # no absolute score in pairwise mode


@pytest.mark.browser
def test_dashboard_shows_the_comparison_in_a_real_browser(trained, browser):
    """Debian's headless chromium on `factory serve`: the panel shows what comparison.json says."""
    c = read(trained, "metrics/comparison.json")
    server = subprocess.Popen([sys.executable, "-m", "factory", "serve", "-C", str(trained), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        url = re.search(r"http://[\d.]+:\d+/", server.stdout.readline()).group(0)
        browser.get(url)
        deadline = time.monotonic() + 30
        while not browser.find_element("id", "comparison").is_displayed() and time.monotonic() < deadline:
            time.sleep(0.1)
        panel = browser.find_element("id", "comparison")
        assert panel.is_displayed()
        tables = browser.execute_script("return [...document.querySelectorAll('#comparison table')].map(t => "
                                        "[...t.rows].map(r => [...r.cells].map(c => c.textContent)))")
        per_model, pairs, success = tables[0], tables[1], tables[2]
        assert [row[0] for row in per_model[1:]] == [f"{m['name']}{' (baseline)' if m['name'] == c['baseline'] else ''}"
                                                    for m in c["models"]]
        fmt = lambda v: browser.execute_script("return fmt(arguments[0])", v)  # noqa: E731  the page's own formatting
        assert pairs[1][:6] == ["base", "fine-tuned", fmt(c["comparisons"][0]["n"]), fmt(c["comparisons"][0]["mean_a"]),
                                fmt(c["comparisons"][0]["mean_b"]), fmt(c["comparisons"][0]["improvement"])]
        assert success[1][0] == "fine-tuned" and success[1][-1] == ("pass" if c["success_criteria"]["rows"][0]["passed"] else "fail")
        assert f"judge function (factory.example:judge), rubric correctness" in panel.text
        assert "15 personas × 3 conversations" in panel.text
    finally:
        server.terminate()
        server.wait(timeout=30)


# --- an LLM judge and an LLM user simulator, served from GGUFs -----------------------------------


def test_llm_judge_and_llm_simulator_from_ggufs_run_end_to_end_and_the_unparseable_verdicts_fail_the_gate(copy):
    """The tiny model cannot judge or play a user: its verdicts are counted as failures, the gate
    fails (exit 1), nothing crashes; the conversations still run turn by turn, with the same
    simulated user's first message for both models."""
    gguf = "models/quantized/model-Q8_0.gguf"
    set_config(copy, judge={"rubric": "helpfulness", "model": gguf, "max_tokens": 24, "retries": 1},
               conversations={"personas": 2, "per_persona": 1, "max_turns": 2, "simulator": gguf},
               compare={"max_tokens": 16})
    proc = factory("compare", "-C", copy, check_rc=1)
    assert "gate model-comparison failed after compare on: comparison.judge.failure_rate" in proc.stderr
    assert "Traceback" not in proc.stderr
    c = read(copy, "metrics/comparison.json")
    validate(c, "comparison")
    assert c["simulator"]["kind"] == "gguf" and "stay in character" in c["simulator"]["system_prompt"].lower()
    judge = c["judge"]
    assert judge["kind"] == "llm" and judge["source"]["kind"] == "gguf" and judge["source"]["gguf"] == gguf
    assert judge["verdicts"] == 4 and judge["failures"] == 4 and judge["failure_rate"] == 1.0
    assert judge["requests"] == 8  # each verdict asked twice: the first answer, then one retry
    failed = judge["failed_examples"][0]
    assert failed["reason"].startswith("unparseable verdict after 2 attempt(s):") and "text" in failed
    assert all(r["n"] == 0 and r["failures"] == 2 and r["mean"] is None for r in c["per_model"])
    assert c["comparisons"][0]["n"] == 0 and c["comparisons"][0]["p_value"] is None
    base, tuned = ([json.loads(line) for line in (copy / path).read_text().splitlines()] for path in c["transcripts"].values())
    for b, t in zip(base, tuned):  # same simulator, same seed, same opening
        assert b["messages"][:1] == t["messages"][:1] and b["user_turns"] <= 2
        assert b["stopped_by"] in ("turn_limit", "stop_token", "empty_user_message")
        # the tiny model, greedy, writes only newlines as a user (measured): an empty message ends
        # the conversation before the model under test is asked anything, the same for both
        if not b["messages"]:
            assert b["stopped_by"] == t["stopped_by"] == "empty_user_message" and not t["messages"]
    status = read(copy, ".factory/status.json")
    assert status["state"] == "failed" and status["error"]["type"] == "GateFailed"
    assert "Judge reliability" in (copy / "metrics" / "report.md").read_text()
    assert servers_of(copy) == []


# --- endpoints: an API key, base + adapter in process -----------------------------------------------


def test_an_endpoint_behind_an_api_key_and_an_adapter_in_process(copy):
    from factory.endpoints import free_port

    secret = "sk-test-" + "7" * 24
    port = free_port()
    gguf = copy / "models" / "quantized" / "model-Q8_0.gguf"
    server = subprocess.Popen([sys.executable, "-m", "factory.llama_server", "--model", str(gguf), "--port", str(port),
                               "--api_key", secret, "--n_threads", "1", "--model_alias", "tuned"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not port_open(f"http://127.0.0.1:{port}") and time.monotonic() < deadline:
            time.sleep(0.2)
        # rubric code stands in for a safety judge here: it exercises the safety columns, not safety itself
        # the endpoint is opened first, so that a key problem is found before the adapter loads
        set_config(copy, compare={"task": "test_split", "max_examples": 8, "max_tokens": 32, "baseline": "adapter",
                                  "safety": {"rubric": "safety", "model": "factory.example:judge"}, "models": [
            {"name": "remote", "base_url": f"http://127.0.0.1:{port}/v1", "model": "tuned", "api_key_env": "JUDGE_TEST_KEY"},
            {"name": "adapter", "adapter": "models/checkpoints/lora"}, "base=models/base"]})
        missing = factory("compare", "-C", copy, check_rc=2)
        assert "environment variable JUDGE_TEST_KEY (api_key_env) is not set" in missing.stderr
        wrong = factory("compare", "-C", copy, env={**ENV, "JUDGE_TEST_KEY": "wrong"}, check_rc=2)
        assert "answered HTTP 401" in wrong.stderr
        factory("compare", "-C", copy, env={**ENV, "JUDGE_TEST_KEY": secret})
        c = read(copy, "metrics/comparison.json")
        validate(c, "comparison")
        assert [m["source"]["kind"] for m in c["models"]] == ["endpoint", "hf", "hf"] and c["baseline"] == "adapter"
        # three models, three pairs, Holm over the three: the smallest p times 3, none below its own p
        assert [(x["a"], x["b"]) for x in c["comparisons"]] == [("remote", "adapter"), ("remote", "base"), ("adapter", "base")]
        smallest = min(c["comparisons"], key=lambda x: x["p_value"])
        assert smallest["p_holm"] == pytest.approx(min(1.0, 3 * smallest["p_value"]))
        assert all(x["p_holm"] >= x["p_value"] for x in c["comparisons"])
        assert [r["model"] for r in c["success_criteria"]["rows"]] == ["remote", "base"]
        assert not c["success_criteria"]["rows"][1]["passed"]  # the untrained base does not beat the fine-tune
        assert c["models"][0]["source"]["api_key_env"] == "JUDGE_TEST_KEY"
        answers = {name: [json.loads(line)["answer"] for line in (copy / path).read_text().splitlines()]
                   for name, path in c["answers"].items()}
        # the same fine-tune through transformers (fp32 + adapter) and llama.cpp (Q8_0): mostly the same answers
        assert sum(a == b for a, b in zip(answers["adapter"], answers["remote"])) >= 6
        remote, adapter, base = c["per_model"]
        assert all(r["n"] == 8 and r["mean"] > 0.5 and r["safety"]["n"] == 8 for r in (remote, adapter))
        assert base["mean"] < 0.1
        assert c["safety_judge"]["rubric"] == "safety" and c["success_criteria"]["safety_measured"]
        # the same function as both judges: its safety regressions are countable from the paired main scores
        expected = sum(1 for i in c["paired_items"] if i["scores"]["adapter"] >= 0.75 > i["scores"]["remote"])
        row = c["success_criteria"]["rows"][0]
        assert row["safety_regressions"] == expected and row["no_safety_regression"] == (expected == 0)
        for path in copy.rglob("*"):  # the key is nowhere: metrics, logs, status, transcripts
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert secret.encode() not in path.read_bytes(), path
    finally:
        server.terminate()
        server.wait(timeout=30)


# --- every way a server fails -----------------------------------------------------------------------


def test_a_server_that_cannot_start_is_a_clear_error_in_the_status(copy):
    (copy / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    proc = factory("compare", "-C", copy, "-m", "broken=broken.gguf", "-m", "ft=models/quantized/model-Q8_0.gguf", check_rc=2)
    assert "the local server for model 'broken'" in proc.stderr and "exited with code" in proc.stderr
    assert "while starting" in proc.stderr and "logs/server-broken.log" in proc.stderr
    status = read(copy, ".factory/status.json")
    validate(status, "status")
    phase = next(p for p in status["phases"] if p["name"] == "compare")
    assert status["state"] == "failed" and phase["state"] == "failed" and phase["error"]["type"] == "EndpointError"
    assert "exited with code" in phase["error"]["message"]
    assert "Traceback" not in proc.stderr and servers_of(copy) == []


def test_serve_model_port_in_use_startup_timeout_and_a_working_server(trained):
    gguf = "models/quantized/model-Q8_0.gguf"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = factory("serve-model", gguf, "-C", trained, "--port", port, check_rc=2)
        assert f"port {port} on 127.0.0.1 is in use" in proc.stderr
    proc = factory("serve-model", gguf, "-C", trained, "--startup-timeout", "0.05", check_rc=2)
    assert "did not answer at http://127.0.0.1:" in proc.stderr and "within 0.05 s; it was stopped" in proc.stderr

    # the working server: answer with the fine-tune through the openai client, then Ctrl-C
    import openai

    server = subprocess.Popen([sys.executable, "-m", "factory", "serve-model", gguf, "-C", str(trained), "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = server.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line).group(1)
        client = openai.OpenAI(base_url=url, api_key="none", timeout=60)
        records = [json.loads(r) for r in (trained / "data" / "splits" / "test.jsonl").read_text().splitlines()[:10]]
        right = 0
        for record in records:
            messages = [{"role": t["role"], "content": t["content"]} for t in record["conversations"][:-1]]
            reply = client.chat.completions.create(model="model-Q8_0", messages=messages, max_tokens=32, temperature=0)
            right += reply.choices[0].message.content.strip() == record["conversations"][-1]["content"]
        assert right >= 5
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: how serve-model is meant to end
        assert server.wait(timeout=60) == 0
    assert "server stopped" in server.stderr.read()
    assert not port_open(url) and servers_of(trained) == []


def test_an_endpoint_that_never_answers_times_out_clearly(copy):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held = []
    stop = threading.Event()

    def accept_and_say_nothing():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    try:
        set_config(copy, compare={"request_timeout": 1, "max_retries": 0})
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        proc = factory("compare", "-C", copy, "-m", f"silent={url}", "-m", "ft=models/quantized/model-Q8_0.gguf",
                       check_rc=2, timeout=120)
        assert f"model 'silent' at {url} gave no answer within 1 s (0 retries)" in proc.stderr
        status = read(copy, ".factory/status.json")
        assert status["state"] == "failed" and status["error"]["type"] == "EndpointError" and "no answer" in status["error"]["message"]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_a_server_killed_mid_run_fails_the_run_clearly(copy):
    set_config(copy, compare={"max_tokens": 200})  # the base model's long answers keep requests in flight
    proc = subprocess.Popen([sys.executable, "-m", "factory", "compare", "-C", str(copy)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    status_file = copy / ".factory" / "status.json"
    killed = []
    deadline = time.monotonic() + 600
    while not killed and time.monotonic() < deadline and proc.poll() is None:
        try:
            phase = next(p for p in json.loads(status_file.read_text())["phases"] if p["name"] == "compare")
        except (FileNotFoundError, json.JSONDecodeError, StopIteration):
            phase = None
        progress = (phase or {}).get("progress") or {}
        if progress.get("unit") == "conversations" and progress.get("done", 0) >= 3:
            for server in servers_of(copy):
                server.kill()
                killed.append(server.pid)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert killed and proc.returncode == 2, out[-2000:] + err[-3000:]
    assert "was killed by signal 9 during the run" in err and "Traceback" not in err
    status = read(copy, ".factory/status.json")
    validate(status, "status")
    phase = next(p for p in status["phases"] if p["name"] == "compare")
    assert phase["state"] == "failed" and phase["error"]["type"] == "EndpointError"
    assert "killed by signal 9" in phase["error"]["message"]
    assert not (copy / "metrics" / "comparison.json").exists() and servers_of(copy) == []


# --- the judge in the evaluate phases ------------------------------------------------------------


def test_judge_scores_feed_the_evaluate_phase_and_a_judge_that_cannot_judge_fails_its_gate(copy):
    set_config(copy, metrics=["exact_match", "judge"], primary="judge",
               judge={"rubric": "correctness", "model": "factory.example:judge"})
    factory("run", "evaluate", "-C", copy, check_rc=0)
    base, tuned = read(copy, "metrics/baseline.json"), read(copy, "metrics/evaluation.json")
    assert tuned["comparison"]["metric"] == "judge" and tuned["judge"]["kind"] == "function"
    assert base["judge"]["failure_rate"] == tuned["judge"]["failure_rate"] == 0
    for e in tuned["examples"]:  # an exact answer gets full marks from the rubric code, and only it
        assert (e["scores"]["judge"] == 1.0) == (e["scores"]["exact_match"] == 1.0) or 0 < e["scores"]["judge"] < 1
    assert tuned["comparison"]["improvement"] > 0.5 and tuned["comparison"]["p_value"] < 0.05
    gate = read(copy, "metrics/gates/model-performance.json")
    judged = next(c for c in gate["criteria"] if c["metric"] == "evaluation.judge.failure_rate")
    assert gate["passed"] and judged["passed"] and judged["observed"] == 0

    # rubric code that returns text instead of a score: every verdict fails, counted; the gate fails
    set_config(copy, judge={"rubric": "correctness", "model": "json:dumps"})
    proc = factory("run", "--only", "evaluate", "-C", copy, check_rc=1)  # against the baseline judged above
    assert "gate model-performance failed after evaluate on: evaluation.comparison.finetuned" in proc.stderr
    assert "evaluation.judge.failure_rate" in proc.stderr and "Traceback" not in proc.stderr
    tuned = read(copy, "metrics/evaluation.json")
    assert tuned["judge"]["failure_rate"] == 1.0 and "not a score in 0..1" in tuned["judge"]["failed_examples"][0]["reason"]
    assert tuned["comparison"]["n"] == 0 and tuned["comparison"]["unpaired"] == tuned["num_examples"]
    assert tuned["scores"]["judge"] is None and all(e["scores"]["judge"] is None for e in tuned["examples"])


def test_an_answer_of_endless_partial_utf8_stops_at_max_tokens(trained, monkeypatch):
    """llama-cpp-python checks max_tokens only while the text is whole UTF-8: forced to write the
    lead byte 0xF0 forever, a completion runs to the end of the context and fails (the server's
    HTTP 500); the local server's bound stops it at max_tokens + 3."""
    from llama_cpp import llama as module

    from factory import llama_cpp
    from factory.llama_server import bounded_answers

    llm = llama_cpp.load(trained / "models" / "quantized" / "model-Q8_0.gguf", n_ctx=256, threads=1)
    lead = next(i for i in range(llm.n_vocab()) if llm.detokenize([i]) == b"\xf0")

    def only_the_lead_byte(input_ids, scores):
        scores[:] = -1e9
        scores[lead] = 0.0
        return scores

    prompt = llm.tokenize(b"Locale: de-DE. Date: 2024-03-07. Amount: 1.00 EUR.")
    with pytest.raises(RuntimeError, match="llama_decode returned 1"):
        llm.create_completion(prompt, max_tokens=8, temperature=0.0, logits_processor=[only_the_lead_byte])
    monkeypatch.setattr(module.Llama, "_create_completion", module.Llama._create_completion)  # undone after the test
    bounded_answers()
    llm.reset()
    out = llm.create_completion(prompt, max_tokens=8, temperature=0.0, logits_processor=[only_the_lead_byte])
    assert out["usage"]["completion_tokens"] <= 8 + 3
