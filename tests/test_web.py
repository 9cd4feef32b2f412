"""python -m deepseek_vl2 web: the real command serving a fixture checkpoint (gradio_client: the golden text at
temperature 0, two clients at once, bad input), Stop freeing the engine slot, the demo checkpoint's notice, and a
real headless browser (Debian's chromium + chromium-driver through selenium) uploading an image, asking, reading
the streamed answer and finding the drawn box. The browser's screenshot is kept in tests/artifacts/.

Random weights practically never answer with boxes, so the browser test serves a *scripted* checkpoint: the
demo checkpoint's files with weights set so that its greedy answer to any question is one grounding box
(``_grounding_checkpoint``: every attention and feed-forward output zeroed, so that each next token depends on
the current token alone, and embeddings and LM-head rows chaining ``:`` -> ``<|ref|>`` -> label -> ... ->
end of sentence). It runs through the same loader, processor, engine and page as any checkpoint.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from gradio_client import Client, handle_file  # (requirements-web.txt: make test installs it)
from test_cli import _cached_loader  # (the fixture checkpoints loaded once for the modules that use them)

from deepseek_vl2 import web  # noqa: E402
from deepseek_vl2.grounding import draw_grounding, grounding_boxes  # noqa: E402
from deepseek_vl2.pipeline import VL2Pipeline  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
ARTIFACTS = PROJECT / "tests" / "artifacts"
EOS = "<｜end▁of▁sentence｜>"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``python -m deepseek_vl2 web`` in a subprocess, ready once it printed its address."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deepseek_vl2", "web", *args, "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT,
            env={**os.environ, "PYTHONPATH": str(PROJECT), **(env or {})})
        self.stdout: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"the web command ended: {self.process.communicate()[1][-3000:]}")
            self.stdout.append(line)
            if line.strip() == f"Running on {self.url}":
                threading.Thread(target=self.process.stdout.read, daemon=True).start()  # (keep the pipe drained)
                threading.Thread(target=self.process.stderr.read, daemon=True).start()
                return
        raise AssertionError("the web command did not say where it runs within 180 s")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _case(fixtures_dir: Path, name: str) -> dict:
    return json.loads((fixtures_dir / "cases" / name / "case.json").read_text())


def _ask(client: Client, fixtures_dir: Path, case: dict) -> str:
    """A single-question golden case through /answer, with the command line's golden settings."""
    user = case["conversation"][0]
    return client.predict(images=[handle_file(str(fixtures_dir / "images" / n)) for n in user["images"]],
                          prompt=user["content"], temperature=0, top_p=0.9,
                          repetition_penalty=case["generation"]["repetition_penalty"],
                          max_new_tokens=len(case["generated_ids"]), seed=None, api_name="/answer")


@pytest.fixture(scope="module")
def fixture_server(fixtures_dir):
    server = _Server("--model", str(fixtures_dir / "checkpoints" / "mha"))
    yield server
    server.close()


# ------------------------------------------------------------------------------------------------
# gradio_client on the real command


def test_answer_endpoint_gives_the_golden_text(fixture_server, fixtures_dir):
    assert fixture_server.stdout[-1] == f"Running on {fixture_server.url}\n"
    case = _case(fixtures_dir, "mha/single_tiled")
    client = Client(fixture_server.url, verbose=False)
    assert _ask(client, fixtures_dir, case) == case["generated_text"].replace(EOS, "")
    assert "/answer" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]


