"""The real Cog HTTP server (coglet), driven over loopback HTTP the way a Replicate client does.

One server for the whole module, started by ``make serve`` (which writes ``.cog/openapi_schema.json`` and
runs ``python -m cog.server.http``) with ``DEEPSEEK_VL2_WEIGHTS`` pointing at a fixture checkpoint and
``DEEPSEEK_VL2_MAX_CONCURRENCY=8``. Requests are never retried: a 409 fails the test.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from cog_server import data_uri as _data_uri
from cog_server import free_port as _free_port
from cog_server import assert_failed_clearly, assert_ready_soon, golden_request, make_serve

GOLDEN_CASE = ("mha", "single_tiled")
CONCURRENCY = 8
# Back-to-back predictions in test_back_to_back_predictions_never_see_409 (the acceptance run uses 300).
BACK_TO_BACK = int(os.environ.get("DEEPSEEK_VL2_BACK_TO_BACK", "100"))
# Greedy predictions each of CONCURRENCY clients sends back to back in
# test_clients_within_the_concurrency_sending_back_to_back_never_see_409 (issue 23's acceptance: 40).
CLIENT_BACK_TO_BACK = int(os.environ.get("DEEPSEEK_VL2_CLIENT_BACK_TO_BACK", "40"))
# Instant predictions each client sends back to back in
# test_clients_sending_instant_predictions_back_to_back_never_see_409.
INSTANT_BACK_TO_BACK = int(os.environ.get("DEEPSEEK_VL2_INSTANT_BACK_TO_BACK", "120"))


@pytest.fixture(scope="module")
def server(project_dir, fixtures_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("cog") / "server.log"
    with make_serve("serve", project_dir, log, DEEPSEEK_VL2_WEIGHTS=str(fixtures_dir / "checkpoints" / GOLDEN_CASE[0]),
                    DEEPSEEK_VL2_MAX_CONCURRENCY=str(CONCURRENCY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return golden_request(fixtures_dir, *GOLDEN_CASE)


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
    assert_failed_clearly(server, resp, needle)


@pytest.mark.parametrize("prompt,needle", [
    ("", "prompt is empty"),
    ("   \n\t", "prompt is empty"),
    ("Compare <image> and <image>.", "only one image"),
    ("describe the picture " * 3000, "prompt is too long"),
])
def test_bad_prompt_fails_clearly_and_server_stays_ready(server, small_image, prompt, needle):
    resp = server.predict({"image": small_image, "prompt": prompt, "max_length_tokens": 4})
    assert_failed_clearly(server, resp, needle)


def test_a_lone_surrogate_in_the_body_is_refused_readably_and_the_server_stays_ready(server, small_image):
    """JSON "\\ud800" in the prompt: Cog's own server (coglet's JSON parser, in Rust) refuses the body before
    the predictor sees it, with HTTP 400 naming the field; the server stays READY. A surrogate pair is one
    character and is answered. (Given one in Python, the library answers it as the official stack does:
    test_processor.py.)"""
    body = '{"input": {"image": "%s", "prompt": "What is \\ud800 this?", "max_length_tokens": 4}}' % small_image
    resp = requests.post(f"{server.url}/predictions", data=body, headers={"Content-Type": "application/json"},
                         timeout=60)
    assert resp.status_code == 400, resp.text
    assert "Failed to parse the request body as JSON: input.prompt" in resp.text, resp.text
    assert "Traceback" not in resp.text
    assert_ready_soon(server)
    pair = body.replace("\\ud800", "\\ud83d\\ude00")
    resp = requests.post(f"{server.url}/predictions", data=pair, headers={"Content-Type": "application/json"},
                         timeout=60)
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
    assert_ready_soon(server)


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
    assert_failed_clearly(server, resp, f"Cannot download the image from {url}", "cannot be reached")


def test_missing_url_fails_clearly_and_server_stays_ready(server, image_host):
    url = f"{image_host}/no-such-image.png"
    resp = server.predict({"image": url, "prompt": "Describe.", "max_length_tokens": 4})
    assert_failed_clearly(server, resp, f"Cannot download the image from {url}", "HTTP 404")


@pytest.mark.parametrize("name", ["animated_gif", "cmyk_jpeg", "sixteen_bit_png"])
def test_unusual_images_succeed(server, unusual_images, name):
    suffix, data = unusual_images[name]
    body = server.predict({"image": _data_uri(data, suffix), "prompt": "Describe.", "max_length_tokens": 4,
                           "temperature": 0}).json()
    assert body["status"] == "succeeded", body
    assert isinstance(body["output"], str)


def test_server_is_still_healthy_at_the_end(server, golden):
    request, expected, _ = golden
    assert_ready_soon(server)
    assert server.predict(request).json()["output"] == expected


# --------------------------------------------------------------------------------------------
# Many requests at once (the batching engine behind an async, concurrent predictor)


@pytest.fixture(scope="module")
def webhooks():
    """A loopback receiver for Cog's webhooks: prediction id -> every payload posted for it, in order."""
    import http.server

    received: dict[str, list[dict]] = {}
    arrived = threading.Condition()

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with arrived:
                received.setdefault(body.get("id", "?"), []).append(body)
                arrived.notify_all()
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def final(prediction_id: str, timeout: float = 60) -> dict:
        """The payload that ends the prediction (a terminal status)."""
        deadline = time.monotonic() + timeout
        with arrived:
            while True:
                done = [p for p in received.get(prediction_id, []) if p.get("status") in ("succeeded", "failed", "canceled")]
                if done:
                    return done[-1]
                left = deadline - time.monotonic()
                assert left > 0, f"no final webhook for {prediction_id}: {received.get(prediction_id)}"
                arrived.wait(left)

    yield f"http://127.0.0.1:{httpd.server_address[1]}/webhook", final
    httpd.shutdown()
    httpd.server_close()


