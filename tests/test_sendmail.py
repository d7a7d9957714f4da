"""``empath sendmail`` — and the ``sendmail``, ``mailq``, ``newaliases`` names the package
gives it — run as a real process against a real daemon (``empath run``) over real SMTP.

Two daemons serve the module:

- ``mta`` (delivery mode mx) routes test.example, mx.test.example (its own hostname,
  which unqualified addresses get) and elsewhere.example to an aiosmtpd sink, so a
  test sees the envelope and the message exactly as they arrive at the next hop;
- ``strict`` (mode hold) treats loopback as an outside client (relay_networks does not
  include it), takes 2 recipients per transaction and 20000-byte messages, and keeps
  what it accepts in its queue, where the tests read the envelopes.

Where the test needs to see the client's own ESMTP parameters (SIZE, BODY, SMTPUTF8,
DSN), $EMPATH_SENDMAIL_SMTP points sendmail straight at a sink.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import itertools
import mailbox
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from empath.spool import Envelope
from tests.conftest import IN_CI, require_tool
from tests.harness import Daemon, base_config, free_port, spool_record_bytes
from tests.sinks import RawServer, Script, SMTPSink, Transaction, unused_port

T = TypeVar("T")

HOSTNAME = "mx.test.example"  # both daemons' hostname (tests/harness.py)
LOGIN = pwd.getpwuid(os.getuid()).pw_name
_markers = itertools.count(1)


def marker() -> str:
    """A Subject unique to one test, to find its message among the module's traffic."""
    return f"sendmail-test-{os.getpid()}-{next(_markers)}"


def _empath_script() -> str:
    """The installed ``empath`` command: next to this Python (venv or /usr/bin)."""
    beside = Path(sys.executable).parent / "empath"
    if beside.exists():
        return str(beside)
    found = shutil.which("empath")
    if found is None:
        if IN_CI:
            pytest.fail("the empath command is not installed next to the test's Python")
        pytest.skip("the empath command is not installed")
    return found


def need_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test must run as root under CI=true (it drops to nobody)")
        pytest.skip("needs root to run a command as another user")


# ---- a background event loop for the sinks ---------------------------------------------


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def sink(loop: Loop) -> Iterator[SMTPSink]:
    s = loop.run(SMTPSink().start())
    yield s
    loop.run(s.stop())


def _start_daemon(workdir: Path, **overrides: Any) -> Daemon:
    smtp, sub = free_port(), free_port()
    cfg = base_config(workdir / "state", smtp, sub)
    cfg.update(overrides)
    d = Daemon(workdir, cfg, smtp, sub)
    d.start()
    return d


def _stop(d: Daemon) -> None:
    try:
        d.stop()
    except Exception:
        d.kill()


@pytest.fixture(scope="module")
def mta(tmp_path_factory: pytest.TempPathFactory, sink: SMTPSink) -> Iterator[Daemon]:
    hop = f"smtp:{sink.host}:{sink.port}"
    d = _start_daemon(
        tmp_path_factory.mktemp("mta"),
        local_domains=["test.example"],
        delivery={"mode": "mx",
                  "routes": {dom: hop for dom in ("test.example", HOSTNAME,
                                                  "elsewhere.example")}},
    )
    yield d
    _stop(d)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = _start_daemon(
        tmp_path_factory.mktemp("strict"),
        local_domains=["test.example"],
        relay_networks=["192.0.2.0/24"],
        limits={"max_recipients": 2, "max_message_size": 20000},
    )
    yield d
    _stop(d)


# ---- running sendmail --------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def env_for(home: Path, daemon: Daemon | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EMPATH_") and k not in ("NAME", "RUNTIME_DIRECTORY")}
    env["HOME"] = str(home)
    env["EMPATH_CONFIG"] = str(daemon.config_path) if daemon else str(home / "no-config.yaml")
    if daemon is not None:
        env["EMPATH_CONTROL_SOCKET"] = str(daemon.state_dir / "control.sock")
    env.update(extra)
    return env


