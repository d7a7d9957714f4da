"""``empathctl``: talks to the running daemon over its control socket.

The control plane is not built yet; the command exists so packaging and docs can
rely on its name, and says plainly that it cannot do anything yet.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

EX_UNAVAILABLE = 69


def main(argv: list[str] | None = None) -> int:
    print("empathctl: the control socket is not supported yet", file=sys.stderr)
    return EX_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
