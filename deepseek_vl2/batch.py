"""Many requests from a JSON Lines file: ``python -m deepseek_vl2 batch REQUESTS.jsonl -o ANSWERS.jsonl``.

Each input line is one request, in one of two shapes (the command line's ``--image``/``--prompt``, or its
conversation format)::

    {"id": "a1", "images": ["photo.png", "https://example.com/b.jpg"], "prompt": "Compare <image> with <image>."}
    {"id": "a2", "conversation": [{"role": "<|User|>", "content": "<image>\\nWhat is it?", "images": ["c.png"]},
                                  {"role": "<|Assistant|>", "content": ""}]}

either with its own ``temperature``, ``top_p``, ``repetition_penalty``, ``max_new_tokens`` and ``seed`` (the
command line's names and defaults). Image paths are relative to the requests file's folder; http(s) URLs
are fetched within the server's bounds (``download.py``).

Every request goes through the model's batching engine, ``--concurrency`` of them in flight (default: the
engine's slots), and each answer is written to the output as one line, whole and flushed, as soon as it
completes (so in the order they complete)::

    {"id": "a1", "text": "...", "prompt_tokens": 612, "new_tokens": 87, "seed": 1234, "ttft_s": 1.9, "total_s": 6.2}

A line that cannot be answered (not JSON, no id, an id that is not text such as "\\ud800", a duplicate id, a
missing or broken image, a prompt too long for the context, a setting out of range) gets ``{"id", "line", "error"}`` instead and the batch goes on.

Running again with the same output resumes: the requests already answered (or refused) there are skipped,
and a last line torn by a kill is dropped and its request answered again, so that every request has exactly
one record. ``--retry-errors`` answers the refused ones again (their records are replaced).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from . import cli
from .cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, UsageError
from .processor import InputError

__all__ = ["main", "build_parser", "SETTINGS"]

# A line's settings and their defaults: the command line's.
SETTINGS: dict[str, Any] = {
    "temperature": cli.DEFAULT_TEMPERATURE,
    "top_p": cli.DEFAULT_TOP_P,
    "repetition_penalty": cli.DEFAULT_REPETITION_PENALTY,
    "max_new_tokens": cli.DEFAULT_MAX_NEW_TOKENS,
    "seed": None,
}
_FIELDS = ("id", "images", "prompt", "conversation", *SETTINGS)


def build_parser() -> argparse.ArgumentParser:
    parser = cli._Parser(
        prog=f"{cli.PROG} batch",
        description="Answer every request of a JSON Lines file through the batching engine, several at once; "
        "each answer is appended to the output as soon as it is done. Running again with the same output "
        "skips the requests already answered.",
    )
    parser.add_argument("requests", metavar="REQUESTS.jsonl",
                        help='one request per line: {"id", "images": [...], "prompt"} or {"id", "conversation": [...]}, '
                        "optionally with temperature, top_p, repetition_penalty, max_new_tokens, seed")
    parser.add_argument("-o", "--output", required=True, metavar="ANSWERS.jsonl",
                        help="where the answers go, one JSON object per line (appended; resumed if it exists)")
    parser.add_argument("--model", help="model directory or Hugging Face repo id "
                        "(default: $DEEPSEEK_VL2_WEIGHTS, else deepseek-ai/deepseek-vl2)")
    parser.add_argument("--concurrency", type=int, metavar="N",
                        help="requests in flight at once (default: the engine's slots: "
                        "$DEEPSEEK_VL2_MAX_CONCURRENCY, else 16 on a GPU and 8 on a CPU)")
    parser.add_argument("--retry-errors", action="store_true",
                        help="answer again the requests the output holds an error for (their error records are removed)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or logs on stderr")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    parser.add_argument("--dtype", help="bfloat16, float16 or float32 (default: $DEEPSEEK_VL2_DTYPE, "
                        "else the fastest the hardware handles natively)")
    return parser


# ------------------------------------------------------------------------------------------------
# The requests


class _Refused(Exception):
    """A line that gets an error record; the message is the record's ``error``."""


