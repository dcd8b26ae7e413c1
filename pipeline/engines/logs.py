"""Where an engine's own output goes: the run's `engine.log`, not the console.

vLLM (and Triton, NUMA, torch under it) print dozens of lines per engine, from this process and
from the engine processes it starts. The CLI names a log file in $TAPO_ENGINE_LOG (`tapo -v`
leaves it unset: everything on the console, as before); `engine_output()` then sends file
descriptors 1 and 2 to it while an engine is built (so the processes it starts write there for
good) and while it generates, and `route_logger()` sends a library's Python logger there.
Our progress bars and round lines stay on the console.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "TAPO_ENGINE_LOG"


def engine_log() -> Path | None:
    """The log file the CLI chose for engine output, or None (the console)."""
    return Path(os.environ[ENV]) if os.environ.get(ENV) else None


@contextmanager
def engine_output() -> Iterator[None]:
    """Inside, stdout and stderr (the file descriptors: C code and child processes too) append
    to engine_log(); a no-op when there is none."""
    path = engine_log()
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        with open(path, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def route_logger(name: str) -> None:
    """The Python logger `name` (e.g. "vllm") writes to engine_log() only (no console
    handlers, no propagation); a no-op when there is none."""
    path = engine_log()
    if path is None:
        return
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(logging.FileHandler(path))
    logger.propagate = False
