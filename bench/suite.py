#!/usr/bin/env python3
"""The whole benchmark of issue 11 in one command: one table, one JSON file.

- **accept**: durable accept rate (smtp-source, 20 sessions, 10,000 x 4 KB, a new
  connection per message) for Postfix and empath with 1, 2 and 4 workers, rounds
  alternating between the targets; the end-of-DATA -> ``250`` latency pass (p50/p99)
  after every round; peak RSS and CPU per message (bench/accept.py does the work).
- **relay**: end-to-end relay rate, smtp-source -> server -> smtp-sink, for Postfix
  and empath (bench/relay.py).
- **recovery**: a spool of 100,000 messages; exec -> ``READY=1`` and
  ``empathctl queue stats`` on it, alternating runs (bench/queue_ops.py).
- **memory**: 20 concurrent 25 MB messages, 1,000 idle sessions, 10,000 queued
  (bench/memory.py).

Every empath measurement runs on asyncio's own loop and, if uvloop can be imported
(``--uvloop``), on uvloop too, interleaved with the others (bench/common.py says how
uvloop is switched on without changing empath). Rates are medians of the rounds with
their min-max spread; ``vs postfix`` is median / Postfix's median from the same run.
``--compare PREVIOUS.json`` adds the change against an earlier run of this command.

Usage::

    sudo .venv/bin/python bench/suite.py                  # everything, 20-40 min on 2 cores
    sudo .venv/bin/python bench/suite.py --quick          # smoke run, ~3 min
    sudo .venv/bin/python bench/suite.py --compare bench/results/suite-OLD.json

Needs root for the Postfix instance and smtp-sink (``--skip-postfix`` to go without).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accept
import common
import memory
import queue_ops
import relay
from accept import MIB, BenchError, log
from common import Spread, round_order

SECTIONS = ("accept", "relay", "recovery", "memory")
UVLOOP_SITE = common.REPO / "bench" / "results" / "uvloop-site"
ACCEPT_AIM = 1.5  # x Postfix
RELAY_AIM = 1.0
READY_AIM = 10.0  # seconds, 100,000 messages
STATS_AIM = 1.0  # seconds


# ------------------------------------------------------------------------- parameters


@dataclass
class Params:
    sections: list[str]
    messages: int
    sessions: int
    size: int
    workers: list[int]
    relay_messages: int
    relay_workers: list[int]
    rounds: int
    latency_messages: int
    latency_connections: int
    recovery_messages: int
    recovery_rounds: int
    big: int
    big_size: int
    idle_sessions: int
    queued: int
    uvloop: str  # auto | install | off
    uvloop_site: str | None
    skip_postfix: bool
    quick: bool
    empath_cmd: str
    tmpdir: str | None
    keep_tmp: bool


@dataclass(frozen=True)
class Variant:
    """empath on one event loop: the command that starts it and the label suffix."""

    name: str  # "asyncio" | "uvloop"
    cmd: str

    @property
    def suffix(self) -> str:
        return " uvloop" if self.name == "uvloop" else ""


# ---------------------------------------------------------------------------- targets


def _require_uvloop(pid: int, label: str) -> None:
    loaded = common.uvloop_loaded(pid)
    missing = [p for p, ok in loaded.items() if not ok]
    if not loaded or missing:
        raise BenchError(f"{label}: uvloop is not loaded in process(es) {missing or [pid]}")


class _UvloopCheck:
    """After start: every process of a uvloop target must have uvloop mapped, or the
    'uvloop' figures would silently be asyncio's."""

    uvloop = False
    label: str

    def begin(self) -> int:
        pid: int = super().begin()  # type: ignore[misc]
        if self.uvloop:
            try:
                _require_uvloop(pid, self.label)
            except BenchError:
                self.kill()  # type: ignore[attr-defined]
                raise
        return pid


class AcceptEmpath(_UvloopCheck, accept.EmpathTarget):
    pass


class RelayEmpath(_UvloopCheck, relay.RelayEmpath):
    pass


def _variant_base(base: Path, v: Variant) -> Path:
    d = base / v.name
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    return d


# ----------------------------------------------------------------------------- accept


