"""deepseek_vl2/shutdown.py on its own: finding a process's listening sockets, and when the watch starts.
(The whole stop, SIGTERM to the real server: tests/test_reliability.py.)"""
from __future__ import annotations

import os
import socket

import pytest

from deepseek_vl2 import shutdown


def test_listening_sockets_sees_a_listener_come_and_go():
    before = shutdown.listening_sockets(os.getpid())
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()):  # (a connected socket is not a listener)
            during = shutdown.listening_sockets(os.getpid())
    after = shutdown.listening_sockets(os.getpid())
    assert len(during - before) == 1
    assert after == before


def test_no_watch_outside_a_cog_worker():
    """Under pytest (or python predict.py) the parent is not Cog's server: nothing is watched or stopped."""
    stopped = []
    assert shutdown.watch_cog_server(lambda: 0, lambda: stopped.append(True), poll_s=0.01) is None
    assert not stopped


@pytest.mark.parametrize("value,expected", [("", shutdown.DEFAULT_GRACE_S), ("0", 0.0), ("2.5", 2.5)])
def test_grace_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("DEEPSEEK_VL2_SHUTDOWN_GRACE_S", value)
    assert shutdown.grace_seconds() == expected


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_grace_is_refused_clearly(monkeypatch, value):
    monkeypatch.setenv("DEEPSEEK_VL2_SHUTDOWN_GRACE_S", value)
    with pytest.raises(SystemExit, match="DEEPSEEK_VL2_SHUTDOWN_GRACE_S must be"):
        shutdown.grace_seconds()
