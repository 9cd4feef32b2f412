"""The batching engine: answers independent of company, cancel, bounded cache, failures that stay alone."""
from __future__ import annotations

import asyncio
import functools
import json
import threading
import time

import pytest
import torch
from PIL import Image

from conftest import FIXTURES_DIR
from deepseek_vl2.engine import BatchEngine, Request, RequestCancelled, default_slots
from deepseek_vl2.generation import GenerationConfig
from deepseek_vl2.model import load_model
from deepseek_vl2.processor import DeepseekVL2Processor


@functools.lru_cache(maxsize=None)
def _load(variant: str):
    path = FIXTURES_DIR / "checkpoints" / variant
    return DeepseekVL2Processor.from_pretrained(path), load_model(path)


def _engine(variant: str, slots: int, **kwargs) -> tuple[DeepseekVL2Processor, BatchEngine]:
    """A fresh engine over the variant's model (it takes the model's cache over from the one before)."""
    processor, model = _load(variant)
    old = model.__dict__.pop("_engine", None)
    if old is not None:
        old.stop()
    model._engine = BatchEngine(model, slots, **kwargs)
    return processor, model._engine


def _golden_cases(variant: str) -> list[tuple[str, object, GenerationConfig, list[int]]]:
    """(name, inputs, greedy settings, expected ids) of every golden case of the variant."""
    processor, _ = _load(variant)
    cases = []
    for case_dir in sorted((FIXTURES_DIR / "cases" / variant).iterdir()):
        case = json.loads((case_dir / "case.json").read_text())
        conversation = [
            {**m, "images": [Image.open(FIXTURES_DIR / "images" / name).convert("RGB") for name in m["images"]]}
            for m in case["conversation"]
        ]
        ids = [i for i in case["generated_ids"] if i != processor.eos_id]
        config = GenerationConfig(max_new_tokens=len(case["generated_ids"]),
                                  repetition_penalty=case["generation"]["repetition_penalty"])
        cases.append((case_dir.name, processor(conversation), config, ids))
    return cases


def _prompt(processor: DeepseekVL2Processor, text: str = "<image>\nDescribe this image.", size=(500, 300),
            color=(200, 40, 40)):
    return processor.process_prompt(text, [Image.new("RGB", size, color)])


@pytest.mark.parametrize("variant", ["mha", "mla-noaux"])
def test_greedy_answers_do_not_depend_on_company(variant: str) -> None:
    """fp32: every golden case, run with up to 3 others in flight (sampling, other penalties, other prompts
    and images, joining at other times), returns exactly its golden ids, as it does alone."""
    processor, engine = _engine(variant, slots=4, prefill_chunk=256)
    cases = _golden_cases(variant)
    companions = [
        (_prompt(processor), GenerationConfig(max_new_tokens=30, temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=1)),
        (_prompt(processor, "Hi <image> there, what is it?", (300, 800), (10, 200, 90)),
         GenerationConfig(max_new_tokens=12, repetition_penalty=1.1)),
        (_prompt(processor, "<image>", (900, 900)), GenerationConfig(max_new_tokens=50, temperature=0.5, top_p=0.5)),
    ]
    results = {}
    for i, (name, inputs, config, expected) in enumerate(cases):
        company = [engine.submit(x, c, processor.eos_id) for x, c in companions[: 1 + i % 3]]
        if i % 2:  # (joins while the company already decodes)
            first = iter(company[0])
            next(first)
        request = engine.submit(inputs, config, processor.eos_id)
        results[name] = (list(request), expected)
        for other in company:
            other.cancel()
    assert engine.max_rows_seen >= 3
    assert {name: got == want for name, (got, want) in results.items()} == {name: True for name in results}


def test_seeded_sampling_does_not_depend_on_company() -> None:
    processor, engine = _engine("mha", slots=3)
    inputs = _prompt(processor)
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, repetition_penalty=1.2, seed=42)
    alone = list(engine.submit(inputs, config, processor.eos_id))
    other = engine.submit(_prompt(processor, size=(200, 700)), GenerationConfig(max_new_tokens=40), processor.eos_id)
    together = engine.submit(inputs, config, processor.eos_id)
    assert list(together) == alone
    assert list(other)
    reseeded = GenerationConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, repetition_penalty=1.2, seed=43)
    assert list(engine.submit(inputs, reseeded, processor.eos_id)) != alone


