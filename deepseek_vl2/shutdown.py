"""A bounded stop when Cog's server is told to stop (SIGTERM, or ``POST /shutdown``).

Cog 0.23's server (coglet, in Rust) answers SIGTERM by closing its listening socket at once and then waiting
for every prediction in flight to finish, however long that takes: a 2,048-token answer on a CPU holds the
stop for minutes, and a container manager then kills it without a word. The worker process that runs the
model is not told; SIGTERM goes to the server alone.

So a thread in the worker watches its parent's listening socket. Once the server no longer listens (or the
worker has a new parent: the server is gone), the predictions in flight get ``grace_s`` more seconds to
finish, and then the batching engine is stopped: whatever is still in flight fails with "the engine was
stopped", the server's wait ends, and every process exits. With the default grace of 5 s that is within
10 s of the SIGTERM (measured in ``tests/test_reliability.py``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

DEFAULT_GRACE_S = 5.0
POLL_S = 0.2
_LISTEN = "0A"  # the TCP state LISTEN in /proc/net/tcp


def grace_seconds() -> float:
    """``DEEPSEEK_VL2_SHUTDOWN_GRACE_S`` (seconds >= 0), else ``DEFAULT_GRACE_S``."""
    value = os.environ.get("DEEPSEEK_VL2_SHUTDOWN_GRACE_S", "").strip()
    try:
        grace = float(value) if value else DEFAULT_GRACE_S
    except ValueError:
        raise SystemExit(f"DEEPSEEK_VL2_SHUTDOWN_GRACE_S must be a number of seconds, got {value!r}") from None
    if not grace >= 0:
        raise SystemExit(f"DEEPSEEK_VL2_SHUTDOWN_GRACE_S must be >= 0, got {value!r}")
    return grace


def listening_sockets(pid: int) -> set[int]:
    """Inodes of the TCP sockets that process ``pid`` holds open in the LISTEN state (empty if unknown)."""
    listening: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _LISTEN:
                listening.add(int(fields[9]))
    held: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return held
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = int(target[len("socket:["):-1])
            if inode in listening:
                held.add(inode)
    return held


def _is_cog_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"cog.server.http" in cmdline


def watch_cog_server(in_flight: Callable[[], int], stop: Callable[[], None], *, grace_s: Optional[float] = None,
                     poll_s: float = POLL_S, log: Callable[[str], None] = lambda msg: print(msg, flush=True),
                     ) -> Optional[threading.Thread]:
    """Start the watch (a daemon thread) when this process is a worker of Cog's server; else return None.

    ``in_flight()`` counts the predictions in flight; ``stop()`` ends them (the engine's ``stop``).
    """
    server = os.getppid()
    if not _is_cog_server(server):
        return None  # (python predict.py, the tests, a notebook: nothing to watch)
    grace = grace_seconds() if grace_s is None else grace_s

    def watch() -> None:
        armed = False  # the server listened at least once (it starts listening before the worker's setup)
        quiet = 0  # polls in a row that found no listening socket (two are needed: never act on one glance)
        while True:
            time.sleep(poll_s)
            gone = os.getppid() != server
            listening = not gone and bool(listening_sockets(server))
            armed = armed or listening
            quiet = 0 if listening else quiet + 1
            if gone or (armed and quiet >= 2):
                break
        deadline = time.monotonic() + grace
        left = in_flight()
        if left:
            log(f"the server is stopping: {left} prediction(s) in flight get {grace:g} s to finish")
        while left and time.monotonic() < deadline:
            time.sleep(poll_s)
            left = in_flight()
        if left:
            log(f"the server is stopping: stopping {left} prediction(s) still in flight")
        stop()

    thread = threading.Thread(target=watch, name="deepseek-vl2-shutdown-watch", daemon=True)
    thread.start()
    return thread
