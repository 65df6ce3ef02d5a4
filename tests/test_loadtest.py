"""loadtest.py against a small aiohttp server whose slots and delays the test controls, and
against the project's real server."""

import json
import os
import random
import re
import time

import pytest
from conftest import in_background
from conftest import run_loadtest as run
from slotserver import SlotServer

from greenflask import servers
from loadtester import merge, output
from loadtester.measure import Outcome
from loadtester.report import find_waves, summarize

LINE = re.compile(r"^\t@ +\d+\.\d\ds got response \[200\]$", re.MULTILINE)


@pytest.fixture
def three_slots():
    with SlotServer(slots=3) as server:
        yield server


def test_three_slots_nine_requests_show_three_waves_of_three(three_slots, tmp_path):
    json_path = tmp_path / "r.json"
    result = run("9", "--url", three_slots.url, "--seconds", "0.3", "--routes", "postgres", "--json", str(json_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"Sending 9 requests for {three_slots.url}/sleep/postgres/?seconds=0.3...\n")
    assert len(LINE.findall(out)) == 9
    assert re.search(r"^\t= +0\.9\ds TOTAL$", out, re.MULTILINE), out
    assert "3 waves of 3" in out
    assert "200 x 9" in out
    assert re.search(r"^SUM TOTAL = 0\.9\ds$", out, re.MULTILINE)

    report = json.loads(json_path.read_text())["reports"][0]
    assert report["waves"] == [3, 3, 3]
    assert report["statuses"] == {"200": 9}
    assert report["requests"] == 9
    # Latencies 0.3, 0.6, 0.9 s three times each over 0.9 s: six requests outstanding on average.
    assert 5.5 < report["concurrency"] < 6.5
    assert 0.3 < report["efficiency"] < 0.36, "ideal 0.3 s over about 0.9 s observed"
    assert 0.29 < report["latency"]["min"] < 0.4 and 0.85 < report["latency"]["max"] < 1.0
    assert len(report["done_times"]) == 9


def test_enough_slots_is_one_wave_and_full_efficiency(tmp_path):
    with SlotServer(slots=50) as server:
        result = run("30", "--url", server.url, "--seconds", "0.5", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    reports = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert [report["name"] for report in reports] == ["python", "postgres"]
    for report in reports:
        assert report["waves"] == [30]
        assert report["efficiency"] > 0.8


def test_many_requests_show_a_progress_bar_not_lines():
    # 2 s sleeps: completions more than 0.5 s apart make a new wave, a margin that a busy
    # machine spreading 250 answers does not reach (0.5 s sleeps, a 0.125 s gap, once split).
    with SlotServer(slots=1000) as server:
        result = run("250", "--url", server.url, "--seconds", "2", "--routes", "python")
    assert result.returncode == 0, result.stderr
    assert not LINE.search(result.stdout)
    assert "1 wave: 250" in result.stdout


def test_exit_1_when_any_answer_is_not_2xx(three_slots):
    result = run("-c", "2", "-d", "0.5", "/fail", "--url", three_slots.url)
    assert result.returncode == 1
    assert "500 x" in result.stdout


def test_exit_2_with_a_hint_when_the_server_is_down():
    started = time.monotonic()
    result = run("5", "--url", f"http://127.0.0.1:{servers.free_port()}")
    assert result.returncode == 2
    assert time.monotonic() - started < 10
    assert "Traceback" not in result.stderr
    assert "cannot reach" in result.stderr and "gunicorn app:app -k gevent" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_arguments_exit_2():
    assert run("many").returncode == 2
    assert run("5", "--routes", "ruby").returncode == 2


def test_closed_loop_reports_rate_and_percentiles(three_slots, tmp_path):
    result = run("-c", "4", "-d", "1", "/fast", "--url", three_slots.url, "--json", str(tmp_path / "c.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "c.json").read_text())["reports"][0]
    assert report["requests"] > 100
    assert report["requests_per_second"] > 100
    assert set(report["latency"]) == {"min", "p50", "p90", "p99", "p999", "max"}
    assert "req/s" in result.stdout and "@" not in result.stdout


def test_text_timeline_groups_completions():
    rows = output.timeline_rows([0.31, 0.32, 0.61, 0.62, 0.63], width=0.1)
    assert [count for _, count in rows] == [2, 3]


def test_find_waves_splits_on_gaps():
    assert find_waves([1.0, 1.01, 2.0, 2.02, 3.0], gap=0.25) == [2, 2, 1]
    assert find_waves([], gap=0.25) == []


def test_against_the_real_server_both_routes_in_one_wave(green_server, tmp_path):
    result = run("20", "--url", green_server.base_url, "--seconds", "1", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    for report in json.loads((tmp_path / "r.json").read_text())["reports"]:
        assert report["waves"] == [20], report["name"]
        assert report["statuses"] == {"200": 20}


def test_matrix_reproduces_the_three_modes(database_url, tmp_path):
    env = {**os.environ, "DATABASE_URL": database_url, "DB_POOL_SIZE": "25",
           "LOADTEST_SERVER_LOG": str(tmp_path / "servers.log")}
    result = run("--matrix", "2", "--seconds", "0.5", "--json", str(tmp_path / "m.json"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUM TOTAL" in result.stdout and "gevent+green" in result.stdout
    rows = json.loads((tmp_path / "m.json").read_text())["matrix"]
    observed = {(row["mode"], row["route"]): row["observed"] for row in rows}
    assert observed[("sync", "python")] > 0.9 and observed[("sync", "postgres")] > 0.9
    assert observed[("gevent", "python")] < 0.9 and observed[("gevent", "postgres")] > 0.9
    assert observed[("gevent+green", "python")] < 0.9 and observed[("gevent+green", "postgres")] < 0.9
    blocks = {row["mode"]: row["loop_blocks"] for row in rows}
    assert blocks["sync"] is None and blocks["gevent+green"] == 0, blocks
    assert blocks["gevent"] >= 2, "the server sees its own blocking: at least one block per pg_sleep"


def test_matrix_with_a_server_that_cannot_start_is_exit_2(database_url, tmp_path):
    env = {**os.environ, "DATABASE_URL": database_url, "GUNICORN_TIMEOUT": "not a number",
           "LOADTEST_SERVER_LOG": str(tmp_path / "servers.log")}
    result = run("--matrix", "2", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("loadtest.py --matrix: sync: server exited")


def test_open_loop_keeps_its_schedule_and_reports_both_latencies(tmp_path):
    with SlotServer(slots=1000) as server:
        result = run("--rate", "200", "-d", "2", "/fast", "--url", server.url, "--json", str(tmp_path / "o.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "o.json").read_text())["reports"][0]
    assert report["requests"] == 400 and report["statuses"] == {"200": 400} and report["errors"] == {}
    assert report["rate_asked"] == 200 and 180 < report["rate_achieved"] < 220
    assert report["late_sends"] < 40, "a 200/s schedule is easy to keep"
    for key in ("latency_corrected", "latency_service"):
        assert set(report[key]) >= {"p50", "p90", "p99", "p999", "max"}
        assert report[key]["p50"] < 0.05
    assert "late sends (> 1 ms behind schedule)" in result.stdout and "corrected" in result.stdout


def test_open_loop_shows_a_stall_that_the_closed_loop_hides(tmp_path, figure):
    """One 1 s stall of the server in a 5 s run: the closed loop sends less while it waits,
    so few of its requests meet the stall; the open loop keeps sending on schedule."""
    with SlotServer(slots=1000) as server:
        closed = run("-c", "10", "-d", "5", "/stalls-once", "--url", server.url, "--json", str(tmp_path / "c.json"))
    with SlotServer(slots=1000) as server:
        opened = run("--rate", "200", "-d", "5", "/stalls-once", "--url", server.url,
                     "--json", str(tmp_path / "o.json"))
    assert closed.returncode == 0 and opened.returncode == 0, closed.stderr + opened.stderr
    closed_p99 = json.loads((tmp_path / "c.json").read_text())["reports"][0]["latency"]["p99"]
    report = json.loads((tmp_path / "o.json").read_text())["reports"][0]
    corrected, service = report["latency_corrected"], report["latency_service"]
    assert closed_p99 < 0.2, "the closed loop's p99 hides the stall"
    assert corrected["p99"] > 0.5 and corrected["max"] > 0.8, "the open loop's corrected p99 shows it"
    assert service["p99"] <= corrected["p99"] + 0.001
    figure(f"1 s stall in 5 s: closed loop -c 10 p99 {closed_p99 * 1000:.1f} ms; open loop 200/s: "
           f"corrected p99 {corrected['p99']:.3f} s (max {corrected['max']:.3f} s), "
           f"service p99 {service['p99']:.3f} s, late sends {report['late_sends']}")


@pytest.mark.parametrize("args", [
    ("--matrix", "2", "--rate", "10"),
    ("--matrix", "2", "--url", "http://127.0.0.1:1"),
    ("-c", "2", "--rate", "10"),
    ("--rate", "0"),
    ("--rate", "10", "todos"),
])
def test_conflicting_or_bad_command_lines_are_one_line_exit_2(args):
    result = run(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("loadtest.py: ")



def test_the_open_loop_spread_over_processes_keeps_one_schedule(tmp_path):
    with SlotServer(slots=1000) as server:
        result = run("--rate", "400", "-d", "2", "--processes", "2", "/fast", "--url", server.url,
                     "--json", str(tmp_path / "o.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "o.json").read_text())["reports"][0]
    assert report["processes"] == 2 and report["requests"] == 800 and report["statuses"] == {"200": 800}
    # Interleaved, the two processes' sends fill each quarter second with its 100: none twice, none left out.
    counts = [row[1] for row in report["timeline"]]
    assert sum(counts) == 800 and all(abs(count - 100) <= 5 for count in counts), counts
    assert "from 2 processes" in result.stdout
    # What the client cost is measured in its processes: every request of the run, some CPU.
    assert report["client_cpu"]["requests"] == 800 and report["client_cpu"]["seconds"] > 0
    assert "µs of CPU a request" in result.stdout


def test_the_closed_loop_spread_over_processes(three_slots, tmp_path):
    result = run("-c", "4", "-d", "1", "--processes", "2", "/fast", "--url", three_slots.url,
                 "--json", str(tmp_path / "c.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "c.json").read_text())["reports"][0]
    assert report["processes"] == 2 and report["requests"] > 100 and set(report["statuses"]) == {"200"}


def test_merged_histograms_give_the_percentiles_of_all_the_requests():
    """Two shards' reports merged answer exactly what one report of every request would."""
    generator = random.Random(7)
    outcomes = [Outcome(done_at=index / 500, latency=generator.lognormvariate(-5, 1), status=200,
                        late=generator.choice([0.0, 0.0, 0.003])) for index in range(2000)]
    whole = summarize("all", "http://x", outcomes, 4.0, rate=500, send_window=4.0, started_at=1000.0)
    shards = {f"{index}.json": summarize("shard", "http://x", outcomes[index::2], 4.0, rate=250, send_window=4.0,
                                         started_at=1000.0) for index in range(2)}
    merged = merge.merge(shards, "open")
    assert merged.latency_corrected == whole.latency_corrected and merged.latency_service == whole.latency_service
    assert merged.requests == 2000 and merged.rate_asked == 500 and merged.late_sends == whole.late_sends
    assert merged.statuses == {200: 2000}


def test_shards_run_apart_merge_into_one_report(tmp_path):
    with SlotServer(slots=1000) as server:
        shards = [in_background(run, "--rate", "100", "-d", "2", "--processes", "1", "/fast", "--url", server.url,
                                "--json", str(tmp_path / f"{name}.json")) for name in ("a", "b")]
        for shard in shards:
            shard.join()
        assert all(shard.result.returncode == 0 for shard in shards)
        later = run("--rate", "100", "-d", "1", "/fast", "--url", server.url, "--json", str(tmp_path / "c.json"))
        burst = run("3", "--seconds", "0", "--url", server.url, "--json", str(tmp_path / "burst.json"))
    assert later.returncode == 0 and burst.returncode == 0
    merged = run("merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(tmp_path / "m.json"),
                 "--plot", str(tmp_path / "m.png"))
    assert merged.returncode == 0, merged.stdout + merged.stderr
    parts = [json.loads((tmp_path / f"{name}.json").read_text())["reports"][0] for name in ("a", "b")]
    found = json.loads((tmp_path / "m.json").read_text())
    report = found["reports"][0]
    assert found["mode"] == "open" and report["requests"] == 400 and report["statuses"] == {"200": 400}
    assert report["client_cpu"]["requests"] == 400
    assert report["client_cpu"]["seconds"] == sum(part["client_cpu"]["seconds"] for part in parts)
    assert report["rate_asked"] == 200 and 180 < report["rate_achieved"] < 220
    p99s = sorted(part["latency_corrected"]["p99"] for part in parts)
    assert p99s[0] <= report["latency_corrected"]["p99"] <= p99s[1]
    assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG")
    for others, said in (((tmp_path / "a.json", tmp_path / "c.json"), "taken at different times"),
                         ((tmp_path / "a.json", tmp_path / "burst.json"), "burst run: merge takes")):
        refused = run("merge", *map(str, others))
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert said in refused.stderr and refused.stderr.startswith("loadtest.py merge: "), refused.stderr
