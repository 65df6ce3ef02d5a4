"""The cluster lets in only the app: SCRAM and TLS on the database hop, no secret on display,
the API alone on the public side, and hostile clients answered at the balancer.

One cluster (1 host, CLUSTER_NET 10.81) for the module, brought up and down with the CLI.
Every hostile request goes to HAProxy on 127.0.0.1; "what reached the app" is HAProxy's own
count of requests sent to the host (`stot`), and "table unchanged" is read in PostgreSQL.
"""

import contextlib
import resource
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
from conftest import cluster_environment, cluster_marks, cluster_status, cluster_up, run_cluster

from deploy import credentials
from deploy.apphosts import PORT as APP_PORT
from deploy.haproxy import server_rows as haproxy_servers

pytestmark = cluster_marks("pgbouncer", "haproxy")
SMUGGLED_TITLE = "smuggled past the balancer"


@pytest.fixture(scope="module")
def cluster():
    """(environment, balancer URL, status) of one cluster for the module."""
    with cluster_environment("10.81") as env, cluster_up(env, "--hosts", "1") as balancer:
        yield env, balancer, cluster_status(env)


def exchange(url: str, raw: bytes, timeout: float = 5) -> bytes:
    """Send `raw` bytes on one connection to `url`'s host; all it answered until it closed."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as connection:
        connection.sendall(raw)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := connection.recv(65536):
                answer += chunk
    return answer


def statuses(answer: bytes) -> list[int]:
    """The status of every HTTP response in `answer`."""
    return [int(line.split()[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def sent_to_hosts(report: dict) -> int:
    """Requests HAProxy has sent to the app hosts so far."""
    return sum(int(row["stot"]) for row in haproxy_servers(report["haproxy"]["admin_socket"]).values())


def get(url: str, path: str, headers: str = "") -> bytes:
    return exchange(url, f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode())


def app_connection(report: dict, **overrides):
    """A connection to PgBouncer as the app's role, as the hosts make it, with `overrides`."""
    host, port = report["pgbouncer"]["address"].rsplit(":", 1)
    parameters = {"host": host, "port": port, "dbname": "greenflask", "user": credentials.APP_ROLE,
                  "passfile": report["passfile"], "sslmode": "verify-full", "sslrootcert": report["pgbouncer"]["ca"],
                  "connect_timeout": 5, **overrides}
    return psycopg2.connect(**parameters)


def refusal(report: dict, **overrides) -> str:
    """PgBouncer's (or libpq's) reason for refusing a connection made with `overrides`."""
    with pytest.raises(psycopg2.OperationalError) as refused:
        app_connection(report, **overrides).close()
    return str(refused.value).strip().splitlines()[-1]