@dataclass
class _Job:
    line: int
    id: Any
    request: dict[str, Any]
    settings: dict[str, Any]


def _id_key(request_id: Any) -> str:
    return json.dumps(request_id)  # (1 and "1" are different ids)


def _is_text(value: str) -> bool:
    """Whether ``value`` can be written as UTF-8: JSON can escape half of a surrogate pair alone ("\\ud800"),
    which Python reads into a string that is no text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _usable_id(request_id: Any) -> bool:
    """A string (that is text) or an integer: an id the answers can be written under and found by."""
    if isinstance(request_id, str):
        return _is_text(request_id)
    return isinstance(request_id, int) and not isinstance(request_id, bool)


def _read_requests(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON object or the ``_Refused`` saying why not) for each non-blank line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"requests file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read requests file {str(path)!r}: {exc.strerror or exc}") from None
    lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except UnicodeDecodeError:
            lines.append((number, _Refused(f"line {number} is not UTF-8 text")))
            continue
        except json.JSONDecodeError as exc:
            lines.append((number, _Refused(f"line {number} is not valid JSON: {exc.msg} (column {exc.colno})")))
            continue
        lines.append((number, data))
    return lines


def _job(number: int, data: Any) -> _Job:
    """Check a line's shape and settings (not its images: they are opened when it runs)."""
    if not isinstance(data, dict):
        raise _Refused(f"line {number} is not a JSON object")
    request_id = data.get("id")
    if request_id is None:
        raise _Refused(f"line {number} has no id")
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        raise _Refused(f"the id on line {number} must be a string or an integer, got {json.dumps(request_id)}")
    if not _usable_id(request_id):
        raise _Refused(f"the id on line {number} is not text: {json.dumps(request_id)} holds half of a surrogate pair "
                       "alone, which UTF-8 cannot hold (the answers are written in UTF-8)")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise _Refused(f"unknown field {unknown[0]!r} on line {number} (known: {', '.join(_FIELDS)})")
    if "conversation" in data:
        if "prompt" in data or "images" in data:
            raise _Refused(f"line {number} has a conversation and a prompt or images: the conversation holds them")
    else:
        prompt = data.get("prompt")
        if not isinstance(prompt, str):
            raise _Refused(f"line {number} needs a prompt (text) or a conversation")
        if not prompt.strip():
            raise _Refused(f"the prompt on line {number} is empty")
        images = data.get("images", [])
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
            raise _Refused(f"the images on line {number} must be a list of paths or URLs")
    settings = {key: data.get(key, default) for key, default in SETTINGS.items()}
    for key, value in settings.items():
        whole = key in ("max_new_tokens", "seed")
        if value is None and key == "seed":
            continue
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            kind = "a whole number" if whole else "a number"
            raise _Refused(f"{key} on line {number} must be {kind}, got {json.dumps(value)}")
    try:
        cli.check_settings(**settings, name=lambda key: f"{key} on line {number}")
    except (UsageError, InputError) as exc:
        raise _Refused(str(exc)) from None
    return _Job(number, request_id, data, settings)


def _open_image(reference: str, base: Path) -> Any:
    """An image of a request: an http(s) URL (fetched within bounds), else a path relative to ``base``."""
    from .download import DownloadError, fetch_image
    from .processor import load_image

    if reference.startswith(("http://", "https://")):
        try:
            path = fetch_image(reference, Path(reference.split("?")[0]).suffix)
        except DownloadError as exc:
            raise UsageError(f"cannot download the image {reference}: {exc}") from None
        try:
            return load_image(path)
        except InputError as exc:
            raise UsageError(f"the image {reference}: {exc}") from None
        finally:
            os.unlink(path)
    return cli._open_image(base / Path(reference).expanduser())