def test_two_clients_at_once_each_get_their_own_answer(fixture_server, fixtures_dir):
    cases = {name: _case(fixtures_dir, f"mha/{name}") for name in ("two_images", "grounding")}
    answers: dict[str, str] = {}

    def ask(name: str) -> None:
        answers[name] = _ask(Client(fixture_server.url, verbose=False), fixtures_dir, cases[name])

    threads = [threading.Thread(target=ask, args=(name,)) for name in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {name: answers.get(name) for name in cases} == {
        name: case["generated_text"].replace(EOS, "") for name, case in cases.items()}


def test_bad_input_is_a_message_and_the_app_stays_up(fixture_server, fixtures_dir, tmp_path):
    client = Client(fixture_server.url, verbose=False)
    not_image = tmp_path / "notes.png"
    not_image.write_text("This is a text file, not an image.\n" * 20)
    image = handle_file(str(fixtures_dir / "images" / "gray_500x300.png"))
    for images, prompt, settings, needle in [
        ([handle_file(str(not_image))], "What is it?", {}, "notes.png"),
        ([image], "word " * 5000, {}, "too long"),
        ([image], "<image> and <image>", {}, "<image>"),
        ([image], "  ", {}, "empty"),
        ([image], "What?", {"temperature": -1}, "temperature must be >= 0"),
    ]:
        with pytest.raises(Exception) as error:
            client.predict(images=images, prompt=prompt, **{"temperature": 0, "top_p": 0.9,
                           "repetition_penalty": 1.1, "max_new_tokens": 8, "seed": None, **settings},
                           api_name="/answer")
        assert needle in str(error.value), (needle, str(error.value))
    assert fixture_server.process.poll() is None
    text = client.predict(images=[image], prompt="Describe.", temperature=0, top_p=0.9, repetition_penalty=1.1,
                          max_new_tokens=4, seed=None, api_name="/answer")
    assert isinstance(text, str) and text


def test_bad_arguments_are_one_line_and_exit_2(fixtures_dir):
    for args, needle in [(["--port", "0"], "--port"), (["--device", "tpu"], "--device tpu"),
                         (["--model", str(fixtures_dir / "nowhere")], "nowhere")]:
        out = subprocess.run([sys.executable, "-m", "deepseek_vl2", "web", *args], capture_output=True, text=True,
                             cwd=PROJECT, env={**os.environ, "PYTHONPATH": str(PROJECT)}, timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error: ") and needle in out.stderr and out.stderr.count("\n") == 1, out.stderr


# ------------------------------------------------------------------------------------------------
# In-process: Stop, sampling with a seed, the demo checkpoint


@pytest.fixture(scope="module")
def app_on_fixture(fixtures_dir):
    """The page on a loaded fixture pipeline, in this process (to look at its engine)."""
    pipeline = _cached_loader(fixtures_dir / "checkpoints" / "mha")
    pipeline.warm_up()  # (as the command does before it serves)
    app = web.build_app(pipeline, model_name="mha", random_weights=False)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    yield pipeline, f"http://127.0.0.1:{port}"
    app.close()


def test_stop_cancels_the_answer_and_frees_its_engine_slot(app_on_fixture, fixtures_dir):
    pipeline, url = app_on_fixture
    client = Client(url, verbose=False)
    image = handle_file(str(fixtures_dir / "images" / "gray_500x300.png"))
    max_new = 3000  # (many seconds of decoding on the test checkpoint)
    job = client.submit({"text": "Tell a long story about <image>.", "files": [image]}, [], 0, 0.9, 1.0, max_new, None,
                        api_name="/chat")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pipeline.engine.in_flight == 1, "the answer was not streaming"
    streamed = job.outputs()[-1][1][-1]["content"]
    job.cancel()  # what the page's Stop button does: Gradio closes the answer's generator
    deadline = time.monotonic() + 5
    while pipeline.engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pipeline.engine.in_flight == 0, "the request still holds its slot"
    steps = pipeline.engine.steps
    time.sleep(0.3)
    assert pipeline.engine.steps == steps  # nothing decodes any more
    assert streamed  # (something had streamed before the stop)


def test_two_tabs_decode_together_each_with_its_own_conversation(app_on_fixture, fixtures_dir):
    pipeline, url = app_on_fixture
    image = handle_file(str(fixtures_dir / "images" / "gray_500x300.png"))
    pipeline.engine.timeline.clear()
    results: dict[str, list] = {}

    def tab(name: str, question: str) -> None:
        client = Client(url, verbose=False)  # (a session of its own, as a browser tab)
        results[name] = client.predict({"text": question, "files": [image]}, [], 0, 0.9, 1.0, 300, None,
                                       api_name="/chat")[1]

    threads = [threading.Thread(target=tab, args=(name, f"{name}: describe <image>.")) for name in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [m["content"][0].get("text") for m in results["one"] if m["role"] == "user"][-1] == "one: describe <image>."
    assert [m["content"][0].get("text") for m in results["two"] if m["role"] == "user"][-1] == "two: describe <image>."
    assert any(kind == "decode" and rows == 2 for kind, rows, _ in pipeline.engine.timeline), \
        "the two tabs' answers never shared a decode step"


def test_chat_keeps_the_history_and_shows_the_seed(app_on_fixture, fixtures_dir):
    pipeline, url = app_on_fixture
    client = Client(url, verbose=False)
    image = handle_file(str(fixtures_dir / "images" / "gray_500x300.png"))
    first = client.predict({"text": "Describe <image>.", "files": [image]}, [], 0.9, 0.9, 1.1, 8, 7, api_name="/chat")
    shown = first[1]
    assert shown[-1]["role"] == "assistant" and "seed 7" in shown[-1]["content"][0]["text"]
    # The page's answer with seed 7 is /answer's (the command line's) with seed 7.
    text = client.predict(images=[image], prompt="Describe <image>.", temperature=0.9, top_p=0.9,
                          repetition_penalty=1.1, max_new_tokens=8, seed=7, api_name="/answer")
    assert shown[-1]["content"][0]["text"].startswith(text + "\n\n*seed 7")
    # (the client gets files back as server paths and must send them as files)
    history = [{**m, "content": [{**c, "file": handle_file(c["file"])} if c.get("type") == "file" else c
                                 for c in m["content"]]} for m in shown]
    second = client.predict({"text": "And then?", "files": []}, history, 0, 0.9, 1.1, 8, None, api_name="/chat")
    texts = [m["content"][0].get("text") for m in second[1] if m["content"][0].get("type") == "text"]
    assert texts[:2] == ["Describe <image>.", shown[-1]["content"][0]["text"]] and texts[2] == "And then?"
    assert "greedy" in texts[-1]


def test_without_a_model_it_serves_the_demo_checkpoint_and_says_the_weights_are_random(tmp_path, monkeypatch):
    monkeypatch.setattr(web, "DEMO_DIR", tmp_path / "demo-model")
    made = web.demo_checkpoint(lambda message: None)
    assert (made / "config.json").is_file()
    pipeline = VL2Pipeline.load(made)
    app = web.build_app(pipeline, model_name="demo-model", random_weights=True)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    try:
        import requests

        config = requests.get(f"http://127.0.0.1:{port}/config", timeout=30).json()
        assert "The weights are random" in json.dumps(config)
    finally:
        app.close()


# ------------------------------------------------------------------------------------------------
# A real browser


LABEL, BOX = "a sprout", "[[446, 411, 552, 672]]"  # (where examples/stages.png has one)


def _grounding_checkpoint(folder: Path, label: str = LABEL, box: str = BOX) -> Path:
    """The demo checkpoint, scripted to answer ``<|ref|>label<|/ref|><|det|>box<|/det|>`` to any question."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer

    spec = importlib.util.spec_from_file_location("make_random_checkpoint",
                                                  PROJECT / "scripts" / "make_random_checkpoint.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    maker.make_checkpoint(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(label, normalized=False), AddedToken(box, normalized=False)])
    tokenizer.save(str(folder / "tokenizer.json"))
    token = tokenizer.token_to_id
    prompt_end = tokenizer.encode("<|Assistant|>:").ids[-1]
    chain = [prompt_end, token("<|ref|>"), token(label), token("<|/ref|>"), token("<|det|>"), token(box),
             token("<|/det|>"), token("<｜end▁of▁sentence｜>")]
    assert None not in chain and len(set(chain)) == len(chain), chain

    state = load_file(str(folder / "model.safetensors"))
    for name, tensor in state.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.zero_()  # each layer passes its input on: the last hidden state is the token's embedding
    embed, head = state["language.model.embed_tokens.weight"], state["language.lm_head.weight"]
    for i, (current, following) in enumerate(zip(chain, chain[1:])):
        embed[current] = torch.zeros_like(embed[current])
        embed[current, i] = 1.0
        head[following] = torch.zeros_like(head[following])
        head[following, i] = 50.0  # (after the final norm: a logit of 400 against the others' ~0.2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for program in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert Path(program).exists(), f"{program} is missing: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def test_in_a_browser_an_uploaded_image_gets_a_streamed_answer_with_its_box_drawn(fixtures_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    checkpoint = _grounding_checkpoint(tmp_path / "grounding-model")
    image_path = PROJECT / "examples" / "stages.png"
    answer = f"<|ref|>{LABEL}<|/ref|><|det|>{BOX}<|/det|>"
    server = _Server("--model", str(checkpoint))
    browser = _chrome()
    try:
        browser.get(server.url)
        wait = WebDriverWait(browser, 60)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#question textarea"))
        browser.find_element(By.CSS_SELECTOR, "#question input[type=file]").send_keys(str(image_path))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#question img"))  # the upload's thumbnail
        box.send_keys("<|grounding|>Where is the sprout?")
        box.send_keys(Keys.ENTER)
        # The streamed answer, then the footer that ends it, then the drawing.
        wait.until(lambda b: LABEL in b.find_element(By.ID, "chat").text)
        wait.until(lambda b: "greedy" in b.find_element(By.ID, "chat").text
                   or "seed" in b.find_element(By.ID, "chat").text)
        drawn = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#chat #boxes img")
                           or b.find_elements(By.CSS_SELECTOR, "#chat .message.bot img"))
        chat_text = browser.find_element(By.ID, "chat").text
        assert BOX in chat_text and LABEL in chat_text, chat_text
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "web-grounding.png"
        browser.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")
        source = drawn[-1].get_attribute("src")
        import requests

        shown = Image.open(io.BytesIO(requests.get(source, timeout=30).content)).convert("RGB")
    finally:
        browser.quit()
        server.close()
    # The picture in the page is the command line's --draw of that answer on the uploaded image.
    expected = draw_grounding(Image.open(image_path), answer)
    assert grounding_boxes(answer, expected.size)[0]["box"] == [446, 411, 552, 672]
    assert shown.size == expected.size
    assert shown.tobytes() == expected.convert("RGB").tobytes()
