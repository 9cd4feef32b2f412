"""The fit check: a model that does not fit says so before loading (never an out-of-memory traceback)."""
from __future__ import annotations

import pytest
import torch

from deepseek_vl2 import bounds
from deepseek_vl2.config import DeepseekVL2Config
from deepseek_vl2.memory import DoesNotFitError, check_fits, check_model_fits, memory_budget


def test_the_budget_caps_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    free, total = memory_budget(torch.device("cpu"))
    assert 0 < free <= total
    monkeypatch.setenv("DEEPSEEK_VL2_MEMORY_BUDGET_GB", "1.5")
    assert memory_budget(torch.device("cpu"))[0] == min(free, 1_500_000_000)
    monkeypatch.setenv("DEEPSEEK_VL2_MEMORY_BUDGET_GB", "lots")
    with pytest.raises(ValueError, match="DEEPSEEK_VL2_MEMORY_BUDGET_GB"):
        memory_budget(torch.device("cpu"))


def test_the_message_names_the_model_the_need_and_the_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSEEK_VL2_MEMORY_BUDGET_GB", "20")
    check_fits("m", {"weights": 19 * 10**9}, torch.device("cpu"))  # fits: nothing raised
    with pytest.raises(DoesNotFitError) as err:
        check_fits("deepseek-vl2-small", {"weights": 33 * 10**9, "working memory": 2 * 10**9}, torch.device("cpu"))
    message = str(err.value)
    assert "deepseek-vl2-small does not fit on cpu" in message
    assert "about 35.0 GB (weights 33.0 GB + working memory 2.0 GB)" in message
    assert "20.0 GB of" in message and "GB is free" in message


def test_the_real_models_need_what_their_weights_say(fixtures_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """base in bf16 (27.5 B parameters, 55 GB) does not fit a 48 GB budget; tiny (3.4 B) fits in 16 GB."""
    base = DeepseekVL2Config.from_json_file(fixtures_dir / "real-configs" / "deepseek-vl2.json")
    tiny = DeepseekVL2Config.from_json_file(fixtures_dir / "real-configs" / "deepseek-vl2-tiny.json")
    monkeypatch.setenv("DEEPSEEK_VL2_MEMORY_BUDGET_GB", "48")
    with pytest.raises(DoesNotFitError, match=r"deepseek-vl2 does not fit .*weights 5\d\.\d GB"):
        check_model_fits("deepseek-vl2", base, torch.device("cpu"), torch.bfloat16)
    if memory_budget(torch.device("cpu"))[0] >= 16e9:
        monkeypatch.setenv("DEEPSEEK_VL2_MEMORY_BUDGET_GB", "16")
        check_model_fits("deepseek-vl2-tiny", tiny, torch.device("cpu"), torch.bfloat16)
    assert bounds.weight_bytes(base, torch.bfloat16) > 50e9


def test_loading_a_model_that_does_not_fit_fails_before_loading(fixtures_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepseek_vl2.pipeline as pipeline

    loaded = []
    monkeypatch.setattr("deepseek_vl2.model.load_model", lambda *a, **k: loaded.append(a))
    monkeypatch.setenv("DEEPSEEK_VL2_MEMORY_BUDGET_GB", "0.001")
    with pytest.raises(DoesNotFitError, match=r"^mha does not fit on cpu: it needs about .* \(weights "):
        pipeline.VL2Pipeline.load(fixtures_dir / "checkpoints" / "mha")
    assert not loaded


def test_setup_fails_when_the_asked_concurrency_does_not_fit(fixtures_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    import predict

    monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", str(fixtures_dir / "checkpoints" / "mha"))
    monkeypatch.setattr(predict, "MAX_CONCURRENCY", 100_000)
    monkeypatch.setenv("DEEPSEEK_VL2_MAX_CONCURRENCY", "100000")
    with pytest.raises(DoesNotFitError, match=r"cache for 100000 requests at 4096 tokens"):
        predict.Predictor().setup()


def test_the_server_reports_setup_failed_with_the_message(project_dir, fixtures_dir, tmp_path) -> None:
    from cog_server import make_serve

    with make_serve("serve", project_dir, tmp_path / "server.log", expect="SETUP_FAILED",
                    DEEPSEEK_VL2_WEIGHTS=str(fixtures_dir / "checkpoints" / "mha"),
                    DEEPSEEK_VL2_MEMORY_BUDGET_GB="0.001") as server:
        logs = server.health()["setup"]["logs"]
    assert "mha does not fit on cpu: it needs about" in logs and "is free" in logs
    assert "CUDA out of memory" not in logs
