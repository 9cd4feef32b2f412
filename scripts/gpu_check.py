"""CUDA checks and timings in one run (for a lent GPU): parity on the golden cases, graphs vs eager, speed
alone and with 16 requests in flight (the batching engine), and the quantized weights (``quant``: int8 and
int4 on CUDA against the CPU's quantized model, then tiny in bf16 / int8 / int4 and base in int4, speed and
memory).

    python scripts/gpu_check.py [--fixtures DIR] [--sections parity,tiny,small,quant]

Prints one line per check and a JSON summary last. Nothing here runs in CI (no GPU there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepseek_vl2.config import DeepseekVL2Config  # noqa: E402
from deepseek_vl2.engine import BatchEngine, generate  # noqa: E402
from deepseek_vl2.generation import GenerationConfig  # noqa: E402
from deepseek_vl2.model import build_model, load_model, random_init  # noqa: E402

RESULTS: dict = {}


def log(*args, **kwargs) -> None:
    print(*args, flush=True)


def cuda_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def fresh_engine(model, graphs: bool, compile: bool, slots: int = 16) -> BatchEngine:
    """Replace the model's engine by one made under these switches (read when an engine is made)."""
    os.environ["DEEPSEEK_VL2_CUDA_GRAPHS"] = "1" if graphs else "0"
    os.environ["DEEPSEEK_VL2_COMPILE"] = "1" if compile else "0"
    old = model.__dict__.pop("_engine", None)
    if old is not None:
        old.stop()
    model._engine = BatchEngine(model, slots)
    return model._engine


def step_checks(model, inputs) -> dict[str, float]:
    """The first decode step after the prompt, three ways, on the same cache: eager (dynamic shapes), the
    static-window rows step that graphs capture (``decode_rows``), and its graph replay where the model has
    graphs (bf16 on Hopper). Relative differences of the logits:

    - ``static_vs_eager``: the window and mask logic. Rounding-level in fp32; in bf16 a near-tie in a
      random router can flip an expert and move the logits by several percent (mha/multi_turn does so
      on the CPU too), so only the fp32 figure is judged.
    - ``graph_vs_static``: the capture itself (static buffers for token and position). The same kernels
      without torch.compile: ~0; compiled kernels round differently.
    """
    from deepseek_vl2.generation import CudaGraphDecoder

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    with torch.inference_mode():
        lm = model.language
        embeds = model.prepare_inputs_embeds(inputs)
        n = embeds.shape[1]
        lm.setup_cache(n + 16, batch=2)  # (slot 1: the graphs' spare slot)
        token = lm(embeds, use_cache=True, last_only=True)[0, -1].argmax()
        eager = lm(lm.model.embed_tokens(token.view(1, 1)), start_pos=n, use_cache=True)[0, -1].clone()
        window = min(CudaGraphDecoder.window_for(n), lm.max_seq_len)
        rows = lambda *values: torch.tensor(values, device=token.device)  # noqa: E731
        static = lm.decode_rows(token.view(1), rows(n), rows(0), window)[0].clone()
        out = {"static_vs_eager": rel(static, eager)}
        if CudaGraphDecoder.supported(lm):
            graphs = CudaGraphDecoder(lm, max_rows=1, spare_slot=1, compile=os.environ.get("DEEPSEEK_VL2_COMPILE", "1") == "1")
            out["graph_vs_static"] = rel(graphs([int(token)], [n], [0])[0], static)
        return out


