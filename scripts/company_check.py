#!/usr/bin/env python3
"""Does a request's answer depend on the other requests in flight? Every golden case, greedy, alone and then
with three others in flight (sampling, another penalty, other prompts and images, joining at other times),
through the batching engine, at a given dtype.

    python scripts/company_check.py --dtype bfloat16 [--variants mha,mla,mla-noaux] [--fixtures DIR]

Prints one line per case (same ids or the first step where they differ) and a JSON summary last. fp32
must give the same ids in every case (the tests check it); bf16 is what this measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepseek_vl2.engine import BatchEngine  # noqa: E402
from deepseek_vl2.generation import GenerationConfig  # noqa: E402
from deepseek_vl2.hardware import parse_dtype  # noqa: E402
from deepseek_vl2.model import load_model  # noqa: E402
from deepseek_vl2.processor import DeepseekVL2Processor  # noqa: E402


def _fixtures_default() -> Path:
    env = os.environ.get("DEEPSEEK_VL2_FIXTURES")
    if env:
        return Path(env)
    inside = ROOT / "tests" / "fixtures"
    return inside if inside.is_dir() else ROOT.parent / "shared" / "fixtures"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variants", default="mha,mla,mla-noaux")
    parser.add_argument("--fixtures", type=Path, default=_fixtures_default())
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per case (eos disabled)")
    args = parser.parse_args(argv)
    dtype = parse_dtype(args.dtype)
    summary = {"dtype": str(dtype).replace("torch.", ""), "cases": 0, "same": 0, "first_difference_steps": []}
    for variant in args.variants.split(","):
        checkpoint = args.fixtures / "checkpoints" / variant
        processor = DeepseekVL2Processor.from_pretrained(checkpoint)
        model = load_model(checkpoint, dtype=dtype)
        engine = model._engine = BatchEngine(model, slots=4)
        blank = lambda size, color: processor.process_prompt(  # noqa: E731
            "<image>\nDescribe this image.", [Image.new("RGB", size, color)]).to(engine.device, dtype=dtype)
        companions = [
            (blank((500, 300), (200, 40, 40)), GenerationConfig(300, temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=1)),
            (blank((300, 800), (10, 200, 90)), GenerationConfig(300, repetition_penalty=1.1)),
            (blank((900, 900), (90, 90, 250)), GenerationConfig(300, temperature=0.5, top_p=0.5, seed=2)),
        ]
        for case_dir in sorted((args.fixtures / "cases" / variant).iterdir()):
            case = json.loads((case_dir / "case.json").read_text())
            conversation = [{**m, "images": [Image.open(args.fixtures / "images" / n).convert("RGB") for n in m["images"]]}
                            for m in case["conversation"]]
            inputs = processor(conversation).to(engine.device, dtype=dtype)
            config = GenerationConfig(max_new_tokens=args.new_tokens, repetition_penalty=case["generation"]["repetition_penalty"])
            alone = list(engine.submit(inputs, config, eos_token_id=-1))
            company = [engine.submit(x, c, -1) for x, c in companions]
            joined = iter(company[0])
            next(joined)  # (the request joins while the others decode; `joined` held: dropping it would cancel)
            together = list(engine.submit(inputs, config, eos_token_id=-1))
            for other in company:
                other.cancel()
            first = next((i for i, (a, b) in enumerate(zip(alone, together)) if a != b), None)
            summary["cases"] += 1
            summary["same"] += first is None
            if first is not None:
                summary["first_difference_steps"].append(first)
            print(f"{variant}/{case_dir.name}: " + ("same ids" if first is None else f"differ from step {first}"), flush=True)
        engine.stop()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
