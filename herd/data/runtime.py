"""How the pipeline's datatrove executors behave on this machine: where their log lines go, and
that their worker processes never outlive the command that started them.

Logs: datatrove logs every task at INFO to stderr (hundreds of lines for a 2 MB run), burying
herd's own progress. `datatrove_logs(path)` sends them to a log file instead (each task also keeps
its own logs/task_NNNNN.log in the stage folder); `--verbose` keeps them on the console.
datatrove re-points its logger at `sys.stderr` whenever a task starts or ends
(datatrove.utils.logging.add_task_logger / close_task_logger), so those two are wrapped to see
the log file as stderr while they set the logger up.

Workers: the local executor runs tasks in a pool of forked processes, fed through a queue that a
forked multiprocess Manager process serves. If the command is killed, those would be orphaned
and wait forever. Each of them (a pool worker when a task starts in it, the Manager when its
server starts) asks Linux to kill it when its parent dies (prctl PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_PR_SET_PDEATHSIG = 1


@contextmanager
def executor_runtime(log_path: str | os.PathLike | None) -> Iterator[None]:
    """While inside, datatrove's log lines go to `log_path` (appended; None keeps them on stderr), and
    every task that runs in a worker process dies with the process that started it."""
    import datatrove.executor.base as executor_base
    from loguru import logger

    launcher = os.getpid()
    stream = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "a", encoding="utf-8", buffering=1)  # line-buffered: forked tasks append whole lines
    originals = executor_base.add_task_logger, executor_base.close_task_logger

    def wrap(fn: Any, starts_task: bool) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if starts_task and os.getpid() != launcher:  # a pool worker (not the command itself)
                die_with_parent(launcher)
            if stream is None:
                return fn(*args, **kwargs)
            real, sys.stderr = sys.stderr, stream  # datatrove points its logger at sys.stderr
            try:
                return fn(*args, **kwargs)
            finally:
                sys.stderr = real
        return wrapped

    executor_base.add_task_logger = wrap(originals[0], True)
    executor_base.close_task_logger = wrap(originals[1], False)
    # the executor's multiprocess Manager (a server process holding the pool's queue) is forked
    # from this process too, and would otherwise outlive it forever
    import multiprocess.managers as managers

    run_server = managers.BaseManager.__dict__["_run_server"]

    def _run_server(cls: Any, *args: Any, **kwargs: Any) -> Any:
        if os.getpid() != launcher:
            die_with_parent(launcher)
        return run_server.__func__(cls, *args, **kwargs)

    managers.BaseManager._run_server = classmethod(_run_server)
    if stream is not None:
        logger.remove()
        logger.add(stream, level="INFO")
    try:
        yield
    finally:
        executor_base.add_task_logger, executor_base.close_task_logger = originals
        managers.BaseManager._run_server = run_server
        if stream is not None:
            logger.remove()  # every sink datatrove left pointing at the log file
            logger.add(sys.stderr, level="INFO")
            stream.close()


def die_with_parent(parent: int) -> None:
    """In a forked worker: have the kernel send SIGKILL when the parent process exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: an orphan is then possible, nothing else changes
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
