"""deploy/prometheus/: the config and rules pass promtool's checks, and every alert has a
unit test (a series that fires it and one that does not) that passes. The end-to-end alert
test, against a real Prometheus scraping the cluster, is in tests/test_cluster.py."""

import re
import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT

from deploy import monitoring

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


def test_rules_with_short_windows_are_the_same_rules_and_pass_promtool(tmp_path):
    """The cluster's tests render the rules with CLUSTER_RULE_WINDOWS=0.25 so that the end-to-end
    alert test waits seconds, not minutes: only the windows change."""
    original = (RULES / "alerts.yml").read_text()
    short = monitoring.scaled(original, 0.25)
    assert "for: 15s" in original and "for: 4s" in short and "for: 8s" in short  # 15 s -> 4, 30 s -> 8
    assert "[1m]" in original and "[15s]" in short and "[1m]" not in short and "[5m]" not in short
    assert "for: 2m" in original and "for: 30s" in short
    assert monitoring.scaled(original, 1) == original
    strip = re.compile(r"for: \w+|\[\w+\]")
    assert strip.sub("", short) == strip.sub("", original)
    for name, text in (("alerts.yml", short), ("recording.yml", monitoring.scaled(
            (RULES / "recording.yml").read_text(), 0.25))):
        (tmp_path / name).write_text(text)
    rules = promtool("check", "rules", "alerts.yml", "recording.yml", cwd=tmp_path)
    assert rules.returncode == 0, rules.stdout + rules.stderr
