"""SMTP replies, all with RFC 2034/3463 enhanced status codes.

Every 2xx/4xx/5xx reply after the greeting and EHLO carries an enhanced code. Replies
written by this package name their code explicitly; ``ensure_enhanced`` is the safety
net for replies that give only the basic code (modules' refusals, for one).
"""

from __future__ import annotations

import re

__all__ = ["ensure_enhanced"]

_HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?:\s|$)")

# A conservative default per basic code (RFC 3463 §3, RFC 5321 §4.2.3).
_DEFAULT_ENHANCED = {
    "211": "2.0.0",
    "214": "2.0.0",
    "220": "2.0.0",
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "251": "2.1.5",
    "252": "2.5.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "534": "5.7.9",
    "535": "5.7.8",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}


def ensure_enhanced(reply: str) -> str:
    """Insert a default enhanced status code into ``reply`` if it lacks one."""
    if len(reply) < 3 or reply[0] not in "245" or _HAS_ENHANCED.match(reply):
        return reply
    code = reply[:3]
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    sep = reply[3:4] or " "
    rest = reply[4:]
    return f"{code}{sep}{enhanced} {rest}".rstrip()