def run_accept(p: Params, tmp: Path, variants: Sequence[Variant]) -> dict[str, Any]:
    ap = accept.Params(p.messages, p.sessions, p.size, p.workers, p.rounds,
                       p.latency_messages, p.latency_connections, p.empath_cmd, False,
                       p.skip_postfix, p.tmpdir, p.keep_tmp)
    base = tmp / "accept"
    base.mkdir()
    base.chmod(0o755)
    postfix = accept.PostfixInstance(base)
    targets: list[Any] = [] if p.skip_postfix else [postfix]
    for v in variants:
        for w in p.workers:
            t = AcceptEmpath(_variant_base(base, v), v.cmd, w, standin=False)
            t.label += v.suffix
            t.uvloop = v.name == "uvloop"
            targets.append(t)
    rounds: dict[str, list[accept.ThroughputRound]] = {t.label: [] for t in targets}
    latency: dict[str, list[accept.LatencyPass]] = {t.label: [] for t in targets}
    fatal = None
    try:
        if not p.skip_postfix:
            postfix.start()
        for rnd in range(1, p.rounds + 1):
            for t in round_order(targets, rnd):
                rounds[t.label].append(accept.throughput_round(t, ap, rnd))
            if p.latency_messages:
                for t in round_order(targets, rnd):
                    latency[t.label].append(accept.latency_pass(t, ap))
    except BenchError as exc:
        fatal = str(exc)
        log(f"accept: FATAL: {exc}")
    finally:
        for t in targets:
            if isinstance(t, accept.EmpathTarget):
                t.kill()
        postfix.stop()
    summaries = [accept.summarise(label, rs, p.messages) for label, rs in rounds.items()]
    return {"fatal": fatal, "summary": [asdict(s) for s in summaries],
            "rounds": [asdict(r) for rs in rounds.values() for r in rs],
            "latency": {k: [asdict(x) for x in v] for k, v in latency.items()}}


# ------------------------------------------------------------------------------ relay


def run_relay(p: Params, tmp: Path, variants: Sequence[Variant]) -> dict[str, Any]:
    rp = relay.Params(p.relay_messages, p.sessions, p.size, p.relay_workers, p.rounds, 60.0,
                      False, p.empath_cmd, p.skip_postfix, False, p.tmpdir, p.keep_tmp)
    base = tmp / "relay"
    base.mkdir()
    base.chmod(0o755)
    sink = relay.Sink(base, dump=False)
    postfix = relay.RelayPostfix(base, sink)
    targets: list[Any] = [] if p.skip_postfix else [postfix]
    empaths: list[RelayEmpath] = []
    for v in variants:
        for w in p.relay_workers:
            t = RelayEmpath(_variant_base(base, v), v.cmd, w)
            t.label += v.suffix
            t.uvloop = v.name == "uvloop"
            empaths.append(t)
    targets += empaths
    rounds: dict[str, list[relay.RelayRound]] = {t.label: [] for t in targets}
    fatal = None
    try:
        if not p.skip_postfix:
            postfix.start()
        for rnd in range(1, p.rounds + 1):
            for t in round_order(targets, rnd):
                r = relay.relay_round(t, sink, rp, rnd)
                rounds[t.label].append(r)
                if r.error and isinstance(t, RelayEmpath):
                    log(f"{t.label} log tail:\n{accept._tail(t.log_file)}")
    except BenchError as exc:
        fatal = str(exc)
        log(f"relay: FATAL: {exc}")
    finally:
        for e in empaths:
            e.kill()
        sink.stop()
        postfix.stop()
    summaries = [relay.summarise(label, rs, p.relay_messages) for label, rs in rounds.items()]
    return {"fatal": fatal, "summary": [asdict(s) for s in summaries],
            "rounds": [asdict(r) for rs in rounds.values() for r in rs]}


# --------------------------------------------------------------------------- recovery


@dataclass
class RecoveryRun:
    variant: str
    round: int
    ready_seconds: float | None = None
    recovering_at: float | None = None
    startup_peak_rss: int | None = None
    startup_peak_pss: int | None = None
    stats_seconds: float | None = None
    stats_messages: int | None = None
    exit_status: int | None = None
    error: str | None = None


