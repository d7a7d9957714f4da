"""Property tests of the SMTP front's pure parts: address and command parsing, the DATA
reader (fed from an asyncio.StreamReader; and on a real loopback socket, its prompt
acknowledgements) and the enhanced-status-code safety net."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import string

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from empath.addr import AddressError, normalize_domain, parse_mailbox
from empath.smtp.connection import Connection
from empath.smtp.data import MAX_LINE, DataOutcome, DataScanner
from empath.smtp.parse import PathArgs, ReplyError, parse_path_args
from empath.smtp.replies import ensure_enhanced

# ---------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
atom = st.text(alphabet=ATEXT, min_size=1, max_size=10)
local_part = st.lists(atom, min_size=1, max_size=4).map(".".join).filter(
    lambda s: len(s) <= 64)

_LDH = string.ascii_letters + string.digits


@st.composite
def label(draw: st.DrawFn) -> str:
    first = draw(st.sampled_from(_LDH))
    if draw(st.booleans()):
        return first
    middle = draw(st.text(alphabet=_LDH + "-", max_size=20))
    last = draw(st.sampled_from(_LDH))
    lab = first + middle + last
    assume(lab[2:4] != "--")  # "xx--" prefixes are reserved (IDNA)
    return lab


tld = st.text(alphabet=string.ascii_letters, min_size=2, max_size=8)
ascii_domain = st.builds(lambda labels, top: ".".join([*labels, top]),
                         st.lists(label(), min_size=1, max_size=3), tld)

U_LABELS = ["bücher", "münchen", "straße-x", "café", "köln", "日本", "пример", "ελληνικά"]
u_domain = st.builds(lambda u, rest: f"{u}.{rest}", st.sampled_from(U_LABELS), ascii_domain)


def random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f else c for c, f in zip(text, flips, strict=True))


# Text shaped like SMTP arguments, plus everything a session can hand the parser:
# arbitrary code points and the lone surrogates that "surrogateescape" makes out of
# octets that are not UTF-8.
FRAGMENTS = ["FROM:", "TO:", "from:", "<", ">", "@", ".", " ", "=", ",", ":", "\"", "\\",
             "xn--", "-", "[", "]", "IPv6:", "127.0.0.1", "::1", "SIZE=", "BODY=8BITMIME",
             "SMTPUTF8", "postmaster", "a", "test.example", "bücher", "\udcff", "\udc80",
             "\x00", "\t", "é", "\u200b", "x" * 70, "1", "9" * 25]
soup = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5),
                          st.characters(min_codepoint=0xdc80, max_codepoint=0xdcff)),
                max_size=20).map("".join)


# ---------------------------------------------------------------------------------
# parse_path_args
# ---------------------------------------------------------------------------------


def _parse(arg: str, keyword: str = "FROM:", *, utf8: bool = True) -> PathArgs:
    return parse_path_args(arg, keyword, allow_utf8=utf8, allow_null=keyword == "FROM:",
                           allow_postmaster=keyword == "TO:",
                           bad_address_code="5.1.7" if keyword == "FROM:" else "5.1.3")


@settings(max_examples=300)
@given(data=st.data(), local=local_part, domain=st.one_of(ascii_domain, u_domain),
       keyword=st.sampled_from(["FROM:", "TO:"]), trailing_dot=st.booleans())
def test_valid_path_round_trips(data: st.DataObject, local: str, domain: str, keyword: str,
                                trailing_dot: bool) -> None:
    spelled = random_case(data.draw, domain) + ("." if trailing_dot else "")
    kw = random_case(data.draw, keyword)
    size = data.draw(st.integers(0, 10**9))
    got = _parse(f"{kw}<{local}@{spelled}> SIZE={size} body=8BITMIME", keyword)
    assert got.mailbox is not None
    assert got.mailbox.local == local
    assert got.mailbox.domain == normalize_domain(domain)
    assert got.mailbox.domain == domain.encode("idna").decode().lower()
    assert got.params == {"SIZE": str(size), "BODY": "8BITMIME"}


@given(local=local_part, domain=ascii_domain)
def test_source_route_is_ignored(local: str, domain: str) -> None:
    got = _parse(f"TO:<@relay.example,@other.example:{local}@{domain}>", "TO:")
    assert got.mailbox.address == f"{local}@{domain.lower()}"


def test_special_paths() -> None:
    assert _parse("FROM:<>").mailbox is None
    assert _parse("FROM: <a@b.example>").mailbox.domain == "b.example"
    got = _parse("TO:<Postmaster>", "TO:")
    assert got.mailbox is None and got.raw == "Postmaster"
    quoted = _parse('FROM:<"john doe"@example.com>')
    assert quoted.mailbox.local == '"john doe"'
    lit = _parse("TO:<u@[192.0.2.1]>", "TO:")
    assert lit.mailbox.domain == "[192.0.2.1]"


@pytest.mark.parametrize("arg,keyword,prefix", [
    ("FROM:bad", "FROM:", "501 5.5.4"),
    ("FROM:<bad>", "FROM:", "501 5.1.7"),
    ("TO:<bad>", "TO:", "501 5.1.3"),
    ("TO:<>", "TO:", "501 5.1.3"),
    ("FROM:<a@b.example", "FROM:", "501 5.5.4"),
    ("FROM:<a@b.example>junk", "FROM:", "501 5.5.4"),
    ("FROM:<a@b.example> SIZE=", "FROM:", "501 5.5.4"),
    ("FROM:<a@b.example> SIZE=1 SIZE=2", "FROM:", "501 5.5.4"),
    ("FROM:<a@-b.example>", "FROM:", "501 5.1.7"),
    ("FROM:<a@b.123>", "FROM:", "501 5.1.7"),
    ("FROM:<a@[300.1.1.1]>", "FROM:", "501 5.1.7"),
    ("FROM:<" + "x" * 65 + "@b.example>", "FROM:", "501 5.1.7"),
    ("TO:<a@" + "b" * 64 + ".example>", "TO:", "501 5.1.3"),
    ("TO:<a@xn--zz.example>", "TO:", "501 5.1.3"),
])
def test_bad_paths(arg: str, keyword: str, prefix: str) -> None:
    with pytest.raises(ReplyError) as exc:
        _parse(arg, keyword)
    assert exc.value.reply.startswith(prefix), exc.value.reply


def test_non_ascii_without_smtputf8() -> None:
    with pytest.raises(ReplyError) as exc:
        _parse("TO:<jürgen@bücher.example>", "TO:", utf8=False)
    assert exc.value.reply.startswith("553 5.6.7")


@settings(max_examples=1000)
@given(arg=soup, keyword=st.sampled_from(["FROM:", "TO:"]), utf8=st.booleans())
@example(arg="FROM:<\udcff@test.example>", keyword="FROM:", utf8=True)
@example(arg='FROM:<"\udcff"@test.example>', keyword="FROM:", utf8=True)
def test_arbitrary_arguments_only_raise_reply_error(arg: str, keyword: str,
                                                    utf8: bool) -> None:
    try:
        got = _parse(arg, keyword, utf8=utf8)
    except ReplyError as exc:
        assert re.match(r"^5\d\d 5\.\d\.\d+ \S", exc.reply), exc.reply
        return
    # whatever is accepted is well-formed
    if got.mailbox is not None:
        assert got.mailbox.domain == got.mailbox.domain.lower()
        assert "@" not in got.mailbox.domain


# ---------------------------------------------------------------------------------
# parse_mailbox / normalize_domain
# ---------------------------------------------------------------------------------


@settings(max_examples=1000)
@given(text=soup, utf8=st.booleans())
@example(text="\udcff@test.example", utf8=True)
def test_parse_mailbox_only_raises_address_error(text: str, utf8: bool) -> None:
    try:
        mb = parse_mailbox(text, allow_utf8=utf8)
    except AddressError:
        return
    assert mb.address.endswith("@" + mb.domain)
    assert len(mb.local.encode("utf-8")) <= 64


@settings(max_examples=1000)
@given(text=st.one_of(soup, st.text()))
def test_normalize_domain_only_raises_address_error(text: str) -> None:
    try:
        norm = normalize_domain(text)
    except AddressError:
        return
    assert normalize_domain(norm) == norm


@given(data=st.data(), domain=st.one_of(ascii_domain, u_domain), dot=st.booleans())
def test_normalize_domain_idempotent_and_insensitive(data: st.DataObject, domain: str,
                                                     dot: bool) -> None:
    norm = normalize_domain(domain)
    assert normalize_domain(norm) == norm
    assert norm == norm.lower() and norm.isascii() and not norm.endswith(".")
    spelled = random_case(data.draw, domain) + ("." if dot else "")
    assert normalize_domain(spelled) == norm


@given(u=st.sampled_from(U_LABELS), rest=ascii_domain)
def test_u_label_equals_a_label(u: str, rest: str) -> None:
    u_form = f"{u}.{rest}"
    a_form = u_form.encode("idna").decode("ascii")
    assert a_form != u_form
    assert normalize_domain(u_form) == normalize_domain(a_form) == a_form.lower()
    assert normalize_domain(a_form.upper()) == a_form.lower()


@given(local=local_part, domain=st.one_of(ascii_domain, u_domain))
def test_parse_mailbox_round_trip(local: str, domain: str) -> None:
    mb = parse_mailbox(f"{local}@{domain}")
    assert mb.local == local
    assert mb.domain == normalize_domain(domain)
    again = parse_mailbox(mb.address)
    assert again == mb


# ---------------------------------------------------------------------------------
# The DATA reader: DataScanner driven by a session's receive buffer (Connection)
# ---------------------------------------------------------------------------------

LIMIT = MAX_LINE  # past this an unfinished line is dropped from the buffer
TAIL = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@test.example>\r\n"


def _connection() -> Connection:
    """The protocol object sessions are made of, fed by hand instead of a socket."""
    return Connection(asyncio.get_running_loop(), timeout=60, line_limit=12288)


async def _read(chunks: list[bytes], max_size: int = 10**7,
                sink: object = None) -> tuple[DataOutcome, bytes, bytes, OSError | None]:
    """Feed chunks as the socket would (yielding between them) and return (outcome,
    sunk data, what is left for the command loop, the write error)."""
    conn = _connection()
    sunk: list[bytes] = []
    scanner = DataScanner(sink or sunk.append, max_size)  # type: ignore[arg-type]

    async def feed() -> None:
        for chunk in chunks:
            conn.data_received(chunk)
            for _ in range(3):  # let the reader consume what it was given
                await asyncio.sleep(0)
        conn.eof_received()

    feeder = asyncio.ensure_future(feed())
    await asyncio.wait_for(conn.read_data(scanner, lambda n: None), 5)
    await feeder
    result = scanner.result()
    return result.outcome, b"".join(sunk), bytes(conn._buf), result.error


def read(stream: bytes, *, pieces: int = 1, cuts: list[int] | None = None,
         max_size: int = 10**7) -> tuple[DataOutcome, bytes, bytes]:
    """Feed ``stream`` in ``pieces`` equal chunks, or cut at the offsets ``cuts``."""
    if cuts is None:
        step = max(1, -(-len(stream) // pieces))
        cuts = list(range(step, len(stream), step))
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(stream)), len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)] or [b""]
    return asyncio.run(_read(chunks, max_size))[:3]


def reference_split(stream: bytes) -> tuple[bytes, bytes] | None:
    """(body, remainder) per RFC 5321 §4.1.1.4: data ends at the first <CRLF>.<CRLF>
    (the data itself starts right after a CRLF, that of the DATA command). A '.' line
    after a bare LF is NOT an end of data: that is exactly the smuggling trick."""
    if stream.startswith(b".\r\n"):
        return b"", stream[3:]
    pos = stream.find(b"\r\n.\r\n")
    if pos < 0:
        return None
    return stream[:pos + 2], stream[pos + 5:]


def unstuff(body: bytes) -> bytes:
    lines = body.split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


def has_bare_newline(body: bytes) -> bool:
    return bool(re.search(rb"\r(?!\n)|(?<!\r)\n", body))


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n\x00.\r\n", b"\r.\r\n",
             b"\r\n.\n", b"\n.\r", b"\r\n.\r\r\n", b"\n..\n"]


@pytest.mark.parametrize("seq", SMUGGLING, ids=[repr(s)[2:-1] for s in SMUGGLING])
@pytest.mark.parametrize("pieces", [1, 3, 17])
def test_read_data_smuggling_sequences(seq: bytes, pieces: int) -> None:
    stream = b"Subject: x\r\n\r\nbody" + seq + TAIL + b"DATA\r\nSmuggled\r\n.\r\nQUIT\r\n"
    outcome, _sunk, rest = read(stream, pieces=pieces)
    assert outcome in (DataOutcome.BARE_NEWLINE, DataOutcome.NUL)
    assert rest == b"QUIT\r\n"  # the smuggled commands were swallowed as data


@pytest.mark.parametrize("split", ["none", "before-dot", "pieces-5", "pieces-50"])
@pytest.mark.parametrize("n", [LIMIT - 2, LIMIT - 1, LIMIT, LIMIT + 1, LIMIT + 2, 4999, 20000])
def test_read_data_long_line_tail_is_not_a_terminator(n: int, split: str) -> None:
    stream = b"a" * n + b".\r\n" + TAIL + b".\r\nQUIT\r\n"
    if split == "before-dot":  # the '.' is the first octet after what was drained
        outcome, _sunk, rest = read(stream, cuts=[n])
    else:
        outcome, _sunk, rest = read(stream, pieces=int(split.partition("-")[2] or 1))
    assert outcome is DataOutcome.LINE_TOO_LONG
    assert rest == b"QUIT\r\n"


def test_read_data_line_limits() -> None:
    assert read(b"a" * 998 + b"\r\n.\r\n")[:2] == (DataOutcome.OK, b"a" * 998 + b"\r\n")
    assert read(b"." + b"a" * 998 + b"\r\n.\r\n")[:2] == (DataOutcome.OK,
                                                          b"a" * 998 + b"\r\n")
    assert read(b"a" * 999 + b"\r\n.\r\n")[0] is DataOutcome.LINE_TOO_LONG
    assert read(b".." + b"a" * 998 + b"\r\n.\r\n")[0] is DataOutcome.LINE_TOO_LONG


def test_read_data_size_limit() -> None:
    body = b"x" * 98 + b"\r\n"
    assert read(body * 10 + b".\r\n", max_size=1000)[0] is DataOutcome.OK
    assert read(body * 10 + b"y\r\n.\r\n", max_size=1000)[0] is DataOutcome.TOO_BIG


def test_read_data_sink_error_is_write_error() -> None:
    def sink(_: bytes) -> None:
        raise OSError(28, "No space left on device")

    outcome, _sunk, rest, error = asyncio.run(
        _read([b"line\r\nmore\r\n.\r\nQUIT\r\n"], 10**6, sink))
    assert outcome is DataOutcome.WRITE_ERROR
    assert isinstance(error, OSError)
    assert rest == b"QUIT\r\n"


CHUNKS = [b"\r\n", b"\n", b"\r", b".", b"..", b".\r\n", b"\r\n.\r\n", b"\r\n.\n", b"\n.\r\n",
          b"a", b"text ", b"\x00", b"\xff\xe9", b"MAIL FROM:<x@y>", b"x" * 500, b"y" * 1200]


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.sampled_from(CHUNKS), max_size=30),
       cuts=st.lists(st.integers(0, 8000), max_size=12))
def test_read_data_property(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts) + b"\r\n.\r\n" + b"REST"
    split = reference_split(stream)
    assert split is not None
    body, remainder = split
    outcome, sunk, rest = read(stream, cuts=cuts)
    # consumes exactly up to the first end-of-data line, never further, never less
    assert rest == remainder
    # a line is too long when its unstuffed text with CRLF exceeds 998 + 2 octets
    long_line = any(len(ln[1:] if ln.startswith(b".") else ln) + 1 > 1000
                    for ln in body.split(b"\n")[:-1])
    if has_bare_newline(body):
        assert outcome is not DataOutcome.OK
        if b"\x00" not in body and not long_line:
            assert outcome is DataOutcome.BARE_NEWLINE
    if outcome is DataOutcome.OK:
        assert sunk == unstuff(body)
    elif not has_bare_newline(body) and b"\x00" not in body and not long_line:
        pytest.fail(f"clean body refused: {outcome}")


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=120).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")), max_size=20),
       pieces=st.integers(1, 8))
def test_read_data_clean_bodies_round_trip(lines: list[bytes], pieces: int) -> None:
    body = b"".join(ln + b"\r\n" for ln in lines)
    stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    outcome, sunk, rest = read(stuffed + b".\r\nNEXT", pieces=pieces)
    assert outcome is DataOutcome.OK
    assert sunk == body
    assert rest == b"NEXT"


class _DataServer(Connection):
    """A session reduced to its bytes: three commands answered, then DATA."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, timeout=60, line_limit=1000)
        self.scanner = DataScanner(lambda _: None, 10**6)
        self.quickack_before_data: int | None = None

    async def serve(self) -> None:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        for _ in range(3):
            await self.readline()
            self.write(b"250 ok\r\n")
        await self.readline()
        self.quickack_before_data = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK)
        self.write(b"354 go\r\n")
        await self.read_data(self.scanner, lambda n: None)
        self.write(b"250 done\r\n")

    def timed_out(self) -> None:
        pass


