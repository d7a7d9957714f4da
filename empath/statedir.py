"""Validation (and first-time creation) of ``state_dir``, where the spool lives.

The spool holds other people's mail and is the daemon's crash-safety guarantee, so
the directory must be one that only the daemon's user can change: anyone who can
write it, or replace it (through a symlink or a writable parent), could read,
forge or destroy queued mail. A typo such as ``state_dir: /etc`` must not make the
daemon create files among system files either. ``validate_state_dir`` is called at
daemon start, before anything is written; it refuses with a message naming the
path and the fix rather than trying to repair permissions it did not set itself.

``empath check-config`` checks the file alone (it may run as root on a temporary
copy, on another host), so the config loader only uses the lexical check,
``forbidden_location``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["STATE_DIR_MODE", "StateDirError", "forbidden_location", "validate_state_dir"]

# Owner rwx, group r-x (so an admin group can read the spool for debugging), no others.
STATE_DIR_MODE = 0o750
# Mode for missing parents we create: ordinary traversable directories.
_PARENT_MODE = 0o755

# Never put the spool inside these: system software and pseudo-filesystems.
_SYSTEM_DIRS = (
    "/etc", "/bin", "/sbin", "/usr", "/boot", "/proc", "/sys", "/dev",
    "/lib", "/lib32", "/lib64", "/libx32",
)  # fmt: skip
# Shared directories that may contain a state dir but must not be one: validation
# would fail on their permissions anyway, or (as root) pass and then fill /var with
# spool files.
_SHARED_DIRS = (
    "/", "/var", "/var/lib", "/var/spool", "/var/tmp", "/tmp", "/run", "/home",
    "/root", "/srv", "/opt", "/mnt", "/media",
)  # fmt: skip


class StateDirError(Exception):
    """The state directory is unusable; the message says which path and why."""


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _location_problem(text: str) -> str | None:
    for sysdir in _SYSTEM_DIRS:
        if _within(text, sysdir):
            return f"is inside the system directory {sysdir}"
    if text in _SHARED_DIRS:
        return "is a shared system directory; use a directory of its own such as /var/lib/empath"
    return None


def forbidden_location(path: Path) -> str | None:
    """Purely lexical check (no filesystem access): why ``path`` may not be a state
    directory, or None. ``path`` must be absolute."""
    return _location_problem(os.path.normpath(path))


def validate_state_dir(path: Path) -> None:
    """Make sure ``path`` is a safe state directory, creating it (mode 0750) if missing.

    Raises StateDirError if the path is relative, in a system directory, a symlink,
    not a directory, not owned by the effective uid, group- or world-writable, or
    reachable only through a directory that another (non-root) user can change.
    """
    if not path.is_absolute():
        raise StateDirError(f"state directory {path}: must be an absolute path")
    # Check both the path as written and where its symlinks lead, *before*
    # creating anything: /srv/x -> /etc must fail as surely as /etc itself.
    for shown in (os.path.normpath(path), os.path.realpath(path)):
        problem = _location_problem(shown)
        if problem is not None:
            where = "" if shown == os.path.normpath(path) else f" (resolves to {shown})"
            raise StateDirError(f"state directory {path}{where} {problem}")

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        # Refuse to create anything under a parent someone else could tamper with.
        _check_ancestors(path, missing_ok=True)
        _create(path)
        st = _lstat(path)
    except OSError as exc:
        raise StateDirError(f"state directory {path}: cannot inspect: {exc}") from None

    # A symlink could be re-pointed by whoever owns it or its parent; and even a
    # safe one makes the permission checks below apply to the wrong inode.
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(
            f"state directory {path} is a symlink; configure the real directory "
            f"({os.path.realpath(path)}) instead"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state directory {path} exists but is not a directory")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise StateDirError(
            f"state directory {path} is owned by {_user(st.st_uid)}, but empath runs as "
            f"{_user(euid)}; chown {_user(euid)} {path}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirError(
            f"state directory {path} has mode {mode:04o}, writable by group or others; "
            f"chmod {STATE_DIR_MODE:04o} {path}"
        )
    if mode & stat.S_IRWXU != stat.S_IRWXU:
        raise StateDirError(
            f"state directory {path} has mode {mode:04o}, not rwx for its owner; "
            f"chmod {STATE_DIR_MODE:04o} {path}"
        )
    _check_ancestors(path)


def _lstat(path: Path) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise StateDirError(f"state directory {path}: cannot inspect: {exc}") from None


def _create(path: Path) -> None:
    """Create ``path`` and any missing parents, then set modes explicitly: mkdir's
    mode is filtered by the umask, which may be 0 (world-writable) or 077."""
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        mode = STATE_DIR_MODE if d == path else _PARENT_MODE
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue  # created concurrently; the checks after creation judge it
        except OSError as exc:
            raise StateDirError(f"cannot create state directory {path}: {exc}") from None
        # chmod through an O_NOFOLLOW descriptor, so a directory swapped for a
        # symlink in between cannot redirect the chmod to another file.
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StateDirError(f"cannot set mode of {d}: {exc}") from None


def _check_ancestors(path: Path, *, missing_ok: bool = False) -> None:
    """Every directory above the state dir, both as written and after resolving
    symlinks, must be changeable only by root or by us: whoever can rename entries
    in a parent can swap the state directory for one of their own. World-writable
    directories with the sticky bit (/tmp) are fine, as there only an entry's
    owner may rename it. ``missing_ok`` skips parents that do not exist yet
    (before creation: we are about to create them ourselves)."""
    euid = os.geteuid()
    seen: set[str] = set()
    candidates = list(path.parents) + list(Path(os.path.realpath(path)).parents)
    for parent in candidates:
        key = str(parent)
        if key in seen:
            continue
        seen.add(key)
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            if missing_ok:
                continue
            raise StateDirError(f"state directory {path}: {parent} disappeared") from None
        except OSError as exc:
            raise StateDirError(f"state directory {path}: cannot inspect {parent}: {exc}") from None
        if st.st_uid not in (0, euid):
            raise StateDirError(
                f"state directory {path}: parent directory {parent} is owned by "
                f"{_user(st.st_uid)}, who could replace the state directory; use a path "
                f"whose parents belong to root or {_user(euid)}"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
            raise StateDirError(
                f"state directory {path}: parent directory {parent} has mode {mode:04o}, "
                "writable by group or others, who could replace the state directory"
            )


def _user(uid: int) -> str:
    """``name`` (uid N) when the name is known, for messages an operator can act on."""
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"
