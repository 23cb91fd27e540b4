"""Trainings and scoring runs (child processes) end with the server that started them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from appcore import lifecycle
from appcore.lifecycle import SERVER_PID_ENV, STOPPING_ENV, die_with_server, is_task_process, stop_children
from tests.apps import unwatched_app
from tests.conftest import HIPPO, ROOT, requires_shared
from tests.servers import monailabel_server

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def gone(pid: int, within: float) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its reaper counts as ended) within ``within`` s."""
    deadline = time.monotonic() + within
    while True:  # at least one look, also with ``within`` 0
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def end(process: subprocess.Popen, *others: int) -> None:
    """Kill ``process`` (and wait for it) and the processes ``others``, whichever still run."""
    process.kill()
    process.wait()
    for pid in others:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


def python(code: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )


TASK = textwrap.dedent(
    """
    import time
    from appcore.lifecycle import die_with_server
    assert die_with_server()
    print("ready", flush=True)
    time.sleep(120)
    """
)


@linux_only
def test_a_task_ends_when_its_server_is_killed() -> None:
    # A stand-in server: records its pid, starts a task as MONAI Label does, prints the task's pid.
    server = python(
        f"""
        import os, subprocess, sys, time
        os.environ[{SERVER_PID_ENV!r}] = str(os.getpid())
        task = subprocess.Popen([sys.executable, "-c", {TASK!r}], stdout=subprocess.PIPE, text=True)
        assert task.stdout.readline().strip() == "ready"
        print(task.pid, flush=True)
        time.sleep(120)
        """
    )
    task = int(server.stdout.readline())
    try:
        assert not gone(task, within=0.5), "the task should run while its server does"
        server.kill()  # as kill -9 or the out-of-memory killer would
        assert gone(task, within=10), "the task outlived its server"
    finally:
        end(server, task)


@linux_only
def test_a_task_whose_server_is_already_gone_stops_at_once() -> None:
    # The server recorded is not the task's parent: it died and the task was re-parented before
    # it could ask to be told.
    dead = subprocess.Popen(["true"])
    dead.wait()
    task = python(TASK, env={SERVER_PID_ENV: str(dead.pid)})
    try:
        assert task.wait(timeout=30) == -signal.SIGTERM
        assert task.stdout.read() == ""
    finally:
        task.kill()


def test_a_task_started_while_its_server_stops_ends_before_running() -> None:
    # MONAI Label's queue starts the next task as soon as the running one is killed; uvicorn's
    # shutdown may still wait for an upload meanwhile.
    task = python(TASK, env={SERVER_PID_ENV: str(os.getpid()), STOPPING_ENV: "1"})
    try:
        assert task.wait(timeout=30) == -signal.SIGTERM
        assert task.stdout.read() == ""
    finally:
        task.kill()


@pytest.fixture
def stopping(monkeypatch: pytest.MonkeyPatch):
    """The server process (here: pytest's) has been told to stop; undone afterwards."""
    monkeypatch.setenv(STOPPING_ENV, "")  # restored (removed) by monkeypatch after mark_stopping sets it
    lifecycle.mark_stopping()
    yield
    lifecycle._STOPPING.clear()


@requires_shared
@pytest.mark.slow
def test_a_training_inside_the_server_ends_and_publishes_nothing_once_it_stops(tmp_path: Path, stopping) -> None:
    from tests.apps import make_app

    app = make_app(tmp_path, "hippocampus", labelled=2)
    app.train({"model": "hippocampus", "max_epochs": 200, "train_batch_size": 1, "device": "cpu"})
    assert not app.published_weights("hippocampus").exists(), "a run ended by the server's stop published weights"
    last = app._trainers["hippocampus"].stats()["last_run"]
    assert last["published"] is False and "told to stop" in last["stopped"]


