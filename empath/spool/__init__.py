"""The durable spool: one file per accepted message (data, then envelope) under
``<state_dir>/spool``.

``Spool.commit`` is the point of no return: once it returns, the message survives a
crash and the SMTP layer may answer 250. See ``empath.spool.store`` for the contract.
"""

from empath.spool.envelope import CorruptEnvelope, Envelope, Recipient
from empath.spool.ids import is_message_id, new_message_id
from empath.spool.store import RecoveryReport, Spool, SpoolError, SpoolWriter, open_message

__all__ = [
    "CorruptEnvelope",
    "Envelope",
    "Recipient",
    "RecoveryReport",
    "Spool",
    "SpoolError",
    "SpoolWriter",
    "is_message_id",
    "new_message_id",
    "open_message",
]
