"""Modules (docs/modules.md) against the real daemon: real SMTP sessions, real
delivery to aiosmtpd sinks, restarts and reloads. The test module is
tests/modfixtures.py (loaded by dotted path); the built-ins are recipient_map and
header_checks; examples/empath-example-module is pip-installed and loaded by its
entry point.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from empath.config import ConfigError, load_config_text
from empath.modules.api import Reject, Tempfail
from tests.harness import (
    REPO,
    Daemon,
    RawClient,
    children_of,
    commit_unreported,
    free_port,
    queued_id,
    send_message,
    spool_record,
    wait_until,
)
from tests.sinks import Script, SinkLoop, SMTPSink

MakeDaemon = Callable[..., Daemon]
# Module hooks, restarts and reloads: these waits had a minute each.
wait_long = functools.partial(wait_until, timeout=60.0)
PROBE = "tests.modfixtures:Probe"
LENIENT = "tests.modfixtures:Lenient"
EXAMPLE = REPO / "examples" / "empath-example-module"


def probe(actions: list[dict[str, Any]], record: Path | None = None, *,
          name: str = PROBE, **spec: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"actions": actions}
    if record is not None:
        options["record"] = str(record)
    return {"name": name, "options": options, **spec}


def records(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in rows if event is None or r["event"] == event]


def ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EMPATH_CONTROL_SOCKET", "EMPATH_CONFIG", "EMPATH_CONTROL_TOKEN")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "empath.ctl", "--socket", str(d.state_dir / "control.sock"),
         *args], capture_output=True, text=True, env=env, timeout=60, check=False,
        stdin=subprocess.DEVNULL)


def reload(d: Daemon) -> None:
    d.write_config()
    p = ctl(d, "reload", "--wait")
    assert p.returncode == 0, (p.stdout, p.stderr, d.log())


def envelope(d: Daemon, queue_id: str) -> dict[str, Any]:
    return spool_record(d.queue_dir, queue_id)


def spool_files(d: Daemon) -> list[str]:
    spool = d.state_dir / "spool"
    return sorted(p.name for sub in ("queue", "tmp") for p in (spool / sub).iterdir())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def sink(sinks: SinkLoop, script: Script | None = None) -> SMTPSink:
    return sinks.start(SMTPSink(script, host="127.0.0.1"))


# ---- the API's own checks ------------------------------------------------------------


def test_verdicts_must_carry_a_matching_enhanced_code() -> None:
    assert Reject(550, "5.1.1", "no such user").reply == "550 5.1.1 no such user"
    assert Tempfail().reply.startswith("451 4.")
    for bad in (lambda: Reject(250, "2.0.0", "x"), lambda: Reject(550, "4.7.1", "x"),
                lambda: Tempfail(550, "5.7.1", "x"), lambda: Reject(550, "5.7.1", "a\r\nb"),
                lambda: Reject(550, "5.7", "x")):
        with pytest.raises(ValueError):
            bad()


# ---- configuration: validated at start, errors name the key -------------------------


def issues_of(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    return {i.key_path: i.message for i in info.value.issues}


def test_config_errors_name_the_module_and_its_options(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("- {header: Subject, regex: 'x(', action: reject}\n")
    found = issues_of(f"""
state_dir: {tmp_path}
local_domains: [example.com]
modules:
  - {{name: no_such_module}}
  - {{name: recipient_map}}
  - {{name: header_checks, options: {{rules: [{{header: Subject, regex: "a(", action: reject}}]}}}}
  - {{name: "{PROBE}", options: {{actions: [{{do: dance}}]}}}}
  - {{name: "{PROBE}"}}
  - {{name: "tests.modfixtures:Nothing"}}
  - {{name: "{LENIENT}", options: {{}}, timeout: 2}}
""")
    assert set(found) == {"modules[0].name", "modules[1].options.path",
                          "modules[2].options.rules[0].regex", "modules[3].options.actions[0].do",
                          "modules[4].name", "modules[5].name"}
    assert "unknown module 'no_such_module'" in found["modules[0].name"]
    assert "recipient_map" in found["modules[0].name"]  # the known names are listed
    assert "already modules[3]" in found["modules[4].name"]
    assert "Nothing" in found["modules[5].name"]

    found = issues_of(f"""
