"""python -m deepseek_vl2 batch: golden answers of the fixture conversations (the command line's answers), bad
lines as error records, resuming after kill -9 and Ctrl-C, image URLs, seeds, the progress bar.

Most runs call ``batch.main`` in-process with a loader that keeps each fixture checkpoint loaded; the kill and
interrupt tests run the real command as a subprocess.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_cli import _cached_loader  # (the fixture checkpoints loaded once for both modules)

from deepseek_vl2 import batch, cli

EOS = "<｜end▁of▁sentence｜>"
PROJECT = Path(__file__).resolve().parent.parent


def run_batch(*argv, loader=_cached_loader) -> tuple[int, str]:
    err = io.StringIO()
    code = batch.main([str(a) for a in argv], stderr=err, load_pipeline=loader)
    return code, err.getvalue()


def _cases(fixtures_dir: Path, checkpoint: str) -> list[dict]:
    cases = []
    for path in sorted((fixtures_dir / "cases" / checkpoint).glob("*/case.json")):
        case = json.loads(path.read_text())
        case["name"] = path.parent.name
        cases.append(case)
    return cases


def _golden(case: dict) -> str:
    return case["generated_text"].replace(EOS, "")


def _request(case: dict, fixtures_dir: Path, folder: Path) -> dict:
    """The case as a batch line: a single question as images + prompt (paths relative to the requests file),
    a longer conversation in the conversation format (absolute paths)."""
    settings = {"temperature": 0, "repetition_penalty": case["generation"]["repetition_penalty"],
                "max_new_tokens": len(case["generated_ids"])}
    conversation = case["conversation"]
    images = fixtures_dir / "images"
    if len(conversation) == 2:
        names = [os.path.relpath(images / name, folder) for name in conversation[0].get("images", [])]
        return {"id": case["name"], "images": names, "prompt": conversation[0]["content"], **settings}
    messages = [{**m, "images": [str(images / name) for name in m.get("images", [])]} for m in conversation]
    return {"id": case["name"], "conversation": messages, **settings}


def _write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------------
# Golden answers


@pytest.mark.parametrize("checkpoint", ["mha", "mla", "mla-noaux"])
def test_every_greedy_answer_is_the_golden_answer_of_the_command_line(fixtures_dir, tmp_path, checkpoint):
    """Every fixture conversation of a checkpoint in one batch, 4 in flight: each answer is the golden text
    (which tests/test_cli.py shows the command line prints for the same conversation)."""
    cases = _cases(fixtures_dir, checkpoint)
    requests = _write_lines(tmp_path / "requests.jsonl", [_request(c, fixtures_dir, tmp_path) for c in cases])
    code, err = run_batch(requests, "-o", tmp_path / "answers.jsonl", "--model", fixtures_dir / "checkpoints" / checkpoint,
                          "--concurrency", 4)
    assert code == 0, err
    records = {r["id"]: r for r in _records(tmp_path / "answers.jsonl")}
    assert sorted(records) == sorted(c["name"] for c in cases)
    for case in cases:
        record = records[case["name"]]
        assert record["text"] == _golden(case), case["name"]
        assert record["new_tokens"] <= len(case["generated_ids"]) and record["prompt_tokens"] > 0
        assert record["seed"] is None  # greedy: no seed needed
        assert 0 < record["ttft_s"] <= record["total_s"]
    assert "answered" in err and "tok/s" in err  # the progress bar and the summary, on stderr


def test_same_answer_as_the_command_line_when_sampling_with_a_seed(fixtures_dir, tmp_path):
    model = fixtures_dir / "checkpoints" / "mha"
    image = fixtures_dir / "images" / "gray_500x300.png"
    common = {"images": [str(image)], "prompt": "Describe.", "temperature": 0.9, "max_new_tokens": 16}
    requests = _write_lines(tmp_path / "r.jsonl", [{"id": "seeded", **common, "seed": 7}, {"id": "drawn", **common}])
    code, err = run_batch(requests, "-o", tmp_path / "a.jsonl", "--model", model, "--quiet")
    assert code == 0 and err == ""  # --quiet: no progress bar, no logs
    records = {r["id"]: r for r in _records(tmp_path / "a.jsonl")}
    assert records["seeded"]["seed"] == 7
    drawn = records["drawn"]["seed"]
    assert isinstance(drawn, int)

    def cli_text(seed: int) -> str:
        out, log = io.StringIO(), io.StringIO()
        assert cli.main(["--model", str(model), "--image", str(image), "--prompt", "Describe.", "--temperature", "0.9",
                         "--max-new-tokens", "16", "--seed", str(seed)], stdout=out, stderr=log,
                        load_pipeline=_cached_loader) == 0, log.getvalue()
        return out.getvalue()[:-1]

    assert records["seeded"]["text"] == cli_text(7)
    assert records["drawn"]["text"] == cli_text(drawn)  # the seed written is the one used


# ------------------------------------------------------------------------------------------------
# Bad lines


def test_bad_lines_get_error_records_and_the_batch_goes_on(fixtures_dir, tmp_path, bad_images):
    model = fixtures_dir / "checkpoints" / "mha"
    image = str(fixtures_dir / "images" / "gray_500x300.png")
    suffix, data = bad_images["truncated"]
    broken = tmp_path / f"broken{suffix}"
    broken.write_bytes(data)
    good = {"images": [image], "prompt": "Describe.", "temperature": 0, "max_new_tokens": 5}
    lines = [
        {"id": "first", **good},
        '{"id": "torn", "prompt": ',                                    # 2: not JSON
        {"id": "missing", "images": ["nowhere.png"], "prompt": "x"},   # 3
        {"id": "broken", "images": [str(broken)], "prompt": "x"},      # 4
        {"id": "long", "images": [image], "prompt": "word " * 5000},   # 5: too long for the context
        {"id": "first", **good},                                       # 6: duplicate id
        {"prompt": "x"},                                               # 7: no id
        {"id": "hot", "prompt": "x", "temperature": -1},               # 8
        {"id": "typo", "prompt": "x", "temprature": 1},                # 9
        {"id": "tags", "images": [image], "prompt": "<image> and <image>"},  # 10: more tags than images
        "[1, 2]",                                                      # 11
        {"id": "last", **good},
    ]
    requests = _write_lines(tmp_path / "r.jsonl", lines)
    code, err = run_batch(requests, "-o", tmp_path / "a.jsonl", "--model", model, "--concurrency", 2)
    assert code == 0, err
    records = _records(tmp_path / "a.jsonl")
    assert len(records) == len(lines)
    answers = {r["id"]: r for r in records if "text" in r}
    assert set(answers) == {"first", "last"} and answers["first"]["text"] == answers["last"]["text"]
    errors = {r["line"]: r for r in records if "error" in r}
    assert set(errors) == set(range(2, 12))
    expected = {2: (None, "line 2 is not valid JSON"), 3: ("missing", "no such file"),
                4: ("broken", "truncated"), 5: ("long", "too long"), 6: ("first", "already used on line 1"),
                7: (None, "line 7 has no id"), 8: ("hot", "temperature on line 8 must be >= 0"),
                9: ("typo", "unknown field 'temprature'"), 10: ("tags", "<image>"), 11: (None, "not a JSON object")}
    for line, (request_id, needle) in expected.items():
        assert errors[line]["id"] == request_id, errors[line]
        assert needle in errors[line]["error"], errors[line]
        assert "Traceback" not in errors[line]["error"] and "\n" not in errors[line]["error"]


def test_an_id_with_a_lone_surrogate_gets_an_error_record_and_the_batch_goes_on(fixtures_dir, tmp_path):
    """JSON can escape half of a surrogate pair alone ("\\ud800"), which no UTF-8 output can hold: that id is
    refused with a readable record (its line, no id) instead of killing the worker that wrote it; a prompt with
    one is answered (the processor reads it as the official stack does), and running again skips the line."""
    model = fixtures_dir / "checkpoints" / "mha"
    image = json.dumps(str(fixtures_dir / "images" / "gray_500x300.png"))
    good = f'"images": [{image}], "temperature": 0, "max_new_tokens": 3'
    lines = [
        f'{{"id": "first", "prompt": "Describe.", {good}}}',
        f'{{"id": "\\ud800", "prompt": "Describe.", {good}}}',            # 2: the id is no text
        f'{{"id": "a\\udfffb", "prompt": "Describe.", {good}}}',          # 3: a low half, inside
        f'{{"id": "prompt", "prompt": "Describe \\ud800.", {good}}}',     # 4: answered
        f'{{"id": "\\ud83d\\ude00", "prompt": "Describe.", {good}}}',   # 5: a whole pair is an emoji: answered
        f'{{"id": "last", "prompt": "Describe.", {good}}}',
    ]
    requests = tmp_path / "r.jsonl"
    requests.write_text("\n".join(lines) + "\n", encoding="ascii")
    answers = tmp_path / "a.jsonl"
    code, err = run_batch(requests, "-o", answers, "--model", model, "--concurrency", 2)
    assert code == 0, err
    assert "Traceback" not in err and "UnicodeEncodeError" not in err, err
    records = _records(answers)  # (the file is UTF-8 throughout: read_text would raise otherwise)
    assert len(records) == len(lines)
    assert {r["id"] for r in records if "text" in r} == {"first", "prompt", "\U0001F600", "last"}
    errors = {r["line"]: r for r in records if "error" in r}
    assert set(errors) == {2, 3}
    for line, shown in ((2, "\\ud800"), (3, "\\udfff")):
        assert errors[line]["id"] is None
        message = errors[line]["error"]
        assert f"the id on line {line} is not text" in message and shown in message and "surrogate" in message, message
    # run again: every line has its record, nothing is answered or refused twice
    assert run_batch(requests, "-o", answers, "--model", model)[0] == 0
    assert _records(answers) == records
    # anything else that quotes such a character is still written (escaped, as JSON allows), never a crash
    assert json.loads(batch._record_line({"id": "x", "line": 1, "error": "half \ud800 of a pair"})) == {
        "id": "x", "line": 1, "error": "half \ud800 of a pair"}


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the arguments were refused")

    requests = _write_lines(tmp_path / "r.jsonl", [{"id": 1, "prompt": "x"}])
    for argv, needle in [
        ([tmp_path / "none.jsonl", "-o", tmp_path / "a.jsonl"], "does not exist"),
        ([requests], "-o/--output"),
        ([requests, "-o", tmp_path / "no" / "a.jsonl"], "folder"),
        ([requests, "-o", requests], "the output is the requests file"),
        ([requests, "-o", tmp_path / "a.jsonl", "--concurrency", "0"], "at least 1"),
    ]:
        code, err = run_batch(*argv, loader=never)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    (tmp_path / "other.jsonl").write_text("not a record\n")
    code, err = run_batch(requests, "-o", tmp_path / "other.jsonl", loader=never)
    assert code == 2 and "not an answer record" in err


# ------------------------------------------------------------------------------------------------
# Resuming


def _command(*argv) -> list[str]:
    return [sys.executable, "-m", "deepseek_vl2", "batch", *map(str, argv)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(PROJECT)}


def _wait_for_answers(path: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists() and sum('"text"' in line for line in path.read_text().splitlines()) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"no {count} answers in {timeout} s")


def _slow_batch(fixtures_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Golden requests of the mha checkpoint with long greedy answers between them (several seconds each on
    the test checkpoint), so that a kill after two answers finds the batch running; the right text of each id
    (the golden one, or the command line's)."""
    cases = _cases(fixtures_dir, "mha")[:5]
    image = fixtures_dir / "images" / "gray_500x300.png"
    lines, right = [], {}
    for n, case in enumerate(cases):
        lines.append(_request(case, fixtures_dir, tmp_path))
        right[case["name"]] = _golden(case)
        if n >= 1:
            long = {"id": f"long-{n}", "images": [str(image)], "prompt": f"Tell a long story, part {n}.",
                    "temperature": 0, "repetition_penalty": 1.0, "max_new_tokens": 600}
            lines.append(long)
            out, err = io.StringIO(), io.StringIO()
            assert cli.main(["--model", str(fixtures_dir / "checkpoints" / "mha"), "--image", str(image), "--prompt",
                             long["prompt"], "--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens",
                             "600"], stdout=out, stderr=err, load_pipeline=_cached_loader) == 0, err.getvalue()
            right[long["id"]] = out.getvalue()[:-1]
    return _write_lines(tmp_path / "requests.jsonl", lines), right


