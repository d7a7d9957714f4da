"""The control plane: ``empathctl`` talks to the daemon over a Unix socket.

- ``protocol``: the wire format (versioned JSON lines), shared with the client.
- ``paths``: where the socket is (``control_socket_path``).
- ``auth``: peer credentials, the admin group, the optional token.
- ``commands``: the commands and ``ControlHandlers``, what the daemon provides.
- ``queueops``: queue and route operations on a QueueManager and its Spool.
- ``server``: ``ControlServer``, the socket itself.

Only ``paths`` and ``protocol`` are imported here, so ``empathctl`` does not load
the daemon; import ``empath.control.server`` for the rest.
"""

from empath.control.paths import control_socket_path
from empath.control.protocol import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "control_socket_path"]
