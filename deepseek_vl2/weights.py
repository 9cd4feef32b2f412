"""Where the model weights come from.

``resolve_weights(spec)`` turns ``spec`` (the ``DEEPSEEK_VL2_WEIGHTS`` setting) into a local model
directory, trying in order:

1. ``spec`` itself, when it names an existing directory;
2. ``weights/<name>`` of this project (what ``cog build`` bakes into the image);
3. the Hugging Face cache, as ``huggingface_hub`` finds it (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``): the snapshot ``main`` names, else the newest complete cached revision;
4. a download by ``huggingface_hub.snapshot_download`` of the model's files only, into ``weights/<name>``,
   or into the Hugging Face cache with ``DEEPSEEK_VL2_DOWNLOAD_TO=hf-cache``.

Steps 1-3 never touch the network. The download is the hub library's own, so its settings work as in every
tool built on it: ``HF_ENDPOINT`` (a mirror), ``HF_TOKEN`` (gated or private repos), ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE``/``HF_HOME``, Xet storage (``hf_xet``; ``HF_XET_HIGH_PERFORMANCE=1``), its progress bars on
stderr (``HF_HUB_DISABLE_PROGRESS_BARS=1``). Each of its failures becomes one ``WeightsError`` that says
what to do.

A model directory holds ``config.json`` and its safetensors weights: ``model.safetensors`` or an
index ``model.safetensors.index.json`` whose shards are all present.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

DEFAULT_WEIGHTS = "deepseek-ai/deepseek-vl2"
KNOWN_MODELS = (
    "deepseek-ai/deepseek-vl2-tiny",
    "deepseek-ai/deepseek-vl2-small",
    "deepseek-ai/deepseek-vl2",
)
PROJECT_DIR = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = PROJECT_DIR / "weights"

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
# What a download fetches (``allow_patterns``): the model's files at the top of the repo, no README,
# figures or other formats.
MODEL_FILE_PATTERNS = [*METADATA_FILES, INDEX_FILE, "*.safetensors"]
NOT_MODEL_FILE_PATTERNS = ["*/*"]  # (fnmatch's * crosses "/": a sub-folder's files are no part of the model)

# Where resolve_weights downloads a repo that is nowhere local: weights/<name> (default) or the HF cache.
DOWNLOAD_TO_VARIABLE = "DEEPSEEK_VL2_DOWNLOAD_TO"
DOWNLOAD_TO_CHOICES = ("weights", "hf-cache")

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
    """``owner/name``, as the hub accepts it."""
    if not _REPO_ID.match(spec) or ".." in spec or "--" in spec:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, as ``huggingface_hub`` chose it from the environment."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), as ``huggingface_hub`` read it."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def find_in_hf_cache(repo_id: str, cache_dir: Optional[Path] = None) -> Optional[Path]:
    """A complete snapshot of ``repo_id`` in the HF cache (no network): the one ``main`` names (the hub's
    own offline look-up), else the newest complete cached revision (an interrupted download of a newer
    revision leaves ``main`` on an incomplete snapshot)."""
    from huggingface_hub import scan_cache_dir, snapshot_download
    from huggingface_hub.errors import CacheNotFound, LocalEntryNotFoundError

    cache = Path(cache_dir) if cache_dir is not None else hf_hub_cache()
    try:
        main = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True,
                                      allow_patterns=MODEL_FILE_PATTERNS, ignore_patterns=NOT_MODEL_FILE_PATTERNS))
        if is_model_dir(main):
            return main
    except (LocalEntryNotFoundError, OSError):  # (IncompleteSnapshotError is a LocalEntryNotFoundError)
        pass
    try:
        scanned = scan_cache_dir(cache)
    except (CacheNotFound, OSError):
        return None
    for repo in scanned.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
                if is_model_dir(revision.snapshot_path):
                    return revision.snapshot_path
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
    cache = Path(cache_dir) if cache_dir is not None else hf_hub_cache()
    cached = find_in_hf_cache(spec, cache)
    if cached is not None:
        log(f"weights: using Hugging Face cache {cached}")
        return cached
    if not download:
        raise WeightsError(
            f"weights for {spec} are not in {baked} nor in the Hugging Face cache ({cache}); "
            f"run: python scripts/download_weights.py {spec}"
        )
    if hub_is_offline():
        raise WeightsError(
            f"HF_HUB_OFFLINE is set and the weights for {spec} are not complete in {baked} nor in the Hugging "
            f"Face cache ({cache}): unset HF_HUB_OFFLINE to download them, or download them where there is a "
            f"network (python scripts/download_weights.py {spec}) and set DEEPSEEK_VL2_WEIGHTS to that directory"
        )
    into_cache = download_destination() == "hf-cache"
    log(f"weights: {spec} is not local; downloading it into {cache if into_cache else baked}")
    return download_weights(spec, None if into_cache else baked, cache_dir=cache_dir, log=log)


def download_destination() -> str:
    """``$DEEPSEEK_VL2_DOWNLOAD_TO``: ``weights`` (``weights/<name>``, the default) or ``hf-cache``."""
    value = os.environ.get(DOWNLOAD_TO_VARIABLE, "").strip() or "weights"
    if value not in DOWNLOAD_TO_CHOICES:
        raise WeightsError(f"{DOWNLOAD_TO_VARIABLE}={value!r}: use {' or '.join(DOWNLOAD_TO_CHOICES)}")
    return value


# --------------------------------------------------------------------------------------------
# Downloading (huggingface_hub)


def download_weights(
    repo_id: str,
    target: Optional[Path] = None,
    *,
    cache_dir: Optional[Path] = None,
    revision: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Download the model files of ``repo_id`` with ``huggingface_hub.snapshot_download`` into ``target``
    (a plain directory), or into the Hugging Face cache when ``target`` is None; return the model directory.

    Files already complete (from an earlier, interrupted run) are kept; only what is missing or changed is
    fetched. The hub's progress bars show on stderr.
    """
    from huggingface_hub import snapshot_download

    if not is_repo_id(repo_id):
        raise WeightsError(f"{repo_id!r} is not a Hugging Face repo id (owner/name)")
    if target is not None:
        target = Path(target)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(target, exc) from None
    where = target if target is not None else (Path(cache_dir) if cache_dir is not None else hf_hub_cache())
    log(f"downloading {repo_id}{'@' + revision if revision else ''} from {hf_endpoint()} into {where}")
    try:
        path = Path(snapshot_download(
            repo_id, revision=revision, local_dir=target, cache_dir=cache_dir,
            allow_patterns=MODEL_FILE_PATTERNS, ignore_patterns=NOT_MODEL_FILE_PATTERNS,
        ))
    except Exception as exc:
        error = explain_hub_error(exc, repo_id, where, revision,
                                  needed=lambda: _download_size(repo_id, target, cache_dir, revision))
        if error is None:
            raise
        raise error from None
    path = target if target is not None else path  # (the hub answers with the real path of local_dir)
    missing = missing_files(path)
    if missing:
        raise WeightsError(
            f"{repo_id} was downloaded into {path} but is not a DeepSeek-VL2 model: it lacks {', '.join(missing)}"
        )
    log(f"downloaded {repo_id} into {path}")
    return path