def test_cancel_stops_within_one_step_and_frees_the_slot() -> None:
    processor, engine = _engine("mha", slots=2)
    inputs = _prompt(processor)
    long = GenerationConfig(max_new_tokens=3000, repetition_penalty=1.0)
    reference = list(engine.submit(inputs, GenerationConfig(max_new_tokens=60), processor.eos_id))
    keeper = engine.submit(inputs, GenerationConfig(max_new_tokens=60), processor.eos_id)
    victim = engine.submit(inputs, long, processor.eos_id)
    stream = iter(victim)
    for _ in range(5):
        next(stream)
    victim.cancel()
    made_at_cancel = victim.generated
    with pytest.raises(RequestCancelled):
        next(stream)  # (nothing more is delivered once cancelled)
    deadline = time.monotonic() + 30
    while not victim.finished and time.monotonic() < deadline:
        time.sleep(0.001)
    assert victim.finished and victim.slot is None
    assert victim.generated - made_at_cancel <= 1  # the engine made at most the step under way
    # Its slot is free again: with the keeper still decoding, a new request gets the slot and finishes.
    late = engine.submit(inputs, GenerationConfig(max_new_tokens=3), processor.eos_id)
    assert len(list(late)) == 3
    assert list(keeper) == reference  # the others finish unchanged
    assert engine.in_flight == 0


def test_closing_the_stream_early_cancels_the_request() -> None:
    processor, engine = _engine("mha", slots=1)
    inputs = _prompt(processor)
    request = engine.submit(inputs, GenerationConfig(max_new_tokens=3000, repetition_penalty=1.0), processor.eos_id)
    stream = iter(request)
    next(stream)
    stream.close()
    assert request.cancelled
    # The only slot is freed: the next request runs.
    assert len(list(engine.submit(inputs, GenerationConfig(max_new_tokens=2), processor.eos_id))) == 2


def test_requests_beyond_the_slots_wait_their_turn() -> None:
    processor, engine = _engine("mha", slots=2)
    inputs = _prompt(processor)
    requests = [engine.submit(inputs, GenerationConfig(max_new_tokens=8), processor.eos_id) for _ in range(5)]
    answers = [list(r) for r in requests]
    assert all(a == answers[0] for a in answers) and len(answers[0]) == 8
    assert engine.max_rows_seen == 2
    assert max(r.stats.queued_s for r in requests) > 0


def test_a_cpu_engine_frees_the_submitting_threads_openmp_team(monkeypatch: pytest.MonkeyPatch) -> None:
    """submit lets the calling thread's OpenMP workers go (hardware.release_openmp_workers): a second team
    in the process made every op of the engine's thread wake a sleeping worker (prefill 0.87 s vs 0.64 s)."""
    import deepseek_vl2.engine as engine_module

    calls: list[str] = []
    monkeypatch.setattr(engine_module, "release_openmp_workers", lambda: calls.append(threading.current_thread().name))
    processor, engine = _engine("mha", slots=2)
    request = engine.submit(_prompt(processor), GenerationConfig(max_new_tokens=2), processor.eos_id)
    assert len(list(request)) == 2
    assert calls == [threading.current_thread().name]


def test_the_cache_is_allocated_once_and_never_grows() -> None:
    processor, engine = _engine("mla", slots=3)
    language = engine.language
    storage = [layer.self_attn.cache.latent.data_ptr() for layer in language.model.layers]
    assert language.cache_batch == 3 and language.max_seq_len == language.config.max_position_embeddings
    for size in [(100, 100), (1500, 300), (400, 1200)]:  # (1, 3x1 and 1x3 tiles: prompts of other lengths)
        for r in [engine.submit(_prompt(processor, size=size), GenerationConfig(max_new_tokens=5), processor.eos_id)
                  for _ in range(4)]:
            list(r)
    assert [layer.self_attn.cache.latent.data_ptr() for layer in language.model.layers] == storage
    assert language.cache_batch == 3


def test_a_failing_request_fails_alone() -> None:
    processor, engine = _engine("mha", slots=3, context=700)
    fits = _prompt(processor)  # 600-odd tokens
    too_long = _prompt(processor, size=(1500, 400))  # tiled: over 700 tokens
    expected = list(engine.submit(fits, GenerationConfig(max_new_tokens=30), processor.eos_id))
    ok = engine.submit(fits, GenerationConfig(max_new_tokens=30), processor.eos_id)
    bad = engine.submit(too_long, GenerationConfig(max_new_tokens=5), processor.eos_id)
    with pytest.raises(ValueError, match="context is 700"):
        list(bad)
    assert list(ok) == expected
    # New tokens are clamped to the slot's length.
    assert len(list(engine.submit(fits, GenerationConfig(max_new_tokens=500), processor.eos_id))) == 700 - int(
        fits.input_ids.shape[0])


