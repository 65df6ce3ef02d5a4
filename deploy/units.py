"""systemd units and environment files, as the render writes them and the tests read them back.

A unit is sections of `Key=value` lines (systemd.unit(5)); the keys repeat (`After=`,
`Environment=`), so it is a list of pairs, not a dict, and `configparser` cannot read it.
"""

import shlex
from dataclasses import dataclass
from pathlib import Path

Section = list[tuple[str, str]]

# The app's hardening, each setting a line of `systemd-analyze security`'s table: the
# service sees the file system read-only (but its runtime folder), no other user's files,
# no devices, kernel knobs, logs or clock, no new privileges or capabilities, only
# IPv4/IPv6/unix sockets, and system calls of the @system-service set. Measured by
# tests/test_render.py (systemd-analyze security --offline=true).
HARDENED: Section = [
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("DevicePolicy", "closed"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectProc", "invisible"),
    ("ProcSubset", "pid"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("RemoveIPC", "yes"),
    ("PrivateUsers", "yes"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("SystemCallArchitectures", "native"),
    ("SystemCallFilter", "@system-service"),
    ("SystemCallFilter", "~@privileged @resources"),
    ("UMask", "0077"),
]

# What every other service gets: it runs a packaged server (HAProxy, PgBouncer, Patroni,
# etcd, Prometheus) whose own Debian unit is no stricter.
BASELINE: Section = [("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"), ("ProtectHome", "yes")]


def unit(description: str, service: Section, after: tuple[str, ...] = ("network-online.target",)) -> str:
    """A service unit: [Unit] with its ordering, [Service] as given, [Install] multi-user."""
    sections = {
        "Unit": [("Description", description), *(("After", name) for name in after),
                 *(("Wants", name) for name in after if name.endswith(".target"))],
        "Service": service,
        "Install": [("WantedBy", "multi-user.target")],
    }
    return "\n".join(f"[{name}]\n" + "".join(f"{key}={value}\n" for key, value in lines)
                     for name, lines in sections.items())


def parse(text: str) -> dict[str, Section]:
    """{section: [(key, value), ...]} of a unit's text (comments and blank lines skipped)."""
    sections: dict[str, Section] = {}
    current: Section = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def environment_file(text: str) -> dict[str, str]:
    """The pairs of an EnvironmentFile (systemd.exec(5)): KEY=value lines, quotes removed."""
    pairs = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            pairs[key.strip()] = " ".join(shlex.split(value)) if value.strip() else ""
    return pairs


def environment_text(pairs: dict[str, str]) -> str:
    """An EnvironmentFile's text, each value quoted when it must be."""
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in pairs.items())


@dataclass(frozen=True)
class Command:
    """What a service unit runs, as systemd would: its ExecStartPre and ExecStart lines as
    argv, its environment (Environment= and the EnvironmentFile=s, read now), its User."""

    before: list[list[str]]
    argv: list[str]
    env: dict[str, str]
    user: str | None
    working_directory: Path | None


def command(unit_path: Path) -> Command:
    service = parse(unit_path.read_text()).get("Service", [])
    env: dict[str, str] = {}
    for key, value in service:
        if key == "Environment":
            env.update(environment_file(value))
        elif key == "EnvironmentFile":
            env.update(environment_file(Path(value.removeprefix("-")).read_text()))
    values = dict(service)
    return Command([shlex.split(value) for key, value in service if key == "ExecStartPre"],
                   shlex.split(values["ExecStart"]), env, values.get("User"),
                   Path(values["WorkingDirectory"]) if values.get("WorkingDirectory") else None)