def run(argv: list[str], data: bytes | str = b"", env: dict[str, str] | None = None,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    raw = data.encode() if isinstance(data, str) else data
    return subprocess.run([*(prefix or []), *argv], input=raw, env=env,
                          capture_output=True, timeout=120)


def sendmail(args: list[str], data: bytes | str, env: dict[str, str],
             prefix: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return run([_empath_script(), "sendmail", *args], data, env, prefix)


def err(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stderr.decode("utf-8", "replace")


def _addr(arg: str) -> str:
    m = re.search(r"<([^>]*)>", arg)
    assert m, arg
    return m.group(1)


def delivered(mta: Daemon, sink: SMTPSink, subject: str,
              timeout: float = 30.0) -> list[Transaction]:
    """The sink's transactions carrying ``subject``, once the daemon's queue is empty
    (so every recipient of the message has been delivered)."""
    key = subject.encode()
    deadline = time.monotonic() + timeout
    while True:
        txns = [t for t in sink.delivered if t.data is not None and key in t.data]
        if txns and not mta.queued_ids():
            return txns
        if time.monotonic() > deadline:
            raise AssertionError(f"{subject} not delivered; daemon log:\n{mta.log()[-3000:]}")
        time.sleep(0.05)


def rcpts(txns: list[Transaction]) -> set[str]:
    return {_addr(r) for t in txns for r in t.rcpts}


def parse(data: bytes) -> EmailMessage:
    return cast(EmailMessage, email.message_from_bytes(data, policy=email.policy.default))


def queued(d: Daemon, subject: str) -> list[Envelope]:
    """Envelopes of the messages in a hold-mode daemon's queue whose text has ``subject``."""
    out = []
    for qid in d.queued_ids():
        if subject.encode() in d.message_bytes(qid):
            out.append(Envelope.from_bytes(spool_record_bytes(d.queue_dir, qid)))
    return out


def dead_letters(home: Path) -> list[mailbox.mboxMessage]:
    box = mailbox.mbox(str(home / "dead.letter"), create=False)
    try:
        return list(box)
    finally:
        box.close()


# ---- recipients ----------------------------------------------------------------------------


def test_t_takes_to_cc_bcc_adds_command_line_and_removes_bcc(
        mta: Daemon, sink: SMTPSink, home: Path) -> None:
    subject = marker()
    msg = (f"From: Alice <alice@test.example>\nTo: a@test.example, Bob <b@test.example>\n"
           f"Cc: c@elsewhere.example\nBcc: hidden@test.example,\n also-hidden@elsewhere.example\n"
           f"Subject: {subject}\n\nhello\n")
    p = sendmail(["-t", "extra@test.example"], msg, env_for(home, mta))
    assert p.returncode == 0, err(p)
    txns = delivered(mta, sink, subject)
    assert rcpts(txns) == {"a@test.example", "b@test.example", "c@elsewhere.example",
                           "hidden@test.example", "also-hidden@elsewhere.example",
                           "extra@test.example"}
    for t in txns:
        assert t.data is not None
        assert b"hidden" not in t.data, "a Bcc recipient is visible in the message"
        m = parse(t.data)
        assert m["Bcc"] is None
        assert m["To"] == "a@test.example, Bob <b@test.example>"
        assert m["Cc"] == "c@elsewhere.example"
        assert m["From"] == "Alice <alice@test.example>"


def test_t_uses_resent_fields_when_there_are_any(mta: Daemon, sink: SMTPSink,
                                                 home: Path) -> None:
    subject = marker()
    msg = (f"From: a@test.example\nTo: old@test.example\nResent-From: b@test.example\n"
           f"Resent-To: new@test.example\nResent-Bcc: newer@test.example\n"
           f"Subject: {subject}\n\nforwarded\n")
    p = sendmail(["-t"], msg, env_for(home, mta))
    assert p.returncode == 0, err(p)
    txns = delivered(mta, sink, subject)
    assert rcpts(txns) == {"new@test.example", "newer@test.example"}
    assert all(t.data is not None and b"newer@" not in t.data for t in txns)


def test_command_line_recipients_only_without_t(mta: Daemon, sink: SMTPSink,
                                                home: Path) -> None:
    subject = marker()
    msg = f"To: decoy@test.example\nSubject: {subject}\n\nhello\n"
    p = sendmail(["-v", "one@test.example,two@test.example", "Three <three@test.example>"],
                 msg, env_for(home, mta))
    assert p.returncode == 0, err(p)
    txns = delivered(mta, sink, subject)
    assert rcpts(txns) == {"one@test.example", "two@test.example", "three@test.example"}
    # -v shows the dialogue with the daemon.
    assert "-> RCPT TO:<three@test.example>" in err(p)
    assert re.search(r"<- 250 2\.0\.0 Ok: queued as \w+", err(p)), err(p)


def test_unqualified_recipients_get_the_hostname(mta: Daemon, sink: SMTPSink,
                                                 home: Path) -> None:
    subject = marker()
    p = sendmail(["root"], f"To: root\nSubject: {subject}\n\nfor root\n", env_for(home, mta))
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, subject)
    assert rcpts([t]) == {f"root@{HOSTNAME}"}
    assert _addr(t.mail) == f"{LOGIN}@{HOSTNAME}"  # default envelope sender
    assert t.data is not None
    m = parse(t.data)
    assert m["To"] == f"root@{HOSTNAME}"
    assert email.utils.parseaddr(m["From"])[1] == f"{LOGIN}@{HOSTNAME}"


def test_without_a_readable_config_the_daemons_name_qualifies(
        mta: Daemon, sink: SMTPSink, home: Path) -> None:
    """What an ordinary user gets (the packaged config is 0640 root:empath): the name the
    daemon announces, not this machine's idea of its own name."""
    assert socket.getfqdn() != HOSTNAME, "this test needs a machine not named like the daemon"
    subject = marker()
    env = env_for(home, None, EMPATH_SENDMAIL_SMTP=f"127.0.0.1:{mta.smtp_port}")
    p = sendmail(["-t"], f"To: root\nSubject: {subject}\n\nx\n", env)
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, subject)
    assert rcpts([t]) == {f"root@{HOSTNAME}"}
    assert _addr(t.mail) == f"{LOGIN}@{HOSTNAME}"


def test_an_unprivileged_user_submits_with_t(mta: Daemon, sink: SMTPSink,
                                             tmp_path: Path) -> None:
    need_root()
    nobody = pwd.getpwnam("nobody")
    subject = marker()
    env = env_for(tmp_path, mta, EMPATH_SENDMAIL_SMTP=f"127.0.0.1:{mta.smtp_port}")
    # The daemon's config lives in a 0700 directory: nobody cannot read it.
    p = sendmail(["-t"], f"To: a@test.example\nSubject: {subject}\n\nfrom nobody\n", env,
                 prefix=["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                         "--clear-groups", "--"])
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, subject)
    assert _addr(t.mail) == f"nobody@{HOSTNAME}"
    assert t.data is not None
    assert f"from userid {nobody.pw_uid}".encode() in t.data


def test_too_many_recipients_for_one_transaction_go_in_the_next(
        strict: Daemon, home: Path) -> None:
    """The daemon answers 452 4.5.3 after max_recipients (2): the rest follow in new
    transactions, and everyone gets the message."""
    subject = marker()
    to = [f"r{i}@test.example" for i in range(5)]
    p = sendmail(to, f"Subject: {subject}\n\nmany\n", env_for(home, strict))
    assert p.returncode == 0, err(p)
    envs = queued(strict, subject)
    assert len(envs) == 3
    assert sorted(r.address for e in envs for r in e.recipients) == to


# ---- the sender and the header --------------------------------------------------------------


@pytest.mark.parametrize(("args", "sender", "from_addr", "from_name"), [
    (["-f", "bounce@test.example", "-F", "Jörg Müller"], "bounce@test.example",
     "bounce@test.example", "Jörg Müller"),
    (["-fbounce@test.example"], "bounce@test.example", "bounce@test.example", None),
    (["-r", "bounce"], f"bounce@{HOSTNAME}", f"bounce@{HOSTNAME}", None),
    (["-f", "<>", "-F", "Daemon"], "", f"{LOGIN}@{HOSTNAME}", "Daemon"),
])
def test_envelope_sender_and_from(mta: Daemon, sink: SMTPSink, home: Path,
                                  args: list[str], sender: str, from_addr: str,
                                  from_name: str | None) -> None:
    subject = marker()
    p = sendmail([*args, "a@test.example"], f"Subject: {subject}\n\nx\n", env_for(home, mta))
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, subject)
    assert _addr(t.mail) == sender
    assert t.data is not None
    m = parse(t.data)
    name, addr = email.utils.parseaddr(str(m["From"]))
    assert addr == from_addr
    if from_name is not None:
        assert name == from_name


def test_f_does_not_touch_an_existing_from(mta: Daemon, sink: SMTPSink, home: Path) -> None:
    subject = marker()
    p = sendmail(["-f", "bounce@test.example", "-F", "Ignored", "a@test.example"],
                 f"From: Real <real@test.example>\nSubject: {subject}\n\nx\n",
                 env_for(home, mta))
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, subject)
    assert t.data is not None
    assert parse(t.data).get_all("From") == ["Real <real@test.example>"]