def _conversation(job: _Job, base: Path) -> list[dict[str, Any]]:
    open_image: Callable[[str], Any] = lambda reference: _open_image(reference, base)  # noqa: E731
    if "conversation" in job.request:
        return cli.parse_conversation(job.request["conversation"], open_image, f"the conversation on line {job.line}")
    images = job.request.get("images", [])
    images = [images] if isinstance(images, str) else images
    return [cli.user_turn(job.request["prompt"], [open_image(image) for image in images]), cli.answer_turn()]


# ------------------------------------------------------------------------------------------------
# The answers


class _Answers:
    """The output file: what it already holds (read once), then records appended whole, each flushed."""

    def __init__(self, path: Path, retry_errors: bool) -> None:
        self.path = path
        self.answered: set[str] = set()  # ids with an answer
        self.refused_lines: set[int] = set()  # input lines with an error record
        self._lock = threading.Lock()
        records = self._read()
        if retry_errors and any("error" in record for record in records):
            records = [record for record in records if "error" not in record]
            self._rewrite(records)
        for record in records:
            if "error" in record:
                self.refused_lines.add(record.get("line"))
            else:
                self.answered.add(_id_key(record["id"]))
        self._file: Optional[TextIO] = open(path, "a", encoding="utf-8", newline="\n")

    def _read(self) -> list[dict[str, Any]]:
        """The records so far. A last line without its newline was torn by a kill mid-write: it is cut off
        (its request is answered again)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UsageError(f"cannot read the output {str(self.path)!r}: {exc.strerror or exc}") from None
        whole = raw.rfind(b"\n") + 1
        if whole < len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(whole)
        records = []
        for number, line in enumerate(raw[:whole].split(b"\n")[:-1], start=1):
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if not isinstance(record, dict) or "id" not in record or not ("text" in record or "error" in record):
                raise UsageError(f"line {number} of the output {str(self.path)!r} is not an answer record of this "
                                 "command: give another output file (or remove that line)")
            records.append(record)
        return records

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the file by ``records`` at once (a kill leaves either the old file or the new one)."""
        temp = self.path.with_name(self.path.name + ".rewrite")
        with open(temp, "w", encoding="utf-8", newline="\n") as fh:
            for record in records:
                fh.write(_record_line(record))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, self.path)

    def done(self, line: int, request_id: Any) -> bool:
        return line in self.refused_lines or (request_id is not None and _id_key(request_id) in self.answered)

    def write(self, record: dict[str, Any]) -> None:
        text = _record_line(record)  # (one write: a kill can tear only the last line)
        with self._lock:
            if self._file is not None:
                self._file.write(text)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _record_line(record: dict[str, Any]) -> str:
    """A record as one line of JSON, characters as they are; a lone surrogate anywhere in it (a message
    quoting the input) escaped instead, as JSON allows, so that writing never fails."""
    text = json.dumps(record, ensure_ascii=False)
    return (text if _is_text(text) else json.dumps(record)) + "\n"


def _error_record(line: int, request_id: Any, exc: BaseException) -> dict[str, Any]:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (UsageError, InputError, _Refused)):
        message = f"{type(exc).__name__}: {message}"  # (an unexpected failure: say what kind)
    return {"id": request_id, "line": line, "error": message}


