"""An audit trail: each delivery outcome, with how the message arrived.

See README.md. Uses only ``empath.modules.api``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from empath.modules.api import (
    DataContext,
    Event,
    MailContext,
    Module,
    ModuleEnv,
    ModuleOptionError,
    Reject,
    Verdict,
)

__all__ = ["AuditTrail"]

__version__ = "1.0.0"


class AuditTrail(Module):
    def __init__(self, options: Mapping[str, Any], env: ModuleEnv) -> None:
        super().__init__(options, env)
        unknown = sorted(set(options) - {"log", "refuse_sender_domains"})
        if unknown:
            raise ModuleOptionError("unknown option", key=unknown[0])
        log = options.get("log")
        if not isinstance(log, str) or not Path(log).is_absolute():
            raise ModuleOptionError("required: an absolute path to append JSON lines to",
                                    key="log")
        refuse = options.get("refuse_sender_domains", [])
        if not isinstance(refuse, list) or not all(isinstance(d, str) for d in refuse):
            raise ModuleOptionError("expected a list of domains", key="refuse_sender_domains")
        self.log_path = Path(log)
        self.refuse = frozenset(d.lower().rstrip(".") for d in refuse)

    async def on_mail(self, ctx: MailContext) -> Verdict:
        domain = ctx.sender.rpartition("@")[2].lower()
        if domain and domain in self.refuse:
            return Reject(550, "5.7.1", f"Mail from {domain} is not accepted here")
        return None

    async def on_data(self, ctx: DataContext) -> Verdict:
        audit_id = uuid.uuid4().hex
        ctx.metadata.update({
            "audit_id": audit_id,
            "client": ctx.session.client_addr,
            "helo": ctx.session.helo,
            "tls": ctx.session.tls,
            "message_id": ctx.headers.get("Message-ID"),
        })
        ctx.add_header("X-Audit-Id", audit_id)
        return None

    async def _record(self, event: Event) -> None:
        result = event.result
        line = {
            "event": event.kind,
            "queue_id": event.queue_id,
            "recipient": event.recipient,
            "status": result.status if result else None,
            "enhanced": result.enhanced if result else None,
            "relay": result.remote_mta if result else None,
            **{k: event.metadata.get(k) for k in
               ("audit_id", "client", "helo", "tls", "message_id")},
            "at": round(time.time(), 3),
        }
        text = json.dumps(line, sort_keys=True) + "\n"
        await asyncio.to_thread(self._append, text)

    def _append(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(text)

    on_delivered = on_deferred = on_bounced = on_expired = _record
