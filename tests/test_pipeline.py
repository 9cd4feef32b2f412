"""VL2Pipeline: the API's prompt and sampling rules, golden answers, and bad input."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepseek_vl2.pipeline import GenerationSettings, InputError, VL2Pipeline

EOS = "<｜end▁of▁sentence｜>"


def _single_image_cases(fixtures_dir: Path) -> list[Path]:
    cases = []
    for case in sorted((fixtures_dir / "cases").glob("*/*/case.json")):
        conv = json.loads(case.read_text())["conversation"]
        if len(conv) == 2 and len(conv[0]["images"]) == 1:
            cases.append(case.parent)
    return cases


def pytest_generate_tests(metafunc):
    if "golden_case" in metafunc.fixturenames:
        from conftest import FIXTURES_DIR

        cases = _single_image_cases(FIXTURES_DIR) if FIXTURES_DIR.is_dir() else []
        metafunc.parametrize("golden_case", cases, ids=[f"{c.parent.name}/{c.name}" for c in cases])


_PIPELINES: dict[str, VL2Pipeline] = {}


def _pipeline(fixtures_dir: Path, variant: str) -> VL2Pipeline:
    if variant not in _PIPELINES:
        _PIPELINES[variant] = VL2Pipeline.load(fixtures_dir / "checkpoints" / variant)
    return _PIPELINES[variant]


@pytest.fixture(scope="module")
def mha(fixtures_dir) -> VL2Pipeline:
    return _pipeline(fixtures_dir, "mha")


@pytest.fixture(scope="module")
def image_path(fixtures_dir) -> Path:
    return fixtures_dir / "images" / "landscape_640x480.png"


def test_small_checkpoints_load_in_float32(mha):
    assert mha.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert mha.dtype == torch.float32
    assert mha.context_length == 4096


def test_golden_greedy_answer(fixtures_dir, golden_case):
    case = json.loads((golden_case / "case.json").read_text())
    pipe = _pipeline(fixtures_dir, golden_case.parent.name)
    user = case["conversation"][0]
    answer = pipe.run(
        fixtures_dir / "images" / user["images"][0],
        user["content"],
        temperature=0,
        top_p=0.9,
        max_length_tokens=len(case["generated_ids"]),
        repetition_penalty=case["generation"]["repetition_penalty"],
    )
    assert answer == case["generated_text"].replace(EOS, "")


def test_stream_pieces_join_to_the_decoded_ids(mha, image_path):
    from deepseek_vl2.engine import generate

    kwargs = dict(temperature=0, top_p=0.9, max_length_tokens=20, repetition_penalty=1.1)
    pieces = list(mha.stream(image_path, "Describe this image.", **kwargs))
    assert len(pieces) > 1
    inputs = mha.prepare(image_path, "Describe this image.")
    cfg = GenerationSettings(0, 0.9, 20, 1.1).generation_config(20)
    ids = generate(mha.model, inputs.to(mha.device, dtype=mha.dtype), cfg, eos_token_id=mha.processor.eos_id)
    assert "".join(pieces) == mha.processor.decode(ids, skip_special_tokens=False)


def test_image_goes_first_without_a_tag(mha, image_path):
    with_tag = mha.prepare(image_path, "<image>\nWhat is this?")
    without = mha.prepare(image_path, "What is this?")
    assert torch.equal(with_tag.input_ids, without.input_ids)


def test_image_tag_may_sit_inside_the_prompt(mha, image_path):
    inside = mha.prepare(image_path, "Describe each stage of this <image> in detail.")
    first = mha.prepare(image_path, "Describe each stage of this in detail.")
    assert inside.images_seq_mask.sum() == first.images_seq_mask.sum() > 0
    assert not torch.equal(inside.input_ids, first.input_ids)
    assert "this <image> in detail" in inside.sft_format
    # the image positions come after the text "Describe each stage of this"
    assert int(inside.images_seq_mask.nonzero()[0]) > int(first.images_seq_mask.nonzero()[0])


def test_two_image_tags_are_an_error(mha, image_path):
    with pytest.raises(InputError, match="2 <image> tags"):
        mha.run(image_path, "Compare <image> with <image>.", temperature=0, top_p=1, max_length_tokens=5,
                repetition_penalty=1)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_is_an_error(mha, image_path, prompt):
    with pytest.raises(InputError, match="prompt is empty"):
        mha.run(image_path, prompt, temperature=0, top_p=1, max_length_tokens=5, repetition_penalty=1)


def test_zero_max_length_returns_empty_at_once(mha, image_path):
    start = time.perf_counter()
    assert mha.run(image_path, "Hello", temperature=0.5, top_p=0.9, max_length_tokens=0, repetition_penalty=1.1) == ""
    assert list(mha.stream(image_path, "Hello", max_length_tokens=0)) == []
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("temperature,top_p", [(0, 0.9), (0.7, 0), (0, 0)])
def test_zero_temperature_or_top_p_is_greedy(mha, image_path, temperature, top_p):
    greedy = mha.run(image_path, "Describe.", temperature=0, top_p=1, max_length_tokens=12, repetition_penalty=1.1)
    for seed in (1, 2):
        got = mha.run(image_path, "Describe.", temperature=temperature, top_p=top_p, max_length_tokens=12,
                      repetition_penalty=1.1, seed=seed)
        assert got == greedy


def test_sampling_with_a_seed_is_reproducible(mha, image_path):
    kwargs = dict(temperature=1.0, top_p=1.0, max_length_tokens=16, repetition_penalty=1.0)
    a = mha.run(image_path, "Describe.", seed=7, **kwargs)
    b = mha.run(image_path, "Describe.", seed=7, **kwargs)
    assert a == b


@pytest.mark.parametrize("penalty", [0, 1])
def test_penalty_zero_or_one_means_none(penalty):
    assert GenerationSettings(0.5, 0.9, 10, penalty).repetition_penalty == 1.0
    assert GenerationSettings(0.5, 0.9, 10, 1.3).repetition_penalty == 1.3


def test_settings_normalisation():
    s = GenerationSettings(0.0, 0.9, 100, 1.1)
    assert s.greedy and s.temperature == 0.0 and s.top_p == 1.0
    s = GenerationSettings(0.4, 0.8, 100, 1.1)
    assert not s.greedy and (s.temperature, s.top_p) == (0.4, 0.8)
    cfg = s.generation_config(7)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.repetition_penalty) == (7, 0.4, 0.8, 1.1)
    for bad in [(-0.1, 0.9, 1, 1), (0.1, 1.5, 1, 1), (0.1, 0.9, -1, 1), (0.1, 0.9, 1.5, 1), (0.1, 0.9, 1, -2)]:
        with pytest.raises(InputError):
            GenerationSettings(*bad)


def test_new_tokens_are_clamped_to_the_context(mha, image_path, monkeypatch):
    inputs = mha.prepare(image_path, "Describe.")
    prompt_len = int(inputs.input_ids.shape[0])
    assert mha.max_new_tokens(inputs, 4096) == 4096 - prompt_len
    assert mha.max_new_tokens(inputs, 10) == 10
    engine, produced = mha.engine, []
    real_submit = engine.submit

    def spying_submit(inputs, config, eos_token_id, loop=None):
        produced.append(config.max_new_tokens)
        return real_submit(inputs, config, eos_token_id, loop)

    monkeypatch.setattr(engine, "submit", spying_submit)
    saved = mha.context_length
    try:
        mha.context_length = prompt_len + 3
        mha.run(image_path, "Describe.", temperature=0, top_p=1, max_length_tokens=50, repetition_penalty=1)
        assert produced == [3] and 0 < mha.last_stats.new_tokens <= 3
        mha.context_length = prompt_len
        with pytest.raises(InputError, match="prompt is too long"):
            mha.run(image_path, "Describe.", temperature=0, top_p=1, max_length_tokens=5, repetition_penalty=1)
    finally:
        mha.context_length = saved


def test_prompt_longer_than_the_context_is_an_error(mha, image_path):
    with pytest.raises(InputError, match="prompt is too long"):
        mha.run(image_path, "describe the picture " * 3000, temperature=0, top_p=1, max_length_tokens=5,
                repetition_penalty=1)


def test_bad_images_are_refused_clearly(mha, bad_images, tmp_path):
    for name, (suffix, data) in bad_images.items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        with pytest.raises(InputError) as err:
            mha.run(path, "Describe.", temperature=0, top_p=1, max_length_tokens=3, repetition_penalty=1)
        message = str(err.value)
        assert message and "Traceback" not in message, name


def test_unusual_images_work(mha, unusual_images, tmp_path):
    for name, (suffix, data) in unusual_images.items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        out = mha.run(path, "Describe.", temperature=0, top_p=1, max_length_tokens=3, repetition_penalty=1)
        assert isinstance(out, str) and out, name


def test_answer_keeps_special_tokens_but_not_eos(mha, image_path, monkeypatch):
    """Grounding markup survives decoding; the end-of-sentence marker does not (the engine stops before it)."""
    proc = mha.processor
    wanted = proc.encode("<|ref|>box<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>")
    forced = iter([*wanted, proc.eos_id, 5])

    def scripted_logits(language, tokens, positions, slots):  # every step "chooses" the next scripted id
        logits = torch.full((len(tokens), language.config.vocab_size), -1e4)
        logits[:, next(forced)] = 0.0
        return logits

    import deepseek_vl2.engine as engine

    monkeypatch.setattr(mha.engine, "prefill_chunk", 10**6)  # (one prefill call: it "chooses" the first id)
    monkeypatch.setattr(engine, "decode_step", scripted_logits)
    def scripted_prefill(language, embeds, start_pos, slot, layers_per_step=None):  # (the engine's units: a generator)
        yield from ()
        return scripted_logits(language, [0], [0], [0])[0]

    monkeypatch.setattr(engine, "prefill_steps", scripted_prefill)
    text = mha.run(image_path, "Find the box.", temperature=0, top_p=1, max_length_tokens=50, repetition_penalty=1)
    assert text == "<|ref|>box<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>"
    assert EOS not in text


def test_last_stats_describe_the_last_request(mha, image_path):
    answer = mha.run(image_path, "Describe this image.", temperature=0, max_length_tokens=4)
    stats = mha.last_stats
    assert stats is not None and stats.prompt_tokens > 400 and 1 <= stats.new_tokens <= 4 and answer is not None
    assert 0 < stats.first_token_s <= stats.total_s
    assert "prompt tokens" in str(stats)
    mha.run(image_path, "Describe this image.", max_length_tokens=0)
    assert mha.last_stats is None  # nothing generated: no stale figures from the request before


# ------------------------------------------------------------------------------------------------
# stream_conversation: whole conversations (several images, several turns)


@pytest.mark.parametrize("name", ["two_images", "three_images", "text_only", "multi_turn"])
@pytest.mark.parametrize("variant", ["mha", "mla-noaux"])
def test_golden_conversation_answer(fixtures_dir, variant, name):
    case = json.loads((fixtures_dir / "cases" / variant / name / "case.json").read_text())
    # Images as a path, as bytes and as a PIL image: every form the processor takes.
    forms = [lambda p: p, lambda p: p.read_bytes(), lambda p: Image.open(p)]
    conversation = [
        {**m, "images": [forms[i % 3](fixtures_dir / "images" / n) for i, n in enumerate(m["images"])]}
        for m in case["conversation"]
    ]
    pipe = _pipeline(fixtures_dir, variant)
    pieces = list(pipe.stream_conversation(conversation, temperature=0, max_new_tokens=len(case["generated_ids"]),
                                           repetition_penalty=case["generation"]["repetition_penalty"]))
    assert "".join(pieces) == case["generated_text"].replace(EOS, "")
    assert pipe.last_stats.new_tokens == len(case["generated_ids"])


def test_conversation_of_one_turn_answers_as_stream(mha, image_path):
    kwargs = dict(temperature=0, top_p=0.9, repetition_penalty=1.1)
    conversation = [{"role": "<|User|>", "content": "Describe this image.", "images": [image_path]},
                    {"role": "<|Assistant|>", "content": ""}]
    assert ("".join(mha.stream_conversation(conversation, max_new_tokens=10, **kwargs))
            == mha.run(image_path, "Describe this image.", max_length_tokens=10, **kwargs))


def test_images_without_tags_come_first_in_their_message(mha, fixtures_dir):
    images = [fixtures_dir / "images" / "gray_500x300.png", fixtures_dir / "images" / "tall_300x1000.png"]
    kwargs = dict(temperature=0, max_new_tokens=6, repetition_penalty=1.0)

    def answer(first: str, second: str) -> str:
        conversation = [{"role": "<|User|>", "content": first, "images": images[:1]},
                        {"role": "<|Assistant|>", "content": "Grey."},
                        {"role": "<|User|>", "content": second, "images": images[1:]},
                        {"role": "<|Assistant|>", "content": ""}]
        return "".join(mha.stream_conversation(conversation, **kwargs))

    assert answer("What is this?", "And this?") == answer("<image>\nWhat is this?", "<image>\nAnd this?")
    # The golden case whose tags only put its two images first, without them.
    case = json.loads((fixtures_dir / "cases" / "mha" / "two_images" / "case.json").read_text())
    user = case["conversation"][0]
    untagged = {**user, "content": user["content"].replace("<image>\n", ""),
                "images": [fixtures_dir / "images" / n for n in user["images"]]}
    assert "<image>" not in untagged["content"]
    got = "".join(mha.stream_conversation([untagged, {"role": "<|Assistant|>", "content": ""}], temperature=0,
                                          max_new_tokens=len(case["generated_ids"]), repetition_penalty=1.0))
    assert got == case["generated_text"].replace(EOS, "")


def test_conversation_seed_gives_the_same_text(mha, image_path):
    conversation = [{"role": "<|User|>", "content": "Describe.", "images": [image_path]},
                    {"role": "<|Assistant|>", "content": ""}]
    kwargs = dict(temperature=1.0, top_p=1.0, max_new_tokens=16, repetition_penalty=1.0)
    seven, again, eight = ("".join(mha.stream_conversation(conversation, seed=s, **kwargs)) for s in (7, 7, 8))
    assert seven == again != eight


@pytest.mark.parametrize("conversation, message", [
    ([], "non-empty list"),
    ("Hello", "non-empty list"),
    ([{"content": "hi"}], "Message 1 .* 'role'"),
    ([{"role": "<|User|>", "content": ["hi"]}], "content of message 1 must be text"),
    ([{"role": "<|User|>", "content": "hi", "images": 3}], "images of message 1 must be a list"),
    ([{"role": "<|User|>", "content": "hi"}, {"role": "<|Assistant|>", "content": "", "images": [b"x"]}],
     "Message 2 carries images"),
    ([{"role": "<|User|>", "content": "<image> and <image>", "images": [Image.new("RGB", (8, 8))]}],
     "2 <image> tag"),
    ([{"role": "robot", "content": "hi"}], "Unknown role"),
    ([{"role": "<|User|>", "content": "hi", "images": ["/no/such/image.png"]}], "no such file"),
])
def test_bad_conversations_raise_before_the_first_piece(mha, conversation, message):
    with pytest.raises(InputError, match=message):
        mha.stream_conversation(conversation, temperature=0, max_new_tokens=4)  # no iteration needed


def test_conversation_zero_new_tokens_is_empty(mha):
    mha.run(Image.new("RGB", (32, 32)), "Hi", max_length_tokens=1)
    conversation = [{"role": "<|User|>", "content": "Hello"}, {"role": "<|Assistant|>", "content": ""}]
    assert list(mha.stream_conversation(conversation, max_new_tokens=0)) == []
    assert mha.last_stats is None


def test_the_threads_that_prepare_and_submit_let_their_openmp_teams_go(mha, image_path, monkeypatch):
    """astream prepares in a worker thread of the event loop and submits on the loop: both threads let their
    OpenMP teams go (hardware.release_openmp_workers), so the engine's team is the process's only one."""
    import asyncio
    import threading

    import deepseek_vl2.engine as engine_module
    import deepseek_vl2.pipeline as pipeline_module

    released: list[int] = []
    record = lambda: released.append(threading.get_ident())  # noqa: E731
    monkeypatch.setattr(pipeline_module, "release_openmp_workers", record)
    monkeypatch.setattr(engine_module, "release_openmp_workers", record)

    async def answer() -> tuple[str, int]:
        pieces = [piece async for piece in mha.astream(image_path, "Describe.", temperature=0, max_length_tokens=3)]
        return "".join(pieces), threading.get_ident()

    text, loop_thread = asyncio.run(answer())
    assert text
    assert len(released) == 2 and released[1] == loop_thread and released[0] != loop_thread
