"""Where the control socket lives.

Shared by the daemon and ``empathctl``; imports only the config model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from empath.config.model import Config

__all__ = ["DEFAULT_SOCKET", "SOCKET_NAME", "control_socket_path"]

SOCKET_NAME = "control.sock"
# Where the packaged daemon's socket is (systemd RuntimeDirectory=empath).
DEFAULT_SOCKET = Path("/run/empath") / SOCKET_NAME


def runtime_directory(environ: Mapping[str, str] | None = None) -> Path | None:
    """The first of systemd's ``$RUNTIME_DIRECTORY`` (``RuntimeDirectory=``), if set.

    systemd separates several directories with ':'."""
    env = os.environ if environ is None else environ
    value = env.get("RUNTIME_DIRECTORY", "")
    first = value.split(":", 1)[0]
    return Path(first) if first.startswith("/") else None


def control_socket_path(config: Config, environ: Mapping[str, str] | None = None) -> Path:
    """The daemon's control socket: ``control.socket`` if set, else
    ``$RUNTIME_DIRECTORY/control.sock`` under systemd, else ``<state_dir>/control.sock``
    (a development setup keeps it next to its spool)."""
    if config.control.socket is not None:
        return config.control.socket
    runtime = runtime_directory(environ)
    if runtime is not None:
        return runtime / SOCKET_NAME
    return config.state_dir / SOCKET_NAME
