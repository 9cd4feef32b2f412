"""cog.yaml is valid for Cog, needs a GPU, pins every dependency, and matches requirements.txt."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml


@pytest.fixture(scope="module")
def cog_yaml(project_dir):
    return yaml.safe_load((project_dir / "cog.yaml").read_text())


def test_validates_against_cogs_config_schema(cog_yaml, project_dir):
    # Cog's schema for cog.yaml, copied with the fixtures from the team's ../shared/cog (test_fixtures.py)
    schema = json.loads((project_dir / "tests" / "cog" / "config_schema_v1.0.json").read_text())
    jsonschema.validate(cog_yaml, schema)


def test_build_and_predictor(cog_yaml, project_dir):
    build = cog_yaml["build"]
    assert build["gpu"] is True
    assert str(build["python_version"]) == "3.11"
    assert cog_yaml["predict"] == "predict.py:Predictor"
    module, cls = cog_yaml["predict"].split(":")
    assert (project_dir / module).is_file()
    assert f"class {cls}(" in (project_dir / module).read_text()


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([A-Za-z0-9_.+\-]+)", line)
        assert m, f"not pinned exactly: {line!r}"
        pins[m.group(1).lower()] = m.group(2)
    return pins


def test_every_package_is_pinned_and_matches_requirements(cog_yaml, project_dir):
    image = _pins(cog_yaml["build"]["python_packages"])
    local = _pins((project_dir / "requirements.txt").read_text().splitlines())
    assert "torch" in image
    # Cog installs its own SDK (sdk_version); everything else is the same pin in both places.
    assert cog_yaml["build"]["sdk_version"] == local["cog"]
    assert image == {k: v for k, v in local.items() if k not in ("cog", "coglet")}


def test_dev_requirements_pinned(project_dir):
    pins = _pins((project_dir / "requirements-dev.txt").read_text().splitlines())
    assert {"pytest", "pyyaml", "jsonschema"} <= set(pins)
