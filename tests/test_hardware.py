"""What the CPU can run: the ISA cap, the bf16 dtype probe and its overrides, dtypes asked for.

The CPU's flags are replaced by those of a known CPU (``SAPPHIRE_RAPIDS``) where a test needs them, so every
test here means the same on every machine.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import FIXTURES_DIR
from deepseek_vl2 import hardware
from deepseek_vl2.hardware import UnavailableOnThisCPU

# /proc/cpuinfo flags of an AMX server CPU (abridged to the vector ones and a few others).
SAPPHIRE_RAPIDS = frozenset(
    "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2 avx_vnni avx512f avx512dq avx512ifma avx512cd "
    "avx512bw avx512vl avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg avx512_vpopcntdq avx512_bf16 "
    "avx512_fp16 amx_bf16 amx_tile amx_int8".split()
)


@pytest.fixture
def sapphire_rapids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_reported_cpu_flags", lambda: SAPPHIRE_RAPIDS)
    monkeypatch.setattr(hardware, "is_x86", lambda: True)
    for name in ("DEEPSEEK_VL2_CPU_ISA", "DEEPSEEK_VL2_CPU_BF16"):
        monkeypatch.delenv(name, raising=False)


def test_the_cap_hides_what_an_older_cpu_kind_lacks(sapphire_rapids, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hardware.cpu_flags() == set(SAPPHIRE_RAPIDS)
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_ISA", "avx512")  # Skylake-SP .. Ice Lake: AVX-512, no bf16/fp16/AMX
    avx512 = hardware.cpu_flags()
    assert {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma"} <= avx512
    assert not {"avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx_vnni"} & avx512
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_ISA", "AVX2")  # Zen 1-3, Haswell .. Coffee Lake
    avx2 = hardware.cpu_flags()
    assert {"avx", "avx2", "fma", "f16c", "sse4_2"} <= avx2
    assert not [flag for flag in avx2 if flag.startswith(("avx512", "amx", "avx_vnni"))]
    assert "DEEPSEEK_VL2_CPU_ISA=avx2" in hardware.cap_note()
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_ISA", "sse")
    with pytest.raises(ValueError, match="DEEPSEEK_VL2_CPU_ISA='sse' is not one of native, avx512, avx2"):
        hardware.cpu_flags()


def test_bf16_is_neither_chosen_nor_forced_on_a_cpu_without_it(sapphire_rapids, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = hardware.cpu_bf16_is_fast.__wrapped__  # (the cached one keeps this process's answer)
    monkeypatch.setattr(hardware, "_matmul_seconds", lambda dtype: pytest.fail("timed bf16 on a CPU without it"))
    for cap in ("avx512", "avx2"):
        monkeypatch.setenv("DEEPSEEK_VL2_CPU_ISA", cap)
        assert probe() is False
        monkeypatch.setenv("DEEPSEEK_VL2_CPU_BF16", "1")
        with pytest.raises(UnavailableOnThisCPU, match=rf"DEEPSEEK_VL2_CPU_BF16=1 refused: this CPU has no avx512_bf16 or amx_bf16 \(capped by DEEPSEEK_VL2_CPU_ISA={cap}\)"):
            probe()
        monkeypatch.setenv("DEEPSEEK_VL2_CPU_BF16", "0")
        assert probe() is False
        monkeypatch.delenv("DEEPSEEK_VL2_CPU_BF16")
    assert hardware.default_dtype("cpu") in (torch.float32, torch.bfloat16)  # (the real probe: either is fine)


def test_a_cpu_with_bf16_may_force_it_and_an_odd_value_is_refused(sapphire_rapids, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = hardware.cpu_bf16_is_fast.__wrapped__
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_BF16", "1")
    assert probe() is True
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="use 0 .float32. or 1 .bfloat16."):
        probe()


def test_a_dtype_asked_for_is_refused_where_the_cpu_would_emulate_it(sapphire_rapids, monkeypatch: pytest.MonkeyPatch) -> None:
    hardware.check_cpu_dtype("cpu", torch.bfloat16)  # native here: accepted
    hardware.check_cpu_dtype("cpu", torch.float16)
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_ISA", "avx2")
    hardware.check_cpu_dtype("cpu", torch.float32)
    for dtype, flags in ((torch.bfloat16, "avx512_bf16 or amx_bf16"), (torch.float16, "avx512_fp16 or amx_fp16")):
        with pytest.raises(UnavailableOnThisCPU, match=f"refused on this CPU: this CPU has no {flags}"):
            hardware.check_cpu_dtype("cpu", dtype)
    hardware.check_cpu_dtype("cuda", torch.bfloat16)  # a GPU's dtype is not the CPU's business


def test_loading_refuses_a_dtype_this_cpu_cannot_run_before_reading_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DEEPSEEK_VL2_DTYPE=bfloat16`` on an AVX2 CPU: setup fails at once, saying why and what to use."""
    import predict
    from deepseek_vl2 import model as model_module
    from deepseek_vl2.pipeline import VL2Pipeline

    monkeypatch.setenv("DEEPSEEK_VL2_CPU_ISA", "avx2")
    monkeypatch.setattr(hardware, "is_x86", lambda: True)
    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: pytest.fail("read the weights first"))
    with pytest.raises(UnavailableOnThisCPU, match="bfloat16 would be emulated; use float32"):
        VL2Pipeline.load(FIXTURES_DIR / "checkpoints" / "mha", device="cpu", dtype=torch.bfloat16)
    monkeypatch.setattr(hardware, "default_device", lambda: torch.device("cpu"))  # (on a GPU machine too)
    monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", str(FIXTURES_DIR / "checkpoints" / "mha"))
    monkeypatch.setenv("DEEPSEEK_VL2_DTYPE", "bfloat16")
    with pytest.raises(UnavailableOnThisCPU, match="dtype bfloat16 refused on this CPU"):
        predict.Predictor().setup()


