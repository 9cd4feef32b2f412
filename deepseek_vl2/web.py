"""A web page on the model: ``python -m deepseek_vl2 web [--model ...] [--host 127.0.0.1] [--port 7860]``.

A Gradio chat on the same pipeline and batching engine as the command line and the Cog API: drop or paste
images, ask, and the answer streams in; the conversation keeps its history (per browser tab); Stop cancels
the answer (its engine slot is freed within a step); settings are the command line's (temperature, top_p,
repetition penalty, max new tokens, seed) and each answer shows the seed it used; an answer with grounding
boxes shows the last image with the boxes drawn (``grounding.draw_grounding``, as ``--draw``). Several tabs
at once share the engine and decode together. Bad input (not an image, too long a prompt, too many images for
the context) shows a message in the page; the app stays up.

Without ``--model`` (and without ``$DEEPSEEK_VL2_WEIGHTS``) it serves the demo checkpoint of ``make demo``
(``demo-model/``, made by ``scripts/make_random_checkpoint.py`` if missing) and says on the page that its
weights are random.

For programs, the endpoint ``/answer`` (``gradio_client``)::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    text = client.predict(images=[handle_file("a.png")], prompt="What is in <image>?", temperature=0,
                          top_p=0.9, repetition_penalty=1.1, max_new_tokens=2048, seed=None, api_name="/answer")

``<image>`` tags place the images in the prompt, as in the command line's ``--prompt`` (images without a tag
come first); the answer is the command line's for the same question and settings.

Gradio is not part of the Cog image: ``pip install --no-deps -r requirements-web.txt`` (``make web`` does).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from . import cli
from .cli import EXIT_BAD_INPUT, UsageError
from .grounding import draw_grounding, grounding_boxes
from .processor import InputError, load_image

__all__ = ["main", "build_parser", "build_app", "demo_checkpoint"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
PROJECT_DIR = Path(__file__).resolve().parent.parent
DEMO_DIR = PROJECT_DIR / "demo-model"  # where `make demo` writes it

_NO_GRADIO = ("the web page needs Gradio, which is not installed: "
              ".venv/bin/pip install --no-deps -r requirements-web.txt (or run make web)")


def build_parser() -> argparse.ArgumentParser:
    parser = cli._Parser(prog=f"{cli.PROG} web",
                         description="A web page to chat with DeepSeek-VL2 about images (Gradio), and the /answer "
                         "endpoint for gradio_client.")
    parser.add_argument("--model", help="model directory or Hugging Face repo id (default: $DEEPSEEK_VL2_WEIGHTS, "
                        "else the demo checkpoint with random weights, made in demo-model/ if missing)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; "
                        "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    parser.add_argument("--dtype", help="bfloat16, float16 or float32 (default: $DEEPSEEK_VL2_DTYPE, "
                        "else the fastest the hardware handles natively)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no logs on stderr")
    return parser


def demo_checkpoint(log: Callable[[str], None]) -> Path:
    """The demo checkpoint of ``make demo`` (random weights), made now if it is not there yet."""
    if (DEMO_DIR / "config.json").is_file() and list(DEMO_DIR.glob("*.safetensors")):
        return DEMO_DIR
    script = PROJECT_DIR / "scripts" / "make_random_checkpoint.py"
    if not script.is_file():
        raise UsageError("no --model given, and the demo checkpoint cannot be made here (scripts/ is missing): "
                         "give --model DIR or a Hugging Face repo id")
    log(f"no --model: making the demo checkpoint (random weights) in {DEMO_DIR} ...")
    made = subprocess.run([sys.executable, str(script), str(DEMO_DIR)], capture_output=True, text=True)
    if made.returncode != 0:
        raise UsageError(f"making the demo checkpoint failed: {made.stderr.strip().splitlines()[-1:]}")
    return DEMO_DIR


# ------------------------------------------------------------------------------------------------
# The app


def _open_images(paths: Sequence[Any]) -> list[str]:
    """Check every uploaded file is an image (the message names the file as the user knows it); the
    conversation keeps the paths."""
    opened = []
    for path in paths:
        path = str(getattr(path, "path", path))  # (a FileData from some Gradio versions, else the path)
        try:
            load_image(path)
        except InputError as exc:
            raise InputError(f"{Path(path).name}: {exc}") from None
        opened.append(path)
    return opened


def _settings(temperature: Any, top_p: Any, repetition_penalty: Any, max_new_tokens: Any,
              seed: Any) -> dict[str, Any]:
    """The page's settings checked as the command line checks them, with the seed to use (drawn if none)."""
    def number(name: str, value: Any, default: Any, whole: bool = False) -> Any:
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{name} must be a number, got {value!r}") from None
        if whole:
            if number != int(number):
                raise UsageError(f"{name} must be a whole number, got {value!r}")
            return int(number)
        return number

    settings = {
        "temperature": number("temperature", temperature, cli.DEFAULT_TEMPERATURE),
        "top_p": number("top_p", top_p, cli.DEFAULT_TOP_P),
        "repetition_penalty": number("repetition_penalty", repetition_penalty, cli.DEFAULT_REPETITION_PENALTY),
        "max_new_tokens": number("max_new_tokens", max_new_tokens, cli.DEFAULT_MAX_NEW_TOKENS, whole=True),
        "seed": number("seed", seed, None, whole=True),
    }
    cli.check_settings(**settings)
    settings["seed"] = cli.seed_for(settings["seed"], settings["temperature"], settings["top_p"])
    return settings


