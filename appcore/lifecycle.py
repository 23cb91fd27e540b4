"""Background trainings and scoring runs end with the server that started them.

MONAI Label runs ``POST /train`` and scoring in a child process (``python -m
monailabel.interfaces.utils.app``) and does nothing about it when the server stops. A server
stopped with ``kill PID`` (a process supervisor, a script) or killed outright (``kill -9``, the
out-of-memory killer) left that child running: a training would then publish weights to a server
that is no longer there, and a restarted server could start a second training on the same model
beside it. Ctrl-C in a terminal was never affected: it signals the child too.

Here the server notes its process id in ``SERVER_PID_ENV``, which the child inherits. The child asks
Linux for ``SIGTERM`` when its parent dies (``PR_SET_PDEATHSIG``), and ends at once if the server
is already gone. The server, on ``SIGTERM`` or ``SIGINT``, first kills its running children, then
lets uvicorn shut down as before. A training killed this way publishes nothing: weights are
written to a temporary file and renamed (``appcore.weights``).

Uvicorn's shutdown waits for requests still in progress (an upload, a ``run_sync`` training), and
MONAI Label's task queue starts the next queued task as soon as the running one ends. So from the
stop signal on, ``server_stopping()`` is true in the server (its in-process trainings stop at the
next step and publish nothing), and ``STOPPING_ENV`` is set, so that a task started after it ends
before doing anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Any

logger = logging.getLogger(__name__)

SERVER_PID_ENV = "ACTIVE_LABEL_SERVER_PID"
STOPPING_ENV = "ACTIVE_LABEL_SERVER_STOPPING"
TASK_MODULE = "monailabel.interfaces.utils.app"  # what MONAI Label runs as a training or scoring child
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_STOPPING = threading.Event()


def server_stopping() -> bool:
    """Whether the server this runs in has been told to stop: trainings in its process end early
    and publish nothing."""
    return _STOPPING.is_set()


def mark_stopping() -> None:
    """From now on ``server_stopping()`` is true here and tasks started by this process end at once."""
    _STOPPING.set()
    os.environ[STOPPING_ENV] = "1"  # what MONAI Label's task processes inherit


def is_task_process() -> bool:
    """Whether this process is a MONAI Label training or scoring child (not the server)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) == TASK_MODULE


def die_with_server() -> bool:
    """In a task process: get ``SIGTERM`` when the server that started it dies; end now if it has.

    Returns whether the request was made (Linux, and a server recorded in ``SERVER_PID_ENV``).
    """
    if os.environ.get(STOPPING_ENV):
        logger.warning("The server that started this task is stopping: the task ends without running")
        os.kill(os.getpid(), signal.SIGTERM)
    server = os.environ.get(SERVER_PID_ENV, "")
    if not server.isdigit() or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        logger.warning("Could not tie this task to the server's life (prctl errno %d)", ctypes.get_errno())
        return False
    if os.getppid() != int(server):
        # The server died before the request took effect (or this is not its direct child).
        logger.warning("The server (pid %s) that started this task is gone: stopping", server)
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def background_children() -> list[Any]:
    """The running training and scoring child processes MONAI Label has started (``Popen``)."""
    from monailabel.utils.async_tasks import utils

    return [p for running in list(utils.background_processes.values()) for p in list(running.values())]


def stop_children() -> int:
    """Kill every running training or scoring child and its own children; returns how many."""
    import psutil

    stopped = 0
    for process in background_children():
        if process.poll() is not None:
            continue
        try:
            family = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for member in [*family, process]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                member.kill()
        stopped += 1
    return stopped


def children_stop_with_server() -> bool:
    """In the server: record its pid for the children, and kill them first when it is told to stop.

    The handlers uvicorn installed (which start its graceful shutdown) still run afterwards. Returns
    False where signal handlers cannot be set (not the main thread).
    """
    os.environ[SERVER_PID_ENV] = str(os.getpid())
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in _STOP_SIGNALS:
        previous = signal.getsignal(sig)
        if getattr(previous, "stops_children", False):
            continue

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            mark_stopping()
            stopped = stop_children()
            if stopped:
                logger.info("Stopped %d background task(s) on %s", stopped, signal.Signals(signum).name)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        handler.stops_children = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)
    return True