def test_back_to_back_predictions_never_see_409(server, golden, small_image):
    """One client sending predictions one after another (each waits for the answer before the next): every
    one is a 200, and the greedy ones are exactly the golden answer. (One slot used to give 409s here: Cog
    frees a slot a moment after the answer.)"""
    request, expected, _ = golden
    short = {"image": small_image, "prompt": "Describe.", "max_length_tokens": 2}
    statuses, wrong = [], []
    for i in range(BACK_TO_BACK):
        resp = server.predict(request if i % 10 == 0 else short)
        statuses.append(resp.status_code)
        if resp.status_code == 200 and i % 10 == 0 and resp.json().get("output") != expected:
            wrong.append(i)
    assert statuses.count(200) == BACK_TO_BACK, {code: statuses.count(code) for code in set(statuses)}
    assert not wrong


def test_clients_within_the_concurrency_sending_back_to_back_never_see_409(server, golden):
    """CONCURRENCY clients, each sending CLIENT_BACK_TO_BACK greedy golden predictions one after another (the
    next as soon as its answer is read): every one is a 200 with exactly the golden answer, and the server is
    READY afterwards. Cog frees a slot only after it has sent the answer, so a client's next request can come
    before its own slot is free: with Cog admitting no more than the engine's slots, 9 of 320 were 409s."""
    request, expected, _ = golden
    start = threading.Barrier(CONCURRENCY)

    def client(_: int) -> list[tuple[int, object]]:
        start.wait()  # (all at once: they finish together and all come back in the same moment)
        replies = []
        for _ in range(CLIENT_BACK_TO_BACK):
            resp = server.predict(request)
            replies.append((resp.status_code, resp.json().get("output") if resp.status_code == 200 else resp.text[:200]))
        return replies

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        replies = [reply for replies in pool.map(client, range(CONCURRENCY)) for reply in replies]
    statuses = Counter(status for status, _ in replies)
    assert statuses == {200: CONCURRENCY * CLIENT_BACK_TO_BACK}, (statuses, [r for r in replies if r[0] != 200][:3])
    wrong = [output for _, output in replies if output != expected]
    assert not wrong, (len(wrong), wrong[:3])
    assert_ready_soon(server)
    # Coglet frees these clients' slots a moment after their answers (READY says only that one is free):
    # 8 new clients sent 12-30 ms after the last answers met slots not yet freed, and one saw a 409 (once,
    # in a CI run). The next test's clients are other clients, so let these leave first.
    time.sleep(1.0)


