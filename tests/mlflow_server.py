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


def start_mlflow_server(tmp_dir: str | Path) -> tuple[str, subprocess.Popen]:
    """Start ``mlflow server`` with a sqlite store and served artifacts under ``tmp_dir``.

    Returns ``(url, process)`` once ``/health`` answers; its output goes to
    ``tmp_dir/server.log``. Stop it with :func:`stop_mlflow_server`.
    """
    tmp_dir = Path(tmp_dir).absolute()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{tmp_dir / 'mlflow.db'}",
               "--artifacts-destination", str(tmp_dir / "mlartifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = tmp_dir / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=tmp_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
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
            process.kill()
            process.wait()