def _stats_messages(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return int(json.loads(path.read_text())["messages"])
    return None


def run_recovery(p: Params, tmp: Path, variants: Sequence[Variant]) -> dict[str, Any]:
    base = tmp / "recovery"
    base.mkdir()
    state = base / "state"
    state.mkdir(mode=0o750)
    qp = queue_ops.Params(
        messages=p.recovery_messages, recipients=1, domains=1000, history=0, size=256,
        workers=2, repeat=1, cold=False, ctl_timeout=600.0, empath_cmd=p.empath_cmd,
        ctl_cmd=queue_ops.default_ctl_cmd(), tmpdir=tmp, keep_tmp=p.keep_tmp)
    log(f"recovery: building a spool of {p.recovery_messages} messages ...")
    built = queue_ops.build_spool(state / "spool", qp)
    log(f"recovery: built in {built.seconds:.1f}s")
    runs: list[RecoveryRun] = []
    for rnd in range(1, p.recovery_rounds + 1):
        for v in round_order(variants, rnd):
            r = RecoveryRun(v.name, rnd)
            runs.append(r)
            run_dir = base / f"{v.name}-{rnd}"
            run_dir.mkdir()
            d = queue_ops.Daemon(run_dir, state, dataclasses.replace(qp, empath_cmd=v.cmd))
            try:
                pid = d.spawn()
                # PSS every 3rd sample (0.3 s): the recovery processes live a few
                # seconds, and their copy-on-write pages shared with the supervisor
                # are what summed RSS counts several times over.
                with accept.TreeSampler(pid, pss_every=3) as s:
                    r.ready_seconds = d.wait_ready()
                r.startup_peak_rss, r.startup_peak_pss = s.peak_rss, s.peak_pss
                r.recovering_at = next((t for t, x in d.events if "recovering" in x), None)
                if v.name == "uvloop":
                    _require_uvloop(pid, "recovery uvloop")
                c = queue_ops.ctl_run(d, qp, ["--json", "queue", "stats"], run_dir / "stats.out")
                if c.exit_status != 0:
                    raise BenchError(f"empathctl queue stats exited {c.exit_status}: {c.stderr}")
                r.stats_seconds = c.seconds
                r.stats_messages = _stats_messages(run_dir / "stats.out")
                if r.stats_messages != p.recovery_messages:
                    raise BenchError(f"queue stats counts {r.stats_messages} messages, "
                                     f"{p.recovery_messages} in the spool")
                r.exit_status, _ = d.stop()
                if r.exit_status != 0:
                    raise BenchError(f"empath exited {r.exit_status} after SIGTERM")
            except BenchError as exc:
                r.error = str(exc)
                log(f"recovery {v.name} round {rnd}: FAILED: {exc}\n{accept._tail(d.log_file)}")
            finally:
                d.close()
            if r.error is None:
                log(f"recovery {v.name:<8} round {rnd}: READY=1 after {r.ready_seconds:.2f}s, "
                    f"queue stats {r.stats_seconds:.2f}s")
    queued = sum(1 for _ in (state / "spool" / "queue").glob("*.msg"))
    quarantined = sum(1 for _ in (state / "spool" / "quarantine").iterdir())
    return {"messages": p.recovery_messages, "built_seconds": built.seconds,
            "envelope_bytes": built.env_bytes, "runs": [asdict(r) for r in runs],
            "queued_after": queued, "quarantined_after": quarantined}


# ----------------------------------------------------------------------------- memory


def run_memory(p: Params, tmp: Path, variants: Sequence[Variant]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    deliver = not p.skip_postfix and os.geteuid() == 0
    for v in variants:
        mp = memory.Params(p.big, p.big_size, p.idle_sessions, p.queued, 2, deliver,
                           list(memory.SECTIONS), v.cmd, p.tmpdir, p.keep_tmp)
        base = tmp / f"memory-{v.name}"
        base.mkdir()
        base.chmod(0o755)
        out[v.name] = [asdict(o) for o in memory.run(mp, base)]
    return out


# ------------------------------------------------------------------------------ table


@dataclass
class Row:
    key: str  # stable across runs, for --compare
    label: str
    empath: Spread | None = None
    uvloop: Spread | None = None
    postfix: Spread | None = None
    spec: str = ".1f"
    ratio: bool = False  # show empath / postfix
    aim: str = ""
    met: bool | None = None
    met_uvloop: bool | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("empath", "uvloop", "postfix")}
        for k in ("empath", "uvloop", "postfix"):
            s = getattr(self, k)
            d[k] = s.to_dict() if s else None
        return d


def _ratio(a: Spread | None, b: Spread | None) -> float | None:
    return a.median / b.median if a and b and b.median else None


def _spread_rates(rounds: list[dict[str, Any]], label: str, key: str = "rate") -> Spread | None:
    return Spread.of(r[key] for r in rounds if r["target"] == label and r.get("error") is None
                     and r.get(key) is not None)


def accept_rows(res: dict[str, Any], p: Params) -> list[Row]:
    rows: list[Row] = []
    rounds = res["rounds"]
    lat = res["latency"]
    pf = _spread_rates(rounds, "postfix")

    def lat_spread(label: str, key: str) -> Spread | None:
        return Spread.of(x[key] for x in lat.get(label, []) if x.get("error") is None)

    def peak(label: str) -> Spread | None:
        return Spread.of((r["peak_rss_bytes"] or 0) / MIB for r in rounds
                         if r["target"] == label and r.get("error") is None)

    def cpu(label: str) -> Spread | None:
        return Spread.of((r["cpu_seconds"] or 0) * 1000 / r["messages"] for r in rounds
                         if r["target"] == label and r.get("error") is None)

    for w in p.workers:
        e, u = f"empath w={w}", f"empath w={w} uvloop"
        row = Row(f"accept.w{w}.rate", f"accept msg/s, w={w}", _spread_rates(rounds, e),
                  _spread_rates(rounds, u), pf, ratio=True, aim=f">= {ACCEPT_AIM}x postfix")
        row.met = _aim_ratio(row.empath, pf, ACCEPT_AIM)
        row.met_uvloop = _aim_ratio(row.uvloop, pf, ACCEPT_AIM)
        rows.append(row)
    for w in p.workers:
        e, u = f"empath w={w}", f"empath w={w} uvloop"
        for q in ("p50", "p99"):
            rows.append(Row(f"accept.w{w}.latency_{q}", f"latency {q} ms '.'->250, w={w}",
                            lat_spread(e, f"{q}_ms"), lat_spread(u, f"{q}_ms"),
                            lat_spread("postfix", f"{q}_ms"), spec=".2f"))
    for w in p.workers:
        e, u = f"empath w={w}", f"empath w={w} uvloop"
        rows.append(Row(f"accept.w{w}.peak_rss", f"accept peak RSS MiB, w={w}", peak(e),
                        peak(u), peak("postfix"), note="summed over the process tree"))
        rows.append(Row(f"accept.w{w}.cpu", f"accept CPU ms/msg, w={w}", cpu(e), cpu(u),
                        cpu("postfix"), spec=".2f"))
    return rows


def _aim_ratio(s: Spread | None, base: Spread | None, aim: float) -> bool | None:
    r = _ratio(s, base)
    return None if r is None else r >= aim


def relay_rows(res: dict[str, Any], p: Params) -> list[Row]:
    rows: list[Row] = []
    rounds = res["rounds"]
    pf = _spread_rates(rounds, "postfix")

    def ok(label: str) -> list[dict[str, Any]]:
        return [r for r in rounds if r["target"] == label and r.get("error") is None]

    for w in p.relay_workers:
        e, u = f"empath w={w}", f"empath w={w} uvloop"

        def per_target(value: Callable[[dict[str, Any]], float], e: str = e, u: str = u
                       ) -> tuple[Spread | None, Spread | None, Spread | None]:
            """One spread per column (empath, uvloop, postfix) of ``value`` of each
            successful round."""
            e_, u_, p_ = (Spread.of(value(r) for r in ok(x)) for x in (e, u, "postfix"))
            return e_, u_, p_

        row = Row(f"relay.w{w}.rate", f"relay msg/s, w={w}", _spread_rates(rounds, e),
                  _spread_rates(rounds, u), pf, ratio=True, aim=f">= {RELAY_AIM}x postfix")
        row.met = _aim_ratio(row.empath, pf, RELAY_AIM)
        row.met_uvloop = _aim_ratio(row.uvloop, pf, RELAY_AIM)
        rows.append(row)
        rows.append(Row(f"relay.w{w}.peak_rss", f"relay peak RSS MiB, w={w}",
                        *per_target(lambda r: (r["peak_rss_bytes"] or 0) / MIB)))
        rows.append(Row(f"relay.w{w}.cpu", f"relay CPU ms/msg, w={w}",
                        *per_target(lambda r: (r["cpu_seconds"] or 0) * 1000 / r["messages"]),
                        spec=".2f"))
        rows.append(Row(f"relay.w{w}.out_conns", f"relay connections to the sink, w={w}",
                        *per_target(lambda r: r["sink_sessions"]), spec=".0f"))
    return rows


def recovery_rows(res: dict[str, Any], p: Params) -> list[Row]:
    n = res["messages"]
    runs = [r for r in res["runs"] if r.get("error") is None]

    def sp(variant: str, key: str, scale: float = 1.0) -> Spread | None:
        return Spread.of((r[key] or 0) / scale for r in runs if r["variant"] == variant)

    ready = Row("recovery.ready", f"start -> READY=1 s, {n:,} queued",
                sp("asyncio", "ready_seconds"), sp("uvloop", "ready_seconds"), spec=".2f",
                aim=f"< {READY_AIM:g} s")
    stats = Row("recovery.queue_stats", f"empathctl queue stats s, {n:,} queued",
                sp("asyncio", "stats_seconds"), sp("uvloop", "stats_seconds"), spec=".2f",
                aim=f"< {STATS_AIM:g} s", note="wall time, Python start-up of empathctl included")
    peak = Row("recovery.peak_rss", f"start-up peak RSS MiB, {n:,} queued",
               sp("asyncio", "startup_peak_rss", MIB), sp("uvloop", "startup_peak_rss", MIB),
               note="counts pages shared by the recovery processes once per process")
    pss = Row("recovery.peak_pss", f"start-up peak PSS MiB, {n:,} queued",
              sp("asyncio", "startup_peak_pss", MIB), sp("uvloop", "startup_peak_pss", MIB),
              note="sampled every 0.3 s: shared pages split between processes")
    for row, aim in ((ready, READY_AIM), (stats, STATS_AIM)):
        row.met = None if row.empath is None else row.empath.median < aim
        row.met_uvloop = None if row.uvloop is None else row.uvloop.median < aim
    if res["quarantined_after"] or res["queued_after"] != n:
        ready.note = (f"SPOOL CHANGED: {res['queued_after']} queued, "
                      f"{res['quarantined_after']} quarantined")
    return [ready, stats, peak, pss]


def memory_rows(res: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    by_variant = {v: {o["name"]: o for o in outs} for v, outs in res.items()}
    for name in memory.SECTIONS:
        outs = {v: d.get(name) for v, d in by_variant.items()}
        first = next((o for o in outs.values() if o), None)
        if first is None:
            continue
        scale, unit = (memory.KB, "KB") if name == "sessions" else (memory.MB, "MB")

        def value(o: dict[str, Any] | None, scale: float = scale) -> Spread | None:
            if not o or o.get("error") or o.get("figure") is None:
                return None
            return Spread.of([o["figure"] / scale])

        det = first["detail"]
        if name == "big":
            label = f"memory growth {unit}, {det['messages']} x {det['size'] / memory.MB:g} MB"
        elif name == "sessions":
            label = f"memory per idle session {unit}, {det['sessions']} open"
        else:
            label = f"scheduler memory {unit}, {det['messages']:,} queued"
        a, u = outs.get("asyncio"), outs.get("uvloop")
        err = next((o["error"] for o in outs.values() if o and o.get("error")), None)
        rows.append(Row(f"memory.{name}", label, value(a), value(u), aim=memory.AIMS[name][2],
                        met=a.get("met") if a else None, met_uvloop=u.get("met") if u else None,
                        note=f"FAILED: {err}" if err else ""))
    return rows


def _verdict(row: Row) -> str:
    def one(m: bool | None) -> str:
        return "-" if m is None else ("yes" if m else "NO")

    if not row.aim:
        return ""
    text = one(row.met)
    if row.uvloop is not None:
        text += f" (uvloop {one(row.met_uvloop)})"
    return text


def render_rows(rows: Sequence[Row], uvloop: bool, postfix: bool) -> str:
    header = ["measure", "empath"]
    if uvloop:
        header.append("empath uvloop")
    if postfix:
        header += ["postfix", "vs postfix"]
    header += ["aim", "met", "note"]
    body = []
    for r in rows:
        cells = [r.label, r.empath.text(r.spec) if r.empath else "-"]
        if uvloop:
            cells.append(r.uvloop.text(r.spec) if r.uvloop else "-")
        if postfix:
            cells.append(r.postfix.text(r.spec) if r.postfix else "-")
            ratios = []
            if r.ratio:
                for s in (r.empath, r.uvloop) if uvloop else (r.empath,):
                    x = _ratio(s, r.postfix)
                    ratios.append("-" if x is None else f"{x:.2f}x")
            cells.append(" / ".join(ratios))
        cells += [r.aim, _verdict(r), r.note]
        body.append(cells)
    right = {1, 2, 3, 4} if uvloop and postfix else {1, 2, 3}
    return common.table(header, body, right=right)


def render_compare(rows: Sequence[Row], previous: dict[str, Any],
                   now_params: dict[str, Any]) -> str:
    """One line per measure in both runs: each column's median then -> now (change)."""
    old = {r["key"]: r for r in previous.get("rows", [])}
    cols = [c for c in ("empath", "uvloop", "postfix")
            if any(getattr(r, c) is not None for r in rows)]
    body: list[list[str]] = []
    for r in rows:
        o = old.get(r.key)
        if o is None:
            continue
        cells = [r.label]
        for col in cols:
            now, then = getattr(r, col), Spread.from_dict(o.get(col))
            if now is None or then is None:
                cells.append("-")
                continue
            delta = (now.median - then.median) / then.median * 100 if then.median else 0.0
            cells.append(f"{then.median:{r.spec}} -> {now.median:{r.spec}} ({delta:+.0f}%)")
        ratio = ""
        if r.ratio:
            then_r = _ratio(Spread.from_dict(o.get("empath")), Spread.from_dict(o.get("postfix")))
            now_r = _ratio(r.empath, r.postfix)
            if then_r is not None and now_r is not None:
                ratio = f"{then_r:.2f}x -> {now_r:.2f}x"
        body.append([*cells, ratio])
    if not body:
        return "compare: no measure in common with the previous run"
    names = {"empath": "empath", "uvloop": "empath uvloop", "postfix": "postfix"}
    out = common.table(["measure", *(names[c] for c in cols), "vs postfix"], body,
                       right=set(range(1, len(cols) + 2)))
    loads = ("messages", "size", "sessions", "workers", "relay_messages", "recovery_messages",
             "big", "big_size", "idle_sessions", "queued", "rounds")
    then_p = previous.get("params", {})
    differ = [k for k in loads if k in then_p and then_p[k] != now_params.get(k)]
    if differ:
        out += ("\nNOTE: the runs used different loads (" + ", ".join(
            f"{k} {then_p[k]} -> {now_params.get(k)}" for k in differ) + "): not comparable")
    return out


# ------------------------------------------------------------------------------- main


def resolve_uvloop(p: Params) -> tuple[str | None, Path | None]:
    """uvloop's version and the directory to put on PYTHONPATH for it (None: the
    empath Python has it already), or (None, None) when it is not used."""
    if p.uvloop == "off":
        return None, None
    python = common.empath_python(p.empath_cmd)
    site = Path(p.uvloop_site) if p.uvloop_site else None
    version = common.uvloop_available(python, None)
    if version:
        return version, None
    for candidate in filter(None, [site, UVLOOP_SITE]):
        version = common.uvloop_available(python, candidate)
        if version:
            return version, candidate
    if p.uvloop == "install":
        target = site or UVLOOP_SITE
        log(f"uvloop: {python} -m pip install --target {target} uvloop")
        proc = subprocess.run([python, "-m", "pip", "install", "-q", "--target", str(target),
                               "uvloop"], check=False)
        if proc.returncode == 0:
            version = common.uvloop_available(python, target)
            if version:
                return version, target
        log("uvloop: installation failed; measuring asyncio only")
        return None, None
    log(f"uvloop: not importable by {python}; measuring asyncio only (--uvloop install, or "
        f"'{python} -m pip install --target {UVLOOP_SITE} uvloop', adds it)")
    return None, None


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> tuple[Params, Path, Path | None]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, small loads, workers 2 (verdicts indicative)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"sections, comma separated ({', '.join(SECTIONS)})")
    ap.add_argument("--messages", type=int, help="accept: messages per round (10000)")
    ap.add_argument("--sessions", type=int, default=20, help="smtp-source sessions")
    ap.add_argument("--size", type=int, default=4096, help="payload bytes per message")
    ap.add_argument("--workers", help="accept: empath worker counts (1,2,4)")
    ap.add_argument("--relay-messages", type=int, help="relay: messages per round (10000)")
    ap.add_argument("--relay-workers", help="relay: empath worker counts (2)")
    ap.add_argument("--rounds", type=int, help="accept and relay rounds (3)")
    ap.add_argument("--latency-messages", type=int, help="latency pass per round (2000)")
    ap.add_argument("--latency-connections", type=int, default=20)
    ap.add_argument("--recovery-messages", type=int, help="recovery: spool size (100000)")
    ap.add_argument("--recovery-rounds", type=int, help="recovery: runs per variant (3)")
    ap.add_argument("--big", type=int, help="memory: concurrent big messages (20)")
    ap.add_argument("--big-size", type=int, default=25_000_000)
    ap.add_argument("--idle-sessions", type=int, help="memory: idle sessions (1000)")
    ap.add_argument("--queued", type=int, help="memory: queued messages (10000)")
    ap.add_argument("--uvloop", choices=("auto", "install", "off"), default="auto",
                    help="auto: also measure on uvloop if importable (by the empath Python, "
                         f"or from --uvloop-site / {UVLOOP_SITE}); install: pip-install it "
                         "there first if missing; off: asyncio only")
    ap.add_argument("--uvloop-site", default=None, help="a pip --target directory with uvloop")
    ap.add_argument("--skip-postfix", action="store_true", help="empath only (no root needed)")
    ap.add_argument("--compare", type=Path, default=None, help="an earlier suite JSON file")
    common.add_common_arguments(ap, "suite")
    a = ap.parse_args(argv)
    quick = a.quick

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    sections = [x.strip() for x in a.only.split(",") if x.strip()]
    if unknown := [x for x in sections if x not in SECTIONS]:
        ap.error(f"--only: unknown {unknown}")
    p = Params(
        sections=sections,
        messages=pick(a.messages, 10_000, 1000),
        sessions=a.sessions, size=a.size,
        workers=_ints(pick(a.workers, "1,2,4", "2")),
        relay_messages=pick(a.relay_messages, 10_000, 1000),
        relay_workers=_ints(pick(a.relay_workers, "2", "2")),
        rounds=pick(a.rounds, 3, 1),
        latency_messages=pick(a.latency_messages, 2000, 200),
        latency_connections=a.latency_connections,
        recovery_messages=pick(a.recovery_messages, 100_000, 5000),
        recovery_rounds=pick(a.recovery_rounds, 3, 1),
        big=pick(a.big, 20, 4), big_size=a.big_size,
        idle_sessions=pick(a.idle_sessions, 1000, 200),
        queued=pick(a.queued, 10_000, 2000),
        uvloop=a.uvloop, uvloop_site=a.uvloop_site, skip_postfix=a.skip_postfix, quick=quick,
        empath_cmd=a.empath_cmd or accept.default_empath_cmd(), tmpdir=a.tmpdir,
        keep_tmp=a.keep_tmp,
    )
    if not p.skip_postfix and os.geteuid() != 0 and {"accept", "relay"} & set(sections):
        ap.error("the Postfix side needs root (run with sudo, or --skip-postfix)")
    return p, a.json or common.default_json("suite"), a.compare


def main(argv: Sequence[str] | None = None) -> int:
    p, json_path, compare = parse_args(argv)
    previous = json.loads(compare.read_text()) if compare else None
    signal.signal(signal.SIGTERM, accept._raise_interrupt)
    signal.signal(signal.SIGHUP, accept._raise_interrupt)
    started = common.stamp()
    uv_version, uv_site = resolve_uvloop(p)
    meta: dict[str, Any] = {"benchmark": "suite", "started": started, "params": asdict(p),
                            "versions": relay.versions(), "uvloop": uv_version,
                            "load": {"start": accept.loadavg()}}
    results: dict[str, Any] = {}
    rows: list[Row] = []
    interrupted = False
    with accept.scratch_dir(p, "empath-suite-") as tmp:
        variants = [Variant("asyncio", p.empath_cmd)]
        if uv_version:
            shim = common.uvloop_shim(tmp / "uvloop-shim")
            variants.append(Variant("uvloop", common.uvloop_cmd(p.empath_cmd, shim, uv_site)))
        meta["machine"] = accept.machine_info(tmp)
        meta["variants"] = [asdict(v) for v in variants]

        def _keep(name: str, res: dict[str, Any]) -> dict[str, Any]:
            results[name] = res
            return res

        steps: list[tuple[str, Callable[[], list[Row]]]] = [
            ("accept", lambda: accept_rows(_keep("accept", run_accept(p, tmp, variants)), p)),
            ("relay", lambda: relay_rows(_keep("relay", run_relay(p, tmp, variants)), p)),
            ("recovery", lambda: recovery_rows(
                _keep("recovery", run_recovery(p, tmp, variants)), p)),
            ("memory", lambda: memory_rows(_keep("memory", run_memory(p, tmp, variants)))),
        ]

        for name, step in steps:
            if name not in p.sections:
                continue
            t0 = time.monotonic()
            log(f"== {name} (1-min load {accept.loadavg()[:1]}) ==")
            try:
                rows += step()
            except KeyboardInterrupt:
                interrupted = True
                log("interrupted; reporting what was measured")
                break
            except (BenchError, OSError) as exc:
                log(f"{name}: FAILED: {exc}")
                results[name] = {"fatal": str(exc)}
            meta["load"][name] = accept.loadavg()
            meta.setdefault("seconds", {})[name] = time.monotonic() - t0
    meta["finished"] = common.stamp()
    print(render(meta, rows, p, uv_version is not None))
    if previous is not None:
        print(f"\nchange against {compare} ({previous.get('started', '?')}):")
        print(render_compare(rows, previous, asdict(p)))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**meta, "interrupted": interrupted,
                                     "rows": [r.to_dict() for r in rows], **results},
                                    indent=2) + "\n")
    print(f"\nresults: {json_path}")
    failed = [n for n in p.sections if isinstance(results.get(n), dict)
              and results[n].get("fatal")]
    return 1 if interrupted or failed or any("FAILED" in r.note for r in rows) else 0


