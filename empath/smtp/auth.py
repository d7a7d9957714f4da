"""SMTP AUTH on the submission listener (RFC 4954): SASL PLAIN (RFC 4616) and LOGIN,
checked against the bcrypt hashes in ``submission.users_file``.

The users file has one account per line::

    alice:$2b$12$…                                   # login alice
    bob@example.com:$2b$12$…:bob@example.com,@example.org

``user:bcrypt-hash``, optionally followed by ``:`` and the MAIL FROM addresses the
user may use when ``submission.sender_login_match`` is on (comma-separated;
``@domain`` stands for every address in that domain; a login that is itself an
address may always be used). Blank lines and ``#`` lines are ignored. The file is a
secret (empath/secretfile.py: refused when others may read it), read at start and at
every reload, and written by ``empath passwd`` (empath/passwd.py).

Defences, in the order a guesser meets them: AUTH is offered and accepted only over
TLS on the submission listener; each failure is answered late, the more so the more
that client address has failed; failures are counted per address by the supervisor
(empath/daemon/anvil.py), across workers, and the failure that reaches
``limits.auth_failures`` within ``limits.auth_failure_window`` ends the session with
``421 4.7.0`` and has the address refused at connect until its failures age out.
An unknown user costs the same bcrypt check as a known one, and bcrypt runs in a
thread, a few at a time, so guessing does not stall the worker's other sessions.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import bcrypt

from empath import metrics
from empath.addr import AddressError, normalize_domain, parse_mailbox
from empath.config.model import Config
from empath.secretfile import read_secret
from empath.smtp.connection import LineTooLong

if TYPE_CHECKING:
    from empath.smtp.session import SMTPSession

__all__ = [
    "MECHANISMS",
    "User",
    "Users",
    "UsersFileError",
    "check_name",
    "check_sender",
    "format_users",
    "load_users",
    "offered",
    "parse_users",
    "sender_refusal",
    "smtp_auth",
]

log = logging.getLogger("empath.smtp")

USERS_KEY = "submission.users_file"
MECHANISMS = ("PLAIN", "LOGIN")
# EMPATH_EVENT values (not catalogued: one line per attempt says it all).
EVENT_OK = "auth"
EVENT_FAILED = "auth-failed"
# bcrypt looks at 72 octets; longer passwords are refused rather than silently cut.
MAX_PASSWORD = 72
MAX_NAME = 255
# The delay grows with the address's failures up to this many steps.
MAX_DELAY_STEPS = 5
# bcrypt checks running at once in one worker: enough for real users, and a guesser
# cannot queue up more CPU than this.
CHECKS_AT_ONCE = 4
# Checked instead when the user is unknown (and there is no user to borrow a hash
# from), so that a wrong name takes as long as a wrong password.
_DUMMY_HASH = b"$2b$12$LgyIZonGnEGtuwewtR6UiOD/N0pt22fDMjK7DAR2gKaoNMGAs2EiG"
_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}")
_NAME_BAD = re.compile(r"[\s:\x00-\x1f\x7f]")
_LOGIN_USER = b"334 VXNlcm5hbWU6"  # "Username:"
_LOGIN_PASS = b"334 UGFzc3dvcmQ6"  # "Password:"


class UsersFileError(ValueError):
    """Names the key and the file, as SecretFileError does."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    hash: str
    senders: tuple[str, ...] = ()  # as written in the file


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be a login (None: it can)."""
    if not name:
        return "empty user name"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        return f"user name longer than {MAX_NAME} octets"
    if _NAME_BAD.search(name):
        return "user name contains a space, a colon or a control character"
    return None


def _sender_key(text: str) -> str:
    """The normalised form of a users-file address (``@domain`` for a whole domain)."""
    if text.startswith("@"):
        return "@" + normalize_domain(text[1:])
    return parse_mailbox(text).address.lower()


def check_sender(text: str) -> str | None:
    """Why ``text`` cannot be a users-file sender address (None: it can)."""
    if not text or any(c in text for c in ":,") or any(c.isspace() for c in text):
        return f"bad sender address {text!r}: empty, or contains a colon, comma or space"
    try:
        _sender_key(text)
    except AddressError as exc:
        return f"bad sender address {text!r}: {exc}"
    return None


def parse_users(text: str, label: str) -> dict[str, User]:
    """The accounts in a users file's ``text``; errors name ``label`` and the line."""
    users: dict[str, User] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{label} line {n}"
        parts = line.split(":")
        if len(parts) not in (2, 3):
            raise UsersFileError(f"{where}: expected user:bcrypt-hash[:addresses]")
        name, hashed = parts[0], parts[1]
        problem = check_name(name)
        if problem is not None:
            raise UsersFileError(f"{where}: {problem}")
        if not _HASH.fullmatch(hashed):
            raise UsersFileError(f"{where}: not a bcrypt hash (write it with empath passwd)")
        if name in users:
            raise UsersFileError(f"{where}: user {name!r} is listed twice")
        senders = tuple(a.strip() for a in parts[2].split(",") if a.strip()) if len(
            parts) == 3 else ()
        for address in senders:
            problem = check_sender(address)
            if problem is not None:
                raise UsersFileError(f"{where}: {problem}")
        users[name] = User(name, hashed, senders)
    return users


