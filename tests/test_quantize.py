"""Weight-only quantization (deepseek_vl2/quantize.py): the schemes, the arithmetic, the file format against
compressed-tensors' documented pack-quantized layout, quantizing while loading, the ``quantize`` command, the
kernels' integer products, and the refusals (one line each)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES_DIR, PROJECT_DIR
from deepseek_vl2 import bounds, kernels, quantize
from deepseek_vl2.config import DeepseekVL2Config
from deepseek_vl2.model import CheckpointError, load_model
from deepseek_vl2.processor import DeepseekVL2Processor
from deepseek_vl2.quantize import QuantizationError, QuantizedExperts, QuantizedLinear, parse_scheme

CHECKPOINTS = FIXTURES_DIR / "checkpoints"
# The fixtures' widths (64, 80, 96, 112, 128, 24, 32) share no divisor above 8: int4 runs on them in groups of 8.
INT4_FIXTURES = "int4:8"


# --------------------------------------------------------------------------------------------------
# Schemes and config.json

def test_schemes_by_name():
    assert parse_scheme("int8") == quantize.QuantScheme(8) and parse_scheme("INT8").name == "int8"
    assert parse_scheme("int4") == quantize.QuantScheme(4, 64) and parse_scheme("int4").name == "int4"
    assert parse_scheme("int4:32").group_size == 32 and parse_scheme("int4:32").name == "int4:32"
    for off in (None, "", "none"):
        assert parse_scheme(off) is None


@pytest.mark.parametrize("text, words", [("fp8", ["unknown", "int8", "int4"]), ("int4:7", ["even"]),
                                         ("int4:0", ["even"]), ("int3", ["unknown"])])
def test_unknown_schemes_are_refused_by_name(text, words):
    with pytest.raises(QuantizationError) as caught:
        parse_scheme(text)
    assert all(word in str(caught.value) for word in words) and "\n" not in str(caught.value)


def test_the_environment_setting_is_named_in_its_error(monkeypatch):
    monkeypatch.setenv("DEEPSEEK_VL2_QUANTIZE", "int2")
    with pytest.raises(QuantizationError, match="DEEPSEEK_VL2_QUANTIZE: unknown quantization scheme 'int2'"):
        quantize.env_scheme()


@pytest.mark.parametrize("name", ["int8", "int4", "int4:32"])
def test_quantization_config_round_trip(name):
    scheme = parse_scheme(name)
    values = json.loads(json.dumps(quantize.quantization_config(scheme)))
    assert values["quant_method"] == "compressed-tensors" and values["format"] == "pack-quantized"
    weights = values["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == scheme.bits and weights["symmetric"] is True
    assert weights["strategy"] == ("channel" if scheme.bits == 8 else "group")
    assert quantize.scheme_from_config(values) == scheme


@pytest.mark.parametrize("change, words", [
    ({"quant_method": "gptq"}, ["not supported"]),
    ({"format": "float-quantized"}, ["not supported"]),
    ({"weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}}, ["symmetric integer"]),
    ({"weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}}, ["symmetric"]),
    ({"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor"}}, ["not supported"]),
])
def test_unsupported_quantization_configs_are_refused(change, words):
    values = quantize.quantization_config(parse_scheme("int8"))
    if "weights" in change:
        values["config_groups"]["group_0"]["weights"] = change["weights"]
    else:
        values.update(change)
    with pytest.raises(QuantizationError) as caught:
        quantize.scheme_from_config(values, "x/config.json")
    assert "x/config.json" in str(caught.value) and all(w in str(caught.value) for w in words)


# --------------------------------------------------------------------------------------------------
# The arithmetic and the file layout

@pytest.mark.parametrize("name", ["int8", "int4", "int4:32"])
def test_values_are_round_to_nearest_of_the_stored_scale(name):
    scheme = parse_scheme(name)
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.02
    w[3] *= 10  # a row of larger weights
    w[5] = 0  # an all-zero row: a tiny scale, zero values
    packed, scale = quantize.quantize_weight(w, scheme)
    assert packed.dtype == (torch.int8 if scheme.bits == 8 else torch.uint8) and scale.dtype == torch.bfloat16
    assert scale.shape == (48, scheme.groups(256))
    q = quantize.unpack_values(packed, scheme).float()
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax
    group = 256 if scheme.group_size is None else scheme.group_size
    s = scale.float().repeat_interleave(group, dim=1)
    err = (q * s - w).abs()
    # round to nearest (half a step), except the largest positive value, clamped a half step further
    assert bool((err <= s * 0.5 + 1e-12).float().mean() > 0.99) and bool((err <= s * 1.0 + 1e-12).all())
    assert torch.equal(quantize.dequantize(packed, scale, scheme), q * s)
    assert bool((quantize.dequantize(packed, scale, scheme)[5] == 0).all())


def _pack_as_documented(q: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' pack-quantized, from its documentation: values shifted to unsigned (+2**(bits-1)),
    padded to whole int32 words, value i of a word at bits ``bits * i`` (little end first)."""
    per_word = 32 // bits
    unsigned = (q.to(torch.int64) + (1 << (bits - 1))).tolist()
    words = []
    for row in unsigned:
        row = row + [0] * (-len(row) % per_word)
        packed_row = []
        for start in range(0, len(row), per_word):
            word = sum(v << (bits * i) for i, v in enumerate(row[start:start + per_word]))
            packed_row.append(word - (1 << 32) if word >= 1 << 31 else word)
        words.append(packed_row)
    return torch.tensor(words, dtype=torch.int32)


