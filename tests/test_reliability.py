"""The rows of the reliability table (docs/reliability.md), each driven against the real Cog server
(``make serve``, as a user starts it) or, for the weights rows, the loader through ``Predictor().setup()``
and the server's SETUP_FAILED health.

Counts are modest by default, so that ``make test`` stays fast on 2 cores; ``DEEPSEEK_VL2_RELIABILITY_FULL=1``
runs the full counts of the table (1,000 sequential predictions). ``DEEPSEEK_VL2_RELIABILITY_REQUESTS=N`` sets
that count, and ``DEEPSEEK_VL2_RELIABILITY_CHECKPOINT=DIR`` runs the server rows on another model directory
(a held-out checkpoint): its greedy answers are then checked against its own first answer instead of the
golden one.
"""
from __future__ import annotations

import errno
import http.server
import io
import json
import os
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
import requests

from cog_server import assert_failed_clearly, assert_ready_soon, data_uri, golden_request, make_serve
from conftest import process_memory
from hub_stand_in import HubStandIn, fill_the_disk_on, hub_settings

FULL = os.environ.get("DEEPSEEK_VL2_RELIABILITY_FULL") == "1"
LOAD_REQUESTS = int(os.environ.get("DEEPSEEK_VL2_RELIABILITY_REQUESTS") or (1000 if FULL else 200))
HELD_OUT = os.environ.get("DEEPSEEK_VL2_RELIABILITY_CHECKPOINT", "").strip()
WARM_REQUESTS = 100  # "flat after the first 100": the figures at request 100 are the baseline
SAMPLE_EVERY = 10
WINDOW = 50  # requests: memory is compared between the first and the last WINDOW after the warm ones
# Flat, after the first 100 requests:
# - the worker's anonymous memory (RssAnon: the heap, tensors; not the shared libraries' code pages, which a
#   code path run for the first time maps in) grows by at most 32 MiB, 7 % of it, from the least of its
#   samples in requests 100-149 to the least in the last 50: a leak of 36 KiB or more per request, e.g. one
#   small image tensor, breaks it over 900 requests. (The least, not one sample: right after a request the
#   allocator may still hold its freed working memory; such peaks of 20-40 MiB came and went between samples
#   50 requests apart, and a leak stays);
# - its open files are at most 2 more (a socket of a request in flight); one leaked per request would be 900;
# - the server's temp files (downloaded and decoded-data-URI images) are none more than before the run.
ANON_GROWTH_BOUND = 32 << 20
FD_GROWTH_BOUND = 2
SIGTERM_BOUND_S = 10.0
PROMPT_REFUSAL_BOUND_S = 1.0
EOS = "<｜end▁of▁sentence｜>"
GOLDEN_CASE = ("mha", "single_tiled")


# --------------------------------------------------------------------------------------------
# The server, processes, and stand-in web servers


@pytest.fixture(scope="module")
def checkpoint(fixtures_dir) -> Path:
    return Path(HELD_OUT).resolve() if HELD_OUT else fixtures_dir / "checkpoints" / GOLDEN_CASE[0]


@pytest.fixture(scope="module")
def context(checkpoint) -> int:
    """The model's context (max_position_embeddings: 4096 for the fixtures, as for the real models)."""
    from deepseek_vl2.config import DeepseekVL2Config

    return DeepseekVL2Config.from_pretrained(checkpoint).language.max_position_embeddings


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory) -> Path:
    """The server's TMPDIR: every temp file it makes (downloads, data URIs) lands here and is counted."""
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="module")
def server(project_dir, checkpoint, server_tmp, tmp_path_factory):
    log = tmp_path_factory.mktemp("cog") / "server.log"
    with make_serve("serve", project_dir, log, DEEPSEEK_VL2_WEIGHTS=str(checkpoint),
                    DEEPSEEK_VL2_MAX_CONCURRENCY="8", TMPDIR=str(server_tmp)) as srv:
        yield srv


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    request, expected, _ = golden_request(fixtures_dir, *GOLDEN_CASE)
    # (a held-out checkpoint: no golden answer; its own first answer is the reference)
    return request, None if HELD_OUT else expected


