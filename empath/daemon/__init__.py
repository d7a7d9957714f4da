"""Process lifecycle: the supervisor (MainPID) and the SMTP worker processes.

The supervisor owns the listening sockets, the spool's recovery, per-client
accounting (like Postfix's anvil), signals and — in later work — sd_notify, the
control socket, metrics and delivery. Workers inherit the listening sockets, receive
mail into the spool and ask the supervisor before admitting each client.
"""

from empath.daemon.supervisor import run

__all__ = ["run"]