def parity(fixtures: Path) -> None:
    from PIL import Image
    from safetensors.torch import load_file

    from deepseek_vl2.processor import DeepseekVL2Processor

    cache = {}
    worst = {}
    for case_dir in sorted(fixtures.glob("cases/*/*")):
        case = json.loads((case_dir / "case.json").read_text())
        gold = load_file(case_dir / "tensors.safetensors")
        ckpt = fixtures / case["checkpoint"]
        if ckpt not in cache:
            cache[ckpt] = (
                DeepseekVL2Processor.from_pretrained(ckpt),
                load_model(ckpt, "cuda", torch.float32),
                load_model(ckpt, "cuda", torch.bfloat16),
            )
        proc, model32, model16 = cache[ckpt]
        conv = [
            {"role": m["role"], "content": m["content"], "images": [Image.open(fixtures / "images" / i).convert("RGB") for i in m["images"]]}
            for m in case["conversation"]
        ]
        inputs = proc(conv)
        with torch.inference_mode():
            embeds32 = model32.prepare_inputs_embeds(inputs)[0].cpu()
            logits = model32.forward_logits(inputs).cpu()
        diff = (logits[gold["text_positions"]] - gold["logits_text"]).abs().max().item()
        rows = gold["image_embed_rows"]
        emb_diff = (embeds32[rows] - gold["image_embeds"]).abs().max().item() if rows.numel() else 0.0
        per_pos = (logits[gold["text_positions"]] - gold["logits_text"]).abs().amax(-1)
        if diff > case["tolerance"]["logits_text"]:
            bad = (per_pos > case["tolerance"]["logits_text"]).nonzero().flatten().tolist()
            log(f"  {case_dir.name}: embeds diff {emb_diff:.2e} (tol {case['tolerance']['image_embeds']:.1e}); "
                f"{len(bad)}/{len(per_pos)} text positions over tolerance, first at {bad[:5]}")
        g = case["generation"]
        cfg = GenerationConfig(max_new_tokens=g["max_new_tokens"], repetition_penalty=g["repetition_penalty"])
        ids32 = generate(model32, inputs, cfg, proc.eos_id)
        fresh_engine(model16, graphs=False, compile=False)
        eager16 = generate(model16, inputs, cfg, proc.eos_id)
        fresh_engine(model16, graphs=True, compile=os.environ.get("DEEPSEEK_GPU_CHECK_COMPILE", "1") == "1")
        graph16 = generate(model16, inputs, cfg, proc.eos_id)
        steps = {"fp32": step_checks(model32, inputs), "bf16": step_checks(model16, inputs)}
        for dtype_name, figures in steps.items():
            for name, value in figures.items():
                RESULTS[f"{name}_{dtype_name}_max"] = max(RESULTS.get(f"{name}_{dtype_name}_max", 0.0), value)
        graph_limit = 1e-2 if os.environ.get("DEEPSEEK_VL2_COMPILE", "1") == "1" else 1e-3
        ok = (diff <= case["tolerance"]["logits_text"] and ids32 == case["generated_ids"]
              and steps["fp32"]["static_vs_eager"] < 1e-4 and steps["bf16"].get("graph_vs_static", 0.0) < graph_limit)
        key = case_dir.parent.name
        worst[key] = max(worst.get(key, 0.0), diff / case["tolerance"]["logits_text"])
        bf16_match = sum(a == b for a, b in zip(eager16, case["generated_ids"]))
        log(f"parity {key}/{case_dir.name}: fp32 logits {diff:.2e} (tol {case['tolerance']['logits_text']:.1e}) "
            f"greedy {'==' if ids32 == case['generated_ids'] else '!='} gold; bf16 graph {'==' if eager16 == graph16 else '!='} eager; "
            f"bf16 vs gold {bf16_match}/{len(eager16)}; static vs eager fp32 {steps['fp32']['static_vs_eager']:.1e} bf16 {steps['bf16']['static_vs_eager']:.1e}; "
            f"graph vs static bf16 {steps['bf16'].get('graph_vs_static', float('nan')):.1e} "
            f"{'OK' if ok else 'FAIL'}")
        RESULTS.setdefault("parity_fail", 0)
        RESULTS["parity_fail"] += 0 if ok else 1
    RESULTS["parity_worst_fraction_of_tolerance"] = worst


