"""Reading a file that holds a secret (a token, password hashes, a private key).

One rule for all of them, checked at start and at every reload: a regular file, not a
symlink, readable and writable by nobody but its owner and group. A world-readable
secret is refused with the config key and the fix in the message, rather than used.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["SecretFileError", "read_secret", "read_secret_text"]

MAX_SECRET_FILE = 1 << 20


class SecretFileError(ValueError):
    """Names the config key and the file: ``metrics.bearer_token_file /x: empty``."""


def read_secret(path: Path, key: str, *, limit: int = MAX_SECRET_FILE) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretFileError(f"{key} {path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{key} {path}: not a regular file")
        if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            raise SecretFileError(
                f"{key} {path}: readable or writable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod o-rw it"
            )
        data = os.read(fd, limit + 1)
    except OSError as exc:
        raise SecretFileError(f"{key} {path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise SecretFileError(f"{key} {path}: longer than {limit} bytes")
    return data


def read_secret_text(path: Path, key: str, *, limit: int = MAX_SECRET_FILE) -> str:
    """The file's text, stripped; empty is an error."""
    try:
        text = read_secret(path, key, limit=limit).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretFileError(f"{key} {path}: not UTF-8 text") from None
    if not text:
        raise SecretFileError(f"{key} {path}: empty")
    return text
