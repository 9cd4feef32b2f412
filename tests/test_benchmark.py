"""Hardware-limit arithmetic (deepseek_vl2.bounds) and a smoke test of scripts/benchmark.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES_DIR
from deepseek_vl2 import bounds
from deepseek_vl2.config import DeepseekVL2Config

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = FIXTURES_DIR
REAL_CONFIGS = FIXTURES / "real-configs"

# Official classes instantiated on the meta device (fixtures README, spec §2.1), attn_pool included.
REAL_PARAMS = {"deepseek-vl2-tiny": 3_371e6, "deepseek-vl2-small": 16_148e6, "deepseek-vl2": 27_480e6}


def real_config(name: str) -> DeepseekVL2Config:
    path = REAL_CONFIGS / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"real configs not found at {REAL_CONFIGS} (DEEPSEEK_VL2_FIXTURES points elsewhere?)")
    return DeepseekVL2Config.from_json_file(path)


@pytest.mark.parametrize("name", sorted(REAL_PARAMS))
def test_parameter_count_of_real_configs(name):
    parts = bounds.count_parameters(real_config(name))
    assert parts["total"] == pytest.approx(REAL_PARAMS[name], rel=1e-3)
    assert parts["total"] == parts["vision"] + parts["projector"] + parts["layout"] + parts["language"]


def test_attn_pool_is_excluded_from_resident_weights():
    config = real_config("deepseek-vl2-tiny")
    with_pool = bounds.count_parameters(config)["total"]
    resident = bounds.count_parameters(config, include_attn_pool=False)["total"]
    assert with_pool - resident == bounds.attn_pool_parameters(config.vision)
    assert 15.0e6 < with_pool - resident < 15.5e6  # spec §2.1: 15.2 M


@pytest.mark.parametrize("name", sorted(REAL_PARAMS))
def test_count_matches_the_model_built_on_meta(name):
    model_mod = pytest.importorskip("deepseek_vl2.model")
    config = real_config(name)
    with torch.device("meta"):
        model = model_mod.DeepseekVL2(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == bounds.count_parameters(config, include_attn_pool=False)["total"]


def test_decode_bytes_tiny():
    config = real_config("deepseek-vl2-tiny")
    lang = config.language
    b16 = bounds.decode_bytes_per_token(config, torch.bfloat16)
    b32 = bounds.decode_bytes_per_token(config, torch.float32)
    assert b32["weights"] - b32["router"] == 2 * (b16["weights"] - b16["router"])
    assert b16["router"] == b32["router"] == 11 * 64 * lang.hidden_size * 4  # the router stays fp32
    assert b16["kv_cache"] == 0
    h, inter = lang.hidden_size, lang.moe_intermediate_size
    # 11 MoE layers x 6 routed experts x 3 matrices, in bf16
    assert b16["routed_experts"] == 11 * 6 * 3 * h * inter * 2
    assert b16["shared_experts"] == 11 * 3 * h * inter * 2 * 2
    assert b16["dense_mlp"] == 3 * h * lang.intermediate_size * 2
    assert b16["attention"] == 12 * 4 * h * h * 2  # MHA q/k/v/o
    assert b16["lm_head"] == lang.vocab_size * h * 2
    # far less than the whole model (that is the point of MoE), more than the shared part
    total = bounds.weight_bytes(config, torch.bfloat16)
    assert 0.1 * total < b16["weights"] < 0.3 * total
    assert b16["weights"] == pytest.approx(1.148e9, rel=0.01)


def test_kv_cache_bytes_mha_vs_mla():
    tiny, small = real_config("deepseek-vl2-tiny"), real_config("deepseek-vl2-small")
    # MHA caches K and V: 2 * 10 heads * 128 per layer per token
    assert bounds.kv_cache_bytes(tiny, 1000, torch.bfloat16) == 1000 * 12 * 2 * 10 * 128 * 2
    # MLA caches the latent and the shared rope key: 512 + 64 per layer per token
    assert bounds.kv_cache_bytes(small, 1000, torch.bfloat16) == 1000 * 27 * (512 + 64) * 2
    with_ctx = bounds.decode_bytes_per_token(small, torch.bfloat16, context=1000)
    assert with_ctx["total"] == with_ctx["weights"] + with_ctx["kv_cache"]


def test_mla_attention_parameters_small():
    lang = real_config("deepseek-vl2-small").language
    h, heads = 2048, 16
    expected = h * heads * 192 + h * (512 + 64) + 512 + 512 * heads * 256 + heads * 128 * h
    assert bounds.attention_parameters(lang) == expected


def test_decode_bound_is_bandwidth_over_bytes():
    config = real_config("deepseek-vl2-tiny")
    per_token = bounds.decode_bytes_per_token(config, torch.bfloat16, context=470)["total"]
    assert bounds.decode_bound_tok_s(config, torch.bfloat16, 30.0, context=470) == pytest.approx(30e9 / per_token)


def test_image_tokens_layout():
    assert bounds.image_tokens(1, 1) == 421
    assert bounds.image_tokens(2, 2) == 1023
    assert bounds.image_tokens(3, 3) == 2017


def test_prefill_flops_tiny():
    config = real_config("deepseek-vl2-tiny")
    f = bounds.prefill_flops(config, n_text_tokens=438, n_tiles=2)
    # ViT: ~0.4 B params -> ~2*0.4 GFLOP per token, 1458 tokens, plus attention
    vit_params = bounds.vision_parameters(config.vision) - config.vision.grid_size**2 * 1152
    assert f["vision"] > 2 * 1458 * (vit_params - 2e6) * 0.99
    assert 1.2e12 < f["vision"] < 1.5e12
    assert f["language_linear"] == 2 * 438 * bounds.language_active_parameters(config.language)
    assert f["total"] == f["vision_total"] + f["language_total"]
    # more tiles, more vision work; text tokens do not change it
    assert bounds.prefill_flops(config, 438, 4)["vision"] == 2 * f["vision"]
    assert bounds.prefill_flops(config, 100, 2)["vision"] == f["vision"]


def test_prefill_bound_phases():
    config = real_config("deepseek-vl2-tiny")
    pb = bounds.prefill_bound(config, torch.bfloat16, 438, 2, flops_per_s=400e9, bandwidth_gbs=30.0)
    f = bounds.prefill_flops(config, 438, 2)
    assert pb.compute_s == pytest.approx(f["total"] / 400e9)
    assert pb.total_s >= pb.compute_s and pb.total_s >= pb.memory_s
    # with no image the vision phase costs nothing
    assert bounds.prefill_bound(config, torch.bfloat16, 17, 0, 400e9, 30.0).vision_s == 0.0


def test_experts_touched():
    assert bounds.experts_touched(64, 6, 1) == pytest.approx(6.0)
    assert bounds.experts_touched(64, 6, 438) == pytest.approx(64.0, rel=1e-6)


def test_a_step_of_several_rows_reads_the_shared_weights_once():
    """batch_step_bytes: one row is the batch-1 figure; each further row adds its own KV cache and embedding
    row and the experts it chooses beyond the others' (independent choices by default, or as measured)."""
    config = real_config("deepseek-vl2-tiny")
    lang = config.language
    one = bounds.decode_bytes_per_token(config, torch.bfloat16, 438)
    assert bounds.batch_step_bytes(config, torch.bfloat16, 1, 438) == one["total"]
    expert = bounds.moe_parts(lang)["expert"] * 2
    moe_layers = lang.num_hidden_layers - lang.first_k_dense_replace
    sixteen = bounds.batch_step_bytes(config, torch.bfloat16, 16, 438)
    shared = one["weights"] - one["routed_experts"] - one["embedding_row"]
    assert sixteen == pytest.approx(shared + 16 * (one["kv_cache"] + one["embedding_row"])
                                    + moe_layers * bounds.experts_touched(64, 6, 16) * expert, abs=1)
    assert 3.7 < 16 * one["total"] / sixteen < 3.9  # (the bandwidth bound of 16 rows over one: ~3.8x at 438 tokens)
    # as many experts as one row: only the KV caches and embedding rows add
    assert bounds.batch_step_bytes(config, torch.bfloat16, 16, 438, experts=6) == pytest.approx(
        one["total"] + 15 * (one["kv_cache"] + one["embedding_row"]), abs=1)