def test_missing_date_and_message_id_are_added_present_ones_kept(
        mta: Daemon, sink: SMTPSink, home: Path) -> None:
    s1, s2 = marker(), marker()
    p = sendmail(["a@test.example"], f"Subject: {s1}\n\nbare\n", env_for(home, mta))
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, s1)
    assert t.data is not None
    m = parse(t.data)
    assert email.utils.parsedate_to_datetime(str(m["Date"])) is not None
    assert re.fullmatch(rf"<[^@<>\s]+@{re.escape(HOSTNAME)}>", str(m["Message-ID"]))
    assert m["From"] is not None

    date, mid = "Mon, 01 Jan 2024 00:00:00 +0000", "<kept@test.example>"
    p = sendmail(["a@test.example"], f"Date: {date}\nMessage-ID: {mid}\nSubject: {s2}\n\nx\n",
                 env_for(home, mta))
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, s2)
    assert t.data is not None
    m = parse(t.data)
    assert m.get_all("Date") == [date]
    assert m.get_all("Message-ID") == [mid]


def test_a_message_without_any_header(mta: Daemon, sink: SMTPSink, home: Path) -> None:
    """``echo text | sendmail root``: the text is the body, the header is made up."""
    subject = marker()
    p = sendmail(["a@test.example"], f"{subject} is just text\nsecond line\n",
                 env_for(home, mta))
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, subject)
    assert t.data is not None
    m = parse(t.data)
    assert m["Date"] is not None and m["From"] is not None
    assert t.data.split(b"\r\n\r\n", 1)[1] == f"{subject} is just text\r\nsecond line\r\n".encode()


