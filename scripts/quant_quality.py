#!/usr/bin/env python3
"""How much quantization moves the model: every golden case, in bf16, int8 and int4, against the official
implementation's float64 reference.

    python scripts/quant_quality.py --fixtures DIR [--json] [--dtype bfloat16|float32] [--int4-group N]

DIR has the layout of tests/fixtures (cases/<variant>/<case>/{case.json, tensors.safetensors} and the
checkpoints they name). For each case and scheme:

* ``max_rel_err``: the logits' largest relative error, max_p |logits_p - gold_p|_inf / |gold_p|_inf over the
  positions the case stores (every text position of the prompt, and the last one), from one forward pass;
* ``argmax_agree``: over the answer's positions, the share where the model's greedy choice equals the
  reference's next token, teacher-forced (the answer so far is the reference's), with the case's repetition
  penalty applied as generation applies it.

Schemes: ``bf16`` is the checkpoint's bf16 weights with bf16 activations (the CPU/GPU default); ``int8`` and
``int4`` quantize the language model's linears while loading (deepseek_vl2/quantize.py) and compute with
``--dtype`` activations (default bf16, as deployed). int4's group size is the largest multiple of 8 up to
64 that divides every quantized input width of the case's checkpoint (64 for the released models; the
test checkpoints are narrower), unless ``--int4-group`` says.

Prints a line per case and scheme, then the totals (all cases): ``--json`` prints only
``{"bf16": {"max_rel_err": x, "argmax_agree": f}, "int8": {...}, "int4": {...}}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepseek_vl2.config import DeepseekVL2Config  # noqa: E402
from deepseek_vl2.generation import apply_repetition_penalty  # noqa: E402
from deepseek_vl2.hardware import parse_dtype  # noqa: E402
from deepseek_vl2.model import DeepseekVL2, load_model  # noqa: E402
from deepseek_vl2.processor import DeepseekVL2Processor, ProcessedInputs  # noqa: E402
from deepseek_vl2.quantize import DEFAULT_INT4_GROUP  # noqa: E402

SCHEMES = ("bf16", "int8", "int4")


def _fixtures_default() -> Path:
    env = os.environ.get("DEEPSEEK_VL2_FIXTURES")
    return Path(env) if env else ROOT / "tests" / "fixtures"


def quantized_widths(config: DeepseekVL2Config) -> set[int]:
    """The input widths of every matrix a scheme quantizes (the language model's linears)."""
    with torch.device("meta"):  # (a model without memory: only its shapes)
        model = DeepseekVL2(config)
    widths: set[int] = set()
    for module in model.language.modules():
        if isinstance(module, torch.nn.Linear):
            widths.add(module.in_features)
    lang = config.language
    if lang.n_routed_experts:
        widths |= {lang.hidden_size, lang.moe_intermediate_size}
    return widths


def int4_group_for(config: DeepseekVL2Config) -> int:
    """The largest multiple of 8 up to 64 dividing every quantized input width (8 always does for the cases)."""
    widths = quantized_widths(config)
    for group in range(DEFAULT_INT4_GROUP, 7, -8):
        if all(width % group == 0 for width in widths):
            return group
    raise SystemExit(f"no int4 group size (a multiple of 8) divides the input widths {sorted(widths)}")


@dataclass
class Result:
    max_rel_err: float
    agree: int
    positions: int


class Models:
    """One loaded model per (checkpoint, scheme), kept while the cases of that checkpoint run."""

    def __init__(self, dtype: torch.dtype, int4_group: Optional[int]) -> None:
        self.dtype, self.int4_group = dtype, int4_group

    @functools.lru_cache(maxsize=4)
    def get(self, checkpoint: Path, scheme: str) -> tuple[DeepseekVL2Processor, DeepseekVL2, str]:
        processor = DeepseekVL2Processor.from_pretrained(checkpoint)
        if scheme == "bf16":
            return processor, load_model(checkpoint, "cpu", torch.bfloat16), "bf16"
        name = scheme
        if scheme == "int4":
            name = f"int4:{self.int4_group or int4_group_for(DeepseekVL2Config.from_pretrained(checkpoint))}"
        return processor, load_model(checkpoint, "cpu", self.dtype, quantize=name), name


def _inputs(processor: DeepseekVL2Processor, case: dict, fixtures: Path) -> ProcessedInputs:
    conversation = [
        {"role": m["role"], "content": m["content"],
         "images": [Image.open(fixtures / "images" / name).convert("RGB") for name in m.get("images", [])]}
        for m in case["conversation"]
    ]
    return processor(conversation)


def run_case(case_dir: Path, fixtures: Path, models: Models, scheme: str) -> tuple[Result, str]:
    case = json.loads((case_dir / "case.json").read_text())
    gold = load_file(case_dir / "tensors.safetensors")
    processor, model, name = models.get((fixtures / case["checkpoint"]).resolve(), scheme)
    inputs = _inputs(processor, case, fixtures)
    answer = [int(t) for t in case["generated_ids"]]
    prompt_len = int(inputs.input_ids.shape[-1])
    # The prompt, then the reference's answer but its last token: one causal pass gives the prompt's logits
    # (as the reference's) and the choice at every answer position.
    forced = ProcessedInputs(
        input_ids=torch.cat([inputs.input_ids.view(-1), torch.tensor(answer[:-1], dtype=torch.long)]),
        images_seq_mask=torch.cat([inputs.images_seq_mask.view(-1), torch.zeros(len(answer) - 1, dtype=torch.bool)]),
        pixel_values=inputs.pixel_values, images_spatial_crop=inputs.images_spatial_crop, sft_format=inputs.sft_format,
    )
    with torch.inference_mode():
        logits = model.forward_logits(forced).double()
    rows = torch.cat([logits[gold["text_positions"]], logits[prompt_len - 1 : prompt_len]])
    reference = torch.cat([gold["logits_text"], gold["logits_last"].view(1, -1)]).double()
    err = ((rows - reference).abs().amax(dim=-1) / reference.abs().amax(dim=-1)).max().item()
    penalty = float(case["generation"].get("repetition_penalty", 1.0))
    agree = 0
    for i, token in enumerate(answer):
        step = logits[prompt_len - 1 + i].float()
        if penalty != 1.0:
            seen = torch.tensor(inputs.input_ids.view(-1).tolist() + answer[:i], dtype=torch.long)
            step = apply_repetition_penalty(step, seen, penalty)
        agree += int(step.argmax()) == token
    return Result(err, agree, len(answer)), name


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, default=_fixtures_default(), help="golden fixtures root (tests/fixtures)")
    parser.add_argument("--json", action="store_true", help="print only the totals as JSON")
    parser.add_argument("--dtype", default="bfloat16", help="activations of the int8/int4 runs (default bfloat16)")
    parser.add_argument("--int4-group", type=int, default=None, help="int4's group size (default: per checkpoint)")
    args = parser.parse_args(argv)
    case_dirs = sorted(p.parent for p in args.fixtures.glob("cases/*/*/case.json"))
    if not case_dirs:
        raise SystemExit(f"no cases/<variant>/<case>/case.json under {args.fixtures}")
    models = Models(parse_dtype(args.dtype), args.int4_group)
    totals = {scheme: Result(0.0, 0, 0) for scheme in SCHEMES}
    per_case: dict[str, dict[str, Result]] = {}
    for case_dir in case_dirs:
        label = f"{case_dir.parent.name}/{case_dir.name}"
        per_case[label] = {}
        for scheme in SCHEMES:
            result, name = run_case(case_dir, args.fixtures, models, scheme)
            per_case[label][scheme] = result
            total = totals[scheme]
            totals[scheme] = Result(max(total.max_rel_err, result.max_rel_err), total.agree + result.agree,
                                    total.positions + result.positions)
            if not args.json:
                print(f"{label:32s} {name:8s} max_rel_err {result.max_rel_err:.3e}  argmax {result.agree}/{result.positions}",
                      flush=True)
    summary = {scheme: {"max_rel_err": round(r.max_rel_err, 6), "argmax_agree": round(r.agree / max(1, r.positions), 4)}
               for scheme, r in totals.items()}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"activations of int8/int4: {args.dtype}")
        for scheme, values in summary.items():
            print(f"all cases  {scheme:5s} max_rel_err {values['max_rel_err']:.3e}  argmax_agree {values['argmax_agree']:.4f}")
        worst = max(per_case[c]["int8"].max_rel_err / max(per_case[c]["bf16"].max_rel_err, 1e-30) for c in per_case)
        print(f"int8 / bf16 largest error ratio over the cases: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
