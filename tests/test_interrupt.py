"""Ctrl-C at any moment: every mode of loadtest.py stops within 2 s, prints what it had
measured and its interrupted line, and exits with its documented code (loadtest.py's
docstring). The moments are random but spread over each mode's whole run: one run is timed
uninterrupted first, and the k-th of n moments falls at random in the k-th n-th of that time
(the seed is printed with a failure, to repeat it)."""

import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT
from slotserver import SlotServer

from loadtester import interrupt

STOP_WITHIN = 2.0
AT_ONCE = 5  # runs interrupted side by side (each has its load processes)
MODES = {
    # name: (arguments, moments). The search: steps of 0.1 + 0.3 s doubling from 50/s to
    # 800/s, each after its settle wait, on a fleet made once.
    "search": (("--find-capacity", "--slo", "p99=1s", "-d", "0.3", "--warmup", "0.1", "--max-rate", "800",
                "/fast"), 30),
    "open loop": (("--rate", "200", "-d", "2", "/fast"), 6),
    "closed loop": (("-c", "8", "-d", "2", "/fast"), 6),
    "burst": (("30", "--seconds", "0.5"), 6),
}

# The line each mode ends with, interrupted or not (a search on a busy machine may find
# that this client cannot keep even its first rate: "no answer", exit 1).
FINAL_LINE = {"search": ("capacity: ", "no answer", "no step ran"), "open loop": (" requests in ",),
              "closed loop": (" requests in ",), "burst": ("SUM TOTAL",)}


def ended_as_it_should(mode: str, result: dict) -> bool:
    """Its last figures printed, and the exit status they call for."""
    if not any(line in result["out"] for line in FINAL_LINE[mode]):
        return False
    if mode == "search":
        return result["code"] == (0 if "capacity: " in result["out"] else 1)
    return result["code"] == 0


@pytest.fixture(scope="module")
def server():
    with SlotServer(slots=1000) as slots:
        yield slots


def start(args: tuple, url: str) -> tuple[subprocess.Popen, float]:
    """loadtest.py ARGS, and the moment its first line came: its handler is installed by then."""
    process = subprocess.Popen([sys.executable, "-u", "loadtest.py", *args, "--url", url], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    assert first, process.communicate()
    process.first_line = first
    return process, time.monotonic()


def interrupted_at(args: tuple, url: str, delay: float) -> dict:
    process, began = start(args, url)
    time.sleep(max(0.0, began + delay - time.monotonic()))
    if process.poll() is not None:  # it ended before this moment: no interrupt to judge
        out, err = process.communicate()
        return {"delay": delay, "ended_first": True}
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return {"delay": delay, "ended_first": False, "took": time.monotonic() - sent, "code": process.returncode,
            "out": process.first_line + out, "err": err}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_ctrl_c_at_any_moment_stops_the_run_within_2_s_and_keeps_what_it_found(server, mode):
    args, count = MODES[mode]
    process, began = start(args, server.url)
    out, err = process.communicate(timeout=60)
    whole = time.monotonic() - began
    assert ended_as_it_should(mode, {"out": out, "code": process.returncode}), out + err

    seed = random.randrange(1 << 30)
    chance = random.Random(seed)
    delays = [(index + chance.random()) * whole / count for index in range(count)]
    results: list[dict] = []

    def worker(mine: list[float]) -> None:
        for delay in mine:
            results.append(interrupted_at(args, server.url, delay))

    threads = [threading.Thread(target=worker, args=(delays[index::AT_ONCE],)) for index in range(AT_ONCE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    judged = [result for result in results if not result["ended_first"]]
    assert len(judged) >= count * 0.8, f"seed {seed}: most moments fall inside the run ({whole:.2f} s)"
    finished = 0
    for result in judged:
        said = f"seed {seed}, {mode} interrupted {result['delay']:.2f} s after its first line:\n{result['out']}"
        assert result["took"] <= STOP_WITHIN, f"{said}\nstopped after {result['took']:.2f} s"
        assert "Traceback" not in result["err"], said + result["err"]
        if "(nothing measured yet)" in result["out"]:
            assert result["code"] == 130, said
        else:
            assert ended_as_it_should(mode, result), said
            finished += interrupt.LINE not in result["out"]  # the signal came as it was exiting, its run done
    assert finished <= len(judged) * 0.2, f"seed {seed}: {finished} of {len(judged)} runs did not say interrupted"
