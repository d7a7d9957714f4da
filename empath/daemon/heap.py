"""Keeping what a daemon process holds for its whole life out of the cyclic garbage
collector's full passes.

A full collection walks every tracked object and the process does nothing else
meanwhile. A freshly started worker holds ~50,000 of them (modules, config, its front),
and a full collection of those takes ~18 ms of CPU on the development VMs; the
supervisor with 100,000 queued messages holds ~150,000 (41 ms). In a worker that is a
stall of every session it serves; in the supervisor, of every admit all workers wait
for. CPython runs one whenever the objects that survived since the last one reach a
quarter of those it walked then, so under load they keep coming. ``gc.freeze()``
moves everything that exists into a generation no collection walks; what sessions and
deliveries make afterwards is collected as before, and frozen objects that lose their
last reference are still freed at once by reference counting.

What freezing gives up: a reference cycle among frozen objects that becomes garbage is
not reclaimed while frozen. A reload is when start-up objects go (the old config, TLS
contexts, module instances), so after one ``refreeze`` collects once with everything
thawed, then freezes what is left.
"""

from __future__ import annotations

import gc

__all__ = ["freeze", "refreeze"]


def freeze() -> None:
    """Start-up is over: what exists now lives as long as the process."""
    gc.collect()  # garbage of start-up itself (parsing, recovery) is not kept
    gc.freeze()


def refreeze() -> None:
    """After a reload: reclaim what the old configuration left, then freeze again."""
    gc.unfreeze()
    freeze()