@pytest.mark.parametrize("name, cols", [("int8", 64), ("int8", 70), ("int4", 128), ("int4:8", 72), ("int4:2", 6)])
def test_the_file_layout_is_compressed_tensors_pack_quantized(name, cols):
    scheme = parse_scheme(name)
    torch.manual_seed(1)
    packed, _ = quantize.quantize_weight(torch.randn(5, cols), scheme)
    q = quantize.unpack_values(packed, scheme)
    words = quantize.pack_for_file(packed, scheme)
    assert words.dtype == torch.int32 and words.shape == (5, math.ceil(cols * scheme.bits / 32))
    assert torch.equal(words, _pack_as_documented(q, scheme.bits))
    assert torch.equal(quantize.unpack_from_file(words, scheme, cols), packed)


def test_int4_on_widths_the_group_does_not_divide_is_refused_naming_the_matrix():
    with pytest.raises(QuantizationError) as caught:
        load_model(CHECKPOINTS / "mha", quantize="int4")  # (its MLP has 112 inputs, its experts 32)
    message = str(caught.value)
    assert "language.model.layers.0.mlp.down_proj" in message and "112" in message and "int4:N" in message


# --------------------------------------------------------------------------------------------------
# Loading

@pytest.fixture(scope="module")
def case():
    """A golden case's inputs (text only, so every checkpoint's run is quick)."""
    path = FIXTURES_DIR / "cases" / "mla-noaux" / "text_only" / "case.json"
    return json.loads(path.read_text())


def _inputs(variant: str, text: str = "Hello, how are you?"):
    return DeepseekVL2Processor.from_pretrained(CHECKPOINTS / variant).process_prompt(text, [])


@pytest.mark.parametrize("variant", ["mha", "mla", "mla-noaux"])
@pytest.mark.parametrize("name", ["int8", INT4_FIXTURES])
def test_quantizing_while_loading_stores_what_the_scheme_makes_of_each_weight(variant, name):
    scheme = parse_scheme(name)
    exact = load_model(CHECKPOINTS / variant)
    model = load_model(CHECKPOINTS / variant, quantize=name)
    quantized = dict(quantize.quantized_targets(model))
    assert quantized and all(m.scheme == scheme for m in quantized.values())
    assert "language.lm_head" in quantized and not any(n.startswith(("vision", "projector")) for n in quantized)
    assert not any(isinstance(m, QuantizedLinear) for m in model.vision.modules())
    layer = model.language.model.layers[-1]
    q_in = layer.self_attn.q_proj if hasattr(layer.self_attn, "q_proj") else layer.self_attn.q_a_proj
    exact_layer = exact.language.model.layers[-1]
    exact_q = exact_layer.self_attn.q_proj if hasattr(exact_layer.self_attn, "q_proj") else exact_layer.self_attn.q_a_proj
    packed, scale = quantize.quantize_weight(exact_q.weight, scheme)
    assert torch.equal(q_in.weight_packed, packed) and torch.equal(q_in.weight_scale, scale)
    experts = layer.mlp.experts
    assert isinstance(experts, QuantizedExperts)
    gate, _, down = experts.expert_matrices(1)
    reference = exact_layer.mlp.experts.swiglu_weights()[1]
    for mine, theirs in ((gate, reference[0][0]), (down, reference[2][0])):
        assert [torch.equal(a, b) for a, b in zip(mine, quantize.quantize_weight(theirs, scheme))] == [True, True]
    # The language weights (but the embedding, the norms and the router) now take the scheme's bytes.
    assert model.language.model.embed_tokens.weight.dtype == exact.language.model.embed_tokens.weight.dtype
    assert layer.mlp.gate.weight.dtype == torch.float32