# ---- the message text ---------------------------------------------------------------------


@pytest.mark.parametrize("flag", [None, "-i", "-oi"])
def test_a_lone_dot_ends_the_message_unless_i(mta: Daemon, sink: SMTPSink, home: Path,
                                              flag: str | None) -> None:
    subject = marker()
    body = "before\n.\nafter\n..two dots\n"
    p = sendmail([*([flag] if flag else []), "a@test.example"],
                 f"Subject: {subject}\n\n{body}", env_for(home, mta))
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, subject)
    assert t.data is not None
    text = t.data.split(b"\r\n\r\n", 1)[1]
    if flag is None:
        assert text == b"before\r\n"
    else:
        assert text == b"before\r\n.\r\nafter\r\n..two dots\r\n"


def test_eight_bit_body_and_header_arrive_intact(mta: Daemon, sink: SMTPSink,
                                                 home: Path) -> None:
    subject = marker()
    body = "Grüße aus Köln — ☃\r\nŁódź\r\n".encode()
    raw = f"Subject: {subject} Grüße\r\n\r\n".encode() + body
    p = sendmail(["a@test.example"], raw, env_for(home, mta))
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, subject)
    assert t.data is not None
    assert t.data.endswith(b"\r\n\r\n" + body)
    assert f"Subject: {subject} Grüße\r\n".encode() in t.data


