"""A real ``monailabel start_server`` process for the tests that drive an app over HTTP."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import HIPPO, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    http: httpx.Client
    url: str
    log: Path
    process: subprocess.Popen
    tmp: Path  # the server's temporary folder (TMPDIR)


@contextmanager
def monailabel_server(
    root: Path,
    studies: str,
    conf: Mapping[str, str],
    *,
    app: str = "radiology",
    env: Mapping[str, str] | None = None,
    timeout: float = 180,
    http_timeout: float = 300,
    probe: str = "/info/",
    app_dir: Path | None = None,
) -> Iterator[Server]:
    """``monailabel start_server`` on a copy of ``apps/<app>`` in ``root/app``, on a free port.

    Waits until ``probe`` answers (with authentication on, a public route such as ``/auth/``),
    failing with the server log if the process dies first, and
    stops the whole process group on exit. The server's temporary files go to ``root/tmp``. Called
    again on the same ``root``, it restarts the server on the folders the first one left (its model
    folder, project database and log kept). ``app_dir``: the app folder (made there if absent) instead
    of ``root/app``, for servers that share one (and its model folder).
    """
    root.mkdir(parents=True, exist_ok=True)
    app_dir = app_dir or root / "app"
    shutil.copytree(
        ROOT / "apps" / app, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"), dirs_exist_ok=True
    )
    port = free_port()
    launcher = Path(sys.executable).parent / "monailabel"
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "monailabel.main"]
    cmd += ["start_server", "--app", str(app_dir), "--studies", studies, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "MONAILABEL_PYEXE": sys.executable,
        "MONAI_LABEL_TRACKING_ENABLED": "false",
        "TMPDIR": str(tmp),
        **(env or {}),
    }
    log_path = root / "server.log"
    log = log_path.open("a")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=http_timeout)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if http.get(probe).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server did not answer {probe} within {timeout} s"
            time.sleep(0.5)
        yield Server(http, url, log_path, proc, tmp)
    finally:
        http.close()
        with contextlib.suppress(ProcessLookupError):  # a test may have stopped the server and its tasks
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


@contextmanager
def one_case_server(root: Path, **conf: str) -> Iterator[Server]:
    """A radiology server on a studies folder of one real hippocampus case (``hippocampus_001``),
    serving ``hippocampus`` with no scoring at start, and ``conf`` on top."""
    case = HIPPO / "imagesTr" / "hippocampus_001.nii.gz"
    studies = root / "studies"
    studies.mkdir()
    shutil.copyfile(case, studies / case.name)
    base = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}
    with monailabel_server(root, str(studies), {**base, **conf}) as running:
        yield running