@pytest.mark.parametrize("variant", ["mha", "mla", "mla-noaux"])
def test_a_quantized_model_is_close_to_the_exact_one(variant):
    """Per position, the logits' error relative to their largest: int8 within a few percent, int4 in groups of 8
    within a few tens (these random checkpoints; a routing choice that flips moves one position further, hence
    the median); the greedy choice mostly the same."""
    inputs = _inputs(variant)
    exact = load_model(CHECKPOINTS / variant).forward_logits(inputs)
    for name, bound, agree in (("int8", 0.03, 0.85), (INT4_FIXTURES, 0.35, 0.5)):
        logits = load_model(CHECKPOINTS / variant, quantize=name).forward_logits(inputs)
        err = (logits - exact).abs().amax(-1) / exact.abs().amax(-1)
        assert err.median().item() < bound, (name, err)
        assert (logits.argmax(-1) == exact.argmax(-1)).float().mean().item() >= agree, name


def test_a_quantized_checkpoint_asked_for_another_scheme_is_refused(tmp_path):
    out = tmp_path / "int8"
    assert _quantize_command("--model", CHECKPOINTS / "mla", "--to", "int8", out).returncode == 0
    with pytest.raises(QuantizationError) as caught:
        load_model(out, quantize=INT4_FIXTURES)
    message = str(caught.value)
    assert "int8" in message and INT4_FIXTURES in message and str(out) in message
    assert load_model(out, quantize="int8") is not None  # (the same scheme, or none: loads)


# --------------------------------------------------------------------------------------------------
# The quantize command

def _quantize_command(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepseek_vl2", "quantize", *map(str, argv)], cwd=PROJECT_DIR,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})


@pytest.mark.parametrize("variant, name", [("mla-noaux", "int8"), ("mha", INT4_FIXTURES)])
def test_the_command_writes_a_checkpoint_that_loads_as_quantizing_while_loading(tmp_path, variant, name):
    out = tmp_path / "quantized"
    run = _quantize_command("--model", CHECKPOINTS / variant, "--to", name, "--shard-gb", "0.0003", out)
    assert run.returncode == 0, run.stderr
    assert "done:" in run.stderr and str(out) in run.stderr
    assert not out.with_name("quantized.partial").exists()
    config = json.loads((out / "config.json").read_text())
    assert quantize.scheme_from_config(config["quantization_config"]) == parse_scheme(name)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)  # (sharded by --shard-gb)
    assert any(key.endswith(".weight_packed") for key in index["weight_map"])
    assert "language.lm_head.weight_packed" in index["weight_map"] and "language.lm_head.weight" not in index["weight_map"]
    for name_ in ("tokenizer.json", "processor_config.json"):
        assert (out / name_).read_bytes() == (CHECKPOINTS / variant / name_).read_bytes()
    inputs = _inputs(variant)
    stored = load_model(out)  # (no setting: the checkpoint's own scheme)
    assert quantize.model_scheme(stored) == parse_scheme(name)
    assert torch.equal(stored.forward_logits(inputs), load_model(CHECKPOINTS / variant, quantize=name).forward_logits(inputs))