class _Run:
    """Worker threads answering the jobs, at most ``in_flight`` in the engine at once."""

    def __init__(self, pipeline: Any, jobs: list[_Job], answers: _Answers, base: Path, in_flight: int,
                 progress: Any) -> None:
        self.pipeline, self.answers, self.base, self.progress = pipeline, answers, base, progress
        self._jobs = iter(jobs)
        self._jobs_lock = threading.Lock()
        # Workers open the next request's images while the others' requests are in the engine; only
        # ``in_flight`` of them hold an engine request at once.
        self._engine_places = threading.Semaphore(in_flight)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answered = self.refused = self.new_tokens = 0
        self.running: dict[int, Any] = {}  # worker -> the RequestStats of its request in the engine
        # Not daemons, and never join()ed where Ctrl-C can land: the interpreter must wait for every worker at
        # exit. A worker still inside a PyTorch op (its next request's image tensors) when the interpreter
        # shut down was ended from within that op's GIL release guard, a noexcept destructor: "terminate called
        # without an active exception", SIGABRT after the batch printed that it was interrupted (core dumps).
        # Daemon workers were not waited for; and a KeyboardInterrupt inside Thread.join() makes CPython 3.11
        # release a running thread's state lock and mark it stopped (its bpo-45274 handling), so it is not
        # waited for either. The main thread waits on ``all_done`` instead; every way out of _answer_all sets
        # ``stop``, and a worker stops at its next token.
        self.threads = [threading.Thread(target=self._work, args=(n,), name=f"batch-{n}")
                        for n in range(min(len(jobs), 2 * in_flight))]
        self._workers_left = len(self.threads)
        self.all_done = threading.Event()
        if not self.threads:
            self.all_done.set()

    def tokens_so_far(self) -> int:
        with self.lock:
            return self.new_tokens + sum(stats.new_tokens for stats in self.running.values() if stats is not None)

    def _next(self) -> Optional[_Job]:
        with self._jobs_lock:
            return None if self.stop.is_set() else next(self._jobs, None)

    def _work(self, worker: int) -> None:
        try:
            self._work_through(worker)
        finally:
            with self.lock:
                self._workers_left -= 1
                if self._workers_left == 0:
                    self.all_done.set()

    def _work_through(self, worker: int) -> None:
        while (job := self._next()) is not None:
            try:
                record = self._answer(worker, job)
            except Exception as exc:  # noqa: BLE001 - a request that fails fails alone; the batch goes on
                record = _error_record(job.line, job.id, exc)
            if record is None:  # stopped before it finished: nothing written, answered again next run
                return
            self.answers.write(record)
            with self.lock:
                if "error" in record:
                    self.refused += 1
                else:
                    self.answered += 1
                    self.new_tokens += record["new_tokens"]
            self.progress.update(1)

    def _answer(self, worker: int, job: _Job) -> Optional[dict[str, Any]]:
        conversation = _conversation(job, self.base)
        settings = dict(job.settings)
        settings["seed"] = cli.seed_for(settings["seed"], settings["temperature"], settings["top_p"])
        with self._engine_places:
            if self.stop.is_set():
                return None
            started = time.perf_counter()
            pieces, stats = cli.stream_answer(self.pipeline, conversation, **settings)
            submitted = time.perf_counter()
            with self.lock:
                self.running[worker] = stats
            try:
                text = ""
                for piece in pieces:
                    if self.stop.is_set():
                        return None
                    text += piece
            finally:
                pieces.close()  # (cancels the request in the engine if it is still there)
                with self.lock:
                    self.running.pop(worker, None)
        ended = time.perf_counter()
        return {
            "id": job.id,
            "text": text,
            "prompt_tokens": stats.prompt_tokens if stats else None,
            "new_tokens": stats.new_tokens if stats else 0,
            "seed": settings["seed"],
            # from the moment it took its place among those in flight (its images already opened; their
            # processing included) to its first token, and to its end
            "ttft_s": round(submitted - started + stats.first_token_s, 4) if stats else None,
            "total_s": round(ended - started, 4),
        }


def _progress_bar(total: int, initial: int, quiet: bool, stderr: TextIO) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="req", desc="answered", file=stderr, disable=quiet,
                dynamic_ncols=True, smoothing=0.1)


# ------------------------------------------------------------------------------------------------
# The command


def main(argv: Optional[Sequence[str]] = None, *, stderr: Optional[TextIO] = None,
         load_pipeline: Callable[..., Any] = cli._default_loader) -> int:
    """Run the batch; return the exit status (0 when every request has a record, 2 for bad arguments, 130
    when interrupted). ``load_pipeline(model_dir, device=, dtype=)`` builds the pipeline (tests pass a cached one)."""
    stderr = stderr if stderr is not None else cli._never_fails(sys.stderr)
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        return _batch(args, cli.logger(stderr, args.quiet), stderr, load_pipeline)
    except (UsageError, InputError) as exc:
        cli._error(stderr, exc)
        return EXIT_BAD_INPUT