state_dir: {tmp_path}
modules:
  - {{name: recipient_map, options: {{path: {tmp_path}/missing}}, fail_open: maybe}}
  - {{name: recipient_map, options: {{path: {tmp_path}/missing}}, timeout: 301}}
  - {{name: recipient_map, options: {{path: {tmp_path}/missing}}, timeout: 0}}
  - {{name: recipient_map, options: {{path: {tmp_path}/missing}}, colour: red}}
""")
    assert set(found) == {"modules[0].fail_open", "modules[1].timeout", "modules[2].timeout",
                          "modules[3].colour"}

    found = issues_of(f"""
state_dir: {tmp_path}
modules:
  - {{name: recipient_map, options: {{path: {tmp_path}/missing}}}}
  - {{name: header_checks, options: {{path: {rules}}}}}
""")
    assert set(found) == {"modules[0].options.path", "modules[1].options.path"}
    assert "No such file" in found["modules[0].options.path"]
    assert "rules[0].regex" in found["modules[1].options.path"]

    rules.write_text("- {header: Subject, regex: '^spam', action: hold, text: suspicious}\n")
    cfg = load_config_text(f"""
state_dir: {tmp_path}
modules:
  - {{name: header_checks, options: {{path: {rules}}}, fail_open: true, timeout: 2.5}}