def _footer(settings: dict[str, Any], stats: Any, stopped: bool = False) -> str:
    """What goes under an answer: the seed that reproduces it (or that it was greedy), and its size."""
    seed = "greedy (no seed needed)" if settings["seed"] is None else f"seed {settings['seed']}"
    size = f" · {stats.new_tokens} new tokens" if stats is not None else ""
    return f"\n\n*{seed}{size}{' · stopped' if stopped else ''}*"


def build_app(pipeline: Any, *, model_name: str, random_weights: bool) -> Any:
    """The Gradio app (not launched) on ``pipeline``: the chat page and the ``/answer`` endpoint."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def fail(exc: BaseException) -> Any:
        return gr.Error(" ".join(str(exc).split()), print_exception=False)

    def respond(message: dict[str, Any], history: list[dict[str, Any]], conversation: list[dict[str, Any]],
                temperature: Any, top_p: Any, repetition_penalty: Any, max_new_tokens: Any,
                seed: Any) -> Iterator[tuple[Any, ...]]:
        """One question of the chat: yields (the input box, the messages shown, the conversation) as the answer
        streams. Bad input raises before anything changes. Closed early (Stop), the request is cancelled."""
        message = message or {}
        text = str(message.get("text") or "")
        try:
            if not text.strip():
                raise UsageError("Type a question (drop or paste images with it).")
            images = _open_images(message.get("files") or [])
            settings = _settings(temperature, top_p, repetition_penalty, max_new_tokens, seed)
            asked = [*conversation, cli.user_turn(text, images), cli.answer_turn()]
            pieces, stats = cli.stream_answer(pipeline, asked, **settings)
        except (UsageError, InputError) as exc:
            raise fail(exc) from None
        shown = [*history, *({"role": "user", "content": {"path": path}} for path in images),
                 {"role": "user", "content": text}]
        answer = ""
        try:
            yield gr.MultimodalTextbox(value=None), [*shown, {"role": "assistant", "content": ""}], asked
            for piece in pieces:
                answer += piece
                asked[-1] = cli.answer_turn(answer)
                yield gr.update(), [*shown, {"role": "assistant", "content": answer}], asked
        except Exception as exc:  # noqa: BLE001 - the engine failed this request: say so, keep the page
            raise fail(exc) from None
        finally:
            pieces.close()  # (Stop closes this generator: the request leaves the engine within a step)
        shown.append({"role": "assistant", "content": answer + _footer(settings, stats)})
        paths = [path for turn in asked for path in turn["images"]]
        if paths and grounding_boxes(answer):  # drawn on the last image, as --draw and the official demo do
            drawn = draw_grounding(load_image(paths[-1]), answer)
            shown.append({"role": "assistant", "content": gr.Image(drawn, format="png", show_label=False, elem_id="boxes")})
        yield gr.update(), shown, asked

    def answer(images: Optional[list[Any]], prompt: Optional[str], temperature: Any, top_p: Any,
               repetition_penalty: Any, max_new_tokens: Any, seed: Any) -> str:
        """The answer to images and a prompt (``<image>`` tags place the images; untagged ones come first),
        with the command line's settings and defaults; seed empty: a new one."""
        try:
            if not (prompt or "").strip():
                raise UsageError("The prompt is empty.")
            opened = _open_images(images or [])
            settings = _settings(temperature, top_p, repetition_penalty, max_new_tokens, seed)
            pieces, _ = cli.stream_answer(pipeline, [cli.user_turn(prompt, opened), cli.answer_turn()], **settings)
            try:
                return "".join(pieces)
            finally:
                pieces.close()
        except (UsageError, InputError) as exc:
            raise fail(exc) from None

    with gr.Blocks(title="DeepSeek-VL2", analytics_enabled=False) as app:
        scheme = getattr(pipeline, "scheme", None)
        gr.Markdown(f"## DeepSeek-VL2 · `{model_name}`" + (f" · weights in {scheme.name}" if scheme else ""))
        if random_weights:
            gr.Markdown("**The weights are random** (the demo checkpoint of `make demo`): the answers are "
                        "gibberish. Start with `--model` for a real model.", elem_id="random-weights")
        conversation = gr.State([])
        chatbot = gr.Chatbot(label="Conversation", height=640, elem_id="chat", buttons=["copy"])
        question = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", sources=["upload"], elem_id="question", autofocus=True,
            placeholder="Drop, paste or attach images, then ask (<image> tags place them in the text; "
                        "<|grounding|> or <|ref|>an object<|/ref|> asks for boxes)", show_label=False)
        with gr.Row():
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
            clear = gr.Button("New conversation", elem_id="clear")
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                temperature = gr.Slider(0, 1, value=cli.DEFAULT_TEMPERATURE, step=0.05,
                                        label="temperature (0: greedy)")
                top_p = gr.Slider(0, 1, value=cli.DEFAULT_TOP_P, step=0.05, label="top_p (0: greedy)")
                repetition_penalty = gr.Slider(0, 2, value=cli.DEFAULT_REPETITION_PENALTY, step=0.05,
                                               label="repetition penalty (1: none)")
            with gr.Row():
                max_new_tokens = gr.Slider(0, pipeline.context_length, value=cli.DEFAULT_MAX_NEW_TOKENS, step=1,
                                           label="max new tokens")
                seed = gr.Number(value=None, precision=0, minimum=0, label="seed (empty: a new one for each answer)")
        settings = [temperature, top_p, repetition_penalty, max_new_tokens, seed]
        asking = question.submit(respond, [question, chatbot, conversation, *settings],
                                 [question, chatbot, conversation], api_name="chat", api_visibility="undocumented")
        stop.click(None, None, None, cancels=[asking])
        clear.click(lambda: ([], [], None), None, [chatbot, conversation, question], cancels=[asking],
                    api_visibility="private")

        # /answer: hidden components only give the endpoint its typed inputs (named as gradio_client calls them).
        with gr.Group(visible=False):
            api_inputs = [
                gr.File(file_count="multiple", file_types=["image"], label="images"),
                gr.Textbox(label="prompt"),
                gr.Number(value=cli.DEFAULT_TEMPERATURE, label="temperature"),
                gr.Number(value=cli.DEFAULT_TOP_P, label="top_p"),
                gr.Number(value=cli.DEFAULT_REPETITION_PENALTY, label="repetition_penalty"),
                gr.Number(value=cli.DEFAULT_MAX_NEW_TOKENS, precision=0, label="max_new_tokens"),
                gr.Number(value=None, precision=0, label="seed"),
            ]
            api_output = gr.Textbox(label="answer")
            api_trigger = gr.Button()
        api_trigger.click(answer, api_inputs, api_output, api_name="answer",
                          api_description=answer.__doc__)
    app.queue(default_concurrency_limit=pipeline.engine.slots)  # (each event in flight is a request in the engine)
    return app


