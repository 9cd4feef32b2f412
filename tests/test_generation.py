"""Generation: sampling maths, cache consistency, stopping, seeds, context limits."""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

from conftest import FIXTURES_DIR
from deepseek_vl2.engine import generate, generate_stream
from deepseek_vl2.generation import (
    GenerationConfig,
    apply_repetition_penalty,
    decode_one_token,
    prefill,
    sample,
    sampling_probs,
)
from deepseek_vl2.model import load_model
from deepseek_vl2.processor import DeepseekVL2Processor


@functools.lru_cache(maxsize=None)
def _load(variant: str):
    path = FIXTURES_DIR / "checkpoints" / variant
    return DeepseekVL2Processor.from_pretrained(path), load_model(path)


def _inputs(processor: DeepseekVL2Processor, text: str = "<image>\nDescribe this image.", size=(500, 300)):
    image = Image.new("RGB", size, (200, 40, 40))
    return processor.process_prompt(text, [image])


def test_repetition_penalty_follows_hugging_face() -> None:
    logits = torch.tensor([2.0, -2.0, 3.0, -1.0])
    seen = torch.tensor([True, True, False, False])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([1.0, -4.0, 3.0, -1.0]))


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = sampling_probs(probs.log(), temperature=1.0, top_p=0.8, top_k=0)
    assert torch.allclose(out, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)
    # top_p so small that nothing would survive: the most likely token always stays.
    assert torch.equal(sampling_probs(probs.log(), 1.0, 1e-6, 0), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # top-k then renormalise
    assert torch.allclose(sampling_probs(probs.log(), 1.0, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_temperature_sharpens() -> None:
    logits = torch.tensor([1.0, 0.0])
    assert sampling_probs(logits, 0.5, 1.0, 0)[0] > sampling_probs(logits, 1.0, 1.0, 0)[0]


@pytest.mark.parametrize("variant", ["mha", "mla", "mla-noaux"])
def test_cached_decoding_matches_full_forward(variant: str) -> None:
    """Logits of prefill + step-by-step decode equal one full causal forward over the same tokens."""
    processor, model = _load(variant)
    inputs = _inputs(processor)
    greedy = generate(model, inputs, GenerationConfig(max_new_tokens=6), processor.eos_id)
    language = model.language
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(inputs)
        prompt_len = embeds.shape[1]
        language.setup_cache(prompt_len + len(greedy))
        step_logits = [prefill(language, embeds)]
        for i, token in enumerate(greedy[:-1]):  # (the token as a plain int or as a 0-d tensor, in turn)
            step_logits.append(decode_one_token(language, token if i % 2 else torch.tensor(token), prompt_len + i))
        full_embeds = torch.cat([embeds, language.model.embed_tokens(torch.tensor([greedy[:-1]]))], dim=1)
        full = language(full_embeds)[0, prompt_len - 1 :]
    assert torch.allclose(torch.stack(step_logits), full, atol=1e-4, rtol=1e-4)


def test_decode_one_token_takes_an_int_without_the_step_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager layers (no whole-step kernel) decode a plain int id as they decode a 0-d tensor."""
    processor, model = _load("mha")
    language = model.language
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(_inputs(processor))
        language.setup_cache(embeds.shape[1] + 1)
        prefill(language, embeds)
        monkeypatch.setattr(language, "decode_rows_cpu", lambda tokens, positions, slots: None)
        from_int = decode_one_token(language, 7, embeds.shape[1])
        from_tensor = decode_one_token(language, torch.tensor(7), embeds.shape[1])
    assert torch.equal(from_int, from_tensor)


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    processor, model = _load("mha")
    inputs = _inputs(processor)
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0, seed=123)
    first = generate(model, inputs, config, processor.eos_id)
    assert generate(model, inputs, config, processor.eos_id) == first
    others = {tuple(generate(model, inputs, GenerationConfig(8, 1.0, 1.0, top_k=0, seed=s), processor.eos_id)) for s in range(4)}
    assert len(others | {tuple(first)}) > 1


def test_greedy_when_temperature_or_top_p_is_zero() -> None:
    processor, model = _load("mla")
    inputs = _inputs(processor)
    greedy = generate(model, inputs, GenerationConfig(max_new_tokens=6), processor.eos_id)
    assert generate(model, inputs, GenerationConfig(6, temperature=0.0, top_p=0.9), processor.eos_id) == greedy
    assert generate(model, inputs, GenerationConfig(6, temperature=0.7, top_p=0.0), processor.eos_id) == greedy


def test_stops_at_eos_without_returning_it() -> None:
    processor, model = _load("mha")
    inputs = _inputs(processor)
    greedy = generate(model, inputs, GenerationConfig(max_new_tokens=5), processor.eos_id)
    # Declare the third greedy token to be the end-of-sentence id: generation must stop before it.
    assert generate(model, inputs, GenerationConfig(max_new_tokens=5), eos_token_id=greedy[2]) == greedy[:2]


def test_max_new_tokens_zero_and_clamping_to_context() -> None:
    processor, model = _load("mha")
    inputs = _inputs(processor)
    assert generate(model, inputs, GenerationConfig(max_new_tokens=0), processor.eos_id) == []
    context = model.config.language.max_position_embeddings
    prompt_len = inputs.input_ids.shape[0]
    model.config.language.max_position_embeddings = prompt_len + 3
    try:
        tokens = list(generate_stream(model, inputs, GenerationConfig(max_new_tokens=50), eos_token_id=-1))
        assert len(tokens) == 3
        model.config.language.max_position_embeddings = prompt_len
        with pytest.raises(ValueError, match="context"):
            generate(model, inputs, GenerationConfig(max_new_tokens=5), processor.eos_id)
    finally:
        model.config.language.max_position_embeddings = context


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_static_decode_step_matches_dynamic(variant: str) -> None:
    """The CUDA-graph step (rows with device-side positions and slots, a fixed attention window) computes the
    same logits."""
    processor, model = _load(variant)
    inputs = _inputs(processor)
    language = model.language
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(inputs)
        prompt_len = embeds.shape[1]
        language.setup_cache(prompt_len + 300)
        token = prefill(language, embeds).argmax()
        dynamic = decode_one_token(language, token, prompt_len)
        static = language.decode_rows(token.view(1), torch.tensor([prompt_len]), torch.tensor([0]), window=prompt_len + 300)[0]
    # Same arithmetic, other summation orders (the CPU step kernel against PyTorch's masked-window rows ops, each
    # vectorised for this CPU): the logits may differ by the reordering bound, and by no more.
    tolerance = fp32_reordering_tolerance(language.config, context=prompt_len + 1) * dynamic.abs().max().item()
    difference = (dynamic - static).abs().max().item()
    assert difference <= tolerance, f"logits differ by {difference:.2e}, more than summation order explains ({tolerance:.2e})"


def fp32_reordering_tolerance(lang, context: int) -> float:
    """How far, relative to the results' magnitude, two fp32 computations of a decode step (language config
    ``lang``) that differ only in the order of their sums may disagree: accumulation length x epsilon. A sum
    of n terms in any order is within (n - 1) u sum|terms| of the exact sum (u = eps / 2, Higham's bound),
    so two orders are within about n eps of each other; n is the longest sum in the step: a projection's
    input width (hidden size, intermediate sizes, attention output, latent rank) or the attended context.
    (The issue saw 1e-4 on logits of ~20 on an AVX2 CPU, 5e-6 relative; the bound for the fixtures' 631
    context positions is 7.5e-5; a wrong mask or position moves logits by far more.)"""
    widths = [lang.hidden_size, lang.intermediate_size, lang.moe_intermediate_size * max(1, lang.n_shared_experts or 1),
              lang.num_attention_heads * (lang.v_head_dim if lang.kv_lora_rank else lang.mha_head_dim),
              lang.kv_lora_rank or 0, context]
    return max(widths) * torch.finfo(torch.float32).eps


def _variant_config(**language_overrides):
    """The mla-noaux fixture's config with language-model overrides (configs the fixtures do not cover)."""
    import json

    from deepseek_vl2.config import DeepseekVL2Config

    values = json.loads((FIXTURES_DIR / "checkpoints" / "mla-noaux" / "config.json").read_text())
    values["language_config"].update(language_overrides)
    return DeepseekVL2Config.from_dict(values)


@pytest.mark.parametrize(
    "overrides",
    [
        {"q_lora_rank": 24},
        {"topk_method": "group_limited_greedy", "scoring_func": "softmax", "n_group": 3, "topk_group": 2, "norm_topk_prob": False},
        {"topk_method": "noaux_tc", "n_group": 2, "topk_group": 1},
        {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 0.707, "mscale_all_dim": 0.707}},
        {"use_mla": False, "num_key_value_heads": 1, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {"moe_layer_freq": 2, "first_k_dense_replace": 1},
    ],
    ids=["q_lora", "group_limited", "noaux_groups", "yarn", "gqa_linear_rope", "moe_every_2nd"],
)
def test_other_configurations_decode_consistently(overrides: dict) -> None:
    """Configurations of the official space beyond the fixtures: cached decoding equals a full forward."""
    from deepseek_vl2.model import build_model, random_init

    config = _variant_config(**overrides)
    model = build_model(config, "cpu", torch.float32, random_init(std=0.2, seed=1))
    language = model.language
    embeds = torch.randn(1, 9, config.language.hidden_size)
    with torch.inference_mode():
        language.setup_cache(16)
        steps = [prefill(language, embeds)]
        tokens = [int(steps[-1].argmax())]
        for i in range(3):
            steps.append(decode_one_token(language, torch.tensor(tokens[-1]), 9 + i))
            tokens.append(int(steps[-1].argmax()))
        full = language(torch.cat([embeds, language.model.embed_tokens(torch.tensor([tokens[:-1]]))], dim=1))[0, 8:]
    assert torch.isfinite(full).all()
    assert torch.allclose(torch.stack(steps), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mha", "mla", "mla-noaux"])
def test_cpu_bf16_decode_kernels_match_the_eager_layers(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 decoding on the CPU through the layer-level kernels (RMSNorm, q/k/v, RoPE + cache + attention,
    router, experts) gives the logits of the same steps through the eager PyTorch layers."""
    from deepseek_vl2 import kernels

    if kernels.avx512_bf16_extension() is None:
        pytest.skip(f"no bf16 kernels, decoding uses the eager layers: {kernels.unavailable_reason('bf16')}")
    model = load_model(FIXTURES_DIR / "checkpoints" / variant, dtype=torch.bfloat16)
    language = model.language
    embeds = torch.randn(1, 40, language.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tokens = [5, 77, 1000, 31]

    def run() -> torch.Tensor:
        with torch.inference_mode():
            language.setup_cache(48)
            steps = [prefill(language, embeds)]
            for i, token in enumerate(tokens):
                steps.append(decode_one_token(language, torch.tensor(token), 40 + i))
        return torch.stack(steps)

    monkeypatch.setenv("DEEPSEEK_VL2_CPU_STEP", "0")  # the per-layer kernels (the whole step: next test)
    available = kernels._fused_extension
    used = []
    monkeypatch.setattr(kernels, "_fused_extension", lambda x: used.append(x) or available(x))
    fused = run()
    assert len(used) >= 5 * len(tokens)  # norms, projections, attention, router, experts of every step
    monkeypatch.setattr(kernels, "_fused_extension", lambda x: None)
    eager = run()
    assert torch.equal(fused[0], eager[0])  # the prefill does not use them
    scale = eager.abs().max().item()
    assert (fused - eager).abs().max().item() < 2e-2 * scale


def _fixture_config(fixture: str, **language_overrides):
    """A fixture checkpoint's config with language-model overrides."""
    import json

    from deepseek_vl2.config import DeepseekVL2Config

    values = json.loads((FIXTURES_DIR / "checkpoints" / fixture / "config.json").read_text())
    values["language_config"].update(language_overrides)
    return DeepseekVL2Config.from_dict(values)


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 0.707, "mscale_all_dim": 0.707}
WHOLE_STEP_CONFIGS = {  # fixture, language overrides
    "fixture": ("mha", {}),  # a dense layer, then MoE layers with shared experts, greedy softmax routing
    "dense_only": ("mha", {"first_k_dense_replace": 3}),
    "moe_every_2nd_no_shared": ("mha", {"first_k_dense_replace": 0, "moe_layer_freq": 2, "n_shared_experts": None}),
    "group_limited": ("mha", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "norm_topk_prob": False}),
    "noaux_tc": ("mha", {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1,
                         "norm_topk_prob": True, "routed_scaling_factor": 2.5}),
    "gqa_bias_linear_rope": ("mha", {"num_key_value_heads": 2, "attention_bias": True, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "mla": ("mla", {}),  # latent attention (small's kind)
    "mla_noaux_q_lora_bias_yarn": ("mla-noaux", {"q_lora_rank": 48, "attention_bias": True, "rope_scaling": YARN}),
}


def _decode(language, embeds: torch.Tensor, tokens: list[int], cache: int = 48) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of the prefill and of each token decoded after it, and the layers' caches."""
    with torch.inference_mode():
        language.setup_cache(cache)
        steps = [prefill(language, embeds)]
        for i, token in enumerate(tokens):
            steps.append(decode_one_token(language, torch.tensor(token), embeds.shape[1] + i))
    return torch.stack(steps), [t.clone() for layer in language.model.layers for t in layer.self_attn.cache.buffers()]


def _skip_without_kernels(dtype: torch.dtype) -> None:
    from deepseek_vl2 import kernels

    if dtype == torch.bfloat16 and kernels.avx512_bf16_extension() is None:
        pytest.skip(f"no bf16 kernels, bf16 decoding uses the eager layers: {kernels.unavailable_reason('bf16')}")
    if dtype == torch.float32 and kernels.fp32_extension() is None:
        pytest.skip(f"no fp32 kernels, fp32 decoding uses the eager layers: {kernels.unavailable_reason('f32')}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(WHOLE_STEP_CONFIGS))
def test_whole_decode_step_kernel_equals_the_layer_kernels(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU decode step as one kernel call (every layer, final norm, LM head) computes what the per-layer
    kernels compute, over the configuration space (plain and latent attention), in bf16 and fp32."""
    from deepseek_vl2 import kernels
    from deepseek_vl2.model import build_model, random_init

    _skip_without_kernels(dtype)
    # the LM head of the per-layer path: our GEMV too
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_GEMV", "avx512bf16" if dtype == torch.bfloat16 else "simdf32")
    monkeypatch.setattr(kernels, "_chosen", {})
    fixture, overrides = WHOLE_STEP_CONFIGS[name]
    config = _fixture_config(fixture, **overrides)
    language = build_model(config, "cpu", dtype, random_init(std=0.2, seed=1)).language
    if "noaux" in name:  # a bias that changes the choice
        for layer in language.model.layers:
            if hasattr(layer.mlp, "gate"):
                bias = layer.mlp.gate.e_score_correction_bias
                bias.data = torch.randn(bias.shape, generator=torch.Generator().manual_seed(4)) * 0.3
    embeds = torch.randn(1, 30, config.language.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    tokens = [5, 77, 1000, 31, 2]
    whole_steps = []
    decode_rows_cpu = language.decode_rows_cpu
    monkeypatch.setattr(language, "decode_rows_cpu", lambda *a: whole_steps.append(decode_rows_cpu(*a)) or whole_steps[-1])
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_STEP", "1")
    whole, whole_caches = _decode(language, embeds, tokens)
    assert len(whole_steps) == len(tokens) and all(logits is not None for logits in whole_steps)
    assert all(logits.known_argmaxes == [int(logits[0].argmax())] for logits in whole_steps)  # (found as they were written)
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_STEP", "0")
    language.cache_version += 1  # (the environment is read when the step is made)
    whole_steps.clear()
    layers, layer_caches = _decode(language, embeds, tokens)
    assert all(logits is None for logits in whole_steps)
    assert torch.isfinite(whole).all()
    # Every layer's arithmetic is the same: the caches (each layer's keys, from its input) agree bit for
    # bit. The logits may differ by a rounding: an LM head this small (< 1 MiB) goes through F.linear on
    # the per-layer path, which sums in another order (and in fp32 the final norm is PyTorch's there).
    assert all(torch.equal(a, b) for a, b in zip(whole_caches, layer_caches))
    if dtype == torch.bfloat16:
        assert ((whole - layers).abs() <= layers.abs() * 2**-7).all()
    else:
        assert (whole - layers).abs().max() <= 1e-5 * layers.abs().max()


def test_whole_decode_step_follows_a_reallocated_cache_and_refuses_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_vl2 import kernels

    if kernels.avx512_bf16_extension() is None:
        pytest.skip(f"no bf16 kernels, decoding uses the eager layers: {kernels.unavailable_reason('bf16')}")
    monkeypatch.delenv("DEEPSEEK_VL2_CPU_STEP", raising=False)
    language = load_model(FIXTURES_DIR / "checkpoints" / "mha", dtype=torch.bfloat16).language
    embeds = torch.randn(1, 20, language.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    small, _ = _decode(language, embeds, [9, 10, 11], cache=24)
    first = language._cpu_step()
    large, _ = _decode(language, embeds, [9, 10, 11], cache=64)  # new cache buffers: a new step
    assert language._cpu_step() is not first and language._cpu_step() is not None
    assert torch.equal(small, large)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        language.decode_step_cpu(language.config.vocab_size, 3)
    with pytest.raises(RuntimeError, match="outside the cache"):
        language.decode_step_cpu(3, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_whole_decode_step_finds_the_first_argmax_of_its_logits(dtype: torch.dtype) -> None:
    """The argmax the step kernel finds while writing the logits (both threads, rows in any order) is
    torch.argmax's: the first index of the maximum, the first NaN if any."""
    _skip_without_kernels(dtype)
    language = load_model(FIXTURES_DIR / "checkpoints" / "mha", dtype=dtype).language
    embeds = torch.randn(1, 12, language.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    head = language.lm_head.weight
    vocab = head.shape[0]
    row = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(3)).to(dtype)
    tied = [3, vocab // 2, vocab - 1]  # in both threads' shares
    with torch.no_grad():
        head.zero_()  # every other logit is exactly 0: ties everywhere
        head[tied] = row
    for flip in (1.0, -1.0):  # the tied rows hold the maximum, or the zeros do (from index 0)
        with torch.no_grad():
            head[tied] = row * flip
        language.cache_version += 1
        logits = _decode(language, embeds, [7])[0][-1]
        step_logits = language.decode_step_cpu(8, embeds.shape[1] + 1)
        assert step_logits.known_argmax == int(step_logits.argmax())
        assert int(logits.argmax()) in (3, 0)
    with torch.no_grad():
        head[[vocab - 2, 5]] = float("nan")
    language.cache_version += 1
    _decode(language, embeds, [7])
    step_logits = language.decode_step_cpu(8, embeds.shape[1] + 1)
    assert step_logits.known_argmax == 5 == int(step_logits.argmax())


def test_whole_decode_step_does_not_apply_to_other_dtypes() -> None:
    for variant in ("mha", "mla"):
        language = load_model(FIXTURES_DIR / "checkpoints" / variant, dtype=torch.float64).language
        language.setup_cache(8)
        assert language.decode_step_cpu(3, 0) is None


@pytest.mark.parametrize("variant", ["mha", "mla", "mla-noaux"])
def test_cpu_fp32_decode_kernels_match_the_eager_layers(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 decoding on the CPU through our kernels (the whole step) gives the logits of the eager PyTorch
    layers, up to summation order."""
    from deepseek_vl2 import kernels

    _skip_without_kernels(torch.float32)
    language = load_model(FIXTURES_DIR / "checkpoints" / variant, dtype=torch.float32).language
    embeds = torch.randn(1, 40, language.config.hidden_size, generator=torch.Generator().manual_seed(0))
    tokens = [5, 77, 1000, 31]
    fused, _ = _decode(language, embeds, tokens)
    monkeypatch.setattr(kernels, "_fused_extension", lambda x: None)
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_STEP", "0")
    language.cache_version += 1
    eager, _ = _decode(language, embeds, tokens)
    assert torch.equal(fused[0], eager[0])  # the prefill does not use them
    assert (fused - eager).abs().max() <= 1e-4 * eager.abs().max()
    assert torch.equal(fused.argmax(-1), eager.argmax(-1))


def test_penalty_by_ids_equals_penalty_by_mask() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([3, 999, 17, 3, 500, 17])  # repeats, as the running history holds them
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[ids] = True
    by_ids = apply_repetition_penalty(logits, ids, 1.3)
    assert torch.equal(by_ids, apply_repetition_penalty(logits, mask, 1.3))
    untouched = ~mask
    assert torch.equal(by_ids[untouched], logits[untouched]) and not torch.equal(by_ids[mask], logits[mask])


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_fast_argmax_returns_the_first_maximum(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_vl2 import generation, kernels
    from deepseek_vl2.generation import _argmax

    if path == "kernel":
        if kernels.fp32_extension() is None:
            pytest.skip(f"no fp32 kernels: {kernels.unavailable_reason('f32')}")
        assert kernels.first_argmax(torch.tensor([1.0, 3.0, 3.0])) == 1
    else:
        monkeypatch.setattr(generation, "first_argmax", lambda values: None)
    generator = torch.Generator().manual_seed(1)
    for size in (129280, 5000, 4097, 10):
        logits = torch.randn(size, generator=generator)
        assert int(_argmax(logits)) == int(logits.argmax())
        for where in ((3, size - 1), (size - 1,), (size // 2, size // 2 + 1, 0)):  # ties, in the tail, ...
            tied = logits.clone()
            tied[list(where)] = 100.0
            assert int(_argmax(tied)) == min(where) == int(tied.argmax())
    with_nan = torch.randn(5000, generator=generator)
    with_nan[4000] = float("nan")
    assert int(_argmax(with_nan)) == int(with_nan.argmax())
    for special in ([float("-inf")] * 5, [1.0, float("inf"), 2.0, float("inf")], [float("-inf"), -1e30, float("nan"), float("nan")]):
        values = torch.tensor(special)
        assert int(_argmax(values)) == int(values.argmax())


def _candidates_from(kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``sample`` take its candidates from our kernels (built here) or from PyTorch."""
    from deepseek_vl2 import generation, kernels

    if not kernel:
        monkeypatch.setattr(generation, "sampling_candidates", lambda *args: None)
    elif kernels.fp32_extension() is None:
        pytest.skip(f"no fp32 kernels: {kernels.unavailable_reason('f32')}")


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_sampling_draws_from_the_same_distribution(ties: bool, kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU shortcut (top-p and the draw over the top-k logits only) samples what the full path
    gives: the empirical distribution over many draws matches ``sampling_probs`` on the whole vocabulary."""
    from deepseek_vl2.generation import sample

    _candidates_from(kernel, monkeypatch)
    logits = torch.randn(3000, generator=torch.Generator().manual_seed(2)) * 2
    if ties:
        logits[torch.topk(logits, 6).indices[-2:]] = logits.max() + 1  # equal 1st/2nd ...
        logits[torch.topk(logits, 5).indices[-1]] = torch.topk(logits, 6).values[-1]  # ... and a tie at the k-th
    config = GenerationConfig(temperature=0.7, top_p=0.8, top_k=5)
    expected = sampling_probs(logits, 0.7, 0.8, 5)
    generator = torch.Generator().manual_seed(3)
    seen = torch.tensor([0])
    counts = torch.bincount(torch.stack([sample(logits, seen, config, generator) for _ in range(4000)]), minlength=3000)
    assert set(counts.nonzero().view(-1).tolist()) <= set(expected.nonzero().view(-1).tolist())
    assert (counts / 4000 - expected).abs().max().item() < 0.03


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_rotary_table_lookup_equals_computing_the_position(variant: str) -> None:
    _, model = _load(variant)
    rotary = model.language.model.rotary
    for dtype in (torch.float32, torch.bfloat16):
        for position in (0, 1, 437, rotary.max_positions - 1):
            looked_up = rotary(torch.tensor([position]), dtype)
            computed = rotary._compute(torch.tensor([position]), dtype)
            assert all(torch.equal(a, b) for a, b in zip(looked_up, computed))


def test_greedy_sampling_reads_the_argmax_the_step_kernel_found() -> None:
    from deepseek_vl2.generation import _argmax

    logits = torch.tensor([0.0, 5.0, 1.0])
    logits.known_argmax = 0  # (what decode_step_cpu attaches; here deliberately not the argmax, to see it used)
    assert int(_argmax(logits)) == 0
    assert int(sample(logits, torch.tensor([1]), GenerationConfig(), None)) == 0
    assert int(_argmax(logits.clone())) == 1  # a copy does not carry it: searched
    assert int(sample(logits, torch.tensor([1]), GenerationConfig(repetition_penalty=10.0), None)) == 2  # penalised copy: 5/10 < 1


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
def test_sampling_bf16_logits_never_sorts_the_vocabulary(kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 logits tie at the k-th value in most steps; the shortcut keeps the tied ones and still runs
    top-p over the candidates only (the full path sorted all 129k logits: ~7 ms a token). Greedy with a
    penalty takes the first of the largest penalised logits."""
    from deepseek_vl2 import generation

    _candidates_from(kernel, monkeypatch)
    sizes = []
    full_path = generation.sampling_probs
    monkeypatch.setattr(generation, "sampling_probs",
                        lambda logits, *args, **kwargs: sizes.append(logits.numel()) or full_path(logits, *args, **kwargs))
    generator = torch.Generator().manual_seed(11)
    config = GenerationConfig(temperature=0.1, top_p=0.9, repetition_penalty=1.1)  # the predictor's defaults
    for _ in range(10):
        logits = (torch.randn(129280, generator=generator) * 3).bfloat16().float()
        seen = torch.randint(0, 129280, (400,), generator=generator)
        drawn = int(sample(logits, seen, config, generator))
        penalised = apply_repetition_penalty(logits, seen, 1.1)
        assert penalised[drawn] >= torch.topk(penalised, 50).values[-1]  # among the candidates
        greedy = int(sample(logits, seen, GenerationConfig(repetition_penalty=1.1), None))
        assert greedy == int(penalised.argmax())
    assert sizes and max(sizes) < 1000
    tied = torch.zeros(129280)
    tied[[5, 70, 900]] = 4.0
    assert int(sample(tied, torch.tensor([5]), GenerationConfig(repetition_penalty=1.1), None)) == 70  # 5 is penalised


@pytest.mark.parametrize("top_p", [1.0, 0.8, 0.3])
def test_the_kernel_draw_samples_the_same_distribution_reproducibly(top_p: float) -> None:
    """``next_token_id`` with our kernels (penalty, candidates, temperature, top-p and the draw in one call)
    draws from ``sampling_probs``' distribution over the whole penalised vocabulary, ties at the k-th
    logit included; a seed repeats its draws."""
    from deepseek_vl2 import kernels
    from deepseek_vl2.generation import next_token_id

    if kernels.fp32_extension() is None:
        pytest.skip(f"no fp32 kernels: {kernels.unavailable_reason('f32')}")
    logits = (torch.randn(3000, generator=torch.Generator().manual_seed(4)) * 2).bfloat16().float()
    logits[torch.topk(logits, 8).indices[-3:]] = torch.topk(logits, 8).values[-3]  # a tie at the 6th..8th values
    seen = torch.topk(logits, 3).indices  # the penalty lowers the three largest
    config = GenerationConfig(temperature=0.7, top_p=top_p, top_k=6, repetition_penalty=1.3)
    expected = sampling_probs(apply_repetition_penalty(logits, seen, 1.3), 0.7, top_p, 6)
    generator = torch.Generator().manual_seed(9)
    draws = [next_token_id(logits, seen, config, generator) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(draws), minlength=3000)
    assert set(counts.nonzero().view(-1).tolist()) <= set(expected.nonzero().view(-1).tolist())
    assert (counts / 4000 - expected).abs().max().item() < 0.03
    again = [next_token_id(logits, seen, config, torch.Generator().manual_seed(9)) for _ in range(1)]
    assert again == draws[:1]
    other_seeds = {tuple(next_token_id(logits, seen, config, g) for _ in range(20))
                   for g in (torch.Generator().manual_seed(s) for s in range(3))}
    assert len(other_seeds) == 3
    assert 0 <= next_token_id(logits, seen, config, None) < 3000  # (the default generator)


def test_graph_decoder_pads_rows_to_their_bucket_with_the_spare_slot() -> None:
    """The CUDA-graph decoder runs B rows in the graph of the smallest power-of-two bucket holding them; the
    extra rows decode into the spare slot (never a request's), and each (bucket, window) has its own graph.
    The capture and replay need a GPU: stand-ins here record what a replay would read."""
    from types import SimpleNamespace

    from deepseek_vl2.generation import CudaGraphDecoder

    replays, captured = [], []
    decoder = CudaGraphDecoder.__new__(CudaGraphDecoder)
    decoder.language = SimpleNamespace(cache_version=0, max_seq_len=4096)
    decoder.cache_version, decoder.spare_slot, decoder.max_bucket, decoder._ready = 0, 8, 8, None
    decoder.rows = torch.zeros(3, 8, dtype=torch.long)
    decoder.graphs = {}

    def capture(bucket: int, window: int):
        captured.append((bucket, window))
        graph = SimpleNamespace(replay=lambda: replays.append(decoder.rows[:, :bucket].tolist()))
        return graph, torch.arange(bucket * 5, dtype=torch.float32).view(bucket, 5)

    decoder._capture = capture
    logits = decoder([17, 4, 9], [300, 12, 40], [2, 0, 5])
    assert logits.shape == (3, 5) and captured == [(4, 512)]
    assert replays[-1] == [[17, 4, 9, 0], [300, 12, 40, 0], [2, 0, 5, 8]]
    decoder([23], [200], [1])
    decoder([24, 5, 10], [301, 13, 41], [2, 0, 5])
    assert captured == [(4, 512), (1, 256)]  # (the same bucket and window again: replayed, not captured)
    assert replays[-1][0] == [24, 5, 10, 0]
    with pytest.raises(ValueError, match="rows exceed"):
        decoder(list(range(9)), [1] * 9, list(range(9)))


def _graph_decoder_on_the_cpu(compiler, logs: list[str]):
    """A CudaGraphDecoder over the mha fixture's model on the CPU, with a stand-in capture: its "graph" runs
    the captured step eagerly into a fixed output buffer (a real capture needs a GPU). Returns the decoder
    and the list of steps it captured."""
    from types import SimpleNamespace

    from deepseek_vl2.generation import CudaGraphDecoder

    _, model = _load("mha")
    language = model.language
    language.setup_cache(600, batch=2)  # (slot 1: the spare slot)
    with torch.inference_mode():
        prefill(language, torch.randn(1, 20, language.config.hidden_size, generator=torch.Generator().manual_seed(3)))
    decoder = CudaGraphDecoder(language, max_rows=1, spare_slot=1, compile=True, compiler=compiler, log=logs.append)
    captured = []

    def capture_with(step, bucket: int, window: int):
        captured.append(step)
        tokens, positions, slots = decoder.rows[:, :bucket]
        out = torch.empty(bucket, language.config.vocab_size)
        return SimpleNamespace(replay=lambda: out.copy_(step(tokens, positions, slots, window))), out

    decoder._capture_with = capture_with
    return decoder, captured


def test_graph_decoder_switches_to_the_step_compiled_in_the_background() -> None:
    """CUDA graphs serve the plain step at once; when the background compile is done, the next step captures
    the compiled one (which computes the same logits); the compile's warm-up touches the spare slot only."""
    import threading

    gate, warmups, logs = threading.Event(), [], []

    def compiler(step):
        gate.wait(timeout=60)

        def compiled(tokens, positions, slots, window):
            warmups.append((tokens.numel(), window, slots.tolist()))
            return step(tokens, positions, slots, window)

        return compiled

    decoder, captured = _graph_decoder_on_the_cpu(compiler, logs)
    language = decoder.language
    with torch.inference_mode():
        plain = decoder([7], [20], [0]).clone()
        assert captured == [language.decode_rows] and not decoder.compiled
        slot0 = language.model.layers[0].self_attn.cache.k[0].clone()
        gate.set()
        decoder.compile_thread.join(timeout=60)
        assert warmups and all(set(slots) == {1} for _, _, slots in warmups)  # (the spare slot only)
        assert [(n, w) for n, w, _ in warmups] == decoder.compile_shapes()
        assert torch.equal(language.model.layers[0].self_attn.cache.k[0], slot0)
        switched = decoder([7], [20], [0]).clone()
    assert decoder.compiled and len(captured) == 2 and captured[1] is not language.decode_rows
    assert torch.equal(switched, plain)
    assert any("compiled in" in line for line in logs)


def test_graph_decoder_serves_on_uncompiled_when_compiling_fails() -> None:
    logs = []

    def failing(step):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    decoder, captured = _graph_decoder_on_the_cpu(failing, logs)
    decoder.compile_thread.join(timeout=60)
    with torch.inference_mode():
        first = decoder([7], [20], [0]).clone()
        second = decoder([9], [21], [0]).clone()
    assert not decoder.compiled and isinstance(decoder.compile_error, RuntimeError)
    assert captured == [decoder.language.decode_rows]  # (one graph, replayed)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert len(logs) == 1 and "torch.compile failed" in logs[0] and "C compiler" in logs[0] and "uncompiled" in logs[0]
