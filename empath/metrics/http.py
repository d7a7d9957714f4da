"""The metrics HTTP endpoint, served by aiohttp on the supervisor's event loop.

``/healthz`` answers 200 whenever the supervisor's loop runs (it is the loop that
answers), open to anyone so a liveness probe needs no secret. ``/metrics`` and
``/readyz`` need credentials when any are configured (empath/metrics/auth.py).
Being on the supervisor's loop matters: a scrape sees the queue manager's state
directly, and a stuck loop shows as a failed scrape rather than stale numbers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from empath.metrics.auth import MetricsAuth

__all__ = ["MetricsServer"]

log = logging.getLogger("empath.metrics")

Scrape = Callable[[], Awaitable[bytes]]
Ready = Callable[[], Awaitable[list[str]]]  # reasons not to be ready; [] = ready


class MetricsServer:
    def __init__(self, auth: MetricsAuth, scrape: Scrape, ready: Ready) -> None:
        self.auth = auth
        self._scrape = scrape
        self._ready = ready
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/", self._index)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.label = ""

    def set_auth(self, auth: MetricsAuth) -> None:
        """At reload: new credentials apply to the next request. TLS is fixed when the
        listener starts (a new certificate needs a restart, as for listen:)."""
        self.auth = MetricsAuth(token=auth.token, users=auth.users, tls=self.auth.tls)

    async def start(self, sock: socket.socket) -> None:
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, ssl_context=self.auth.tls,
                            shutdown_timeout=1.0)
        await site.start()
        addr = sock.getsockname()
        scheme = "https" if self.auth.tls is not None else "http"
        self.label = f"{scheme}://{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _allowed(self, request: web.Request) -> bool:
        auth = self.auth
        header = request.headers.get("Authorization")
        ok = auth.check_fast(header)
        if ok is None and header is not None:
            ok = await asyncio.to_thread(auth.check_bcrypt, header)
        return bool(ok)

    def _unauthorized(self) -> web.Response:
        return web.Response(status=401, text="401 Unauthorized\n",
                            headers={"WWW-Authenticate": self.auth.challenge})

    async def _metrics(self, request: web.Request) -> web.Response:
        if not await self._allowed(request):
            return self._unauthorized()
        body = await self._scrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if not await self._allowed(request):
            return self._unauthorized()
        reasons = await self._ready()
        body = {"ready": not reasons, "reasons": reasons}
        return web.Response(status=503 if reasons else 200, text=json.dumps(body) + "\n",
                            content_type="application/json")

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="empath: /metrics /healthz /readyz\n")
