"""The API's contract: openapi.yaml, served at /openapi.json, accepted by its validator, held
to the routes, and checked against a real server by schemathesis (a client no one here
wrote): every check, its stateful phase included, straight to gunicorn and, where the
cluster's programs are installed, through HAProxy and PgBouncer."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cluster_environment, cluster_marks, cluster_up, request
from openapi_spec_validator import validate

import views
from app import create_app
from deploy.runtime import DEPLOY_DIR

ROOT = Path(__file__).resolve().parent
SCHEMATHESIS = [str(Path(sys.executable).parent / "st"), "--config-file", str(ROOT / "schemathesis.toml")]
# Sleeps of at most 50 ms, so that schemathesis's hundreds of cases of them stay quick;
# the document the server serves says so, and schemathesis reads it there.
CONTRACT_ENV = {"SLEEP_MAX_SECONDS": "0.05"}
INTERNAL_ROUTES = {"/healthz", "/stats", "/metrics"}  # the hosts' own, refused by the balancer
MAX_EXAMPLES = "30"


def documented(document: dict) -> dict[str, set[str]]:
    return {path: {method.upper() for method in item if method != "parameters"}
            for path, item in document["paths"].items()}


def routes() -> dict[str, set[str]]:
    """The app's URL rules as OpenAPI paths (`<int:todo_id>` -> `{todo_id}`), with their
    methods but Flask's automatic HEAD and OPTIONS."""
    found: dict[str, set[str]] = {}
    for rule in create_app().url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        found.setdefault(path, set()).update(rule.methods - {"HEAD", "OPTIONS"})
    return found


def test_the_served_document_is_valid_openapi(green_server):
    answer = request(green_server.url("/openapi.json"))
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    document = answer.json()
    validate(document)  # raises on the first error
    assert document["openapi"].startswith("3.1")


def test_the_document_and_the_routes_are_the_same():
    document = documented(views._openapi_document())
    app_routes = routes()
    assert set(app_routes) - INTERNAL_ROUTES == set(document), "every public route is documented, and only those"
    for path, methods in document.items():
        assert app_routes[path] == methods, path


def test_the_balancer_serves_exactly_the_documented_paths():
    """haproxy.cfg's allow-list of the public side, applied as HAProxy applies it."""
    pattern = re.search(r"acl api path_reg (\S+)", (DEPLOY_DIR / "haproxy.cfg").read_text()).group(1).replace("$$", "$")
    for path in documented(views._openapi_document()):
        assert re.search(pattern, path.replace("{todo_id}", "12")), path
    for path in INTERNAL_ROUTES:
        assert not re.search(pattern, path), path


def test_the_sleeps_maximum_is_the_servers_own(start_server):
    server = start_server("-k", "gevent", env={"SLEEP_MAX_SECONDS": "2.5"})
    document = request(server.url("/openapi.json")).json()
    assert document["components"]["parameters"]["seconds"]["schema"]["maximum"] == 2.5
    assert request(server.url("/sleep/python/?seconds=2.6")).status == 400
    server.stop()


def schemathesis(base_url: str, report: Path, seed: int = 1) -> tuple[subprocess.CompletedProcess, dict]:
    """`st run BASE/openapi.json --checks all` (every phase, the stateful one too); its
    outcome and the counts from its NDJSON event log."""
    command = [*SCHEMATHESIS, "run", f"{base_url}/openapi.json", "--checks", "all", "--max-examples", MAX_EXAMPLES,
               "--seed", str(seed), "--no-color", "--report", "ndjson", "--report-ndjson-path", str(report),
               "--request-timeout", "10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return done, counts(done.stdout)


def counts(output: str) -> dict:
    """From schemathesis's summary: the cases it generated and the phases it ran."""
    generated = re.search(r"(\d+) generated", output)
    phases = re.findall(r"(✅|❌|⏭|🚫)\s+(\w+)", output.split("Test Phases:")[-1].split("Failures")[0])
    return {"generated": int(generated.group(1)) if generated else 0, "phases": {name: mark for mark, name in phases}}


def assert_passed(done: subprocess.CompletedProcess, found: dict) -> None:
    tail = done.stdout[-6000:]
    assert done.returncode == 0, tail
    assert found["generated"] > 200, tail
    assert found["phases"].get("Stateful") == "✅", tail


def test_schemathesis_finds_nothing_against_gunicorn(start_server, tmp_path, figure):
    server = start_server("-k", "gevent", env=CONTRACT_ENV)
    done, found = schemathesis(server.base_url, tmp_path / "events.ndjson")
    log = server.log()
    server.stop()
    assert_passed(done, found)
    assert "Traceback" not in log, log[-3000:]
    figure(f"schemathesis --checks all against gunicorn -k gevent: {found['generated']} cases, phases "
           + ", ".join(f"{name} {mark}" for name, mark in found["phases"].items()))


@pytest.mark.parametrize("_", [pytest.param(None, marks=cluster_marks("pgbouncer", "haproxy"))])
def test_schemathesis_finds_nothing_through_the_cluster(_, tmp_path, figure):
    with cluster_environment("10.82") as env:
        env.update(CONTRACT_ENV)
        with cluster_up(env, "--hosts", "2") as balancer:
            done, found = schemathesis(balancer, tmp_path / "events.ndjson")
    assert_passed(done, found)
    figure(f"schemathesis --checks all through HAProxy, 2 hosts and PgBouncer: {found['generated']} cases")

