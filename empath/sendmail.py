"""``empath sendmail``: the sendmail-compatible local submission command.

Installed as ``/usr/sbin/sendmail`` (and ``/usr/lib/sendmail``, ``mailq``,
``newaliases``) by the package: symlinks to ``empath``, which looks at the name it
was called by (``empath.cli``). It reads a message on stdin, completes its header
(``From:``, ``Date:``, ``Message-ID:``, qualified addresses), and submits it over SMTP
to the local daemon. It keeps no queue of its own: if the daemon does not take the
message, the caller is told so by the exit status (75 = try again later) and a copy
goes to ``~/dead.letter``. docs/sendmail.md is the user-facing description.

The client is the standard library's ``smtplib``, not aiosmtplib: this is one short
synchronous transaction from a short-lived process, and smtplib's ``docmd`` hands
back every reply as ``(code, text)`` without raising, which is what per-recipient
handling needs. It also behaves the same on every Python we support, whereas
aiosmtplib's API differs between Debian 12's 2.0 and current PyPI releases.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import os
import pwd
import re
import smtplib
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

__all__ = ["mailq", "main", "newaliases", "run_as"]

# sysexits.h, as sendmail and Postfix use them.
EX_OK = 0
EX_USAGE = 64  # bad option, no recipients
EX_DATAERR = 65  # the daemon refused the message content (reply to DATA or the dot)
EX_NOUSER = 67  # the daemon refused one or more recipients (5xx to RCPT)
EX_UNAVAILABLE = 69  # the daemon refused the session or the sender (5xx)
EX_SOFTWARE = 70
EX_IOERR = 74  # cannot read the message
EX_TEMPFAIL = 75  # the daemon is unreachable or answered 4xx: try again later
EX_CONFIG = 78  # $EMPATH_SENDMAIL_SMTP is malformed

PROG = "empath sendmail"
DEFAULT_TARGET = ("127.0.0.1", 25)  # where the package's empath.socket listens
# RFC 5321 §4.5.3.2: 5 minutes for commands, 10 for the reply to the final dot.
COMMAND_TIMEOUT = 300.0
DATA_TIMEOUT = 600.0
MAX_LINE = 998  # octets per line without CRLF (RFC 5322 §2.1.1)

# Option letters as in Postfix's sendmail(1) (a getopt string with "+": options end
# at the first operand). Letters that take a value, attached or as the next word.
_WITH_VALUE = set("ABCFLNORVXbefhopr")
# Letters whose value may only be attached (``-q``, ``-q1h``; ``-d``, ``-d0.1``).
_OPTIONAL_VALUE = set("dq")
_FLAGS = set("GIUimntv")

USAGE = f"""\
usage: {PROG} [options] [--] [recipient ...]
  -t           take recipients from To:, Cc:, Bcc: (added to any given here);
               Bcc: is removed from the message
  -i, -oi      a line with a single dot does not end the message
  -f ADDR      envelope sender (also -fADDR, -r ADDR; -f '<>' for the null sender)
  -F NAME      full name for the From: header added when the message has none
  -N DSN       never, or a comma list of success,failure,delay
  -R RET       full or hdrs;  -V ENVID  the DSN envelope id
  -B TYPE      7BIT or 8BITMIME;  -C FILE  configuration file
  -bm          deliver (the default);  -bp  list the queue (mailq);
  -bi          newaliases (nothing to do);  -bs  SMTP on stdin/stdout
  -q           deliver the queue now;  -v  show the SMTP dialogue
  -o*, -e*, -h N, -L, -O, -X, -p, -A, -d*, -G, -U, -m, -n  accepted and ignored