def _download_size(repo_id: str, target: Optional[Path], cache_dir: Optional[Path],
                   revision: Optional[str]) -> Optional[int]:
    """Bytes of the model's files, from the listing the hub cached when the download began (None: unknown)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.utils import filter_repo_objects

    try:
        files = get_cached_repo_tree(repo_id, revision=revision, local_dir=target, cache_dir=cache_dir)
    except Exception:  # (no listing cached: the failure came before it)
        return None
    wanted = set(filter_repo_objects([f.path for f in files], allow_patterns=MODEL_FILE_PATTERNS,
                                     ignore_patterns=NOT_MODEL_FILE_PATTERNS))
    return sum(f.size for f in files if f.path in wanted)


def _causes(exc: Optional[BaseException]) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (the hub re-raises a network error as a cache miss)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def explain_hub_error(exc: BaseException, repo_id: str, where: Path, revision: Optional[str] = None, *,
                      needed: Callable[[], Optional[int]] = lambda: None) -> Optional[WeightsError]:
    """The ``WeightsError`` that says what went wrong in a download of ``repo_id`` into ``where`` and what to
    do about it; None for an error of another kind (a bug, an interrupt), which is left to propagate.
    ``needed()`` gives the bytes the model's files take (for a full disk), where known."""
    import httpx2
    from huggingface_hub.errors import (
        DisabledRepoError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = hf_endpoint()
    again = "run the same command again: the files already downloaded are kept and only the rest is fetched"
    for cause in _causes(exc):
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(cause, GatedRepoError):
            if status == 403:
                return WeightsError(
                    f"{repo_id} is a gated model and the token in HF_TOKEN has no access to it (HTTP 403): ask "
                    f"for access on {endpoint}/{repo_id} with the account the token belongs to")
            return WeightsError(
                f"{repo_id} is a gated model (HTTP {status}): accept its conditions on {endpoint}/{repo_id}, "
                "then set HF_TOKEN to an access token of that account")
        if isinstance(cause, RevisionNotFoundError):
            return WeightsError(f"{repo_id} has no revision {revision or 'main'!r} on {endpoint} (HTTP {status})")
        if isinstance(cause, DisabledRepoError):
            return WeightsError(f"{repo_id} is disabled on {endpoint} (HTTP {status})")
        if isinstance(cause, RepositoryNotFoundError):
            return WeightsError(
                f"{repo_id} is not available from {endpoint} (HTTP {status}); check the name "
                f"({', '.join(KNOWN_MODELS)}), or set HF_TOKEN if it is a private repo")
        if isinstance(cause, OfflineModeIsEnabled):
            return WeightsError(
                f"HF_HUB_OFFLINE is set and {repo_id} is not complete in {where}: unset HF_HUB_OFFLINE to "
                "download it")
        if isinstance(cause, FileMetadataError):
            return WeightsError(
                f"{endpoint} does not answer as a Hugging Face hub ({' '.join(str(cause).split())}); check HF_ENDPOINT")
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return _write_error(Path(cause.filename or where), cause, needed())
        if isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return _write_error(Path(cause.filename or where), cause)
        if isinstance(cause, (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.ProxyError)):
            through = " through the proxy (check HTTPS_PROXY)" if isinstance(cause, httpx2.ProxyError) else ""
            return WeightsError(
                f"cannot reach {endpoint}{through} to download {repo_id} ({cause.__class__.__name__}: "
                f"{' '.join(str(cause).split())}); check the network, or set HF_ENDPOINT to a mirror")
        if isinstance(cause, (httpx2.TransportError, httpx2.TimeoutException)) or (
                isinstance(cause, OSError) and str(cause).startswith("Consistency check failed")):
            return WeightsError(
                f"the download of {repo_id} into {where} was interrupted ({cause.__class__.__name__}: "
                f"{' '.join(str(cause).split())}); {again}")
        if isinstance(cause, HfHubHTTPError) and status is not None:
            return WeightsError(f"{endpoint} answered HTTP {status} during the download of {repo_id}; try again "
                                f"later ({again})")
    return None


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _write_error(path: Path, exc: OSError, needed: Optional[int] = None) -> WeightsError:
    """A failed write of a download as a ``WeightsError`` that names the place and what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{_human(shutil.disk_usage(_existing(path)).free)} free"
        except OSError:
            free = "free space unknown"
        need = f", the model's files need {_human(needed)} in all" if needed else ""
        return WeightsError(
            f"cannot write {path}: no space left on the device ({free}{need}). Free some space and run again "
            "(the files already downloaded are kept), or set DEEPSEEK_VL2_WEIGHTS to a model directory on a "
            "larger disk")
    reason = exc.strerror or str(exc)
    return WeightsError(
        f"cannot write {path}: {reason}. Download the weights where this user can write "
        "(python scripts/download_weights.py REPO --dest DIR) and set DEEPSEEK_VL2_WEIGHTS to that directory")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (for disk_usage)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