def test_the_libraries_under_pytorch_are_capped_with_ours() -> None:
    """Under ``DEEPSEEK_VL2_CPU_ISA`` (CI's capped run) oneDNN, ATen and MKL must be capped alike, else the
    run would not be the older CPU's: the variables are set, and oneDNN and ATen obey them."""
    cap = hardware.cpu_isa_cap()
    if cap == "native":
        pytest.skip("no DEEPSEEK_VL2_CPU_ISA cap in this run (CI's capped runs check this)")
    expected = hardware.LIBRARY_CAPS[cap]
    assert {name: os.environ.get(name) for name in expected} == expected, "start the process with these set too"
    assert torch.backends.cpu.get_cpu_capability() == expected["ATEN_CPU_CAPABILITY"].upper()
    if cap == "avx2":
        assert not torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN sees no AVX-512


def test_releasing_the_openmp_workers_ends_the_calling_threads_team() -> None:
    """release_openmp_workers: the calling thread's OpenMP worker threads exit (so that the engine's team
    is the only one and keeps spinning between ops); a thread without a team releases nothing and fails
    nothing."""
    import threading
    import time

    if hardware._gnu_openmp() is None:
        pytest.skip("PyTorch did not load GNU OpenMP (libgomp) here")
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no OpenMP team to release")
    threads = torch.get_num_threads()

    def os_threads() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    def gone(team: set[str]) -> set[str]:
        deadline = time.monotonic() + 5
        while team & os_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        return team & os_threads()

    found: dict[str, object] = {}

    def in_a_thread() -> None:
        torch.set_num_threads(threads)
        before = os_threads()
        torch.ones(1 << 22).mul_(2)  # (a parallel op: this thread gets a team)
        found["team"] = team = os_threads() - before
        found["released"] = hardware.release_openmp_workers()
        found["left"] = gone(team)
        found["released again"] = hardware.release_openmp_workers()

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert len(found["team"]) == threads - 1, found
    assert found["released"] is True and found["released again"] is True
    assert found["left"] == set(), found