See docs/sendmail.md."""


class UsageError(Exception):
    """A bad command line (exit 64)."""


@dataclass
class Options:
    mode: str = "m"  # the -b letter: m deliver, p mailq, i newaliases, s SMTP on stdio
    flush: str | None = None  # -q value ("" for plain -q)
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i / -oi
    sender: str | None = None  # -f / -r as given
    full_name: str | None = None  # -F
    verbose: bool = False
    notify: str | None = None  # NOTIFY= value
    ret: str | None = None  # RET= value
    envid: str | None = None  # -V, not yet xtext-encoded
    body: str | None = None  # -B
    config: Path | None = None  # -C
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    """Parse a sendmail command line (POSIX getopt rules, as Postfix does)."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg.startswith("--"):
            raise UsageError(f"unknown option {arg}")
        j = 1
        while j < len(arg):
            letter = arg[j]
            if letter in _FLAGS:
                _flag(opts, letter)
                j += 1
                continue
            if letter in _OPTIONAL_VALUE:
                _value(opts, letter, arg[j + 1:])
                break
            if letter in _WITH_VALUE:
                value = arg[j + 1:]
                if not value:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"option -{letter} requires a value")
                    value = argv[i]
                _value(opts, letter, value)
                break
            raise UsageError(f"unknown option -{letter}" + (f" (in {arg})" if len(arg) > 2 else ""))
        i += 1
    opts.recipients = list(argv[i:])
    return opts


def _flag(opts: Options, letter: str) -> None:
    if letter == "t":
        opts.extract = True
    elif letter == "i":
        opts.ignore_dots = True
    elif letter == "v":
        opts.verbose = True
    elif letter == "I":  # sendmail -I: initialise the alias database
        opts.mode = "i"
    # -G (gateway), -U (initial submission), -m (me too), -n (no aliasing): nothing to do.


def _value(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        opts.sender = value
    elif letter == "F":
        opts.full_name = value
    elif letter == "b":
        _mode(opts, value)
    elif letter == "o":
        if value == "i":
            opts.ignore_dots = True
        # -oem, -odb, -oQ..., -om, -o7 ...: sendmail.cf options that mean nothing here.
    elif letter == "q":
        opts.flush = value
    elif letter == "N":
        opts.notify = _notify(value)
    elif letter == "R":
        if value.lower() not in ("full", "hdrs"):
            raise UsageError(f"-R takes full or hdrs, not {value!r}")
        opts.ret = value.upper()
    elif letter == "V":
        if not value or not value.isascii() or len(value) > 100:
            raise UsageError("-V takes an envelope id of 1 to 100 ASCII characters")
        opts.envid = value
    elif letter == "B":
        if value.upper() not in ("7BIT", "8BITMIME"):
            raise UsageError(f"-B takes 7BIT or 8BITMIME, not {value!r}")
        opts.body = value.upper()
    elif letter == "C":
        opts.config = Path(value)
    # -A, -d, -e, -h, -L, -O, -p, -X: accepted for compatibility and ignored.


_MODES = {
    "m": None, "p": None, "i": None, "s": None,
    "d": "-bd (run as a daemon) is not how empath runs: use `systemctl start empath` "
         "or `empath run`",
    "D": "-bD (run as a daemon) is not how empath runs: use `systemctl start empath` "
         "or `empath run`",
    "t": "-bt (address test mode) is not supported",
    "v": "-bv (verify addresses) is not supported",
    "h": "-bh (host status) is not supported",
    "H": "-bH (purge host status) is not supported",
    "P": "-bP (print queue counts) is not supported: use `empathctl queue stats`",
    "a": "-ba (ARPANET mode) is not supported",
    "l": "-bl (listen mode) is not supported",
}


def _mode(opts: Options, value: str) -> None:
    if value not in _MODES:
        raise UsageError(f"unknown mode -b{value}")
    refusal = _MODES[value]
    if refusal is not None:
        raise UsageError(refusal)
    opts.mode = value


def _notify(value: str) -> str:
    words = [w.strip().upper() for w in value.split(",") if w.strip()]
    if words == ["NEVER"]:
        return "NEVER"
    if not words or any(w not in ("SUCCESS", "FAILURE", "DELAY") for w in words):
        raise UsageError(f"-N takes never or a list of success,failure,delay, not {value!r}")
    return ",".join(dict.fromkeys(words))


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: "+" and "=" and anything outside ! to ~ as +XX."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}"
                   for c in value)


# ------------------------------------------------------------------ where and who


