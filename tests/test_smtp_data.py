"""The DATA section over real sockets: SMTP smuggling, line length, dot-stuffing.

Documented choice (empath/smtp/data.py, as Postfix's ``smtpd_forbid_bare_newline``
in its strict form): a message containing a bare CR or LF (or a NUL) is refused as a
whole with ``554 5.6.0``; only ``<CRLF>.<CRLF>`` ends DATA. So every smuggling payload
below must produce exactly ONE reply, leave the session in sync, and queue nothing.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import (
    Daemon,
    RawClient,
    base_config,
    free_port,
    queued_id,
    spool_data,
    spool_ids,
    spool_record,
    strip_received,
)

# ---------------------------------------------------------------------------------
# daemon and helpers
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("data")
    smtp, sub = free_port(), free_port()
    daemon = Daemon(workdir, base_config(workdir / "state", smtp, sub), smtp, sub)
    daemon.start()
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        try:
            daemon.stop(timeout=15)
        except Exception:
            daemon.kill()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def open_data(d: Daemon, context: str, sender: str = "sender@test.example",
                    rcpt: str = "rcpt@test.example") -> RawClient:
    c = await RawClient.connect(d.smtp_port, context)
    await c.greet()
    assert (await c.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
    assert (await c.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
    code, text = await c.cmd("DATA")
    assert code == 354, text
    return c


async def nothing_more(c: RawClient, wait: float = 0.3) -> bool:
    try:
        extra = await asyncio.wait_for(c.reader.read(1), wait)
    except TimeoutError:
        return True
    return extra == b""


def stuff(body: bytes) -> bytes:
    """Client-side dot-stuffing (RFC 5321 §4.5.2) of a CRLF body."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


def spool_contents(d: Daemon, since: set[str]) -> list[tuple[dict[str, Any], bytes]]:
    """Envelope and data of every message queued after ``since`` was taken."""
    out = []
    for qid in spool_ids(d.queue_dir) - since:
        out.append((spool_record(d.queue_dir, qid), spool_data(d.queue_dir, qid)))
    return out


def assert_nothing_smuggled(d: Daemon, since: set[str]) -> None:
    for env, data in spool_contents(d, since):
        rcpts = [r["address"] for r in env["recipients"]]
        assert "evil" not in env["sender"], env
        assert not any("victim" in r for r in rcpts), env
        assert b"Smuggled" not in data, data[:200]
        assert b"smuggle-carrier" not in data, data[:200]


async def session_still_usable(c: RawClient, d: Daemon) -> str:
    """NOOP answers 250 as the very next reply, and a clean message goes through."""
    code, text = await c.cmd("NOOP")
    assert (code, text) == (250, "2.0.0 Ok"), (code, text)
    assert await nothing_more(c)
    body = b"Subject: after\r\n\r\nclean follow-up\r\n"
    assert (await c.cmd("MAIL FROM:<sender@test.example>"))[0] == 250
    assert (await c.cmd("RCPT TO:<rcpt@test.example>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    c.send(body + b".\r\n")
    code, text = await c.reply()
    assert code == 250, text
    qid = queued_id(text)
    assert strip_received(d.message_bytes(qid)) == body
    return qid


# ---------------------------------------------------------------------------------
# 8. smuggling
# ---------------------------------------------------------------------------------

FAKE_TRANSACTION = (b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@test.example>\r\n"
                    b"DATA\r\nSmuggled\r\n")

SEQUENCES = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    # combinations and near misses
    b"\r.\r\n",
    b"\r\n.\n",
    b"\n.\r",
    b"\n\n.\n\n",
    b"\r\r.\r\r",
    b"\r\n.\r\r\n",
    b"\r\n.\x00\r\n",
    b"\n\r.\r\n",
    b"\r\n\r.\r\n",
    b"\n..\n",
    b"\r\n.\n\r\n.\r",
]


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "split-writes"])
@pytest.mark.parametrize("seq", SEQUENCES, ids=[repr(s)[2:-1] for s in SEQUENCES])
def test_smuggling_sequence_is_refused_whole(d: Daemon, seq: bytes, split: bool) -> None:
    before = d.queued_ids()

    async def go() -> None:
        c = await open_data(d, "smuggling")
        parts = [b"Subject: smuggle-carrier\r\n\r\nfirst part", seq, FAKE_TRANSACTION,
                 b".\r\n"]
        if split:  # the sequence arrives in its own TCP segment
            for part in parts:
                c.send(part)
                await c.writer.drain()
                await asyncio.sleep(0.05)
        else:
            c.send(b"".join(parts))
        code, text = await c.reply()
        assert (code, text[:5]) == (554, "5.6.0"), (code, text)
        assert d.queued_ids() == before  # nothing from that transaction
        qid = await session_still_usable(c, d)
        assert d.queued_ids() == before | {qid}
        await c.close()

    run(go())
    assert_nothing_smuggled(d, before)