def _batch(args: argparse.Namespace, log: Callable[[str], None], stderr: TextIO,
           load_pipeline: Callable[..., Any]) -> int:
    requests_path, output_path = Path(args.requests).expanduser(), Path(args.output).expanduser()
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {args.concurrency}")
    if not output_path.parent.is_dir():
        raise UsageError(f"the output's folder {str(output_path.parent)!r} does not exist")
    if output_path.exists() and requests_path.exists() and os.path.samefile(output_path, requests_path):
        raise UsageError("the output is the requests file: give another file with -o")
    cli.check_device(args.device)
    lines = _read_requests(requests_path)
    answers = _Answers(output_path, args.retry_errors)
    try:
        return _answer_all(args, lines, answers, requests_path.parent, log, stderr, load_pipeline)
    finally:
        answers.close()


def _answer_all(args: argparse.Namespace, lines: list[tuple[int, Any]], answers: _Answers, base: Path,
                log: Callable[[str], None], stderr: TextIO, load_pipeline: Callable[..., Any]) -> int:
    # Lines that cannot run are refused now, before the model loads; the first line with an id owns it.
    jobs: list[_Job] = []
    first_line: dict[str, int] = {}
    skipped = refused_now = 0
    for number, data in lines:
        request_id = data.get("id") if isinstance(data, dict) else None
        key = _id_key(request_id) if _usable_id(request_id) else None
        duplicate_of = first_line.get(key) if key is not None else None
        if key is not None and duplicate_of is None:
            first_line[key] = number
        if answers.done(number, None if duplicate_of else request_id):
            skipped += 1
            continue
        try:
            if isinstance(data, _Refused):
                raise data
            if duplicate_of is not None:
                raise _Refused(f"the id {json.dumps(request_id)} on line {number} was already used on line {duplicate_of}")
            jobs.append(_job(number, data))
        except _Refused as exc:
            answers.write(_error_record(number, request_id if key is not None else None, exc))
            refused_now += 1
    if skipped:
        log(f"{skipped} request(s) already in {args.output}: skipped")
    if not jobs:
        log(f"nothing left to answer: {len(lines)} request(s), {refused_now} refused now")
        return 0

    pipeline = cli._load(args, log, load_pipeline)
    from .memory import DoesNotFitError

    try:
        engine = pipeline.start(args.concurrency) if args.concurrency else pipeline.engine
    except DoesNotFitError as exc:
        raise UsageError(str(exc)) from None
    in_flight = args.concurrency or engine.slots
    pipeline.warm_up()  # (one-time costs now, and every request on the same paths, as in the Cog server)
    log(f"answering {len(jobs)} request(s), {in_flight} at once")
    progress = _progress_bar(len(lines), skipped + refused_now, args.quiet, stderr)
    run = _Run(pipeline, jobs, answers, base, in_flight, progress)
    started = time.perf_counter()
    try:
        for thread in run.threads:
            thread.start()
        while not run.all_done.wait(0.5):
            rate = run.tokens_so_far() / max(time.perf_counter() - started, 1e-9)
            progress.set_postfix_str(f"{rate:.1f} tok/s", refresh=True)
    except KeyboardInterrupt:
        run.stop.set()  # each worker stops at its next token (cancelling its request) and writes nothing more
        run.all_done.wait(5)
        answers.close()
        progress.close()
        stderr.write(f"\ninterrupted: {run.answered} answered in this run, {len(jobs) - run.answered - run.refused} "
                     f"left; run the same command again to go on\n")
        return EXIT_INTERRUPTED
    finally:
        run.stop.set()  # (whatever the way out: the workers, not daemons, stop at their next token)
    progress.close()
    elapsed = time.perf_counter() - started
    log(f"{run.answered} answered, {refused_now + run.refused} refused (error records), {skipped} done before; "
        f"{run.new_tokens} new tokens in {elapsed:.1f} s ({run.new_tokens / max(elapsed, 1e-9):.1f} tok/s) "
        f"-> {args.output}")
    return 0