def test_probes_are_quick_and_positive():
    import time

    from deepseek_vl2 import kernels

    kernels.cpu_gemv(torch.float32)  # one-time: builds our fp32 kernel (~20 s on a fresh cache), picks a path
    start = time.perf_counter()
    bw = bounds.measure_memory_bandwidth(seconds=0.2, size_bytes=64 << 20)
    gf = bounds.measure_matmul_flops(torch.float32, shapes=((256, 256, 256),), seconds=0.2)
    gemv = bounds.measure_gemv_bandwidth(torch.float32, rows=1024, cols=1024, seconds=0.1)
    assert bw > 0.1 and gf > 1e8 and gemv > 0.1
    assert time.perf_counter() - start < 10
    desc = bounds.machine_description()
    assert desc["cpu_count"] >= 1 and desc["torch_threads"] >= 1


def _load_benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up while the file runs)
    spec.loader.exec_module(module)
    return module


def test_synthetic_inputs_match_the_reference_workload():
    pytest.importorskip("deepseek_vl2.processor")
    bench = _load_benchmark_module()
    config = real_config("deepseek-vl2-tiny")
    processor = bench.image_only_processor(config)
    inputs = bench.synthetic_inputs(processor, config, bench.default_image(), bench.REFERENCE_TEXT_TOKENS)
    assert inputs.input_ids.numel() == 438
    assert int(inputs.images_seq_mask.sum()) == 421
    assert tuple(inputs.pixel_values.shape) == (2, 3, 384, 384)
    assert inputs.images_spatial_crop.tolist() == [[1, 1]]
    assert int(inputs.input_ids.max()) < config.language.vocab_size


