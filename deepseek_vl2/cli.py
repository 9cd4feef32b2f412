"""The command line: ``python -m deepseek_vl2`` runs everything the model does.

One question about images::

    python -m deepseek_vl2 --model deepseek-ai/deepseek-vl2-tiny --image photo.png --prompt "What is this?"

A whole conversation (several images, several turns) from a JSON file in the fixtures' format::

    [{"role": "<|User|>", "content": "<image>\\nWhat is in the picture?", "images": ["photo.png"]},
     {"role": "<|Assistant|>", "content": ""}]

``--chat`` goes on interactively with the history, ``--json`` prints one JSON object per answer (text,
token counts, timings, the seed, grounding boxes), ``--draw out.png`` writes the last image with the
answer's grounding boxes.

The answer streams to stdout as it is generated, followed by one newline; logs and progress go to
stderr, so ``answer=$(python -m deepseek_vl2 ...)`` captures only the answer. Bad input (a missing file,
a malformed conversation, an out-of-range setting, a prompt too long for the context) prints a one-line
``error: ...`` on stderr and exits with status 2, before the model is loaded where it can be checked
without the model.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO

from PIL import Image

from .grounding import draw_grounding, grounding_boxes
from .processor import _ASSISTANT_ROLES, _USER_ROLES, ASSISTANT_ROLE, USER_ROLE, InputError, load_image

__all__ = ["main", "build_parser", "read_conversation", "parse_conversation", "stream_answer", "seed_for",
           "check_settings", "UsageError", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = 2  # as argparse: the request cannot run as given
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

PROG = "python -m deepseek_vl2"

# The same defaults as the Cog API, so that the command line and a prediction give the same answers.
DEFAULT_TEMPERATURE = 0.1
DEFAULT_TOP_P = 0.9
DEFAULT_REPETITION_PENALTY = 1.1
DEFAULT_MAX_NEW_TOKENS = 2048

# Seeds drawn when none is given stay below 2**31 so that they are short to retype.
_SEED_RANGE = 2**31


# ``python -m deepseek_vl2 NAME ...`` runs ``deepseek_vl2.<module>.main(argv)`` (each with its own options and
# --help); anything else is a question to the model (the options below).
SUBCOMMANDS: dict[str, str] = {"web": "web", "batch": "batch", "quantize": "quantize_checkpoint"}


def _subcommand(name: str) -> Any:
    import importlib

    return importlib.import_module(f".{SUBCOMMANDS[name]}", __package__)


class UsageError(Exception):
    """Input the command cannot run on; the message is the one line shown to the user."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` instead of printing the usage block and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Ask DeepSeek-VL2 about images: one question, a conversation file or an interactive chat. "
        "The answer streams to stdout; logs go to stderr.",
        epilog=(f"other commands: {', '.join(sorted(SUBCOMMANDS))} ({PROG} COMMAND --help)" if SUBCOMMANDS else None),
    )
    source = parser.add_argument_group("what to ask")
    source.add_argument("--model", help="model directory or Hugging Face repo id "
                        "(default: $DEEPSEEK_VL2_WEIGHTS, else deepseek-ai/deepseek-vl2)")
    source.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="an image (repeatable). Up to 2 images are tiled dynamically, 3 or more get one tile each")
    source.add_argument("--prompt", help="the question; <image> tags place the images, without tags they come first")
    source.add_argument("--conversation", metavar="FILE.json",
                        help="a whole conversation: a JSON list of {role, content, images} messages "
                        "(images as paths, absolute or relative to the file); the last message is the "
                        "empty assistant turn to generate")
    source.add_argument("--chat", action="store_true",
                        help="interactive: read further questions from stdin, keeping the history "
                        "(/image FILE attaches an image to the next question; /exit or end of input ends)")

    sampling = parser.add_argument_group("decoding")
    sampling.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
                          help=f"0 means greedy (default {DEFAULT_TEMPERATURE})")
    sampling.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, metavar="P",
                          help=f"nucleus sampling, 0 means greedy (default {DEFAULT_TOP_P})")
    sampling.add_argument("--repetition-penalty", type=float, default=DEFAULT_REPETITION_PENALTY, metavar="R",
                          help=f"1 or 0 means none (default {DEFAULT_REPETITION_PENALTY})")
    sampling.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                          help="at most this many new tokens, clamped to the context "
                          f"(default {DEFAULT_MAX_NEW_TOKENS})")
    sampling.add_argument("--seed", type=_seed, metavar="N",
                          help="seed of the sampler: the same seed and settings give the same text on the same "
                          "device (default: a random seed, shown on stderr and in --json)")

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true",
                        help="print one JSON object per answer: text, token counts, timings, seed, boxes")
    output.add_argument("--draw", metavar="OUT.png",
                        help="write the last image of the conversation with the answer's grounding boxes")
    output.add_argument("--quiet", "-q", action="store_true", help="no logs on stderr (errors still show)")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    hardware.add_argument("--quantize", metavar="SCHEME",
                          help="int8 or int4 (int4:N for groups of N): the language model's weights quantized while "
                          "loading (default: $DEEPSEEK_VL2_QUANTIZE, else none; a quantized checkpoint loads in its own)")
    hardware.add_argument("--dtype", help="bfloat16, float16 or float32 (default: $DEEPSEEK_VL2_DTYPE, "
                          "else the fastest the hardware handles natively)")
    return parser


