"""``empath passwd USER``: set or delete a submission password in the users file.

The file is ``submission.users_file`` of the configuration (or ``--file``), in the
format empath/smtp/auth.py reads. It is rewritten whole and atomically: a temporary
file in the same directory, fsync'ed, renamed over the old one, the directory
fsync'ed — so the daemon, or a crash, sees the old file or the new one, never half
of either. Two ``empath passwd`` at once take turns (a lock on the directory). The
new file is mode 0640; it keeps the old file's owner and group, and a new file gets
the group ``empath`` (when it exists and we may), so that the daemon can read it and
nobody else can. The daemon reads it at start and at reload
(``systemctl reload empath``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import grp
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: `empath --help` need not load bcrypt
    from empath.smtp.auth import User

__all__ = ["add_arguments", "cmd_passwd"]

EXIT_FAILED = 1
EXIT_USAGE = 2
# bcrypt's cost: about a quarter to half a second per check on a current CPU.
ROUNDS = 12
MODE = 0o640
DAEMON_GROUP = "empath"


class PasswdError(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("user", help="login name (often the user's address)")
    p.add_argument("--config", "-c", help="configuration file whose submission.users_file "
                   "to edit (default: $EMPATH_CONFIG, else /etc/empath/empath.yaml)")
    p.add_argument("--file", "-f", help="edit this users file instead")
    p.add_argument("--stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.add_argument("--delete", "-d", action="store_true", help="remove the user")
    p.add_argument("--senders", metavar="ADDRESSES",
                   help="comma-separated MAIL FROM addresses the user may use when "
                   "submission.sender_login_match is on (@domain: all of a domain); "
                   "'' clears them; default: keep")
    p.set_defaults(func=cmd_passwd)


def cmd_passwd(args: argparse.Namespace) -> int:
    try:
        message = _run(args)
    except PasswdError as exc:
        print(f"empath passwd: {exc}", file=sys.stderr)
        return exc.status
    print(f"empath passwd: {message}")
    return 0


def _users_file(args: argparse.Namespace) -> Path:
    if args.file:
        return Path(args.file).absolute()
    from empath.config import ConfigError, default_config_path, load_config

    path = Path(args.config) if args.config else default_config_path()
    try:
        cfg = load_config(path, check_modules=False)
    except ConfigError as exc:
        raise PasswdError(str(exc), EXIT_USAGE) from None
    if cfg.submission.users_file is None:
        raise PasswdError(f"submission.users_file is not set in {path}; set it, or give "
                          "--file", EXIT_USAGE)
    return cfg.submission.users_file


def _run(args: argparse.Namespace) -> str:
    from empath.smtp.auth import User, check_name, check_sender

    name: str = args.user
    problem = check_name(name)
    if problem is not None:
        raise PasswdError(f"{problem}: {name!r}", EXIT_USAGE)
    senders: tuple[str, ...] | None = None
    if args.senders is not None:
        senders = tuple(a.strip() for a in args.senders.split(",") if a.strip())
        for address in senders:
            problem = check_sender(address)
            if problem is not None:
                raise PasswdError(problem, EXIT_USAGE)
    if args.delete and (args.stdin or senders is not None):
        raise PasswdError("--delete takes no password and no --senders", EXIT_USAGE)
    path = _users_file(args)
    with _locked(path.parent):
        users, old = _read(path)
        if args.delete:
            if users.pop(name, None) is None:
                raise PasswdError(f"no user {name!r} in {path}")
            _write(path, users, old)
            return f"user {name} deleted from {path}; reload the daemon to apply"
        password = _password(args.stdin)
        import bcrypt

        hashed = bcrypt.hashpw(password, bcrypt.gensalt(ROUNDS)).decode("ascii")
        known = users.get(name)
        kept = senders if senders is not None else (known.senders if known else ())
        users[name] = User(name, hashed, kept)
        _write(path, users, old)
    what = "changed" if known is not None else "set"
    return f"password for {name} {what} in {path}; reload the daemon to apply"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PasswdError(f"{directory}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> tuple[dict[str, User], os.stat_result | None]:
    from empath.smtp.auth import UsersFileError, parse_users

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        raise PasswdError(f"{path}: cannot open: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PasswdError(f"{path}: not a regular file")
        data = f.read()
    try:
        return parse_users(data.decode("utf-8"), str(path)), st
    except (UnicodeDecodeError, UsersFileError) as exc:
        # Never rewrite a file we cannot read back whole: lines would be lost.
        raise PasswdError(f"{exc}; fix the file by hand first") from None


def _password(from_stdin: bool) -> bytes:
    if from_stdin:
        line = sys.stdin.buffer.readline()
        password = line.removesuffix(b"\n").removesuffix(b"\r")
    else:
        try:
            first = getpass.getpass("New password: ")
            again = getpass.getpass("Retype new password: ")
        except (EOFError, KeyboardInterrupt):
            raise PasswdError("no password given") from None
        except OSError:
            raise PasswdError("no terminal to read the password from; use --stdin") from None
        if first != again:
            raise PasswdError("the passwords do not match; nothing changed")
        password = first.encode("utf-8")
    if not password:
        raise PasswdError("empty password; nothing changed")
    if len(password) > 72:
        raise PasswdError("password longer than 72 bytes (bcrypt would ignore the rest)")
    if b"\0" in password:
        raise PasswdError("password contains a NUL byte")
    return password


def _owner(old: os.stat_result | None) -> tuple[int, int]:
    if old is not None:
        return old.st_uid, old.st_gid
    gid = -1
    with contextlib.suppress(KeyError):
        gid = grp.getgrnam(DAEMON_GROUP).gr_gid
    return -1, gid


def _write(path: Path, users: dict[str, User], old: os.stat_result | None) -> None:
    from empath.smtp.auth import format_users

    text = format_users(users).encode("utf-8")
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise PasswdError(f"{directory}: cannot create a file: {exc.strerror}") from None
    try:
        os.fchmod(fd, MODE)
        uid, gid = _owner(old)
        if uid != -1 or gid != -1:
            try:
                os.fchown(fd, uid, gid)
            except PermissionError:
                if old is not None:  # we must not hand someone's file to ourselves
                    raise
        view = memoryview(text)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except OSError as exc:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PasswdError(f"{path}: cannot write: {exc.strerror or exc}") from None
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
