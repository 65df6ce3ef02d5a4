"""loadtest.py --find-capacity: the highest rate that meets an SLO, against test servers
whose knee is known: one whose slow answers cross 1 % at 300 requests a second (the noise
a real server's p99 has near its knee), one that saturates past it."""

import asyncio
import json
import statistics
import time

import pytest
from conftest import run_loadtest as run
from slotserver import SlotServer

from loadtester import capacity
from loadtester.measure import Outcome, client_session, fetch
from loadtester.report import Report, summarize

KNEE = 300
QUICK = ("--slo", "p99=50ms", "-d", "1", "--warmup", "0.3", "--start-rate", "150")


@pytest.fixture(scope="module")
def knee_server():
    with SlotServer(slots=1000, knee=KNEE) as server:
        yield server


def test_searches_in_a_row_agree_and_find_the_known_knee(knee_server, tmp_path, figure):
    found = []
    for index in range(3):
        out, picture = tmp_path / f"c{index}.json", tmp_path / f"c{index}.png"
        result = run("--find-capacity", *QUICK, "/knee", "--url", knee_server.url, "--json", str(out),
                     "--plot", str(picture))
        assert result.returncode == 0, result.stdout + result.stderr
        search = json.loads(out.read_text())
        assert search["mode"] == "capacity" and set(search) >= {"reports", "capacity", "steps"}
        answer = search["capacity"]
        assert answer["percentile"] == "p99" and answer["slo"] == 0.05 and answer["latency"] <= 0.05
        assert any(step["rate"] > answer["rate"] and step["verdict"] != "meets" for step in search["steps"])
        assert len(search["reports"]) == sum(len(step["runs"]) for step in search["steps"])
        assert f"capacity: {answer['rate']:,.0f} req/s meets p99 <= 50.0 ms" in result.stdout
        assert picture.read_bytes().startswith(b"\x89PNG")
        found.append(answer["rate"])
    mean = statistics.mean(found)
    figure(f"three searches against a knee of {KNEE}/s: {', '.join(f'{rate:,.0f}' for rate in found)} req/s")
    assert all(abs(rate - mean) <= 0.1 * mean for rate in found), found
    assert all(0.8 * KNEE <= rate <= 1.15 * KNEE for rate in found), found


def test_a_step_near_the_boundary_runs_until_two_runs_agree(knee_server, tmp_path):
    """One answer in a hundred slow: a p99 on the edge of the SLO, so the step is confirmed."""
    out = tmp_path / "c.json"
    run("--find-capacity", "--slo", "p99=50ms", "-d", "1", "--warmup", "0.3", "--start-rate", "200",
        "--max-rate", "200", "/one-in-100", "--url", knee_server.url, "--json", str(out))
    step = json.loads(out.read_text())["steps"][0]
    assert step["rate"] == 200 and 2 <= len(step["runs"]) <= 3, step
    verdicts = [latency <= 0.05 for latency in step["runs"]]
    assert verdicts.count(step["verdict"] == "meets") >= 2, step


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