def test_reduced_config_keeps_widths():
    bench = _load_benchmark_module()
    config = real_config("deepseek-vl2-small")
    small = bench.reduced_config(config, layers=2, vision_layers=1)
    assert small.language.num_hidden_layers == 2 and small.vision.layers == 1
    assert small.language.hidden_size == config.language.hidden_size
    assert dataclasses.replace(small.language, num_hidden_layers=27) == config.language


JSON_KEYS = {
    "dtype", "load_s", "ttft_s", "vision_s", "prefill_s", "preprocess_s", "decode_tok_s", "peak_rss_gb",
    "decode_bound_tok_s", "ttft_bound_s", "bandwidth_gbs", "matmul_gflops", "machine",
}


def _run_benchmark(*args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args, "--json",
           "--new-tokens", "4", "--probe-seconds", "0.1", "--probe-mb", "64", "--dtype", "float32", "--repeat", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert JSON_KEYS <= set(result), JSON_KEYS - set(result)
    assert "[benchmark]" in proc.stderr  # progress goes to stderr
    return result


def test_huge_page_figures_are_read_from_smaps_rollup():
    sample = ("00400000-7ffd0000 ---p 00000000 00:00 0  [rollup]\nRss:   5230000 kB\nAnonymous:  300000 kB\n"
              "AnonHugePages:    296960 kB\nShmemPmdMapped:  0 kB\nFilePmdMapped:   2011136 kB\n")
    bench = _load_benchmark_module()
    assert bench.parse_huge_pages(sample) == {"anonymous": 296960 * 1024, "file": 2011136 * 1024}
    assert bench.parse_huge_pages("Rss: 1 kB\n") == {"anonymous": 0, "file": 0}  # (kernels without THP)


def test_benchmark_smoke_checkpoint():
    ckpt = FIXTURES / "checkpoints" / "mha"
    if not ckpt.is_dir():
        pytest.skip(f"fixture checkpoint not found at {ckpt}")
    pytest.importorskip("deepseek_vl2.generation")
    result = _run_benchmark("--checkpoint", str(ckpt))
    assert result["dtype"] == "float32"
    assert result["prompt_tokens"] > 421 and result["n_tiles"] == 2
    assert result["new_tokens"] == 4
    assert result["ttft_s"] == pytest.approx(result["preprocess_s"] + result["vision_s"] + result["prefill_s"], rel=1e-6)
    assert result["decode_tok_s"] > 0 and result["decode_bound_tok_s"] > 0 and result["ttft_bound_s"] > 0
    assert result["file_read_s"] is not None and result["peak_rss_gb"] > 0
    # The decode bound uses the bandwidth read right around the decode steps (one run: its own window);
    # the best bandwidth of the whole run, window probes included, bounds it from above.
    (window,) = result["decode_window_bandwidth_gbs"]
    assert window > 0 and result["bandwidth_gbs"] >= window
    assert result["decode_pct_of_bound"] == pytest.approx(100 * result["decode_tok_s"] / result["decode_bound_tok_s"])
    assert result["decode_bound_best_tok_s"] >= result["decode_bound_tok_s"]
    huge = result["huge_pages_gb"]
    assert huge is None or (0 <= huge["file"] <= result["peak_rss_gb"] and huge["anonymous"] >= 0)


def test_poisson_arrivals_follow_the_seeded_schedule():
    """poisson_arrivals: the first request at 0, then exponential gaps of mean 1/rate (so 1 - 1/e of them
    shorter than the mean, and as spread as they are long), the same schedule for the same seed."""
    bench = _load_benchmark_module()
    rate, count = 0.4, 20_000
    times = bench.poisson_arrivals(rate, count, seed=0)
    assert len(times) == count and times[0] == 0.0
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.03)  # (the sample mean's spread is 0.7 %)
    assert sum(g < mean for g in gaps) / len(gaps) == pytest.approx(1 - 1 / 2.718281828, abs=0.015)
    spread = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert spread / mean == pytest.approx(1.0, abs=0.05)  # (evenly spaced arrivals would give 0)
    assert bench.poisson_arrivals(rate, 16, seed=0) == times[:16]  # reproducible, a prefix of the longer one
    assert bench.poisson_arrivals(rate, 16, seed=1) != times[:16]
    # twice the rate: the same draws, half the gaps
    assert bench.poisson_arrivals(2 * rate, 16, seed=0) == pytest.approx([t / 2 for t in times[:16]])
    assert bench.poisson_arrivals(rate, 1) == [0.0]
    for bad_rate, bad_count in ((0.0, 4), (-1.0, 4), (float("nan"), 4), (float("inf"), 4), (0.4, 0)):
        with pytest.raises(ValueError):
            bench.poisson_arrivals(bad_rate, bad_count)