@pytest.mark.parametrize("argv, words", [
    (["--to", "fp8"], ["unknown quantization scheme 'fp8'"]),
    (["--to", "int4"], ["mlp.down_proj", "112", "group size 64"]),
    (["--to", "int8", "--shard-gb", "0"], ["--shard-gb must be > 0"]),
])
def test_the_command_refuses_in_one_line(tmp_path, argv, words):
    run = _quantize_command("--model", CHECKPOINTS / "mha", *argv, tmp_path / "out")
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def test_the_command_keeps_existing_directories_and_quantized_sources(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    run = _quantize_command("--model", CHECKPOINTS / "mla", "--to", "int8", taken)
    assert run.returncode == 2 and "already exists and is not empty" in run.stderr
    assert (taken / "keep.txt").read_text() == "mine"
    first = tmp_path / "first"
    assert _quantize_command("--model", CHECKPOINTS / "mla", "--to", "int8", first).returncode == 0
    again = _quantize_command("--model", first, "--to", "int8", tmp_path / "second")
    assert again.returncode == 2 and "already quantized (int8)" in again.stderr


# --------------------------------------------------------------------------------------------------
# The kernels' integer products

@pytest.fixture
def no_tiles():
    """The bf16 kernels without AMX tiles for this test (the vector path: the plain path's bits)."""
    extension = kernels.avx512_bf16_extension()
    before = extension.tiles_min_rows() if extension is not None else 0
    if extension is not None:
        extension.set_tiles(0)
    yield
    if extension is not None:
        extension.set_tiles(before)


def _extensions():
    found = []
    if kernels.avx512_bf16_extension() is not None:
        found.append((kernels.avx512_bf16_extension(), torch.bfloat16, "bf16"))
    if kernels.fp32_extension() is not None:
        found.append((kernels.fp32_extension(), torch.float32, "f32"))
    if not found:
        pytest.skip(f"no CPU kernels here ({kernels.unavailable_reason('f32')})")
    return found


@pytest.mark.parametrize("name, cols", [("int8", 1280), ("int8", 933), ("int8", 70), ("int4", 1280), ("int4", 6848),
                                        ("int4:8", 72), ("int4:32", 320), ("int4:128", 384), ("int4:256", 768),
                                        ("int4:16", 80), ("int4:24", 120)])
def test_integer_products_equal_the_plain_path_and_the_dequantized_weights(name, cols, no_tiles):
    """The vector path (AVX512-VNNI) and the plain one make the same sums bit for bit, whatever the number of
    inputs in the call; both are within the activation limbs' precision of the float product."""
    scheme = parse_scheme(name)
    torch.manual_seed(2)
    w = torch.randn(37, cols) * 0.02
    packed, scale = quantize.quantize_weight(w, scheme)
    reference_weights = quantize.dequantize(packed, scale, scheme).double()
    # The limbs hold each activation within half a step of s = (its block's largest) / (127 * base): blocks of
    # 256 values and base 128 for int8 (two limbs), of 64 and one 8-bit value for int4 (csrc/int8.h, csrc/int4.h).
    run, base = (256, 128) if scheme.bits == 8 else (64, 1)

    def limb_error_bound(x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x.double().abs(), (0, -cols % run)).view(x.shape[0], -1, run)
        step = padded.amax(-1) / (127 * base)  # [inputs, blocks]
        weight_mass = F.pad(reference_weights.abs(), (0, -cols % run)).view(37, -1, run).sum(-1)  # [rows, blocks]
        return 0.5 * step @ weight_mass.T  # [inputs, rows]

    for extension, dtype, suffix in _extensions():
        rows = getattr(extension, f"matrix_rows_{suffix}")
        x = torch.randn(9, cols).to(dtype)
        x[0, 5] = 40.0  # an outlier in one block
        fast, plain = rows(x, [packed, scale], False), rows(x, [packed, scale], True)
        assert torch.equal(fast, plain), (suffix, name)
        for count in (1, 2, 5):
            assert torch.equal(rows(x[:count], [packed, scale], False), fast[:count])
        reference = x.double() @ reference_weights.T
        slack = 1e-5 * reference.abs().amax(-1, keepdim=True)  # (fp32 sums)
        assert bool(((fast.double() - reference).abs() <= limb_error_bound(x) + slack).all()), (suffix, name)
        one = getattr(extension, f"gemv_q_{suffix}")(x[1], [packed, scale])
        assert torch.equal(one, fast[1].to(dtype))


@pytest.mark.parametrize("cols, n", [(1280, 37), (933, 21), (70, 5), (256, 40)])
def test_int8_on_amx_tiles_is_the_sum_and_does_not_depend_on_the_other_inputs(cols, n):
    """Where the CPU has AMX-INT8, the bf16 kernels' int8 products of 3 or more inputs (auto) run on tiles:
    16 weight rows by 15 inputs a tile (a 16th column gives each row's sum of q), tails of rows and of
    columns, and 16 or 40 inputs (several tiles) included. The integer sums are exact, so each result is
    within the limbs' precision of the dequantized product, within fp32 sum order of the vector path's,
    and the same bit for bit alone (on tiles) as among any others."""
    extension = kernels.avx512_bf16_extension()
    if extension is None:
        pytest.skip(f"no bf16 kernels here ({kernels.unavailable_reason('bf16')})")
    before = extension.tiles_min_rows()
    try:
        extension.set_tiles(1)
        if not extension.int8_tiles():
            pytest.skip("no AMX-INT8 here (or tiles are not allowed)")
        scheme = parse_scheme("int8")
        torch.manual_seed(cols)
        packed, scale = quantize.quantize_weight(torch.randn(n, cols) * 0.02, scheme)
        reference_weights = quantize.dequantize(packed, scale, scheme).double()
        x = torch.randn(40, cols).to(torch.bfloat16)
        x[3, 11] = 30.0
        tiles = extension.matrix_rows_bf16(x, [packed, scale], False)
        extension.set_tiles(0)
        vectors = extension.matrix_rows_bf16(x, [packed, scale], False)
        assert not torch.equal(tiles, vectors)  # (another path: the check below can fail)
        assert ((tiles - vectors).abs() <= 1e-5 * vectors.abs().amax(-1, keepdim=True)).all()
        reference = x.double() @ reference_weights.T
        # (the limbs: each activation within half a step of its 256-value block's largest / (127 * 128))
        step = F.pad(x.double().abs(), (0, -cols % 256)).view(40, -1, 256).amax(-1) / (127 * 128)
        mass = F.pad(reference_weights.abs(), (0, -cols % 256)).view(n, -1, 256).sum(-1)
        bound = 0.5 * step @ mass.T + 1e-5 * reference.abs().amax(-1, keepdim=True)
        assert ((tiles.double() - reference).abs() <= bound).all()
        extension.set_tiles(1)
        for first, count in ((0, 1), (0, 3), (5, 15), (0, 16), (7, 1), (20, 20)):
            assert torch.equal(extension.matrix_rows_bf16(x[first:first + count], [packed, scale], False),
                               tiles[first:first + count]), (first, count)
    finally:
        extension.set_tiles(before)


@pytest.mark.parametrize("name", ["int8", "int4", "int4:32"])
def test_a_few_rows_multiply_the_stored_integers(name):
    """2 to 64 rows (a prompt's tokens routed to one expert) through the step's products: each row as the
    products give it alone, and within the activation's precision of the dequantized matrix."""
    scheme = parse_scheme(name)
    packed, scale = quantize.quantize_weight(torch.randn(40, 256) * 0.02, scheme)
    for extension, dtype, suffix in _extensions():
        x = torch.randn(3, 5, 256).to(dtype)
        y = kernels.quantized_rows(x, packed, scale)
        assert y is not None and y.shape == (3, 5, 40) and y.dtype == dtype
        rows = getattr(extension, f"matrix_rows_{suffix}")(x.view(15, 256), [packed, scale], False)
        assert torch.equal(y.view(15, 40), rows.to(dtype))
        reference = F.linear(x.double(), quantize.dequantize(packed, scale, scheme).double())
        assert ((y.double() - reference).abs().max() / reference.abs().max()).item() < 0.02
    assert kernels.quantized_rows(torch.randn(65, 256), packed, scale) is None  # (more rows: dequantized)


@pytest.mark.parametrize("name", ["int8", "int4", "int4:8", "int4:256"])
def test_the_kernels_dequantize_to_the_same_values(name):
    scheme = parse_scheme(name)
    packed, scale = quantize.quantize_weight(torch.randn(33, 512) * 0.02, scheme)
    for dtype in (torch.bfloat16, torch.float32):
        made = kernels.dequantized(packed, scale, dtype)
        if made is None:
            continue  # (no extension built for this dtype here: PyTorch unpacks)
        assert torch.equal(made, quantize.dequantize(packed, scale, scheme, dtype))


def test_non_finite_activations_give_non_finite_results():
    scheme = parse_scheme("int8")
    packed, scale = quantize.quantize_weight(torch.randn(4, 256), scheme)
    for extension, dtype, suffix in _extensions():
        x = torch.randn(2, 256).to(dtype)
        x[0, 7] = float("inf")
        x[1, 9] = float("nan")
        out = getattr(extension, f"matrix_rows_{suffix}")(x, [packed, scale], False)
        assert bool(torch.isnan(out).all()), out


def test_the_products_are_the_same_on_every_cpu_kind(tmp_path):
    """The fp32 extension built for this CPU (AVX512-VNNI where it has it) and built as on an AVX2-only CPU
    (DEEPSEEK_VL2_CPU_ISA=avx2: the plain C++ path, the limbs prepared without vectors) give the same bits."""
    script = (
        "import sys, torch\n"
        "from deepseek_vl2 import quantize as q, kernels\n"
        "torch.manual_seed(0)\n"
        "f = kernels.fp32_extension()\n"
        "assert f is not None, kernels.unavailable_reason('f32')\n"
        "out = {}\n"
        "for name, cols in [('int8', 1280), ('int8', 933), ('int4', 896), ('int4:8', 72), ('int4:256', 768)]:\n"
        "    s = q.parse_scheme(name); w = torch.randn(21, cols) * 0.02; p, sc = q.quantize_weight(w, s)\n"
        "    x = torch.randn(3, cols); x[0, 3] = 50.0\n"
        "    out[name + str(cols)] = f.matrix_rows_f32(x, [p, sc], False)\n"
        "torch.save(out, sys.argv[1])\n"
    )
    results = _on_every_cpu_kind(script, tmp_path)
    assert all(torch.equal(results["native"][k], results["avx2"][k]) for k in results["native"])


def _on_every_cpu_kind(script: str, tmp_path: Path, *args: str) -> dict:
    """What ``script`` saves to the path in its argv[1] (then ``args``), run with the fp32 extension built for
    this CPU ("native") and built as on an AVX2-only CPU ("avx2", DEEPSEEK_VL2_CPU_ISA=avx2)."""
    if os.environ.get("DEEPSEEK_VL2_CPU_KERNEL") == "0":
        pytest.skip("our CPU kernels are switched off (DEEPSEEK_VL2_CPU_KERNEL=0)")
    results = {}
    for kind, extra in (("native", {}), ("avx2", {"DEEPSEEK_VL2_CPU_ISA": "avx2"})):
        env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR), **extra}
        run = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{kind}.pt"), *args], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        results[kind] = torch.load(tmp_path / f"{kind}.pt")
    return results


