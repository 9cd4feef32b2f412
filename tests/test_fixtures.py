"""The project's copy of the golden fixtures (``tests/fixtures``) is the team's ``../shared/fixtures``, byte for byte.

The copy lets a clone with nothing beside it run the suite; this keeps it from drifting from the source of
the golden vectors where that source is at hand (on the team's machines and in CI).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import IN_PROJECT_FIXTURES, PROJECT_DIR

SHARED_FIXTURES = PROJECT_DIR.parent / "shared" / "fixtures"


def _digests(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (hidden files included)."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_the_project_carries_its_fixtures() -> None:
    assert (IN_PROJECT_FIXTURES / "README.md").is_file(), f"{IN_PROJECT_FIXTURES} has no README.md"
    assert sorted(IN_PROJECT_FIXTURES.glob("cases/*/*/case.json")), f"no golden cases under {IN_PROJECT_FIXTURES}"


def test_the_copy_equals_the_shared_fixtures() -> None:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"no {SHARED_FIXTURES} beside this checkout to compare the copy with (a standalone clone)")
    shared, ours = _digests(SHARED_FIXTURES), _digests(IN_PROJECT_FIXTURES)
    assert shared, f"{SHARED_FIXTURES} holds no files"
    missing = sorted(set(shared) - set(ours))
    extra = sorted(set(ours) - set(shared))
    changed = sorted(name for name in set(shared) & set(ours) if shared[name] != ours[name])
    assert not (missing or extra or changed), (
        f"tests/fixtures differs from {SHARED_FIXTURES}: missing {missing[:5]}, extra {extra[:5]}, "
        f"changed {changed[:5]} (copy it again: the shared fixtures are the source)"
    )
