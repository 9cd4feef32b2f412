"""scripts/build_kernels.py (run by `make venv`): builds the kernels this CPU can use, says so, and after it a
setup and a request compile nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES_DIR, PROJECT_DIR
from deepseek_vl2 import kernels


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_it_builds_what_this_cpu_can_use_and_then_no_setup_compiles() -> None:
    strict = ["--strict"] if kernels.kernel_unavailable("f32") is None else []  # (no compiler: strict fails)
    built = _run("scripts/build_kernels.py", *strict)
    assert built.returncode == 0, built.stdout + built.stderr
    libraries = []
    for kind in ("f32", "bf16"):
        line = next(line for line in built.stdout.splitlines() if line.startswith(f"CPU kernels ({kind}):"))
        skip = kernels.kernel_unavailable(kind)
        if skip is None:
            folder = re.search(r"ready in [\d.]+ s \((.+)\)$", line)
            assert folder, line
            libraries += sorted(Path(folder.group(1)).glob("*.so"))
        else:
            assert line.endswith(f"not built: {skip}")
    assert libraries or kernels.kernel_unavailable("f32") is not None
    before = {library: library.stat().st_mtime_ns for library in libraries}

    # A whole predict.py run (setup with its warm-up request, then a request) rebuilds nothing.
    answered = _run("predict.py", "--image", "examples/stages.png", "--prompt", "Describe this <image>.",
                    "--max-length-tokens", "4", env={"DEEPSEEK_VL2_WEIGHTS": str(FIXTURES_DIR / "checkpoints" / "mha")})
    assert answered.returncode == 0, answered.stderr[-2000:]
    assert re.search(r"^setup [\d.]+ s, prediction [\d.]+ s$", answered.stdout, re.M), answered.stdout
    assert {library: library.stat().st_mtime_ns for library in libraries} == before


def test_without_a_compiler_it_says_so_and_only_strict_fails(tmp_path: Path) -> None:
    env = {"CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(tmp_path), "DEEPSEEK_VL2_CPU_KERNEL": "1"}
    relaxed = _run("scripts/build_kernels.py", env=env)
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert "CPU kernels (f32): not built: no C++ compiler to build our kernels ('/nonexistent/c++' not found" in relaxed.stdout
    assert _run("scripts/build_kernels.py", "--strict", env=env).returncode == 1
    off = _run("scripts/build_kernels.py", "--strict", env={"DEEPSEEK_VL2_CPU_KERNEL": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert off.returncode == 0 and off.stdout.count("switched off (DEEPSEEK_VL2_CPU_KERNEL=0)") == 2
    assert not list(tmp_path.rglob("*.so"))
