"""The project's copies of the team's shared test data are that data, byte for byte: ``tests/fixtures`` (the
golden vectors, ``../shared/fixtures``) and ``tests/cog`` (Cog's cog.yaml schema, ``../shared/cog``).

The copies let a clone with nothing beside it run the suite; this keeps them from drifting from their
source where that source is at hand (on the team's machines and in CI).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import IN_PROJECT_FIXTURES, PROJECT_DIR

SHARED = PROJECT_DIR.parent / "shared"
COPIES = {"fixtures": IN_PROJECT_FIXTURES, "cog": PROJECT_DIR / "tests" / "cog"}  # folder of ../shared -> copy


def _digests(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (hidden files included)."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_the_project_carries_its_test_data() -> None:
    assert (IN_PROJECT_FIXTURES / "README.md").is_file(), f"{IN_PROJECT_FIXTURES} has no README.md"
    assert sorted(IN_PROJECT_FIXTURES.glob("cases/*/*/case.json")), f"no golden cases under {IN_PROJECT_FIXTURES}"
    assert (COPIES["cog"] / "config_schema_v1.0.json").is_file()


@pytest.mark.parametrize("folder", sorted(COPIES))
def test_the_copy_equals_the_shared_original(folder: str) -> None:
    source, copy = SHARED / folder, COPIES[folder]
    if not source.is_dir():
        pytest.skip(f"no {source} beside this checkout to compare the copy with (a standalone clone)")
    shared, ours = _digests(source), _digests(copy)
    assert shared, f"{source} holds no files"
    missing = sorted(set(shared) - set(ours))
    extra = sorted(set(ours) - set(shared))
    changed = sorted(name for name in set(shared) & set(ours) if shared[name] != ours[name])
    assert not (missing or extra or changed), (
        f"{copy.relative_to(PROJECT_DIR)} differs from {source}: missing {missing[:5]}, extra {extra[:5]}, "
        f"changed {changed[:5]} (copy it again: ../shared is the source)"
    )
