"""The real Cog HTTP server (coglet), driven over loopback HTTP the way a Replicate client does.

One server for the whole module: ``python -m cog.server.http`` with ``DEEPSEEK_VL2_WEIGHTS`` pointing at
a fixture checkpoint, after writing ``.cog/openapi_schema.json`` exactly as ``make serve`` does.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

EOS = "<｜end▁of▁sentence｜>"
GOLDEN_CASE = ("mha", "single_tiled")
STARTUP_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CogServer:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=10).json()

    def predict(self, inputs: dict, timeout: float = 300) -> requests.Response:
        """POST /predictions (synchronous). Retries briefly while the single slot is still being released."""
        deadline = time.monotonic() + 30
        while True:
            resp = requests.post(f"{self.url}/predictions", json={"input": inputs}, timeout=timeout)
            if resp.status_code != 409 or time.monotonic() > deadline:
                return resp
            time.sleep(0.2)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]


@pytest.fixture(scope="module")
def server(project_dir, fixtures_dir, tmp_path_factory):
    venv_bin = Path(sys.executable).parent
    subprocess.run([sys.executable, str(project_dir / "scripts" / "write_openapi_schema.py")],
                   cwd=project_dir, check=True, capture_output=True, timeout=120)
    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",  # coglet's worker runs `python`
        "PORT": str(port),
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "DEEPSEEK_VL2_WEIGHTS": str(fixtures_dir / "checkpoints" / GOLDEN_CASE[0]),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("DEEPSEEK_VL2_DTYPE", None)
    log = tmp_path_factory.mktemp("cog") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=project_dir,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = CogServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"cog server exited with {proc.returncode}:\n{srv.logs()}")
            try:
                status = srv.health().get("status")
            except requests.RequestException:
                status = None
            if status == "READY":
                break
            if status in ("SETUP_FAILED", "DEFUNCT"):
                pytest.fail(f"cog server setup failed ({status}):\n{srv.logs()}")
            time.sleep(0.5)
        else:
            pytest.fail(f"cog server not READY after {STARTUP_TIMEOUT_S} s (last status {status}):\n{srv.logs()}")
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _data_uri(data: bytes, suffix: str = ".png") -> str:
    mime = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg"}.get(suffix, "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    case_dir = fixtures_dir / "cases" / GOLDEN_CASE[0] / GOLDEN_CASE[1]
    case = json.loads((case_dir / "case.json").read_text())
    user = case["conversation"][0]
    assert len(user["images"]) == 1 and case["conversation"][1]["content"] == ""
    request = {
        "image": _data_uri((fixtures_dir / "images" / user["images"][0]).read_bytes()),
        "prompt": user["content"],
        "temperature": 0,
        "repetition_penalty": case["generation"]["repetition_penalty"],
        "max_length_tokens": len(case["generated_ids"]),
    }
    return request, case["generated_text"].replace(EOS, ""), user["images"][0]


@pytest.fixture(scope="module")
def small_image(fixtures_dir) -> str:
    return _data_uri((fixtures_dir / "images" / "small_palette_100x80.png").read_bytes())


# --------------------------------------------------------------------------------------------


def test_health_is_ready(server):
    health = server.health()
    assert health["status"] == "READY"
    assert health["setup"]["status"] == "succeeded"


def test_openapi_schema_has_exactly_the_documented_api(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    inp = schema["components"]["schemas"]["Input"]
    props = inp["properties"]
    # the server sorts keys; the documented order is carried by x-order
    assert sorted(props, key=lambda n: props[n]["x-order"]) == [
        "image", "prompt", "top_p", "temperature", "max_length_tokens", "repetition_penalty"]
    assert sorted(inp["required"]) == ["image", "prompt"]
    expected = {
        "image": {"type": "string", "format": "uri", "description": "Input image file"},
        "prompt": {"type": "string", "description": "Text prompt to guide the model"},
        "top_p": {"type": "number", "default": 0.9, "minimum": 0, "maximum": 1,
                  "description": "Top-p sampling parameter"},
        "temperature": {"type": "number", "default": 0.1, "minimum": 0, "maximum": 1,
                        "description": "Temperature for sampling"},
        "max_length_tokens": {"type": "integer", "default": 2048, "minimum": 0, "maximum": 4096,
                              "description": "Maximum number of tokens to generate"},
        "repetition_penalty": {"type": "number", "default": 1.1, "minimum": 0, "maximum": 2,
                               "description": "Repetition penalty"},
    }
    for name, want in expected.items():
        got = {k: v for k, v in props[name].items() if k in want}
        assert got == want, name
        if "default" not in want:
            assert "default" not in props[name], name
    assert sorted(props[n]["x-order"] for n in props) == list(range(6))
    output = schema["components"]["schemas"]["Output"]
    assert output["type"] == "string"


@pytest.mark.parametrize("field,value", [
    ("top_p", 1.5), ("top_p", -0.1), ("temperature", 1.01), ("temperature", -1),
    ("max_length_tokens", 4097), ("max_length_tokens", -1), ("repetition_penalty", 2.5),
    ("repetition_penalty", -0.5),
])
def test_out_of_range_is_rejected_with_422(server, small_image, field, value):
    resp = server.predict({"image": small_image, "prompt": "Hi", field: value})
    assert resp.status_code == 422, resp.text
    assert field in resp.text


def test_missing_required_input_is_rejected_with_422(server, small_image):
    assert server.predict({"image": small_image}).status_code == 422
    assert server.predict({"prompt": "Hi"}).status_code == 422


def test_greedy_prediction_matches_the_golden_answer(server, golden):
    request, expected, _ = golden
    resp = server.predict(request)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "succeeded", body
    assert body["output"] == expected


def test_same_request_twice_gives_the_same_answer(server, golden):
    request, _, _ = golden
    request = {**request, "max_length_tokens": 24, "repetition_penalty": 1.1}
    first = server.predict(request).json()
    second = server.predict(request).json()
    assert first["status"] == second["status"] == "succeeded"
    assert first["output"] == second["output"]


def test_defaults_apply_when_only_image_and_prompt_are_sent(server, small_image):
    body = server.predict({"image": small_image, "prompt": "What is this?", "max_length_tokens": 8}).json()
    assert body["status"] == "succeeded", body
    assert isinstance(body["output"], str)


def test_max_length_zero_returns_empty(server, small_image):
    body = server.predict({"image": small_image, "prompt": "What is this?", "max_length_tokens": 0}).json()
    assert body["status"] == "succeeded" and body["output"] == ""


def test_image_tag_inside_the_prompt(server, small_image):
    body = server.predict({"image": small_image, "prompt": "Describe each stage of this <image> in detail",
                           "max_length_tokens": 4, "temperature": 0}).json()
    assert body["status"] == "succeeded", body


def _assert_failed_clearly(server, resp, *needles: str) -> None:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "failed", body
    error = body.get("error") or ""
    assert "Traceback" not in error and 'File "' not in error, error
    for needle in needles:
        assert needle.lower() in error.lower(), error
    _assert_ready_soon(server)


def _assert_ready_soon(server, within_s: float = 15) -> None:
    """READY again once the slot is released (health may say BUSY for a moment after a reply)."""
    deadline = time.monotonic() + within_s
    while (status := server.health()["status"]) == "BUSY" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == "READY", server.logs()


@pytest.mark.parametrize("name,needle", [
    ("not_an_image", "not an image"),
    ("truncated", "truncated"),
    ("zero_bytes", "empty"),
    ("zero_width", "image"),
    ("decompression_bomb", "too large"),
])
def test_bad_image_fails_clearly_and_server_stays_ready(server, bad_images, name, needle):
    suffix, data = bad_images[name]
    resp = server.predict({"image": _data_uri(data, suffix), "prompt": "Describe.", "max_length_tokens": 4})
    _assert_failed_clearly(server, resp, needle)


@pytest.mark.parametrize("prompt,needle", [
    ("", "prompt is empty"),
    ("   \n\t", "prompt is empty"),
    ("Compare <image> and <image>.", "only one image"),
    ("describe the picture " * 3000, "prompt is too long"),
])
def test_bad_prompt_fails_clearly_and_server_stays_ready(server, small_image, prompt, needle):
    resp = server.predict({"image": small_image, "prompt": prompt, "max_length_tokens": 4})
    _assert_failed_clearly(server, resp, needle)


@pytest.fixture(scope="module")
def image_host(fixtures_dir):
    """A loopback web server for the fixture images (an image given by URL)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(fixtures_dir / "images"))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_image_by_url(server, image_host, golden):
    request, expected, name = golden
    body = server.predict({**request, "image": f"{image_host}/{name}"}).json()
    assert body["status"] == "succeeded", body
    assert body["output"] == expected


