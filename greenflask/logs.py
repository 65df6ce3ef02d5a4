"""The app's log lines: one format for every process, and driver errors in one line."""

import logging

FORMAT = "[%(process)d] [%(levelname)s] %(name)s: %(message)s"


def configure() -> None:
    """Log INFO and up to stderr, unless the process (a test runner, gunicorn) already set up
    logging of its own."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=FORMAT)


def first_line(error: BaseException) -> str:
    """The driver's message without its SQL context lines, for a one-line log entry."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
