"""Weights resolution: local dir, weights/<name>, the HF cache, and downloads through huggingface_hub from a
loopback stand-in of the hub (tests/hub_stand_in.py), with its failures (unknown or gated repo, no network,
offline, full disk, interrupted downloads) each a clear ``WeightsError``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_vl2 import weights as W
from hub_stand_in import HubStandIn, fill_the_disk_on, hub_settings

TINY = "deepseek-ai/deepseek-vl2-tiny"
BASE = "deepseek-ai/deepseek-vl2"
NOT_MODEL_FILES = {"README.md": b"# a model card\n", "figures/x.png": b"\x89PNG", "extra/x.safetensors": b"sub"}


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copyfile(f, dst / f.name)
    return dst


def _same_files(got: Path, src: Path) -> None:
    assert sorted(p.name for p in got.iterdir() if p.name != ".cache") == sorted(p.name for p in src.iterdir())
    for f in src.iterdir():
        assert (got / f.name).read_bytes() == f.read_bytes(), f.name


def _quiet(message: str) -> None:
    pass


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No real HF cache, no real weights dir, no settings from the environment."""
    for var in ("DEEPSEEK_VL2_WEIGHTS", "DEEPSEEK_VL2_DOWNLOAD_TO", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    hub_settings(monkeypatch, cache=tmp_path / "hf_cache")
    return tmp_path


@pytest.fixture
def use_hub(isolated, monkeypatch):
    """``use_hub(hub, **settings)``: this process's huggingface_hub talks to ``hub``."""
    def point(hub: HubStandIn, **settings) -> None:
        hub_settings(monkeypatch, cache=isolated / "hf_cache", endpoint=hub.url, **settings)
    return point


def _download_into_cache(use_hub, hub: HubStandIn, repo: str = TINY) -> Path:
    use_hub(hub)
    return W.download_weights(repo, None, log=_quiet)


# --------------------------------------------------------------------------------------------
# Local directories and the cache (no network)


def test_local_directory_is_used_as_is(fixtures_dir, isolated):
    ckpt = fixtures_dir / "checkpoints" / "mha"
    assert W.resolve_weights(str(ckpt), weights_dir=isolated / "w", log=_quiet) == ckpt


def test_env_variable_is_honoured(fixtures_dir, isolated, monkeypatch):
    ckpt = fixtures_dir / "checkpoints" / "mla-noaux"  # sharded, with an index
    monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", str(ckpt))
    assert W.resolve_weights(weights_dir=isolated / "w", log=_quiet) == ckpt


def test_incomplete_directory_is_a_clear_error(fixtures_dir, isolated):
    d = _copy_checkpoint(fixtures_dir / "checkpoints" / "mla-noaux", isolated / "broken")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(W.WeightsError, match="model-00002-of-00002.safetensors"):
        W.resolve_weights(str(d), log=_quiet)


def test_not_a_path_nor_repo_id(isolated):
    with pytest.raises(W.WeightsError, match="neither an existing directory nor a Hugging Face repo id"):
        W.resolve_weights(str(isolated / "does" / "not" / "exist"), log=_quiet)


def test_weights_dir_comes_first(fixtures_dir, isolated, use_hub):
    with HubStandIn.serving(TINY, fixtures_dir / "checkpoints" / "mla") as hub:
        _download_into_cache(use_hub, hub)
    baked = _copy_checkpoint(fixtures_dir / "checkpoints" / "mha", isolated / "w" / "deepseek-vl2-tiny")
    assert W.resolve_weights(TINY, weights_dir=isolated / "w", download=False, log=_quiet) == baked


def test_hf_cache_is_found_without_the_network(fixtures_dir, isolated, use_hub):
    src = fixtures_dir / "checkpoints" / "mla-noaux"
    with HubStandIn.serving(BASE, src) as hub:
        snapshot = _download_into_cache(use_hub, hub, BASE)
        assert snapshot == isolated / "hf_cache" / "models--deepseek-ai--deepseek-vl2" / "snapshots" / hub.commit(BASE)
        hub.requests.clear()
        logs: list[str] = []
        got = W.resolve_weights(BASE, weights_dir=isolated / "w", log=logs.append)  # (downloads allowed)
        assert hub.requests == []
    assert got == snapshot and logs == [f"weights: using Hugging Face cache {snapshot}"]
    _same_files(got, src)
    assert not (isolated / "w").exists()


def test_an_older_complete_revision_is_used_when_main_is_incomplete(fixtures_dir, isolated, use_hub):
    """A download of a newer revision was interrupted: ``main`` names an incomplete snapshot, and the
    complete one before it still serves (found through the hub's cache scan)."""
    src = fixtures_dir / "checkpoints" / "mla-noaux"
    with HubStandIn.serving(BASE, src) as hub:
        old = _download_into_cache(use_hub, hub, BASE)
        hub.repos[BASE]["model-00002-of-00002.safetensors"] += b" "  # a new commit...
        hub.broken.add("model-00002-of-00002.safetensors")  # ...whose download fails half-way
        with pytest.raises(W.WeightsError, match="HTTP 500"):
            W.download_weights(BASE, None, log=_quiet)
        new_commit = hub.commit(BASE)
    cache = isolated / "hf_cache" / "models--deepseek-ai--deepseek-vl2"
    assert (cache / "refs" / "main").read_text() == new_commit != old.name
    assert W.resolve_weights(BASE, weights_dir=isolated / "w", download=False, log=_quiet) == old


def test_missing_without_download_says_what_to_run(isolated):
    with pytest.raises(W.WeightsError, match=f"scripts/download_weights.py {TINY}"):
        W.resolve_weights(TINY, weights_dir=isolated / "w", download=False, log=_quiet)


# --------------------------------------------------------------------------------------------
# Downloads


def test_download_into_weights_dir_fetches_the_model_files_only(fixtures_dir, isolated, use_hub):
    src = fixtures_dir / "checkpoints" / "mla-noaux"
    with HubStandIn.serving(BASE, src, extra=NOT_MODEL_FILES) as hub:
        use_hub(hub)
        logs: list[str] = []
        got = W.resolve_weights(BASE, weights_dir=isolated / "w", log=logs.append)
    assert got == isolated / "w" / "deepseek-vl2"
    _same_files(got, src)
    assert logs[0] == f"weights: {BASE} is not local; downloading it into {got}"
    assert logs[-1] == f"downloaded {BASE} into {got}"
    fetched = {path.rsplit("/", 1)[-1] for method, path, _, _ in hub.requests if method == "GET" and "/resolve/" in path}
    assert fetched == {p.name for p in src.iterdir()}  # no README, figure or sub-folder file
    assert not (isolated / "hf_cache" / "models--deepseek-ai--deepseek-vl2" / "snapshots").exists()
    assert W.resolve_weights(BASE, weights_dir=isolated / "w", download=False, log=_quiet) == got


def test_download_into_the_hf_cache_when_asked(fixtures_dir, isolated, use_hub, monkeypatch):
    src = fixtures_dir / "checkpoints" / "mha"
    monkeypatch.setenv("DEEPSEEK_VL2_DOWNLOAD_TO", "hf-cache")
    with HubStandIn.serving(TINY, src) as hub:
        use_hub(hub)
        got = W.resolve_weights(TINY, weights_dir=isolated / "w", log=_quiet)
        assert got == isolated / "hf_cache" / "models--deepseek-ai--deepseek-vl2-tiny" / "snapshots" / hub.commit(TINY)
    _same_files(got, src)
    assert not (isolated / "w").exists()
    monkeypatch.setenv("DEEPSEEK_VL2_DOWNLOAD_TO", "/somewhere")
    with pytest.raises(W.WeightsError, match="DEEPSEEK_VL2_DOWNLOAD_TO='/somewhere': use weights or hf-cache"):
        W.resolve_weights("deepseek-ai/deepseek-vl2-small", weights_dir=isolated / "w", log=_quiet)


def test_a_dropped_connection_is_resumed_with_a_range_request(fixtures_dir, isolated, use_hub):
    """The connection drops 15 MiB into a 21 MiB file: the hub asks for the rest with a Range request (from
    the last 10 MiB it wrote) in the same run, and the file comes out whole."""
    weights = os.urandom(1 << 20) * 21
    files = {"config.json": (fixtures_dir / "checkpoints" / "mha" / "config.json").read_bytes(),
             "model.safetensors": weights}
    with HubStandIn({TINY: files}) as hub:
        hub.cut_after["model.safetensors"] = 15 << 20
        use_hub(hub)
        got = W.download_weights(TINY, isolated / "w" / "tiny", log=_quiet)
    assert hub.file_gets("model.safetensors") == [None, f"bytes={10 << 20}-"]
    assert (got / "model.safetensors").read_bytes() == weights


def test_an_interrupted_download_resumes_on_the_next_run(fixtures_dir, isolated, use_hub):
    """The hub fails on the second shard: the run stops with an error that says to run again, the files that
    arrived are kept, and the next run fetches only the missing shard."""
    src = fixtures_dir / "checkpoints" / "mla-noaux"
    shard = "model-00002-of-00002.safetensors"
    with HubStandIn.serving(BASE, src) as hub:
        use_hub(hub)
        hub.broken.add(shard)
        with pytest.raises(W.WeightsError) as caught:
            W.resolve_weights(BASE, weights_dir=isolated / "w", log=_quiet)
        message = str(caught.value)
        assert "HTTP 500" in message and "run the same command again" in message, message
        assert "files already downloaded are kept" in message, message
        target = isolated / "w" / "deepseek-vl2"
        assert (target / "model-00001-of-00002.safetensors").is_file() and not (target / shard).exists()
        hub.broken.clear()
        hub.requests.clear()
        got = W.resolve_weights(BASE, weights_dir=isolated / "w", log=_quiet)
    assert got == target
    _same_files(got, src)
    fetched = [path for method, path, _, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert [p.rsplit("/", 1)[-1] for p in fetched] == [shard]


def test_unknown_repo_is_a_clear_error(isolated, use_hub):
    with HubStandIn({}) as hub:
        use_hub(hub)
        with pytest.raises(W.WeightsError, match=r"deepseek-ai/no-such-model is not available from "
                                                 r"http://127\.0\.0\.1:\d+ \(HTTP 404\); check the name"):
            W.resolve_weights("deepseek-ai/no-such-model", weights_dir=isolated / "w", log=_quiet)


def test_unreachable_hub_is_a_clear_error(isolated, monkeypatch):
    hub_settings(monkeypatch, cache=isolated / "hf_cache", endpoint="http://127.0.0.1:9")
    with pytest.raises(W.WeightsError, match=r"cannot reach http://127\.0\.0\.1:9 to download .*check the network"):
        W.resolve_weights(TINY, weights_dir=isolated / "w", log=_quiet)


def test_a_gated_repo_needs_a_token_with_access(fixtures_dir, isolated, use_hub):
    src = fixtures_dir / "checkpoints" / "mha"
    with HubStandIn.serving(TINY, src, gated={TINY: "hf_granted"}) as hub:
        use_hub(hub)
        with pytest.raises(W.WeightsError, match=r"is a gated model \(HTTP 401\): accept its conditions on "
                                                 rf"{hub.url}/{TINY}, then set HF_TOKEN"):
            W.download_weights(TINY, isolated / "w" / "a", log=_quiet)
        use_hub(hub, token="hf_someone_else")
        with pytest.raises(W.WeightsError, match=r"the token in HF_TOKEN has no access to it \(HTTP 403\)"):
            W.download_weights(TINY, isolated / "w" / "b", log=_quiet)
        use_hub(hub, token="hf_granted")
        got = W.download_weights(TINY, isolated / "w" / "c", log=_quiet)
    _same_files(got, src)
    assert {auth for method, path, _, auth in hub.requests if "/resolve/" in path and method == "GET"} == {
        "Bearer hf_granted"}


def test_offline_without_a_local_copy_is_a_clear_error(fixtures_dir, isolated, use_hub):
    with HubStandIn.serving(TINY, fixtures_dir / "checkpoints" / "mha") as hub:
        use_hub(hub, offline=True)
        with pytest.raises(W.WeightsError, match="HF_HUB_OFFLINE is set and the weights for .* unset HF_HUB_OFFLINE"):
            W.resolve_weights(TINY, weights_dir=isolated / "w", log=_quiet)
        with pytest.raises(W.WeightsError, match="HF_HUB_OFFLINE is set and .* unset HF_HUB_OFFLINE"):
            W.download_weights(TINY, isolated / "w" / "x", log=_quiet)
    assert hub.requests == []


def test_a_full_disk_is_a_clear_error_and_the_next_run_goes_on(fixtures_dir, isolated, use_hub, monkeypatch):
    src = fixtures_dir / "checkpoints" / "mla-noaux"
    shard = "model-00002-of-00002.safetensors"
    target = isolated / "w" / "deepseek-vl2"
    with HubStandIn.serving(BASE, src) as hub:
        use_hub(hub)
        with monkeypatch.context() as patch:
            fill_the_disk_on(shard, patch)
            with pytest.raises(W.WeightsError) as caught:
                W.resolve_weights(BASE, weights_dir=isolated / "w", log=_quiet)
        size = sum(p.stat().st_size for p in src.iterdir())
        message = str(caught.value)
        assert message.startswith(f"cannot write {target}: no space left on the device (")
        assert f"free, the model's files need {W._human(size)} in all)" in message, message
        assert "Free some space and run again (the files already downloaded are kept)" in message, message
        assert not list(target.rglob("*.incomplete"))  # (the partial file is gone: no space held)
        hub.requests.clear()
        got = W.resolve_weights(BASE, weights_dir=isolated / "w", log=_quiet)
    _same_files(got, src)
    assert [p.rsplit("/", 1)[-1] for m, p, _, _ in hub.requests if m == "GET" and "/resolve/" in p] == [shard]


def test_a_repo_without_safetensors_is_not_a_model(fixtures_dir, isolated, use_hub):
    files = {"config.json": b"{}", "pytorch_model.bin": b"pickle"}
    with HubStandIn({"someone/other-model": files}) as hub:
        use_hub(hub)
        with pytest.raises(W.WeightsError, match="is not a DeepSeek-VL2 model: it lacks model.safetensors or"):
            W.download_weights("someone/other-model", isolated / "w" / "other", log=_quiet)
    assert not any(path.endswith(".bin") for _, path, _, _ in hub.requests)


# --------------------------------------------------------------------------------------------
# The settings as a user gives them: environment variables read by huggingface_hub in a new process


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "DEEPSEEK_VL2_"))}
    return subprocess.run(args, env={**base, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_download_script_then_an_offline_run_finds_the_cache(fixtures_dir, isolated, project_dir):
    """One command downloads into the shared cache that HF_HOME names; a later process with HF_HUB_OFFLINE=1
    finds the complete snapshot there and asks the hub nothing."""
    src = fixtures_dir / "checkpoints" / "mha"
    hf_home = isolated / "hf_home"
    script = [sys.executable, str(project_dir / "scripts" / "download_weights.py")]
    with HubStandIn.serving(TINY, src) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home)}
        out = _run([*script, TINY, "--cache"], env, project_dir)
        assert out.returncode == 0, out.stderr
        snapshot = hf_home / "hub" / "models--deepseek-ai--deepseek-vl2-tiny" / "snapshots" / hub.commit(TINY)
        assert out.stdout.strip() == str(snapshot)
        _same_files(snapshot, src)
        hub.requests.clear()
        resolve = ("from pathlib import Path; from deepseek_vl2.weights import resolve_weights; "
                   f"print(resolve_weights({TINY!r}, weights_dir=Path({str(isolated / 'w')!r})))")
        out = _run([sys.executable, "-c", resolve], {**env, "HF_HUB_OFFLINE": "1"}, project_dir)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(snapshot)
        assert hub.requests == []