@dataclass
class Local:
    """What the config file (if this user can read it) says, and the daemon's address."""

    hostname: str | None  # config's hostname; None when the config is unreadable
    target: tuple[str, int]
    target_source: str  # for -v and messages: where the address came from


def _parse_hostport(text: str) -> tuple[str, int]:
    text = text.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", text) or \
        re.fullmatch(r"([^:\[\]\s]+):(\d{1,5})", text)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"expected host:port or [v6-address]:port, got {text!r}")
    return m.group(1), int(m.group(2))


def locate(opts: Options, say: Callable[[str], None]) -> Local:
    """Hostname and SMTP address: $EMPATH_SENDMAIL_SMTP, the config file, 127.0.0.1:25.

    The config is 0640 root:empath in the package, so for most users it is not
    readable: that is normal, not an error, and falls back quietly.
    """
    from empath.config import ConfigError, default_config_path, load_config

    path = opts.config or default_config_path()
    cfg = None
    try:
        cfg = load_config(path, check_modules=False)
    except (ConfigError, OSError) as exc:
        say(f"config not used: {str(exc).strip().splitlines()[-1]}")
    hostname = cfg.hostname if cfg is not None else None
    env = os.environ.get("EMPATH_SENDMAIL_SMTP")
    if env:
        try:
            return Local(hostname, _parse_hostport(env), "$EMPATH_SENDMAIL_SMTP")
        except ValueError as exc:
            raise ConfigurationError(f"$EMPATH_SENDMAIL_SMTP: {exc}") from None
    if cfg is not None:
        for lst in cfg.listen:
            if lst.role == "smtp":
                host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(lst.host, lst.host)
                return Local(hostname, (host, lst.port), f"listen in {path}")
    return Local(hostname, DEFAULT_TARGET, "default")


class ConfigurationError(Exception):
    """Our own settings are broken (exit 78)."""


def _login() -> tuple[str, str, str]:
    """(login, full name from GECOS, home directory) of the real user."""
    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        name = os.environ.get("LOGNAME") or os.environ.get("USER") or f"uid{uid}"
        return name, "", os.environ.get("HOME", "")
    gecos = pw.pw_gecos.split(",", 1)[0].strip()
    # Traditional GECOS: "&" stands for the login name, capitalised.
    gecos = gecos.replace("&", pw.pw_name[:1].upper() + pw.pw_name[1:])
    return pw.pw_name, gecos, pw.pw_dir


_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                     r"(\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _idna_domain(domain: str) -> str:
    """The ASCII form of a domain, so that only a UTF-8 local part needs SMTPUTF8."""
    from empath.addr import AddressError, normalize_domain

    try:
        return normalize_domain(domain)
    except AddressError:
        return domain


