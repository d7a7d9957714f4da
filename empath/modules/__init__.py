"""Modules: Python extensions called at every SMTP stage and queue event.

The public API is ``empath.modules.api`` (re-exported here); docs/modules.md is the
reference. ``loader`` finds and builds modules, ``runner`` calls them.
"""

from empath.modules.api import (
    ACCEPT,
    EVENTS,
    HOOKS,
    Accept,
    ConnectContext,
    DataContext,
    DeliveryResult,
    Event,
    Headers,
    HeloContext,
    MailContext,
    Module,
    ModuleEnv,
    ModuleOptionError,
    RcptContext,
    RecipientInfo,
    Reject,
    SessionInfo,
    Tempfail,
    Verdict,
)

__all__ = [
    "ACCEPT",
    "EVENTS",
    "HOOKS",
    "Accept",
    "ConnectContext",
    "DataContext",
    "DeliveryResult",
    "Event",
    "Headers",
    "HeloContext",
    "MailContext",
    "Module",
    "ModuleEnv",
    "ModuleOptionError",
    "RcptContext",
    "RecipientInfo",
    "Reject",
    "SessionInfo",
    "Tempfail",
    "Verdict",
]