# ------------------------------------------------------------------------------------------------
# Reading the request


def _open_image(path: Path) -> Image.Image:
    """Load an image now, so that a bad file is reported before the model is loaded."""
    try:
        return load_image(path)
    except InputError as exc:
        raise UsageError(str(exc)) from None


def read_conversation(path: Path) -> list[dict[str, Any]]:
    """A conversation file -> messages with their images loaded (paths relative to the file's folder).

    The file holds a JSON list of ``{"role", "content", "images"}`` messages, or an object with such a
    list under ``"conversation"`` (the shape of the fixtures' case.json).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"conversation file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read conversation file {str(path)!r}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"conversation file {str(path)!r} is not valid JSON: {exc}") from None
    return parse_conversation(data, lambda name: _open_image(path.parent / Path(name).expanduser()),
                              f"conversation file {str(path)!r}")


def parse_conversation(data: Any, open_image: Callable[[str], Any], source: str) -> list[dict[str, Any]]:
    """JSON data in the conversation format -> messages with their images opened by ``open_image(name)``.

    ``data`` is a list of ``{"role", "content", "images"}`` messages or an object with the list under
    ``"conversation"``; ``source`` names it in messages (``conversation file 'x.json'``, ``line 7``).
    """
    messages = data.get("conversation") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{source} must hold a non-empty list of messages")
    conversation = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise UsageError(f"message {number} of {source} is not an object with role, content and images")
        names = message.get("images") or []
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise UsageError(f"the images of message {number} of {source} must be a list of paths")
        conversation.append({**message, "images": [open_image(name) for name in names]})
    return conversation


def user_turn(prompt: str, images: list[Any]) -> dict[str, Any]:
    return {"role": USER_ROLE, "content": prompt, "images": images}


def answer_turn(text: str = "") -> dict[str, Any]:
    return {"role": ASSISTANT_ROLE, "content": text, "images": []}


def last_image(conversation: Sequence[dict[str, Any]]) -> Optional[Image.Image]:
    """The image the official demo draws boxes on: the last one of the conversation."""
    images = [image for message in conversation for image in message.get("images") or []]
    return images[-1] if images else None


def _check_draw_target(path: str) -> Path:
    target = Path(path).expanduser()
    if target.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--draw {path}: unknown image format {target.suffix or '(no extension)'!r}; use .png or .jpg")
    if not target.parent.is_dir():
        raise UsageError(f"--draw {path}: folder {str(target.parent)!r} does not exist")
    return target


# ------------------------------------------------------------------------------------------------
# Running


def seed_for(seed: Optional[int], temperature: float, top_p: float) -> Optional[int]:
    """The seed to sample with: ``seed`` if given, none for greedy decoding (it needs none), else one drawn
    here rather than left to the sampler, so that it can be shown and the answer repeated."""
    if seed is not None or temperature == 0 or top_p == 0:
        return seed
    return secrets.randbelow(_SEED_RANGE)


# ``VL2Pipeline.last_stats`` is one attribute for every caller: a request's stats are read under this lock,
# right after its submission, so that callers in several threads (web, batch) each get their own.
_SUBMITTING = threading.Lock()


def stream_answer(pipeline: Any, conversation: list[dict[str, Any]], *, temperature: float, top_p: float,
                  max_new_tokens: int, repetition_penalty: float, seed: Optional[int]) -> tuple[Iterator[str], Any]:
    """``pipeline.stream_conversation`` (raises ``InputError`` before anything is generated) and the request's
    ``RequestStats`` (None when nothing is generated), from any thread. Closing the pieces cancels the request."""
    with _SUBMITTING:
        pieces = pipeline.stream_conversation(conversation, temperature=temperature, top_p=top_p,
                                              max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                              seed=seed)
        stats = pipeline.last_stats
    return _closable(pieces), stats


def _closable(pieces: Iterator[str]) -> Iterator[str]:
    yield from pieces  # (a generator whatever the pipeline returned: close() reaches the request)


class _Session:
    """A loaded pipeline answering turns of one conversation, printing as the options ask."""

    def __init__(self, pipeline: Any, args: argparse.Namespace, stdout: TextIO, log: Callable[[str], None]) -> None:
        self.pipeline = pipeline
        self.args = args
        self.stdout = stdout
        self.log = log
        self.seed = seed_for(args.seed, args.temperature, args.top_p)
        if args.seed is None and self.seed is not None:
            log(f"seed {self.seed} (pass --seed {self.seed} to get this answer again)")

    def answer(self, conversation: list[dict[str, Any]]) -> str:
        """Generate the last (empty assistant) turn of ``conversation``; print it; return its text.

        Raises ``InputError`` before anything is printed if the pipeline refuses the conversation.
        """
        args = self.args
        started = time.perf_counter()
        pieces, stats = stream_answer(self.pipeline, conversation, temperature=args.temperature, top_p=args.top_p,
                                      max_new_tokens=args.max_new_tokens,
                                      repetition_penalty=args.repetition_penalty, seed=self.seed)
        text = ""
        for piece in pieces:
            text += piece
            if not args.json:
                self.stdout.write(piece)
                self.stdout.flush()
        elapsed = time.perf_counter() - started
        image = last_image(conversation)
        drawn = None
        if args.draw:
            drawn = self._draw(image, text)
        if args.json:
            record = {
                "text": text,
                "prompt_tokens": stats.prompt_tokens if stats else None,
                "new_tokens": stats.new_tokens if stats else 0,
                # from the start of generation (image and prompt already processed) to the first/last token
                "first_token_s": round(stats.first_token_s, 4) if stats else None,
                "generation_s": round(stats.total_s, 4) if stats else None,
                "total_s": round(elapsed, 4),  # the whole request, image processing included
                "seed": self.seed,
                "quantize": scheme.name if (scheme := getattr(self.pipeline, "scheme", None)) else None,  # (weights' scheme)
                "image_size": list(image.size) if image is not None else None,
                "boxes": grounding_boxes(text, image.size if image is not None else None),
                "drawn": drawn,
            }
            self.stdout.write(json.dumps(record, ensure_ascii=False))
        self.stdout.write("\n")
        self.stdout.flush()
        if stats is not None:
            self.log(str(stats))
        return text

    def _draw(self, image: Optional[Image.Image], text: str) -> Optional[str]:
        target = Path(self.args.draw).expanduser()
        if image is None:  # only in --chat before any image: a single request is checked up front
            self.log("no image in the conversation yet: nothing drawn")
            return None
        boxes = grounding_boxes(text)
        draw_grounding(image, text).save(target)
        self.log(f"drew {len(boxes)} box(es) on the last image into {target}")
        return str(target)


def _chat(session: _Session, conversation: list[dict[str, Any]], images: list[Image.Image], stdin: TextIO,
          stderr: TextIO) -> None:
    """Answer the pending turn (if any), then read questions from ``stdin`` until /exit or its end.

    A question the model refuses (e.g. too long) is reported and dropped from the history; the chat goes on.
    """
    pending = list(images)  # attached to the next question
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    if conversation and conversation[-1].get("role") in _USER_ROLES:
        conversation.append(answer_turn())  # the file asks a question: answer it, and keep the answer
    while True:
        last = conversation[-1] if conversation else {}
        if last.get("role") in _ASSISTANT_ROLES and not str(last.get("content") or "").strip():
            try:
                last["content"] = session.answer(conversation)
            except InputError as exc:
                _error(stderr, exc)
                del conversation[-2:]  # the refused question and its empty answer
        if interactive:
            stderr.write("you> ")
            stderr.flush()
        line = stdin.readline()
        if not line:  # end of input
            if interactive:
                stderr.write("\n")
            return
        line = line.strip()
        if line in ("/exit", "/quit"):
            return
        if line.startswith("/image"):
            name = line[len("/image"):].strip()
            try:
                pending.append(_open_image(Path(name).expanduser()))
                session.log(f"image {name} attached to your next question")
            except UsageError as exc:
                _error(stderr, exc)
            continue
        if not line:
            continue
        conversation += [user_turn(line, pending), answer_turn()]
        pending = []


def logger(stderr: TextIO, quiet: bool) -> Callable[[str], None]:
    """``log(message)``: a line on stderr, unless quiet."""
    def log(message: str) -> None:
        if not quiet:
            stderr.write(message + "\n")
            stderr.flush()

    return log


def _error(stderr: TextIO, exc: BaseException) -> None:
    message = " ".join(str(exc).split())  # one line, whatever the exception held
    stderr.write(f"error: {message}\n")
    stderr.flush()


def _load(args: argparse.Namespace, log: Callable[[str], None],
          load_pipeline: Callable[..., Any]) -> Any:
    from .hardware import parse_dtype
    from .memory import DoesNotFitError
    from .model import CheckpointError
    from .quantize import QuantizationError
    from .weights import WeightsError, resolve_weights

    dtype_name = args.dtype or os.environ.get("DEEPSEEK_VL2_DTYPE", "").strip()
    try:
        dtype = parse_dtype(dtype_name) if dtype_name else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        model_dir = resolve_weights(args.model, log=log)
        started = time.perf_counter()
        quantize = getattr(args, "quantize", None)  # (only when asked: loaders that predate it take no such argument)
        pipeline = load_pipeline(model_dir, device=args.device, dtype=dtype, **({"quantize": quantize} if quantize else {}))
    except (WeightsError, CheckpointError, QuantizationError, DoesNotFitError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    scheme = getattr(pipeline, "scheme", None)
    log(f"model {model_dir} on {pipeline.device} ({pipeline.dtype}{f', weights in {scheme.name}' if scheme else ''}), "
        f"loaded in {time.perf_counter() - started:.1f} s")
    return pipeline


def _default_loader(model_dir: Path, device: Optional[str], dtype: Any, quantize: Optional[str] = None) -> Any:
    from .pipeline import VL2Pipeline

    return VL2Pipeline.load(model_dir, device=device, dtype=dtype, quantize=quantize)


def main(argv: Optional[Sequence[str]] = None, *, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None,
         stderr: Optional[TextIO] = None, load_pipeline: Callable[..., Any] = _default_loader) -> int:
    """Run the command line; return the exit status (0, 2 for bad input, 130 when interrupted).

    ``load_pipeline(model_dir, device=, dtype=)`` builds the pipeline (tests pass a cached one).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0]).main(argv[1:])
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else _never_fails(sys.stdout)
    stderr = stderr if stderr is not None else _never_fails(sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        log = logger(stderr, args.quiet)
        conversation, images = _request(args)
        if args.draw:
            _check_draw_target(args.draw)
            if last_image(conversation) is None and not args.chat:  # a chat may attach one later
                raise UsageError("--draw needs an image to draw on: give --image or a conversation with images")
        _check_settings(args)
        session = _Session(_load(args, log, load_pipeline), args, stdout, log)
        if args.chat:
            _chat(session, conversation, images, stdin, stderr)
        else:
            session.answer(conversation)
        return 0
    except (UsageError, InputError) as exc:
        _error(stderr, exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `... | head -c 100`: the reader has gone; nothing left to say
        return 0


def _request(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The conversation to answer first (may be empty in --chat) and images waiting for the first question."""
    if args.conversation is not None:
        if args.prompt is not None or args.image:
            raise UsageError("--conversation holds the prompt and the images: do not also give --prompt or --image")
        return read_conversation(Path(args.conversation).expanduser()), []
    images = [_open_image(Path(name).expanduser()) for name in args.image]
    if args.prompt is None:
        if args.chat:
            return [], images
        raise UsageError(f"nothing to ask: give --prompt, --conversation FILE.json or --chat (see {PROG} --help)")
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    return [user_turn(args.prompt, images), answer_turn()], []


def check_settings(temperature: float, top_p: float, repetition_penalty: float, max_new_tokens: int,
                   seed: Optional[int] = None, name: Callable[[str], str] = lambda key: key) -> None:
    """The pipeline's own checks of the settings, each named in a message by ``name(key)`` (the command line
    says ``--top-p``, a batch line ``top_p``)."""
    from .pipeline import GenerationSettings

    for key, value in (("temperature", temperature), ("repetition_penalty", repetition_penalty),
                       ("top_p", top_p), ("max_new_tokens", max_new_tokens)):
        if not value >= 0:  # NaN too
            raise UsageError(f"{name(key)} must be >= 0, got {value}")
    if top_p > 1:
        raise UsageError(f"{name('top_p')} must be between 0 and 1, got {top_p}")
    if seed is not None and not 0 <= seed < 2**64:
        raise UsageError(f"{name('seed')} must be between 0 and 2**64 - 1, got {seed}")
    GenerationSettings(temperature, top_p, max_new_tokens, repetition_penalty, seed)


def _check_settings(args: argparse.Namespace) -> None:
    """The settings and the device, before the (slow) model load."""
    check_settings(args.temperature, args.top_p, args.repetition_penalty, args.max_new_tokens, args.seed,
                   name=lambda key: "--" + key.replace("_", "-"))
    check_device(args.device)
    check_quantize(args.quantize)


def check_quantize(scheme: Optional[str], option: str = "--quantize") -> None:
    """A quantization scheme that exists (``quantize.parse_scheme``), before the model is loaded."""
    from .quantize import QuantizationError, parse_scheme

    try:
        parse_scheme(scheme)
    except QuantizationError as exc:
        raise UsageError(f"{option} {scheme}: {exc}") from None


def check_device(device_name: Optional[str]) -> None:
    """``--device`` names a device this machine has."""
    import torch

    if device_name is not None:
        try:
            device = torch.device(device_name)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device {device_name}: not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device_name}: there is no CUDA GPU here")
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {device_name}: only cpu and cuda are supported")


def _never_fails(stream: TextIO) -> TextIO:
    """Answers hold any character (and the model's own U+FFFD). The stream keeps its encoding (UTF-8
    wherever Python runs under a UTF-8 or a bare C locale); a narrower one the user chose shows "?" for
    what it cannot encode instead of failing mid-answer."""
    if (getattr(stream, "encoding", "") or "").lower().replace("-", "") != "utf8" and hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="replace")
    return stream