def test_line_ends_are_normalised_and_long_lines_broken(mta: Daemon, sink: SMTPSink,
                                                        home: Path) -> None:
    """LF, CRLF and bare CR input all become CRLF (the daemon refuses bare CR/LF), and a
    line over 998 octets is broken with CRLF SPACE (the daemon refuses it whole)."""
    subject = marker()
    long_line = ("0123456789" * 250).encode()  # 2500 octets
    raw = (f"Subject: {subject}\r\n\r\n".encode() + b"crlf\r\nlf\nprogress 10%\r50%\r100%\n"
           + long_line + b"\n")
    p = sendmail(["a@test.example"], raw, env_for(home, mta))
    assert p.returncode == 0, err(p)
    (t,) = delivered(mta, sink, subject)
    assert t.data is not None
    lines = t.data.split(b"\r\n\r\n", 1)[1].split(b"\r\n")
    assert lines[:5] == [b"crlf", b"lf", b"progress 10%", b"50%", b"100%"]
    assert all(len(x) <= 998 for x in t.data.split(b"\r\n"))
    rest = lines[5:-1]
    assert len(rest) == 3 and all(x.startswith(b" ") for x in rest[1:])
    assert rest[0] + b"".join(x[1:] for x in rest[1:]) == long_line


def test_esmtp_parameters_the_client_sends(loop: Loop, home: Path) -> None:
    """SIZE always, BODY=8BITMIME for 8-bit text, SMTPUTF8 only for a UTF-8 local part
    (a UTF-8 domain goes as its A-label), DSN from -N, -R, -V."""
    sink = loop.run(SMTPSink(Script(dsn=True)).start())
    try:
        env = env_for(home, None, EMPATH_SENDMAIL_SMTP=f"{sink.host}:{sink.port}")
        p = sendmail(["-N", "success,failure", "-R", "hdrs", "-V", "env id+1", "-f",
                      "s@test.example", "jörg@test.example", "x@bücher.example"],
                     "Subject: 8bit\n\nÄrger\n".encode(), env)
        assert p.returncode == 0, err(p)
        p = sendmail(["-f", "s@test.example", "plain@test.example"], "Subject: 7bit\n\nok\n",
                     env)
        assert p.returncode == 0, err(p)
    finally:
        loop.run(sink.stop())
    first, second = sink.delivered
    assert first.data is not None and second.data is not None
    params = first.mail.split()[1:]
    assert f"SIZE={len(first.data)}" in params
    assert {"BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=env+20id+2B1"} <= set(params)
    assert first.rcpts == ["TO:<jörg@test.example> NOTIFY=SUCCESS,FAILURE",
                           "TO:<x@xn--bcher-kva.example> NOTIFY=SUCCESS,FAILURE"]
    assert second.mail.split()[1:] == [f"SIZE={len(second.data)}"]


def test_dsn_options_reach_the_daemons_queue(strict: Daemon, home: Path) -> None:
    subject = marker()
    p = sendmail(["-N", "never", "-R", "full", "-V", "batch-7", "a@test.example"],
                 f"Subject: {subject}\n\nx\n", env_for(home, strict))
    assert p.returncode == 0, err(p)
    (e,) = queued(strict, subject)
    assert e.ret == "FULL"
    assert e.envid == "batch-7"
    assert [tuple(r.notify or ()) for r in e.recipients] == [("NEVER",)]


