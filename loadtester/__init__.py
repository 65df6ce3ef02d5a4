"""The load tester behind `python loadtest.py`: one module per job.

    measure   one request and its outcome, the server's probe, the client's open files
    report    the one summary of every mode, its HDR histograms (encoded in --json) and timeline
    fleet     the client spread over processes, each with its own event loop and aiohttp session
    interrupt Ctrl-C: a flag the waits look at, so that no mode loses it
    burst, closed, openloop, capacity, matrix, merge
              the modes: each a `run(...)` returning a `Run` (its reports and --json parts)
    walls     which of the server's limits a burst met
    output    what is printed;  plots  what --plot draws

`loadtest.py` is the command line only; tests and bench/ import this package.
"""
