"""Listening sockets: handed over by systemd (socket activation) or bound from config."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from empath.config.model import Listener

__all__ = ["ListenSocket", "ListenerError", "bind_listeners", "from_systemd", "is_listening"]

SD_LISTEN_FDS_START = 3
KNOWN_NAMES = ("smtp", "submission", "metrics")


class ListenerError(Exception):
    pass


@dataclass(slots=True)
class ListenSocket:
    sock: socket.socket
    role: str  # smtp | submission | metrics
    label: str  # human-readable address

    def fileno(self) -> int:
        return self.sock.fileno()


def from_systemd(environ: dict[str, str] | None = None) -> list[ListenSocket] | None:
    """Sockets passed by systemd, or None when we were not socket-activated.

    ``LISTEN_PID`` must name us: the variables may be inherited by accident. They are
    removed from the environment so that our children do not take them as theirs.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or "LISTEN_FDS" not in env:
        return None
    try:
        count = int(env["LISTEN_FDS"])
    except ValueError:
        raise ListenerError(f"LISTEN_FDS is not a number: {env['LISTEN_FDS']!r}") from None
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    result: list[ListenSocket] = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) else "smtp"
        if name not in KNOWN_NAMES:
            # systemd's default name is the socket unit's; treat unnamed as SMTP.
            name = "smtp" if name in ("", "unknown") or name.endswith(".socket") else name
        if name not in KNOWN_NAMES:
            raise ListenerError(
                f"socket-activated fd {fd} has unknown FileDescriptorName={name!r} "
                f"(expected one of {', '.join(KNOWN_NAMES)})"
            )
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        try:
            label = _label(sock.getsockname())
        except OSError:
            label = f"fd {fd}"
        result.append(ListenSocket(sock, name, label))
    return result


def _label(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def bind_listeners(listeners: tuple[Listener, ...]) -> list[ListenSocket]:
    result: list[ListenSocket] = []
    try:
        for lst in listeners:
            family = socket.AF_INET6 if ":" in lst.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((lst.host, lst.port))
                sock.listen(1024)
            except OSError as exc:
                sock.close()
                raise ListenerError(f"cannot listen on {lst.address}: {exc.strerror}") from None
            result.append(ListenSocket(sock, lst.role, lst.address))
    except ListenerError:
        for ls in result:
            ls.sock.close()
        raise
    return result


def is_listening(sock: socket.socket) -> bool:
    """Whether ``sock`` is still a listening socket (not shut down or closed)."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False