def _decoding_in_the_background(engine: BatchEngine, processor: DeepseekVL2Processor):
    """A long request already decoding (its first token read; its stream returned too, to keep: a stream
    dropped early cancels its request), with the engine's timeline cleared after it joined."""
    decoding = engine.submit(_prompt(processor), GenerationConfig(max_new_tokens=3000, repetition_penalty=1.0), processor.eos_id)
    stream = iter(decoding)
    next(stream)
    engine.timeline.clear()
    return decoding, stream


def test_prompts_are_prefilled_in_chunks_between_the_others_steps() -> None:
    processor, engine = _engine("mha", slots=2, prefill_chunk=128, prefill_budget_ms=0)  # (0: a step after every unit)
    decoding, stream = _decoding_in_the_background(engine, processor)
    joining = _prompt(processor, size=(900, 600))  # tiled: 4-5 chunks of 128
    length = int(joining.input_ids.shape[0])
    list(engine.submit(joining, GenerationConfig(max_new_tokens=2), processor.eos_id))
    kinds = [kind for kind, _, _ in engine.timeline]
    chunks = [tokens for kind, tokens, _ in engine.timeline if kind == "prefill" and tokens]
    assert sum(chunks) == length and max(chunks) == 128 and len(chunks) == -(-length // 128)
    first, last = kinds.index("prefill"), len(kinds) - 1 - kinds[::-1].index("prefill")
    # Between the joining request's first and last prefill unit, the decoding one advanced after each unit.
    between = kinds[first: last + 1]
    assert between.count("decode") >= between.count("prefill") - 1
    decoding.cancel()


def test_a_joining_requests_images_go_through_the_tower_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vision tower of a joining request runs DEEPSEEK_VL2_VISION_UNIT // tiles blocks a unit, a decode
    step of the others after each, and the request's answer is the one it gets alone."""
    processor, model = _load("mha")
    monkeypatch.setenv("DEEPSEEK_VL2_VISION_UNIT", "4")
    monkeypatch.setenv("DEEPSEEK_VL2_PREFILL_BUDGET_MS", "0")  # (a step after every unit)
    monkeypatch.setenv("DEEPSEEK_VL2_PREFILL_LAYERS", "0")  # (whole chunks: the units of 0 tokens are the tower's)
    joining = _prompt(processor, size=(900, 600), color=(20, 90, 160))
    tiles, layers = int(joining.pixel_values.shape[0]), model.config.vision.layers
    blocks = max(1, 4 // tiles)
    _, engine = _engine("mha", slots=2)
    assert engine.vision_unit == 4
    alone = list(engine.submit(joining, GenerationConfig(max_new_tokens=6, repetition_penalty=1.0), processor.eos_id))
    decoding, stream = _decoding_in_the_background(engine, processor)
    together = list(engine.submit(joining, GenerationConfig(max_new_tokens=6, repetition_penalty=1.0), processor.eos_id))
    decoding.cancel()
    assert together == alone
    kinds = [(kind, tokens) for kind, tokens, _ in engine.timeline]
    vision_units = [i for i, (kind, tokens) in enumerate(kinds) if kind == "prefill" and tokens == 0]
    assert len(vision_units) == -(-layers // blocks) > 1
    for a, b in zip(vision_units, vision_units[1:]):  # (a decode step of the other request between two units)
        assert any(kind == "decode" for kind, _ in kinds[a + 1: b])
    monkeypatch.setenv("DEEPSEEK_VL2_VISION_UNIT", "0")
    with pytest.raises(ValueError, match="DEEPSEEK_VL2_VISION_UNIT must be at least 1"):
        BatchEngine(model, 1)


def test_prefill_units_run_back_to_back_within_the_budget_then_the_others_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget, a joining request's units (vision pieces, prompt chunks) run back to back while their
    predicted durations fit in it (at least one), then the decoding requests take a step: fewer steps between
    its units than with budget 0, none of its units skipped, and its answer the one it gets alone. A unit
    predicted to overrun the budget waits for the next turn. Bad budgets are refused."""
    processor, model = _load("mha")
    monkeypatch.setenv("DEEPSEEK_VL2_VISION_UNIT", "4")
    joining = _prompt(processor, size=(900, 600), color=(90, 20, 160))
    config = GenerationConfig(max_new_tokens=6, repetition_penalty=1.0)
    steps_between = {}
    for budget in (0, 60_000):
        _, engine = _engine("mha", slots=2, prefill_chunk=128, prefill_budget_ms=budget)
        alone = list(engine.submit(joining, config, processor.eos_id))
        decoding, stream = _decoding_in_the_background(engine, processor)
        assert list(engine.submit(joining, config, processor.eos_id)) == alone
        decoding.cancel()
        kinds = [kind for kind, _, _ in engine.timeline]
        first, last = kinds.index("prefill"), len(kinds) - 1 - kinds[::-1].index("prefill")
        assert kinds[first: last + 1].count("prefill") > 4
        steps_between[budget] = kinds[first: last + 1].count("decode")
    assert steps_between[60_000] == 0 < steps_between[0]
    # A unit longer than the budget: each turn runs one, then a step.
    _, engine = _engine("mha", slots=2, prefill_chunk=128, prefill_budget_ms=1e-3)
    decoding, stream = _decoding_in_the_background(engine, processor)
    list(engine.submit(joining, config, processor.eos_id))
    decoding.cancel()
    kinds = [kind for kind, _, _ in engine.timeline]
    units = [i for i, kind in enumerate(kinds) if kind == "prefill"]
    assert all("decode" in kinds[a + 1: b] for a, b in zip(units, units[1:]))
    with pytest.raises(ValueError, match="DEEPSEEK_VL2_PREFILL_BUDGET_MS must be 0 or more"):
        BatchEngine(model, 1, prefill_budget_ms=-1)


def test_a_joining_requests_prefill_is_spread_evenly_over_its_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine counts a request's prefill units on admission (vision pieces, prompt chunk pieces): exactly
    those run, none left when it decodes. A turn's share is the predicted remaining prefill over the fewest
    turns within the budget; the budget while a kind of unit has no timing yet."""
    processor, model = _load("mha")
    monkeypatch.setenv("DEEPSEEK_VL2_VISION_UNIT", "4")
    monkeypatch.setenv("DEEPSEEK_VL2_PREFILL_LAYERS", "1")
    joining = _prompt(processor, size=(900, 600), color=(40, 160, 90))
    _, engine = _engine("mha", slots=2, prefill_chunk=128, prefill_budget_ms=0)
    counted = engine._prefill_units(Request(joining, GenerationConfig(), processor.eos_id, None))
    tiles, layers = int(joining.pixel_values.shape[0]), model.config.language.num_hidden_layers
    length = int(joining.input_ids.shape[0])
    assert counted == {"vision": -(-model.config.vision.layers // max(1, 4 // tiles)),
                       "prompt": -(-length // 128) * layers}
    request = engine.submit(joining, GenerationConfig(max_new_tokens=2), processor.eos_id)
    list(request)
    assert request.units_left == {"vision": 0, "prompt": 0}
    assert sum(kind == "prefill" for kind, _, _ in engine.timeline) == sum(counted.values())

    engine.prefill_budget_s = 0.25
    request.units_left = {"vision": 3, "prompt": 4}
    engine._unit_seconds = {"vision": 0.05}
    assert engine._turn_seconds(request) == 0.25  # (prompt units not timed yet)
    engine._unit_seconds = {"vision": 0.05, "prompt": 0.1}
    assert engine._turn_seconds(request) == pytest.approx(0.55 / 3)  # (0.55 s left: three turns)
    request.units_left = {"vision": 0, "prompt": 2}
    assert engine._turn_seconds(request) == pytest.approx(0.2)  # (fits in one turn)


def test_a_prompt_chunks_layers_run_in_pieces_between_the_others_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """DEEPSEEK_VL2_PREFILL_LAYERS=1: every prompt chunk goes through the decoder one layer a unit, a decode
    step of the others after each (budget 0), its tokens counted when its last layer is done; the answer is
    the one it gets alone and the one it gets with whole chunks. Bad settings are refused."""
    processor, model = _load("mha")
    layers = model.config.language.num_hidden_layers
    joining = _prompt(processor, size=(900, 600), color=(160, 120, 20))
    length = int(joining.input_ids.shape[0])
    config = GenerationConfig(max_new_tokens=6, repetition_penalty=1.0)
    monkeypatch.setenv("DEEPSEEK_VL2_PREFILL_LAYERS", "0")
    _, engine = _engine("mha", slots=2, prefill_chunk=128, prefill_budget_ms=0)
    assert engine.prefill_layers == 0
    whole_chunks = list(engine.submit(joining, config, processor.eos_id))
    monkeypatch.setenv("DEEPSEEK_VL2_PREFILL_LAYERS", "1")
    _, engine = _engine("mha", slots=2, prefill_chunk=128, prefill_budget_ms=0)
    assert list(engine.submit(joining, config, processor.eos_id)) == whole_chunks
    decoding, stream = _decoding_in_the_background(engine, processor)
    assert list(engine.submit(joining, config, processor.eos_id)) == whole_chunks
    decoding.cancel()
    units = [(i, tokens) for i, (kind, tokens, _) in enumerate(engine.timeline) if kind == "prefill"]
    chunks = [tokens for _, tokens in units if tokens]
    assert sum(chunks) == length and len(chunks) == -(-length // 128)
    # each chunk: layers - 1 pieces of 0 tokens before the one that counts its tokens
    counted = [n for n, (_, tokens) in enumerate(units) if tokens]
    assert all(all(units[n - k][1] == 0 for k in range(1, layers)) for n in counted)
    kinds = [kind for kind, _, _ in engine.timeline]
    assert all("decode" in kinds[a + 1: b] for (a, _), (b, _) in zip(units, units[1:]))
    monkeypatch.setenv("DEEPSEEK_VL2_PREFILL_LAYERS", "-1")
    with pytest.raises(ValueError, match="DEEPSEEK_VL2_PREFILL_LAYERS must be 0 or more"):
        BatchEngine(model, 1)


def test_each_chosen_expert_runs_once_per_step_on_its_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batched MoE (the PyTorch rows path): in one decode step of several rows, each expert that any row
    chose runs once, on all the rows routed to it."""
    from deepseek_vl2.language import Experts

    processor, engine = _engine("mha", slots=4)
    monkeypatch.setattr(type(engine.language), "decode_rows_cpu", lambda *a: None, raising=False)
    layer_calls: list[tuple[int, list[int], list[int]]] = []  # rows in, experts run, rows each expert got
    real_forward, real_expert = Experts.forward, Experts._expert

    def forward(self, x, weights, ids):
        layer_calls.append((x.shape[0], [], []))
        return real_forward(self, x, weights, ids)

    def expert(self, x, index):
        layer_calls[-1][1].append(index)
        layer_calls[-1][2].append(x.shape[0])
        return real_expert(self, x, index)

    monkeypatch.setattr(Experts, "forward", forward)
    monkeypatch.setattr(Experts, "_expert", expert)
    requests = [engine.submit(_prompt(processor, color=(i * 60, 10, 10)), GenerationConfig(max_new_tokens=24),
                              processor.eos_id) for i in range(4)]
    for r in requests:
        list(r)
    assert engine.max_rows_seen == 4
    batched = [(rows, experts, sizes) for rows, experts, sizes in layer_calls if rows == 4]
    assert batched
    top_k = engine.language.config.num_experts_per_tok
    for rows, experts, sizes in batched:
        assert len(experts) == len(set(experts))  # each chosen expert once
        assert sum(sizes) == rows * top_k  # on every (row, choice) routed to it


def test_async_delivery_on_an_event_loop() -> None:
    processor, engine = _engine("mha", slots=2)
    inputs = _prompt(processor)
    expected = list(engine.submit(inputs, GenerationConfig(max_new_tokens=10), processor.eos_id))

    async def main() -> tuple[list[int], bool]:
        loop = asyncio.get_running_loop()
        got = [t async for t in engine.submit(inputs, GenerationConfig(max_new_tokens=10), processor.eos_id, loop=loop)]
        long = engine.submit(inputs, GenerationConfig(max_new_tokens=3000), processor.eos_id, loop=loop)

        async def consume() -> None:
            async for _ in long:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()  # what Cog does to cancel a prediction
        with pytest.raises(asyncio.CancelledError):
            await task
        return got, long.cancelled

    got, cancelled = asyncio.run(main())
    assert got == expected and cancelled


def test_stopping_the_engine_fails_what_is_in_flight() -> None:
    processor, engine = _engine("mha", slots=1)
    inputs = _prompt(processor)
    running = engine.submit(inputs, GenerationConfig(max_new_tokens=2000, repetition_penalty=1.0), processor.eos_id)
    stream = iter(running)
    next(stream)
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    with pytest.raises(RuntimeError, match="stopped"):
        list(stream)
    stopper.join(timeout=30)
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(inputs, GenerationConfig(max_new_tokens=2), processor.eos_id)


def test_default_slots_follow_the_device_and_the_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_vl2.memory import cache_bytes_per_request

    _, engine = _engine("mla", slots=2)
    model = engine.model
    per_slot = cache_bytes_per_request(model.config, torch.float32)
    layers = model.config.language.num_hidden_layers
    assert per_slot == layers * 4096 * (model.config.language.kv_lora_rank + model.config.language.qk_rope_head_dim) * 4
    allocated = sum(t.numel() * t.element_size() for layer in model.language.model.layers for t in layer.self_attn.cache.buffers())
    assert allocated == 2 * per_slot  # (what the engine allocated: two slots)
    monkeypatch.setenv("DEEPSEEK_VL2_MEMORY_BUDGET_GB", "64")
    assert default_slots(torch.device("cpu"), per_slot) == 8
    monkeypatch.setenv("DEEPSEEK_VL2_MEMORY_BUDGET_GB", str(4 * 3.5 * per_slot / 1e9))  # room for 3
    assert default_slots(torch.device("cpu"), per_slot) == 3
    monkeypatch.setenv("DEEPSEEK_VL2_MEMORY_BUDGET_GB", str(1.5 * per_slot / 1e9))
    assert default_slots(torch.device("cpu"), per_slot) == 1


def test_configured_slots_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_vl2.engine import configured_slots

    _, model = _load("mha")
    monkeypatch.setenv("DEEPSEEK_VL2_MAX_CONCURRENCY", "5")
    assert configured_slots(model) == 5
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv("DEEPSEEK_VL2_MAX_CONCURRENCY", bad)
        with pytest.raises(ValueError, match="DEEPSEEK_VL2_MAX_CONCURRENCY"):
            configured_slots(model)


def test_timing_stats_describe_each_request() -> None:
    processor, engine = _engine("mha", slots=2)
    request = engine.submit(_prompt(processor), GenerationConfig(max_new_tokens=4), processor.eos_id)
    list(request)
    stats = request.stats
    assert stats.prompt_tokens > 400 and stats.new_tokens == 4
    assert 0 <= stats.queued_s <= stats.embedded_s <= stats.first_token_s <= stats.total_s
    assert "prompt tokens" in str(stats)
    time.sleep(0)  # (nothing left running)
    assert engine.in_flight == 0


def test_an_unexpected_error_in_the_loop_fails_the_requests_and_the_engine_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    processor, engine = _engine("mha", slots=2)
    inputs = _prompt(processor)
    expected = list(engine.submit(inputs, GenerationConfig(max_new_tokens=4), processor.eos_id))
    real = engine._prefill_unit
    monkeypatch.setattr(engine, "_prefill_unit", lambda request: (_ for _ in ()).throw(MemoryError("stand-in")))
    with pytest.raises(MemoryError, match="stand-in"):
        list(engine.submit(inputs, GenerationConfig(max_new_tokens=4), processor.eos_id))
    monkeypatch.setattr(engine, "_prefill_unit", real)
    assert list(engine.submit(inputs, GenerationConfig(max_new_tokens=4), processor.eos_id)) == expected


def test_a_fresh_process_samples_its_first_request_as_later_ones() -> None:
    """The same seed gives the same text from a process's first request on: the first token of a fresh
    process once went through PyTorch's sampler (the kernels were loaded only by the first decode step), and
    later ones through the kernels', whose draws differ."""
    import os
    import subprocess
    import sys

    from conftest import PROJECT_DIR

    script = (
        "import torch\n"
        "from deepseek_vl2.engine import BatchEngine\n"
        "from deepseek_vl2.generation import GenerationConfig\n"
        "from deepseek_vl2.model import load_model\n"
        "from deepseek_vl2.processor import DeepseekVL2Processor\n"
        f"path = {str(FIXTURES_DIR / 'checkpoints' / 'mha')!r}\n"
        "model, processor = load_model(path), DeepseekVL2Processor.from_pretrained(path)\n"
        "inputs = processor.process_prompt('Tell me a story.', [])\n"
        "engine = BatchEngine(model, 2)\n"
        "config = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=7)\n"
        "print([list(engine.submit(inputs, config, eos_token_id=-1)) for _ in range(2)])\n"
        "engine.stop()\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
    assert run.returncode == 0, run.stderr[-2000:]
    first, second = json.loads(run.stdout.strip().splitlines()[-1])
    assert first == second and len(first) == 8
