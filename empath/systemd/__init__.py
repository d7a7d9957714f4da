"""systemd integration: sd_notify (notify), journald logging (journal), and the
catalogued log events (events). Socket activation lives in empath/daemon/listeners.py.

Nothing here needs libsystemd: systemd-python is used for the journal when it is
installed, and a stdlib implementation of the same protocol otherwise.
"""

from empath.systemd.notify import Notifier, monotonic_usec, watchdog_interval

__all__ = ["Notifier", "monotonic_usec", "watchdog_interval"]