@pytest.fixture(scope="module")
def small_png(fixtures_dir) -> bytes:
    return (fixtures_dir / "images" / "small_palette_100x80.png").read_bytes()


def _session_processes(session_id: int) -> dict[int, str]:
    """pid -> command line of the live (not zombie) processes of a session."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if int(fields[3]) != session_id or fields[0] == "Z":
                continue
            found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # (gone meanwhile)
    return found


def _server_pid(server) -> int:
    """The Cog server itself (``python -m cog.server.http``; PID 1 in a container), under make and sh."""
    pids = [pid for pid, cmd in _session_processes(server.proc.pid).items()
            if "cog.server.http" in cmd and not cmd.startswith("/bin/sh")]
    assert len(pids) == 1, _session_processes(server.proc.pid)
    return pids[0]


def _worker_pid(server) -> int:
    """The worker process that runs predict.py (coglet's subprocess)."""
    pids = [pid for pid, cmd in _session_processes(server.proc.pid).items() if "_run_worker" in cmd]
    assert len(pids) == 1, _session_processes(server.proc.pid)
    return pids[0]


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _temp_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


class StandIn:
    """A loopback web server (a thread) with the behaviours an image URL may have: ``/file/<name>`` serves
    registered bytes, ``/silent`` accepts and never answers, ``/endless`` streams a body forever,
    ``/trickle`` sends one byte every 0.2 s forever, ``/huge`` declares a 10 GB body; else 404."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.stop = threading.Event()
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - the http.server API
                name = self.path.split("?")[0]
                if name.startswith("/file/") and name[6:] in stand_in.files:
                    body = stand_in.files[name[6:]]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif name == "/silent":
                    stand_in.stop.wait(120)
                elif name in ("/endless", "/trickle"):
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Connection", "close")  # (no length: the body ends when the connection does)
                    self.end_headers()
                    block = b"\0" * (1 << 16) if name == "/endless" else b"\0"
                    try:
                        while not stand_in.stop.is_set():
                            self.wfile.write(block)
                            if name == "/trickle":
                                self.wfile.flush()
                                time.sleep(0.2)
                    except OSError:  # the client gave up: that is the point
                        pass
                elif name == "/huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10 ** 10))
                    self.end_headers()
                else:
                    body = b"not found"
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def stand_in():
    host = StandIn()
    yield host
    host.close()


# --------------------------------------------------------------------------------------------
# Load


def test_load_sequential_predictions_all_succeed_and_stay_flat(server, golden, small_png, stand_in, server_tmp,
                                                                bad_images, record_property):
    """LOAD_REQUESTS predictions one after another (1,000 with DEEPSEEK_VL2_RELIABILITY_FULL=1): every 10th
    fetches its image by URL, every 50th is the golden greedy request (its exact answer checked), every 25th
    carries a truncated image (it must fail, with its message); all others must succeed. After the first 100,
    the worker's memory, its open files and the server's temp files are sampled every 10 requests and must stay
    flat (the bounds above)."""
    request, expected = golden
    if expected is None:
        expected = server.predict(request).json()["output"]
    stand_in.files["small.png"] = small_png
    short = {"image": data_uri(small_png), "prompt": "Describe.", "max_length_tokens": 2}
    by_url = {**short, "image": f"{stand_in.url}/file/small.png"}
    broken = {**short, "image": data_uri(bad_images["truncated"][1])}
    worker = _worker_pid(server)
    temp_before = _temp_files(server_tmp)
    outcomes: dict[str, int] = {}
    samples: list[tuple[int, dict[str, int], int, int]] = []  # (requests done, memory, open files, temp files)
    wrong: list[int] = []
    started = time.monotonic()
    for i in range(1, LOAD_REQUESTS + 1):
        kind = "golden" if i % 50 == 0 else "broken" if i % 25 == 0 else "url" if i % 10 == 0 else "short"
        resp = server.predict({"golden": request, "broken": broken, "url": by_url, "short": short}[kind])
        status = resp.json().get("status") if resp.status_code == 200 else f"HTTP {resp.status_code}"
        want = "failed" if kind == "broken" else "succeeded"
        outcomes[f"{kind}:{status}"] = outcomes.get(f"{kind}:{status}", 0) + 1
        if status != want or (kind == "golden" and resp.json()["output"] != expected):
            wrong.append(i)
        if kind == "broken" and status == "failed":
            assert "truncated" in resp.json()["error"].lower()
        if i >= WARM_REQUESTS and i % SAMPLE_EVERY == 0:
            samples.append((i, process_memory(worker), _open_files(worker), _temp_files(server_tmp)))
    elapsed = time.monotonic() - started

    base = samples[0]
    first = [s for s in samples if s[0] < WARM_REQUESTS + WINDOW]
    last = [s for s in samples if s[0] > LOAD_REQUESTS - WINDOW]

    def growth(field: str) -> int:
        return min(s[1][field] for s in last) - min(s[1][field] for s in first)

    anon_growth, rss_growth = growth("RssAnon"), growth("VmRSS")
    fd_growth = max(s[2] for s in samples) - base[2]
    figures = {
        "requests": LOAD_REQUESTS, "seconds": round(elapsed, 1), "outcomes": outcomes,
        "anon_mib_at_100": round(base[1]["RssAnon"] / 2**20, 1),
        "anon_growth_mib_after_100": round(anon_growth / 2**20, 2),
        "rss_mib_at_100": round(base[1]["VmRSS"] / 2**20, 1), "rss_growth_mib_after_100": round(rss_growth / 2**20, 2),
        "open_files_at_100": base[2], "open_files_max_after_100": max(s[2] for s in samples),
        "temp_files_before": temp_before, "temp_files_max_after_100": max(s[3] for s in samples),
        "anon_mib_samples": [round(s[1]["RssAnon"] / 2**20, 1) for s in samples],
        "rss_mib_samples": [round(s[1]["VmRSS"] / 2**20, 1) for s in samples[::5]],
    }
    record_property("load", figures)
    print("load figures:", json.dumps(figures))
    assert not wrong, (wrong[:20], outcomes)
    assert _worker_pid(server) == worker, "the worker was restarted"
    assert anon_growth <= ANON_GROWTH_BOUND, figures
    assert fd_growth <= FD_GROWTH_BOUND, figures
    assert max(s[3] for s in samples) <= temp_before, figures


# --------------------------------------------------------------------------------------------
# Stop


def test_sigterm_during_predictions_every_process_exits_within_10_s(project_dir, checkpoint, context, small_png,
                                                                   tmp_path, record_property):
    """SIGTERM to the Cog server (PID 1 in a container) while 4 long predictions are in flight: every
    process of the server (make, sh, the server, its worker) is gone within 10 s, and every client gets its
    answer (HTTP 200, a terminal status; those cut short fail with a message) rather than a broken connection.
    Cog itself would wait for the predictions however long they take; deepseek_vl2/shutdown.py bounds it.

    The predictions are made long by their prompts, not by luck: ~3,000 prompt tokens prefilled one token per
    engine step (DEEPSEEK_VL2_PREFILL_CHUNK=1) take seconds each, and the 4 prefill one after another, so
    the last would end tens of seconds after the SIGTERM (sampled answers end at a random end-of-sentence).
    DEEPSEEK_VL2_MAX_CONCURRENCY=2: Cog admits twice that, so the 4 take all its slots (health says BUSY once
    they are in) and 2 of them wait in the engine's queue, which the stop must end as well."""
    from deepseek_vl2.processor import DeepseekVL2Processor

    phrase = "describe the picture "
    per_phrase = len(DeepseekVL2Processor.from_pretrained(checkpoint).encode(phrase * 100)) / 100
    prompt = phrase * int((context - 1000) / per_phrase)  # (room left for the image, whatever its tiling)
    long_request = {"image": data_uri(small_png), "prompt": prompt, "max_length_tokens": 4, "temperature": 0}
    with make_serve("serve", project_dir, tmp_path / "server.log", DEEPSEEK_VL2_WEIGHTS=str(checkpoint),
                    DEEPSEEK_VL2_MAX_CONCURRENCY="2", DEEPSEEK_VL2_PREFILL_CHUNK="1") as srv:
        answers: list = []

        def client():
            try:
                answers.append(srv.predict(long_request, timeout=60))
            except requests.RequestException as exc:
                answers.append(exc)

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 30
        while srv.health()["status"] != "BUSY" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # (prefilled and generating by now)
        assert not answers, "the predictions ended before the SIGTERM: make them longer"
        os.kill(_server_pid(srv), signal.SIGTERM)
        sent = time.monotonic()
        while _session_processes(srv.proc.pid) and time.monotonic() - sent < 60:
            time.sleep(0.05)
        exited_s = time.monotonic() - sent
        left = _session_processes(srv.proc.pid)
        for thread in clients:
            thread.join(timeout=30)
    record_property("sigterm_exit_s", round(exited_s, 2))
    print(f"sigterm: every process gone {exited_s:.2f} s after the SIGTERM")
    assert not left and exited_s <= SIGTERM_BOUND_S, (exited_s, left)
    assert len(answers) == 4 and all(isinstance(a, requests.Response) for a in answers), answers
    bodies = [a.json() for a in answers]
    assert all(b["status"] in ("succeeded", "failed") for b in bodies), bodies
    print("sigterm answers:", [(b["status"], b.get("error")) for b in bodies])
    assert all(b["status"] == "succeeded" or "stopped" in (b.get("error") or "") for b in bodies), bodies
    assert any(b["status"] == "failed" for b in bodies), "every prediction ended on its own: the test proved nothing"


# --------------------------------------------------------------------------------------------
# Images


def _png(width: int, height: int, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("width,height", [(1, 1), (10000, 50), (50, 10000)])
def test_odd_sized_images_are_answered(server, width, height):
    body = server.predict({"image": data_uri(_png(width, height)), "prompt": "Describe.", "max_length_tokens": 4,
                           "temperature": 0}).json()
    assert body["status"] == "succeeded", body
    assert isinstance(body["output"], str)


def _photo_40mp_jpeg() -> bytes:
    """A 7,728 x 5,152 (39.8-megapixel) JPEG like a camera's: smooth gradients plus sensor-like noise."""
    import numpy as np
    from PIL import Image

    width, height = 7728, 5152
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    noise = np.random.default_rng(2).normal(0, 6, (height, width)).astype(np.float32)
    channels = [x + 0 * y + noise, 0.5 * x + 0.5 * y + noise, y + 0 * x + noise]
    pixels = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_40_megapixel_photo_is_answered_within_usual_time_plus_decode(server, stand_in, small_png, checkpoint,
                                                                       record_property):
    """The 40 MP photo by URL, against the same request with a small image by URL: its extra time is at
    most twice what decoding and tiling it costs in this process (the server does that work, on the same
    shared cores), plus 1 s for moving its bytes."""
    from deepseek_vl2.processor import DeepseekVL2Processor, load_image

    photo = _photo_40mp_jpeg()
    stand_in.files["photo.jpg"] = photo
    stand_in.files["usual.png"] = small_png
    request = {"prompt": "Describe.", "max_length_tokens": 8, "temperature": 0}

    def timed(url: str) -> float:
        started = time.monotonic()
        body = server.predict({**request, "image": url}).json()
        assert body["status"] == "succeeded", body
        return time.monotonic() - started

    usual_s = statistics.median(timed(f"{stand_in.url}/file/usual.png") for _ in range(3))
    processor = DeepseekVL2Processor.from_pretrained(checkpoint)
    started = time.monotonic()
    processor.tile_image(load_image(photo))
    decode_s = time.monotonic() - started
    photo_s = timed(f"{stand_in.url}/file/photo.jpg")
    figures = {"megapixels": 7728 * 5152 / 1e6, "jpeg_mb": round(len(photo) / 1e6, 1), "usual_s": round(usual_s, 2),
               "decode_and_tile_s": round(decode_s, 2), "photo_s": round(photo_s, 2)}
    record_property("photo_40mp", figures)
    print("40 MP photo:", json.dumps(figures))
    assert photo_s <= usual_s + 2 * decode_s + 1.0, figures


def _exif_rotated_jpeg_and_upright_png() -> tuple[bytes, bytes, bytes]:
    """(a JPEG whose pixels lie on their side with EXIF orientation 6 "rotate 90 CW to view",
    the same decoded pixels turned upright as a PNG without EXIF, the same pixels left on their side as a PNG).
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    upright = np.zeros((240, 400, 3), dtype=np.uint8)  # landscape, a bright band at the top
    upright[:60] = 230
    upright[60:] = rng.integers(0, 120, (180, 400, 3), dtype=np.uint8)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # on its side, as a camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer must rotate 90 degrees clockwise
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    jpeg = buf.getvalue()
    decoded = Image.open(io.BytesIO(jpeg))
    decoded.load()
    assert decoded.getexif().get(0x0112) == 6

    def png(image) -> bytes:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="PNG")
        return out.getvalue()

    sideways = decoded.convert("RGB")
    turned = sideways.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 asks for
    assert turned.size == (400, 240)
    return jpeg, png(turned), png(sideways)


def test_exif_rotated_jpeg_is_answered_upright(server):
    """A phone photo stored on its side with an EXIF orientation tag is seen upright: its greedy answer is the
    answer to the same pixels turned upright (a PNG without EXIF), not to them on their side. (The official
    code ignores EXIF orientation; this is a documented difference.)"""
    jpeg, upright_png, sideways_png = _exif_rotated_jpeg_and_upright_png()
    request = {"prompt": "Describe.", "max_length_tokens": 24, "temperature": 0}
    answers = {}
    images = (("jpeg", jpeg, ".jpg"), ("upright", upright_png, ".png"), ("sideways", sideways_png, ".png"))
    for name, data, suffix in images:
        body = server.predict({**request, "image": data_uri(data, suffix)}).json()
        assert body["status"] == "succeeded", body
        answers[name] = body["output"]
    assert answers["jpeg"] == answers["upright"], answers
    assert answers["sideways"] != answers["upright"], "the model cannot tell the orientation: the test proves nothing"


# --------------------------------------------------------------------------------------------
# URLs (404 and an unreachable host: tests/test_server.py)


def test_url_that_never_answers_fails_within_the_silence_bound(server, stand_in):
    import predict

    url = f"{stand_in.url}/silent"
    started = time.monotonic()
    resp = server.predict({"image": url, "prompt": "Describe.", "max_length_tokens": 4})
    took = time.monotonic() - started
    assert_failed_clearly(server, resp, f"Cannot download the image from {url}",
                           f"did not answer within {predict.DOWNLOAD_SILENCE_S:.0f} s")
    assert predict.DOWNLOAD_SILENCE_S <= took <= predict.DOWNLOAD_SILENCE_S + 5, took


@pytest.mark.parametrize("path,needle", [("/endless", "larger than the limit of 128 MiB"),
                                         ("/huge", "more than the limit of 128 MiB")])
def test_url_with_an_endless_or_huge_body_fails_at_the_size_bound(server, stand_in, server_tmp, path, needle):
    url = f"{stand_in.url}{path}"
    before = _temp_files(server_tmp)
    started = time.monotonic()
    resp = server.predict({"image": url, "prompt": "Describe.", "max_length_tokens": 4})
    took = time.monotonic() - started
    assert_failed_clearly(server, resp, f"Cannot download the image from {url}", needle)
    assert took < 30, took
    assert _temp_files(server_tmp) <= before, "the partial download was left behind"


def test_download_that_trickles_stops_at_the_total_bound(stand_in, tmp_path, monkeypatch):
    """A server that sends a byte now and then never trips the silence bound; the total bound stops it
    (DEEPSEEK_VL2_DOWNLOAD_TIMEOUT_S, 60 s by default; 2 s here) and removes the partial file."""
    import predict

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    started = time.monotonic()
    with pytest.raises(predict.DownloadError, match="took longer than 2 s"):
        predict.download_image(f"{stand_in.url}/trickle", timeout_s=2)
    assert time.monotonic() - started < 2 + predict.DOWNLOAD_SILENCE_S
    assert not list(tmp_path.iterdir())


def test_download_bounds_read_from_the_environment(monkeypatch):
    import importlib

    import predict

    monkeypatch.setenv("DEEPSEEK_VL2_DOWNLOAD_TIMEOUT_S", "7")
    monkeypatch.setenv("DEEPSEEK_VL2_MAX_IMAGE_MB", "3")
    try:
        importlib.reload(predict)
        assert predict.DOWNLOAD_TIMEOUT_S == 7 and predict.MAX_IMAGE_BYTES == 3 << 20
        monkeypatch.setenv("DEEPSEEK_VL2_MAX_IMAGE_MB", "lots")
        with pytest.raises(SystemExit, match="DEEPSEEK_VL2_MAX_IMAGE_MB must be a number"):
            importlib.reload(predict)
    finally:
        monkeypatch.delenv("DEEPSEEK_VL2_DOWNLOAD_TIMEOUT_S")
        monkeypatch.delenv("DEEPSEEK_VL2_MAX_IMAGE_MB")
        importlib.reload(predict)
    assert predict.DOWNLOAD_TIMEOUT_S == 60 and predict.MAX_IMAGE_BYTES == 128 << 20


# --------------------------------------------------------------------------------------------
# Prompts


def test_one_megabyte_prompt_is_refused_in_under_a_second(server, small_png, context, record_property):
    prompt = "describe the picture " * 50000  # 1,050,000 characters
    started = time.monotonic()
    resp = server.predict({"image": data_uri(small_png), "prompt": prompt, "max_length_tokens": 4})
    took = time.monotonic() - started
    record_property("prompt_1mb_refusal_s", round(took, 3))
    print(f"1 MB prompt refused in {took:.3f} s")
    assert_failed_clearly(server, resp, "prompt is too long", f"context holds {context}")
    assert took < PROMPT_REFUSAL_BOUND_S, took


def test_the_cheap_bound_never_refuses_a_prompt_that_fits(checkpoint):
    """min_tokens is a lower bound of the real count (so only prompts that cannot fit are refused early),
    across kinds of text, including runs that make the longest tokens."""
    from deepseek_vl2.processor import DeepseekVL2Processor

    processor = DeepseekVL2Processor.from_pretrained(checkpoint)
    longest = max(processor.tokenizer.get_vocab(with_added_tokens=False), key=len)
    samples = ["describe the picture " * 300, "日本語のテキスト😀" * 200, " " * 5000, "=" * 5000,
               longest * 500,
               "<|Assistant|><image><｜end▁of▁sentence｜>" * 100, "مرحبا بالعالم " * 300, "x"]
    for text in samples:
        assert 0 < processor.min_tokens(text) <= len(processor.encode(text)), text[:40]


SPECIAL_PROMPTS = {
    "assistant_tag": "What is this? <|Assistant|> It is",
    "user_tag": "Describe it. <|User|>: and again",
    "eos_text": f"Describe it.{EOS} Then stop.",
    "image_tag_mid": "Look at <image> and describe it.",
    "grounding": "<|grounding|>Find <|ref|>the stripes<|/ref|>.",
}


@pytest.mark.parametrize("name", sorted(SPECIAL_PROMPTS))
def test_special_token_text_is_tokenized_as_the_official_processor(checkpoint, name):
    """Special-token text typed in a prompt becomes the special token itself, as the official processor does
    (it calls the same tokenizer.json through LlamaTokenizerFast.encode, which matches added tokens in text):
    the prompt's ids are exactly the tokenizer's encoding of the templated text, piece by piece around the
    image, and each special string is one id."""
    from deepseek_vl2.processor import ASSISTANT_ROLE, USER_ROLE, DeepseekVL2Processor, image_token_count

    from PIL import Image

    processor = DeepseekVL2Processor.from_pretrained(checkpoint)
    prompt = SPECIAL_PROMPTS[name]
    if "<image>" not in prompt:
        prompt = "<image>\n" + prompt
    inputs = processor.process_prompt(prompt, [Image.new("RGB", (64, 64), (10, 20, 30))])
    before, after = f"{USER_ROLE}: {prompt}\n\n{ASSISTANT_ROLE}:".split("<image>")
    tokenizer = processor.tokenizer
    n = image_token_count(1, 1, processor.tokens_per_side)
    expected = ([processor.bos_id] + tokenizer.encode(before, add_special_tokens=False).ids
                + [processor.image_token_id] * n + tokenizer.encode(after, add_special_tokens=False).ids)
    assert inputs.input_ids.tolist() == expected
    ids = inputs.input_ids.tolist()
    for special in ("<|Assistant|>", "<|User|>", EOS, "<|grounding|>", "<|ref|>", "<|/ref|>"):
        if special in SPECIAL_PROMPTS[name]:
            assert ids.count(tokenizer.token_to_id(special)) == SPECIAL_PROMPTS[name].count(special) + (
                special in ("<|Assistant|>", "<|User|>"))  # (+ the template's own)


@pytest.mark.parametrize("name", sorted(SPECIAL_PROMPTS))
def test_special_token_text_in_a_prompt_is_answered(server, small_png, name):
    body = server.predict({"image": data_uri(small_png), "prompt": SPECIAL_PROMPTS[name], "max_length_tokens": 6,
                           "temperature": 0}).json()
    assert body["status"] == "succeeded", body
    assert isinstance(body["output"], str)


UNICODE_PROMPTS = {
    "cjk": "这张图片里有什么？日本語の説明もください。한국어도 괜찮아요.",
    "emoji": "What is this? 🐱🚀👍🏽👨‍👩‍👧 ❤️",
    "rtl": "ما الذي في هذه الصورة؟ מה יש בתמונה הזאת?",
}


@pytest.mark.parametrize("name", sorted(UNICODE_PROMPTS))
def test_unicode_prompt_round_trips(server, small_png, checkpoint, name):
    """CJK, emoji (with modifiers and joiners) and right-to-left text: the tokens of the prompt decode to
    exactly the prompt, and the server answers it with a string that holds no broken character."""
    from deepseek_vl2.processor import DeepseekVL2Processor

    processor = DeepseekVL2Processor.from_pretrained(checkpoint)
    prompt = UNICODE_PROMPTS[name]
    assert processor.decode(processor.encode(prompt)) == prompt
    inputs = processor.process_prompt(prompt, [])
    assert prompt in processor.decode(inputs.input_ids)
    body = server.predict({"image": data_uri(small_png), "prompt": prompt, "max_length_tokens": 16,
                           "temperature": 0}).json()
    assert body["status"] == "succeeded", body
    assert isinstance(body["output"], str)
    body["output"].encode("utf-8")  # (a lone surrogate would raise)


# --------------------------------------------------------------------------------------------
# Weights


def _copy(checkpoint: Path, dest: Path) -> Path:
    shutil.copytree(checkpoint, dest)
    return dest


def _truncate(model_dir: Path) -> Path:
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return model_dir


def _edit_config(model_dir: Path, edit) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    edit(config)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


WEIGHT_FAULTS = {
    "truncated_safetensors": (_truncate, ["model.safetensors ends before the data of", "truncated"]),
    "truncated_header": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
                         and d, ["model.safetensors is not a safetensors file"]),
    "config_missing_key": (lambda d: _edit_config(d, lambda c: c["language_config"].pop("vocab_size")),
                           ["config.json lacks language_config.vocab_size"]),
    "config_wrong_type": (lambda d: _edit_config(d, lambda c: c["language_config"].update(hidden_size="64")),
                          ["config.json", "language_config.hidden_size must be an integer, got '64'"]),
    "config_wrong_section": (lambda d: _edit_config(d, lambda c: c.update(vision_config=[1])),
                             ["config.json", "vision_config must be an object"]),
}


@pytest.fixture
def quiet_setup(monkeypatch):
    for name in ("DEEPSEEK_VL2_DTYPE", "DEEPSEEK_VL2_MAX_CONCURRENCY", "COG_MAX_CONCURRENCY", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("fault", sorted(WEIGHT_FAULTS))
def test_broken_checkpoint_fails_setup_naming_the_file_or_key(checkpoint, tmp_path, quiet_setup, fault):
    import predict

    make_fault, needles = WEIGHT_FAULTS[fault]
    model_dir = make_fault(_copy(checkpoint, tmp_path / "model"))
    quiet_setup.setenv("DEEPSEEK_VL2_WEIGHTS", str(model_dir))
    with pytest.raises(Exception) as caught:
        predict.Predictor().setup()
    message = str(caught.value)
    for needle in needles:
        assert needle in message, message
    assert str(model_dir) in message or "model.safetensors" in message, message


@pytest.mark.parametrize("fault", ["truncated_safetensors", "config_wrong_type"])
def test_broken_checkpoint_gives_setup_failed_on_the_server(project_dir, checkpoint, tmp_path, fault):
    make_fault, needles = WEIGHT_FAULTS[fault]
    model_dir = make_fault(_copy(checkpoint, tmp_path / "model"))
    with make_serve("serve", project_dir, tmp_path / "server.log", expect="SETUP_FAILED",
                    DEEPSEEK_VL2_WEIGHTS=str(model_dir)) as srv:
        health = srv.health()
        assert health["status"] == "SETUP_FAILED", health
        assert health["setup"]["status"] == "failed", health
        logs = health["setup"].get("logs", "")
        for needle in needles:
            assert needle in logs, logs[-3000:]
        resp = srv.predict({"image": "data:,", "prompt": "Hi"}, timeout=30)
        assert resp.status_code >= 400  # nothing is answered by a model that is not there


@pytest.fixture
def isolated_hub(tmp_path, quiet_setup):
    """An empty HF cache and weights folder; ``point(hub)`` sends this process's huggingface_hub to ``hub``."""
    from deepseek_vl2 import weights

    quiet_setup.setattr(weights, "WEIGHTS_DIR", tmp_path / "weights")

    def point(hub: HubStandIn) -> None:
        hub_settings(quiet_setup, cache=tmp_path / "hf", endpoint=hub.url)

    yield quiet_setup, tmp_path / "weights", point


def test_unknown_hub_id_fails_setup_naming_it(isolated_hub):
    import predict

    monkeypatch, _, point = isolated_hub
    with HubStandIn({}) as hub:
        point(hub)
        monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", "deepseek-ai/no-such-model")
        with pytest.raises(Exception, match=r"deepseek-ai/no-such-model is not available from .* \(HTTP 404\)"):
            predict.Predictor().setup()


def test_no_disk_space_during_download_fails_setup_naming_the_file(isolated_hub, checkpoint):
    """The disk fills up while model.safetensors arrives (simulated: the hub's write fails with ENOSPC)."""
    import predict
    from deepseek_vl2 import weights

    monkeypatch, weights_dir, point = isolated_hub
    with HubStandIn.serving("deepseek-ai/deepseek-vl2-tiny", checkpoint) as hub:
        point(hub)
        fill_the_disk_on("model.safetensors", monkeypatch)
        monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", "deepseek-ai/deepseek-vl2-tiny")
        with pytest.raises(weights.WeightsError) as caught:
            predict.Predictor().setup()
    message = str(caught.value)
    assert f"cannot write {weights_dir / 'deepseek-vl2-tiny'}: no space left on the device (" in message, message
    assert "free, the model's files need" in message and "run again" in message, message


def test_read_only_weights_directory(isolated_hub, checkpoint, tmp_path):
    """A complete model in a read-only directory loads (loading only reads); a download into a read-only
    weights directory fails naming it. (The read-only file system is simulated with EROFS: the tests may run
    as root, for whom permission bits do not stop a write.)"""
    import pathlib

    import predict
    from deepseek_vl2 import weights

    monkeypatch, weights_dir, point = isolated_hub
    model_dir = _copy(checkpoint, tmp_path / "read-only-model")
    for path in [*model_dir.iterdir(), model_dir]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", str(model_dir))
        predict.Predictor().setup()
    finally:
        model_dir.chmod(0o755)

    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(weights_dir)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    with HubStandIn.serving("deepseek-ai/deepseek-vl2-tiny", checkpoint) as hub:
        point(hub)
        monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
        monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", "deepseek-ai/deepseek-vl2-tiny")
        with pytest.raises(weights.WeightsError, match=rf"cannot write {weights_dir / 'deepseek-vl2-tiny'}: "
                                                       "Read-only file system"):
            predict.Predictor().setup()