def test_data_is_acknowledged_at_once_for_a_client_with_nagle() -> None:
    """A client with Nagle's algorithm on sends its last small write (here the final
    '.') only once what it sent before is acknowledged. By DATA the server's kernel
    delays ACKs (up to 40 ms: every message would wait that long for its 250); the
    reader acknowledges what it has read before waiting for more. Checked on a real
    loopback connection through the kernel's own view of the socket: TCP_QUICKACK
    reads 0 while ACKs are delayed, 1 when they go out at once."""

    async def main() -> tuple[int | None, int, bytes]:
        loop = asyncio.get_running_loop()
        servers: list[_DataServer] = []

        def factory() -> _DataServer:
            servers.append(_DataServer(loop))
            return servers[-1]

        listener = await loop.create_server(factory, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # asyncio turns Nagle off on its connections; the client under test has it on.
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        try:
            for command in (b"EHLO x", b"MAIL FROM:<>", b"RCPT TO:<a@b.example>", b"DATA"):
                writer.write(command + b"\r\n")
                await asyncio.wait_for(reader.readline(), 5)
            writer.write(b"Subject: x\r\n\r\n" + b"y" * 4000 + b"\r\n")
            server = servers[0]
            async with asyncio.timeout(5):
                while server.scanner.size == 0:  # the reader took the body, and waits
                    await asyncio.sleep(0)
            assert server.transport is not None
            sock = server.transport.get_extra_info("socket")
            waiting = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK)
            writer.write(b".\r\n")
            last = await asyncio.wait_for(reader.readline(), 5)
            return server.quickack_before_data, waiting, last
        finally:
            writer.close()
            listener.close()

    before, waiting, last = asyncio.run(main())
    assert before == 0, "precondition: by DATA the kernel delays this connection's ACKs"
    assert waiting == 1, "the body read so far was not acknowledged at once"
    assert last == b"250 done\r\n"