""")
    spec = cfg.modules[0]
    assert (spec.name, spec.fail_open, spec.timeout) == ("header_checks", True, 2.5)


def test_a_bad_module_stops_the_start_with_status_2(make_daemon: MakeDaemon) -> None:
    d = make_daemon(start=False, modules=[{"name": "recipient_map",
                                           "options": {"path": "/nonexistent/map"}}])
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 2
    assert "modules[0].options.path" in d.log()
    p = subprocess.run([sys.executable, "-m", "empath", "check-config", "--config",
                        str(d.config_path)], capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode != 0 and "modules[0].options.path" in p.stdout + p.stderr


# ---- a module refusing at each stage -------------------------------------------------


STAGE_ACTIONS = [
    {"stage": "helo", "when": "bad.helo", "do": "reject",
     "reply": [550, "5.7.1", "HELO name refused by probe"]},
    {"stage": "mail", "when": "refused-sender", "do": "reject",
     "reply": [553, "5.7.1", "sender refused by probe"]},
    {"stage": "rcpt", "when": "refused-rcpt", "do": "reject",
     "reply": [550, "5.1.1", "recipient refused by probe"]},
    {"stage": "rcpt", "when": "greylist", "do": "reject",
     "reply": [450, "4.7.1", "greylisted, try again later"]},
    {"stage": "data", "when": "refused-data", "do": "reject",
     "reply": [554, "5.7.1", "content refused by probe"]},
]


def test_a_module_refusing_at_each_stage_gives_the_client_its_reply(
        make_daemon: MakeDaemon) -> None:
    d = make_daemon(modules=[probe(STAGE_ACTIONS)])

    async def main() -> None:
        c = await RawClient.connect(d.smtp_port, "modules-stages")
        assert (await c.reply(record=False))[0] == 220
        assert await c.cmd("EHLO bad.helo") == (550, "5.7.1 HELO name refused by probe")
        assert (await c.cmd("MAIL FROM:<alice@test.example>"))[0] == 503  # no HELO yet
        c.send(b"EHLO good.helo\r\n")
        assert (await c.lines())[-1].startswith("250 ")
        assert await c.cmd("MAIL FROM:<refused-sender@test.example>") == (
            553, "5.7.1 sender refused by probe")
        assert (await c.cmd("MAIL FROM:<alice@test.example>"))[0] == 250
        assert await c.cmd("RCPT TO:<refused-rcpt@test.example>") == (
            550, "5.1.1 recipient refused by probe")
        assert await c.cmd("RCPT TO:<greylist@test.example>") == (
            450, "4.7.1 greylisted, try again later")
        assert (await c.cmd("RCPT TO:<bob@test.example>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        c.send(b"Subject: refused-data\r\n\r\nnot wanted\r\n.\r\n")
        assert await c.reply() == (554, "5.7.1 content refused by probe")
        await c.cmd("QUIT")
        await c.close()
        # nothing of the refused message is left; the next one goes through
        assert spool_files(d) == []
        code, text = await send_message(d.smtp_port, "alice@test.example",
                                        ["bob@test.example"], b"Subject: fine\r\n\r\nok\r\n",
                                        "modules-stages")
        assert code == 250, text
        assert d.queued_ids() == {queued_id(text)}

    run(main())
    assert "module tests.modfixtures:Probe refused rcpt" in d.log()


@pytest.mark.parametrize("do", ["reject", "raise"])
def test_a_module_refusing_the_connection(make_daemon: MakeDaemon, do: str) -> None:
    action = {"stage": "connect", "when": "127.0.0.1", "do": do,
              "reply": [554, "5.7.1", "no service for 127.0.0.1"]}
    d = make_daemon(modules=[probe([action])])

    async def main() -> tuple[int, str, bool]:
        c = await RawClient.connect(d.smtp_port, "modules-connect")
        code, text = await c.reply()
        closed = await c.at_eof()
        await c.close()
        return code, text, closed

    code, text, closed = run(main())
    if do == "reject":
        assert (code, text) == (554, "5.7.1 no service for 127.0.0.1")
    else:  # only 220, 421 and 554 may greet: a failing module is 421 4.3.0
        assert code == 421 and text.startswith("4.3.0 mx.test.example ")
        assert "module tests.modfixtures:Probe failed in connect" in d.log()
    assert closed


# ---- containment: raising, sleeping, fail_open ---------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def counter(body: str, module: str, hook: str) -> float:
    labels = rf'(?=[^}}]*hook="{re.escape(hook)}")(?=[^}}]*module="{re.escape(module)}")'
    m = re.search(r"^empath_module_errors_total\{" + labels + r"[^}]*\} (\S+)$", body, re.M)
    assert m, body
    return float(m.group(1))


def test_raising_and_sleeping_modules_tempfail_while_others_are_served(
        make_daemon: MakeDaemon) -> None:
    mport = free_port()
    d = make_daemon(workers=1, metrics={"listen": f"127.0.0.1:{mport}"}, modules=[
        probe([{"stage": "mail", "when": "boom", "do": "raise"},
               {"stage": "mail", "when": "slow", "do": "sleep"}], timeout=5),
        probe([{"stage": "rcpt", "when": "explode", "do": "raise"}], name=LENIENT,
              fail_open=True),
    ])
    before = scrape(mport)
    assert counter(before, PROBE, "mail") == 0.0  # the series exist from the start

    async def main() -> None:
        slow = await RawClient.connect(d.smtp_port, "modules-slow")
        await slow.greet()
        slow.send(b"MAIL FROM:<slow@test.example>\r\n")  # its module now sleeps
        # one worker, one event loop: this client is served while that one waits
        code, text = await send_message(d.smtp_port, "alice@test.example",
                                        ["bob@test.example"], b"Subject: a\r\n\r\nb\r\n",
                                        "modules-meanwhile")
        assert code == 250, text
        code, text = await slow.reply(timeout=30)
        assert (code, text[:5]) == (451, "4.3.0")
        # the session goes on; a fail_open module that raises lets the recipient in
        assert (await slow.cmd("MAIL FROM:<alice@test.example>"))[0] == 250
        assert (await slow.cmd("RCPT TO:<explode@test.example>"))[0] == 250
        assert (await slow.cmd("DATA"))[0] == 354
        slow.send(b"Subject: through\r\n\r\nfail open\r\n.\r\n")
        code, text = await slow.reply()
        assert code == 250, text
        await slow.close()

        boom = await RawClient.connect(d.smtp_port, "modules-boom")
        await boom.greet()
        code, text = await boom.cmd("MAIL FROM:<boom@test.example>")
        assert (code, text[:5]) == (451, "4.3.0")
        await boom.close()

    run(main())
    assert d.proc is not None and d.proc.poll() is None
    log = d.log()
    assert re.search(r"module tests\.modfixtures:Probe failed in mail: no answer within 5 s; "
                     r"tempfail .*EMPATH_EVENT=module-error", log), log
    assert re.search(r"module tests\.modfixtures:Probe failed in mail: raised RuntimeError: "
                     r"probe exploded at mail; tempfail .*EMPATH_EVENT=module-error", log), log
    assert "module tests.modfixtures:Lenient failed in rcpt: raised RuntimeError" in log
    assert "continuing as if it accepted (fail_open)" in log
    assert len(d.queued_ids()) == 2
    after = scrape(mport)
    assert counter(after, PROBE, "mail") == 2.0
    assert counter(after, LENIENT, "rcpt") == 1.0
    assert d.stop() == 0


# ---- metadata from DATA to the delivery events, across a restart -------------------


def test_metadata_set_at_data_reaches_the_delivery_events_after_a_restart(
        make_daemon: MakeDaemon, sinks: SinkLoop, tmp_path: Path) -> None:
    remote = sink(sinks, Script(rcpt_replies={"gone@remote.test": "550 5.1.1 no such user",
                                              "later@remote.test": "451 4.2.0 busy"}))
    rec = tmp_path / "events.jsonl"
    actions = [
        {"stage": "mail", "do": "set", "metadata": {"sender_seen": True}},
        {"stage": "mail", "do": "header", "header": ["X-Probe-Mail", "on-mail"]},
        {"stage": "data", "do": "inspect"},
        {"stage": "data", "do": "set", "metadata": {"verdict": "clean", "score": 1.5,
                                                    "tags": ["a", "b"]}},
        {"stage": "data", "do": "header", "header": ["X-Probe-Data", "on-data"]},
    ]
    d = make_daemon(start=False, local_domains=["test.example"], modules=[probe(actions, rec)],
                    delivery={"mode": "hold"})
    d.start()
    body = b"Subject: persisted\r\nFrom: alice@test.example\r\n\r\nthe body\r\n"
    code, text = run(send_message(d.smtp_port, "alice@test.example",
                                  ["ok@remote.test", "gone@remote.test", "later@remote.test"],
                                  body, "modules-persist"))
    assert code == 250, text
    qid = queued_id(text)
    expected = {"sender_seen": True, "verdict": "clean", "score": 1.5, "tags": ["a", "b"]}
    env = envelope(d, qid)
    assert env["metadata"] == {"modules": {PROBE: expected}}
    # on_data saw the header (ours first, the one added at MAIL), the body and the size
    seen = records(rec, "inspect")[0]
    assert seen["subject"] == "persisted" and seen["first"] == "Received"
    assert seen["fields"][:2] == ["Received", "X-Probe-Mail"]
    assert seen["body_sha256"] == hashlib.sha256(b"the body\r\n").hexdigest()
    assert seen["size"] == seen["whole"]
    assert seen["metadata"] == {"sender_seen": True}  # what MAIL set, before this call's
    assert env["size"] == seen["size"] + len(b"X-Probe-Data: on-data\r\n")
    spooled = d.message_bytes(qid)
    assert re.match(rb"Received: [^:]*? id " + qid.encode() + rb"[;\r]", spooled), spooled[:300]
    head = spooled.split(b"\r\n\r\n", 1)[0]
    assert head.index(b"X-Probe-Mail: on-mail") < head.index(b"X-Probe-Data: on-data") \
        < head.index(b"Subject: persisted")
    wait_long(lambda: records(rec, "received"), "the received event", d)
    assert records(rec, "received")[0]["metadata"] == expected

    # A restart in between: the context comes back from the spool.
    assert d.stop() == 0
    d.log_path.rename(d.workdir / "daemon-1.log")  # wait_ready looks for a new "ready"
    d.start()
    assert d.queued_ids() == {qid}
    d.config["delivery"] = {"mode": "mx", "retry_schedule": [3600], "routes": {
        "test.example": f"maildir:{tmp_path / 'mail'}",
        "remote.test": f"smtp:127.0.0.1:{remote.port}"}}
    reload(d)

    def outcomes() -> dict[str, dict[str, Any]]:
        return {r["recipient"]: r for r in records(rec)
                if r.get("queue_id") == qid and r["event"] in ("delivered", "bounced", "deferred")}

    wait_long(lambda: len(outcomes()) == 3, "three outcomes", d)
    got = outcomes()
    assert {a: r["event"] for a, r in got.items()} == {
        "ok@remote.test": "delivered", "gone@remote.test": "bounced",
        "later@remote.test": "deferred"}
    assert all(r["metadata"] == expected for r in got.values())
    assert got["gone@remote.test"]["enhanced"] == "5.1.1"
    attempt = [r for r in records(rec, "delivery_attempt") if r.get("queue_id") == qid]
    assert sorted(attempt[0]["due"]) == ["gone@remote.test", "later@remote.test",
                                         "ok@remote.test"]
    kinds = [r["event"] for r in records(rec) if r.get("queue_id") == qid]
    assert kinds.index("received") < kinds.index("delivery_attempt") < kinds.index("delivered")
    delivered = remote.delivered[0].data or b""
    assert b"X-Probe-Data: on-data\r\n" in delivered and b"X-Probe-Mail: on-mail\r\n" in delivered

    # The deferred one runs out of queue lifetime: expired, then bounced.
    d.config["delivery"]["max_queue_lifetime"] = 1
    reload(d)
    assert ctl(d, "queue", "retry", qid).returncode == 0
    wait_long(lambda: [r["event"] for r in records(rec) if r.get("queue_id") == qid
                      and r["recipient"] == "later@remote.test"][-2:] == ["expired", "bounced"],
             "later@ to expire", d)
    expired = next(r for r in records(rec, "expired") if r.get("queue_id") == qid)
    assert expired["metadata"] == expected and expired["enhanced"] == "4.4.7"
    assert d.stop() == 0


def test_a_message_the_supervisor_adopts_after_a_worker_died_is_received_once(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    # A worker's "queued" notices leave in batches; a kill can take the last with it,
    # and the supervisor then finds the message in the spool (scenario 11c). Modules
    # must hear of it then, as of any other message, and only once.
    rec = tmp_path / "events.jsonl"
    d = make_daemon(start=False, local_domains=["test.example"], modules=[probe([], rec)],
                    delivery={"mode": "hold"})
    d.start()
    code, text = run(send_message(d.smtp_port, "alice@test.example", ["bob@test.example"],
                                  b"Subject: told\r\n\r\nreported\r\n", "adopt-told"))
    assert code == 250, text
    told = queued_id(text)
    wait_long(lambda: records(rec, "received"), "the received event of the reported one", d)
    untold = commit_unreported(d.state_dir, b"Subject: untold\r\n\r\nnever reported\r\n",
                               "alice@test.example", "carol@test.example")
    assert d.proc is not None
    os.kill(min(children_of(d.proc.pid)), signal.SIGKILL)
    wait_long(lambda: any(r["queue_id"] == untold for r in records(rec, "received")),
              "the received event of the adopted message", d)
    time.sleep(1.5)  # the restarted worker and the supervisor settle: nothing more comes
    got = [r["queue_id"] for r in records(rec, "received")]
    assert sorted(got) == sorted([told, untold])
    assert next(r for r in records(rec, "received") if r["queue_id"] == untold)["helo"] \
        == "client.test"


# ---- the built-ins -------------------------------------------------------------------


async def rcpt_replies(port: int, rcpts: list[str]) -> list[tuple[int, str]]:
    c = await RawClient.connect(port, "recipient-map")
    try:
        await c.greet()
        assert (await c.cmd("MAIL FROM:<someone@elsewhere.example>"))[0] == 250
        return [await c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
    finally:
        await c.close()


def test_recipient_map_refuses_unknown_local_users_and_follows_reloads(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    path = tmp_path / "recipients"
    path.write_text("# who gets mail here\nalice@test.example\n"
                    "@bücher.example   # the whole domain\n")
    d = make_daemon(modules=[{"name": "recipient_map", "options": {"path": str(path)}}])
    unknown = "550 5.1.1 <bob@test.example>: Recipient address rejected: " \
              "User unknown in local recipient table"
    rcpts = ["alice@test.example", "ALICE@Test.Example", "bob@test.example",
             "postmaster@test.example", "Postmaster", "anyone@xn--bcher-kva.example",
             "someone@relayed.example"]
    got = run(rcpt_replies(d.smtp_port, rcpts))
    assert [code for code, _ in got] == [250, 250, 550, 250, 250, 250, 250]
    assert f"{got[2][0]} {got[2][1]}" == unknown

    # The file changes; a reload builds the module again, which reads it again.
    path.write_text(path.read_text() + "bob@test.example\n")
    reload(d)
    assert [c for c, _ in run(rcpt_replies(d.smtp_port, ["bob@test.example",
                                                         "carol@test.example"]))] == [250, 550]

    # A broken file: the reload is refused, the module in force stays as it was.
    path.write_text("carol@test.example\nnot an address\n")
    d.write_config()
    p = ctl(d, "reload", "--wait")
    assert p.returncode != 0
    assert "modules[0].options.path" in p.stdout + p.stderr and "line 2" in p.stdout + p.stderr
    assert [c for c, _ in run(rcpt_replies(d.smtp_port, ["bob@test.example",
                                                         "carol@test.example"]))] == [250, 550]


def test_header_checks_reject_hold_and_tag(make_daemon: MakeDaemon) -> None:
    rules = [
        {"header": "Subject", "regex": "(?i)cheap pills", "action": "reject",
         "text": "Message content rejected: spam"},
        {"header": "X-Mailer", "regex": "^BulkMailer", "action": "hold", "text": "bulk"},
        {"header": "From", "regex": r"@partner\.example>?$", "action": "tag",
         "text": "partner mail"},
    ]
    d = make_daemon(modules=[{"name": "header_checks", "options": {"rules": rules}}])

    def send(headers: bytes) -> tuple[int, str]:
        return run(send_message(d.smtp_port, "alice@test.example", ["bob@test.example"],
                                headers + b"\r\nbody\r\n", "header-checks"))

    assert send(b"Subject: CHEAP Pills now\r\n") == (550, "5.7.1 Message content rejected: spam")
    assert d.queued_ids() == set()
    code, text = send(b"Subject: newsletter\r\nX-Mailer: BulkMailer 2.0\r\n")
    assert code == 250, text
    held = queued_id(text)
    code, text = send(b"Subject: hello\r\nFrom: Pat <pat@partner.example>\r\n")
    assert code == 250, text
    tagged = queued_id(text)

    p = ctl(d, "--json", "queue", "list", "--status", "held")
    assert p.returncode == 0, p.stderr
    assert [row["id"] for row in json.loads(p.stdout)] == [held]
    assert envelope(d, held)["metadata"] == {"modules": {"header_checks": {"matched": [1]}}}
    data = d.message_bytes(tagged)
    lines = data.split(b"\r\n")
    tag = lines.index(b"X-Empath-Tag: partner mail")
    assert all(line.startswith((b"Received:", b"\t")) for line in lines[:tag])
    assert f" id {tagged}".encode() in data[:data.index(b"X-Empath-Tag")]
    assert b"X-Empath-Tag" not in d.message_bytes(held)


# ---- a third-party module, pip-installed, loaded by entry point ----------------------


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/empath-example-module installed with pip into a directory of its own
    (``--target``), which the daemon gets on PYTHONPATH: nothing is added to the
    suite's venv, and no network is needed (no build isolation, no dependencies)."""
    work = tmp_path_factory.mktemp("example")
    source = work / "src"
    shutil.copytree(EXAMPLE, source)  # pip builds in the source tree: not in ours
    site = work / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(site),
                        str(source)], capture_output=True, text=True, check=False,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert list(site.glob("empath_example_module-*.dist-info/entry_points.txt"))
    return site