def test_concurrency_levels_take_poisson_rates():
    bench = _load_benchmark_module()
    args = bench.parse_args(["--config", "c.json", "--concurrency", "1,8,poisson:0.4", "--arrival-requests", "5"])
    assert args.concurrency == [1, 8, bench.PoissonLevel(0.4)] and args.arrival_requests == 5 and args.arrival_seed == 0
    assert [bench.level_name(level) for level in args.concurrency] == ["1", "8", "poisson:0.4"]
    assert bench.parse_args(["--config", "c.json"]).arrival_requests == 16


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "1,poisson:0"], "poisson:RATE with RATE > 0"),
    (["--concurrency", "poisson:fast"], "poisson:RATE with RATE > 0"),
    (["--concurrency", "1,two"], "whole numbers >= 1 or poisson:RATE"),
    (["--concurrency", "poisson:1", "--arrival-requests", "0"], "--arrival-requests must be at least 1"),
])
def test_bad_levels_are_refused_with_a_message(argv, message, capsys):
    bench = _load_benchmark_module()
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--config", "c.json", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_latency_summary_pools_every_gap_of_every_request():
    """itl_ms_max is the longest gap of any request (here the second one's, a prefill stall in the middle of
    its stream), never below p95; ttft counts from each request's own arrival."""
    bench = _load_benchmark_module()
    arrivals = [100.0, 101.0, 103.0]
    stamps = [
        [100.5 + 0.05 * k for k in range(20)],
        [101.2 + 0.05 * k for k in range(10)] + [101.65 + 1.2 + 0.05 * k for k in range(10)],
        [104.0 + 0.05 * k for k in range(20)],
    ]
    s = bench.latency_summary(arrivals, stamps)
    assert s["itl_ms_max"] == pytest.approx(1200.0)
    assert s["itl_ms_p50"] == pytest.approx(50.0) and s["itl_ms_p95"] == pytest.approx(50.0)
    assert s["itl_ms_max"] >= s["itl_ms_p95"]
    assert s["ttft_s_p50"] == pytest.approx(0.5) and s["ttft_s_p95"] == pytest.approx(0.95)
    empty = bench.latency_summary([0.0], [[]])
    assert all(value != value for value in empty.values())  # (nan: no token came)


