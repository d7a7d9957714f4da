"""``empathctl``: talk to the running daemon over its control socket.

Human tables by default, ``--json`` for machines (the daemon's result, as is).
Exit status: 0 done; 1 the daemon said no (refused reload, unknown id, permission
denied by the daemon, …); 2 usage error; 3 the daemon cannot be reached.

The socket is, in this order: ``--socket``; ``$EMPATH_CONTROL_SOCKET``;
``control.socket`` from the configuration file (``--config``, ``$EMPATH_CONFIG``,
``/etc/empath/empath.yaml``) when it is readable and sets it; else the first that
exists of ``$RUNTIME_DIRECTORY/control.sock``, ``/run/empath/control.sock`` and
``<state_dir>/control.sock``; else ``/run/empath/control.sock``.

The configuration is read leniently (only those keys, no validation): after an
edit that breaks it, ``empathctl reload --wait`` must still reach the daemon to be
told the file is invalid.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from empath.control.paths import DEFAULT_SOCKET, SOCKET_NAME, runtime_directory
from empath.control.protocol import (
    MAX_RESPONSE,
    decode_response,
    encode_request,
)

__all__ = ["main"]

EX_OK = 0
EX_REFUSED = 1
EX_USAGE = 2
EX_UNREACHABLE = 3

DEFAULT_CONFIG = Path("/etc/empath/empath.yaml")
DEFAULT_TIMEOUT = 60.0
ADMIN_GROUP = "empath-admin"


class Unavailable(Exception):
    """The daemon cannot be reached or talked to (exit 3)."""


class Refused(Exception):
    """The daemon answered with an error (exit 1)."""

    def __init__(self, response: Mapping[str, Any]) -> None:
        super().__init__(str(response.get("error", "error")))
        self.response = response
        self.code = str(response.get("code", ""))


# ------------------------------------------------------------------ locating the daemon


def _lenient_config(path: Path) -> dict[str, Any]:
    """The few keys empathctl needs, or {} if the file is unreadable or broken."""
    try:
        import yaml

        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except Exception:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    control = data.get("control")
    if isinstance(control, dict):
        for key in ("socket", "token_file"):
            value = control.get(key)
            if isinstance(value, str) and value.startswith("/"):
                out[key] = Path(value)
    state_dir = data.get("state_dir")
    if isinstance(state_dir, str) and state_dir:
        out["state_dir"] = path.absolute().parent / state_dir  # absolute stays absolute
    return out


def _config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("EMPATH_CONFIG") or DEFAULT_CONFIG)


def socket_path(arg_socket: str | None, arg_config: str | None) -> Path:
    if arg_socket:
        return Path(arg_socket)
    env = os.environ.get("EMPATH_CONTROL_SOCKET")
    if env:
        return Path(env)
    cfg = _lenient_config(_config_path(arg_config))
    if "socket" in cfg:
        return Path(cfg["socket"])
    candidates: list[Path] = []
    runtime = runtime_directory()
    if runtime is not None:
        candidates.append(runtime / SOCKET_NAME)
    candidates.append(DEFAULT_SOCKET)
    if "state_dir" in cfg:
        candidates.append(Path(cfg["state_dir"]) / SOCKET_NAME)
    for c in candidates:
        with contextlib.suppress(OSError):
            if c.exists():
                return c
    return candidates[0]


def _token(arg_token_file: str | None, arg_config: str | None) -> str | None:
    if arg_token_file:
        try:
            return Path(arg_token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            _fail_usage(f"cannot read token file {arg_token_file}: {exc}")
    env = os.environ.get("EMPATH_CONTROL_TOKEN")
    if env:
        return env.strip()
    path = _lenient_config(_config_path(arg_config)).get("token_file")
    if path is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return Path(path).read_text(encoding="utf-8").strip() or None
    return None


def _fail_usage(message: str) -> NoReturn:
    print(f"empathctl: {message}", file=sys.stderr)
    sys.exit(EX_USAGE)


# ------------------------------------------------------------------ talking to it


class Client:
    def __init__(self, path: Path, token: str | None, timeout: float) -> None:
        self.path = path
        self.token = token
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fsdecode(self.path))
        except FileNotFoundError:
            sock.close()
            raise Unavailable(f"is empath running? no socket at {self.path}") from None
        except ConnectionRefusedError:
            sock.close()
            raise Unavailable(f"is empath running? nothing is listening on {self.path} "
                              "(a stale socket)") from None
        except PermissionError:
            sock.close()
            raise Unavailable(f"permission denied on {self.path}: you need to be root or "
                              f"in group {ADMIN_GROUP}") from None
        except TimeoutError:
            sock.close()
            raise Unavailable(f"connecting to {self.path} timed out") from None
        except OSError as exc:
            sock.close()
            if exc.errno == errno.ENOTSOCK or exc.errno == errno.ENOTDIR:
                raise Unavailable(f"{self.path} is not a socket") from None
            raise Unavailable(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        return sock

    def stream(self, cmd: str, args: Mapping[str, Any] | None = None) -> Iterator[Any]:
        """Send one request; yield each result (several for a streamed answer)."""
        sock = self._connect()
        try:
            try:
                sock.sendall(encode_request(cmd, args, self.token))
            except BrokenPipeError:
                pass  # the daemon may have answered and closed already: read that
            except OSError as exc:
                raise Unavailable(f"cannot send to the daemon: {exc.strerror or exc}") from None
            reader = sock.makefile("rb")
            streamed = False
            while True:
                try:
                    line = reader.readline(MAX_RESPONSE + 1)
                except TimeoutError:
                    raise Unavailable(f"the daemon did not answer within {self.timeout:g} s"
                                      ) from None
                except OSError as exc:
                    raise Unavailable(f"connection to the daemon failed: "
                                      f"{exc.strerror or exc}") from None
                if not line:
                    raise Unavailable("the daemon closed the connection without answering")
                if len(line) > MAX_RESPONSE:
                    raise Unavailable("the daemon's answer is too large")
                try:
                    response = decode_response(line.rstrip(b"\n"))
                except ValueError as exc:
                    raise Unavailable(str(exc)) from None
                if not response["ok"]:
                    raise Refused(response)
                if response.get("more") is True:
                    streamed = True
                    yield response.get("result")
                    continue
                if not streamed:  # else: the line that ends a stream, result null
                    yield response.get("result")
                return
        finally:
            sock.close()

    def call(self, cmd: str, args: Mapping[str, Any] | None = None) -> Any:
        for result in self.stream(cmd, args):
            return result
        return None


# ------------------------------------------------------------------ formatting


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{int(value)}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def until(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    return "now" if t <= now + 0.5 else "in " + duration(t - now)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], out: TextIO,
          indent: str = "") -> None:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r]
                                          for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        print(indent + line, file=out)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out.append((prefix, ", ".join(str(v) for v in value) or "-"))
    else:
        out.append((prefix, "-" if value is None else str(value)))


def print_mapping(value: Mapping[str, Any], out: TextIO) -> None:
    pairs: list[tuple[str, str]] = []
    _flatten("", value, pairs)
    width = max((len(k) for k, _ in pairs), default=0)
    for k, v in pairs:
        print(f"{k.ljust(width)}  {v}", file=out)


def _addr(a: str) -> str:
    return f"<{a}>"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t))


def _reload_text(r: Mapping[str, Any]) -> str:
    at = f" at {_clock(r['at'])}" if isinstance(r.get("at"), int | float) else ""
    gen = f" (generation {r['generation']})" if r.get("generation") else ""
    errors = "; ".join(str(e) for e in r.get("errors") or [])
    if r.get("ok"):
        changed = ", ".join(str(c) for c in r.get("changed") or []) or "nothing"
        return f"ok{at}{gen}, changed: {changed}"
    word = "FAILED (applied, but not everywhere)" if r.get("applied") else "REFUSED"
    return f"{word}{at}{gen}: {errors or 'no reason given'}"


def show_status(r: Mapping[str, Any], out: TextIO) -> None:
    v = dict(r)
    uptime = v.get("uptime")
    if isinstance(uptime, int | float):
        v["uptime"] = duration(uptime) + (f" ({uptime:.0f} s)" if uptime >= 60 else "")
    if isinstance(v.get("started_at"), int | float):
        v["started_at"] = _clock(v["started_at"])
    if isinstance(v.get("listeners"), list):
        v["listeners"] = [f"{x.get('address')} ({x.get('role')})" if isinstance(x, Mapping)
                          else str(x) for x in v["listeners"]]
    if isinstance(v.get("workers"), list):
        v["workers"] = [
            f"{w.get('index')} (pid {w.get('pid')}{'' if w.get('ready', True) else ', starting'})"
            if isinstance(w, Mapping) else str(w) for w in v["workers"]]
    if "last_reload" in v:
        lr = v["last_reload"]
        v["last_reload"] = _reload_text(lr) if isinstance(lr, Mapping) else "none since start"
    print_mapping(v, out)


# Column widths of ``queue list``: fixed, because it is printed as it streams in.
_LIST_WIDTHS = (26, 9, 6, 6, 9)


def _list_line(cells: Sequence[str]) -> str:
    head = "  ".join(c.ljust(w) for c, w in zip(cells, _LIST_WIDTHS, strict=False))
    return f"{head}  {cells[-1]}".rstrip()


class ListPrinter:
    """``queue list`` as a table, page by page while the daemon streams it."""

    def __init__(self, out: TextIO, *, limit: int | None = None, offset: int = 0) -> None:
        self.out = out
        self.limit = limit
        self.offset = offset
        self.count = 0
        self.total = 0

    def page(self, rows: Sequence[Mapping[str, Any]]) -> None:
        out = self.out
        if self.count == 0 and rows:
            print(_list_line(["ID", "STATE", "AGE", "SIZE", "NEXT", "SENDER / RECIPIENTS"]),
                  file=out)
        now = time.time()
        for m in rows:
            self.count += 1
            self.total += int(m.get("size") or 0)
            nxt = until(m.get("next_attempt"), now) if m["state"] != "held" else "held"
            print(_list_line([m["id"], m["state"], duration(m.get("age")), size(m.get("size")),
                              nxt, _addr(m["sender"])]), file=out)
            for r in m.get("recipients", []):
                extra = ""
                if r["state"] not in ("delivered", "bounced") and r.get("attempts"):
                    extra = f"attempts {r['attempts']}"
                if r.get("last_error") and r["state"] != "delivered":
                    extra = f"{extra}  {r['last_error']}".strip()
                print(_list_line(["  " + r["address"], r["state"], "", "", "", extra]),
                      file=out)

    def finish(self) -> None:
        if self.count == 0:
            text = (f"no messages after the first {self.offset}" if self.offset
                    else "queue is empty")
            print(text, file=self.out)
            return
        text = f"-- {self.count} message(s), {size(self.total)}"
        if self.limit is not None and self.count >= self.limit:
            text += (f" (--limit {self.limit}: there may be more; "
                     f"--offset {self.offset + self.count} shows the next)")
        print(text, file=self.out)


def show_list(rows: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    printer = ListPrinter(out)
    printer.page(rows)
    printer.finish()


def print_json_array(pages: Iterator[Any], out: TextIO) -> None:
    """The items of every page as one JSON array, printed as the pages arrive (the
    same text ``json.dumps(items, indent=2)`` gives)."""
    first = True
    for items in pages:
        for item in items or []:
            text = json.dumps(item, indent=2, ensure_ascii=True)
            out.write(("[\n" if first else ",\n") + textwrap.indent(text, "  "))
            first = False
    out.write("[]\n" if first else "\n]\n")


# An attempt's DNSSEC column: were its MX answers authenticated ("-": not MX routing).
_DNSSEC = {True: "yes", False: "no"}


def show_message(r: Mapping[str, Any], out: TextIO) -> None:
    m, env = r["message"], r["envelope"]
    now = time.time()
    received = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(env["received_at"]))
    pairs = [
        ("id", m["id"]),
        ("state", m["state"]),
        ("received", f"{received} ({duration(m['age'])} ago) from {env['client_addr']} "
                     f"[{env['helo']}]"),
        ("size", f"{env['size']} bytes"),
        ("sender", _addr(env["sender"])),
        ("held", "yes" if env["held"] else "no"),
        ("next attempt", until(m.get("next_attempt"), now) if not env["held"] else "held"),
    ]
    for key, label in (("tls", "tls"), ("authenticated", "authenticated"),
                       ("envid", "envid"), ("ret", "ret")):
        if env.get(key):
            pairs.append((label, str(env[key])))
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        print(f"{k.ljust(width)}  {v}", file=out)
    print("recipients:", file=out)
    rows = [[rc["address"], rc["state"], rc["attempts"],
             until(rc.get("next_attempt"), now) if rc["state"] == "deferred" else "",
             rc.get("last_error") or ""] for rc in env["recipients"]]
    table(rows, ["ADDRESS", "STATE", "ATTEMPTS", "NEXT", "LAST ERROR"], out, indent="  ")
    history = [[rc["address"],
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["at"])),
                h["status"], h["enhanced"], h.get("relay") or "-", h.get("tls") or "-",
                _DNSSEC.get(h.get("dnssec"), "-"), h["diagnostic"]]
               for rc in env["recipients"] for h in rc.get("history") or []]
    if history:
        print("attempts (last 10 per recipient):", file=out)
        table(history, ["ADDRESS", "AT", "RESULT", "STATUS", "RELAY", "TLS", "DNSSEC",
                        "DIAGNOSTIC"], out, indent="  ")
    print("headers:", file=out)
    for name, value in r["headers"]:
        print(f"  {name}: {value}" if name else f"  {value}", file=out)
    if r.get("headers_truncated"):
        print("  (header longer than shown)", file=out)


def _mode_note(mode: Any) -> str:
    if mode == "hold":
        return "\nnote: delivery.mode is hold: nothing is delivered until a reload to mx or relay"
    return ""


def show_retry(r: Mapping[str, Any], out: TextIO) -> None:
    if "id" in r:
        n = len(r["recipients"])
        print(f"{r['id']}: due now ({n} deferred recipient(s) included)", file=out)
        return
    text = f"{r['messages']} message(s) due now (held ones stay held)"
    if r.get("active"):
        text += f", {len(r['active'])} being delivered right now"
    print(text + _mode_note(r.get("mode")), file=out)


def show_hold(r: Mapping[str, Any], out: TextIO) -> None:
    if r["held"]:
        print(f"{r['id']}: held" if r["changed"] else f"{r['id']}: was already held", file=out)
    else:
        print(f"{r['id']}: released" if r["changed"] else f"{r['id']}: was not held",
              file=out)


def show_delete(r: Mapping[str, Any], out: TextIO) -> None:
    print(f"{r['id']}: deleted (from {_addr(r['sender'])}, {len(r['recipients'])} "
          "undelivered recipient(s)); no bounce was sent", file=out)


def show_stats(r: Mapping[str, Any], out: TextIO) -> None:
    states = r["by_state"]
    rc = r["recipients"]
    sched = r["scheduler"]
    since = r["since_start"]
    oldest = (f", oldest {duration(r['oldest_age'])} ({r['oldest_id']})"
              if r.get("oldest_id") else "")
    pairs = [
        ("messages", f"{r['messages']} ({size(r['size'])}){oldest}"),
        ("by state", ", ".join(f"{k} {v}" for k, v in states.items())),
        ("recipients", ", ".join(f"{k} {v}" for k, v in rc.items())),
        ("delivery", f"mode {r['mode']}, {sched['scheduled']} scheduled, "
                     f"{sched['active']} being delivered (max {sched['max_deliveries']})"),
        ("since start", f"{since['delivered']} delivered, {since['deferred']} deferred, "
                        f"{since['bounced']} bounced, {since['dsns']} DSNs"),
    ]
    if r.get("unreadable"):
        pairs.append(("unreadable", f"{r['unreadable']} envelope(s) could not be read"))
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        print(f"{k.ljust(width)}  {v}", file=out)
    if r["by_domain"]:
        print(file=out)
        table([[d["domain"], d["messages"], d["pending"], d["deferred"]]
               for d in r["by_domain"]], ["DOMAIN", "MESSAGES", "PENDING", "DEFERRED"], out)
        if r["domains"] > len(r["by_domain"]):
            print(f"({r['domains'] - len(r['by_domain'])} more domains)", file=out)


def show_dns(r: Mapping[str, Any], out: TextIO) -> None:
    if "cleared" in r:
        print(f"DNS cache cleared ({r['cleared']} entries)", file=out)
        return
    if not r["entries"]:
        print("DNS cache is empty", file=out)
        return
    table([[e["name"], e["type"], e["kind"], duration(e["expires_in"]),
            _DNSSEC.get(e.get("authenticated"), "-"), ", ".join(e["data"]) or "-"]
           for e in r["entries"]],
          ["NAME", "TYPE", "ANSWER", "EXPIRES", "DNSSEC", "DATA"], out)


def show_routes(r: Mapping[str, Any], out: TextIO) -> None:
    if r["routes"]:
        rows = []
        for e in r["routes"]:
            source = e["source"]
            if e.get("config_nexthop"):
                source += f" (config: {e['config_nexthop']})"
            rows.append([e["domain"], e["nexthop"], source])
        table(rows, ["DOMAIN", "NEXTHOP", "SOURCE"], out)
    else:
        print("no routes", file=out)
    mode = r["mode"]
    default = {"mx": "MX lookup", "relay": f"relayhost {r.get('relayhost')}",
               "hold": "none (mode hold: mail stays queued)"}.get(mode, mode)
    print(f"other domains: {default}", file=out)


def show_route_set(r: Mapping[str, Any], out: TextIO) -> None:
    text = f"{r['domain']}: next hop {r['nexthop']} (runtime override"
    if r.get("previous"):
        text += f", was {r['previous']}"
    elif r.get("config_nexthop"):
        text += f", instead of the config's {r['config_nexthop']}"
    print(text + "; lost at restart, kept across reloads)", file=out)


def show_route_unset(r: Mapping[str, Any], out: TextIO) -> None:
    now = r.get("config_nexthop") or "default routing"
    print(f"{r['domain']}: override {r['previous']} removed; now {now}", file=out)


def _printable(text: Any, width: int = 40) -> str:
    """Client-supplied text (a HELO name) made safe for a terminal, and cut short."""
    if text is None:
        return "-"
    clean = "".join(c if c.isprintable() else "?" for c in str(text))
    return clean if len(clean) <= width else clean[: width - 3] + "..."


def show_connections(r: Any, out: TextIO) -> None:
    rows = r.get("connections", []) if isinstance(r, Mapping) else list(r)
    workers = r.get("workers", []) if isinstance(r, Mapping) else []
    if rows:
        lines = []
        for c in rows:
            tls = (c.get("tls_version") or "yes") if c.get("tls") else "no"
            lines.append([c.get("peer") or f"{c.get('client')}:{c.get('port')}",
                          c.get("role"), c.get("state"), _printable(c.get("helo")), tls,
                          duration(c.get("duration")), c.get("worker")])
        table(lines, ["CLIENT", "ROLE", "STATE", "HELO", "TLS", "DURATION", "WORKER"], out)
        answered = sum(1 for w in workers if w.get("ok"))
        print(f"-- {len(rows)} connection(s)"
              + (f", from {answered} worker(s)" if workers else ""), file=out)
    else:
        print("no SMTP connections", file=out)
    for w in workers:
        if not w.get("ok"):
            print(f"empathctl: warning: worker {w.get('index')} (pid {w.get('pid')}) "
                  f"{w.get('error') or 'did not answer'}; its connections are not listed",
                  file=sys.stderr)


def show_reload(r: Mapping[str, Any], out: TextIO) -> None:
    if r.get("started"):
        print("reload started; its result is in the daemon's log (use --wait to see it here)",
              file=out)
        return
    print("configuration reloaded", file=out)
    if r.get("changed"):
        print("changed: " + ", ".join(r["changed"]), file=out)
    for key in r.get("restart_needed") or []:
        print(f"warning: {key} changed; it takes effect only after a restart", file=out)


def show_log_level(r: Mapping[str, Any], out: TextIO) -> None:
    print(f"log level is now {r['level']} (until the next reload or restart)", file=out)


# ------------------------------------------------------------------ commands


ID = "01M8RYKMRQGQT5S3V289QEJXPY"


def _add(sub: Any, name: str, text: str, *examples: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with examples."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=text, description=text[:1].upper() + text[1:] + ".", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def _whole(minimum: int) -> Any:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return n
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="empathctl", description="Control the running empath daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  empathctl status\n"
               "  empathctl queue list --status deferred\n"
               "  empathctl --json queue list --limit 100 | jq -r '.[].id'\n"
               "  empathctl --config /etc/empath/empath.yaml reload --wait\n\n"
               "exit status: 0 ok, 1 the daemon refused or failed, 2 usage, "
               "3 cannot reach the daemon",
    )
    p.add_argument("--socket", "-s", metavar="PATH",
                   help="control socket (default: $EMPATH_CONTROL_SOCKET, control.socket "
                        "from the config, /run/empath/control.sock)")
    p.add_argument("--config", "-c", metavar="PATH",
                   help="config file to find the socket in (default: $EMPATH_CONFIG, "
                        "else /etc/empath/empath.yaml)")
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    p.add_argument("--token-file", metavar="PATH",
                   help="file holding the control token (default: $EMPATH_CONTROL_TOKEN, "
                        "control.token_file from the config)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for the daemon (default {DEFAULT_TIMEOUT:g})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add(sub, "status", "daemon status: version, uptime, listeners, queue counters",
         "empathctl status", "empathctl --json status | jq .queue")

    q = _add(sub, "queue", "inspect and manage the queue",
             "empathctl queue list --status deferred", f"empathctl queue retry {ID}",
             "empathctl queue stats --watch")
    qs = q.add_subparsers(dest="queue_command", required=True, metavar="SUBCOMMAND")
    x = _add(qs, "list", "list queued messages (oldest first)",
             "empathctl queue list --status deferred --domain example.net",
             "empathctl queue list --limit 50 --offset 100",
             "empathctl --json queue list | jq -r '.[] | select(.state == \"held\") | .id'")
    x.add_argument("--status", choices=("pending", "deferred", "held", "active"),
                   help="only messages in this state")
    x.add_argument("--domain", help="only messages with a recipient still to deliver there")
    x.add_argument("--limit", type=_whole(1), metavar="N",
                   help="at most N messages (after --offset)")
    x.add_argument("--offset", type=_whole(0), default=0, metavar="N",
                   help="skip the first N matching messages")
    x = _add(qs, "show", "a message's envelope and headers (never the body)",
             f"empathctl queue show {ID}")
    x.add_argument("id")
    x = _add(qs, "retry", "make deferred recipients due now",
             f"empathctl queue retry {ID}", "empathctl queue retry --all")
    g = x.add_mutually_exclusive_group(required=True)
    g.add_argument("id", nargs="?")
    g.add_argument("--all", action="store_true", help="every message not held")
    for name, text in (("hold", "hold a message (not delivered until released)"),
                       ("release", "release a held message (tried at its own retry time; "
                                   "add `queue retry ID` to try it now)")):
        x = _add(qs, name, text, f"empathctl queue {name} {ID}")
        x.add_argument("id")
    x = _add(qs, "delete", "delete a message (no bounce is sent); asks first on a terminal",
             f"empathctl queue delete {ID}", f"empathctl queue delete --yes {ID}")
    x.add_argument("id")
    x.add_argument("--yes", "-y", action="store_true",
                   help="do not ask for confirmation (required when stdin is not a terminal)")
    _add(qs, "flush", "try every message not held now (deferred ones too)",
         "empathctl queue flush")
    x = _add(qs, "stats", "counts by state and domain",
             "empathctl queue stats", "empathctl queue stats --watch --interval 5",
             "empathctl --json queue stats --watch --count 10 > stats.ndjson")
    x.add_argument("--watch", action="store_true", help="refresh until interrupted")
    x.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between refreshes with --watch (default 2)")
    x.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N updates")

    d = _add(sub, "dns", "the delivery DNS cache", "empathctl dns cache",
             "empathctl dns cache --clear")
    ds = d.add_subparsers(dest="dns_command", required=True, metavar="SUBCOMMAND")
    x = _add(ds, "cache", "show the DNS cache (or clear it)", "empathctl dns cache",
             "empathctl dns cache --clear")
    x.add_argument("--clear", action="store_true", help="forget every cached answer")

    r = _add(sub, "route", "runtime next-hop overrides of delivery.routes",
             "empathctl route list", "empathctl route set example.net smtp:10.0.0.5:25")
    rs = r.add_subparsers(dest="route_command", required=True, metavar="SUBCOMMAND")
    x = _add(rs, "set", "route DOMAIN to NEXTHOP until restart",
             "empathctl route set example.net smtp:10.0.0.5:25",
             "empathctl route set example.com lmtp:/run/dovecot/lmtp")
    x.add_argument("domain")
    x.add_argument("nexthop", help="smtp:HOST[:PORT], lmtp:HOST:PORT, lmtp:/socket, "
                                   "maildir:/path or mx:DOMAIN")
    x = _add(rs, "unset", "remove the override for DOMAIN", "empathctl route unset example.net")
    x.add_argument("domain")
    _add(rs, "list", "configured routes and overrides", "empathctl route list")

    x = _add(sub, "reload", "re-read the configuration", "empathctl reload --wait")
    x.add_argument("--wait", action="store_true",
                   help="wait until it was applied or refused; exit 1 if refused")
    x = _add(sub, "log-level", "set the daemon's log level until the next reload or restart",
             "empathctl log-level debug", "empathctl log-level info")
    x.add_argument("level", choices=("debug", "info", "warning", "error"))
    _add(sub, "connections", "open SMTP sessions: client, state, HELO, TLS, duration, worker",
         "empathctl connections", "empathctl --json connections | jq '.connections | length'")
    return p


Request = tuple[str, dict[str, Any], Any]


def request_for(ns: argparse.Namespace) -> Request:
    """(protocol command, args, human formatter) for the parsed command line."""
    c = ns.command
    if c == "status":
        return "status", {}, show_status
    if c == "queue":
        q = ns.queue_command
        if q == "list":
            args = {k: v for k, v in (("status", ns.status), ("domain", ns.domain)) if v}
            if ns.limit is not None:
                args["limit"] = ns.limit
            if ns.offset:
                args["offset"] = ns.offset
            args["stream"] = True  # pages as they are read: no size limit on the queue
            return "queue.list", args, show_list
        if q == "show":
            return "queue.show", {"id": ns.id}, show_message
        if q == "retry":
            return "queue.retry", ({"all": True} if ns.all else {"id": ns.id}), show_retry
        if q in ("hold", "release"):
            return f"queue.{q}", {"id": ns.id}, show_hold
        if q == "delete":
            return "queue.delete", {"id": ns.id}, show_delete
        if q == "flush":
            return "queue.flush", {}, show_retry
        if q == "stats":
            args = {}
            if ns.watch:
                if ns.interval <= 0:
                    _fail_usage("--interval must be positive")
                args = {"watch": True, "interval": ns.interval}
                if ns.count is not None:
                    if ns.count <= 0:
                        _fail_usage("--count must be positive")
                    args["count"] = ns.count
            return "queue.stats", args, show_stats
    if c == "dns":
        return "dns.cache", ({"clear": True} if ns.clear else {}), show_dns
    if c == "route":
        r = ns.route_command
        if r == "set":
            return "route.set", {"domain": ns.domain, "nexthop": ns.nexthop}, show_route_set
        if r == "unset":
            return "route.unset", {"domain": ns.domain}, show_route_unset
        return "route.list", {}, show_routes
    if c == "reload":
        return "reload", {"wait": bool(ns.wait)}, show_reload
    if c == "log-level":
        return "log.level", {"level": ns.level}, show_log_level
    if c == "connections":
        return "connections", {}, show_connections
    raise AssertionError(c)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=True))


def _report_refusal(exc: Refused, as_json: bool) -> None:
    if as_json:
        _print_json({k: exc.response[k] for k in ("ok", "error", "code", "detail")
                     if k in exc.response})
    print(f"empathctl: {exc}", file=sys.stderr)
    detail = exc.response.get("detail")
    if exc.code == "refused" and isinstance(detail, Mapping):
        errors = detail.get("errors") or []
        if len(errors) > 1:
            for e in errors:
                print(f"  {e}", file=sys.stderr)
    elif exc.code == "unauthorized":
        print("empathctl: give the token with --token-file or $EMPATH_CONTROL_TOKEN",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return code
    except BrokenPipeError:
        # Output piped into head(1) or similar: stop quietly, as other tools do. The
        # interpreter flushes stdout once more at exit; let that go to /dev/null.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EX_OK


def _confirm_delete(client: Client, id: str) -> int | None:
    """Ask before ``queue delete`` (no --yes): None to go ahead, else the exit status."""
    if not sys.stdin.isatty():
        print(f"empathctl: not deleting {id}: confirmation needed, but stdin is not a "
              "terminal; add --yes to delete without asking", file=sys.stderr)
        return EX_USAGE
    shown = client.call("queue.show", {"id": id})
    m = shown["message"]
    todo = [r["address"] for r in m.get("recipients", [])
            if r["state"] not in ("delivered", "bounced")]
    who = ", ".join(todo[:3]) + (f" and {len(todo) - 3} more" if len(todo) > 3 else "")
    sys.stderr.write(f"delete {m['id']} ({m['state']}) from {_addr(m['sender'])} to "
                     f"{len(todo)} undelivered recipient(s){': ' + who if who else ''}?\n"
                     "No bounce is sent. [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if answer.strip().lower() in ("y", "yes"):
        return None
    print("empathctl: not deleted", file=sys.stderr)
    return EX_REFUSED


def _main(argv: list[str] | None) -> int:
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.timeout <= 0:
        _fail_usage("--timeout must be positive")
    cmd, args, formatter = request_for(ns)
    path = socket_path(ns.socket, ns.config)
    timeout = ns.timeout
    if cmd == "queue.stats" and args.get("watch"):
        timeout = max(timeout, 3 * float(args["interval"]) + 30)
    client = Client(path, _token(ns.token_file, ns.config), timeout)
    try:
        if cmd == "queue.delete" and not ns.yes:
            refused = _confirm_delete(client, args["id"])
            if refused is not None:
                return refused
        if cmd == "queue.stats" and args.get("watch"):
            tty = sys.stdout.isatty() and not ns.json
            for result in client.stream(cmd, args):
                if result is None:
                    continue
                if ns.json:
                    print(json.dumps(result, ensure_ascii=True), flush=True)
                    continue
                if tty:
                    sys.stdout.write("\033[H\033[2J")
                else:
                    print(time.strftime("-- %Y-%m-%d %H:%M:%S"))
                show_stats(result, sys.stdout)
                sys.stdout.flush()
            return EX_OK
        if cmd == "queue.list":
            pages = client.stream(cmd, args)
            if ns.json:
                print_json_array(pages, sys.stdout)
                return EX_OK
            printer = ListPrinter(sys.stdout, limit=args.get("limit"),
                                  offset=args.get("offset", 0))
            for page in pages:
                printer.page(page or [])
            printer.finish()
            return EX_OK
        result = client.call(cmd, args)
    except Refused as exc:
        _report_refusal(exc, ns.json)
        return EX_REFUSED
    except Unavailable as exc:
        print(f"empathctl: {exc}\n(is the daemon running? see `systemctl status empath`)",
              file=sys.stderr)
        return EX_UNREACHABLE
    except KeyboardInterrupt:
        return 130
    if ns.json:
        _print_json(result)
    else:
        formatter(result, sys.stdout)
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
