"""Who may send mail to whom: the relay decision (no open relay, ever)."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from empath.addr import Mailbox
from empath.config.model import Config, IPNetwork

__all__ = ["RcptDecision", "decide_rcpt", "in_networks"]


# Asked for every connection (per-client limits) and every recipient (relay), mostly for
# the same few addresses; parsing the address costs more than the rest of either
# decision. The networks are part of the key, so a reload that changes them is never
# answered from before it.
@functools.lru_cache(maxsize=4096)
def in_networks(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


@dataclass(frozen=True, slots=True)
class RcptDecision:
    accept: bool
    reply: str


def decide_rcpt(
    cfg: Config, mailbox: Mailbox | None, *, client_may_relay: bool
) -> RcptDecision:
    """Accept a recipient if it is local, a postmaster, or the client may relay.

    ``mailbox`` None means the bare ``<Postmaster>`` (RFC 5321 §4.5.1), always accepted;
    so is postmaster@ every local domain.
    """
    if mailbox is None:
        return RcptDecision(True, "250 2.1.5 Ok")
    if mailbox.domain in cfg.local_domains:
        return RcptDecision(True, "250 2.1.5 Ok")
    if client_may_relay:
        return RcptDecision(True, "250 2.1.5 Ok")
    return RcptDecision(False, f"554 5.7.1 <{mailbox.address}>: Relay access denied")
