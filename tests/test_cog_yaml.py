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


def test_the_image_admits_twice_the_clients_the_engine_serves(cog_yaml, project_dir):
    """Cog's server (concurrency.max) admits twice the GPU image's clients served without a refusal
    (DEEPSEEK_VL2_MAX_CONCURRENCY, the engine's slots), as predict.py's SERVER_CONCURRENCY says: Cog frees a
    slot only after it has sent the answer, so with no margin a client sending back to back could get a 409."""
    import os
    import subprocess
    import sys

    env = dict(item.split("=", 1) for item in cog_yaml["environment"])
    clients = int(env["DEEPSEEK_VL2_MAX_CONCURRENCY"])
    assert cog_yaml["concurrency"]["max"] == 2 * clients and clients >= 2
    # predict.py reads them as the image will (COG_MAX_CONCURRENCY baked in; its module-level @concurrent value)
    out = subprocess.run([sys.executable, "-c", "import predict; print(predict.MAX_CONCURRENCY, "
                          "predict.SERVER_CONCURRENCY, predict.Predictor.predict.__cog_concurrent_max__)"],
                         cwd=project_dir, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DEEPSEEK_VL2_MAX_CONCURRENCY": str(clients),
                              "COG_MAX_CONCURRENCY": str(cog_yaml["concurrency"]["max"])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(clients), str(2 * clients), str(2 * clients)]


def test_the_image_runs_cogs_request_handling_on_one_thread(cog_yaml, project_dir):
    """Cog 0.23's server answers 409 when two requests on two threads collide on its slot pool's try-lock,
    free slots or not: the image and make serve run its request handling on one thread."""
    env = dict(item.split("=", 1) for item in cog_yaml["environment"])
    assert env["TOKIO_WORKER_THREADS"] == "1"
    makefile = (project_dir / "Makefile").read_text()
    for target in ("serve", "serve-stream"):
        recipe = makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
        assert "TOKIO_WORKER_THREADS=1" in recipe and "cog.server.http" in recipe, target


def test_the_image_has_a_compiler_for_torch_compile(cog_yaml):
    """torch.compile (Triton) needs a C compiler at run time, and the GPU build of torch comes from Cog's CUDA
    image (gpu: true with torch pinned): neither can be checked without building the image here."""
    assert "build-essential" in cog_yaml["build"]["system_packages"]
    assert cog_yaml["build"]["gpu"] is True
    assert any(p.startswith("torch==") for p in cog_yaml["build"]["python_packages"])