def test_mla_query_absorption_on_int4_groups_of_16_is_the_same_on_every_cpu_kind(tmp_path):
    """kv_b in int4 groups of 16 (whole vectors of one scale: int4_rows_axpy's vector path, csrc/int4.h; the
    fixtures' groups of 8 go row by row): an fp32 MLA model decoding token by token gives the same bits from
    the extension built for this CPU and the one built as for an AVX2-only CPU (the plain loop), and stays
    near the eager layers on the same weights (the kernels' 8-bit activations: ~5 % of the largest logit on
    these random weights)."""
    script = (
        "import json, sys, torch\n"
        "from deepseek_vl2 import kernels\n"
        "from deepseek_vl2.config import DeepseekVL2Config\n"
        "from deepseek_vl2.model import build_model, random_init\n"
        "assert kernels.fp32_extension() is not None, kernels.unavailable_reason('f32')\n"
        "values = json.loads(open(sys.argv[2]).read())\n"
        "values['language_config'].update({'moe_intermediate_size': 32})  # (the fixture's 24: no groups of 16)\n"
        "config = DeepseekVL2Config.from_dict(values)\n"
        "language = build_model(config, 'cpu', torch.float32, random_init(std=0.2, seed=1), quantize='int4:16').language\n"
        "language.setup_cache(16, batch=1)\n"
        "ids = [5, 9, 17, 3, 11, 7]\n"
        "with torch.inference_mode():\n"
        "    steps = torch.stack([language.decode_rows_cpu([t], [p], [0])[0].clone() for p, t in enumerate(ids)])\n"
        "    eager = language(language.model.embed_tokens(torch.tensor([ids])))[0, -1]\n"
        "torch.save({'steps': steps, 'eager': eager}, sys.argv[1])\n"
    )
    results = _on_every_cpu_kind(script, tmp_path, str(CHECKPOINTS / "mla" / "config.json"))
    assert torch.equal(results["native"]["steps"], results["avx2"]["steps"])
    last, eager = results["native"]["steps"][-1], results["native"]["eager"]
    assert ((last - eager).abs().max() / eager.abs().max()).item() < 0.1


