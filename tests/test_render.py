"""python -m deploy.render: the 13 hosts of deployment/inventory.example.yml rendered, and each
file checked by its own tool (systemd-analyze, haproxy -c, promtool). These tools only read
the files: nothing is sent to the inventory's addresses (documentation ones, RFC 5737)."""

import configparser
import json
import re
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml
from conftest import not_installed, program

from deploy import units
from deploy.inventory import load
from greenflask import PROJECT_DIR

INVENTORY = PROJECT_DIR / "deployment" / "inventory.example.yml"


def tool(name: str) -> str:
    if missing := not_installed(name):
        pytest.skip(missing)
    return program(name)


def render(out: Path, *args: str, inventory: Path = INVENTORY) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.render", str(inventory), "--out", str(out), *args],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """The example rendered with this checkout as the app's folder (its .venv holds gunicorn,
    whose path systemd-analyze verify checks)."""
    out = tmp_path_factory.mktemp("rendered")
    done = render(out, "--prefix", str(PROJECT_DIR))
    assert done.returncode == 0, done.stderr
    return out


def unit_files(rendered: Path) -> list[Path]:
    return sorted(rendered.glob("*/etc/systemd/system/*.service"))


def test_every_host_gets_a_folder_with_its_units(rendered, figure):
    inventory = load(INVENTORY)
    names = [host.name for _, host in inventory.hosts()]
    assert len(names) == 13
    assert sorted(path.name for path in rendered.iterdir()) == sorted(names)
    for name in names:
        listed = (rendered / name / "UNITS").read_text().split()
        assert listed and all((rendered / name / "etc/systemd/system" / unit).is_file() for unit in listed), name
    assert (rendered / "pool1" / "UNITS").read_text().split() == [
        "haproxy-postgres.service", "pgbouncer.service", "greenflask-pgbouncer-exporter.service"]
    figure(f"render of {len(names)} hosts: {len(unit_files(rendered))} units, "
           f"{sum(1 for path in rendered.rglob('*') if path.is_file())} files")


def executables(unit: Path) -> set[str]:
    """The programs a unit's ExecStart lines run, which systemd-analyze verify checks exist."""
    service = units.parse(unit.read_text())["Service"]
    return {shlex.split(value)[0].lstrip("-@!+:") for key, value in service if key.startswith("ExecStart")}


def test_every_unit_passes_systemd_analyze_verify(rendered):
    analyze = tool("systemd-analyze")
    programs = set().union(*(executables(path) for path in unit_files(rendered)))
    if missing := not_installed(*sorted(programs)):
        pytest.skip(f"the units run programs that are absent: {missing}")
    for path in unit_files(rendered):
        done = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not done.stderr.strip(), f"{path}: {done.stderr}"


def test_systemd_analyze_verify_can_fail(tmp_path):
    analyze = tool("systemd-analyze")
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/nonexistent/gunicorn\n")
    assert subprocess.run([analyze, "verify", "--man=no", str(bad)], capture_output=True, timeout=60).returncode != 0


