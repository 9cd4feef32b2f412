"""The command line (python -m deepseek_vl2): golden answers of every fixture conversation, the image and
prompt rules, --chat, --json, --draw, seeds, and bad input (one line on stderr, exit 2).

Most runs call ``cli.main`` in-process with a loader that keeps each fixture checkpoint loaded; the real
``python -m deepseek_vl2`` (and ``make ask``) run as subprocesses for a few cases.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from deepseek_vl2 import cli
from deepseek_vl2.grounding import draw_grounding, grounding_boxes
from deepseek_vl2.pipeline import VL2Pipeline

EOS = "<｜end▁of▁sentence｜>"


def _cases() -> list[Path]:
    from conftest import FIXTURES_DIR

    return sorted(p.parent for p in (FIXTURES_DIR / "cases").glob("*/*/case.json")) if FIXTURES_DIR.is_dir() else []


def pytest_generate_tests(metafunc):
    if "golden_case" in metafunc.fixturenames:
        cases = _cases()
        metafunc.parametrize("golden_case", cases, ids=[f"{c.parent.name}/{c.name}" for c in cases])


_PIPELINES: dict[Path, VL2Pipeline] = {}


def _cached_loader(model_dir: Path, device=None, dtype=None) -> VL2Pipeline:
    """Each fixture checkpoint is loaded once for the whole module."""
    model_dir = Path(model_dir).resolve()
    if model_dir not in _PIPELINES:
        _PIPELINES[model_dir] = VL2Pipeline.load(model_dir, device=device, dtype=dtype)
    return _PIPELINES[model_dir]


def _never_load(model_dir, device=None, dtype=None):
    raise AssertionError("the model was loaded although the input was refused before loading")


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


def run_cli(*argv: str, stdin: str = "", loader=_cached_loader) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main([str(a) for a in argv], stdin=io.StringIO(stdin), stdout=out, stderr=err, load_pipeline=loader)
    return Run(code, out.getvalue(), err.getvalue())


def _case(golden_case: Path) -> dict:
    return json.loads((golden_case / "case.json").read_text())


def _write_conversation(case: dict, fixtures_dir: Path, folder: Path, relative: bool) -> Path:
    """The case's conversation as a file, images as paths relative to the file's folder or absolute."""
    folder.mkdir(parents=True, exist_ok=True)
    images_dir = fixtures_dir / "images"
    conversation = []
    for message in case["conversation"]:
        paths = [images_dir / name for name in message.get("images", [])]
        names = [os.path.relpath(p, folder) if relative else str(p) for p in paths]
        conversation.append({**message, "images": names})
    path = folder / "conversation.json"
    path.write_text(json.dumps(conversation, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _golden_args(case: dict, fixtures_dir: Path) -> list[str]:
    return ["--model", fixtures_dir / case["checkpoint"], "--temperature", "0",
            "--repetition-penalty", str(case["generation"]["repetition_penalty"]),
            "--max-new-tokens", str(len(case["generated_ids"]))]


def _golden_text(case: dict) -> str:
    return case["generated_text"].replace(EOS, "")


# ------------------------------------------------------------------------------------------------
# Golden answers


def test_every_fixture_conversation_prints_the_golden_text(fixtures_dir, golden_case, tmp_path):
    case = _case(golden_case)
    # Alternate relative and absolute image paths over the cases: both must resolve.
    relative = golden_case.name < "s"
    conversation = _write_conversation(case, fixtures_dir, tmp_path / "in" / "here", relative)
    run = run_cli(*_golden_args(case, fixtures_dir), "--conversation", conversation)
    assert run.code == 0, run.err
    assert run.out == _golden_text(case) + "\n"
    assert "prompt tokens" in run.err  # logs go to stderr, never into the answer


def test_real_command_streams_the_golden_answer_and_logs_to_stderr(fixtures_dir, tmp_path):
    case = _case(fixtures_dir / "cases" / "mla" / "text_only")  # Chinese and a lone U+FFFD in the answer
    conversation = _write_conversation(case, fixtures_dir, tmp_path, relative=True)
    out = subprocess.run(
        [sys.executable, "-m", "deepseek_vl2", *map(str, _golden_args(case, fixtures_dir)), "--conversation",
         str(conversation)],
        capture_output=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parent.parent), "LC_ALL": "C"},
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert out.stdout.decode("utf-8") == _golden_text(case) + "\n"  # UTF-8 also under a bare C locale
    assert b"loaded in" in out.stderr


def test_make_ask_places_images_first_without_tags(fixtures_dir, project_dir):
    """`make ask` runs the real command; --image/--prompt without a tag equals the case's "<image>\\n" + prompt."""
    case = _case(fixtures_dir / "cases" / "mha" / "single_tiled")
    user = case["conversation"][0]
    tag = "<image>\n"
    assert user["content"].startswith(tag)
    prompt = user["content"][len(tag):]
    args = [str(a) for a in _golden_args(case, fixtures_dir)]
    out = subprocess.run(
        ["make", "-s", "-o", "venv", "ask", f"PY={sys.executable}", f"MODEL={args[1]}",
         f"IMAGE={fixtures_dir / 'images' / user['images'][0]}", f"PROMPT={prompt}",
         f"CLI_ARGS={' '.join(args[2:])} --quiet"],
        cwd=project_dir, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == _golden_text(case) + "\n"
    assert out.stderr == ""  # --quiet


@pytest.mark.parametrize("name", ["two_images", "three_images"])
def test_repeated_image_option_tiles_as_the_official_processor(fixtures_dir, name):
    """Two images are tiled dynamically, three get one tile each: the golden answers say which was done."""
    case = _case(fixtures_dir / "cases" / "mha" / name)
    user = case["conversation"][0]
    prompt = user["content"]
    if name == "two_images":  # its tags only put the images first: leave them out, they come first anyway
        assert prompt.startswith("<image>\n<image>\n")
        prompt = prompt[len("<image>\n<image>\n"):]
    images = [a for image in user["images"] for a in ("--image", fixtures_dir / "images" / image)]
    run = run_cli(*_golden_args(case, fixtures_dir), *images, "--prompt", prompt)
    assert run.code == 0, run.err
    assert run.out == _golden_text(case) + "\n"


def test_chat_keeps_the_history(fixtures_dir, tmp_path):
    """The multi-turn case as a chat: the first turn and its answer from a file, the question typed."""
    case = _case(fixtures_dir / "cases" / "mla-noaux" / "multi_turn")
    *history, question, pending = case["conversation"]
    assert question["role"] == "<|User|>" and pending["content"] == ""
    conversation = _write_conversation({**case, "conversation": history}, fixtures_dir, tmp_path, relative=True)
    run = run_cli(*_golden_args(case, fixtures_dir), "--conversation", conversation, "--chat",
                  stdin=f"\n{question['content']}\n/exit\nnot read\n")
    assert run.code == 0, run.err
    assert run.out == _golden_text(case) + "\n"


def test_chat_answers_a_file_that_ends_with_the_question(fixtures_dir, tmp_path):
    case = _case(fixtures_dir / "cases" / "mha" / "multi_turn")
    *asked, pending = case["conversation"]
    roles = {"<|User|>": "user", "<|Assistant|>": "assistant"}  # the short role names work too
    asked = [{**m, "role": roles[m["role"]]} for m in asked]
    conversation = _write_conversation({**case, "conversation": asked}, fixtures_dir, tmp_path, relative=False)
    run = run_cli(*_golden_args(case, fixtures_dir), "--conversation", conversation, "--chat", "--json",
                  stdin="Thanks.\n")
    assert run.code == 0, run.err
    first, second = (json.loads(line) for line in run.out.splitlines())
    assert first["text"] == _golden_text(case)
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["new_tokens"]  # its answer stayed in the history


def test_chat_attaches_images_and_answers_each_question(fixtures_dir):
    case = _case(fixtures_dir / "cases" / "mha" / "single_tiled")
    user = case["conversation"][0]
    prompt = user["content"][len("<image>\n"):]
    image = fixtures_dir / "images" / user["images"][0]
    run = run_cli(*_golden_args(case, fixtures_dir), "--chat", "--json",
                  stdin=f"/image {fixtures_dir / 'images' / 'missing.png'}\n/image {image}\n{prompt}\nAnd now?\n")
    assert run.code == 0, run.err
    first, second = (json.loads(line) for line in run.out.splitlines())  # one JSON line per answer
    assert first["text"] == _golden_text(case)  # the image went with the first question, before its text
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["new_tokens"]  # the history came along
    assert "error: " in run.err and "missing.png" in run.err  # reported, and the chat went on


# ------------------------------------------------------------------------------------------------
# Seeds


def _sampled(fixtures_dir: Path, *extra: str) -> Run:
    return run_cli("--model", fixtures_dir / "checkpoints" / "mha", "--image",
                   fixtures_dir / "images" / "gray_500x300.png", "--prompt", "Describe.", "--temperature", "0.9",
                   "--max-new-tokens", "16", "--repetition-penalty", "1.0", *extra)


def test_same_seed_same_text_other_seed_other_text(fixtures_dir):
    first, again, other = (_sampled(fixtures_dir, "--seed", seed) for seed in ("7", "7", "8"))
    assert first.code == again.code == other.code == 0
    assert first.out == again.out
    assert other.out != first.out


def test_without_a_seed_the_drawn_one_is_shown_and_repeats_the_text(fixtures_dir):
    run = _sampled(fixtures_dir, "--json")
    seed = json.loads(run.out)["seed"]
    assert isinstance(seed, int) and f"--seed {seed}" in run.err
    again = _sampled(fixtures_dir, "--json", "--seed", str(seed))
    assert json.loads(again.out)["text"] == json.loads(run.out)["text"]


# ------------------------------------------------------------------------------------------------
# --json and --draw


def test_json_reports_text_counts_timings_and_boxes(fixtures_dir, tmp_path):
    case = _case(fixtures_dir / "cases" / "mha" / "grounding")
    conversation = _write_conversation(case, fixtures_dir, tmp_path, relative=True)
    drawn = tmp_path / "boxes.png"
    run = run_cli(*_golden_args(case, fixtures_dir), "--conversation", conversation, "--json", "--draw", drawn)
    assert run.code == 0, run.err
    assert run.out.endswith("}\n") and run.out.count("\n") == 1
    record = json.loads(run.out)
    assert record["text"] == _golden_text(case)
    assert record["new_tokens"] == len(case["generated_ids"])
    assert record["prompt_tokens"] > 1000  # the image's tokens are counted
    assert 0 < record["first_token_s"] <= record["generation_s"] <= record["total_s"]
    assert record["seed"] is None  # greedy
    image = Image.open(fixtures_dir / "images" / case["conversation"][0]["images"][0]).convert("RGB")
    assert record["image_size"] == list(image.size)
    assert record["boxes"] == grounding_boxes(record["text"], image.size)
    assert record["drawn"] == str(drawn)
    assert Image.open(drawn).tobytes() == draw_grounding(image, record["text"]).tobytes()


class _GroundedAnswer:
    """A loaded pipeline whose answers are replaced by a fixed grounded answer, streamed in pieces.

    Random fixture weights practically never emit boxes; this checks what the command line does with
    boxes it receives (the pipeline's own streaming is tested above and in test_pipeline.py).
    """

    ANSWER = ("<|ref|>The seed<|/ref|><|det|>[[50, 230, 290, 770]]<|/det|> grows into "
              "<|ref|>leaves<|/ref|><|det|>[[440, 400, 560, 500], [710, 270, 920, 580]]<|/det|>")

    def __init__(self, real: VL2Pipeline) -> None:
        self.real = real
        self.device, self.dtype = real.device, real.dtype
        self.last_stats = None
        self.conversations: list = []

    def stream_conversation(self, conversation, **settings):
        list(self.real.stream_conversation(conversation, **{**settings, "max_new_tokens": 1}))  # validates, counts
        self.last_stats = self.real.last_stats
        self.conversations.append(conversation)
        return iter([self.ANSWER[:30], self.ANSWER[30:]])


def test_draw_writes_every_box_in_pixels_of_the_last_image(fixtures_dir, project_dir, tmp_path):
    stages = project_dir / "examples" / "stages.png"
    fake = _GroundedAnswer(_cached_loader(fixtures_dir / "checkpoints" / "mha"))
    drawn = tmp_path / "out.png"
    run = run_cli("--model", fixtures_dir / "checkpoints" / "mha",
                  "--image", fixtures_dir / "images" / "gray_500x300.png", "--image", stages, "--prompt", "<|grounding|>Where?", "--json", "--draw", drawn,
                  loader=lambda *a, **k: fake)
    assert run.code == 0, run.err
    record = json.loads(run.out)
    assert record["text"] == fake.ANSWER
    assert record["image_size"] == [640, 360]  # the last image's
    assert record["boxes"] == [
        {"label": "The seed", "box": [50, 230, 290, 770], "pixels": [32, 82, 185, 277]},
        {"label": "leaves", "box": [440, 400, 560, 500], "pixels": [281, 144, 358, 180]},
        {"label": "leaves", "box": [710, 270, 920, 580], "pixels": [454, 97, 589, 209]},
    ]
    expected = draw_grounding(Image.open(stages).convert("RGB"), fake.ANSWER)
    assert Image.open(drawn).tobytes() == expected.tobytes()
    assert expected.getpixel((32, 180)) == (255, 0, 0) and expected.getpixel((454, 150)) == (0, 255, 0)


def test_plain_output_is_the_streamed_answer_and_one_newline(fixtures_dir):
    fake = _GroundedAnswer(_cached_loader(fixtures_dir / "checkpoints" / "mha"))
    run = run_cli("--model", fixtures_dir / "checkpoints" / "mha", "--prompt", "Hello", loader=lambda *a, **k: fake)
    assert run.code == 0 and run.out == fake.ANSWER + "\n"
    assert fake.conversations[0] == [{"role": "<|User|>", "content": "Hello", "images": []},
                                     {"role": "<|Assistant|>", "content": "", "images": []}]


def test_a_lone_surrogate_in_a_conversation_file_is_answered_as_the_official_stack_reads_it(fixtures_dir, tmp_path):
    """JSON "\\ud800" (json.load accepts it) is answered as the official stack reads it, three U+FFFD in its
    place (tests/test_processor.py pins the official token ids), not with a traceback."""
    image = str(fixtures_dir / "images" / "small_palette_100x80.png")

    def conversation(name: str, content_json: str) -> Path:
        path = tmp_path / name
        path.write_text(f'[{{"role": "<|User|>", "content": "<image>\\nWhat is {content_json} here?", '
                        f'"images": [{json.dumps(image)}]}}, {{"role": "<|Assistant|>", "content": ""}}]')
        return path

    args = ["--model", fixtures_dir / "checkpoints" / "mha", "--temperature", "0", "--max-new-tokens", "8"]
    lone = run_cli(*args, "--conversation", conversation("lone.json", "\\ud800"))
    read_as = run_cli(*args, "--conversation", conversation("fffd.json", "\\ufffd\\ufffd\\ufffd"))
    assert lone.code == 0 and "Traceback" not in lone.err, lone.err
    assert lone.out == read_as.out and lone.out.strip()


# ------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing on stdout


def _bad(run: Run, *words: str, after_logs: bool = False) -> None:
    """Exit 2, nothing on stdout, the error as the one last line of stderr (and its only line, unless the
    model had been loaded: then the loading logs come before it)."""
    assert run.code == 2, (run.out, run.err)
    assert run.out == ""
    lines = run.err.splitlines()
    assert lines and lines[-1].startswith("error: "), run.err
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in run.err
    if not after_logs:
        assert len(lines) == 1, run.err
    for word in words:
        assert word in lines[-1], lines[-1]


def _files(tmp_path: Path, fixtures_dir: Path) -> dict[str, Path]:
    broken = tmp_path / "broken.json"
    broken.write_text("[{\"role\": ")
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text(json.dumps({"role": "<|User|>"}))
    missing_image = tmp_path / "missing_image.json"
    missing_image.write_text(json.dumps([{"role": "<|User|>", "content": "<image>", "images": ["gone.png"]}]))
    not_image = tmp_path / "notes.png"
    not_image.write_text("just text")
    return {"broken": broken, "not_a_list": not_a_list, "missing_image": missing_image, "not_image": not_image,
            "image": fixtures_dir / "images" / "gray_500x300.png"}


@pytest.mark.parametrize("argv, words", [
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["--temperature", "warm", "--prompt", "x"], ["--temperature", "warm"]),
    (["--seed", "-1", "--prompt", "x"], ["--seed"]),
    (["--temperature", "-1", "--prompt", "x"], ["--temperature"]),
    (["--top-p", "2", "--prompt", "x"], ["--top-p"]),
    (["--max-new-tokens", "-5", "--prompt", "x"], ["--max-new-tokens"]),
    (["--repetition-penalty", "nan", "--prompt", "x"], ["--repetition-penalty"]),
    ([], ["nothing to ask"]),
    (["--prompt", "   "], ["prompt is empty"]),
    (["--prompt", "x", "--image", "{tmp}/nope.png"], ["nope.png", "no such file"]),
    (["--prompt", "x", "--image", "{not_image}"], ["not an image"]),
    (["--conversation", "{tmp}/absent.json"], ["absent.json", "does not exist"]),
    (["--conversation", "{broken}"], ["not valid JSON"]),
    (["--conversation", "{not_a_list}"], ["list of messages"]),
    (["--conversation", "{missing_image}"], ["gone.png", "no such file"]),
    (["--conversation", "{missing_image}", "--prompt", "x"], ["do not also give"]),
    (["--prompt", "x", "--draw", "{tmp}/out.png"], ["--draw needs an image"]),
    (["--prompt", "x", "--image", "{image}", "--draw", "{tmp}/out.unknown"], ["unknown image format"]),
    (["--prompt", "x", "--image", "{image}", "--draw", "{tmp}/no/such/dir/out.png"], ["does not exist"]),
    (["--prompt", "x", "--device", "tpu:x"], ["--device"]),
    (["--prompt", "x", "--dtype", "int3"], ["unknown dtype"]),
])
def test_bad_input_is_refused_before_loading_the_model(fixtures_dir, tmp_path, argv, words):
    files = {"tmp": tmp_path, **_files(tmp_path, fixtures_dir)}
    argv = [a.format(**files) for a in argv]
    _bad(run_cli("--model", fixtures_dir / "checkpoints" / "mha", *argv, loader=_never_load), *words)