def test_clients_sending_instant_predictions_back_to_back_never_see_409(server, small_image):
    """CONCURRENCY clients each sending INSTANT_BACK_TO_BACK predictions that end at once (no new token, one
    token, a broken image) one after another: no 409. Arrivals this close together made Cog 0.23's server,
    with its request handling on two threads, collide on its slot pool's try-lock: 1-4 of 480 got 409 with 16
    or 32 slots admitted. make serve runs it on one thread (TOKIO_WORKER_THREADS=1)."""
    jobs = [{"image": small_image, "prompt": "Describe.", "max_length_tokens": 0},
            {"image": "data:image/png;base64,AAAA", "prompt": "Describe."},
            {"image": small_image, "prompt": "Describe.", "max_length_tokens": 1}]
    start = threading.Barrier(CONCURRENCY)

    def client(first: int) -> list[int]:
        start.wait()
        return [server.predict(jobs[(first + i) % len(jobs)]).status_code for i in range(INSTANT_BACK_TO_BACK)]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        statuses = Counter(status for statuses in pool.map(client, range(CONCURRENCY)) for status in statuses)
    assert statuses == {200: CONCURRENCY * INSTANT_BACK_TO_BACK}, statuses  # (a failed prediction is a 200 too)
    assert_ready_soon(server)
    time.sleep(1.0)  # (as above: let these clients' slots be freed before the next test's clients come)


def test_eight_clients_at_once_each_get_their_own_answer(server, golden, bad_images):
    """8 predictions at once: 4 copies of a greedy golden request (each exactly golden), 3 sampling requests
    (succeed), 1 with a broken image (fails alone, with its message)."""
    request, expected, _ = golden
    sampling = {**request, "temperature": 0.9, "top_p": 0.9, "max_length_tokens": 40}
    suffix, data = bad_images["truncated"]
    broken = {**request, "image": _data_uri(data, suffix)}
    jobs = [request] * 4 + [sampling] * 3 + [broken]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(server.predict, jobs))
    assert [r.status_code for r in responses] == [200] * len(jobs), [r.text[:200] for r in responses]
    bodies = [r.json() for r in responses]
    assert [b["status"] for b in bodies] == ["succeeded"] * 7 + ["failed"], bodies
    assert all(b["output"] == expected for b in bodies[:4])
    assert all(isinstance(b["output"], str) and b["output"] for b in bodies[4:7])
    assert "truncated" in bodies[7]["error"].lower() and "Traceback" not in bodies[7]["error"]
    assert_ready_soon(server)


def test_cancel_one_of_four_in_flight(server, golden, webhooks):
    """With 3 golden requests in flight, an async request cancelled mid-generation ends `canceled`; the 3
    are still exactly golden, health is READY afterwards, and the next answer is golden."""
    url, final = webhooks
    request, expected, _ = golden
    long_request = {**request, "max_length_tokens": 4000, "repetition_penalty": 1.0}
    with ThreadPoolExecutor(3) as pool:
        golden_runs = [pool.submit(server.predict, request) for _ in range(3)]
        prediction_id = f"cancel-{time.monotonic_ns()}"
        assert server.predict_async(long_request, prediction_id, url).status_code == 202
        time.sleep(0.3)  # (generating by now: the prompt is prefilled in well under that)
        cancel = requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=10)
        assert cancel.status_code == 200, cancel.text
        assert final(prediction_id)["status"] == "canceled"
        answers = [run.result().json() for run in golden_runs]
    assert [a["output"] for a in answers] == [expected] * 3, answers
    assert_ready_soon(server)
    assert server.predict(request).json()["output"] == expected