def test_a_saturated_server_is_the_servers_miss_not_the_clients():
    """Past 200/s every answer takes 3 s: requests time out and pile up in flight."""
    with SlotServer(slots=5000, knee=200) as server:
        result = run("--find-capacity", "--slo", "p99=150ms", "-d", "1", "--warmup", "0.3", "--start-rate", "100",
                     "--max-rate", "800", "/saturates", "--url", server.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client cannot keep" not in result.stdout and "client behind" not in result.stdout
    assert "misses it (errors" in result.stdout and "timeout x" in result.stdout, result.stdout
    assert "the server's miss" in result.stdout and "requests in flight" in result.stdout


def report_of(late_share: float, service_p99: float, errors: int = 0, late: float = 0.05) -> tuple[Report, list]:
    """A 1,000-request open-loop report with this share of sends `late` s late, this service p99, these timeouts."""
    outcomes = [Outcome(done_at=index / 1000, latency=service_p99 if index % 50 == 0 else 0.002,
                        status=None if index < errors else 200, error="timeout" if index < errors else None,
                        late=late if index % 1000 < late_share * 1000 else 0.0) for index in range(1000)]
    return summarize("step", "http://x", outcomes, 1.0, rate=1000, send_window=1.0), outcomes


def test_late_sends_are_the_clients_only_while_the_server_answers_within_the_slo():
    judge = capacity.judge
    assert judge(*report_of(0.05, 0.004), "p99", 0.05).verdict == "client behind"
    overloaded = judge(*report_of(0.05, 0.3), "p99", 0.05)
    assert overloaded.verdict == "misses p99" and not overloaded.client_behind
    timing_out = judge(*report_of(0.05, 0.004, errors=50), "p99", 0.05)
    assert timing_out.verdict.startswith("errors") and not timing_out.client_behind
    assert judge(*report_of(0.0, 0.004), "p99", 0.05).verdict == "meets"
    # 5 % of sends 20 ms late, and the p99 with that lateness counted still within 50 ms: it meets.
    assert judge(*report_of(0.05, 0.004, late=0.02), "p99", 0.05).verdict == "meets"


def test_the_search_stops_within_its_time(knee_server):
    """(A Ctrl-C at any moment of a search: tests/test_interrupt.py.)"""
    started = time.monotonic()
    # p99 within 150 ms: /knee's slow answers (0.2 s) still miss it, a busy machine's noise does not.
    bounded = run("--find-capacity", "--slo", "p99=150ms", "-d", "1", "--warmup", "0.2", "--max-seconds", "4",
                  "/knee", "--url", knee_server.url)
    took = time.monotonic() - started
    assert bounded.returncode == 0 and "capacity:" in bounded.stdout
    assert took < 4 + 10, "the bound, plus starting Python and its processes on a busy machine"


def test_the_open_loop_draws_latency_over_time_and_its_percentiles(tmp_path):
    with SlotServer(slots=1000) as server:
        result = run("--rate", "100", "-d", "1", "/fast", "--url", server.url, "--plot", str(tmp_path / "o.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o.png").read_bytes().startswith(b"\x89PNG")


def test_doubling_then_bisecting():
    def step(rate, met):
        return capacity.Step(rate, rate, 0.01, 0.01, 0.0, 0.0, 0.0, False, "meets" if met else "misses p99")

    assert capacity.next_rate([step(50, True)], 10_000) == 100
    assert capacity.next_rate([step(50, True), step(100, True), step(200, False)], 10_000) == 150
    assert capacity.next_rate([step(200, True), step(210, False)], 10_000) is None, "close enough"
    assert capacity.next_rate([step(50, False)], 10_000) is None, "even the lowest misses"
    assert capacity.next_rate([step(8000, True)], 10_000) == 10_000
    assert capacity.next_rate([step(10_000, True)], 10_000) is None, "never above --max-rate"


def test_runs_of_one_rate_take_the_majority_and_its_median():
    def run_of(latency):
        return capacity.Step(300, 300, latency, latency, 0.0, 0.0, 0.0, False,
                             "meets" if latency <= 0.05 else "misses p99", runs=[latency])

    combined = capacity.combine([run_of(0.2), run_of(0.004), run_of(0.006)])
    assert combined.met and combined.latency == 0.005 and combined.runs == [0.2, 0.004, 0.006]
    assert not capacity.combine([run_of(0.2), run_of(0.3)]).met


def test_every_miss_is_confirmed_and_a_clear_meet_is_not():
    """A machine's noise only adds latency: one run far over the SLO may be a pause of the
    host, so it runs again; one far under it cannot be luck; a client behind is not the server's."""
    search = capacity.Search("http://x", "p99", 0.05, 1.0, 0.0, 1.0)

    def run_of(latency, client_behind=False):
        verdict = "client behind" if client_behind else "meets" if latency <= 0.05 else "misses p99"
        return capacity.Step(300, 300, latency, latency, 0.0, 0.0, 0.0, client_behind, verdict, runs=[latency])

    assert search.unsettled([run_of(2.0)]), "a miss ten times over the SLO runs again"
    assert search.unsettled([run_of(2.0), run_of(0.004)]), "one each way: a third decides"
    assert not search.unsettled([run_of(2.0), run_of(0.3)]), "two misses agree"
    assert not search.unsettled([run_of(0.004)]), "a clear meet stands"
    assert search.unsettled([run_of(0.04)]), "a meet near the SLO runs again"
    assert not search.unsettled([run_of(0.3, client_behind=True)])


def test_a_step_waits_for_the_backlog_the_last_one_left():
    """A server with one slot and 20 requests of 0.1 s queued for it, whose clients gave up
    after 0.3 s: it still works through all of them (2 s). The next step's run waits until
    the server answers within the SLO again instead of starting on that backlog."""

    async def abandon(url: str, count: int):
        async with client_session(0.3) as session:
            await asyncio.gather(*(fetch(session, url, time.perf_counter()) for _ in range(count)))

    with SlotServer(slots=1) as server:
        asyncio.run(abandon(server.url + "/sleep/python/?seconds=0.1", 20))
        started = time.monotonic()
        settled = asyncio.run(capacity.settle(server.url + "/sleep/python/?seconds=0", 0.05))
        waited = time.monotonic() - started
    assert settled
    assert 1.0 < waited < capacity.SETTLE_SECONDS, waited