def test_missing_model_is_one_line(tmp_path):
    _bad(run_cli("--model", tmp_path / "no-model", "--prompt", "x"), "no-model")
    _bad(run_cli("--model", tmp_path, "--prompt", "x"), "missing")  # a folder without a model


@pytest.mark.parametrize("argv, words", [
    (["--prompt", "<image> and <image>", "--image", "{image}"], ["2 <image> tag(s)", "1 image"]),
    (["--conversation", "{bad_role}"], ["Unknown role"]),
    (["--conversation", "{answer_with_image}"], ["only user messages"]),
    (["--prompt", "{long}"], ["too long"]),
])
def test_bad_input_found_by_the_pipeline_is_one_line(fixtures_dir, tmp_path, argv, words):
    bad_role = tmp_path / "bad_role.json"
    bad_role.write_text(json.dumps([{"role": "robot", "content": "hi"}]))
    answer_with_image = tmp_path / "answer_with_image.json"
    answer_with_image.write_text(json.dumps([{"role": "<|User|>", "content": "hi"},
                                             {"role": "<|Assistant|>", "content": "", "images": ["x.png"]}]))
    (tmp_path / "x.png").write_bytes((fixtures_dir / "images" / "gray_500x300.png").read_bytes())
    files = {"image": fixtures_dir / "images" / "gray_500x300.png", "bad_role": bad_role,
             "answer_with_image": answer_with_image, "long": "word " * 5000}
    argv = [a.format(**files) for a in argv]
    _bad(run_cli("--model", fixtures_dir / "checkpoints" / "mha", *argv), *words, after_logs=True)
    _bad(run_cli("--model", fixtures_dir / "checkpoints" / "mha", "--quiet", *argv), *words)


def test_real_command_bad_input_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deepseek_vl2", "--prompt", "x", "--image", str(tmp_path / "a.png")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parent.parent)})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ") and "a.png" in out.stderr