def test_a_poisson_level_submits_each_request_at_its_arrival(monkeypatch):
    """run_poisson hands request i to the engine at poisson_arrivals(rate, n, seed)[i] after the start (an
    engine stand-in records when), not all at once, and times its first token from that arrival."""
    import collections
    import time
    import types

    import deepseek_vl2.engine

    bench = _load_benchmark_module()
    submitted: list[float] = []

    class Engine:
        timeline: collections.deque = collections.deque()

        def submit(self, inputs, config, eos_token_id):
            submitted.append(time.perf_counter())

            def tokens():
                for _ in range(config.max_new_tokens):
                    time.sleep(0.01)
                    self.timeline.append(("decode", 1, 0.01))
                    yield 5

            return tokens()

    monkeypatch.setattr(deepseek_vl2.engine, "engine_for", lambda model: Engine())
    model = types.SimpleNamespace(language=types.SimpleNamespace(_cpu_step=lambda: None))
    level, count, seed = bench.PoissonLevel(8.0), 4, 3
    started = time.perf_counter()
    result = bench.run_poisson(model, lambda i: i, level, count, seed, 3, torch.device("cpu"))
    schedule = bench.poisson_arrivals(level.rate, count, seed)
    offsets = [t - started for t in submitted]
    assert len(offsets) == count
    for offset, planned in zip(offsets, schedule):
        assert planned <= offset < planned + 0.15, (offsets, schedule)
    assert result["arrival_rate"] == 8.0 and result["requests"] == count and result["tokens"] == 3 * count
    assert result["arrival_span_s"] == schedule[-1] and result["arrival_seed"] == seed
    assert 0.01 <= result["ttft_s_p50"] < 0.15  # (one 10 ms token after its own arrival, not after the start)
    assert result["itl_ms_max"] >= result["itl_ms_p95"] >= result["itl_ms_p50"] >= 10.0


def test_benchmark_smoke_config():
    cfg = FIXTURES / "checkpoints" / "mla" / "config.json"
    if not cfg.is_file():
        pytest.skip(f"fixture config not found at {cfg}")
    pytest.importorskip("deepseek_vl2.generation")
    result = _run_benchmark("--config", str(cfg), "--concurrency", "1,3,poisson:20", "--arrival-requests", "3")
    assert result["random_weights"] is True
    # (which path was measured: ours, or PyTorch's where our kernels are switched off or failed to build)
    from deepseek_vl2 import kernels

    expected = "f32: in use" if kernels.fp32_extension() is not None else "f32: unavailable ("
    assert result["cpu_kernels"].startswith(expected), result["cpu_kernels"]
    assert result["prompt_tokens"] == 438 and result["n_tiles"] == 2
    # The 384-px image tiles 1x1: its local tile is its global view, so the tower (and the vision bound) runs one.
    assert result["tower_tiles"] == 1
    assert result["prefill_flops"] == bounds.prefill_flops(DeepseekVL2Config.from_json_file(cfg), 438, 1)["total"]
    config = DeepseekVL2Config.from_json_file(cfg).language
    assert list(result["concurrency"]) == ["1", "3", "poisson:20"]
    poisson = result["concurrency"]["poisson:20"]
    assert poisson["arrival_rate"] == 20 and poisson["requests"] == 3 and poisson["arrival_seed"] == 0
    bench = _load_benchmark_module()
    assert poisson["arrival_span_s"] == pytest.approx(bench.poisson_arrivals(20, 3, 0)[-1])
    for level, rows in (("1", 1), ("3", 3), ("poisson:20", 3)):
        c = result["concurrency"][level]
        assert c["tokens"] == 4 * rows and c["decode_tok_s_total"] > 0
        assert c["ttft_s_p95"] >= c["ttft_s_p50"] > 0
        assert c["itl_ms_max"] >= c["itl_ms_p95"] >= c["itl_ms_p50"] > 0
        if "experts_per_layer" in c:  # (where the CPU step kernel decodes)
            assert c["experts_per_layer_independent"] <= bounds.experts_touched(
                config.n_routed_experts, config.num_experts_per_tok, rows) + 1e-9
            assert config.num_experts_per_tok <= c["experts_per_layer"] <= config.num_experts_per_tok * rows
    assert result["concurrency"]["1"]["experts_per_layer"] == config.num_experts_per_tok