def test_unreachable_url_fails_clearly_and_server_stays_ready(server):
    url = f"http://127.0.0.1:{_free_port()}/missing.png"
    resp = server.predict({"image": url, "prompt": "Describe.", "max_length_tokens": 4})
    _assert_failed_clearly(server, resp, f"Cannot download the image from {url}", "cannot be reached")


def test_missing_url_fails_clearly_and_server_stays_ready(server, image_host):
    url = f"{image_host}/no-such-image.png"
    resp = server.predict({"image": url, "prompt": "Describe.", "max_length_tokens": 4})
    _assert_failed_clearly(server, resp, f"Cannot download the image from {url}", "HTTP 404")


@pytest.mark.parametrize("name", ["animated_gif", "cmyk_jpeg", "sixteen_bit_png"])
def test_unusual_images_succeed(server, unusual_images, name):
    suffix, data = unusual_images[name]
    body = server.predict({"image": _data_uri(data, suffix), "prompt": "Describe.", "max_length_tokens": 4,
                           "temperature": 0}).json()
    assert body["status"] == "succeeded", body
    assert isinstance(body["output"], str)


def test_server_is_still_healthy_at_the_end(server, golden):
    request, expected, _ = golden
    _assert_ready_soon(server)
    assert server.predict(request).json()["output"] == expected
