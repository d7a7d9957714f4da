"""Filters for the empath role."""

from __future__ import annotations

from typing import Any

# The keys a reload does not apply (the daemon warns and keeps the old value until
# the next restart); DEPLOYMENT.md "Reload or restart".
RESTART_ONLY = ("listen", "state_dir", "workers", "control.socket", "metrics.listen")


def empath_restart_only(config: Any) -> dict[str, Any]:
    """The restart-only settings of a parsed empath.yaml, unset ones as None."""
    out: dict[str, Any] = {}
    for path in RESTART_ONLY:
        value: Any = config if isinstance(config, dict) else {}
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[path] = value
    return out


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"empath_restart_only": empath_restart_only}