@pytest.mark.parametrize("variant", ["mha", "mla", "mla-noaux"])
@pytest.mark.parametrize("name", ["int8", INT4_FIXTURES])
def test_quantized_decoding_is_the_same_alone_and_in_company(variant, name):
    """The whole-step kernel on quantized weights: a row's logits are bit-identical whatever the other rows
    (fp32), and close to the eager layers on the dequantized weights."""
    model = load_model(CHECKPOINTS / variant, quantize=name)
    language = model.language
    language.setup_cache(64, batch=4)
    if language.decode_rows_cpu([1], [0], [0]) is None:
        pytest.skip(f"no whole-step kernel here ({kernels.unavailable_reason('f32')})")
    torch.manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,)).tolist() for n in (5, 9, 7, 3)]
    for slot, ids in enumerate(prompts):  # each prompt into its own slot, token by token
        for position, token in enumerate(ids[:-1]):
            language.decode_rows_cpu([token], [position], [slot])
    alone = [language.decode_rows_cpu([ids[-1]], [len(ids) - 1], [slot]).clone() for slot, ids in enumerate(prompts)]
    together = language.decode_rows_cpu([ids[-1] for ids in prompts], [len(ids) - 1 for ids in prompts], [0, 1, 2, 3])
    for slot in range(4):
        assert torch.equal(alone[slot][0], together[slot]), slot
    embeds = language.model.embed_tokens(torch.tensor(prompts[1]).view(1, -1))
    eager = language(embeds)[0, -1]
    err = ((alone[1][0] - eager).abs().max() / eager.abs().max()).item()
    if name == "int8":  # (its two activation limbs: within 2**-15 of each block's largest value)
        assert err < 2e-3, err
    else:  # (one 8-bit value per activation: a small part of what the 4-bit weights themselves move)
        exact = load_model(CHECKPOINTS / variant).language(embeds)[0, -1]
        weights_err = ((eager - exact).abs().max() / exact.abs().max()).item()
        assert err < 0.25 * weights_err, (err, weights_err)