def speed(name: str, config_path: Path, prompt_tokens: int, tiles: int, new_tokens: int) -> None:
    """Single-stream decode (eager, graphs, compiled graphs) and 16 requests in flight, through the engine,
    on a text-only prompt of ``prompt_tokens`` random ids (the vision tower is timed apart on ``tiles``)."""
    from types import SimpleNamespace

    config = DeepseekVL2Config.from_json_file(config_path)
    torch.cuda.reset_peak_memory_stats()
    t_build, model = cuda_time(lambda: build_model(config, "cuda", torch.bfloat16, random_init()))
    res = {"build_s": round(t_build, 2)}
    with torch.inference_mode():
        pixels = torch.randn(tiles, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            t_vis, feats = cuda_time(lambda: model.projector(model.vision(pixels)))
        res["vision_s"] = round(t_vis, 4)
    inputs = SimpleNamespace(
        input_ids=torch.randint(100, 1000, (prompt_tokens,), device="cuda"),
        images_seq_mask=torch.zeros(prompt_tokens, dtype=torch.bool, device="cuda"),
        pixel_values=torch.zeros(0, 3, 384, 384, device="cuda", dtype=torch.bfloat16),
        images_spatial_crop=torch.zeros(1, 2, dtype=torch.long, device="cuda"),
    )
    cfg = GenerationConfig(max_new_tokens=new_tokens, repetition_penalty=1.1)

    def timed_rows(engine: BatchEngine, rows: int) -> tuple[float, float]:
        """(seconds, decode tok/s over the steps that carried every row) of ``rows`` requests at once."""
        engine.timeline.clear()
        t, outs = cuda_time(lambda: [list(r) for r in [engine.submit(inputs, cfg, -1) for _ in range(rows)]])
        assert all(len(o) == new_tokens for o in outs)
        steps = [(n, s) for kind, n, s in engine.timeline if kind == "decode" and n == rows]
        return t, sum(n for n, _ in steps) / sum(s for _, s in steps)

    for mode in ("eager", "graphs", "compiled"):
        engine = fresh_engine(model, graphs=mode != "eager", compile=mode == "compiled")
        t_warm, _ = timed_rows(engine, 1)  # warm-up (captures graphs, compiles)
        res[f"warmup_s_{mode}"] = round(t_warm, 1)
        t_gen, rate = timed_rows(engine, 1)
        res[f"decode_tok_s_{mode}"] = round(rate, 1)
        res[f"generate_s_{mode}"] = round(t_gen, 3)
        log(f"  {name} {mode}: {rate:.1f} tok/s, warm-up {t_warm:.1f} s", flush=True)
        if mode != "eager":
            timed_rows(engine, 16)  # (the 16-row bucket's graphs)
            t16, rate16 = timed_rows(engine, 16)
            res[f"decode_tok_s_16_{mode}"] = round(rate16, 1)
            res[f"x16_over_single_{mode}"] = round(rate16 / rate, 2)
            log(f"  {name} {mode}, 16 in flight: {rate16:.1f} tok/s in all ({rate16 / rate:.1f}x)", flush=True)
    res["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    res["weights_gb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 2)
    log(f"speed {name}: {res}")
    RESULTS[name] = res
    model.__dict__.pop("_engine").stop()
    del model
    torch.cuda.empty_cache()


def quantized(fixtures: Path) -> None:
    """Quantized weights on CUDA: (1) each fixture checkpoint in int8 and int4 (groups of 8, what their widths
    allow), fp32, CUDA against the CPU (the same quantized values; CUDA runs PyTorch's paths: int8 as
    gpt-fast's int8 matmul scaled after, int4 dequantized per call); (2) tiny at full size in bf16, int8
    and int4, decode alone and 16 in flight (eager steps: quantized experts read their counts on the host,
    so no CUDA graphs), peak memory; (3) base in int4, built directly quantized (15.7 GB of weights)."""
    from types import SimpleNamespace

    from deepseek_vl2.processor import DeepseekVL2Processor

    for variant in ("mha", "mla", "mla-noaux"):
        ckpt = fixtures / "checkpoints" / variant
        inputs = DeepseekVL2Processor.from_pretrained(ckpt).process_prompt("Describe the picture in detail.", [])
        for scheme in ("int8", "int4:8"):
            with torch.inference_mode():
                cpu = load_model(ckpt, "cpu", torch.float32, quantize=scheme).forward_logits(inputs)
                gpu = load_model(ckpt, "cuda", torch.float32, quantize=scheme).forward_logits(inputs).cpu()
            err = ((gpu - cpu).abs().max() / cpu.abs().max()).item()
            RESULTS[f"quant_{variant}_{scheme}_cuda_vs_cpu"] = err
            log(f"quant {variant} {scheme}: CUDA vs CPU logits {err:.1e} {'OK' if err < 1e-3 else 'FAIL'}")
    tiny = fixtures / "real-configs/deepseek-vl2-tiny.json"
    prompt_tokens, new_tokens = 438, 64
    cfg = GenerationConfig(max_new_tokens=new_tokens, repetition_penalty=1.1)
    runs = [("tiny_bf16", tiny, None), ("tiny_int8", tiny, "int8"), ("tiny_int4", tiny, "int4"),
            ("base_int4", fixtures / "real-configs/deepseek-vl2.json", "int4")]
    for name, config_path, scheme in runs:
        config = DeepseekVL2Config.from_json_file(config_path)
        torch.cuda.reset_peak_memory_stats()
        t_build, model = cuda_time(lambda: build_model(config, "cuda", torch.bfloat16, random_init(), quantize=scheme))
        inputs = SimpleNamespace(
            input_ids=torch.randint(100, 1000, (prompt_tokens,), device="cuda"),
            images_seq_mask=torch.zeros(prompt_tokens, dtype=torch.bool, device="cuda"),
            pixel_values=torch.zeros(0, 3, 384, 384, device="cuda", dtype=torch.bfloat16),
            images_spatial_crop=torch.zeros(1, 2, dtype=torch.long, device="cuda"),
        )
        engine = fresh_engine(model, graphs=scheme is None, compile=False)
        res = {"build_s": round(t_build, 1)}
        for rows in (1, 16):
            engine.timeline.clear()
            list(engine.submit(inputs, cfg, -1))  # (warm-up: the first step's kernels)
            engine.timeline.clear()
            outs = [engine.submit(inputs, cfg, -1) for _ in range(rows)]
            for out in outs:
                list(out)
            steps = [(n, sec) for kind, n, sec in engine.timeline if kind == "decode" and n == rows]
            res[f"decode_tok_s_{rows}"] = round(sum(n for n, _ in steps) / max(1e-9, sum(sec for _, sec in steps)), 1)
        res["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        res["weights_gb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 2)
        log(f"quant speed {name}: {res}")
        RESULTS[f"quant_{name}"] = res
        model.__dict__.pop("_engine").stop()
        del model, engine
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    in_project = Path(__file__).resolve().parent.parent / "tests" / "fixtures"  # the golden fixtures' copy in the project
    parser.add_argument("--fixtures", type=Path, default=Path(os.environ.get("DEEPSEEK_VL2_FIXTURES") or in_project))
    parser.add_argument("--sections", default="parity,tiny,small,quant",
                        help="comma-separated, run in this order: parity, tiny, small, quant (default: all four)")
    args = parser.parse_args()
    sections = {
        "parity": lambda: parity(args.fixtures),
        "tiny": lambda: speed("tiny_438tok_1tile", args.fixtures / "real-configs/deepseek-vl2-tiny.json", 438, 2, 128),
        "small": lambda: speed("small_1400tok_5tiles", args.fixtures / "real-configs/deepseek-vl2-small.json", 1400, 5, 128),
        "quant": lambda: quantized(args.fixtures),
    }
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in sections]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {sorted(sections)}")
    log("device", torch.cuda.get_device_name(), "torch", torch.__version__, "grouped_mm", hasattr(torch, "_grouped_mm"))
    RESULTS["device"] = torch.cuda.get_device_name()
    for section in chosen:
        try:
            sections[section]()
        except Exception as exc:  # keep going: one call should report everything it can
            import traceback

            traceback.print_exc()
            RESULTS[f"{section}_error"] = repr(exc)[:300]
    print(json.dumps(RESULTS))


if __name__ == "__main__":
    main()
