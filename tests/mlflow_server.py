"""A real ``mlflow server`` on 127.0.0.1 for tests (plain helpers; the fixtures live in the tests).

Startup takes ~7 s on 2 cores with one worker and MLflow's job runner disabled
(see shared/notes/FACTS.md), so tests share one server per module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as response:
            return response.status == 200
    except OSError:  # refused while starting, or a timeout
        return False


def start_mlflow_server(tmp_dir: str | Path, port: int | None = None) -> tuple[str, subprocess.Popen]:
    """Start ``mlflow server`` with a sqlite store and served artifacts under ``tmp_dir``, on
    ``port`` (default: a free one; the same directory and port again restart a killed server).

    Returns ``(url, process)`` once ``/health`` answers; its output is appended to
    ``tmp_dir/server.log``. Stop it with :func:`stop_mlflow_server` or :func:`kill_mlflow_server`.
    """
    tmp_dir = Path(tmp_dir).absolute()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{tmp_dir / 'mlflow.db'}",
               "--artifacts-destination", str(tmp_dir / "mlartifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = tmp_dir / "server.log"
    with open(log_path, "ab") as log:  # its own process group, so that a kill reaches its workers too
        process = subprocess.Popen(command, cwd=tmp_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_mlflow_server(process)
            raise RuntimeError(f"mlflow server did not become healthy at {url}:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.25)
    return url, process


def stop_mlflow_server(process: subprocess.Popen) -> None:
    """SIGTERM the server's main process (it stops its workers), SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kill_mlflow_server(process)


def kill_mlflow_server(process: subprocess.Popen) -> None:
    """SIGKILL the server and its workers at once, as a crash or an OOM kill would: no clean shutdown,
    and nothing answers on its port afterwards."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class RestartableServer:
    """A real ``mlflow server`` that a test can kill (as a crash would) and start again on the same
    port and store, so that clients holding its URL reach the new one."""

    def __init__(self, tmp_dir: str | Path) -> None:
        self.directory = Path(tmp_dir)
        self.url, self.process = start_mlflow_server(self.directory)

    def kill(self) -> None:
        kill_mlflow_server(self.process)

    def restart(self) -> None:
        """Start the server again on its port and store, unless it is running."""
        if self.process.poll() is None:
            return
        port = int(self.url.rsplit(":", 1)[1])
        self.url, self.process = start_mlflow_server(self.directory, port=port)

    def stop(self) -> None:
        stop_mlflow_server(self.process)
