"""Local delivery into Maildirs: ``maildir:PATH`` routes deliver to ``PATH/<local-part>/``.

Each copy is written the Maildir way (https://cr.yp.to/proto/maildir.html): into
``tmp/`` under a unique name, created exclusively (``O_EXCL|O_NOFOLLOW``, mode 0600),
fsync'ed, renamed into ``new/``, and ``new/`` is fsync'ed before success is reported.
A failure leaves nothing behind in ``tmp/`` or ``new/`` and defers the recipient.

The copy gets ``Return-Path:`` and ``Delivered-To:`` prepended and is stored with LF
line endings, as Maildir readers (Dovecot, mutt, Postfix's own maildir delivery)
expect: the spool holds the SMTP wire form (CRLF), and since empath refuses bare CR
and bare LF at reception the conversion loses nothing. File names carry ``,S=`` (the
file size) and ``,W=`` (the RFC 822 size, with CRLF), which Dovecot reads instead of
stat'ing or reading the file.

The local part is used verbatim (no case folding: ``Bob`` and ``bob`` are different
mailboxes, as in Postfix's virtual delivery) but must be safe as one file name.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import socket
import stat
import time
from pathlib import Path

from empath.delivery.types import RcptResult
from empath.spool import Recipient, open_message

__all__ = ["deliver_maildir", "is_safe_local_part"]

DIR_MODE = 0o700
FILE_MODE = 0o600
CHUNK = 64 * 1024
NAME_MAX = 255

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

_counter = itertools.count(1)


def is_safe_local_part(local: str) -> bool:
    """Usable as one directory name: not empty, no "/", no NUL, no leading "." (which
    also excludes "." and ".."), only printable characters, at most NAME_MAX bytes."""
    if not local or local.startswith(".") or "/" in local or "\0" in local:
        return False
    if not local.isprintable():
        return False
    try:
        return len(os.fsencode(local)) <= NAME_MAX
    except UnicodeError:
        return False


def _host_for_name(hostname: str) -> str:
    """The host part of a Maildir file name: "/" and ":" are escaped as the spec says,
    and "," too, since it separates the ``,S=`` fields."""
    host = hostname or socket.gethostname() or "localhost"
    return host.replace("/", r"\057").replace(":", r"\072").replace(",", r"\054")


def _unique(host: str) -> str:
    """``time.MusecPpidQcounterRrandom.host``: unique per delivery on this host even
    with several processes and threads (the counter is global to the process)."""
    now = time.time()
    sec, usec = int(now), int((now % 1) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(4)}.{host}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> bool:
    """mkdir 0700 if missing; True if it was created. Raises OSError if ``path``
    exists but is not a directory."""
    try:
        os.mkdir(path, DIR_MODE)
        return True
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory") from None
        return False


def _ensure_maildir(mailbox: Path) -> None:
    created = _ensure_dir(mailbox)
    if created:
        _fsync_dir(mailbox.parent)  # the mailbox's entry in the root survives a crash
    sub_created = False
    for sub in ("tmp", "new", "cur"):
        sub_created |= _ensure_dir(mailbox / sub)
    if sub_created:
        _fsync_dir(mailbox)


def _header_value(text: str) -> str:
    # Addresses come from the SMTP parser and carry no CR/LF; never let one split a line.
    return "".join(c if c.isprintable() else "?" for c in text)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy(fd: int, data_path: Path, head: bytes, data_size: int | None) -> tuple[int, int]:
    """Write ``head`` then the message data (the first ``data_size`` octets of the
    file, or all of it), CRLF → LF, in chunks. Returns (bytes written, lines written):
    the file size and, with one more byte per line, its RFC 822 size."""
    size = len(head)
    lines = head.count(b"\n")
    _write_all(fd, head)
    with open_message(data_path, data_size) as src:
        carry = b""
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            buf = carry + chunk
            # A CR at the end may be the first half of a CRLF split across chunks.
            if buf.endswith(b"\r"):
                buf, carry = buf[:-1], b"\r"
            else:
                carry = b""
            out = buf.replace(b"\r\n", b"\n")
            _write_all(fd, out)
            size += len(out)
            lines += out.count(b"\n")
        if carry:
            _write_all(fd, carry)
            size += len(carry)
    return size, lines


def _deliver_one(
    mailbox: Path, rcpt: str, data_path: Path, host: str, sender: str, data_size: int | None
) -> Path:
    """One copy into ``mailbox``; returns its path in new/. Raises OSError with nothing
    left behind."""
    _ensure_maildir(mailbox)
    base = _unique(host)
    tmp_path = mailbox / "tmp" / base
    head = (
        f"Return-Path: <{_header_value(sender)}>\n"
        f"Delivered-To: {_header_value(rcpt)}\n"
    ).encode()
    fd = os.open(tmp_path, _CREATE_FLAGS, FILE_MODE)
    new_path: Path | None = None
    try:
        try:
            size, lines = _copy(fd, data_path, head, data_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        new_path = mailbox / "new" / f"{base},S={size},W={size + lines}"
        os.rename(tmp_path, new_path)
        _fsync_dir(new_path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        if new_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(new_path)
        raise
    return new_path


def deliver_maildir(
    root: Path, rcpts: list[Recipient], data_path: Path, *, hostname: str, sender: str,
    size: int | None = None,
) -> list[RcptResult]:
    """Deliver one message to ``root/<local-part>/`` for each recipient.

    Synchronous (file I/O and fsync): the caller runs it in a thread. Results, in the
    order of ``rcpts``: delivered 2.0.0; bounced 5.1.3 for a local part that cannot be a
    file name; deferred 4.3.0 for a missing root or any OSError (ENOSPC, EACCES, …).
    """
    try:
        root_ok = stat.S_ISDIR(os.stat(root).st_mode)
        root_error = "" if root_ok else f"maildir root {root} is not a directory"
    except OSError as exc:
        root_error = f"maildir root {root} is not usable: {exc.strerror or exc}"
    host = _host_for_name(hostname)
    results: list[RcptResult] = []
    for r in rcpts:
        local = r.address.rpartition("@")[0]
        if not is_safe_local_part(local):
            results.append(RcptResult(
                r.address, "bounced", "5.1.3",
                f"bad destination mailbox address syntax: local part {local!r} cannot be "
                "a maildir name",
            ))
            continue
        if root_error:
            results.append(RcptResult(r.address, "deferred", "4.3.0", root_error))
            continue
        mailbox = root / local
        try:
            path = _deliver_one(mailbox, r.address, data_path, host, sender, size)
        except OSError as exc:
            what = exc.strerror or str(exc)
            where = f" ({exc.filename})" if exc.filename else ""
            results.append(RcptResult(
                r.address, "deferred", "4.3.0",
                f"maildir delivery to {mailbox} failed: {what}{where}",
            ))
            continue
        results.append(RcptResult(
            r.address, "delivered", "2.0.0", f"delivered to maildir as {path}",
            success_action="delivered",  # final delivery: a success DSN says "delivered"
        ))
    return results