# ---- when the message is not sent --------------------------------------------------------------


def test_daemon_down_exits_75_and_saves_dead_letter(home: Path) -> None:
    port = unused_port("127.0.0.1")
    env = env_for(home, None, EMPATH_SENDMAIL_SMTP=f"127.0.0.1:{port}")
    subject = marker()
    msg = f"To: a@test.example\nBcc: b@test.example\nSubject: {subject}\n\nFrom the start\nend\n"
    p = sendmail(["-t"], msg, env)
    assert p.returncode == 75, err(p)
    text = err(p)
    assert f"127.0.0.1:{port}" in text
    assert "NOT sent" in text
    assert str(home / "dead.letter") in text
    (saved,) = dead_letters(home)
    assert saved["Subject"] == subject
    assert saved["Bcc"] == "b@test.example", "the sender's own copy keeps its Bcc"
    assert saved["Date"] is not None
    raw = (home / "dead.letter").read_bytes()
    assert raw.startswith(f"From {LOGIN}@".encode())
    assert b"\n>From the start\n" in raw  # mbox quoting
    assert stat.S_IMODE((home / "dead.letter").stat().st_mode) == 0o600

    p = sendmail(["a@test.example"], f"Subject: {subject}-2\n\nagain\n", env)
    assert p.returncode == 75, err(p)
    assert [m["Subject"] for m in dead_letters(home)] == [subject, f"{subject}-2"]


def test_daemon_down_and_home_not_writable_says_so(tmp_path: Path) -> None:
    port = unused_port("127.0.0.1")
    home = tmp_path / "no" / "such" / "home"
    p = sendmail(["a@test.example"], "Subject: x\n\nx\n",
                 env_for(home, None, EMPATH_SENDMAIL_SMTP=f"127.0.0.1:{port}"))
    assert p.returncode == 75
    assert "NOT sent" in err(p)
    assert f"could not save a copy in {home}/dead.letter" in err(p)


def test_a_4xx_greeting_is_a_temporary_failure(loop: Loop, home: Path) -> None:
    server = loop.run(RawServer("421 4.3.2 mx.test.example Service shutting down").start())
    try:
        p = sendmail(["a@test.example"], "Subject: busy\n\nx\n",
                     env_for(home, None, EMPATH_SENDMAIL_SMTP=f"{server.host}:{server.port}"))
    finally:
        loop.run(server.stop())
    assert p.returncode == 75, err(p)
    assert "421 4.3.2 mx.test.example Service shutting down" in err(p)
    assert "NOT sent (try again later)" in err(p)
    assert len(dead_letters(home)) == 1


def test_connection_lost_at_the_final_dot_is_not_taken_as_sent(loop: Loop,
                                                                home: Path) -> None:
    """No reply to the dot: the message may or may not be queued; a possible duplicate
    beats a possible loss."""
    sink = loop.run(SMTPSink(Script(drop_at_dot=True)).start())
    try:
        p = sendmail(["a@test.example"], "Subject: dropped\n\nx\n",
                     env_for(home, None, EMPATH_SENDMAIL_SMTP=f"{sink.host}:{sink.port}"))
    finally:
        loop.run(sink.stop())
    assert p.returncode == 75, err(p)
    assert "the connection failed" in err(p)
    assert "NOT sent (try again later)" in err(p)
    assert [m["Subject"] for m in dead_letters(home)] == ["dropped"]


def test_relay_denied_for_every_recipient(strict: Daemon, home: Path) -> None:
    p = sendmail(["far@elsewhere.example", "also@elsewhere.example"], "Subject: x\n\nx\n",
                 env_for(home, strict))
    assert p.returncode == 67, err(p)
    assert "554 5.7.1 <far@elsewhere.example>: Relay access denied" in err(p)
    assert "554 5.7.1 <also@elsewhere.example>: Relay access denied" in err(p)
    assert "NOT sent" in err(p)
    assert len(dead_letters(home)) == 1


