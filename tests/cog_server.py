"""Start Cog's real HTTP server the way a user does (`make serve` / `make serve-stream`) and talk to it."""
from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(data: bytes, suffix: str = ".png") -> str:
    mime = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg"}.get(suffix, "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class CogServer:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=10).json()

    def predict(self, inputs: dict, timeout: float = 300, **fields) -> requests.Response:
        """POST /predictions (synchronous), once: no retry, so a 409 shows."""
        return requests.post(f"{self.url}/predictions", json={"input": inputs, **fields}, timeout=timeout)

    def predict_async(self, inputs: dict, prediction_id: str, webhook: str) -> requests.Response:
        return requests.post(f"{self.url}/predictions", json={"id": prediction_id, "input": inputs, "webhook": webhook},
                             headers={"Prefer": "respond-async"}, timeout=30)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]


@contextlib.contextmanager
def make_serve(target: str, project_dir: Path, log: Path, expect: str = "READY", **env_overrides: str) -> Iterator[CogServer]:
    """``make <target>`` on a free loopback port, until its health says ``expect`` (READY, or SETUP_FAILED for
    a setup that must fail), then stopped (SIGTERM to its process group)."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_overrides}
    for name in ("DEEPSEEK_VL2_DTYPE", "COG_MAX_CONCURRENCY", "MAKEFLAGS", "MFLAGS"):
        if name not in env_overrides:
            env.pop(name, None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(["make", "--no-print-directory", target, f"PORT={port}", "HOST=127.0.0.1"],
                                cwd=project_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = CogServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"cog server exited with {proc.returncode}:\n{server.logs()}")
            try:
                status = server.health().get("status")
            except requests.RequestException:
                status = None
            if status == expect:
                break
            if status in ("READY", "SETUP_FAILED", "DEFUNCT"):
                pytest.fail(f"cog server setup failed ({status}):\n{server.logs()}")
            time.sleep(0.5)
        else:
            pytest.fail(f"cog server not {expect} after {STARTUP_TIMEOUT_S} s (last status {status}):\n{server.logs()}")
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