def todos_titled(report: dict, title: str) -> int:
    """Rows with `title` in the table."""
    with contextlib.closing(app_connection(report)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM todos WHERE title = %s", (title,))
        return cursor.fetchone()[0]


def test_only_the_apps_role_with_its_password_over_tls_gets_in(cluster, tmp_path, figure):
    env, balancer, report = cluster
    passfile = Path(report["passfile"])
    password = passfile.read_text().strip().rsplit(":", 1)[1]
    impostor = credentials.Credentials(tmp_path)
    impostor.make_folders()
    credentials.make_certificates(impostor, {"pgbouncer": ["10.81.2.1"]}, None)  # a CA the app does not trust

    refused = {
        "plaintext": refusal(report, sslmode="disable"),
        "no password": refusal(report, passfile=str(tmp_path / "none")),
        "wrong password": refusal(report, passfile=None, password="not-" + password),
        "another CA's certificate": refusal(report, sslrootcert=str(impostor.ca_cert)),
    }
    with contextlib.closing(app_connection(report)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT current_user, (SELECT count(*) FROM todos)")
        user, rows = cursor.fetchone()
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cursor.execute("DROP TABLE todos")

    assert "SSL required" in refused["plaintext"], refused
    assert "no password supplied" in refused["no password"], refused
    assert "SASL authentication failed" in refused["wrong password"], refused
    assert "SSL error" in refused["another CA's certificate"], refused
    assert user == credentials.APP_ROLE and rows >= 50
    figure("PgBouncer refused: " + "; ".join(f"{case}: {reason}" for case, reason in refused.items())
           + f"; the app's role over verify-full: in, {rows} rows, DROP TABLE denied")


def test_no_secret_on_display(cluster):
    env, balancer, report = cluster
    files = credentials.Credentials(Path(env["CLUSTER_DIR"]))
    password = Path(report["passfile"]).read_text().strip().rsplit(":", 1)[1]
    gunicorn = report["hosts"][0]["gunicorn_pid"]
    workers = subprocess.run(["pgrep", "-P", str(gunicorn)], capture_output=True, text=True).stdout.split()
    shown = {
        "status": run_cluster(env, "status").stdout + run_cluster(env, "status", "--json").stdout,
        "argv and environment": "".join(Path(f"/proc/{pid}/{part}").read_text(errors="replace")
                                        for pid in [gunicorn, *workers] for part in ("cmdline", "environ")),
        "logs and state": "".join(path.read_text(errors="replace") for path in Path(env["CLUSTER_DIR"]).glob("*.*")
                                  if path.is_file()),
    }

    assert workers, "the host's workers were found"
    assert password not in "".join(shown.values()), [where for where, text in shown.items() if password in text]
    # Each host reads its own copy, where its rendered NEEDS put it (deploy/localhosts.py).
    copy = Path(report["rendered"], "host1/etc/greenflask/secrets/app.pgpass")
    assert f"PGPASSFILE={copy}" in shown["argv and environment"], "the hosts get a file"
    assert oct(copy.stat().st_mode & 0o777) == "0o600" and copy.read_text() == Path(report["passfile"]).read_text()
    assert all(oct(path.stat().st_mode & 0o777) == "0o600" for path in files.secrets.iterdir())
    assert oct(files.secrets.stat().st_mode & 0o777) == "0o700"
    assert "password" not in Path(env["CLUSTER_DIR"], "host1.log").read_text().lower().replace("passfile", "")


INTERNAL_PATHS = ["/metrics", "/stats", "/healthz", "//metrics", "/%6detrics", "/metrics?", "/METRICS",
                  "/todos/../metrics", "/./stats", "/todos/%2e%2e/metrics", "/metrics;x", "/metrics%00"]


def test_the_public_side_serves_the_api_only(cluster, figure):
    env, balancer, report = cluster
    host = report["hosts"][0]
    before = sent_to_hosts(report)
    answers = {path: get(balancer, path) for path in INTERNAL_PATHS}
    reached = sent_to_hosts(report) - before
    api = statuses(get(balancer, "/todos?limit=1"))
    own = statuses(get(f"http://{host['address']}:{APP_PORT}", "/metrics"))

    assert {path: statuses(answer) for path, answer in answers.items()} == {path: [404] for path in INTERNAL_PATHS}
    assert all(b'"code": "not_found"' in answer for answer in answers.values())
    assert reached == 0, f"{reached} of the internal paths reached the app"
    assert api == [200] and sent_to_hosts(report) - before == 1
    assert own == [200], "Prometheus still scrapes the host on its own address"
    figure(f"public side: {len(INTERNAL_PATHS)} internal paths ({', '.join(INTERNAL_PATHS)}) all 404 from HAProxy, "
           "0 reached the app; /todos 200; the host's own /metrics 200")


def test_oversized_requests_are_refused_at_the_balancer(cluster, figure):
    env, balancer, report = cluster
    cases = {
        "URL of 3,000 bytes": get(balancer, "/todos?" + "a" * 3000),
        "a header of 20 kB": get(balancer, "/todos", f"X-Big: {'a' * 20_000}\r\n"),
        "100 headers": get(balancer, "/todos", "".join(f"X-H{i}: {i}\r\n" for i in range(100))),
        "Content-Length 1 MB": exchange(balancer, b"POST /todos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                                  b"\r\nContent-Length: 1048576\r\n\r\n{"),
    }
    before = sent_to_hosts(report)
    got = {case: statuses(answer) for case, answer in cases.items()}
    reached = sent_to_hosts(report) - before

    assert got == {"URL of 3,000 bytes": [414], "a header of 20 kB": [400], "100 headers": [400],
                   "Content-Length 1 MB": [413]}, got
    assert reached == 0
    figure("oversized at HAProxy: " + "; ".join(f"{case}: {got[case][0]}" for case in cases) + "; 0 reached the app")


def smuggling_cases() -> dict[str, bytes]:
    """Requests whose framing a front and a back could read differently, each hiding a
    second `POST /todos` that would create a row if a host ever saw it as a request."""
    hidden = (b'POST /todos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n'
              % (len(SMUGGLED_TITLE) + 13) + b'{"title": "%s"}' % SMUGGLED_TITLE.encode())
    head = b"POST /todos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    ends_chunked = b"0\r\n\r\n" + hidden
    return {
        "CL.TE": head + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(ends_chunked) + ends_chunked,
        "TE.CL": head + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(hidden) + hidden
                 + b"\r\n0\r\n\r\n",
        "two Content-Lengths": head + b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(hidden) + hidden,
        "a space before Transfer-Encoding's colon": head + b"Content-Length: %d\r\nTransfer-Encoding : chunked"
                                                            b"\r\n\r\n" % len(ends_chunked) + ends_chunked,
        "Transfer-Encoding: xchunked": head + b"Content-Length: %d\r\nTransfer-Encoding: xchunked\r\n\r\n"
                                              % len(ends_chunked) + ends_chunked,
    }


def test_request_smuggling_attempts_create_nothing(cluster, figure):
    env, balancer, report = cluster
    seen = {}
    for case, raw in smuggling_cases().items():
        before = sent_to_hosts(report)
        seen[case] = (statuses(exchange(balancer, raw)), sent_to_hosts(report) - before)
    after = statuses(get(balancer, "/todos?limit=1"))

    assert all(answers == [400] for answers, _ in seen.values()), seen
    assert all(reached <= 1 for _, reached in seen.values()), f"at most the outer request reached the app: {seen}"
    assert todos_titled(report, SMUGGLED_TITLE) == 0, "no hidden request was ever run"
    assert after == [200]
    figure("smuggling through HAProxy: " + "; ".join(f"{case}: {answers} to the client, {reached} request(s) "
                                                    f"reached the app" for case, (answers, reached) in seen.items())
           + "; 0 rows made")


SLOW_CLIENTS = 1200


def test_slow_clients_hold_nothing_the_app_needs(cluster, figure):
    """Slowloris through HAProxy: 1,200 connections each sending a partial request and a
    header a second. HAProxy keeps them (it forwards no request before its headers end), a
    new request is answered meanwhile, and `timeout http-request` (10 s) closes them all."""
    env, balancer, report = cluster
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    parts = urlsplit(balancer)
    before = sent_to_hosts(report)
    slow = []
    try:
        for _ in range(SLOW_CLIENTS):
            connection = socket.create_connection((parts.hostname, parts.port), timeout=5)
            connection.sendall(b"GET /todos HTTP/1.1\r\nHost: x\r\n")
            slow.append(connection)
        opened = time.monotonic()
        for second in range(3):
            for connection in slow:
                connection.sendall(b"X-Slow-%d: 1\r\n" % second)
            time.sleep(1)
        started = time.monotonic()
        answered = statuses(get(balancer, "/todos?limit=1"))
        waited = time.monotonic() - started
        for connection in slow:
            connection.settimeout(max(0.1, opened + 20 - time.monotonic()))
        closed = [statuses(connection.recv(4096)) for connection in slow]
        closed_after = time.monotonic() - opened
    finally:
        for connection in slow:
            connection.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    reached = sent_to_hosts(report) - before

    assert answered == [200] and waited < 2, f"{answered} after {waited:.2f} s"
    assert closed == [[408]] * SLOW_CLIENTS, {str(status): closed.count(status) for status in closed}
    assert reached == 1, "only the whole request reached the app"
    figure(f"slowloris through HAProxy: {SLOW_CLIENTS} half-sent requests; a new GET /todos answered 200 in "
           f"{waited * 1000:.0f} ms; all {SLOW_CLIENTS} answered 408 and closed {closed_after:.1f} s after they "
           f"opened; {reached} request reached the app")
