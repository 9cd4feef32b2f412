"""A loopback stand-in for the Hugging Face hub, answering the requests ``huggingface_hub`` makes to download
a model (read from huggingface_hub 2.4's ``snapshot_download`` / ``hf_hub_download``):

* ``GET /api/models/{repo}/revision/{rev}`` (and ``/api/models/{repo}``): the model's info, whose ``sha`` is
  the commit the download pins;
* ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the file listing (path, size, git oid, LFS sha256);
* ``HEAD`` and ``GET /{repo}/resolve/{rev}/{path}``: a file, with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length`` (the hub refuses a response without the first two), ``Range: bytes=N-`` answered 206.

Errors as the real hub gives them: an unknown repo is 404 with ``X-Error-Code: RepoNotFound``; a file of a
gated repo is 401 ``GatedRepo`` without a token and 403 ``GatedRepo`` with a token that has no access.
No ``X-Xet-Hash`` header and no ``xetHash`` in the listing: files come over plain HTTP, never Xet.

Faults for the tests: ``cut_after[name] = n`` closes the connection after ``n`` bytes of that file's next
full GET (once); ``broken`` names files whose GET answers 500 until removed from it.

``hub_settings`` points the ``huggingface_hub`` already imported in this process at the stand-in: the
library reads ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when it is imported, as a real
process has them from its start. Subprocesses get the same settings through the environment alone.
``fill_the_disk_on`` makes the library's writes of one file fail with ENOSPC.
"""
from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import socket
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    """Serves ``repos`` ({repo id: {path in repo: bytes}}) on 127.0.0.1; ``gated`` maps a repo id to the one
    token that may read its files. ``requests`` records (method, path, Range header, Authorization header)."""

    def __init__(self, repos: dict[str, dict[str, bytes]], *, gated: Optional[dict[str, str]] = None) -> None:
        self.repos = repos
        self.gated = gated or {}
        self.cut_after: dict[str, int] = {}
        self.broken: set[str] = set()
        self.requests: list[tuple[str, str, Optional[str], Optional[str]]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                hub._answer(self, head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                hub._answer(self, head=True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @classmethod
    def serving(cls, repo_id: str, model_dir: Path, *, extra: Optional[dict[str, bytes]] = None,
                **kwargs) -> "HubStandIn":
        """A hub holding ``repo_id`` with the files of ``model_dir`` (plus ``extra`` files, e.g. a README)."""
        files = {p.name: p.read_bytes() for p in sorted(Path(model_dir).iterdir()) if p.is_file()}
        return cls({repo_id: {**files, **(extra or {})}}, **kwargs)

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---------------------------------------------------------------------------------------------

    def commit(self, repo_id: str) -> str:
        """The repo's commit: a hash of its files, so that changing a file makes a new revision."""
        digest = hashlib.sha1(repo_id.encode())
        for name, data in sorted(self.repos[repo_id].items()):
            digest.update(name.encode() + b"\0" + _sha256(data).encode())
        return digest.hexdigest()

    def file_gets(self, name: str) -> list[Optional[str]]:
        """The Range header of every GET of a file called ``name`` (None: the whole file)."""
        return [rng for method, path, rng, _ in self.requests if method == "GET" and "/resolve/" in path
                and path.endswith("/" + name)]

    def _answer(self, handler: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(handler.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        auth = handler.headers.get("Authorization")
        with self._lock:
            self.requests.append((handler.command, url.path, handler.headers.get("Range"), auth))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            if repo_id not in self.repos:
                return self._send(handler, 404, b'{"error": "Repository not found"}', head,
                                  {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            commit = self.commit(repo_id)
            if parts[4:5] == ["tree"]:
                return self._send(handler, 200, json.dumps(self._tree(repo_id)).encode(), head)
            info = {"id": repo_id, "sha": commit, "private": False, "gated": "manual" if repo_id in self.gated else False,
                    "siblings": [{"rfilename": name} for name in sorted(self.repos[repo_id])]}
            return self._send(handler, 200, json.dumps(info).encode(), head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo_id not in self.repos:
                return self._send(handler, 404, b"Repository not found", head,
                                  {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            commit = self.commit(repo_id)
            if repo_id in self.gated and auth != f"Bearer {self.gated[repo_id]}":
                code = 401 if auth is None else 403
                message = (f"Access to model {repo_id} is restricted. You must have access to it and be "
                           "authenticated to access it. Please log in." if code == 401 else
                           f"Access to model {repo_id} is restricted and you are not in the authorized list.")
                return self._send(handler, code, message.encode(), head,
                                  {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
            data = self.repos[repo_id].get(name)
            if data is None or parts[3] not in ("main", commit):
                return self._send(handler, 404, b"Entry not found", head,
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            headers = {"X-Repo-Commit": commit, "ETag": f'"{_sha256(data)}"', "Accept-Ranges": "bytes"}
            if not head and name in self.broken:
                return self._send(handler, 500, b"Internal Error", head, headers)
            start = self._range_start(handler.headers.get("Range"))
            if start:
                if start >= len(data):
                    return self._send(handler, 416, b"", head, {**headers, "Content-Range": f"bytes */{len(data)}"})
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(handler, 206, data[start:], head, headers)
            cut = None if head else self.cut_after.pop(name, None)
            return self._send(handler, 200, data, head, headers, cut=cut)
        self._send(handler, 404, b"not a hub endpoint", head)

    def _tree(self, repo_id: str) -> list[dict]:
        entries = []
        for name, data in sorted(self.repos[repo_id].items()):
            entry = {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
            if name.endswith(".safetensors"):  # the hub stores weights in LFS
                entry["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries

    @staticmethod
    def _range_start(header: Optional[str]) -> int:
        if not header or not header.startswith("bytes="):
            return 0
        return int(header[len("bytes="):].split("-")[0] or 0)

    @staticmethod
    def _send(handler, code: int, body: bytes, head: bool, headers: Optional[dict] = None,
              cut: Optional[int] = None) -> None:
        handler.send_response(code)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if head:
            return
        if cut is None:
            handler.wfile.write(body)
            return
        handler.wfile.write(body[:cut])  # then the connection drops, as a network failure would
        handler.wfile.flush()
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def hub_settings(monkeypatch, *, cache: Path, endpoint: Optional[str] = None, offline: bool = False,
                 token: Optional[str] = None) -> None:
    """Give this process's ``huggingface_hub`` (and any subprocess) these settings: ``HF_HUB_CACHE``,
    ``HF_ENDPOINT`` (default: the real hub's), ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` (unset where None)."""
    from huggingface_hub import constants

    for name in ("HF_ENDPOINT", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    endpoint = (endpoint or constants._HF_DEFAULT_ENDPOINT).rstrip("/")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    # No token file of the machine's own user: only HF_TOKEN counts here.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(Path(cache) / "no-token-file"))


class FullDisk:
    """A download's temporary file on a disk that fills up after ``room`` bytes."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if self.file.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def fill_the_disk_on(name: str, monkeypatch) -> None:
    """Downloads of files called ``name`` fail with ENOSPC after 4 KiB (simulated in the hub's downloader)."""
    from huggingface_hub import file_download

    real_http_get = file_download.http_get

    def http_get(url, temp_file, **kwargs):
        return real_http_get(url, FullDisk(temp_file, 4096) if url.endswith("/" + name) else temp_file, **kwargs)

    monkeypatch.setattr(file_download, "http_get", http_get)