# ------------------------------------------------------------------------------------------------
# The command


def main(argv: Optional[Sequence[str]] = None, *, load_pipeline: Callable[..., Any] = cli._default_loader) -> int:
    """Serve the page until Ctrl-C; 2 for bad arguments (one line ``error: ...`` on stderr)."""
    stderr = cli._never_fails(sys.stderr)
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        log = cli.logger(stderr, args.quiet)
        if not 0 < args.port < 65536:
            raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
        cli.check_device(args.device)
        try:
            import gradio  # noqa: F401  (checked before the slow model load)
        except ImportError:
            raise UsageError(_NO_GRADIO) from None
        random_weights = not (args.model or os.environ.get("DEEPSEEK_VL2_WEIGHTS", "").strip())
        if random_weights:
            args.model = str(demo_checkpoint(log))
        pipeline = cli._load(args, log, load_pipeline)
        pipeline.warm_up()
        name = Path(args.model).name if Path(args.model).expanduser().is_dir() else args.model  # (a repo id as given)
        app = build_app(pipeline, model_name=name, random_weights=random_weights)
        try:
            app.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                       show_error=True)
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    except (UsageError, InputError) as exc:
        cli._error(stderr, exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return cli.EXIT_INTERRUPTED
    print(f"Running on http://{args.host}:{args.port}", flush=True)
    try:
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0