def test_partly_refused_recipients_get_named_the_rest_get_it(strict: Daemon,
                                                             home: Path) -> None:
    subject = marker()
    p = sendmail(["a@test.example", "far@elsewhere.example"], f"Subject: {subject}\n\nx\n",
                 env_for(home, strict))
    assert p.returncode == 67, err(p)
    assert "recipient <far@elsewhere.example> refused" in err(p)
    assert "NOT sent to: <far@elsewhere.example>" in err(p)
    (e,) = queued(strict, subject)
    assert [r.address for r in e.recipients] == ["a@test.example"]


def test_refused_sender_exits_69(strict: Daemon, home: Path) -> None:
    p = sendmail(["-f", "bad address@@test.example", "a@test.example"], "Subject: x\n\nx\n",
                 env_for(home, strict))
    assert p.returncode == 69, err(p)
    assert re.search(r"refused the sender:\n  5\d\d 5\.\d\.\d", err(p)), err(p)


def test_refused_message_content_exits_65(strict: Daemon, home: Path) -> None:
    p = sendmail(["a@test.example"], b"Subject: nul\n\nthere is a \x00 here\n",
                 env_for(home, strict))
    assert p.returncode == 65, err(p)
    assert "554 5.6.0 Message rejected: NUL character in message" in err(p)
    assert len(dead_letters(home)) == 1


def test_a_message_over_the_daemons_size_is_not_sent(strict: Daemon, home: Path) -> None:
    subject = marker()
    p = sendmail(["a@test.example"], f"Subject: {subject}\n\n" + ("y" * 70 + "\n") * 400,
                 env_for(home, strict))
    assert p.returncode == 65, err(p)
    assert "takes at most 20000" in err(p)
    assert not queued(strict, subject)


def test_t_without_recipients(home: Path) -> None:
    p = sendmail(["-t"], "Subject: to nobody\n\nx\n", env_for(home))
    assert p.returncode == 64, err(p)
    assert "no recipients" in err(p)
    assert len(dead_letters(home)) == 1


# ---- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "named"), [
    (["-z", "a@test.example"], "-z"),
    (["-tz", "a@test.example"], "-z"),
    (["--frobnicate", "a@test.example"], "--frobnicate"),
    (["-f"], "-f requires a value"),
    (["-N", "sometimes", "a@test.example"], "-N"),
    (["-bx", "a@test.example"], "-bx"),
])
def test_bad_options_exit_64_naming_them(home: Path, args: list[str], named: str) -> None:
    p = sendmail(args, "", env_for(home))
    assert p.returncode == 64
    assert named in err(p)
    assert "Traceback" not in err(p)


def test_no_recipients_is_a_usage_error(home: Path) -> None:
    p = sendmail([], "Subject: x\n\nx\n", env_for(home))
    assert p.returncode == 64
    assert "no recipients" in err(p)
    assert not (home / "dead.letter").exists()


def test_a_malformed_smtp_address_setting_exits_78(home: Path) -> None:
    p = sendmail(["a@test.example"], "x\n", env_for(home, EMPATH_SENDMAIL_SMTP="localhost"))
    assert p.returncode == 78
    assert "$EMPATH_SENDMAIL_SMTP" in err(p)


def test_q_flushes_the_queue(strict: Daemon, home: Path) -> None:
    p = sendmail(["-q"], "", env_for(home, strict))
    assert p.returncode == 0, err(p)
    assert "due now" in p.stdout.decode()


def test_bd_is_refused_with_a_pointer(home: Path) -> None:
    p = sendmail(["-bd"], "", env_for(home))
    assert p.returncode == 64
    assert "systemctl start empath" in err(p)