def render(meta: dict[str, Any], rows: Sequence[Row], p: Params, uvloop: bool) -> str:
    m, v = meta.get("machine", {}), meta["versions"]
    load = meta["load"]
    lines = [
        f"empath benchmark suite  {meta['started']} - {meta['finished']}",
        f"machine:  {m.get('nproc')} CPUs ({m.get('cpu_model')}), kernel {m.get('kernel')}, "
        f"spool fs {m.get('tmp_filesystem')}",
        f"versions: postfix {v['postfix']}, python {v['python']}, "
        f"uvloop {meta['uvloop'] or 'not used'}",
        f"empath:   {p.empath_cmd}",
        f"loads:    accept {p.messages} x {p.size} B, {p.sessions} sessions, workers "
        f"{p.workers}; relay {p.relay_messages}, workers {p.relay_workers}; {p.rounds} "
        f"round(s) alternating; recovery {p.recovery_messages:,} x {p.recovery_rounds}",
        "1-min load average: " + ", ".join(f"{k} {x[0]:.2f}" for k, x in load.items() if x)
        + "  (start, then after each section)",
    ]
    if p.quick:
        lines.append("QUICK RUN: loads are smaller than the aims are stated for; "
                     "verdicts are indicative only")
    lines += ["", render_rows(rows, uvloop, not p.skip_postfix), "",
              "cells: median (min-max) over rounds; 'vs postfix' = median / postfix median"
              + (" (empath / empath uvloop)" if uvloop else "")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
