"""Fixtures shared by the suite: a real daemon on loopback, and the reply audit."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPLIES, Daemon, base_config, free_port
from tests.sinks import SinkLoop

IN_CI = os.environ.get("CI") == "true"

ENHANCED = re.compile(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3}( |$)")


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``make_daemon(**config_overrides)`` → a started Daemon (stopped after)."""
    started: list[Daemon] = []

    def factory(start: bool = True, **overrides: Any) -> Daemon:
        workdir = tmp_path / f"d{len(started)}"
        workdir.mkdir()
        smtp, sub = free_port(), free_port()
        cfg = base_config(workdir / "state", smtp, sub)
        cfg.update(overrides)
        d = Daemon(workdir, cfg, smtp, sub)
        started.append(d)
        if start:
            d.start()
        return d

    yield factory
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()


@pytest.fixture
def sinks() -> Iterator[SinkLoop]:
    """A SinkLoop, closed (its sinks stopped) after the test."""
    s = SinkLoop()
    yield s
    s.close()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every 2xx/4xx/5xx reply seen in the suite must carry an enhanced status code."""
    bad = [(ctx, line) for ctx, line in REPLIES
           if line[:1] in "245" and not ENHANCED.match(line)]
    if bad:
        print("\nReplies without an enhanced status code (RFC 2034):")
        for ctx, line in bad[:50]:
            print(f"  [{ctx}] {line}")
        session.exitstatus = 1
    elif REPLIES:
        print(f"\nreply audit: {len(REPLIES)} replies checked, all carry enhanced status codes")


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, but under CI=true a skip is a failure."""
    import shutil

    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}")
                                  else None)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required under CI=true but is not installed")
        pytest.skip(f"{name} not installed")
    return path