@pytest.mark.parametrize("args", [
    ["-oem", "-odi", "-oQ/var/spool/x", "-em", "-U", "-G", "-m", "-n", "-h", "5", "-L", "tag",
     "-O", "DeliveryMode=b", "-X", "/dev/null", "-p", "smtp", "-Am", "-d0.1", "-B",
     "8BITMIME", "-bm", "-ti", "--", "a@test.example"],
    ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "a@test.example"],  # Debian's cron
    ["-oi", "--", "a@test.example"],  # mailx
], ids=["everything", "cron", "mailx"])
def test_options_programs_pass_are_accepted(mta: Daemon, sink: SMTPSink, home: Path,
                                            args: list[str]) -> None:
    subject = marker()
    p = sendmail(args, f"To: a@test.example\nSubject: {subject}\n\nx\n", env_for(home, mta))
    assert p.returncode == 0, err(p)
    assert rcpts(delivered(mta, sink, subject)) == {"a@test.example"}


def test_bs_speaks_smtp_on_stdin_stdout(mta: Daemon, sink: SMTPSink, home: Path) -> None:
    swaks = require_tool("swaks")
    subject = marker()
    p = run([swaks, "--pipe", f"{_empath_script()} sendmail -bs", "--from",
             "piped@test.example", "--to", "a@test.example", "--header",
             f"Subject: {subject}"], b"", env_for(home, mta))
    assert p.returncode == 0, p.stdout.decode() + err(p)
    (t,) = delivered(mta, sink, subject)
    assert _addr(t.mail) == "piped@test.example"


# ---- the other names ---------------------------------------------------------------------


@pytest.fixture
def links(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("sendmail", "mailq", "newaliases"):
        (d / name).symlink_to(_empath_script())
    return d


def test_called_as_sendmail(mta: Daemon, sink: SMTPSink, home: Path, links: Path) -> None:
    subject = marker()
    p = run([str(links / "sendmail"), "-t", "-oi"],
            f"To: a@test.example\nSubject: {subject}\n\nvia the symlink\n", env_for(home, mta))
    assert p.returncode == 0, err(p)
    assert rcpts(delivered(mta, sink, subject)) == {"a@test.example"}


def test_called_as_mailq_and_bp_list_the_queue(strict: Daemon, home: Path,
                                               links: Path) -> None:
    subject = marker()
    p = sendmail(["a@test.example"], f"Subject: {subject}\n\nx\n", env_for(home, strict))
    assert p.returncode == 0, err(p)
    (e,) = queued(strict, subject)
    for argv in ([str(links / "mailq")], [str(links / "sendmail"), "-bp"]):
        p = run(argv, b"", env_for(home, strict))
        assert p.returncode == 0, err(p)
        assert e.id in p.stdout.decode()


def test_mailq_without_permission_is_a_clear_message(strict: Daemon) -> None:
    need_root()
    nobody = pwd.getpwnam("nobody")
    # A directory nobody can enter, so that only the control socket's permissions stop it.
    bindir = Path(tempfile.mkdtemp(prefix="empath-mailq-"))
    try:
        bindir.chmod(0o755)
        (bindir / "mailq").symlink_to(_empath_script())
        p = run([str(bindir / "mailq")], b"", env_for(bindir, strict),
                prefix=["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                        "--clear-groups", "--"])
    finally:
        shutil.rmtree(bindir)
    assert p.returncode == 3, err(p)
    assert "permission denied" in err(p)
    assert "empath-admin" in err(p)
    assert "Traceback" not in err(p)


@pytest.mark.parametrize("how", ["link", "-bi", "-I"])
def test_newaliases_has_nothing_to_do(home: Path, links: Path, how: str) -> None:
    argv = [str(links / "newaliases")] if how == "link" else [str(links / "sendmail"), how]
    p = run(argv, b"", env_for(home))
    assert p.returncode == 0, err(p)
    assert "no aliases database" in p.stdout.decode()

