"""Weights resolution: local dir, weights/<name>, HF cache, and download from a loopback hub stand-in."""
from __future__ import annotations

import http.server
import json
import shutil
import socketserver
import threading
from pathlib import Path

import pytest

from deepseek_vl2 import weights as W


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copyfile(f, dst / f.name)
    return dst


class _Hub:
    """A tiny stand-in for the hub: /api/models/<repo> and /<repo>/resolve/main/<file>, with Range support."""

    def __init__(self, repos: dict[str, Path], api: bool = True):
        self.repos, self.api, self.requests = repos, api, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                parts = self.path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo = "/".join(parts[2:4])
                    if not hub.api:
                        return self._send(500, b"down")
                    if repo not in hub.repos:
                        return self._send(404, b"{}")
                    files = sorted(p.name for p in hub.repos[repo].iterdir()) + ["README.md", "figures/x.png"]
                    body = json.dumps({"id": repo, "siblings": [{"rfilename": f} for f in files]}).encode()
                    return self._send(200, body)
                if len(parts) == 5 and parts[2:4] == ["resolve", "main"]:
                    repo, name = "/".join(parts[:2]), parts[4]
                    path = hub.repos.get(repo, Path("/nonexistent")) / name
                    if not path.is_file():
                        return self._send(404, b"not found")
                    data = path.read_bytes()
                    rng = self.headers.get("Range")
                    if rng:
                        start = int(rng.split("=")[1].split("-")[0])
                        if start >= len(data):
                            return self._send(416, b"")
                        return self._send(206, data[start:])
                    return self._send(200, data)
                self._send(404, b"?")

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No real HF cache, no real weights dir, no env overrides."""
    for var in ("DEEPSEEK_VL2_WEIGHTS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path


def test_local_directory_is_used_as_is(fixtures_dir, isolated):
    ckpt = fixtures_dir / "checkpoints" / "mha"
    assert W.resolve_weights(str(ckpt), weights_dir=isolated / "w", log=lambda m: None) == ckpt


def test_env_variable_is_honoured(fixtures_dir, isolated, monkeypatch):
    ckpt = fixtures_dir / "checkpoints" / "mla-noaux"  # sharded, with an index
    monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", str(ckpt))
    assert W.resolve_weights(weights_dir=isolated / "w", log=lambda m: None) == ckpt


def test_incomplete_directory_is_a_clear_error(fixtures_dir, isolated):
    d = _copy_checkpoint(fixtures_dir / "checkpoints" / "mla-noaux", isolated / "broken")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(W.WeightsError, match="model-00002-of-00002.safetensors"):
        W.resolve_weights(str(d), log=lambda m: None)


def test_not_a_path_nor_repo_id(isolated):
    with pytest.raises(W.WeightsError, match="neither an existing directory nor a Hugging Face repo id"):
        W.resolve_weights(str(isolated / "does" / "not" / "exist"), log=lambda m: None)


def test_weights_dir_comes_first(fixtures_dir, isolated):
    baked = _copy_checkpoint(fixtures_dir / "checkpoints" / "mha", isolated / "w" / "deepseek-vl2-tiny")
    cache = isolated / "hf_home" / "hub" / "models--deepseek-ai--deepseek-vl2-tiny" / "snapshots" / "abc"
    _copy_checkpoint(fixtures_dir / "checkpoints" / "mla", cache)
    got = W.resolve_weights("deepseek-ai/deepseek-vl2-tiny", weights_dir=isolated / "w", download=False,
                            log=lambda m: None)
    assert got == baked


def test_hf_cache_is_found(fixtures_dir, isolated, monkeypatch):
    hub_cache = isolated / "custom_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    repo = hub_cache / "models--deepseek-ai--deepseek-vl2-small"
    _copy_checkpoint(fixtures_dir / "checkpoints" / "mla", repo / "snapshots" / "rev1")
    (repo / "snapshots" / "rev2").mkdir()  # an incomplete snapshot is skipped
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev2")
    got = W.resolve_weights("deepseek-ai/deepseek-vl2-small", weights_dir=isolated / "w", download=False,
                            log=lambda m: None)
    assert got == repo / "snapshots" / "rev1"


def test_hf_home_is_honoured(fixtures_dir, isolated):
    snap = isolated / "hf_home" / "hub" / "models--deepseek-ai--deepseek-vl2" / "snapshots" / "r"
    _copy_checkpoint(fixtures_dir / "checkpoints" / "mla-noaux", snap)
    assert W.resolve_weights(None, weights_dir=isolated / "w", download=False, log=lambda m: None) == snap


def test_missing_without_download_says_what_to_run(isolated):
    with pytest.raises(W.WeightsError, match="scripts/download_weights.py deepseek-ai/deepseek-vl2-tiny"):
        W.resolve_weights("deepseek-ai/deepseek-vl2-tiny", weights_dir=isolated / "w", download=False,
                          log=lambda m: None)


@pytest.mark.parametrize("api", [True, False], ids=["api-listing", "index-fallback"])
def test_download_from_hub(fixtures_dir, isolated, monkeypatch, api):
    src = fixtures_dir / "checkpoints" / "mla-noaux"
    with _Hub({"deepseek-ai/deepseek-vl2": src}, api=api) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        logs: list[str] = []
        got = W.resolve_weights("deepseek-ai/deepseek-vl2", weights_dir=isolated / "w", log=logs.append)
    assert got == isolated / "w" / "deepseek-vl2"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in src.iterdir())
    for f in src.iterdir():
        assert (got / f.name).read_bytes() == f.read_bytes()
    assert any("done" in line for line in logs)
    fetched = [p for p, _ in hub.requests if "/resolve/main/" in p]
    assert not any("README" in p or "figures" in p for p in fetched)


def test_download_resumes_a_partial_file(fixtures_dir, isolated, monkeypatch):
    src = fixtures_dir / "checkpoints" / "mha"
    target = isolated / "w" / "deepseek-vl2-tiny"
    target.mkdir(parents=True)
    data = (src / "model.safetensors").read_bytes()
    (target / "model.safetensors.incomplete").write_bytes(data[:1000])
    with _Hub({"deepseek-ai/deepseek-vl2-tiny": src}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        got = W.download_weights("deepseek-ai/deepseek-vl2-tiny", target, log=lambda m: None)
    assert (got / "model.safetensors").read_bytes() == data
    assert ("/deepseek-ai/deepseek-vl2-tiny/resolve/main/model.safetensors", "bytes=1000-") in hub.requests
    assert not list(got.glob("*.incomplete"))


def test_unknown_repo_is_a_clear_error(isolated, monkeypatch):
    with _Hub({}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(W.WeightsError, match="not available"):
            W.resolve_weights("deepseek-ai/no-such-model", weights_dir=isolated / "w", log=lambda m: None)


def test_unreachable_hub_is_a_clear_error(isolated, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(W.WeightsError, match="cannot reach"):
        W.resolve_weights("deepseek-ai/deepseek-vl2-tiny", weights_dir=isolated / "w", log=lambda m: None)


def test_download_script(fixtures_dir, isolated, monkeypatch, project_dir):
    import subprocess
    import sys

    src = fixtures_dir / "checkpoints" / "mha"
    with _Hub({"deepseek-ai/deepseek-vl2-tiny": src}) as hub:
        env = {**__import__("os").environ, "HF_ENDPOINT": hub.url}
        out = subprocess.run(
            [sys.executable, str(project_dir / "scripts" / "download_weights.py"), "deepseek-ai/deepseek-vl2-tiny",
             "--dest", str(isolated / "dl")],
            env=env, capture_output=True, text=True, timeout=120,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(isolated / "dl")
    assert W.is_model_dir(isolated / "dl")


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


class _RecordingFile:
    """A raw file stand-in that records each write's offset and length, and accepts at most ``limit``
    bytes per call (as a raw file may)."""

    def __init__(self, start: int = 0, limit: int | None = None):
        self.data, self.writes, self.offset, self.limit = bytearray(), [], start, limit

    def write(self, view) -> int:
        n = len(view) if self.limit is None else min(len(view), self.limit)
        self.data += bytes(view[:n])
        self.writes.append((self.offset, n))
        self.offset += n
        return n


@pytest.mark.parametrize("start", [0, 1000, W.WRITE_BLOCK - 1, 3 * W.WRITE_BLOCK])
def test_block_writer_writes_aligned_blocks(start):
    import random

    rng = random.Random(start)
    payload = rng.randbytes(3 * W.WRITE_BLOCK + 12345)
    fh = _RecordingFile(start)
    writer = W.BlockWriter(fh, start)
    pos = 0
    while pos < len(payload):  # pieces of uneven sizes, as a download delivers them
        step = rng.choice([1, 4096, 1 << 20, W.WRITE_BLOCK + 7])
        writer.write(payload[pos:pos + step])
        pos += step
    writer.flush()
    assert bytes(fh.data) == payload
    *blocks, last = fh.writes
    for offset, length in blocks:
        assert (offset + length) % W.WRITE_BLOCK == 0, (offset, length)  # every block ends on a boundary
        assert offset % W.WRITE_BLOCK == 0 or offset == start  # and starts on one (but the first)
        assert length <= W.WRITE_BLOCK
    assert last[0] + last[1] == start + len(payload)


def test_block_writer_completes_short_writes():
    fh = _RecordingFile(limit=W.WRITE_BLOCK // 3)
    writer = W.BlockWriter(fh)
    payload = bytes(range(256)) * (W.WRITE_BLOCK // 128)  # two blocks
    writer.write(payload)
    writer.flush()
    assert bytes(fh.data) == payload
    assert writer.offset == len(payload)


def test_interrupted_download_keeps_what_arrived(fixtures_dir, isolated, monkeypatch):
    class Broken(Exception):
        pass

    class Response:
        status_code = 200
        headers = {"Content-Length": str(3 * 1000)}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def iter_content(self, chunk_size):
            yield b"a" * 1000
            yield b"b" * 1000
            raise Broken("connection reset")

    monkeypatch.setattr(W, "_get", lambda *a, **k: Response())
    dest = isolated / "model.safetensors"
    with pytest.raises(Broken):
        W.download_file(None, "http://unused", dest, log=lambda m: None)
    part = dest.with_name(dest.name + ".incomplete")
    assert part.read_bytes() == b"a" * 1000 + b"b" * 1000  # buffered, then flushed on the way out
    assert not dest.exists()