def _assert_each_id_once_and_right(answers: Path, right: dict[str, str]) -> None:
    raw = answers.read_text(encoding="utf-8")
    assert raw.endswith("\n")
    records = _records(answers)
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(right), ids  # every id exactly once
    for record in records:
        assert record["text"] == right[record["id"]], record["id"]


def test_killed_after_two_answers_then_run_again_gives_every_id_once_and_right(fixtures_dir, tmp_path):
    requests, right = _slow_batch(fixtures_dir, tmp_path)
    answers = tmp_path / "answers.jsonl"
    argv = _command(requests, "-o", answers, "--model", fixtures_dir / "checkpoints" / "mha", "--concurrency", 1, "-q")
    process = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_answers(answers, 2, process)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()
    first_run = _records(answers)
    assert 2 <= len(first_run) < len(right), "the kill did not find the batch running"
    # A kill in the middle of a write leaves a torn last line: the next run drops it and answers that id again.
    with open(answers, "ab") as fh:
        fh.write(json.dumps({"id": "long-1", "text": "half of an ans"}).encode()[:30])
    again = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert _records(answers)[: len(first_run)] == first_run  # nothing written was lost or rewritten
    _assert_each_id_once_and_right(answers, right)
    third = subprocess.run(argv[:-1], env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "nothing left to answer" in third.stderr, third.stderr
    assert "loaded in" not in third.stderr  # nothing to do: the model is not even loaded
    _assert_each_id_once_and_right(answers, right)


def test_ctrl_c_stops_at_once_writes_only_whole_answers_and_resumes(fixtures_dir, tmp_path):
    requests, right = _slow_batch(fixtures_dir, tmp_path)
    answers = tmp_path / "answers.jsonl"
    argv = _command(requests, "-o", answers, "--model", fixtures_dir / "checkpoints" / "mha", "--concurrency", 2)
    process = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_answers(answers, 2, process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert len(_records(answers)) < len(right)
    again = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    _assert_each_id_once_and_right(answers, right)


def test_retry_errors_answers_the_refused_requests_again(fixtures_dir, tmp_path):
    model = fixtures_dir / "checkpoints" / "mha"
    image = fixtures_dir / "images" / "gray_500x300.png"
    requests = _write_lines(tmp_path / "r.jsonl", [{"id": 1, "images": ["later.png"], "prompt": "Describe.",
                                                    "temperature": 0, "max_new_tokens": 4}])
    answers = tmp_path / "a.jsonl"
    assert run_batch(requests, "-o", answers, "--model", model)[0] == 0
    assert "no such file" in _records(answers)[0]["error"]
    (tmp_path / "later.png").write_bytes(image.read_bytes())
    assert run_batch(requests, "-o", answers, "--model", model)[0] == 0
    assert len(_records(answers)) == 1  # refused once: skipped like an answer
    assert run_batch(requests, "-o", answers, "--model", model, "--retry-errors")[0] == 0
    [record] = _records(answers)
    assert record["id"] == 1 and "text" in record


# ------------------------------------------------------------------------------------------------
# Image URLs


class _Images(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # (quiet)
        pass


def test_image_urls_are_fetched_and_a_dead_one_is_an_error_record(fixtures_dir, tmp_path):
    model = fixtures_dir / "checkpoints" / "mha"
    handler = functools.partial(_Images, directory=str(fixtures_dir / "images"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        image = fixtures_dir / "images" / "gray_500x300.png"
        settings = {"prompt": "Describe.", "temperature": 0, "max_new_tokens": 6}
        requests = _write_lines(tmp_path / "r.jsonl", [{"id": "url", "images": [f"{url}/gray_500x300.png"], **settings},
                                                       {"id": "file", "images": [str(image)], **settings},
                                                       {"id": "404", "images": [f"{url}/nothing.png"], **settings}])
        code, err = run_batch(requests, "-o", tmp_path / "a.jsonl", "--model", model)
    finally:
        server.shutdown()
    assert code == 0, err
    records = {r["id"]: r for r in _records(tmp_path / "a.jsonl")}
    assert records["url"]["text"] == records["file"]["text"]
    assert "cannot download the image" in records["404"]["error"] and "404" in records["404"]["error"]
