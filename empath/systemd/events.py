"""The daemon's log events: ``EMPATH_EVENT`` names and, for the catalogued ones, the
journald ``MESSAGE_ID`` that ``systemd/empath.catalog`` explains (``journalctl -x``).

One place on purpose: a log call names its event (``extra={"EMPATH_EVENT": RECEIVED}``)
and the journal handler adds the MESSAGE_ID from this table, so an id can never drift
from its event. A test checks this table and the catalog file against each other.
Ids are random 128-bit values and must never change once released: people filter on
them (``journalctl MESSAGE_ID=…``).
"""

from __future__ import annotations

__all__ = [
    "BOUNCED",
    "CATALOG",
    "CONFIG_ERROR",
    "CONNECT",
    "DEFERRED",
    "DELIVERED",
    "DSN_DELAY",
    "DSN_FAILURE",
    "DSN_SUCCESS",
    "READY",
    "RECEIVED",
    "REFUSED",
    "REJECTED",
    "RELOAD",
    "RELOAD_REFUSED",
    "REMOVED",
    "STOPPED",
    "STOPPING",
    "WORKER_EXITED",
    "message_id",
]

# SMTP front
CONNECT = "connect"  # a client was admitted and greeted
REFUSED = "refused"  # a connection refused by a limit (421)
RECEIVED = "received"  # a message was spooled ("250 … queued as")
REJECTED = "rejected"  # a recipient or a message refused
# queue (empath/queue/manager.py uses the literal names: they are its result states)
DELIVERED = "delivered"
DEFERRED = "deferred"
BOUNCED = "bounced"
DSN_FAILURE = "dsn-failure"
DSN_DELAY = "dsn-delay"
DSN_SUCCESS = "dsn-success"
REMOVED = "removed"
# daemon life
READY = "ready"
RELOAD = "reload"
RELOAD_REFUSED = "reload-refused"
CONFIG_ERROR = "config-error"
WORKER_EXITED = "worker-exited"
STOPPING = "stopping"
STOPPED = "stopped"

# EMPATH_EVENT → MESSAGE_ID (32 lower-case hex digits, as journald writes them).
# connect and removed are not catalogued: one line each per message or connection,
# with nothing to explain beyond the line itself.
CATALOG: dict[str, str] = {
    READY: "f4130fb9583a43be97560b14859dee1e",
    STOPPING: "5ad0767a2a4e45ec98c0c078e25fa19c",
    STOPPED: "01d948e5886444db880a7bd2d3cb46ee",
    RELOAD: "689689528558445a84b82b5baa43523f",
    RELOAD_REFUSED: "7cfdde413ee44eebaaee249aef5f3389",
    CONFIG_ERROR: "63dba77e1f7247a086152eeef2680312",
    WORKER_EXITED: "486c6bf84cba431cad3ed0e30036b277",
    REFUSED: "93cb2de6c180425896b4aefbc8390e6e",
    RECEIVED: "398ece0bb17a4af2b139b0c74869daad",
    REJECTED: "6a25fa66b3394eb88e44d76f32cdf76a",
    DELIVERED: "37e3459b421a44cdbfea6e101b255e48",
    DEFERRED: "2c2ebed186b94557a3aec1b966e6daf0",
    BOUNCED: "b0aec6d89d43422ea3011b224bdd75ed",
    DSN_FAILURE: "91bbaba8edca49a4b2f8721bb5ef2a0c",
    DSN_DELAY: "7d3930e436284cde959a50ffa892ae78",
    DSN_SUCCESS: "a19e1c41cb844534b2a47f8069190711",
}


def message_id(event: str | None) -> str | None:
    """The journald MESSAGE_ID for ``event``, or None if it is not catalogued."""
    return CATALOG.get(event) if event else None
