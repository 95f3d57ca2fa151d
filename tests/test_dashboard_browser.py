"""The dashboard in a real headless Chromium (Debian's, driven by Selenium and its
chromedriver) while a real tiny-model run goes from raw data to evaluate in another process:
the step counter advances, the chart gains points, the final state and the gate results
appear, the chart survives a reload, and nothing is loaded from anywhere but the server.
A screenshot is saved to test-artifacts/dashboard.png (git-ignored) and the pytest tmp dir."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
# Running as root in a container with no network: no sandbox, and none of Chromium's own
# background traffic (it retries a closed network over and over otherwise).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,2400"]


def factory(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=600)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def browser(tmp_path):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (`make test` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver: Selenium then never runs selenium-manager (which downloads).
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served_example(tmp_path):
    """An example workspace small enough to train in seconds, and `factory serve` on it."""
    root = tmp_path / "ws"
    factory("init", "--example", root, "--records", 600, "--steps", 200, check_rc=0)
    config = root / "factory.yaml"
    config.write_text(config.read_text().replace("logging_steps: 10", "logging_steps: 4"))
    server = subprocess.Popen([sys.executable, "-m", "factory", "serve", "-C", str(root), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    line = server.stdout.readline()
    url = re.search(r"http://[\d.]+:\d+/", line)
    assert url, line + server.stderr.read()
    yield root, url.group(0)
    server.terminate()
    server.wait(timeout=10)


def page_state(driver) -> dict:
    return driver.execute_script("""
        const text = (id) => document.getElementById(id).textContent.trim();
        return {
          state: document.getElementById('state').dataset.state,
          banner: text('state'),
          step: text('step'),
          points: Number(document.getElementById('chart').dataset.points),
          evalPoints: Number(document.getElementById('chart').dataset.evalPoints || 0),
          gates: [...document.querySelectorAll('#gates table')].map(t => [t.dataset.gate, t.dataset.passed]),
          timeline: [...document.querySelectorAll('#timeline li')].map(li => [li.dataset.phase, li.dataset.state]),
        };""")


def test_dashboard_follows_a_real_run_to_the_end(served_example, browser, tmp_path):
    root, url = served_example
    browser.get(url)
    deadline = time.monotonic() + 30
    while page_state(browser)["state"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page_state(browser)["state"] == "idle" and "Idle" in page_state(browser)["banner"]

    with open(tmp_path / "run.log", "w") as log:
        run = subprocess.Popen([sys.executable, "-m", "factory", "run", "evaluate", "-C", str(root)],
                               stdout=log, stderr=subprocess.STDOUT, env=ENV)
        seen, ended, deadline = [], None, time.monotonic() + 900
        while time.monotonic() < deadline:
            seen.append(page_state(browser))
            if seen[-1]["state"] in ("succeeded", "failed", "cancelled", "stopped"):
                break
            if ended is None and run.poll() is not None:
                ended = time.monotonic()
            if ended is not None and time.monotonic() - ended > 10:
                break  # the page never showed the end; the assertions below say so
            time.sleep(0.25)
        run.wait(timeout=120)
    err = (tmp_path / "run.log").read_text()
    time.sleep(2.5)  # two more polls: the page shows everything the run left behind
    final = page_state(browser)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    shutil.copy(tmp_path / "dashboard.png", ARTIFACTS / "dashboard.png")

    # the step counter advanced and the chart gained points while it trained
    steps = [int(m.group(1)) for s in seen if (m := re.match(r"(\d+) / 200", s["step"]))]
    assert len(set(steps)) >= 3 and steps == sorted(steps), steps
    points = [s["points"] for s in seen if s["state"] == "running"]
    assert len({p for p in points if p > 0}) >= 3 and points == sorted(points), points
    assert any(s["state"] == "running" for s in seen)

    # the final state is the run's, and said plainly
    assert run.returncode in (0, 1), err[-3000:]  # a tiny run may miss the performance gate; that is a result too
    expected = "succeeded" if run.returncode == 0 else "failed"
    assert final["state"] == expected, (final, err[-2000:])
    assert ("Finished" if expected == "succeeded" else "GateFailed") in final["banner"]
    assert dict(final["timeline"])["finetune"] == "succeeded" and dict(final["timeline"])["evaluate"] == "succeeded"
    assert final["points"] == 200 // 4  # every logged step is on the chart
    # and every evaluation on the validation split, beside it, live while it trained
    evals = json.loads((root / "metrics" / "training-stats.json").read_text())["eval_history"]
    assert len(evals) >= 11 and final["evalPoints"] == len(evals)
    assert len({s["evalPoints"] for s in seen if s["state"] == "running" and s["evalPoints"]}) >= 3
    drawn = browser.execute_script("return document.querySelectorAll('#chart circle.eval').length")
    assert drawn == len(evals)

    # gate results, observed vs required, as the files say
    gate_files = {p.stem: json.loads(p.read_text())["passed"] for p in (root / "metrics" / "gates").glob("*.json")}
    assert {name: passed == "true" for name, passed in final["gates"]} == gate_files
    assert set(gate_files) == {"data-valid", "splits-ready", "baseline-established", "training-completed", "model-performance"}
    first_row = browser.execute_script(
        "return [...document.querySelectorAll('#gates table[data-gate=\"model-performance\"] tbody tr')[0].cells]"
        ".map(c => c.textContent)")
    evaluation = json.loads((root / "metrics" / "evaluation.json").read_text())
    assert first_row[0] == "evaluation.comparison.finetuned" and first_row[2] == ">="
    assert first_row[1] == browser.execute_script("return fmt(arguments[0])", evaluation["comparison"]["finetuned"])

    # after evaluate: the scores, the statistics and the flipped examples
    section = browser.find_element("id", "evaluation")
    assert section.is_displayed()
    assert "exact_match (primary)" in section.text and "McNemar's exact test p" in section.text  # 0/1 scores
    assert f"improved: {evaluation['flipped']['improved']} examples" in section.text

    # the report was written after evaluate and is served
    assert "report: metrics/report.md, metrics/report.html" in err
    browser.get(url + "report")
    assert "Fine-tuning report" in browser.title + browser.find_element("tag name", "h1").text
    assert len(browser.find_elements("css selector", "img[src^='data:image/png']")) == 2

    # the chart survives a reload: the history lives in the workspace
    browser.get(url)
    deadline = time.monotonic() + 15
    while page_state(browser)["points"] != final["points"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert page_state(browser)["points"] == final["points"]

    # nothing came from anywhere but this server, and the page logged no script error
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(url) for r in resources), resources
    problems = [e["message"] for e in browser.get_log("browser")
                if e["level"] == "SEVERE" and "status of 404" not in e["message"]]  # /api/training before training
    assert problems == []


def test_dashboard_shows_quantization_and_says_when_a_run_was_killed(tmp_path, browser):
    """Hand-written results (no training): the quantization table from the keys present, and
    the banner for a run whose process died without writing its final state."""
    from test_report import QUANTIZATION, evaluation_metrics, write_metrics

    from factory.status import StatusWriter
    from factory.workspace import Workspace

    root = tmp_path / "ws"
    factory("init", root, check_rc=0)
    ws = Workspace.at(root)
    baseline, evaluation = evaluation_metrics()
    write_metrics(ws, baseline=baseline, evaluation=evaluation, quantization=QUANTIZATION)
    names = ["format", "split", "baseline", "finetune", "evaluate", "quantize"]
    status = StatusWriter(ws, names, {}, None)
    for name in names:
        status.phase_started(name, f"metrics/{name}.json")
        status.phase_finished(name, "succeeded")
    status.finish("succeeded")
    server = subprocess.Popen([sys.executable, "-m", "factory", "serve", "-C", str(root), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        url = re.search(r"http://[\d.]+:\d+/", server.stdout.readline()).group(0)
        browser.get(url)
        deadline = time.monotonic() + 15
        while not browser.find_element("id", "quantization").is_displayed() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert page_state(browser)["state"] == "succeeded" and "Finished" in page_state(browser)["banner"]
        rows = browser.execute_script("return [...document.querySelectorAll('#quantization tr')]"
                                      ".map(r => [...r.cells].map(c => c.textContent))")
        assert rows[0][:5] == ["type", "size bytes", "bits per weight", "score", "relative score drop"]
        assert rows[0][-3:] == ["examples", "new measure", "scores"]  # keys the page does not know still get a column
        assert rows[2][-3] == "30 entries"  # per-example records are counted
        assert rows[1][:5] == ["Q8_0", "3.0 MiB", "8.5", "0.97", "0"] and rows[2][:2] == ["Q4_K_M", "2.0 MiB"]
        assert rows[2][-1] == "exact_match 0.94, chrf 0.99"
        assert "worst relative score drop 0.031" in browser.find_element("id", "quantization").text

        # a run killed with SIGKILL leaves "running" behind; the page says it stopped
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        doc = json.loads(ws.status_file.read_text())
        ws.status_file.write_text(json.dumps({**doc, "state": "running", "pid": dead.pid, "ended_at": None}))
        deadline = time.monotonic() + 15
        while page_state(browser)["state"] != "stopped" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert page_state(browser)["state"] == "stopped" and f"the run (pid {dead.pid})" in page_state(browser)["banner"]

        shutil.rmtree(root)  # the workspace removed under the server
        deadline = time.monotonic() + 15
        while "answered 404" not in page_state(browser)["banner"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "does not exist" in page_state(browser)["banner"], page_state(browser)

        server.terminate()  # and when the server goes away, the page says that too
        server.wait(timeout=10)
        deadline = time.monotonic() + 15
        while page_state(browser)["state"] != "offline" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Cannot reach the factory server" in page_state(browser)["banner"]
    finally:
        server.kill()
        server.wait()
