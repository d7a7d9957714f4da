#!/usr/bin/env python3
"""How long one full pass of Python's cyclic garbage collector stops a worker or the
supervisor, with and without empath/daemon/heap.py's freeze.

Nothing else runs in such a pass: in a worker every session waits, in the supervisor
every admit that all workers are waiting for. The objects measured are the real ones:
for a worker, what ``empath.daemon.worker`` imports plus a ``Front`` built on a config
(as ``Worker.run`` builds it); for the supervisor, ``empath.daemon.supervisor``'s
imports plus a ``QueueManager`` that has loaded ``--queued`` recovered messages (as at
start on a spool of that size; the tuples recovery hands over, no files read).

    python bench/gc_pause.py [--queued 100000] [--passes 20]

Printed per process: tracked objects, then the best and median wall time of a full
collection (``gc.collect()``) before and after ``heap.freeze()``. Each measurement
runs in a child process of its own, so one does not inherit the other's heap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import gc, json, shutil, sys, time, tempfile
from pathlib import Path
kind, queued, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from empath.config import load_config_text
from empath.daemon import heap
from empath.spool import Spool
tmp = Path(tempfile.mkdtemp(prefix="gc-pause-"))
cfg = load_config_text(
    "hostname: bench.example\npostmaster: postmaster@bench.example\n"
    f"state_dir: {tmp}/state\nlocal_domains: [bench.example]\n")
spool = Spool(tmp / "spool")
if kind == "worker":
    import empath.daemon.worker  # noqa: F401
    from empath.smtp.server import Front
    keep = Front(cfg, spool)
else:
    import empath.daemon.supervisor  # noqa: F401
    from empath.queue import QueueManager
    from empath.spool.ids import new_message_id
    keep = QueueManager(cfg, spool)
    ids = [new_message_id() for _ in range(queued)]
    found = {id: ("pending", 1.0e9 + i, 4096, (("example.com", "pending"),), 0.0)
             for i, id in enumerate(ids)}
    keep.load(ids, found)

def times():
    out = []
    for _ in range(passes):
        t = time.perf_counter()
        gc.collect()
        out.append((time.perf_counter() - t) * 1000)
    return out

gc.collect()
result = {"tracked": len(gc.get_objects()), "before": times()}
heap.freeze()
result["tracked_frozen"] = len(gc.get_objects())
result["after"] = times()
shutil.rmtree(tmp)
print(json.dumps(result))
"""


def measure(kind: str, queued: int, passes: int) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p))
    out = subprocess.run([sys.executable, "-c", _CHILD, kind, str(queued), str(passes)],
                         check=True, capture_output=True, text=True, env=env,
                         cwd=tempfile.gettempdir())
    result: dict[str, object] = json.loads(out.stdout)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queued", type=int, default=100_000,
                    help="messages in the supervisor's queue")
    ap.add_argument("--passes", type=int, default=20, help="collections per measurement")
    a = ap.parse_args()
    print(f"{'process':<28} {'tracked':>9} {'best ms':>8} {'median ms':>9}   "
          f"{'frozen: tracked':>15} {'best ms':>8} {'median ms':>9}")
    for kind, label in (("worker", "worker (started)"),
                        ("supervisor", f"supervisor, {a.queued:,} queued")):
        r = measure(kind, a.queued, a.passes)
        before, after = r["before"], r["after"]
        assert isinstance(before, list) and isinstance(after, list)
        print(f"{label:<28} {r['tracked']:>9,} {min(before):>8.2f} "
              f"{statistics.median(before):>9.2f}   {r['tracked_frozen']:>15,} "
              f"{min(after):>8.2f} {statistics.median(after):>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