def format_users(users: dict[str, User]) -> str:
    """The file text for ``users`` (what parse_users reads back)."""
    lines = []
    for user in users.values():
        extra = ":" + ",".join(user.senders) if user.senders else ""
        lines.append(f"{user.name}:{user.hash}{extra}\n")
    return "".join(lines)


class Users:
    """The accounts of one users file, as loaded at start or reload."""

    def __init__(self, users: dict[str, User]) -> None:
        self.users = users
        self._allowed = {
            u.name: frozenset(_sender_key(a) for a in u.senders) for u in users.values()
        }
        self._checks: asyncio.Semaphore | None = None

    @classmethod
    def load(cls, path: Path) -> Users:
        data = read_secret(path, USERS_KEY)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsersFileError(f"{USERS_KEY} {path}: not UTF-8 text") from None
        return cls(parse_users(text, f"{USERS_KEY} {path}"))

    async def verify(self, name: str, password: bytes) -> User | None:
        """The user if ``password`` is theirs; None otherwise, in about the same time."""
        user = self.users.get(name)
        if user is not None:
            hashed = user.hash.encode("ascii")
        else:
            # Another user's hash costs the same as theirs would (the same cost factor).
            hashed = next(iter(self.users.values())).hash.encode("ascii") if self.users \
                else _DUMMY_HASH
        if self._checks is None:
            self._checks = asyncio.Semaphore(CHECKS_AT_ONCE)
        async with self._checks:
            ok = await asyncio.to_thread(_checkpw, password[:MAX_PASSWORD], hashed)
        if user is None or not ok or len(password) > MAX_PASSWORD:
            return None
        return user

    def may_send_as(self, name: str, sender: str) -> bool:
        """Whether user ``name`` may give ``sender`` in MAIL FROM ("" is <>)."""
        if not sender:
            return True  # bounces and auto-replies carry no sender to own
        key = sender.lower()
        if key == name.lower():
            return True
        allowed = self._allowed.get(name, frozenset())
        return key in allowed or "@" + key.rpartition("@")[2] in allowed


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # a NUL in the password (bcrypt 3), a malformed hash
        return False


def load_users(cfg: Config) -> Users | None:
    """The users of ``cfg``'s users file (None when AUTH is off). Raises
    SecretFileError or UsersFileError (both ValueError) naming the key."""
    path = cfg.submission.users_file
    return None if path is None else Users.load(path)


# ---- the SMTP side ------------------------------------------------------------------


def offered(session: SMTPSession) -> bool:
    """Whether EHLO lists AUTH: on submission, with users configured, over TLS only
    (RFC 4954 §4: no plaintext passwords, not even a hint that they would be taken)."""
    return (session.role == "submission"
            and session.cfg.submission.users_file is not None
            and session.tls)


class _Malformed(Exception):
    pass


class _Cancelled(Exception):
    pass


async def _response(session: SMTPSession) -> bytes | None:
    """One line of the client's SASL exchange, base64-decoded; None when it left."""
    try:
        line = await session.readline()
    except LineTooLong:
        raise _Malformed from None
    if not line:
        return None
    text = line.rstrip(b"\r\n").strip()
    if text == b"*":
        raise _Cancelled
    return _b64(text)


def _b64(text: bytes) -> bytes:
    if text == b"=":  # RFC 4954 §4: an empty initial response
        return b""
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise _Malformed from None


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed from None


async def _plain(session: SMTPSession, initial: bytes | None) -> tuple[str, bytes] | None:
    if initial is None:
        session._write("334 ")
        await session.drain()
        got = await _response(session)
        if got is None:
            return None
        initial = got
    parts = initial.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise _Malformed
    authzid, authcid, password = _text(parts[0]), _text(parts[1]), parts[2]
    if authzid and authzid != authcid:
        # Acting for someone else is not offered: a failure, counted like any other.
        return authcid, b""
    return authcid, password


