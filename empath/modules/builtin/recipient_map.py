"""``recipient_map``: refuse unknown users of local domains at RCPT time.

Accepting mail for a user who does not exist and bouncing it later sends the
bounce to a sender who is usually forged — backscatter. Postfix refuses such
recipients up front (``local_recipient_maps``); this is the same, from a file::

    modules:
      - name: recipient_map
        options: {path: /etc/empath/recipients}

The file holds one address (``alice@example.com``) or a whole domain
(``@lists.example.com``) per line; ``#`` starts a comment (at the start of a line,
or after white space). Addresses match without regard to case. A recipient in a
local domain that is listed neither as itself nor by its ``@domain`` gets
``550 5.1.1``; ``postmaster@`` every local domain (and ``<postmaster>``) is never
refused; recipients in other domains (relaying) are not looked at. The file is
read when the module is built: at start and at every reload.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from empath.addr import AddressError, normalize_domain, parse_mailbox
from empath.modules.api import Module, ModuleEnv, ModuleOptionError, RcptContext, Reject, Verdict

__all__ = ["RecipientMap", "parse_map"]

_COMMENT = re.compile(r"(^|\s)#.*$")


def parse_map(text: str, label: str) -> tuple[frozenset[str], frozenset[str]]:
    """(addresses, domains) from a map file's text; ModuleOptionError on a bad line."""
    addresses: set[str] = set()
    domains: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        try:
            if line.startswith("@"):
                domains.add(normalize_domain(line[1:]))
            else:
                mailbox = parse_mailbox(line)
                addresses.add(f"{mailbox.local.lower()}@{mailbox.domain}")
        except AddressError as exc:
            raise ModuleOptionError(f"{label}, line {n}: {line!r} is not an address or "
                                    f"@domain: {exc}", key="path") from None
    return frozenset(addresses), frozenset(domains)


class RecipientMap(Module):
    def __init__(self, options: Mapping[str, Any], env: ModuleEnv) -> None:
        super().__init__(options, env)
        unknown = sorted(set(options) - {"path"})
        if unknown:
            raise ModuleOptionError("unknown option", key=unknown[0])
        raw = options.get("path")
        if not isinstance(raw, str) or not raw:
            raise ModuleOptionError("required: the file of addresses and @domains",
                                    key="path")
        path = Path(raw)
        if not path.is_absolute():
            raise ModuleOptionError(f"{raw!r} must be an absolute path", key="path")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ModuleOptionError(f"cannot read {path}: {why}", key="path") from None
        self.path = path
        self.addresses, self.domains = parse_map(text, str(path))

    def known(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")
        return domain in self.domains or f"{local.lower()}@{domain}" in self.addresses

    async def on_rcpt(self, ctx: RcptContext) -> Verdict:
        if not ctx.local_domain or ctx.postmaster or self.known(ctx.recipient):
            return None
        return Reject(550, "5.1.1", f"<{ctx.recipient}>: Recipient address rejected: "
                      "User unknown in local recipient table")
