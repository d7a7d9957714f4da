"""Modules for tests/test_modules.py, loaded by the daemon by dotted path
(``tests.modfixtures:Probe``; the harness puts the checkout on PYTHONPATH).

``Probe`` does what its options list, so one class serves every scenario::

    options:
      actions:                       # tried in order at each stage
        - {stage: rcpt, when: "nobody", do: reject, reply: [550, "5.1.1", "no"]}
        - {stage: mail, when: "boom", do: raise}
        - {stage: mail, when: "slow", do: sleep}
        - {stage: data, do: set, metadata: {k: v}}
        - {stage: data, do: header, header: [X-Probe, yes]}
        - {stage: data, do: hold, text: "why"}
        - {stage: data, do: inspect}  # writes what on_data saw to <record>
      record: /path/events.jsonl      # every event, and what inspect saw

``when`` must be part of the stage's subject: the client address (connect), the
HELO name, the sender, the recipient, the Subject header (data).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from empath.modules.api import (
    ConnectContext,
    DataContext,
    Event,
    HeloContext,
    MailContext,
    Module,
    ModuleEnv,
    ModuleOptionError,
    RcptContext,
    Reject,
    Tempfail,
    Verdict,
)

DOES = ("reject", "raise", "sleep", "set", "header", "hold", "inspect")


class Probe(Module):
    def __init__(self, options: Mapping[str, Any], env: ModuleEnv) -> None:
        super().__init__(options, env)
        self.actions = list(options.get("actions", []))
        for i, a in enumerate(self.actions):
            if a.get("do") not in DOES:
                raise ModuleOptionError(f"do must be one of {DOES}", key=f"actions[{i}].do")
        self.record = Path(options["record"]) if "record" in options else None
        self.name = env.name

    def _write(self, entry: dict[str, Any]) -> None:
        if self.record is not None:
            with self.record.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")

    async def _act(self, stage: str, subject: str, ctx: Any) -> Verdict:
        for a in self.actions:
            if a.get("stage") != stage or str(a.get("when", "")) not in subject:
                continue
            do = a["do"]
            if do == "raise":
                raise RuntimeError(f"probe exploded at {stage}")
            if do == "sleep":
                await asyncio.sleep(3600)
            elif do == "set":
                ctx.metadata.update(a["metadata"])
            elif do == "header":
                ctx.add_header(*a["header"])
            elif do == "hold":
                ctx.hold(a["text"])
            elif do == "inspect":
                assert isinstance(ctx, DataContext)
                with ctx.open_body() as f:
                    body = f.read()
                with ctx.open_message() as f:
                    whole = f.read()
                self._write({"event": "inspect", "module": self.name, "size": ctx.size,
                             "whole": len(whole), "subject": ctx.headers.get("subject"),
                             "first": next(iter(ctx.headers))[0],
                             "fields": [n for n, _ in ctx.headers],
                             "body_sha256": hashlib.sha256(body).hexdigest(),
                             "recipients": list(ctx.recipients), "sender": ctx.sender,
                             "metadata": ctx.metadata})
            elif do == "reject":
                code, enhanced, text = a["reply"]
                cls = Reject if code >= 500 else Tempfail
                return cls(code, enhanced, text)
        return None

    async def on_connect(self, ctx: ConnectContext) -> Verdict:
        return await self._act("connect", ctx.session.client_addr, ctx)

    async def on_helo(self, ctx: HeloContext) -> Verdict:
        return await self._act("helo", ctx.helo, ctx)

    async def on_mail(self, ctx: MailContext) -> Verdict:
        return await self._act("mail", ctx.sender, ctx)

    async def on_rcpt(self, ctx: RcptContext) -> Verdict:
        return await self._act("rcpt", ctx.recipient, ctx)

    async def on_data(self, ctx: DataContext) -> Verdict:
        return await self._act("data", ctx.headers.get("Subject") or "", ctx)

    async def _event(self, event: Event) -> None:
        result = event.result
        self._write({"event": event.kind, "module": self.name, "queue_id": event.queue_id,
                     "recipient": event.recipient, "due": list(event.due),
                     "status": result.status if result else None,
                     "enhanced": result.enhanced if result else None,
                     "metadata": dict(event.metadata), "held": event.held,
                     "client": event.client_addr, "helo": event.helo})

    on_received = on_delivery_attempt = on_delivered = _event
    on_deferred = on_bounced = on_expired = _event


class Lenient(Probe):
    """The same probe under a second name (a module may be listed once)."""
