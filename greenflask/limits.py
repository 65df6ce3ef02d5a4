"""The open-file limit, which every client connection and every pooled connection count
against: a worker with 10,000 connections needs more than the 1,024 many shells give.

The soft limit may be raised up to the hard one by the process itself (what `ulimit -n`
does in a shell); past the hard limit only root, or the system's configuration, can help.
"""

import resource

# Besides its connections a process holds log files, listening sockets, the metrics files,
# the event loop's own descriptors and the server's unix socket: room for them.
SPARE = 64


def open_files() -> tuple[int, int]:
    """(soft, hard) limits on open files of this process."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_open_files(needed: int) -> tuple[int, int]:
    """Raise the soft limit to `needed`, or as far as the hard limit allows; (soft, hard) after."""
    soft, hard = open_files()
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return open_files()
