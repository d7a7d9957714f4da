"""What the benches share: medians with their spread, a plain text table, the
arguments every bench takes, alternating rounds, and running empath on uvloop.

uvloop without changing empath: ``empath run`` calls ``asyncio.run`` in the
supervisor and in every worker (a separate ``python -m empath.daemon.worker``
process). A ``sitecustomize.py`` on ``PYTHONPATH`` is imported by every Python
process at start-up, workers included (the supervisor passes its environment on),
and installs uvloop's event loop policy when ``EMPATH_UVLOOP=1``; ``asyncio.run``
on 3.11 takes its loop from the policy. ``uvloop_cmd`` prefixes the empath command
with ``env EMPATH_UVLOOP=1 PYTHONPATH=<shim>:<uvloop site>:<repo>``, so the existing
launchers (accept.py, relay.py, queue_ops.py) run it unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accept

REPO = accept.REPO
MIB = accept.MIB
KIB = 1024

SITECUSTOMIZE = '''\
# Written by bench/common.py: empath's processes run on uvloop when EMPATH_UVLOOP=1.
import os

if os.environ.get("EMPATH_UVLOOP") == "1":
    import uvloop

    uvloop.install()
'''


@dataclass(frozen=True, slots=True)
class Spread:
    """The median of some runs with their minimum and maximum."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        vals = [float(v) for v in values if v is not None and not math.isnan(v)]
        if not vals:
            return None
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def text(self, spec: str = ".1f") -> str:
        if self.n == 1:
            return format(self.median, spec)
        return f"{self.median:{spec}} ({self.low:{spec}}-{self.high:{spec}})"

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Spread | None:
        if not d:
            return None
        return cls(float(d["median"]), float(d["min"]), float(d["max"]), int(d["n"]))


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *,
          right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell; ``right`` holds right-aligned column indexes."""
    right_cols = set(right)
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(widths[i]) if i in right_cols else c.ljust(widths[i])
               for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def round_order(targets: Sequence[Any], rnd: int) -> list[Any]:
    """Round-robin, reversed every other round, so a drift in the machine's load
    falls on every target alike."""
    return list(targets) if rnd % 2 else list(reversed(targets))


def alternate_rounds(targets: Sequence[accept.Target], rounds: int,
                     postfix: accept.PostfixInstance | None,
                     each: Callable[[accept.Target, int], None]) -> bool:
    """Start the private Postfix (unless None), call ``each(target, round)`` for every
    target of every round in ``round_order``, stop Postfix. False, the failure logged,
    if a BenchError ended the rounds early."""
    try:
        if postfix is not None:
            postfix.start()
        for rnd in range(1, rounds + 1):
            for target in round_order(targets, rnd):
                each(target, rnd)
    except accept.BenchError as exc:
        accept.log(f"FAILED: {exc}")
        return False
    finally:
        if postfix is not None:
            postfix.stop()  # nothing to do if it never started
    return True


def stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def default_json(prefix: str) -> Path:
    return REPO / "bench" / "results" / f"{prefix}-{stamp()}.json"


def add_common_arguments(ap: argparse.ArgumentParser, json_prefix: str) -> None:
    """--empath-cmd, --tmpdir, --keep-tmp and --json, as every bench spells them."""
    ap.add_argument("--empath-cmd", default=None,
                    help="command to start empath; '{config}' is replaced by the config "
                         "path, otherwise 'run --config FILE' is appended")
    ap.add_argument("--tmpdir", default=None,
                    help="where spools go (default: $TMPDIR or /tmp): the disk measured")
    ap.add_argument("--keep-tmp", action="store_true", help="keep spools, configs and logs")
    ap.add_argument("--json", type=Path, default=None,
                    help=f"result file (default bench/results/{json_prefix}-<timestamp>.json)")


def empath_python(empath_cmd: str) -> str:
    """The interpreter that runs empath: the venv's (a console script's shebang), or
    the first word of a ``python -m empath...`` command."""
    words = shlex.split(empath_cmd)
    for word in words:
        if "{config}" in word:
            break
        path = Path(word)
        if path.name.startswith("python"):
            return word
        if path.is_file():
            with contextlib.suppress(OSError, UnicodeDecodeError), open(path, "rb") as f:
                first = f.readline().decode()
                if first.startswith("#!") and "python" in first:
                    return first[2:].strip().split()[0]
    return sys.executable


def uvloop_available(python: str, site: Path | None) -> str | None:
    """uvloop's version if ``python`` can import it (with ``site`` on its path)."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    proc = subprocess.run([python, "-c", "import uvloop; print(uvloop.__version__)"],
                          capture_output=True, text=True, env=env, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def uvloop_shim(directory: Path) -> Path:
    """A directory holding the sitecustomize.py that installs uvloop (see module doc)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return directory


def uvloop_cmd(empath_cmd: str, shim: Path, site: Path | None) -> str:
    """``empath_cmd`` run with EMPATH_UVLOOP=1 and the shim first on PYTHONPATH.
    Absolute paths: empath runs in its own directory, where a relative entry would
    name nothing (and the bench's check that uvloop is loaded would fail the round)."""
    parts = [str(shim.resolve()), str(site.resolve()) if site else "", str(REPO),
             os.environ.get("PYTHONPATH", "")]
    path = os.pathsep.join(p for p in parts if p)
    return f"env EMPATH_UVLOOP=1 PYTHONPATH={shlex.quote(path)} {empath_cmd}"


def uvloop_loaded(root_pid: int) -> dict[int, bool]:
    """For each process of the tree: whether uvloop's extension is mapped into it."""
    out: dict[int, bool] = {}
    for pid in accept.process_tree(root_pid):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        out[pid] = "uvloop/loop." in maps
    return out


def loadavg_text(load: Sequence[float]) -> str:
    return " ".join(f"{x:.2f}" for x in load) if load else "?"
