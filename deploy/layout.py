"""Where a rendered host keeps its files, and what a render of one host is.

Every path a rendered file names is under `root` (`/` on a real host; the cluster, whose
hosts share one machine, gives each its own). Programs are the packages' own
(/usr/sbin/haproxy, /usr/bin/patroni, ...) and the app is installed at `prefix`.
"""

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

UNIT_DIR = "etc/systemd/system"


@dataclass(frozen=True)
class Layout:
    root: PurePosixPath
    prefix: PurePosixPath  # the app's folder: its code
    venv: PurePosixPath  # its virtualenv (PREFIX/.venv)

    def path(self, relative: str) -> str:
        """`relative` ("etc/haproxy/haproxy.cfg") under the root, as the files name it."""
        return str(self.root / relative)

    def program(self, name: str) -> str:
        """A program of the app's virtualenv (python, gunicorn)."""
        return str(self.venv / "bin" / name)


@dataclass(frozen=True)
class File:
    path: str  # relative to the root
    text: str
    mode: int = 0o644


@dataclass(frozen=True)
class Need:
    """A file the render does not write (a secret, a certificate): its operator puts it there."""

    path: str  # as the configs name it (under the root)
    what: str  # which one: "the CA's certificate", "PgBouncer's auth_file", ...
    mode: int = 0o600
    owner: str = "root"
    # Which of deploy/credentials.py's files it is ("ca", "app_passfile", "cert:pgbouncer",
    # ...; "folder": an empty folder, which systemd's RuntimeDirectory= makes on a real host).
    kind: str = ""


@dataclass
class Rendered:
    """Everything one host runs."""

    name: str
    files: list[File] = field(default_factory=list)
    units: list[str] = field(default_factory=list)  # in the order to enable them
    needs: list[Need] = field(default_factory=list)

    def add(self, relative: str, text: str, mode: int = 0o644) -> None:
        self.files.append(File(relative, text, mode))

    def add_unit(self, name: str, text: str) -> None:
        self.add(f"{UNIT_DIR}/{name}", text)
        self.units.append(name)

    def write(self, folder: Path) -> None:
        """The files under `folder` as they lie under the root, and NEEDS: the rest."""
        for file in self.files:
            target = folder / file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file.text)
            target.chmod(file.mode)
        lines = [f"{need.path}{'/' if need.kind == 'folder' else ''} {need.mode:o} {need.owner}  # {need.what}\n"
                 for need in self.needs]
        (folder / "NEEDS").write_text("# path mode owner: the files this host needs that the render does not write\n"
                                      + "".join(lines))