@pytest.mark.slow
def test_a_pathology_training_inside_the_server_ends_and_publishes_nothing(tmp_path: Path, stopping) -> None:
    from PIL import Image

    from pathology.app import PathologyApp

    studies = tmp_path / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(studies / "tile.png")
    mask = np.zeros((128, 128), np.uint16)
    mask[40:60, 40:60] = 1
    Image.fromarray(mask).save(tmp_path / "label.png")
    app = unwatched_app(tmp_path / "app", studies, {"models": "nuclei", "score_on_start": "false"}, PathologyApp)
    app.datastore().save_label("tile", str(tmp_path / "label.png"), "final", {})
    with pytest.raises(RuntimeError, match="told to stop"):
        app._trainers["nuclei"]({"max_epochs": 500, "train_batch_size": 2, "device": "cpu"}, app.datastore())
    assert not app.published_weights("nuclei").exists()


def test_outside_a_server_nothing_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SERVER_PID_ENV, raising=False)
    assert die_with_server() is False
    assert is_task_process() is False  # pytest, not MONAI Label's task runner


def test_stop_children_kills_each_task_and_what_it_started(monkeypatch: pytest.MonkeyPatch) -> None:
    from monailabel.utils.async_tasks import utils

    # A "training" that started a worker of its own, and a "scoring" run that has already ended.
    training = subprocess.Popen(["sh", "-c", "sleep 120 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    worker = int(training.stdout.readline())
    ended = subprocess.Popen(["true"])
    ended.wait()
    monkeypatch.setattr(utils, "background_processes", {"train": {"t1": training}, "scoring": {"s1": ended}})
    try:
        assert stop_children() == 1
        assert gone(training.pid, within=5) and gone(worker, within=5)
    finally:
        end(training, worker)


@linux_only
def test_the_stop_signal_kills_the_tasks_first_then_reaches_the_server_s_own_handler() -> None:
    # In a process of its own: signal handlers are process-wide.
    proc = python(
        """
        import os, signal, subprocess, time
        from monailabel.utils.async_tasks import utils
        from appcore.lifecycle import children_stop_with_server

        seen = []
        signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # uvicorn's, say
        task = subprocess.Popen(["sleep", "120"])
        utils.background_processes["train"] = {"t": task}
        assert children_stop_with_server()
        assert children_stop_with_server()  # twice: still one wrapper
        os.kill(os.getpid(), signal.SIGTERM)
        task.wait(timeout=10)
        from appcore.lifecycle import server_stopping
        print(task.returncode, seen, os.environ["ACTIVE_LABEL_SERVER_PID"] == str(os.getpid()), flush=True)
        print(server_stopping(), os.environ.get("ACTIVE_LABEL_SERVER_STOPPING"), flush=True)
        """
    )
    out, _ = proc.communicate(timeout=60)
    assert out.split() == [str(-signal.SIGKILL), f"[{int(signal.SIGTERM)}]", "True", "True", "1"]


def _training_child(server_pid: int, timeout: float = 120) -> psutil.Process:
    """The MONAI Label task process the server started for ``POST /train``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(server_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a child that ended meanwhile
                if "monailabel.interfaces.utils.app" in " ".join(child.cmdline()):
                    return child
        time.sleep(0.2)
    raise AssertionError("no training process appeared")


@requires_shared
@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["kill", "kill-9"])
def test_a_training_ends_with_the_real_server(tmp_path: Path, stop: signal.Signals) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    for case in sorted((HIPPO / "imagesTr").glob("*.nii.gz"))[:3]:
        shutil.copyfile(case, studies / case.name)
        (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HIPPO / "labelsTr" / case.name, studies / "labels" / "final" / case.name)
    conf = {"models": "hippocampus", "score_on_start": "false"}
    with monailabel_server(tmp_path, str(studies), conf) as server:
        r = server.http.post("/train/hippocampus", json={"max_epochs": 500})
        assert r.status_code == 200, r.text
        child = _training_child(server.process.pid)
        # Only the server is signalled, as by `kill PID` or a supervisor; not its process group.
        os.kill(server.process.pid, stop)
        assert gone(child.pid, within=30), f"the training (pid {child.pid}) outlived the server after {stop.name}"
        server.process.wait(timeout=30)
        assert not (tmp_path / "app" / "model" / "hippocampus.pt").exists(), "a killed training published weights"
