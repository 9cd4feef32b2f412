"""Start Cog's real HTTP server the way a user does (`make serve` / `make serve-stream`) and talk to it."""
from __future__ import annotations

import base64
import contextlib
import json
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
EOS = "<｜end▁of▁sentence｜>"


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


def golden_request(fixtures_dir: Path, variant: str, case_name: str) -> tuple[dict, str, str]:
    """(the API's input for a single-image golden case, greedy; its golden answer without the
    end-of-sentence marker; the image's file name)."""
    case = json.loads((fixtures_dir / "cases" / variant / case_name / "case.json").read_text())
    user = case["conversation"][0]
    assert len(user["images"]) == 1 and case["conversation"][1]["content"] == ""
    request = {
        "image": data_uri((fixtures_dir / "images" / user["images"][0]).read_bytes()),
        "prompt": user["content"],
        "temperature": 0,
        "repetition_penalty": case["generation"]["repetition_penalty"],
        "max_length_tokens": len(case["generated_ids"]),
    }
    return request, case["generated_text"].replace(EOS, ""), user["images"][0]


def assert_ready_soon(server: CogServer, within_s: float = 15) -> None:
    """READY again once the slot is released (health may say BUSY for a moment after a reply)."""
    deadline = time.monotonic() + within_s
    while (status := server.health()["status"]) == "BUSY" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == "READY", server.logs()


def assert_failed_clearly(server: CogServer, resp: requests.Response, *needles: str) -> str:
    """The prediction failed with a plain message holding every needle (no traceback); the server is READY
    again. Returns the message."""
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "failed", body
    error = body.get("error") or ""
    assert "Traceback" not in error and 'File "' not in error, error
    for needle in needles:
        assert needle.lower() in error.lower(), error
    assert_ready_soon(server)
    return error
