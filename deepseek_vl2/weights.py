"""Where the model weights come from.

``resolve_weights(spec)`` turns ``spec`` (the ``DEEPSEEK_VL2_WEIGHTS`` setting) into a local model
directory, trying in order:

1. ``spec`` itself, when it names an existing directory;
2. ``weights/<name>`` of this project (baked into the image by ``cog build``);
3. the Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``);
4. a download over plain HTTPS from ``$HF_ENDPOINT`` (default ``https://huggingface.co``) into
   ``weights/<name>``, with progress on stderr.

A model directory holds ``config.json`` and its safetensors weights: ``model.safetensors`` or an
index ``model.safetensors.index.json`` whose shards are all present.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

DEFAULT_WEIGHTS = "deepseek-ai/deepseek-vl2"
KNOWN_MODELS = (
    "deepseek-ai/deepseek-vl2-tiny",
    "deepseek-ai/deepseek-vl2-small",
    "deepseek-ai/deepseek-vl2",
)
PROJECT_DIR = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = PROJECT_DIR / "weights"
DEFAULT_ENDPOINT = "https://huggingface.co"

# Files a model directory needs besides the safetensors weights.
METADATA_FILES = (
    "config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class WeightsError(RuntimeError):
    """The weights cannot be found or fetched; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Inspecting directories


def missing_files(model_dir: Path) -> list[str]:
    """What ``model_dir`` lacks to be a loadable model directory (empty list: it is complete)."""
    model_dir = Path(model_dir)
    missing = [name for name in ("config.json",) if not (model_dir / name).is_file()]
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            return missing + [f"{INDEX_FILE} (unreadable)"]
        missing += [s for s in shards if not (model_dir / s).is_file()]
    elif not (model_dir / SINGLE_FILE).is_file():
        missing.append(f"{SINGLE_FILE} or {INDEX_FILE}")
    return missing


def is_model_dir(path: Path) -> bool:
    return Path(path).is_dir() and not missing_files(Path(path))


def is_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and ".." not in spec


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, as ``huggingface_hub`` chooses it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def find_in_hf_cache(repo_id: str, cache_dir: Optional[Path] = None) -> Optional[Path]:
    """A complete snapshot of ``repo_id`` in the HF cache: the one ``refs/main`` names, else the newest."""
    repo_dir = (cache_dir or hf_hub_cache()) / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates: list[Path] = []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in candidates:
        if is_model_dir(snap):
            return snap
    return None


# --------------------------------------------------------------------------------------------
# Resolving


