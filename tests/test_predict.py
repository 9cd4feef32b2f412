"""predict.py: the Predictor in-process (setup from DEEPSEEK_VL2_WEIGHTS, the six inputs), its CLI, make demo."""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import warnings

import pytest

EOS = "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def predictor(fixtures_dir):
    import predict

    saved = os.environ.get("DEEPSEEK_VL2_WEIGHTS")
    os.environ["DEEPSEEK_VL2_WEIGHTS"] = str(fixtures_dir / "checkpoints" / "mla")
    try:
        p = predict.Predictor()
        p.setup()
    finally:
        if saved is None:
            os.environ.pop("DEEPSEEK_VL2_WEIGHTS", None)
        else:
            os.environ["DEEPSEEK_VL2_WEIGHTS"] = saved
    return p


def test_predict_signature_is_exactly_the_documented_api():
    import predict
    from cog import Path as CogPath

    sig = inspect.signature(predict.Predictor.predict)
    params = list(sig.parameters.values())[1:]
    assert [p.name for p in params] == ["image", "prompt", "top_p", "temperature", "max_length_tokens",
                                        "repetition_penalty"]
    assert [p.annotation for p in params] == [CogPath, str, float, float, int, float]
    assert sig.return_annotation is str
    fields = {p.name: p.default for p in params}
    want = {
        "image": (None, None, None, "Input image file"),
        "prompt": (None, None, None, "Text prompt to guide the model"),
        "top_p": (0.9, 0, 1, "Top-p sampling parameter"),
        "temperature": (0.1, 0, 1, "Temperature for sampling"),
        "max_length_tokens": (2048, 0, 4096, "Maximum number of tokens to generate"),
        "repetition_penalty": (1.1, 0, 2, "Repetition penalty"),
    }
    for name, (default, ge, le, description) in want.items():
        f = fields[name]
        assert (f.default, f.ge, f.le, f.description) == (default, ge, le, description), name


def test_cog_inspector_accepts_the_predictor():
    from cog import _inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        info = _inspector.create_predictor("predict", "Predictor")
    assert list(info.inputs) == ["image", "prompt", "top_p", "temperature", "max_length_tokens", "repetition_penalty"]
    assert info.output.json_type() == {"title": "Output", "type": "string"}


def test_schema_writer_output(project_dir):
    out = subprocess.run([sys.executable, str(project_dir / "scripts" / "write_openapi_schema.py"), "--print"],
                         cwd=project_dir, capture_output=True, text=True, timeout=120, check=True)
    schema = json.loads(out.stdout)
    inp = schema["components"]["schemas"]["Input"]
    assert list(inp["properties"]) == ["image", "prompt", "top_p", "temperature", "max_length_tokens",
                                       "repetition_penalty"]
    assert inp["required"] == ["image", "prompt"]
    assert inp["properties"]["max_length_tokens"]["maximum"] == 4096
    assert schema["components"]["schemas"]["Output"] == {"title": "Output", "type": "string"}
    for path in ("/predictions", "/health-check"):
        assert path in schema["paths"]


def test_golden_answer_through_the_predictor(predictor, fixtures_dir):
    from cog import Path as CogPath

    case = json.loads((fixtures_dir / "cases" / "mla" / "grounding_task" / "case.json").read_text())
    user = case["conversation"][0]
    answer = asyncio.run(predictor.predict(
        image=CogPath(fixtures_dir / "images" / user["images"][0]),
        prompt=user["content"],
        top_p=0.9,
        temperature=0,
        max_length_tokens=len(case["generated_ids"]),
        repetition_penalty=case["generation"]["repetition_penalty"],
    ))
    assert answer == case["generated_text"].replace(EOS, "")


def test_bad_input_raises_a_plain_error(predictor, fixtures_dir):
    from cog import Path as CogPath

    from deepseek_vl2.pipeline import InputError

    with pytest.raises(InputError, match="prompt is empty"):
        asyncio.run(predictor.predict(image=CogPath(fixtures_dir / "images" / "gray_500x300.png"), prompt=" ", top_p=0.9,
                                      temperature=0.1, max_length_tokens=8, repetition_penalty=1.1))


def test_setup_reports_missing_weights_clearly(monkeypatch, tmp_path):
    import predict

    from deepseek_vl2.weights import WeightsError

    monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match="neither an existing directory"):
        predict.Predictor().setup()


