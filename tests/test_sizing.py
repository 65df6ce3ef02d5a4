"""greenflask/sizing.py: the pool arithmetic for several hosts, with and without PgBouncer."""

import subprocess
import sys

from conftest import ROOT


def sizing(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}  # no DB_* or WEB_CONCURRENCY from the caller
    return subprocess.run([sys.executable, "-m", "greenflask.sizing", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env)


def test_four_hosts_straight_to_a_stock_server_do_not_fit():
    result = sizing("--hosts", "4", "--workers", "2")
    assert result.returncode == 1
    assert "4 hosts x 2 workers x (pool_size 100 + max_overflow 0) = 800 connections at most" in result.stdout
    assert "800 > 97: does NOT fit; lower DB_POOL_SIZE to 12 or fewer" in result.stdout


def test_the_same_through_pgbouncer_fits():
    result = sizing("--hosts", "4", "--workers", "2", "--pgbouncer-pool", "20")
    assert result.returncode == 0, result.stdout
    assert "PgBouncer clients: 800 <= max_client_conn 1000: fits" in result.stdout
    assert "default_pool_size 20 <= 97: fits" in result.stdout
    assert "at most 20 statements run at once" in result.stdout


def test_one_host_with_a_small_pool_fits_and_bad_input_is_a_usage_error():
    assert sizing("--pool-size", "20").returncode == 0
    bad = sizing("--hosts", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