def qualify(address: str, hostname: str) -> str:
    """``root`` → ``root@hostname``; the domain in its ASCII (A-label) form."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if not address:
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        return f"{address}@{hostname}"
    return f"{local}@{_idna_domain(domain)}" if domain else address


def _addresses(values: Sequence[str]) -> list[str]:
    return [addr for _, addr in email.utils.getaddresses(list(values)) if addr]


def _dedupe(addresses: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for a in addresses:
        local, _, domain = a.rpartition("@")
        key = f"{local}@{domain.lower()}"
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


# ------------------------------------------------------------------ the message


_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# Header fields whose addresses are qualified like the envelope's.
_ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc", "resent-from",
                   "resent-sender", "resent-to", "resent-cc", "resent-bcc")


@dataclass
class Field:
    name: str  # lower-case
    lines: list[bytes]  # as read, without line ends; continuation lines included

    @property
    def value(self) -> str:
        raw = b" ".join(x.strip() for x in self.lines)
        return raw.split(b":", 1)[1].strip().decode("utf-8", "surrogateescape")


@dataclass
class Parsed:
    fields: list[Field]
    body: list[bytes]


def read_message(data: bytes, ignore_dots: bool) -> Parsed:
    """Split stdin into header fields and body lines, whatever its line ends.

    CRLF, LF and a bare CR all end a line (a bare CR would make the daemon refuse the
    message; in cron output it is a progress meter's carriage return). Without -i a
    line holding a single dot ends the message. A leading mbox ``From `` line is
    dropped, as sendmail does. The header ends at the first line that is not a field
    or a continuation; an empty line there is the separator, anything else is the
    first line of the body (``echo hi | sendmail root`` has no header at all).
    """
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not ignore_dots:
        with contextlib.suppress(ValueError):
            lines = lines[:lines.index(b".")]
    if lines and lines[0].startswith(b"From "):
        lines = lines[1:]
    fields: list[Field] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FIELD.match(line)
        if m:
            fields.append(Field(m.group(1).decode("ascii").lower(), [line]))
        elif line[:1] in (b" ", b"\t") and fields:
            fields[-1].lines.append(line)
        else:
            break
        i += 1
    if i < len(lines) and lines[i] == b"":
        i += 1
    return Parsed(fields, lines[i:])


def _qualified_field(f: Field, hostname: str) -> Field:
    """The field with unqualified addresses (``To: root``) qualified, else unchanged.

    Only plain address lists are rewritten: groups, encoded words and anything the
    parser cannot take apart are left exactly as written.
    """
    value = f.value
    if "=?" in value or ";" in value or not value.isascii():
        return f
    pairs = email.utils.getaddresses([value])
    if not pairs or any(not addr for _, addr in pairs):
        return f
    if all("@" in addr for _, addr in pairs):
        return f
    name = f.lines[0].split(b":", 1)[0].decode("ascii").strip()
    parts = [email.utils.formataddr((display, qualify(addr, hostname)))
             for display, addr in pairs]
    lines = [f"{name}: {parts[0]}"]
    for p in parts[1:]:
        lines[-1] += ","
        lines.append(f" {p}")
    return Field(f.name, [x.encode("ascii") for x in lines])


@dataclass
class Prepared:
    sender: str  # envelope sender, "" for <>
    recipients: list[str]
    data: bytes  # the message as it is sent: CRLF line ends, Bcc removed
    saved: bytes  # the copy for dead.letter: the same with Bcc kept


def prepare(parsed: Parsed, opts: Options, hostname: str, now: float | None = None) -> Prepared:
    """Envelope and final message text for this submission."""
    login, gecos, _ = _login()
    default_sender = f"{login}@{hostname}"
    if opts.sender is None:
        sender = default_sender
    else:
        given = opts.sender.strip()
        sender = "" if given in ("", "<>") else qualify(
            email.utils.parseaddr(given)[1] or given, hostname)

    recipients = [qualify(a, hostname) for a in _addresses(opts.recipients)]
    if opts.extract:
        resent = any(f.name.startswith("resent-") for f in parsed.fields)
        names = ("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc")
        recipients += [qualify(a, hostname)
                       for a in _addresses([f.value for f in parsed.fields if f.name in names])]
    recipients = [r for r in _dedupe(recipients) if r]

    now = time.time() if now is None else now
    fields = [_qualified_field(f, hostname) if f.name in _ADDRESS_FIELDS else f
              for f in parsed.fields]
    present = {f.name for f in fields}
    added: list[bytes] = []
    if "from" not in present:
        # As sendmail and Postfix do: From: is the envelope sender (-f, else the user).
        full_name = opts.full_name if opts.full_name is not None else (
            os.environ.get("NAME") or gecos)
        added.append(b"From: " + email.utils.formataddr(
            (full_name.strip(), sender or default_sender)).encode("utf-8"))
    if "date" not in present:
        added.append(b"Date: " + email.utils.formatdate(now, localtime=True).encode("ascii"))
    if "message-id" not in present:
        added.append(b"Message-ID: " + email.utils.make_msgid(domain=hostname).encode("ascii"))
    # Every local user reaches the daemon from 127.0.0.1: this trace field says which.
    received = [
        f"Received: by {hostname} (empath sendmail, from userid {os.getuid()});".encode(),
        b"\t" + email.utils.formatdate(now, localtime=True).encode("ascii"),
    ]

    def render(keep_bcc: bool) -> bytes:
        out = list(received)
        for f in fields:
            if keep_bcc or f.name not in ("bcc", "resent-bcc"):
                out.extend(f.lines)
        out.extend(added)
        out.append(b"")
        out.extend(parsed.body)
        return b"".join(chunk + b"\r\n" for line in out for chunk in _fold_long(line))

    return Prepared(sender, recipients, render(False), render(True))


def _fold_long(line: bytes) -> list[bytes]:
    """Break a line longer than 998 octets (RFC 5322 §2.1.1), as Postfix does: with
    CRLF SPACE, which is a fold in a header and does least harm in MIME text. Never
    inside a UTF-8 sequence."""
    if len(line) <= MAX_LINE:
        return [line]
    out = []
    limit = MAX_LINE
    while len(line) > limit:
        cut = limit
        while cut > limit - 3 and 0x80 <= line[cut] <= 0xBF:
            cut -= 1
        out.append(line[:cut])
        line = b" " + line[cut:]
        limit = MAX_LINE
    out.append(line)
    return out


# ------------------------------------------------------------------ submission


@dataclass
class Failure:
    phase: str  # connect, greeting, ehlo, mail, rcpt, data, local
    reply: str  # the server's reply, or what went wrong
    recipients: list[str]
    temporary: bool

    @property
    def status(self) -> int:
        if self.temporary:
            return EX_TEMPFAIL
        return {"rcpt": EX_NOUSER, "data": EX_DATAERR, "local": EX_DATAERR,
                "usage": EX_USAGE}.get(
            self.phase, EX_UNAVAILABLE)


@dataclass
class Outcome:
    delivered: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def _reply_text(code: int, msg: bytes | str) -> str:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg
    lines = text.splitlines() or [""]
    return "\n".join(f"{code}{'-' if n < len(lines) - 1 else ' '}{line}"
                     for n, line in enumerate(lines))


class Session:
    """One SMTP connection to the daemon, with the dialogue shown under -v."""

    def __init__(self, target: tuple[str, int], verbose: bool, err: TextIO) -> None:
        self.target = target
        self.verbose = verbose
        self.err = err
        self.smtp = smtplib.SMTP(timeout=COMMAND_TIMEOUT)
        self.server_name: str | None = None

    @property
    def where(self) -> str:
        host, port = self.target
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _show(self, text: str) -> None:
        if self.verbose:
            print(text, file=self.err)

    def cmd(self, verb: str, arg: str = "") -> tuple[int, str]:
        self._show(f"-> {verb}{' ' + arg if arg else ''}")
        code, msg = self.smtp.docmd(verb, arg)
        text = _reply_text(code, msg)
        self._show("\n".join(f"<- {x}" for x in text.splitlines()))
        return code, text

    def open(self) -> Failure | None:
        host, port = self.target
        self._show(f"connecting to {self.where}")
        try:
            code, msg = self.smtp.connect(host, port)
        except (OSError, smtplib.SMTPException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            return Failure("connect", reason, [], True)
        text = _reply_text(code, msg)
        self._show("\n".join(f"<- {x}" for x in text.splitlines()))
        if code != 220:
            return Failure("greeting", text, [], code < 500)
        words = msg.decode("utf-8", "replace").split()
        self.server_name = words[0] if words else None
        sock = self.smtp.sock
        ip = sock.getsockname()[0] if sock is not None else "127.0.0.1"
        # An address literal: this machine's name may not resolve, and asking DNS for
        # it (socket.getfqdn) can hang for seconds when the resolver is down.
        helo = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
        self._show(f"-> EHLO {helo}")
        code, msg = self.smtp.ehlo(helo)  # smtplib keeps the extensions (has_extn)
        text = _reply_text(code, msg)
        self._show("\n".join(f"<- {x}" for x in text.splitlines()))
        if code == 250:
            first = msg.decode("utf-8", "replace").split()
            self.server_name = first[0] if first else self.server_name
            return None
        if code >= 500:
            code, text = self.cmd("HELO", helo)
            if code == 250:
                return None
        return Failure("ehlo", text, [], code < 500)

    def close(self) -> None:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            if self.smtp.sock is not None:
                self.cmd("QUIT")
        self.smtp.close()

    def has(self, ext: str) -> bool:
        return bool(self.smtp.has_extn(ext))

    def send_message(self, prepared: Prepared, opts: Options, out: Outcome) -> None:
        """MAIL, RCPT…, DATA, recorded in ``out`` as it goes (so that what was sent is
        known if the connection breaks); recipients the daemon has no room for in this
        transaction (452 4.5.3 too many recipients) go in the next one."""
        data = prepared.data
        mail_params = []
        if self.has("size"):
            limit = int(self.smtp.esmtp_features.get("size", "0") or 0)
            if limit and len(data) > limit:
                out.failures.append(Failure(
                    "data", f"the message is {len(data)} bytes; the daemon takes at most "
                    f"{limit} (SIZE)", prepared.recipients, False))
                return
            mail_params.append(f"SIZE={len(data)}")
        body = opts.body or ("7BIT" if data.isascii() else "8BITMIME")
        if body == "8BITMIME" and self.has("8bitmime"):
            mail_params.append("BODY=8BITMIME")
        envelope = [prepared.sender, *prepared.recipients]
        if not all(a.isascii() for a in envelope):
            if not self.has("smtputf8"):
                out.failures.append(Failure(
                    "local", "an address is not ASCII and the daemon does not offer "
                    "SMTPUTF8", prepared.recipients, False))
                return
            mail_params.append("SMTPUTF8")
            self.smtp.command_encoding = "utf-8"
        rcpt_params = ""
        if self.has("dsn"):
            if opts.ret:
                mail_params.append(f"RET={opts.ret}")
            if opts.envid:
                mail_params.append(f"ENVID={xtext(opts.envid)}")
            if opts.notify:
                rcpt_params = f" NOTIFY={opts.notify}"
        mail_arg = f"FROM:<{prepared.sender}>" + "".join(f" {p}" for p in mail_params)

        remaining = list(prepared.recipients)
        while remaining:
            code, text = self.cmd("MAIL", mail_arg)
            if code != 250:
                out.failures.append(Failure("mail", text, remaining, code < 500))
                return
            accepted: list[str] = []
            tried = 0
            for rcpt in remaining:
                code, text = self.cmd("RCPT", f"TO:<{rcpt}>{rcpt_params}")
                if 200 <= code < 300:
                    accepted.append(rcpt)
                elif code == 452 and accepted:
                    break  # RFC 5321 §4.5.3.1.10: the rest in another transaction
                else:
                    out.failures.append(Failure("rcpt", text, [rcpt], code < 500))
                tried += 1
            remaining = remaining[tried:]
            if not accepted:
                self.cmd("RSET")
                return
            code, text = self.cmd("DATA")
            if code != 354:
                out.failures.append(Failure("data", text, accepted + remaining, code < 500))
                return
            stuffed = re.sub(rb"(?m)^\.", b"..", data)
            self._show(f"-> ({len(data)} bytes of message)\n-> .")
            assert self.smtp.sock is not None
            self.smtp.sock.settimeout(DATA_TIMEOUT)
            self.smtp.send(stuffed + b".\r\n")
            code, msg = self.smtp.getreply()
            self.smtp.sock.settimeout(COMMAND_TIMEOUT)
            text = _reply_text(code, msg)
            self._show("\n".join(f"<- {x}" for x in text.splitlines()))
            if code != 250:
                out.failures.append(Failure("data", text, accepted + remaining, code < 500))
                return
            out.delivered.extend(accepted)


def submit(prepare_for: Callable[[str | None], Prepared], local: Local, opts: Options,
           err: TextIO) -> tuple[Prepared, Outcome]:
    """Connect, then build the message (the daemon's name qualifies addresses when the
    config is unreadable), then send it. Never raises for the daemon's behaviour."""
    session = Session(local.target, opts.verbose, err)
    try:
        failure = session.open()
        prepared = prepare_for(session.server_name if failure is None else None)
        if failure is not None:
            failure.recipients = prepared.recipients
            return prepared, Outcome(failures=[failure])
        out = Outcome()
        if not prepared.recipients:
            return prepared, out
        try:
            session.send_message(prepared, opts, out)
        except (OSError, smtplib.SMTPException) as exc:
            # Including a connection lost after the final dot, before the reply: the
            # message may or may not be queued. A duplicate beats a loss.
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            settled = set(out.delivered) | {r for f in out.failures for r in f.recipients}
            out.failures.append(Failure(
                "connect", f"the connection failed: {reason}",
                [r for r in prepared.recipients if r not in settled], True))
        return prepared, out
    finally:
        session.close()


# ------------------------------------------------------------------ dead.letter


def save_dead_letter(prepared: Prepared, home: str) -> Path:
    """Append the message to ``$HOME/dead.letter`` in mbox format (mboxrd quoting)."""
    path = Path(home) / "dead.letter"
    sender = prepared.sender or "MAILER-DAEMON"
    lines = prepared.saved.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    quoted = [b">" + x if re.match(rb"^>*From ", x) else x for x in lines]
    record = (f"From {sender} {time.asctime()}\n".encode("utf-8", "replace")
              + b"".join(x + b"\n" for x in quoted) + b"\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(record)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


# ------------------------------------------------------------------ entry points


def main(argv: Sequence[str] | None = None) -> int:
    """``empath sendmail [options] [recipients]``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--help"]:
        print(USAGE)
        return EX_OK
    try:
        opts = parse_args(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}\n{USAGE}", file=sys.stderr)
        return EX_USAGE
    if opts.mode == "p":
        return mailq([], opts.config)
    if opts.mode == "i":
        return newaliases()
    if opts.flush is not None:
        return _flush(opts)
    err = sys.stderr

    def say(text: str) -> None:
        if opts.verbose:
            print(f"{PROG}: {text}", file=err)

    try:
        local = locate(opts, say)
    except ConfigurationError as exc:
        print(f"{PROG}: {exc}", file=err)
        return EX_CONFIG
    if opts.mode == "s":
        return smtp_on_stdio(local.target)
    if not opts.recipients and not opts.extract:
        print(f"{PROG}: no recipients given (name them, or use -t to take them from "
              "the message header)", file=err)
        return EX_USAGE
    try:
        data = sys.stdin.buffer.read() if sys.stdin is not None else b""
    except OSError as exc:
        print(f"{PROG}: cannot read the message: {exc.strerror or exc}; nothing sent",
              file=err)
        return EX_IOERR
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; nothing sent", file=err)
        return 130
    parsed = read_message(data, opts.ignore_dots)
    say(f"daemon at {local.target[0]}:{local.target[1]} ({local.target_source})")

    def prepare_for(server_name: str | None) -> Prepared:
        hostname = local.hostname
        if hostname is None and server_name and _DOMAIN.match(server_name):
            hostname = server_name.lower()
        if hostname is None:
            hostname = socket.getfqdn() or "localhost"
        say(f"qualifying addresses with {hostname}")
        return prepare(parsed, opts, hostname)

    prepared, outcome = submit(prepare_for, local, opts, err)
    return report(prepared, outcome, local, err)


def report(prepared: Prepared, outcome: Outcome, local: Local, err: TextIO) -> int:
    """Say what happened on stderr, keep a copy if anything was not sent, pick the
    exit status."""
    host, port = local.target
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    failures = list(outcome.failures)
    if not prepared.recipients:
        failures = [Failure("usage", "no recipients in the message header (-t) or on the "
                            "command line", [], False)]
    if not failures:
        return EX_OK
    for f in failures:
        who = ", ".join(f"<{r}>" for r in f.recipients)
        if f.phase == "connect":
            print(f"{PROG}: the mail daemon at {where} is unreachable: {f.reply}", file=err)
        elif f.phase in ("usage", "local"):
            print(f"{PROG}: {f.reply}", file=err)
        elif f.phase == "rcpt":
            print(f"{PROG}: recipient {who} refused by {where}:\n  {f.reply}", file=err)
        else:
            what = {"greeting": "the connection", "ehlo": "EHLO", "mail": "the sender",
                    "data": "the message"}.get(f.phase, f.phase)
            print(f"{PROG}: {where} refused {what}:\n  "
                  + f.reply.replace("\n", "\n  "), file=err)
    failed = [r for f in failures for r in f.recipients]
    if outcome.delivered:
        print(f"{PROG}: the message was sent to {len(outcome.delivered)} recipient(s) "
              f"and NOT sent to: {', '.join(f'<{r}>' for r in failed)}", file=err)
    else:
        later = " (try again later)" if all(f.temporary for f in failures) else ""
        print(f"{PROG}: the message was NOT sent{later}", file=err)
    home = os.environ.get("HOME") or _login()[2]
    try:
        saved = save_dead_letter(prepared, home)
        print(f"{PROG}: a copy of the message was saved in {saved}", file=err)
    except OSError as exc:
        print(f"{PROG}: could not save a copy in {home}/dead.letter: "
              f"{exc.strerror or exc}", file=err)
    permanent = [f for f in failures if not f.temporary]
    if permanent:
        return permanent[0].status
    return EX_TEMPFAIL


def smtp_on_stdio(target: tuple[str, int]) -> int:
    """-bs: an SMTP session on stdin/stdout, relayed to the daemon byte for byte."""
    host, port = target
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = socket.create_connection(target, timeout=COMMAND_TIMEOUT)
    except OSError as exc:
        sys.stdout.buffer.write(b"421 4.3.0 local mail daemon unavailable\r\n")
        sys.stdout.flush()
        print(f"{PROG}: the mail daemon at {where} is unreachable: {exc.strerror or exc}",
              file=sys.stderr)
        return EX_TEMPFAIL
    sock.settimeout(None)
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()

    def pump_in() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(stdin_fd, 65536):
                sock.sendall(chunk)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=pump_in, daemon=True).start()
    try:
        while chunk := sock.recv(65536):
            view = memoryview(chunk)
            while view:
                view = view[os.write(stdout_fd, view):]
    except OSError as exc:
        print(f"{PROG}: connection to {where} failed: {exc.strerror or exc}", file=sys.stderr)
        return EX_TEMPFAIL
    finally:
        sock.close()
    return EX_OK


def _ctl(args: list[str], config: Path | None, prog: str) -> int:
    from empath import ctl

    if config is not None:
        args = ["--config", str(config), *args]
    try:
        return ctl.main(args)
    except PermissionError as exc:
        print(f"{prog}: permission denied: {exc.filename or exc}: you need to be root or "
              f"in group {ctl.ADMIN_GROUP}", file=sys.stderr)
    except OSError as exc:
        print(f"{prog}: cannot reach the daemon: {exc.strerror or exc}", file=sys.stderr)
    return ctl.EX_UNREACHABLE


def mailq(args: Sequence[str], config: Path | None = None) -> int:
    """``mailq`` and ``sendmail -bp``: ``empathctl queue list``."""
    return _ctl(["queue", "list", *args], config, "mailq")


def _flush(opts: Options) -> int:
    value = opts.flush or ""
    if value and value[0] not in "RSI":
        # -q1h: a queue run interval. The daemon schedules its own retries.
        print(f"{PROG}: -q{value} ignored: empath schedules queue runs itself "
              "(delivery.retry_schedule)", file=sys.stderr)
        return EX_OK
    return _ctl(["queue", "flush"], opts.config, f"{PROG} -q")


def newaliases() -> int:
    print("newaliases: empath has no aliases database (/etc/aliases is not used); "
          "nothing to do")
    return EX_OK


def run_as(name: str, argv: Sequence[str]) -> int:
    """Entry for the symlinks: ``sendmail``, ``mailq``, ``newaliases``."""
    if name == "mailq":
        return mailq(list(argv))
    if name == "newaliases":
        return newaliases()
    return main(argv)