def test_smuggling_as_separate_transactions_on_fresh_connection(d: Daemon) -> None:
    """The carrier split exactly at the bare-LF dot, then QUIT: still one refusal."""
    before = d.queued_ids()

    async def go() -> None:
        c = await open_data(d, "smuggling-quit")
        c.send(b"Subject: smuggle-carrier\r\n\r\nx\n.\n" + FAKE_TRANSACTION + b".\r\nQUIT\r\n")
        code, text = await c.reply()
        assert (code, text[:5]) == (554, "5.6.0"), text
        code, text = await c.reply()
        assert code == 221, text
        assert await c.at_eof()
        await c.close()
        assert d.queued_ids() == before

    run(go())
    assert_nothing_smuggled(d, before)


def test_nul_in_body_refused(d: Daemon) -> None:
    async def go() -> None:
        before = d.queued_ids()
        c = await open_data(d, "nul")
        c.send(b"Subject: nul\r\n\r\nab\x00cd\r\n.\r\n")
        code, text = await c.reply()
        assert (code, text[:5]) == (554, "5.6.0"), text
        assert d.queued_ids() == before
        await session_still_usable(c, d)
        await c.close()

    run(go())


# ---------------------------------------------------------------------------------
# 9. line length
# ---------------------------------------------------------------------------------


def test_line_of_998_accepted_999_refused(d: Daemon) -> None:
    async def go() -> None:
        ok_plain = b"Subject: long\r\n\r\n" + b"a" * 998 + b"\r\n"
        ok_dotted = b"Subject: long\r\n\r\n" + b"." + b"b" * 997 + b"\r\n"  # 999 on the wire
        for body in (ok_plain, ok_dotted):
            c = await open_data(d, "line-998")
            c.send(stuff(body) + b".\r\n")
            code, text = await c.reply()
            assert code == 250, text
            assert strip_received(d.message_bytes(queued_id(text))) == body
            await c.close()
        for bad in (b"a" * 999, b"." + b"b" * 998, b"c" * 1000, b"d" * 1001, b"e" * 1500):
            before = d.queued_ids()
            c = await open_data(d, "line-999")
            c.send(stuff(b"Subject: long\r\n\r\n" + bad + b"\r\nnext\r\n") + b".\r\n")
            code, text = await c.reply()
            assert (code, text[:5]) == (554, "5.6.0"), (len(bad), code, text)
            assert d.queued_ids() == before
            await session_still_usable(c, d)
            await c.close()

    run(go())


