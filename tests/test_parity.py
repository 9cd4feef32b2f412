"""Parity with the official implementation: every field of every golden case, with the case's tolerance.

Cases are discovered under ``$DEEPSEEK_VL2_FIXTURES/cases/<variant>/<case>/`` (default: the project's copy,
``tests/fixtures``); a missing root or a root without cases fails. Runs in fp32 on the CPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FIXTURES_DIR
from deepseek_vl2.engine import generate
from deepseek_vl2.generation import GenerationConfig, apply_repetition_penalty, sampling_probs
from deepseek_vl2.model import DeepseekVL2, load_model
from deepseek_vl2.processor import DeepseekVL2Processor, ProcessedInputs

CASE_DIRS = sorted(p.parent for p in FIXTURES_DIR.glob("cases/*/*/case.json"))
CASE_IDS = [f"{p.parent.name}/{p.name}" for p in CASE_DIRS]


def test_fixtures_present() -> None:
    assert FIXTURES_DIR.is_dir(), f"fixtures root {FIXTURES_DIR} does not exist (set DEEPSEEK_VL2_FIXTURES)"
    assert CASE_DIRS, f"no cases/<variant>/<case>/case.json under {FIXTURES_DIR}"


@functools.lru_cache(maxsize=None)
def _checkpoint(path: Path) -> tuple[DeepseekVL2Processor, DeepseekVL2]:
    return DeepseekVL2Processor.from_pretrained(path), load_model(path, "cpu", torch.float32)


@dataclass
class CaseRun:
    case: dict
    gold: dict[str, torch.Tensor]
    inputs: ProcessedInputs
    embeds: torch.Tensor  # [T, D]
    logits: torch.Tensor  # [T, V]
    generated: list[int]
    processor: DeepseekVL2Processor


@functools.lru_cache(maxsize=None)
def _run(case_dir: Path) -> CaseRun:
    case = json.loads((case_dir / "case.json").read_text())
    gold = load_file(case_dir / "tensors.safetensors")
    processor, model = _checkpoint(FIXTURES_DIR / case["checkpoint"])
    conversation = [
        {
            "role": m["role"],
            "content": m["content"],
            "images": [Image.open(FIXTURES_DIR / "images" / name).convert("RGB") for name in m["images"]],
        }
        for m in case["conversation"]
    ]
    inputs = processor(conversation, system_prompt=case.get("system_prompt", ""))
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(inputs)
        logits = model.language(embeds)[0]
    settings = case["generation"]
    config = GenerationConfig(max_new_tokens=settings["max_new_tokens"], repetition_penalty=settings.get("repetition_penalty", 1.0))
    generated = generate(model, inputs, config, eos_token_id=processor.eos_id)
    return CaseRun(case, gold, inputs, embeds[0], logits, generated, processor)


cases = pytest.mark.parametrize("case_dir", CASE_DIRS, ids=CASE_IDS)


@cases
def test_input_ids_and_image_mask(case_dir: Path) -> None:
    run = _run(case_dir)
    assert run.inputs.sft_format == run.case["sft_format"]
    assert torch.equal(run.inputs.input_ids, run.gold["input_ids"])
    assert torch.equal(run.inputs.images_seq_mask.to(torch.uint8), run.gold["images_seq_mask"])


@cases
def test_tiling(case_dir: Path) -> None:
    run = _run(case_dir)
    assert torch.equal(run.inputs.images_spatial_crop.view(-1, 2), run.gold["images_spatial_crop"].view(-1, 2))
    tiles = run.inputs.pixel_values
    assert tiles.shape[0] == run.case["num_tiles"]
    as_uint8 = torch.round((tiles * 0.5 + 0.5) * 255).clamp(0, 255).to(torch.uint8)
    hashes = [hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for t in as_uint8]
    assert hashes == run.case["tile_sha256_uint8"]


@cases
def test_image_embeds(case_dir: Path) -> None:
    run = _run(case_dir)
    rows, expected = run.gold["image_embed_rows"], run.gold["image_embeds"]
    diff = (run.embeds[rows] - expected).abs().max().item() if rows.numel() else 0.0
    assert diff <= run.case["tolerance"]["image_embeds"], f"max |diff| {diff:.3e}"


@cases
def test_logits(case_dir: Path) -> None:
    run = _run(case_dir)
    tolerance = run.case["tolerance"]
    text_diff = (run.logits[run.gold["text_positions"]] - run.gold["logits_text"]).abs().max().item()
    last_diff = (run.logits[-1] - run.gold["logits_last"]).abs().max().item()
    assert text_diff <= tolerance["logits_text"], f"text logits max |diff| {text_diff:.3e}"
    assert last_diff <= tolerance["logits_last"], f"last logits max |diff| {last_diff:.3e}"


@cases
def test_greedy_continuation(case_dir: Path) -> None:
    run = _run(case_dir)
    expected = run.case["generated_ids"]
    assert torch.equal(run.gold["generated_ids"], torch.tensor(expected, dtype=torch.int64))
    if run.case.get("generation_truncated"):
        assert run.generated[: len(expected)] == expected
    else:
        assert run.generated == expected
        assert run.processor.decode(run.generated) == run.case["generated_text"]
        assert run.processor.decode(run.generated, skip_special_tokens=True) == run.case["generated_text_skip_special"]


@cases
def test_sampling_distribution(case_dir: Path) -> None:
    run = _run(case_dir)
    settings = run.case.get("sampling_first_step")
    if settings is None:
        assert "probs_first" not in run.gold
        return  # this case has no sampling vector; nothing to compare
    seen = torch.zeros(run.logits.shape[-1], dtype=torch.bool)
    seen[run.inputs.input_ids] = True
    logits = apply_repetition_penalty(run.logits[-1], seen, settings["repetition_penalty"])
    # top-k off: the golden vector is penalty -> temperature -> top-p only.
    probs = sampling_probs(logits, settings["temperature"], settings["top_p"], top_k=0)
    diff = (probs - run.gold["probs_first"]).abs().max().item()
    tolerance = settings.get("tolerance", run.case["tolerance"]["probs_first"])
    assert diff <= tolerance, f"max |diff| {diff:.3e}"
