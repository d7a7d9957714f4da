"""DKIM signing of outbound mail, with real parts throughout.

Keys come from the real ``empath dkim-keygen`` command; the TXT record it prints is
what the verifiers get. The real daemon relays mail to aiosmtpd sinks over
``smtp:`` routes, and the copy each sink received is checked with dkimpy's
``dkim.verify`` (its ``dnsfunc`` answering with the printed record) and, as root,
with OpenDKIM's ``opendkim-testmsg`` and dkimpy's own DNS lookup against dnsmasq
serving that record on port 53 in a network namespace of their own.

``signed_run`` (module scope) runs one daemon through the scenarios whose results
the first tests read: relayed mail from our domain and from a subdomain, mail from a
domain without a key, mail from outside that claims our domain, and a DSN.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import pytest
import yaml
from dkim.canonicalization import Relaxed
from dkim.crypto import parse_pem_private_key
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from empath.delivery import dkim as edkim
from empath.dkimkeygen import generate
from tests.conftest import IN_CI, require_tool
from tests.dnsmasq import find_dnsmasq
from tests.harness import REPO, Daemon, RawClient, base_config, free_port, send_message, wait_until
from tests.sinks import Script, SinkLoop, SMTPSink, loopback

MakeDaemon = Callable[..., Daemon]
HOSTNAME = "mx.test.example"  # the harness's; DSNs come From: MAILER-DAEMON@ it
OUTSIDER = "127.0.0.2"  # not in relay_networks below


# ---- keys, records, verification -------------------------------------------------------


@dataclass
class Key:
    path: Path
    record: str  # the zone-file line the command printed
    selector: str
    domain: str

    @property
    def txt(self) -> bytes:
        """The TXT value a resolver returns: the record's strings, concatenated."""
        return "".join(re.findall(r'"([^"]*)"', self.record)).encode()

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}."


def keygen(directory: Path, domain: str, selector: str, *extra: str,
           out: Path | None = None) -> subprocess.CompletedProcess[str]:
    directory.mkdir(parents=True, exist_ok=True)
    path = out or directory / f"{domain}.{selector}.key"
    return subprocess.run(
        [sys.executable, "-m", "empath", "dkim-keygen", domain, selector, "--out", str(path),
         *extra], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60, check=False)


def make_key(directory: Path, domain: str, selector: str) -> Key:
    p = keygen(directory, domain, selector)
    assert p.returncode == 0, p.stderr
    return Key(directory / f"{domain}.{selector}.key", p.stdout.strip(), selector, domain)


def verifies(message: bytes, *keys: Key) -> bool:
    """dkimpy's verdict, with DNS answering only the records of ``keys``."""
    records = {k.name.encode(): k.txt for k in keys}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return bool(dkim.verify(message, dnsfunc=dnsfunc))


def signature_tags(message: bytes) -> dict[str, str]:
    assert message.startswith(b"DKIM-Signature: "), message[:200]
    end = re.search(rb"\r\n(?![ \t])", message)
    assert end is not None
    value = re.sub(r"\s+", "", message[len(b"DKIM-Signature: "):end.start()].decode())
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


def mail(subject: str, sender: str = "Alice <alice@test.example>", to: str = "bob@partner.test",
         body: str = "Hello,\r\n\r\nthis is  a test  \r\n\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 01 Dec 2025 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@test.example>\r\n\r\n{body}").encode()


def received(sink: SMTPSink, marker: bytes) -> bytes | None:
    for t in list(sink.transactions):
        if t.data is not None and marker in t.data:
            return t.data
    return None


def ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "empath.ctl", "--socket", str(d.state_dir / "control.sock"),
         *args], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60, check=False)