def test_bench_rows_smoke_prints_each_row_count_against_its_bound():
    """scripts/bench_rows.py on a fixture config: each row count's rate, and its bound against one row
    (bounds.batch_step_bytes at the run's mean position): 1 for one row, between 1 and B for B rows."""
    from deepseek_vl2 import kernels

    cfg = FIXTURES / "checkpoints" / "mla" / "config.json"
    if not cfg.is_file():
        pytest.skip(f"fixture config not found at {cfg}")
    if kernels.fp32_extension() is None:
        pytest.skip("no C++ compiler/ninja: the fp32 step kernel is what bench_rows times")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_rows.py"), "--config", str(cfg), "--dtype", "float32",
           "--rows", "1,4", "--position", "8", "--steps", "2", "--rounds", "1", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert set(results) == {"rows=1", "rows=4"}
    config = DeepseekVL2Config.from_json_file(cfg)
    one, four = results["rows=1"], results["rows=4"]
    assert one["bound_x_single"] == pytest.approx(1.0)
    context = 8 + 1 * 2 // 2
    expected = 4 * bounds.batch_step_bytes(config, torch.float32, 1, context) / bounds.batch_step_bytes(
        config, torch.float32, 4, context)
    assert four["bound_x_single"] == pytest.approx(expected) and 1.0 < expected < 4.0
    assert four["tok_s"] > 0 and "of bound" in proc.stdout


def test_random_image_tokens_share_no_large_part():
    """decorrelate_image_tokens: the projector's outputs for the benchmark image average to zero, biases
    are zero and the separators are no longer all-ones vectors (else every request's hidden state is
    nearly the same and batched requests share their experts as real ones would not)."""
    from deepseek_vl2.model import build_model

    bench = _load_benchmark_module()
    config = DeepseekVL2Config.from_json_file(FIXTURES / "checkpoints" / "mha" / "config.json")
    model = build_model(config, "cpu", torch.float32, bench.fast_random_init())
    inputs = bench.synthetic_inputs(bench.image_only_processor(config), config, bench.default_image(), 17)

    def features() -> torch.Tensor:
        with torch.inference_mode():
            return model._tile_features(inputs.pixel_values, inputs.images_spatial_crop).flatten(0, -2)

    before = features()
    assert before.mean(0).norm() > 0.5 * before.norm(dim=-1).mean()  # (what it corrects: one shared direction)
    bench.decorrelate_image_tokens(model, inputs, torch.device("cpu"))
    after = features()
    assert after.mean(0).norm() < 1e-4 * after.norm(dim=-1).mean()
    assert all(float(p.abs().max()) == 0.0 for n, p in model.named_parameters() if n.endswith("bias") and "projector" not in n)
    for vector in (model.image_newline, model.view_seperator):
        assert 0 < float(vector.std()) < 0.05


def test_a_dtype_this_cpu_would_emulate_is_refused(monkeypatch):
    """`--dtype bfloat16` on an AVX2-only CPU (our cap stands in for one): a plain message, exit 2, nothing run."""
    from deepseek_vl2 import hardware

    bench = _load_benchmark_module()
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_ISA", "avx2")
    monkeypatch.setattr(hardware, "is_x86", lambda: True)
    monkeypatch.setattr(bench.bounds, "machine_description", lambda: pytest.fail("went on to measure"))
    assert bench.main(["--config", str(REAL_CONFIGS / "deepseek-vl2-tiny.json"), "--dtype", "bfloat16", "--device", "cpu"]) == 2
