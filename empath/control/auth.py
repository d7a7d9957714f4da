"""Who may use the control socket: peer credentials and the optional token.

The socket file is ``0660`` and group ``empath-admin``, so the kernel already
keeps others out. The daemon checks again, per connection, with the peer's
credentials as the kernel reports them (``SO_PEERCRED``, which a client cannot
forge): root, the daemon's own user, and members of the admin group are
allowed. Membership is looked up in the user and group databases (``pwd`` and
``grp``, so NSS sources such as LDAP count), as the user's primary group or a
supplementary one, or from the peer process's own group id.

The token (``control.token_file``) is an additional secret for setups where the
socket is shared more widely (a container bind mount, say). Its file must not be
readable by others; it is compared in constant time.
"""

from __future__ import annotations

import grp
import hmac
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from empath.secretfile import SecretFileError, read_secret_text

__all__ = [
    "ControlError",
    "Peer",
    "authorize",
    "check_token",
    "peer_credentials",
    "read_token",
]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_TOKEN_FILE = 4096


class ControlError(Exception):
    """The control socket cannot be set up as configured; the text says why."""


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's pid/uid/gid, from the kernel (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)


def authorize(peer: Peer, admin_group: str, daemon_uid: int) -> str | None:
    """None if ``peer`` may use the socket, else the reason (naming the group).

    Blocking (NSS lookups): call it from a thread in the daemon.
    """
    if peer.uid in (0, daemon_uid):
        return None
    try:
        group = grp.getgrnam(admin_group)
    except KeyError:
        group = None
    if group is not None:
        if peer.gid == group.gr_gid:
            return None
        try:
            user = pwd.getpwuid(peer.uid)
        except KeyError:
            user = None
        if user is not None and (user.pw_gid == group.gr_gid or user.pw_name in group.gr_mem):
            return None
        who = user.pw_name if user is not None else f"uid {peer.uid}"
    else:
        who = peer.user
    missing = "" if group is not None else f" (group {admin_group} does not exist here)"
    return (f"permission denied for {who}: you need to be root or in group "
            f"{admin_group}{missing}")


def read_token(path: Path) -> str:
    """The token in ``path``; ControlError if unusable (missing, empty, readable by others)."""
    try:
        return read_secret_text(path, "control.token_file", limit=MAX_TOKEN_FILE)
    except SecretFileError as exc:
        raise ControlError(str(exc)) from None


def check_token(expected: str | None, given: str | None) -> str | None:
    """None if the request's token is acceptable, else the reason."""
    if expected is None:
        return None
    if given is None:
        return "a token is required (control.token_file is set); use --token-file"
    if not hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8", "replace")):
        return "wrong token"
    return None