def test_quantized_models_decode_with_the_kernels_switched_off(tmp_path):
    """PyTorch's paths alone (no compiler, DEEPSEEK_VL2_CPU_KERNEL=0): _weight_int8pack_mm for int8 rows, the
    dequantized weights for int4, and the same greedy answer as the kernels within their precision."""
    script = (
        "import sys, torch\n"
        "from deepseek_vl2 import kernels\n"
        "from deepseek_vl2.engine import generate\n"
        "from deepseek_vl2.generation import GenerationConfig\n"
        "from deepseek_vl2.model import load_model\n"
        "from deepseek_vl2.processor import DeepseekVL2Processor\n"
        f"path = {str(CHECKPOINTS / 'mla-noaux')!r}\n"
        "assert kernels.fp32_extension() is None\n"
        "for name in ('int8', 'int4:8'):\n"
        "    model = load_model(path, quantize=name)\n"
        "    inputs = DeepseekVL2Processor.from_pretrained(path).process_prompt('Hello there', [])\n"
        "    print(name, generate(model, inputs, GenerationConfig(max_new_tokens=6), eos_token_id=-1))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR), "DEEPSEEK_VL2_CPU_KERNEL": "0"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    assert set(lines) == {"int8", "int4:8"} and all(len(json.loads(v)) == 6 for v in lines.values())


def test_int8_single_rows_outside_the_kernels_go_through_pytorchs_int8_op(monkeypatch):
    packed, scale = quantize.quantize_weight(torch.randn(64, 128), parse_scheme("int8"))
    monkeypatch.setattr(kernels, "_layer_extension", lambda dtype: None)
    x = torch.randn(128)
    called = []
    original = torch.ops.aten._weight_int8pack_mm

    class Spy:
        def __call__(self, *args):
            called.append(True)
            return original(*args)

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", Spy())
    y = kernels.quantized_gemv(x, packed, scale)
    assert called and torch.allclose(y, F.linear(x, quantize.dequantize(packed, scale, parse_scheme("int8"))), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Bytes and memory

def test_bounds_count_the_quantized_bytes():
    config = DeepseekVL2Config.from_json_file(FIXTURES_DIR / "real-configs" / "deepseek-vl2-tiny.json")
    dense = bounds.decode_bytes_per_token(config, torch.bfloat16)
    int8 = bounds.decode_bytes_per_token(config, torch.bfloat16, scheme=parse_scheme("int8"))
    int4 = bounds.decode_bytes_per_token(config, torch.bfloat16, scheme=parse_scheme("int4"))
    for part in ("routed_experts", "shared_experts", "lm_head", "dense_mlp"):
        assert int8[part] == pytest.approx(dense[part] / 2, rel=0.01)
        assert int4[part] == pytest.approx(dense[part] * (0.5 + 2 / 64) / 2, rel=0.01)
    for part in ("router", "norms", "embedding_row"):
        assert int8[part] == dense[part] == int4[part]
    base = DeepseekVL2Config.from_json_file(FIXTURES_DIR / "real-configs" / "deepseek-vl2.json")
    assert 15e9 < bounds.weight_bytes(base, torch.bfloat16, scheme=parse_scheme("int4")) < 16.5e9
    with torch.device("meta"):
        from deepseek_vl2.model import DeepseekVL2

        model = DeepseekVL2(config)
        quantize.quantize_modules(model.language, parse_scheme("int4"))
    # (the quantized values a byte each, their bf16 scales two; every other weight in bf16, as weight_bytes counts)
    stored = sum(p.numel() * (1 if p.dtype in (torch.int8, torch.uint8) else 2) for p in model.parameters())
    assert stored == bounds.weight_bytes(config, torch.bfloat16, scheme=parse_scheme("int4"))


def test_quantizing_tiny_while_loading_stays_within_the_quantized_size_plus_2_gb(tmp_path):
    """A full-size tiny checkpoint (6.7 GB of bf16 on disk, random weights) loaded as int8 in a fresh process:
    its peak RSS stays within the quantized model's size + 2 GB (no whole bf16 copy is ever held)."""
    ckpt = tmp_path / "tiny"
    make = subprocess.run([sys.executable, str(PROJECT_DIR / "scripts" / "make_random_checkpoint.py"), str(ckpt), "--config",
                           str(FIXTURES_DIR / "real-configs" / "deepseek-vl2-tiny.json")], capture_output=True, text=True,
                          timeout=900)
    assert make.returncode == 0, make.stderr[-2000:]
    script = (
        "import resource, sys, torch\n"
        "from deepseek_vl2.model import load_model\n"
        "model = load_model(sys.argv[1], dtype=torch.bfloat16, quantize='int8')\n"
        "size = sum(p.numel() * p.element_size() for p in model.parameters())\n"
        "print(size, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(ckpt)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
    assert run.returncode == 0, run.stderr[-2000:]
    size, peak = map(int, run.stdout.split())
    assert 3.5e9 < size < 4.5e9, size
    assert peak <= size + 2e9, (peak / 1e9, size / 1e9)


# --------------------------------------------------------------------------------------------------
# Serving

def test_the_server_serves_the_documented_api_with_int8_weights(project_dir, fixtures_dir, tmp_path):
    from cog_server import golden_request, make_serve

    request, _, _ = golden_request(fixtures_dir, "mla", "grounding")
    with make_serve("serve", project_dir, tmp_path / "server.log", DEEPSEEK_VL2_QUANTIZE="int8",
                    DEEPSEEK_VL2_WEIGHTS=str(fixtures_dir / "checkpoints" / "mla")) as server:
        resp = server.predict(request)
        assert "weights in int8" in server.logs(), server.logs()  # (setup's line: the model as loaded)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["status"] == "succeeded" and isinstance(body["output"], str) and body["output"], body
        inputs = server_schema_inputs(server)
        assert inputs == {"image", "prompt", "top_p", "temperature", "max_length_tokens", "repetition_penalty"}


def server_schema_inputs(server) -> set[str]:
    import requests

    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    return set(schema["components"]["schemas"]["Input"]["properties"])


@pytest.mark.parametrize("variant, setting, words", [
    ("mla", "int2", ["DEEPSEEK_VL2_QUANTIZE: unknown quantization scheme 'int2'"]),
    ("mha", "int4", ["language.model.layers.0.mlp.down_proj", "112 inputs are not a multiple of the group size 64"]),
])
def test_a_bad_setting_fails_the_setup_with_its_line(project_dir, fixtures_dir, tmp_path, variant, setting, words):
    from cog_server import make_serve

    with make_serve("serve", project_dir, tmp_path / "server.log", expect="SETUP_FAILED", DEEPSEEK_VL2_QUANTIZE=setting,
                    DEEPSEEK_VL2_WEIGHTS=str(fixtures_dir / "checkpoints" / variant)) as server:
        logs = server.health()["setup"]["logs"]
    assert all(word in logs for word in words), logs[-2000:]


def test_the_command_line_takes_quantize_and_refuses_bad_schemes(fixtures_dir):
    from deepseek_vl2 import cli

    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        code = cli.main([str(a) for a in argv], stdin=io.StringIO(""), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    code, out, err = run("--model", fixtures_dir / "checkpoints" / "mla", "--prompt", "Hello", "--quantize", "int8",
                         "--temperature", "0", "--max-new-tokens", "5")
    assert code == 0 and out.strip() and "weights in int8" in err, err
    code, out, err = run("--model", fixtures_dir / "checkpoints" / "mla", "--prompt", "Hello", "--quantize", "int8",
                         "--temperature", "0", "--max-new-tokens", "5", "--json")
    assert code == 0 and json.loads(out)["quantize"] == "int8", out
    code, out, err = run("--model", fixtures_dir / "checkpoints" / "mla", "--prompt", "Hello", "--temperature", "0",
                         "--max-new-tokens", "5", "--json")
    assert code == 0 and json.loads(out)["quantize"] is None, out
    code, _, err = run("--model", fixtures_dir / "checkpoints" / "mla", "--prompt", "Hello", "--quantize", "int5")
    assert code == 2 and err.count("error:") == 1 and "--quantize int5: unknown quantization scheme" in err, err