def test_example_package_is_loaded_by_its_entry_point(
        make_daemon: MakeDaemon, sinks: SinkLoop, tmp_path: Path, example_site: Path) -> None:
    remote = sink(sinks)
    audit = tmp_path / "audit.jsonl"
    d = make_daemon(start=False, local_domains=["test.example"], modules=[
        {"name": "example_audit", "options": {"log": str(audit),
                                              "refuse_sender_domains": ["spam.example"]}}],
        delivery={"mode": "mx", "routes": {"test.example": f"maildir:{tmp_path / 'mail'}",
                                           "remote.test": f"smtp:127.0.0.1:{remote.port}"}})
    d.extra_env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(example_site)])

    # check-config builds it too: a missing option is a config error naming it
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**d.config, "modules": [{"name": "example_audit"}]}))
    p = subprocess.run([sys.executable, "-m", "empath", "check-config", "--config", str(broken)],
                       capture_output=True, text=True, check=False,
                       env={**os.environ, **d.extra_env})
    assert p.returncode != 0 and "modules[0].options.log" in p.stdout + p.stderr

    d.start()

    async def main() -> str:
        c = await RawClient.connect(d.smtp_port, "example-module")
        await c.greet()
        assert await c.cmd("MAIL FROM:<x@spam.example>") == (
            550, "5.7.1 Mail from spam.example is not accepted here")
        await c.close()
        code, text = await send_message(
            d.smtp_port, "alice@test.example", ["bob@remote.test"],
            b"Subject: audited\r\nMessage-ID: <m1@test.example>\r\n\r\nhello\r\n",
            "example-module")
        assert code == 250, text
        return queued_id(text)

    qid = run(main())
    line = wait_long(lambda: records(audit, "delivered"), "the audit line", d)[0]
    delivered = remote.delivered[0].data or b""
    m = re.search(rb"\r\nX-Audit-Id: ([0-9a-f]{32})\r\n", delivered)
    assert m, delivered[:400]
    assert line["audit_id"] == m.group(1).decode()
    assert (line["queue_id"], line["recipient"], line["status"]) == (qid, "bob@remote.test",
                                                                      "delivered")
    assert (line["client"], line["helo"], line["message_id"]) == (
        "127.0.0.1", "client.test", "<m1@test.example>")
