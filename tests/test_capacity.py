"""loadtest.py --find-capacity: the highest rate that meets an SLO, against a test server
whose knee is known (fast up to 300 requests a second, 0.2 s per answer past it)."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from conftest import run_loadtest as run
from slotserver import SlotServer

import loadtest

KNEE = 300


@pytest.fixture(scope="module")
def knee_server():
    with SlotServer(slots=1000, knee=KNEE) as server:
        yield server


def test_the_search_finds_the_known_knee(knee_server, tmp_path):
    out, picture = tmp_path / "c.json", tmp_path / "c.png"
    result = run("--find-capacity", "--slo", "p99=50ms", "-d", "2", "/knee", "--url", knee_server.url,
                 "--json", str(out), "--plot", str(picture))
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(out.read_text())
    assert found["mode"] == "capacity" and set(found) >= {"reports", "capacity", "steps"}
    capacity = found["capacity"]
    assert capacity["percentile"] == "p99" and capacity["slo"] == 0.05 and capacity["latency"] <= 0.05
    assert 100 <= capacity["rate"] < KNEE * 1.1, found["steps"]
    assert any(step["rate"] > KNEE and step["verdict"] != "meets" for step in found["steps"])
    assert len(found["reports"]) == len(found["steps"]) >= 4
    assert f"capacity: {capacity['rate']:,.0f} req/s meets p99 <= 50.0 ms" in result.stdout
    assert picture.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("slo", ["p99", "p98=50ms", "p99=50", "p99=0ms", "p99=fast", "99=50ms", "p99=50 ms"])
def test_a_malformed_slo_is_one_line_naming_the_forms(slo):
    result = run("--find-capacity", "--slo", slo, "--url", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "p50, p90, p99 or p999" in result.stderr and "Traceback" not in result.stderr


def test_the_slo_and_the_search_go_together():
    assert run("--find-capacity", "--url", "http://127.0.0.1:1").returncode == 2
    assert run("--slo", "p99=50ms", "--url", "http://127.0.0.1:1").returncode == 2
    assert run("--rate", "10", "--max-rate", "100").returncode == 2


def test_a_client_that_cannot_keep_the_rate_says_so_instead_of_blaming_the_server():
    with SlotServer(slots=1000) as server:
        result = run("--find-capacity", "--slo", "p99=1s", "-d", "0.5", "--start-rate", "20000", "--max-rate",
                     "20000", "/fast", "--url", server.url)
    assert result.returncode == 1, "no rate passed: no answer"
    assert "the client cannot keep 20,000/s on this machine" in result.stdout


def test_the_search_stops_within_its_time_and_on_ctrl_c(knee_server):
    started = time.monotonic()
    bounded = run("--find-capacity", "--slo", "p99=50ms", "-d", "1", "--max-seconds", "4", "/knee",
                  "--url", knee_server.url)
    took = time.monotonic() - started
    assert bounded.returncode == 0 and "capacity:" in bounded.stdout
    assert took < 4 + 6, "the bound, plus starting Python"
    search = subprocess.Popen([sys.executable, "loadtest.py", "--find-capacity", "--slo", "p99=50ms", "-d", "1",
                               "/knee", "--url", knee_server.url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(4)
    search.send_signal(signal.SIGINT)
    stdout, _ = search.communicate(timeout=30)
    assert "interrupted: what was found so far" in stdout and "capacity:" in stdout


def test_the_open_loop_draws_latency_over_time_and_its_percentiles(tmp_path):
    with SlotServer(slots=1000) as server:
        result = run("--rate", "100", "-d", "1", "/fast", "--url", server.url, "--plot", str(tmp_path / "o.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o.png").read_bytes().startswith(b"\x89PNG")


def test_doubling_then_bisecting():
    def step(rate, met):
        return loadtest.Step(rate, rate, 0.01, 0.0, 0.0, False, "meets" if met else "misses p99")

    assert loadtest.next_rate([step(50, True)], 50, 10_000) == 100
    assert loadtest.next_rate([step(50, True), step(100, True), step(200, False)], 50, 10_000) == 150
    assert loadtest.next_rate([step(200, True), step(210, False)], 50, 10_000) is None, "close enough"
    assert loadtest.next_rate([step(50, False)], 50, 10_000) is None, "even the lowest misses"
    assert loadtest.next_rate([step(8000, True)], 50, 10_000) == 10_000
    assert loadtest.next_rate([step(10_000, True)], 50, 10_000) is None, "never above --max-rate"