async def _login(session: SMTPSession, initial: bytes | None) -> tuple[str, bytes] | None:
    if initial is None:
        session.write(_LOGIN_USER + b"\r\n")
        await session.drain()
        initial = await _response(session)
        if initial is None:
            return None
    name = _text(initial)
    session.write(_LOGIN_PASS + b"\r\n")
    await session.drain()
    password = await _response(session)
    if password is None:
        return None
    return name, password


def _shown(name: str) -> str:
    """A client-chosen login, safe to log."""
    out = "".join(c if c.isprintable() and not c.isspace() else "?" for c in name)
    return out[:64]


async def smtp_auth(session: SMTPSession, arg: str | None) -> None:
    """The AUTH command, start to finish."""
    role = session.role
    if role != "submission" or session.cfg.submission.users_file is None:
        await session.push("502 5.5.1 Error: authentication not enabled")
        return
    if session.helo is None or not session.esmtp:
        await session.push("503 5.5.1 Error: send EHLO first")
        return
    if not session.tls:
        metrics.inc("empath_smtp_auth_total", (role, "encryption_required"))
        await session.push(
            "538 5.7.11 Encryption required for requested authentication mechanism")
        return
    if session.authenticated is not None:
        await session.push("503 5.5.1 Error: already authenticated")
        return
    if session.txn is not None:
        await session.push("503 5.5.1 Error: AUTH not permitted during a mail transaction")
        return
    if not arg:
        await session.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        return
    mechanism, _, rest = arg.partition(" ")
    mechanism = mechanism.upper()
    if mechanism not in MECHANISMS:
        await session.push("504 5.5.4 Error: unrecognized authentication type")
        return
    users = session.front.users
    if users is None:
        # The users file could not be read when this worker started (logged then).
        await session.push("454 4.7.0 Temporary authentication failure")
        return
    try:
        initial = _b64(rest.strip().encode("utf-8", "surrogateescape")) if rest.strip() \
            else None
        exchange = _plain if mechanism == "PLAIN" else _login
        credentials = await exchange(session, initial)
    except _Cancelled:
        metrics.inc("empath_smtp_auth_total", (role, "malformed"))
        await session.push("501 5.7.0 Error: authentication cancelled")
        return
    except _Malformed:
        metrics.inc("empath_smtp_auth_total", (role, "malformed"))
        await session.push("501 5.5.2 Error: cannot decode the authentication response")
        return
    if credentials is None:
        return  # the client left mid-exchange
    name, password = credentials
    user = await users.verify(name, password) if password else None
    if user is None:
        await _failed(session, name, mechanism)
        return
    session.authenticated = user.name
    metrics.inc("empath_smtp_auth_total", (role, "success"))
    log.info("authenticated user=%s client=%s mechanism=%s", user.name, session.client_ip,
             mechanism, extra=session._fields(EVENT_OK, SASL_USERNAME=user.name))
    await session.push("235 2.7.0 Authentication successful")


async def _failed(session: SMTPSession, name: str, mechanism: str) -> None:
    limits = session.cfg.limits
    count = await session.front.auth_failed(session.client_ip)
    metrics.inc("empath_smtp_auth_total", (session.role, "failure"))
    log.info("authentication failed user=%s client=%s mechanism=%s failures=%d",
             _shown(name), session.client_ip, mechanism, count,
             extra=session._fields(EVENT_FAILED, SASL_USERNAME=_shown(name)))
    # Slows a guesser down, and more so the more this address has failed.
    await asyncio.sleep(min(max(count, 1), MAX_DELAY_STEPS) * limits.auth_failure_delay)
    if count >= limits.auth_failures:
        log.warning(
            "too many authentication failures client=%s failures=%d in %gs: session "
            "dropped, address refused until they age out", session.client_ip, count,
            limits.auth_failure_window, extra=session._fields(EVENT_FAILED))
        session.close_with(
            f"421 4.7.0 {session.cfg.hostname} Error: too many authentication failures")
        return
    await session.push("535 5.7.8 Error: authentication credentials invalid")


def sender_refusal(session: SMTPSession, sender: str) -> str | None:
    """The reply refusing MAIL FROM ``sender`` for this session's user, or None."""
    name = session.authenticated
    if name is None or not session.cfg.submission.sender_login_match:
        return None
    users = session.front.users
    if users is not None and users.may_send_as(name, sender):
        return None
    return f"553 5.7.1 <{sender}>: Sender address not owned by user {name}"
