"""The SMTP front: serves SMTP sessions on listening sockets it is handed.

It never binds anything itself — sockets come from systemd (socket activation) or
from the supervisor — so the same code runs under both, in one or many processes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from empath import metrics
from empath.config.model import Config
from empath.modules.runner import ModuleSet
from empath.secretfile import read_secret
from empath.smtp.auth import Users, load_users
from empath.smtp.session import SMTPSession
from empath.spool import Envelope, Spool
from empath.systemd import events

__all__ = ["Front", "make_tls_context", "refusal_reason"]

log = logging.getLogger("empath.smtp")


# Asked before a client gets its greeting: None admits, a reply string refuses.
AdmitFn = Callable[[str], Awaitable[str | None]]
# Told of a failed AUTH from an address; answers that address's failures in the window.
AuthFailedFn = Callable[[str], Awaitable[int]]


def refusal_reason(reply: str) -> str:
    """The metrics' reason label for a refusal from the supervisor's per-client
    accounting (empath/daemon/anvil.py words them; a test keeps the two in step)."""
    if "slow down" in reply:
        return "rate"
    if "authentication failures" in reply:
        return "auth_failures"
    if "too many connections from" in reply:
        return "per_client"
    return "max_connections"


def make_tls_context(cfg: Config) -> ssl.SSLContext | None:
    """Server-side context for STARTTLS: TLS 1.2 minimum, no client certificates."""
    if cfg.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The secret-file rule first: a key others can read is refused, not served.
    read_secret(cfg.tls.key, "tls.key")
    ctx.load_cert_chain(str(cfg.tls.certificate), str(cfg.tls.key))
    return ctx


class Front:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        *,
        admit: AdmitFn | None = None,
        release: Callable[[str], None] | None = None,
        on_queued: Callable[[Envelope], None] | None = None,
        auth_failed: AuthFailedFn | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.tls_context = make_tls_context(config)
        self.users = _users_or_none(config)
        self.modules = ModuleSet.create(config, "worker")  # hooks; new ones at reload
        self._auth_failed = auth_failed
        self._admit = admit
        self._release = release
        self._on_queued = on_queued
        self.sessions: set[SMTPSession] = set()
        self.shutting_down = False
        self._servers: list[asyncio.Server] = []
        self.roles: set[str] = set()  # of the listeners served

    def apply_config(self, config: Config) -> None:
        """Use ``config`` for new sessions; open sessions keep the one they started with.

        The TLS context is built anew, so a certificate renewed in place (same paths,
        new files) is served from the next session on. Raises if the files are bad;
        then nothing changes.
        """
        tls = make_tls_context(config)
        users = load_users(config)  # the users file too: re-read at every reload
        modules = ModuleSet.create(config, "worker")  # re-created at every reload
        self.config, self.tls_context, self.users = config, tls, users
        old, self.modules = self.modules, modules
        old.retire()  # closed once the sessions that started with it are gone

    async def serve(self, sock: socket.socket, role: str) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        server = await loop.create_server(
            lambda: SMTPSession(self, role), sock=sock, backlog=1024
        )
        self._servers.append(server)
        self.roles.add(role)

    # ---- called by sessions ------------------------------------------------------

    async def admit(self, session: SMTPSession) -> str | None:
        metrics.inc("empath_smtp_connections_total", (session.role,))
        if self.shutting_down:
            metrics.inc("empath_smtp_connections_refused_total", (session.role, "shutdown"))
            return f"421 4.3.2 {self.config.hostname} Service shutting down"
        if self._admit is not None:
            refusal = await self._admit(session.client_ip)
            if refusal is not None:
                metrics.inc("empath_smtp_connections_refused_total",
                            (session.role, refusal_reason(refusal)))
                log.info("connection refused client=%s: %s", session.client_ip, refusal,
                         extra={"EMPATH_EVENT": events.REFUSED,
                                "CLIENT_ADDR": session.client_ip})
                return refusal
        self.sessions.add(session)
        log.info("connect client=%s port=%d role=%s", session.client_ip, session.client_port,
                 session.role,
                 extra={"EMPATH_EVENT": events.CONNECT, "CLIENT_ADDR": session.client_ip})
        return None

    async def auth_failed(self, ip: str) -> int:
        """Count a failed AUTH from ``ip`` (in the supervisor, across workers): the
        address's failures within ``limits.auth_failure_window``, this one included."""
        if self._auth_failed is None:
            return 1
        return await self._auth_failed(ip)

    def session_closed(self, session: SMTPSession) -> None:
        self.sessions.discard(session)
        session.hooks.release()
        if self._release is not None:
            self._release(session.client_ip)

    def message_queued(self, envelope: Envelope, session: SMTPSession) -> None:
        metrics.inc("empath_messages_received_total", (session.role,))
        metrics.inc("empath_messages_received_bytes_total", (session.role,), envelope.size)
        log.info(
            "queued id=%s from=<%s> nrcpt=%d size=%d client=%s",
            envelope.id, envelope.sender, len(envelope.recipients), envelope.size,
            session.client_ip,
            extra={"EMPATH_EVENT": events.RECEIVED, "QUEUE_ID": envelope.id,
                   "CLIENT_ADDR": session.client_ip},
        )
        if self._on_queued is not None:
            self._on_queued(envelope)

    def metrics_snapshot(self) -> dict[str, Any]:
        """This worker's counts for the supervisor, with its open sessions by role."""
        active = dict.fromkeys(self.roles, 0)
        for session in self.sessions:
            active[session.role] = active.get(session.role, 0) + 1
        for role, n in active.items():
            metrics.LOCAL.set("empath_smtp_sessions_active", (role,), n)
        return metrics.LOCAL.snapshot()

    def describe_sessions(self) -> list[dict[str, Any]]:
        """Every admitted session as ``SMTPSession.describe`` gives it, oldest first."""
        rows = [session.describe() for session in self.sessions]
        rows.sort(key=lambda row: float(row["connected_at"]))
        return rows

    # ---- shutdown ----------------------------------------------------------------

    def stop_accepting(self) -> None:
        self.shutting_down = True
        for server in self._servers:
            server.close()

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting; let sessions inside DATA finish up to ``timeout``; 421 the rest."""
        self.stop_accepting()
        bye = f"421 4.3.2 {self.config.hostname} Service shutting down"
        for session in list(self.sessions):
            if not session.busy:
                session.close_with(bye)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(s.busy for s in self.sessions) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close_with(bye)
        # Give transports a moment to flush the 421s.
        await asyncio.sleep(0.05)
        await self.modules.close()


def _users_or_none(config: Config) -> Users | None:
    """At a worker's start the supervisor has checked the file already; if it went bad
    since, AUTH answers 454 (temporary) until a reload fixes it, rather than the
    worker failing and being restarted in a loop."""
    try:
        return load_users(config)
    except (OSError, ValueError) as exc:
        log.error("submission.users_file: %s; AUTH is unavailable until a reload", exc)
        return None


def users_file_error(config: Config) -> str | None:
    """Why ``submission.users_file`` cannot be used (None: it can, or it is unset);
    checked at start (exit 2) and at reload (refused), as the TLS files are."""
    try:
        load_users(config)
    except (OSError, ValueError) as exc:
        return str(exc)
    return None
