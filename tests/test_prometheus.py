"""A real Prometheus (Debian's ``prometheus``) scrapes the real daemon on loopback.

Two scrape jobs point at the same endpoint: ``empath`` sends the bearer token from a
``credentials_file``, ``empath-no-token`` does not. Prometheus's own HTTP API must
then report the first target up and the second down with a 401, and return
``empath_messages_received_total`` once a message was received.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool
from tests.harness import Daemon, free_port, send_message
from tests.test_metrics import metrics_daemon, token_file

MakeDaemon = Callable[..., Daemon]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[Daemon], str]]:
    binary = require_tool("prometheus")
    procs: list[subprocess.Popen[bytes]] = []

    def start(d: Daemon) -> str:
        port = free_port()
        target = f"127.0.0.1:{d.metrics_port}"  # type: ignore[attr-defined]
        credentials = token_file(d, 0o600)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {"job_name": "empath", "static_configs": [{"targets": [target]}],
                 "authorization": {"type": "Bearer",
                                   "credentials_file": str(credentials)}},
                {"job_name": "empath-no-token", "static_configs": [{"targets": [target]}]},
            ],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT))
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(30)


def api(base: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{base}/api/v1/{path}{query}", timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def eventually(fetch: Callable[[], Any], ok: Callable[[Any], bool], what: str,
               timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fetch()
            if ok(last):
                return last
        except OSError as exc:  # Prometheus still starting
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def test_prometheus_scrapes_with_the_token_and_is_refused_without(
        make_daemon: MakeDaemon, prometheus: Callable[[Daemon], str]) -> None:
    d = metrics_daemon(make_daemon)
    code, _ = asyncio.run(send_message(d.smtp_port, "a@test.example", ["b@test.example"],
                                       b"Subject: scraped\r\n\r\nhello\r\n"))
    assert code == 250
    base = prometheus(d)

    def targets() -> dict[str, dict[str, Any]]:
        return {t["labels"]["job"]: t for t in api(base, "targets")["activeTargets"]}

    both = eventually(targets, lambda t: len(t) == 2 and all(
        x["health"] != "unknown" for x in t.values()), "both targets to be scraped")
    assert both["empath"]["health"] == "up", both["empath"]
    assert both["empath-no-token"]["health"] == "down"
    assert "401" in both["empath-no-token"]["lastError"], both["empath-no-token"]

    up = api(base, "query", query='up{job="empath"}')["result"]
    assert [r["value"][1] for r in up] == ["1"]
    down = api(base, "query", query='up{job="empath-no-token"}')["result"]
    assert [r["value"][1] for r in down] == ["0"]
    received = eventually(
        lambda: api(base, "query", query='empath_messages_received_total{job="empath"}'),
        lambda r: len(r["result"]) == 2, "empath_messages_received_total")
    by_listener = {r["metric"]["listener"]: r["value"][1] for r in received["result"]}
    # exported from the start with 0, so rate() sees the first message too
    assert by_listener == {"smtp": "1", "submission": "0"}