def test_dtype_override(monkeypatch, fixtures_dir):
    """DEEPSEEK_VL2_DTYPE is obeyed where the CPU runs that dtype, else refused (tests/test_hardware.py)."""
    import torch

    import predict
    from deepseek_vl2.hardware import UnavailableOnThisCPU, cpu_dtype_unavailable

    monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", str(fixtures_dir / "checkpoints" / "mha"))
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        monkeypatch.setenv("DEEPSEEK_VL2_DTYPE", name)
        p = predict.Predictor()
        if torch.cuda.is_available() or cpu_dtype_unavailable(dtype) is None:
            p.setup()
            assert p.pipeline.dtype == dtype
        else:
            with pytest.raises(UnavailableOnThisCPU, match=f"dtype {name} refused on this CPU"):
                p.setup()


def test_cog_admits_twice_the_clients_served_without_a_refusal(monkeypatch):
    """DEEPSEEK_VL2_MAX_CONCURRENCY is the number of clients served without a 409; Cog's server admits twice
    that (a client's next request may come before Cog has freed its previous slot). Cog's own setting alone
    is what the server admits: half of it is served. A bad value stops with its name."""
    import predict

    monkeypatch.delenv("COG_MAX_CONCURRENCY", raising=False)
    monkeypatch.setenv("DEEPSEEK_VL2_MAX_CONCURRENCY", "8")
    assert predict.max_concurrency() == 8 and predict.server_concurrency(8) == 16
    monkeypatch.setenv("COG_MAX_CONCURRENCY", "16")  # (what make serve passes to the worker beside it)
    assert predict.max_concurrency() == 8
    monkeypatch.delenv("DEEPSEEK_VL2_MAX_CONCURRENCY")
    for admitted, clients in (("16", 8), ("5", 2), ("1", 1)):
        monkeypatch.setenv("COG_MAX_CONCURRENCY", admitted)
        assert predict.max_concurrency() == clients
    for bad in ("0", "eight", "-2"):
        monkeypatch.setenv("COG_MAX_CONCURRENCY", bad)
        with pytest.raises(SystemExit, match="COG_MAX_CONCURRENCY must be a whole number"):
            predict.max_concurrency()
    # what @concurrent tells Cog, read as the module is imported
    assert predict.Predictor.predict.__cog_concurrent_max__ == predict.SERVER_CONCURRENCY == 2 * predict.MAX_CONCURRENCY
    assert predict.StreamingPredictor.predict.__cog_concurrent_max__ == predict.SERVER_CONCURRENCY


def test_setup_warns_of_a_cog_server_that_would_refuse_clients_within_the_concurrency():
    """Under Cog's server, setup names each setting that would give clients within MAX_CONCURRENCY a 409:
    Cog admitting fewer than SERVER_CONCURRENCY, and its request handling on several threads (its slot pool's
    try-lock race). make serve's environment gets no warning."""
    import predict

    right = {"COG_MAX_CONCURRENCY": str(predict.SERVER_CONCURRENCY), "TOKIO_WORKER_THREADS": "1"}
    assert predict.cog_server_warnings(right) == []
    assert predict.cog_server_warnings({**right, "COG_MAX_CONCURRENCY": "7"}) == [
        f"Cog's server admits 7 predictions at once (COG_MAX_CONCURRENCY); with {predict.MAX_CONCURRENCY} clients "
        f"sending one request after another some will get HTTP 409. Set COG_MAX_CONCURRENCY="
        f"{predict.SERVER_CONCURRENCY} (make serve does)."]
    for threads in ({}, {"TOKIO_WORKER_THREADS": "2"}, {"TOKIO_WORKER_THREADS": ""}):
        env = {"COG_MAX_CONCURRENCY": right["COG_MAX_CONCURRENCY"], **threads}
        (warning,) = predict.cog_server_warnings(env)
        assert "TOKIO_WORKER_THREADS=1" in warning and "409" in warning


def test_cli_and_make_demo(project_dir, tmp_path):
    """`make demo`'s two steps: a random checkpoint made here, then one prediction via the real Predictor."""
    model = tmp_path / "demo-model"
    subprocess.run([sys.executable, str(project_dir / "scripts" / "make_random_checkpoint.py"), str(model)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "DEEPSEEK_VL2_WEIGHTS": str(model)}
    out = subprocess.run(
        [sys.executable, "predict.py", "--image", "examples/stages.png", "--prompt",
         "Describe each stage of this <image> in detail.", "--max-length-tokens", "12", "--random-weights-note"],
        cwd=project_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert any(line.startswith("answer: ") for line in out.stdout.splitlines()), out.stdout
    assert "gibberish" in out.stdout and "prediction" in out.stdout
    bad = subprocess.run([sys.executable, "predict.py", "--image", "examples/stages.png", "--prompt", "  "],
                         cwd=project_dir, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "prompt is empty" in bad.stderr