def test_download_script_into_a_directory(fixtures_dir, isolated, project_dir):
    src = fixtures_dir / "checkpoints" / "mha"
    with HubStandIn.serving(TINY, src, gated={TINY: "hf_granted"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(isolated / "hf_home")}
        script = [sys.executable, str(project_dir / "scripts" / "download_weights.py"), TINY, "--dest", str(isolated / "dl")]
        out = _run(script, env, project_dir)
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1].startswith(f"error: {TINY} is a gated model (HTTP 401)"), out.stderr
        out = _run(script, {**env, "HF_TOKEN": "hf_granted"}, project_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(isolated / "dl")
    _same_files(isolated / "dl", src)


# --------------------------------------------------------------------------------------------
# scripts/make_random_checkpoint.py: the official layout, exactly


def _load_script(project_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_random_checkpoint", project_dir / "scripts" / "make_random_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _safetensors_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


@pytest.mark.parametrize("variant", ["mha", "mla", "mla-noaux"])
def test_random_checkpoint_matches_fixture_layout(fixtures_dir, project_dir, tmp_path, variant):
    mod = _load_script(project_dir)
    ref = fixtures_dir / "checkpoints" / variant
    config = json.loads((ref / "config.json").read_text())
    assert mod.param_shapes(config) == _safetensors_shapes(ref)
    shards = 2 if (ref / "model.safetensors.index.json").exists() else 1
    out = mod.make_checkpoint(tmp_path / variant, config=config, shards=shards)
    assert _safetensors_shapes(out) == _safetensors_shapes(ref)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert W.is_model_dir(out)


@pytest.mark.parametrize("name,params", [
    ("deepseek-vl2-tiny", 3.371e9), ("deepseek-vl2-small", 16.148e9), ("deepseek-vl2", 27.480e9),
])
def test_layout_of_real_configs_has_the_official_parameter_count(fixtures_dir, project_dir, name, params):
    mod = _load_script(project_dir)
    config = json.loads((fixtures_dir / "real-configs" / f"{name}.json").read_text())
    shapes = mod.param_shapes(config)
    total = sum(int(__import__("math").prod(s)) for s in shapes.values())
    assert abs(total - params) < 0.0005e9, total
    assert ("language.model.layers.29.mlp.gate.e_score_correction_bias" in shapes) == (name == "deepseek-vl2")


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_demo_checkpoint_is_complete_and_self_made(project_dir, tmp_path, attention):
    from safetensors import safe_open
    from tokenizers import Tokenizer

    mod = _load_script(project_dir)
    out = mod.make_checkpoint(tmp_path / "demo", attention=attention)
    files = {p.name for p in out.iterdir()}
    assert files == {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((out / "config.json").read_text())
    assert set(config) >= {"model_type", "tile_tag", "global_view_pos", "candidate_resolutions",
                           "vision_config", "projector_config", "language_config"}
    assert config["language_config"].get("use_mla", True) == (attention == "mla")
    assert _safetensors_shapes(out) == mod.param_shapes(config)
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        assert {str(st.get_tensor(k).dtype) for k in st.keys()} == {"torch.bfloat16"}
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>", "<|User|>",
                "<|Assistant|>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]
    ids = [tok.token_to_id(t) for t in specials]
    assert None not in ids and len(set(ids)) == len(ids)
    assert ids[:3] == [config["language_config"]["bos_token_id"], config["language_config"]["eos_token_id"], 2]
    assert tok.get_vocab_size() <= config["language_config"]["vocab_size"]
    text = "<|User|>: <image>\nWhere is the giraffe? 123\n\n<|Assistant|>:"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert enc.ids.count(tok.token_to_id("<image>")) == 1
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert {v["content"] for v in tc["added_tokens_decoder"].values()} == set(specials)


