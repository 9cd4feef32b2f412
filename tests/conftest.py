"""Shared test fixtures: where the golden fixtures live, and the project root.

The fixtures root is ``$DEEPSEEK_VL2_FIXTURES``, else ``<project>/../shared/fixtures``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

FIXTURES_DIR = Path(os.environ.get("DEEPSEEK_VL2_FIXTURES", PROJECT_DIR.parent / "shared" / "fixtures")).resolve()


@pytest.fixture(scope="session")
def project_dir() -> Path:
    return PROJECT_DIR


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES_DIR.is_dir():
        pytest.fail(f"golden fixtures not found at {FIXTURES_DIR} (set DEEPSEEK_VL2_FIXTURES)")
    return FIXTURES_DIR