# ---------------------------------------------------------------------------------
# ensure_enhanced
# ---------------------------------------------------------------------------------

ENHANCED = re.compile(r"^([245]\d\d)[ -]([245])\.\d{1,3}\.\d{1,3}( |$)")


@given(code=st.integers(200, 599), text=st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40))
def test_ensure_enhanced_property(code: int, text: str) -> None:
    assume(not re.match(r"^\s*\d\.", text))  # not already an enhanced code
    reply = f"{code} {text}".rstrip()
    out = ensure_enhanced(reply)
    if str(code)[0] == "3":
        assert out == reply
        return
    m = ENHANCED.match(out)
    assert m, out
    assert m.group(1) == str(code)
    assert m.group(2) == str(code)[0]  # class of the enhanced code matches the reply
    assert out.endswith(text.rstrip())
    assert ensure_enhanced(out) == out  # idempotent


@pytest.mark.parametrize("reply,want", [
    ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
    ("250 2.1.5 Ok", "250 2.1.5 Ok"),
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ("421 Service not available", "421 4.3.0 Service not available"),
    ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
    ("501 Syntax: STARTTLS", "501 5.5.4 Syntax: STARTTLS"),
    ("454 TLS not available", "454 4.7.0 TLS not available"),
    ("250", "250 2.0.0"),
])
def test_ensure_enhanced_examples(reply: str, want: str) -> None:
    assert ensure_enhanced(reply) == want