def test_the_app_unit_is_hardened(rendered, figure):
    analyze = tool("systemd-analyze")
    done = subprocess.run([analyze, "security", "--offline=true", str(rendered / "app1/etc/systemd/system/"
                                                                       "greenflask.service")],
                          capture_output=True, text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for greenflask.service: ([0-9.]+)", done.stdout).group(1))
    assert exposure <= 5.0, done.stdout
    figure(f"systemd-analyze security --offline=true greenflask.service: exposure {exposure}")


def test_haproxy_accepts_both_of_its_configs(rendered):
    haproxy = tool("haproxy")
    for config in (rendered / "lb1/etc/haproxy/haproxy.cfg", rendered / "pool1/etc/haproxy/haproxy-postgres.cfg"):
        done = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{config}: {done.stdout}{done.stderr}"
    balancer = (rendered / "lb1/etc/haproxy/haproxy.cfg").read_text()
    assert "bind 192.0.2.10:80" in balancer
    assert re.findall(r"server (app\d) (\S+)", balancer) == [(f"app{n}", f"192.0.2.2{n}:8000") for n in range(1, 5)]


def test_promtool_accepts_prometheus_and_its_targets_are_every_host_and_exporter(tmp_path, rendered):
    promtool = tool("promtool")
    folder = rendered / "mon1/etc/prometheus/greenflask"
    done = subprocess.run([promtool, "check", "config", str(folder / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    targets = {job.stem: sorted(target for group in json.loads(job.read_text()) for target in group["targets"])
               for job in (folder / "targets").glob("*.json")}
    assert targets == {"greenflask": [f"192.0.2.2{n}:8000" for n in range(1, 5)],
                       "haproxy": ["192.0.2.10:8405"], "pgbouncer": ["192.0.2.30:9127"],
                       "postgres": ["192.0.2.60:9187"],
                       "patroni": ["192.0.2.41:8008", "192.0.2.42:8008", "192.0.2.43:8008"]}


def test_each_patroni_config_names_its_node_the_etcd_members_and_synchronous_mode(rendered):
    for number in (1, 2, 3):
        config = yaml.safe_load((rendered / f"db{number}/etc/patroni/config.yml").read_text())
        assert config["name"] == f"db{number}"
        assert config["restapi"]["connect_address"] == f"192.0.2.4{number}:8008"
        assert config["postgresql"]["connect_address"] == f"192.0.2.4{number}:5432"
        assert config["etcd3"]["hosts"] == "192.0.2.51:2379,192.0.2.52:2379,192.0.2.53:2379"
        assert config["bootstrap"]["dcs"]["synchronous_mode"] is True
        assert not any("password" in user for user in config["postgresql"]["authentication"].values())
        hba = config["postgresql"]["pg_hba"]
        assert "hostssl replication replicator 192.0.2.42/32 scram-sha-256" in hba
        assert "hostssl all all 192.0.2.30/32 scram-sha-256" in hba  # PgBouncer's host and its HAProxy
        unit = units.parse((rendered / f"db{number}/etc/systemd/system/patroni.service").read_text())
        assert ("EnvironmentFile", "/etc/patroni/secrets.env") in unit["Service"]


def test_pgbouncer_ini_parses_and_etcd_has_the_inventory_members(rendered):
    ini = configparser.ConfigParser(interpolation=None, comment_prefixes=(";",), inline_comment_prefixes=None)
    ini.read(rendered / "pool1/etc/pgbouncer/pgbouncer.ini")
    assert ini["pgbouncer"]["listen_addr"] == "192.0.2.30" and ini["pgbouncer"]["listen_port"] == "6432"
    assert ini["pgbouncer"]["auth_type"] == "scram-sha-256" and ini["pgbouncer"]["client_tls_sslmode"] == "require"
    assert ini["pgbouncer"]["server_tls_sslmode"] == "verify-full"
    assert ini["databases"]["greenflask"] == "host=192.0.2.30 port=5000 dbname=greenflask"
    assert ini["pgbouncer"]["max_client_conn"] == str(4 * 2 * 20 * 2 + 20)  # hosts x workers x pool x 2 pools
    members = "etcd1=http://192.0.2.51:2380,etcd2=http://192.0.2.52:2380,etcd3=http://192.0.2.53:2380"
    for number in (1, 2, 3):
        env = units.environment_file((rendered / f"etcd{number}/etc/etcd/greenflask.env").read_text())
        assert env["ETCD_INITIAL_CLUSTER"] == members and env["ETCD_NAME"] == f"etcd{number}"
        assert env["ETCD_ADVERTISE_CLIENT_URLS"] == f"http://192.0.2.5{number}:2379"


def test_no_secret_is_written_and_every_needed_one_is_named(rendered):
    for path in rendered.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"(?i)password\s*[:=]\s*\S", text.replace("PASS_FILE", "")), path
            assert "SCRAM-SHA-256$" not in text and "BEGIN" not in text, path
    needs = {line.split()[0]: line.split()[1:3] for line in (rendered / "pool1/NEEDS").read_text().splitlines()
             if not line.startswith("#")}
    assert needs["/etc/pgbouncer/userlist.txt"] == ["600", "postgres"]
    assert needs["/etc/pgbouncer/tls/pgbouncer.key"] == ["600", "postgres"]
    assert "/etc/patroni/secrets.env" in (rendered / "db1/NEEDS").read_text()
    assert "/etc/greenflask/secrets/app.pgpass" in (rendered / "app1/NEEDS").read_text()


def test_every_path_lies_under_the_root(tmp_path):
    out = tmp_path / "out"
    assert render(out, "--root", "/srv/{name}", "--prefix", "/opt/gf").returncode == 0
    system = re.compile(r"(?<![\w.%-])/(etc|var|run|srv|tmp|home|opt)/[\w./@{}-]*")
    for host in out.iterdir():
        for path in host.rglob("*"):
            if path.is_file() and path.name not in ("NEEDS", "UNITS"):
                for found in system.finditer(urllib.parse.unquote(path.read_text())):
                    named = found.group(0).rstrip("/.")
                    assert named == "/opt/gf" or named.startswith((f"/srv/{host.name}/", "/opt/gf/")), (path, named)
    assert (out / "app1/etc/greenflask/greenflask.env").is_file()  # the tree is relative to the root


@pytest.mark.parametrize("change, names", [
    (lambda data: data.pop("balancer"), "balancer: Field required"),
    (lambda data: data["app_hosts"][1].update(name="app1"), "app_hosts[1].name app1 is also app_hosts[0]'s"),
    (lambda data: data["db_nodes"][2].update(address="192.0.2.30"), "db_nodes[2].address 192.0.2.30 is also"),
    (lambda data: data["app_hosts"][0].update(workers="two"), "app_hosts.0.workers: Input should be a valid integer"),
    (lambda data: data["pgbouncer"].update(pool="20"), "pgbouncer.pool: Extra inputs are not permitted"),
    (lambda data: data.update(postgres={"name": "pg", "address": "192.0.2.99"}), "name either db_nodes"),
], ids=["missing role", "duplicate name", "duplicate address", "wrong type", "unknown key", "two databases"])
def test_a_malformed_inventory_gets_one_line_and_nothing_is_written(tmp_path, change, names):
    data = yaml.safe_load(INVENTORY.read_text())
    change(data)
    broken = tmp_path / "inventory.yml"
    broken.write_text(yaml.safe_dump(data))
    done = render(tmp_path / "out", inventory=broken)
    assert done.returncode == 2 and names in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_server_of_your_own_without_pgbouncer(tmp_path):
    """`postgres` instead of db_nodes, and no PgBouncer: the app hosts connect to the server
    itself, across the network with TLS verified."""
    data = yaml.safe_load(INVENTORY.read_text())
    for role in ("db_nodes", "etcd", "pgbouncer"):
        data.pop(role)
    data["postgres"] = {"name": "pg1", "address": "192.0.2.70", "database": "todos"}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump(data))
    done = render(tmp_path / "out", inventory=inventory)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["app1", "app2", "app3", "app4", "lb1",
                                                                          "mon1"]
    env = units.environment_file((tmp_path / "out/app1/etc/greenflask/greenflask.env").read_text())
    assert urllib.parse.unquote(env["DATABASE_URL"]) == (
        "postgresql://greenflask_app@192.0.2.70:5432/todos?sslmode=verify-full&sslrootcert=/etc/greenflask/tls/ca.crt")
    assert env["DB_PGBOUNCER"] == "0" and "DATABASE_READ_URL" not in env
    targets = json.loads((tmp_path / "out/mon1/etc/prometheus/greenflask/targets/pgbouncer.json").read_text())
    assert targets == []