def resolve_weights(
    spec: Optional[str] = None,
    *,
    weights_dir: Optional[Path] = None,
    cache_dir: Optional[Path] = None,
    download: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> Path:
    """The local model directory for ``spec`` (default ``$DEEPSEEK_VL2_WEIGHTS``, else the base model)."""
    spec = (spec or os.environ.get("DEEPSEEK_VL2_WEIGHTS") or DEFAULT_WEIGHTS).strip()
    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR

    path = Path(spec).expanduser()
    if path.is_dir():
        missing = missing_files(path)
        if missing:
            raise WeightsError(
                f"{path} is not a complete DeepSeek-VL2 model directory: missing {', '.join(missing)}"
            )
        log(f"weights: using local directory {path}")
        return path
    if not is_repo_id(spec):
        raise WeightsError(
            f"weights {spec!r} not found: it is neither an existing directory nor a Hugging Face "
            "repo id such as deepseek-ai/deepseek-vl2-tiny"
        )

    baked = weights_dir / spec.split("/")[1]
    if is_model_dir(baked):
        log(f"weights: using {baked}")
        return baked
    cached = find_in_hf_cache(spec, cache_dir)
    if cached is not None:
        log(f"weights: using Hugging Face cache {cached}")
        return cached
    if not download:
        raise WeightsError(
            f"weights for {spec} are not in {baked} nor in the Hugging Face cache "
            f"({cache_dir or hf_hub_cache()}); run: python scripts/download_weights.py {spec}"
        )
    log(f"weights: {spec} is not local; downloading into {baked}")
    return download_weights(spec, baked, log=log)


# --------------------------------------------------------------------------------------------
# Downloading


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _session():
    import requests

    session = requests.Session()
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    session.headers["User-Agent"] = "deepseek-vl2-cog"
    return session


def _wanted(names: Iterable[str]) -> list[str]:
    """The files of a repo that a model directory needs: the metadata JSONs and the safetensors."""
    keep = [n for n in names if "/" not in n and (n in METADATA_FILES or n == INDEX_FILE or n.endswith(".safetensors"))]
    return sorted(set(keep), key=lambda n: (n.endswith(".safetensors"), n))


def list_repo_files(repo_id: str, session=None) -> list[str]:
    """The files to fetch for ``repo_id``: from the hub API, else from the index file."""
    import requests

    session = session or _session()
    base = hf_endpoint()
    try:
        resp = session.get(f"{base}/api/models/{repo_id}", timeout=30)
        if resp.status_code == 200:
            names = [s["rfilename"] for s in resp.json().get("siblings", [])]
            if names:
                return _wanted(names)
        elif resp.status_code in (401, 403, 404):
            raise WeightsError(
                f"{repo_id} is not available from {base} (HTTP {resp.status_code}); check the name"
                " (deepseek-ai/deepseek-vl2-tiny, -small or deepseek-ai/deepseek-vl2) or set HF_TOKEN"
            )
    except (requests.RequestException, ValueError):
        pass  # the API is optional: fall back to the index file below
    resp = _get(session, _file_url(repo_id, INDEX_FILE), stream=False, ok=(200, 404))
    if resp.status_code == 200:
        shards = sorted(set(resp.json()["weight_map"].values()))
        return _wanted([*METADATA_FILES, INDEX_FILE, *shards])
    return _wanted([*METADATA_FILES, SINGLE_FILE])


def _file_url(repo_id: str, filename: str) -> str:
    return f"{hf_endpoint()}/{repo_id}/resolve/main/{filename}"


def _get(session, url: str, *, stream: bool, ok=(200,), headers=None):
    import requests

    try:
        resp = session.get(url, stream=stream, timeout=60, headers=headers or {}, allow_redirects=True)
    except requests.RequestException as exc:
        raise WeightsError(f"cannot reach {url}: {exc.__class__.__name__}; check the network or HF_ENDPOINT") from None
    if resp.status_code not in ok:
        resp.close()
        raise WeightsError(f"download of {url} failed: HTTP {resp.status_code}")
    return resp


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


# Files are written in whole blocks of this size at offsets that are multiples of it (see BlockWriter).
WRITE_BLOCK = 8 << 20


class BlockWriter:
    """Writes a binary file in blocks of ``WRITE_BLOCK`` bytes that start at multiples of ``WRITE_BLOCK``
    (the first one runs up to the first such offset after ``offset``, where writing starts; the last one
    is whatever is left at ``flush``).

    Why: the CPU loader maps the weight files instead of copying them. Linux (6.x, ext4/xfs) caches a
    file it *reads* in large page-cache folios (2 MiB where free memory allows), which a mapping covers
    with 2 MiB pages; but a file just *written* in small pieces stays in 4 KiB folios until it is
    evicted, and then each 4 KiB of weights costs a TLB entry. A file written in aligned blocks of 2 MiB
    or more is cached in 2 MiB folios at once. Tiny from such a file, on the 2-core EPYC in its fast
    memory phase: decode 83-87 % of the bandwidth bound against 68-81 % from 4 KiB folios; the load took
    0.13 s instead of 1.16 s.
    """

    def __init__(self, fh: BinaryIO, offset: int = 0) -> None:
        self.fh = fh
        self.offset = offset  # file offset of the next byte written to the file (the buffer's first)
        self.buffer = bytearray()  # less than one block, the bytes at [offset, offset + len)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` after what came before: whole blocks now (large inputs are not copied), the
        rest kept until the block is full or ``flush``."""
        with memoryview(data).cast("B") as view:
            pos = 0
            if self.buffer:  # complete the pending block first
                pos = min(len(view), self._block_left() - len(self.buffer))
                self.buffer += view[:pos]
                if len(self.buffer) < self._block_left():
                    return
                self.flush()  # (a whole block)
            while len(view) - pos >= self._block_left():
                size = self._block_left()
                self._write(view[pos:pos + size])
                pos += size
            self.buffer += view[pos:]

    def flush(self) -> None:
        """Write what is left (a last, partial block)."""
        if self.buffer:
            self._write(self.buffer)
            self.buffer.clear()

    def _block_left(self) -> int:
        """Bytes from the write position to the next block boundary."""
        return WRITE_BLOCK - self.offset % WRITE_BLOCK

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view:
            written = 0
            while written < len(view):  # a raw file may take less than it was given
                written += self.fh.write(view[written:])
        self.offset += written


def _write_error(path: Path, exc: OSError, total: Optional[int] = None) -> WeightsError:
    """A failed write of a download as a ``WeightsError`` that names the file and what to do."""
    import errno
    import shutil

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{_human(shutil.disk_usage(path.parent).free)} free"
        except OSError:
            free = "free space unknown"
        need = f", the file needs {_human(total)}" if total else ""
        return WeightsError(
            f"cannot write {path}: no space left on the device ({free}{need}). Free some space and run again "
            "(the download resumes), or set DEEPSEEK_VL2_WEIGHTS to a model directory on a larger disk")
    reason = exc.strerror or str(exc)
    return WeightsError(
        f"cannot write {path}: {reason}. Download the weights where this user can write "
        "(python scripts/download_weights.py) and set DEEPSEEK_VL2_WEIGHTS to that directory")


def download_file(session, url: str, dest: Path, log: Callable[[str], None], every_s: float = 5.0) -> None:
    """Fetch ``url`` into ``dest`` via ``dest.incomplete``, resuming a partial file, with progress."""
    if dest.is_file():
        return
    part = dest.with_name(dest.name + ".incomplete")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else None
    resp = _get(session, url, stream=True, ok=(200, 206, 416), headers=headers)
    with resp:
        if resp.status_code == 416:  # the partial file is already whole
            os.replace(part, dest)
            return
        if resp.status_code == 200:
            have = 0  # the server ignored the range: start over
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        done, last = have, 0.0
        try:
            with open(part, "ab" if have else "wb", buffering=0) as fh:
                writer = BlockWriter(fh, have)  # (aligned blocks: the page cache keeps 2 MiB folios)
                try:
                    for chunk in resp.iter_content(chunk_size=1 << 20):
                        writer.write(chunk)
                        done += len(chunk)
                        now = time.monotonic()
                        if now - last >= every_s:
                            last = now
                            pct = f" ({100 * done / total:.0f}%)" if total else ""
                            log(f"  {dest.name}: {_human(done)}{' / ' + _human(total) if total else ''}{pct}")
                finally:
                    writer.flush()  # keep what arrived: a later run resumes after it
        except OSError as exc:
            raise _write_error(part, exc, total) from None
    if total is not None and done != total:
        raise WeightsError(f"download of {url} stopped at {done} of {total} bytes; run again to resume")
    os.replace(part, dest)
    log(f"  {dest.name}: done, {_human(done)}")


def download_weights(repo_id: str, target: Path, *, log: Callable[[str], None] = print) -> Path:
    """Download the model files of ``repo_id`` into ``target`` (resumable); return ``target``."""
    if not is_repo_id(repo_id):
        raise WeightsError(f"{repo_id!r} is not a Hugging Face repo id (owner/name)")
    target = Path(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(target, exc) from None
    session = _session()
    files = list_repo_files(repo_id, session)
    if not any(f.endswith(".safetensors") for f in files):
        raise WeightsError(f"{repo_id} has no safetensors weights")
    log(f"downloading {repo_id} from {hf_endpoint()}: {len(files)} files into {target}")
    for name in files:
        download_file(session, _file_url(repo_id, name), target / name, log)
    missing = missing_files(target)
    if missing:
        raise WeightsError(f"{repo_id} downloaded but incomplete: missing {', '.join(missing)}")
    return target