async def send_from(source: str, port: int, sender: str, rcpt: str, body: bytes) -> int:
    """One transaction from the local address ``source``; the reply code to the dot."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    c = RawClient(reader, writer, "dkim-outsider")
    try:
        await c.greet()
        assert (await c.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
        code, text = await c.cmd(f"RCPT TO:<{rcpt}>")
        assert code == 250, text
        assert (await c.cmd("DATA"))[0] == 354
        c.send(body + b".\r\n")
        code, _ = await c.reply()
        await c.cmd("QUIT")
        return code
    finally:
        await c.close()


def send(d: Daemon, body: bytes, rcpt: str = "bob@partner.test",
         sender: str = "alice@test.example") -> None:
    code, text = asyncio.run(send_message(d.smtp_port, sender, [rcpt], body, "dkim"))
    assert code == 250, text


def dkim_config(key: Key, sinks: dict[str, SMTPSink], **delivery: Any) -> dict[str, Any]:
    """``sinks``: domain → the sink its mail is routed to (test.example, our local
    domain, to the first sink unless given)."""
    sinks = {"test.example": next(iter(sinks.values())), **sinks}
    return {
        "local_domains": ["test.example"],
        # 127.0.0.1 relays (as local sendmail does); 127.0.0.2 is the outside world.
        "relay_networks": ["127.0.0.1/32"],
        "dkim": {key.domain: {"selector": key.selector, "key": str(key.path)}},
        "delivery": {"mode": "mx", "retry_schedule": [1],
                     "routes": {domain: f"smtp:{s.host}:{s.port}" for domain, s in sinks.items()},
                     **delivery},
    }


def start_sink(loop: SinkLoop, script: Script | None = None) -> SMTPSink:
    return loop.start(SMTPSink(script, host=loopback(), port=free_port()))


# ---- the command ---------------------------------------------------------------------------


def test_keygen_writes_a_private_key_and_prints_the_record_to_publish(tmp_path: Path) -> None:
    p = keygen(tmp_path, "Example.COM", "s1", out=tmp_path / "k.key")
    assert p.returncode == 0, p.stderr
    path = tmp_path / "k.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    line = p.stdout.strip()
    assert p.stdout.count("\n") == 1, "stdout is the record line alone"
    m = re.fullmatch(r's1\._domainkey\.example\.com\. IN TXT ((?:"[^"]{1,255}" ?)+)', line)
    assert m, line
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) == 2 and len(strings[0]) == 255  # 2048 bits: one cut
    value = "".join(strings)
    assert value.startswith("v=DKIM1; k=rsa; p=")
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(path.read_bytes(), None)
    assert private.key_size == 2048  # type: ignore[union-attr]
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    assert value.removeprefix("v=DKIM1; k=rsa; p=") == base64.b64encode(der).decode()
    # PKCS#1, which dkimpy 1.0 (no PKCS#8) reads as well as 1.1 and OpenDKIM.
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert "dkim:" in p.stderr and "example.com: {selector: s1, key: " in p.stderr


def test_keygen_never_overwrites_a_key_and_checks_its_arguments(tmp_path: Path) -> None:
    assert keygen(tmp_path, "example.com", "s1").returncode == 0
    path = tmp_path / "example.com.s1.key"
    before = path.read_bytes()
    again = keygen(tmp_path, "example.com", "s1")
    assert again.returncode == 1 and "exists" in again.stderr
    assert path.read_bytes() == before
    bad = keygen(tmp_path, "example.com", "s_1")
    assert bad.returncode == 2 and "selector" in bad.stderr
    assert keygen(tmp_path, "not a domain", "s1").returncode == 2
    small = keygen(tmp_path, "example.com", "s2", "--bits", "1024")
    assert small.returncode == 0
    assert len("".join(re.findall(r'"([^"]*)"', small.stdout))) < 255


# ---- the signature itself ------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit_key() -> edkim.DomainKey:
    pem, _ = generate(2048)
    pk = parse_pem_private_key(pem)
    return edkim.DomainKey("example.com", "s1", Path("/unused"),
                           tuple(h.lower() for h in edkim.DEFAULT_HEADERS), pk,
                           int(pk["modulus"]).bit_length())


def unit_record(key: edkim.DomainKey) -> Callable[..., bytes | None]:
    n, e = int(key.private["modulus"]), int(key.private["publicExponent"])
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    der = rsa.RSAPublicNumbers(e, n).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    return lambda name, timeout=5: txt if name == b"s1._domainkey.example.com." else None


_line = st.text(alphabet="ab \t.", max_size=12).map(lambda s: s.encode())
_body = st.lists(_line, max_size=12).map(lambda lines: b"".join(x + b"\r\n" for x in lines))


@given(body=_body, tail=st.sampled_from([b"", b"x\r\n", b"x \r\n", b" \t\r\n", b"\r\n\r\n"]),
       chunk=st.integers(min_value=1, max_value=9))
def test_streamed_body_hash_equals_dkimpys_whole_body_canonicalisation(
        body: bytes, tail: bytes, chunk: int) -> None:
    """The body is hashed in pieces of any size, exactly as dkimpy hashes it whole.
    (Spooled bodies end with CRLF: DATA does, and so does every DSN we build.)"""
    data = body + tail
    expected = hashlib.sha256(Relaxed.canonicalize_body(data)).digest()
    assert edkim.body_hash(io.BytesIO(data), chunk_size=chunk) == expected


@settings(max_examples=40, deadline=None)
@given(body=_body, extra=st.lists(st.sampled_from(
    [b"Cc: c@example.org\r\n", b"Subject: two  subjects\r\n", b"X-Long: a\r\n\t b  c\r\n",
     b"Received: from a\r\n by b\r\n"]), max_size=4), chunk=st.integers(1, 64))
def test_signed_files_verify_whatever_their_shape(
        unit_key: edkim.DomainKey, body: bytes, extra: list[bytes], chunk: int) -> None:
    """Header blocks split across reads, folded and repeated headers, empty bodies."""
    message = (b"Received: from x\r\n\tby y\r\n" + b"".join(extra)
               + b"From: A <a@example.com>\r\nSubject: s\r\n\r\n" + body)
    with tempfile.NamedTemporaryFile() as f:
        f.write(message)
        f.flush()
        signed = edkim.sign_file(Path(f.name), edkim.DkimKeys({"example.com": unit_key}),
                                 chunk_size=chunk)
    assert signed.domain == "example.com"
    assert dkim.verify(signed.header + message, dnsfunc=unit_record(unit_key))


def test_every_listed_header_is_oversigned(unit_key: edkim.DomainKey, tmp_path: Path) -> None:
    path = tmp_path / "m"
    message = mail("oversigned", sender="a@example.com")
    path.write_bytes(message)
    signed = edkim.sign_file(path, edkim.DkimKeys({"example.com": unit_key}))
    dnsfunc = unit_record(unit_key)
    assert dkim.verify(signed.header + message, dnsfunc=dnsfunc)
    tags = signature_tags(signed.header)
    h = tags["h"].split(":")
    assert h.count("from") == 2 and h.count("reply-to") == 1  # present once / absent
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == (
        "rsa-sha256", "relaxed/relaxed", "example.com", "s1")
    # What a replay would add, above or below the signed one: each breaks it.
    for added in (b"From: ceo@example.com\r\n", b"Reply-To: evil@example.org\r\n",
                  b"Subject: urgent\r\n", b"Content-Type: text/html\r\n"):
        assert not dkim.verify(signed.header + added + message, dnsfunc=dnsfunc), added
        assert not dkim.verify(signed.header + message.replace(b"\r\n\r\n", b"\r\n" + added
                                                               + b"\r\n", 1), dnsfunc=dnsfunc)


def test_signing_25_mb_holds_no_copy_of_the_message(
        unit_key: edkim.DomainKey, tmp_path: Path) -> None:
    path = tmp_path / "big"
    line = b"x" * 76 + b"\r\n"
    with path.open("wb") as f:
        f.write(mail("big", sender="a@example.com", body=""))
        for _ in range(25 * 1024 * 1024 // len(line)):
            f.write(line)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        signed = edkim.sign_file(path, edkim.DkimKeys({"example.com": unit_key}))
        took = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"signed {path.stat().st_size} bytes in {took:.2f} s, peak {peak / 1e6:.1f} MB")
    assert peak < 4_000_000, f"signing a 25 MB message allocated {peak} bytes at its peak"
    assert dkim.verify(signed.header + path.read_bytes(), dnsfunc=unit_record(unit_key))


@pytest.mark.parametrize("headers", [
    b"To: b@example.org\r\n",  # no From
    b"From: a@example.com\r\nFrom: b@example.com\r\n",  # two
    b"From: a@example.com, b@example.com\r\n",  # a list
    b"From: a@other.example\r\n",  # no key
])
def test_no_single_from_in_a_keyed_domain_means_no_signature(
        unit_key: edkim.DomainKey, tmp_path: Path, headers: bytes) -> None:
    path = tmp_path / "m"
    path.write_bytes(headers + b"Subject: x\r\n\r\nbody\r\n")
    signed = edkim.sign_file(path, edkim.DkimKeys({"example.com": unit_key}))
    assert signed.header == b"" and signed.reason


# ---- the daemon: one run, several scenarios ---------------------------------------------


@dataclass
class SignedRun:
    key: Key
    partner: dict[str, bytes]  # subject marker → message as the partner's MX received it
    mailbox: dict[str, bytes]  # the same for our own mailbox server (test.example)
    dsn: bytes
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float]
    log: str


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignedRun]:
    work = tmp_path_factory.mktemp("dkim-run")
    key = make_key(work / "keys", "test.example", "s1")
    loop = SinkLoop()
    d: Daemon | None = None
    try:
        partner = start_sink(loop)
        mailbox = start_sink(loop)
        reject = start_sink(loop, Script(rcpt_replies={
            "nobody@reject.test": "550 5.1.1 no such user"}))
        smtp_port, submission_port = free_port(), free_port()
        cfg = base_config(work / "state", smtp_port, submission_port)
        metrics_port = free_port()
        cfg.update(dkim_config(key, {"partner.test": partner, "test.example": mailbox,
                                     "reject.test": reject}),
                   hostname=HOSTNAME, metrics={"listen": f"127.0.0.1:{metrics_port}"})
        d = Daemon(work, cfg, smtp_port, submission_port)
        d.start()
        send(d, mail("relayed"))
        send(d, mail("subdomain", sender="root@mx.test.example"))
        send(d, mail("nokey", sender="carol@elsewhere.example"), sender="carol@elsewhere.example")
        send(d, mail("inside", to="alice@test.example"), rcpt="alice@test.example")
        code = asyncio.run(send_from(OUTSIDER, d.smtp_port, "ceo@test.example",
                                     "alice@test.example",
                                     mail("outside", sender="CEO <ceo@test.example>",
                                          to="alice@test.example")))
        assert code == 250
        # bob@partner.test is the sender: the DSN goes to the partner's MX.
        send(d, mail("bounces", sender="bob@partner.test", to="nobody@reject.test"),
             rcpt="nobody@reject.test", sender="bob@partner.test")
        got_partner = {m: wait_until(lambda m=m: received(partner, m.encode()), m, d)
                       for m in ("relayed", "subdomain", "nokey")}
        got_mailbox = {m: wait_until(lambda m=m: received(mailbox, m.encode()), m, d)
                       for m in ("inside", "outside")}
        dsn = wait_until(lambda: next((t.data for t in list(partner.transactions)
                                     if t.mail.startswith("FROM:<>") and t.data), None),
                       "the DSN", d)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as resp:
            body = resp.read().decode()
        samples = {(s.name, frozenset(s.labels.items())): s.value
                   for f in text_string_to_metric_families(body) for s in f.samples}
        yield SignedRun(key, got_partner, got_mailbox, dsn, samples, d.log())
    finally:
        if d is not None and d.proc is not None and d.proc.poll() is None:
            d.kill()
        loop.close()


def test_relayed_mail_from_our_domain_arrives_signed_and_verifies(signed_run: SignedRun) -> None:
    message = signed_run.partner["relayed"]
    assert verifies(message, signed_run.key)
    tags = signature_tags(message)
    assert (tags["d"], tags["s"], tags["a"]) == ("test.example", "s1", "rsa-sha256")
    # Prepended on the wire: the spooled message (our Received: first) follows as it was.
    after = message.split(b"\r\nReceived: ", 1)
    assert len(after) == 2 and b"DKIM-Signature" not in after[1]
    assert after[1].count(b"\r\nFrom: Alice <alice@test.example>\r\n") == 1


def test_a_changed_copy_does_not_verify(signed_run: SignedRun, tmp_path: Path) -> None:
    message = signed_run.partner["relayed"]
    key = signed_run.key
    assert not verifies(message.replace(b"Subject: relayed", b"Subject: reLayed"), key)
    assert not verifies(message.replace(b"this is  a test", b"this is a pest"), key)
    assert not verifies(message.replace(b"s=s1;", b"s=s2;"), key)
    other = make_key(tmp_path, "test.example", "s1")
    assert not verifies(message, other), "verified against a key that did not sign it"


def test_mail_from_a_subdomain_is_signed_with_the_parent_domains_key(
        signed_run: SignedRun) -> None:
    message = signed_run.partner["subdomain"]
    assert verifies(message, signed_run.key)
    assert signature_tags(message)["d"] == "test.example"


def test_mail_from_a_domain_without_a_key_is_not_signed(signed_run: SignedRun) -> None:
    assert b"DKIM-Signature" not in signed_run.partner["nokey"]


def test_mail_from_outside_is_never_signed_even_when_it_claims_our_domain(
        signed_run: SignedRun) -> None:
    """Not a signing oracle: what an outsider sends in, we do not vouch for."""
    assert b"DKIM-Signature" not in signed_run.mailbox["outside"]
    assert b"From: CEO <ceo@test.example>" in signed_run.mailbox["outside"]
    # The same route, from a relay client: signed.
    assert verifies(signed_run.mailbox["inside"], signed_run.key)


def test_a_dsn_from_mailer_daemon_is_signed(signed_run: SignedRun) -> None:
    dsn = signed_run.dsn
    assert f"From: Mail Delivery System <MAILER-DAEMON@{HOSTNAME}>".encode() in dsn
    assert verifies(dsn, signed_run.key)
    assert signature_tags(dsn)["d"] == "test.example"


def test_signatures_are_counted_and_the_key_logged(signed_run: SignedRun) -> None:
    signed = signed_run.metrics[("empath_dkim_signatures_total",
                                 frozenset({("result", "signed")}))]
    assert signed == 4  # relayed, subdomain, inside, the DSN
    assert signed_run.metrics[("empath_dkim_signatures_total",
                               frozenset({("result", "error")}))] == 0
    assert "dkim: signing mail from test.example with selector s1 (RSA 2048 bits" in (
        signed_run.log)
    assert "s1._domainkey.test.example" in signed_run.log


# ---- OpenDKIM and real DNS ----------------------------------------------------------------


def _needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        if IN_CI:
            pytest.fail("the OpenDKIM check needs root, unshare and ip under CI=true")
        pytest.skip("needs root, unshare and ip (a network namespace with DNS on port 53)")


NS_SCRIPT = """
set -eu
ip link set lo up
mount --bind "$W/resolv.conf" /etc/resolv.conf
"$DNSMASQ" --conf-file="$W/dnsmasq.conf" --pid-file="$W/dnsmasq.pid"
trap 'kill "$(cat "$W/dnsmasq.pid")"' EXIT
for f in "$W"/*.eml; do
  set +e
  "$TESTMSG" < "$f" > "$f.opendkim" 2>&1; echo "$(basename "$f") opendkim $?"
  "$PYTHON" -c 'import dkim, sys; sys.exit(0 if dkim.verify(sys.stdin.buffer.read()) else 1)' \
    < "$f" > "$f.dkimpy" 2>&1; echo "$(basename "$f") dkimpy $?"
  set -e
done
"""


def test_opendkim_and_dns_lookups_verify_the_signature(
        signed_run: SignedRun, tmp_path: Path) -> None:
    """opendkim-testmsg (libopendkim) and dkimpy with its own DNS lookup, both asking
    a real DNS server (dnsmasq) that serves the record ``empath dkim-keygen`` printed."""
    testmsg = require_tool("opendkim-testmsg")
    dnsmasq = find_dnsmasq() or require_tool("dnsmasq")
    _needs_root()
    key = signed_run.key
    strings = re.findall(r'"[^"]*"', key.record)
    (tmp_path / "dnsmasq.conf").write_text(
        "port=53\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n"
        f"txt-record={key.name.rstrip('.')},{','.join(strings)}\n")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    relayed = signed_run.partner["relayed"]
    (tmp_path / "good.eml").write_bytes(relayed)
    (tmp_path / "dsn.eml").write_bytes(signed_run.dsn)
    (tmp_path / "changed.eml").write_bytes(relayed.replace(b"Subject: relayed",
                                                           b"Subject: Relayed"))
    p = subprocess.run(["unshare", "--net", "--mount", "--fork", "sh", "-c", NS_SCRIPT],
                       env={**os.environ, "W": str(tmp_path), "DNSMASQ": dnsmasq,
                            "TESTMSG": testmsg, "PYTHON": sys.executable},
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    verdicts = {tuple(line.split()[:2]): int(line.split()[2]) for line in p.stdout.splitlines()}
    detail = {f.name: f.read_text() for f in tmp_path.glob("*.eml.*")}
    for tool in ("opendkim", "dkimpy"):
        assert verdicts[("good.eml", tool)] == 0, detail
        assert verdicts[("dsn.eml", tool)] == 0, detail
        assert verdicts[("changed.eml", tool)] != 0, detail
    assert "Bad signature" in detail["changed.eml.opendkim"]


# ---- keys at start and reload ---------------------------------------------------------------


def test_a_world_readable_or_broken_key_stops_the_start_with_status_2(
        make_daemon: MakeDaemon, sinks: SinkLoop, tmp_path: Path) -> None:
    key = make_key(tmp_path / "keys", "test.example", "s1")
    partner = start_sink(sinks)
    key.path.chmod(0o644)
    d = make_daemon(start=False, **dkim_config(key, {"partner.test": partner}))
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(30) == 2
    assert "dkim[test.example].key" in d.log() and "readable or writable by others" in d.log()

    key.path.chmod(0o640)
    key.path.write_bytes(b"-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n"
                         b"-----END RSA PRIVATE KEY-----\n")
    d2 = make_daemon(start=False, **dkim_config(key, {"partner.test": partner}))
    d2.start(wait=False)
    assert d2.proc is not None and d2.proc.wait(30) == 2
    assert "dkim[test.example].key" in d2.log() and "not a PEM RSA private key" in d2.log()

    missing = Key(tmp_path / "nope.key", key.record, "s1", "test.example")
    d3 = make_daemon(start=False, **dkim_config(missing, {"partner.test": partner}))
    d3.start(wait=False)
    assert d3.proc is not None and d3.proc.wait(30) == 2
    assert "dkim[test.example].key" in d3.log() and "cannot open" in d3.log()


def test_reload_switches_to_a_new_key_and_refuses_a_bad_one(
        make_daemon: MakeDaemon, sinks: SinkLoop, tmp_path: Path) -> None:
    old = make_key(tmp_path / "keys", "test.example", "s1")
    partner = start_sink(sinks)
    d = make_daemon(**dkim_config(old, {"partner.test": partner}))
    send(d, mail("first"))
    first = wait_until(lambda: received(partner, b"first"), "first", d)
    assert verifies(first, old)

    new = make_key(tmp_path / "keys", "test.example", "s2")
    new.path.chmod(0o644)
    d.config["dkim"] = {"test.example": {"selector": "s2", "key": str(new.path)}}
    d.write_config()
    refused = ctl(d, "reload", "--wait")
    assert refused.returncode == 1
    assert "dkim[test.example].key" in refused.stderr
    send(d, mail("second"))
    second = wait_until(lambda: received(partner, b"second"), "second", d)
    assert verifies(second, old), "a refused reload changes nothing"

    new.path.chmod(0o640)
    assert ctl(d, "reload", "--wait").returncode == 0
    send(d, mail("third"))
    third = wait_until(lambda: received(partner, b"third"), "third", d)
    assert signature_tags(third)["s"] == "s2"
    assert verifies(third, new)
    assert not verifies(third, Key(old.path, old.record, "s2", "test.example"))


def test_reload_with_a_changed_key_file_applies_to_mail_already_queued(
        make_daemon: MakeDaemon, sinks: SinkLoop, tmp_path: Path) -> None:
    """Signing happens at delivery: mail held in the queue goes out with the key in
    force when it leaves, here a key rewritten in place under the same path."""
    old = make_key(tmp_path / "old", "test.example", "s1")
    partner = start_sink(sinks)
    d = make_daemon(**dkim_config(old, {"partner.test": partner}, mode="hold"))
    send(d, mail("held"))
    time.sleep(0.5)
    assert not partner.transactions
    new = make_key(tmp_path / "new", "test.example", "s1")
    old.path.write_bytes(new.path.read_bytes())
    d.config["delivery"]["mode"] = "mx"
    d.write_config()
    assert ctl(d, "reload", "--wait").returncode == 0
    held = wait_until(lambda: received(partner, b"held"), "the held message", d)
    assert verifies(held, new)
    assert not verifies(held, old)


def test_check_config_accepts_dkim_and_shows_the_headers_it_signs(tmp_path: Path) -> None:
    """check-config checks the file alone: the key need not exist on this host."""
    cfg = base_config(tmp_path / "state", 2525, 2587)
    cfg["dkim"] = {"Example.COM": {"selector": "s1", "key": "/etc/empath/dkim/example.com.key"},
                   "example.org": {"selector": "s2", "key": "/etc/empath/dkim/o.key",
                                   "headers": ["From", "Subject"]}}
    path = tmp_path / "empath.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    p = subprocess.run([sys.executable, "-m", "empath", "check-config", "--config", str(path)],
                       capture_output=True, text=True, env={**os.environ,
                                                            "PYTHONPATH": str(REPO)},
                       timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    effective = yaml.safe_load(p.stdout)["dkim"]
    assert effective["example.com"]["headers"][:3] == ["From", "To", "Cc"]
    assert effective["example.org"] == {"selector": "s2", "key": "/etc/empath/dkim/o.key",
                                        "headers": ["From", "Subject"]}