@pytest.mark.parametrize("before_dot", [1000, 1001, 1002, 1003, 2000, 4999])
def test_long_line_tail_never_ends_data(d: Daemon, before_dot: int) -> None:
    """A long line ending in '.': the client writes the line up to the dot, pauses so
    the server drains what exceeds its line buffer, then sends '.\\r\\n'. That is
    the tail of the same line, not an end of data (a classic reader bug)."""
    before = d.queued_ids()

    async def go() -> None:
        c = await open_data(d, "long-tail")
        c.send(b"Subject: smuggle-carrier\r\n\r\n")
        c.send(b"a" * before_dot)
        await c.writer.drain()
        await asyncio.sleep(0.2)  # let the server drain what it has before the rest
        c.send(b".\r\n" + FAKE_TRANSACTION + b".\r\n")
        code, text = await c.reply()
        assert (code, text[:5]) == (554, "5.6.0"), (code, text)
        assert d.queued_ids() == before
        await session_still_usable(c, d)
        await c.close()

    run(go())
    assert_nothing_smuggled(d, before)


def test_long_line_in_one_write(d: Daemon) -> None:
    before = d.queued_ids()

    async def go() -> None:
        c = await open_data(d, "long-one-write")
        c.send(b"Subject: smuggle-carrier\r\n\r\n" + b"z" * 4999 + b".\r\n"
               + FAKE_TRANSACTION + b".\r\n")
        code, text = await c.reply()
        assert (code, text[:5]) == (554, "5.6.0"), (code, text)
        assert d.queued_ids() == before
        await session_still_usable(c, d)
        await c.close()

    run(go())
    assert_nothing_smuggled(d, before)


def test_very_long_message_line_keeps_sync(d: Daemon) -> None:
    """200 kB on one line: refused once, session in sync."""
    async def go() -> None:
        before = d.queued_ids()
        c = await open_data(d, "huge-line")
        c.send(b"Subject: huge\r\n\r\n" + b"w" * 200_000 + b"\r\n.\r\n")
        code, text = await c.reply()
        assert (code, text[:5]) == (554, "5.6.0"), (code, text)
        assert d.queued_ids() == before
        await session_still_usable(c, d)
        await c.close()

    run(go())


# ---------------------------------------------------------------------------------
# 10. dot-stuffing round trip
# ---------------------------------------------------------------------------------

DOT_BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b".\r\n",
    b"..\r\n",
    b"...\r\n",
    b"Subject: dots\r\n\r\n.\r\n..\r\n...\r\n.leading\r\n..two\r\n. space\r\nend\r\n",
    b"Subject: dots\r\n\r\nline\r\n..\r\n\r\n",
    b"Subject: dots\r\n\r\nlast line followed by an empty one\r\n\r\n",
    b"Subject: dots\r\n\r\n.\r\n.\r\n.\r\n",
    b"Subject: dots\r\n\r\n x.\r\n\tx\r\nmiddle . dot\r\nends with dot.\r\n",
]


@pytest.mark.parametrize("body", DOT_BODIES, ids=[str(i) for i in range(len(DOT_BODIES))])
def test_dot_stuffing_round_trip(d: Daemon, body: bytes) -> None:
    async def go() -> str:
        c = await open_data(d, "dots")
        c.send(stuff(body) + b".\r\n")
        code, text = await c.reply()
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    assert strip_received(d.message_bytes(qid)) == body


_PRINTABLE = "".join(ch for ch in string.printable if ch not in "\r\n\x0b\x0c")
_LINE = st.one_of(
    st.sampled_from(["", ".", "..", "...", ". ", ".x", "x."]),
    st.tuples(st.integers(0, 3), st.text(alphabet=_PRINTABLE + "....", max_size=100)).map(
        lambda t: "." * t[0] + t[1]
    ),
)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=25))
def test_dot_stuffing_round_trip_property(d: Daemon, lines: list[str]) -> None:
    body = b"".join(line.encode("ascii") + b"\r\n" for line in lines)

    async def go() -> str:
        c = await open_data(d, "dots-property")
        c.send(stuff(body) + b".\r\n")
        code, text = await c.reply()
        assert code == 250, text
        await c.cmd("QUIT")
        await c.close()
        return queued_id(text)

    qid = run(go())
    assert strip_received(d.message_bytes(qid)) == body
