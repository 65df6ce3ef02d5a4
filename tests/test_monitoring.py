"""deploy/prometheus/: the config and rules pass promtool's checks, and every alert has a
unit test (a series that fires it and one that does not) that passes. The end-to-end alert
test, against a real Prometheus scraping the cluster, is in tests/test_cluster.py."""

import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT

PROMTOOL = shutil.which("promtool")
RULES = ROOT / "deploy" / "prometheus"
pytestmark = pytest.mark.skipif(not PROMTOOL, reason="promtool is not installed: apt-get install prometheus")


def promtool(*args: str, cwd=RULES) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_the_config_and_the_rules_pass_promtools_checks(tmp_path):
    for name in ("prometheus.yml", "alerts.yml", "recording.yml"):
        shutil.copy(RULES / name, tmp_path / name)
    (tmp_path / "targets").mkdir()
    for name in ("greenflask.json", "haproxy.json", "postgres.json", "pgbouncer.json", "patroni.json"):
        (tmp_path / "targets" / name).write_text("[]")
    checked = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", "alerts.yml", "recording.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_every_alert_has_a_passing_unit_test():
    alerts = {rule["alert"] for group in yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    tested = {case["alertname"] for test in yaml.safe_load((RULES / "tests.yml").read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"
    result = promtool("test", "rules", "tests.yml")
    assert result.returncode == 0, result.stdout + result.stderr
