"""The config validator: YAML text in, a frozen ``Config`` (or one ``ConfigError``) out.

Design choices, all for the operator editing ``/etc/empath/empath.yaml``:

- Every problem is collected, each with its key path, before raising, so one run of
  ``empath check-config`` lists every mistake.
- Nothing is guessed: unknown keys (with a "did you mean" hint), wrong types
  (booleans are not integers), duplicate YAML keys and duplicate domains are errors.
- Values are normalised once here (domains to lower-case A-labels, addresses to a
  canonical ``host:port``, paths to ``Path``) so the rest of the daemon compares
  plain values.
- ``null`` means "unset" for optional settings and "empty" for sections, lists and
  maps; it is an error for a setting that has a non-null default (``limits.max_recipients:``
  with nothing after it is more likely a mistake than a wish for the default).
- Keys whose feature is not built are validated like the others and then refused by
  the table in ``features.py``.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Collection
from pathlib import Path
from typing import Any, cast

import yaml

from empath.addr import AddressError, normalize_domain, parse_mailbox
from empath.config.errors import ConfigError, ConfigIssue
from empath.config.features import unsupported_settings
from empath.config.model import (
    DKIM_DEFAULT_HEADERS,
    DKIM_NEVER_SIGNED,
    Config,
    ControlConfig,
    DeliveryConfig,
    DeliveryMode,
    DestinationPolicy,
    DNSSECPolicy,
    IPNetwork,
    Limits,
    Listener,
    LogConfig,
    MetricsConfig,
    ModuleSpec,
    Role,
    SubmissionConfig,
    TLSConfig,
    TLSPolicy,
)
from empath.config.nexthop import (
    format_host_port,
    parse_absolute_path,
    parse_host,
    parse_next_hop,
    split_host_port,
)
from empath.statedir import forbidden_location

__all__ = ["load_config", "load_config_text", "parse_yaml"]

NO_SOURCE_LABEL = "<config>"

TOP_KEYS = (
    "hostname", "postmaster", "listen", "state_dir", "local_domains", "relay_networks",
    "limits", "tls", "submission", "dkim", "delivery", "control", "metrics", "log",
    "modules", "workers", "shutdown_timeout",
)  # fmt: skip
LIMIT_INT_KEYS = (
    "max_message_size", "max_recipients", "max_connections", "per_client_connections",
    "per_client_rate", "max_errors", "min_free_space", "max_header_size", "auth_failures",
)  # fmt: skip
LIMIT_SECONDS_KEYS = (
    "command_timeout", "data_timeout", "max_session_time", "auth_failure_window",
    "auth_failure_delay",
)  # fmt: skip
DELIVERY_KEYS = (
    "mode", "relayhost", "nameservers", "routes", "destinations", "retry_schedule",
    "max_queue_lifetime", "max_deliveries", "delay_warning", "breaker_failures",
    "breaker_cooldown", "mx_port",
)  # fmt: skip
DELIVERY_MODES = ("mx", "relay", "hold")
TLS_POLICIES = ("none", "may", "encrypt", "verify")
DNSSEC_POLICIES = ("may", "require")
LOG_LEVELS = ("debug", "info", "warning", "error")
ROLES = ("smtp", "submission")
MAX_WORKERS = 64
MAX_MODULE_TIMEOUT = 300  # seconds: an SMTP client waits 5 minutes for a reply
DEFAULT_SMTP_PORT = 25
DEFAULT_DNS_PORT = 53


# --------------------------------------------------------------------------- YAML


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate mapping keys.

    Plain safe_load keeps the last of two ``limits:`` blocks and silently drops the
    first, which is exactly the kind of edit mistake the validator is there to catch.
    """


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *anchor" may legitimately be overridden by explicit keys
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it below
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_StrictSafeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def parse_yaml(text: str, label: str) -> Any:
    """Parse ``text`` like ``yaml.safe_load`` (plus duplicate-key refusal).

    Raises ConfigError with the line and column of a syntax error.
    """
    try:
        return yaml.load(text, Loader=_StrictSafeLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError([ConfigIssue(label, "", f"invalid YAML: {where}{problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(label, "", f"invalid YAML: {exc}")]) from None


# --------------------------------------------------------------------- helpers


def _show(value: Any) -> str:
    """A value as the operator wrote it (YAML spelling for null/booleans), shortened."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Validator:
    """Holds the issues found so far. Each check returns the validated value, or None
    after recording an issue, so callers fall back to the default and carry on."""

    def __init__(self, label: str, base_dir: Path) -> None:
        self.label = label
        self.base_dir = base_dir  # for the relative state_dir
        self.issues: list[ConfigIssue] = []
        self.check_modules = True  # build modules to validate them (load_config_text)

    # -- reporting

    def error(self, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.label, path, message))

    def expected(self, path: str, what: str, value: Any) -> None:
        self.error(path, f"expected {what}, got {_show(value)}")

    def has_issue_under(self, path: str) -> bool:
        return any(
            i.key_path == path or i.key_path.startswith((path + ".", path + "["))
            for i in self.issues
        )

    # -- structure

    def section(self, value: Any, path: str, known: Collection[str]) -> dict[str, Any]:
        """A mapping restricted to ``known`` keys; unknown keys are reported.
        Returns {} for null (an empty YAML section) or after a type error."""
        if value is None:
            return {}
        return self.entry(value, path, known) or {}

    def entry(self, value: Any, path: str, known: Collection[str]) -> dict[str, Any] | None:
        """Like section() for a list item or map value, where null is no more valid
        than any other non-mapping. None after a type error, so the caller skips
        "required key is missing" reports that would only repeat it."""
        if not isinstance(value, dict):
            self.expected(path, "a mapping", value)
            return None
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.error(_join(path, str(key)), f"keys must be strings, got {_show(key)}")
                continue
            if key not in known:
                hint = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.error(_join(path, key), f"unknown key{suffix}")
                continue
            out[key] = item
        return out

    def required(self, m: dict[str, Any], key: str, path: str) -> bool:
        if key not in m:
            self.error(_join(path, key), "required key is missing")
            return False
        return True

    def sequence(self, value: Any, path: str) -> list[Any] | None:
        """A list; null means empty. None after a type error."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.expected(path, "a list", value)
            return None
        return value

    def domain_map(self, value: Any, path: str) -> list[tuple[str, str, Any]]:
        """A mapping keyed by domain: ``(normalised domain, key path, value)`` per entry.
        Two spellings of one domain (``Example.COM`` and ``example.com.``) conflict."""
        if value is None:
            return []
        if not isinstance(value, dict):
            self.expected(path, "a mapping of domain to settings", value)
            return []
        out: list[tuple[str, str, Any]] = []
        first: dict[str, str] = {}
        for key, item in value.items():
            key_path = f"{path}[{key}]"
            if not isinstance(key, str):
                self.error(key_path, f"expected a domain as key, got {_show(key)}")
                continue
            domain = self.domain(key, key_path)
            if domain is None:
                continue
            if domain in first:
                self.error(key_path, f"same domain as {first[domain]!r} (both are {domain})")
                continue
            first[domain] = key
            out.append((domain, key_path, item))
        return out

    # -- scalars

    def integer(
        self, value: Any, path: str, *, minimum: int = 1, maximum: int | None = None
    ) -> int | None:
        if maximum is not None:
            what = f"an integer from {minimum} to {maximum}"
        elif minimum == 1:
            what = "a positive integer"
        else:
            what = f"an integer ≥ {minimum}"
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            self.expected(path, what, value)
            return None
        return value

    def seconds(self, value: Any, path: str) -> float | None:
        """A positive, finite number (int or float; YAML's .inf and .nan are refused)."""
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            self.expected(path, "a positive number", value)
            return None
        return float(value)

    def string(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str) or not value.strip():
            self.expected(path, "a non-empty string", value)
            return None
        return value

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str | None:
        if not isinstance(value, str) or value not in choices:
            self.expected(path, "one of " + ", ".join(repr(c) for c in choices), value)
            return None
        return value

    def domain(self, value: Any, path: str) -> str | None:
        text = self.string(value, path)
        if text is None:
            return None
        try:
            return normalize_domain(text)
        except AddressError as exc:
            self.error(path, str(exc))
            return None

    def abs_path(self, value: Any, path: str) -> Path | None:
        """An absolute path; records an issue and returns None otherwise.
        Existence is not checked: check-config may run on another host."""
        text = self.string(value, path)
        if text is None:
            return None
        try:
            return parse_absolute_path(text)
        except ValueError as exc:
            self.error(path, str(exc))
            return None

    def optional_abs_path(self, m: dict[str, Any], key: str, path: str) -> Path | None:
        value = m.get(key)
        return None if value is None else self.abs_path(value, _join(path, key))

    def endpoint(
        self, value: Any, path: str, *, literal_ip: bool, default_port: int | None
    ) -> tuple[str, int] | None:
        """``HOST:PORT`` or ``[IPv6]:PORT``; the port may be omitted only when a
        default is given."""
        text = self.string(value, path)
        if text is None:
            return None
        try:
            host, bracketed, port = split_host_port(text)
            host = parse_host(host, bracketed, literal_ip=literal_ip)
        except ValueError as exc:
            self.error(path, str(exc))
            return None
        if port is None:
            if default_port is None:
                self.error(path, f"missing port in {text!r} (expected HOST:PORT or [IPv6]:PORT)")
                return None
            port = default_port
        return host, port


# ------------------------------------------------------------------- sections


def _listen(v: _Validator, raw: Any) -> tuple[Listener, ...]:
    items = v.sequence(raw, "listen") or []
    out: list[Listener] = []
    first: dict[tuple[str, int], str] = {}
    for i, item in enumerate(items):
        path = f"listen[{i}]"
        m = v.entry(item, path, ("address", "role"))
        if m is None:
            continue
        endpoint = role = None
        if v.required(m, "address", path):
            endpoint = v.endpoint(
                m["address"], f"{path}.address", literal_ip=True, default_port=None
            )
        if v.required(m, "role", path):
            role = v.choice(m["role"], f"{path}.role", ROLES)
        if endpoint is None or role is None:
            continue
        if endpoint in first:
            v.error(f"{path}.address", f"duplicate of {first[endpoint]}.address")
            continue
        first[endpoint] = path
        out.append(Listener(host=endpoint[0], port=endpoint[1], role=cast(Role, role)))
    return tuple(out)


def _state_dir(v: _Validator, raw: Any) -> Path | None:
    text = v.string(raw, "state_dir")
    if text is None:
        return None
    if "\0" in text:
        v.error("state_dir", "path contains a NUL byte")
        return None
    if text.startswith("~"):
        v.error("state_dir", f"'~' is not expanded; write the full path instead of {text!r}")
        return None
    # Relative paths are taken relative to the config file, not the daemon's cwd,
    # so examples/dev.yaml works wherever it is started from.
    path = Path(text) if text.startswith("/") else v.base_dir / text
    problem = forbidden_location(path)
    if problem is not None:
        v.error("state_dir", f"{path} {problem}")
        return None
    return path


def _local_domains(v: _Validator, raw: Any) -> frozenset[str]:
    items = v.sequence(raw, "local_domains") or []
    domains = (v.domain(item, f"local_domains[{i}]") for i, item in enumerate(items))
    return frozenset(d for d in domains if d is not None)


def _relay_networks(v: _Validator, raw: Any) -> tuple[IPNetwork, ...]:
    items = v.sequence(raw, "relay_networks") or []
    out: list[IPNetwork] = []
    for i, item in enumerate(items):
        path = f"relay_networks[{i}]"
        text = v.string(item, path)
        if text is None:
            continue
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as exc:
            # Host bits set (10.0.0.1/8) usually means a mistyped network: refuse it
            # (silently widening or narrowing a relay permission is dangerous) and
            # name the network the operator probably meant.
            try:
                meant = ipaddress.ip_network(text.strip(), strict=False)
                v.error(path, f"{text!r} has host bits set; did you mean {str(meant)!r}?")
            except ValueError:
                v.error(path, f"invalid network {text!r}: {exc}")
    return tuple(out)


def _limits(v: _Validator, raw: Any) -> Limits:
    m = v.section(raw, "limits", LIMIT_INT_KEYS + LIMIT_SECONDS_KEYS)
    values: dict[str, Any] = {}
    for key in LIMIT_INT_KEYS:
        if key in m:
            values[key] = v.integer(m[key], f"limits.{key}")
    for key in LIMIT_SECONDS_KEYS:
        if key in m:
            values[key] = v.seconds(m[key], f"limits.{key}")
    return Limits(**{k: x for k, x in values.items() if x is not None})


def _tls(v: _Validator, raw: Any) -> TLSConfig | None:
    if raw is None:
        return None
    m = v.entry(raw, "tls", ("certificate", "key"))
    if m is None:
        return None
    cert = (
        v.abs_path(m["certificate"], "tls.certificate")
        if v.required(m, "certificate", "tls")
        else None
    )
    key = v.abs_path(m["key"], "tls.key") if v.required(m, "key", "tls") else None
    if cert is None or key is None:
        return None
    return TLSConfig(certificate=cert, key=key)


def _dkim(v: _Validator, raw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for domain, path, item in v.domain_map(raw, "dkim"):
        m = v.entry(item, path, ("selector", "key", "headers"))
        if m is None:
            continue
        selector = key = None
        headers = _dkim_headers(v, m.get("headers"), f"{path}.headers")
        if v.required(m, "selector", path):
            selector = v.string(m["selector"], f"{path}.selector")
            if selector is not None:
                try:
                    selector = normalize_domain(selector)  # dot-separated DNS labels
                except AddressError as exc:
                    v.error(f"{path}.selector", f"invalid selector: {exc}")
                    selector = None
        if v.required(m, "key", path):
            key = v.abs_path(m["key"], f"{path}.key")
        if selector is not None and key is not None:
            out[domain] = {"selector": selector, "key": key, "headers": headers}
    return out


_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 §3.6.8 ftext


def _dkim_headers(v: _Validator, raw: Any, path: str) -> tuple[str, ...]:
    """Header names to sign; unset is the default list (shown by check-config)."""
    if raw is None:
        return DKIM_DEFAULT_HEADERS
    items = v.sequence(raw, path)
    if items is None:
        return DKIM_DEFAULT_HEADERS
    out: list[str] = []
    for i, item in enumerate(items):
        name = v.string(item, f"{path}[{i}]")
        if name is None:
            continue
        name = name.strip()
        if not _FIELD_NAME.fullmatch(name):
            v.error(f"{path}[{i}]", f"not a header field name: {name!r}")
        elif name.lower() in DKIM_NEVER_SIGNED:
            v.error(f"{path}[{i}]", f"{name} must not be signed (RFC 6376 §5.4.1)")
        elif name.lower() in (n.lower() for n in out):
            v.error(f"{path}[{i}]", f"{name} is listed twice")
        else:
            out.append(name)
    if "from" not in (n.lower() for n in out) and not v.has_issue_under(path):
        v.error(path, "must include From (RFC 6376 §5.4)")
    return tuple(out)


def _delivery(v: _Validator, raw: Any) -> DeliveryConfig:
    m = v.section(raw, "delivery", DELIVERY_KEYS)
    values: dict[str, Any] = {}

    mode = v.choice(m["mode"], "delivery.mode", DELIVERY_MODES) if "mode" in m else "hold"
    if mode is not None:
        values["mode"] = cast(DeliveryMode, mode)

    relayhost = m.get("relayhost")
    if relayhost is not None:
        endpoint = v.endpoint(
            relayhost, "delivery.relayhost", literal_ip=False, default_port=DEFAULT_SMTP_PORT
        )
        if endpoint is not None:
            values["relayhost"] = format_host_port(*endpoint)
        if mode is not None and mode != "relay":
            v.error("delivery.relayhost", f"only used with mode 'relay', but mode is {mode!r}")
    elif mode == "relay":
        v.error("delivery.relayhost", "required when mode is 'relay' (HOST:PORT)")

    nameservers = []
    for i, item in enumerate(v.sequence(m.get("nameservers"), "delivery.nameservers") or []):
        endpoint = v.endpoint(
            item, f"delivery.nameservers[{i}]", literal_ip=True, default_port=DEFAULT_DNS_PORT
        )
        if endpoint is not None:
            nameservers.append(format_host_port(*endpoint))
    values["nameservers"] = tuple(nameservers)

    routes: dict[str, str] = {}
    for domain, path, item in v.domain_map(m.get("routes"), "delivery.routes"):
        text = v.string(item, path)
        if text is None:
            continue
        try:
            routes[domain] = str(parse_next_hop(text.strip()))
        except ValueError as exc:
            v.error(path, str(exc))
    values["routes"] = routes

    destinations: dict[str, DestinationPolicy] = {}
    for domain, path, item in v.domain_map(m.get("destinations"), "delivery.destinations"):
        d = v.section(item, path, ("tls", "max_connections", "rate", "dnssec"))
        policy: dict[str, Any] = {}
        if "tls" in d:
            policy["tls"] = cast(TLSPolicy | None, v.choice(d["tls"], f"{path}.tls", TLS_POLICIES))
        if "dnssec" in d:
            policy["dnssec"] = cast(DNSSECPolicy | None,
                                    v.choice(d["dnssec"], f"{path}.dnssec", DNSSEC_POLICIES))
        if d.get("max_connections") is not None:
            policy["max_connections"] = v.integer(d["max_connections"], f"{path}.max_connections")
        if d.get("rate") is not None:
            policy["rate"] = v.seconds(d["rate"], f"{path}.rate")
        destinations[domain] = DestinationPolicy(
            **{k: x for k, x in policy.items() if x is not None}
        )
    values["destinations"] = destinations

    if "retry_schedule" in m:
        schedule = _retry_schedule(v, m["retry_schedule"])
        if schedule is not None:
            values["retry_schedule"] = schedule

    for key in ("max_queue_lifetime", "max_deliveries", "breaker_failures", "breaker_cooldown"):
        if key in m:
            number = v.integer(m[key], f"delivery.{key}")
            if number is not None:
                values[key] = number
    if "mx_port" in m:
        port = v.integer(m["mx_port"], "delivery.mx_port", maximum=65535)
        if port is not None:
            values["mx_port"] = port
    if m.get("delay_warning") is not None:
        values["delay_warning"] = v.integer(m["delay_warning"], "delivery.delay_warning")
    return DeliveryConfig(**values)


def _retry_schedule(v: _Validator, raw: Any) -> tuple[int, ...] | None:
    path = "delivery.retry_schedule"
    if not isinstance(raw, list) or not raw:
        v.expected(path, "a non-empty list of positive integers (seconds)", raw)
        return None
    delays = [v.integer(item, f"{path}[{i}]") for i, item in enumerate(raw)]
    if any(d is None for d in delays):
        return None
    return tuple(cast(list[int], delays))


# A Unix socket path is at most 107 bytes on Linux (sun_path holds 108, with NUL).
MAX_SOCKET_PATH = 107


def _control(v: _Validator, m: dict[str, Any]) -> ControlConfig:
    socket = v.optional_abs_path(m, "socket", "control")
    if socket is not None and len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        v.error("control.socket", f"longer than {MAX_SOCKET_PATH} bytes, the limit for a "
                "Unix socket path")
        socket = None
    return ControlConfig(
        socket=socket,
        token_file=v.optional_abs_path(m, "token_file", "control"),
    )


def _metrics(v: _Validator, raw: Any) -> MetricsConfig:
    m = v.section(raw, "metrics", ("listen", "bearer_token_file", "web_config"))
    listen = None
    if m.get("listen") is not None:
        endpoint = v.endpoint(m["listen"], "metrics.listen", literal_ip=True, default_port=None)
        listen = format_host_port(*endpoint) if endpoint else None
    return MetricsConfig(
        listen=listen,
        bearer_token_file=v.optional_abs_path(m, "bearer_token_file", "metrics"),
        web_config=v.optional_abs_path(m, "web_config", "metrics"),
    )


def _modules(v: _Validator, raw: Any) -> tuple[ModuleSpec, ...]:
    out: list[ModuleSpec] = []
    for i, item in enumerate(v.sequence(raw, "modules") or []):
        path = f"modules[{i}]"
        m = v.entry(item, path, ("name", "options", "fail_open", "timeout"))
        if m is None:
            continue
        name = v.string(m["name"], f"{path}.name") if v.required(m, "name", path) else None
        options = m.get("options")
        if options is None:
            options = {}
        elif not isinstance(options, dict):
            v.expected(f"{path}.options", "a mapping", options)
            continue
        fail_open = m.get("fail_open", False)
        if not isinstance(fail_open, bool):
            v.expected(f"{path}.fail_open", "true or false", fail_open)
            continue
        timeout = v.seconds(m["timeout"], f"{path}.timeout") if "timeout" in m else 5.0
        if timeout is not None and timeout > MAX_MODULE_TIMEOUT:
            v.error(f"{path}.timeout", f"at most {MAX_MODULE_TIMEOUT} seconds")
            timeout = None
        if name is not None and timeout is not None:
            out.append(ModuleSpec(name=name, options=dict(options), fail_open=fail_open,
                                  timeout=timeout))
    return tuple(out)


def default_hostname() -> str:
    """This machine's fully qualified name, as the default ``hostname``."""
    return socket.getfqdn() or "localhost"


def _validate(v: _Validator, data: Any, source: Path | None) -> Config:
    if not isinstance(data, dict):
        what = "an empty document" if data is None else _show(data)
        v.error("", f"the top level must be a mapping of settings, got {what}")
        raise ConfigError(v.issues)
    top = v.section(data, "", TOP_KEYS)

    hostname = postmaster = None
    # Like Postfix's myhostname/myorigin: unset means this machine's name, so the
    # packaged default config needs no edit to start (DEPLOYMENT.md says to set it).
    if "hostname" in top:
        hostname = v.domain(top["hostname"], "hostname")
    else:
        hostname = v.domain(default_hostname(), "hostname (this machine's name)")
    if "postmaster" not in top:
        postmaster = f"postmaster@{hostname or 'invalid'}"
    else:
        text = v.string(top["postmaster"], "postmaster")
        if text is not None:
            try:
                postmaster = parse_mailbox(text.strip()).address
            except AddressError as exc:
                v.error("postmaster", str(exc))
    state_dir = _state_dir(v, top["state_dir"]) if v.required(top, "state_dir", "") else None

    submission = v.section(top.get("submission"), "submission",
                           ("users_file", "sender_login_match"))
    login_match = submission.get("sender_login_match", False)
    if not isinstance(login_match, bool):
        v.expected("submission.sender_login_match", "true or false", login_match)
        login_match = False
    control = v.section(top.get("control"), "control", ("socket", "token_file"))
    log = v.section(top.get("log"), "log", ("level",))
    level = v.choice(log["level"], "log.level", LOG_LEVELS) if "level" in log else None

    extra: dict[str, Any] = {}
    if "workers" in top:
        extra["workers"] = v.integer(top["workers"], "workers", maximum=MAX_WORKERS)
    if "shutdown_timeout" in top:
        extra["shutdown_timeout"] = v.seconds(top["shutdown_timeout"], "shutdown_timeout")

    cfg = Config(
        # Placeholders only when an issue was recorded; such a Config never escapes.
        hostname=hostname or "invalid",
        postmaster=postmaster or "postmaster@invalid",
        state_dir=state_dir or Path("/nonexistent"),
        listen=_listen(v, top.get("listen")),
        local_domains=_local_domains(v, top.get("local_domains")),
        relay_networks=_relay_networks(v, top.get("relay_networks")),
        limits=_limits(v, top.get("limits")),
        tls=_tls(v, top.get("tls")),
        submission=SubmissionConfig(
            users_file=v.optional_abs_path(submission, "users_file", "submission"),
            sender_login_match=login_match,
        ),
        dkim=_dkim(v, top.get("dkim")),
        delivery=_delivery(v, top.get("delivery")),
        control=_control(v, control),
        metrics=_metrics(v, top.get("metrics")),
        log=LogConfig(level=cast(Any, level)) if level is not None else LogConfig(),
        modules=_modules(v, top.get("modules")),
        source=source,
        **{k: x for k, x in extra.items() if x is not None},
    )
    _check_local_routes(v, cfg)
    if v.check_modules and not v.has_issue_under("modules"):
        from empath.modules.loader import module_issues  # imports the modules' code

        for key_path, message in module_issues(cfg):
            v.error(key_path, message)
    # Syntax first, then the feature table: a key that is both malformed and
    # unsupported gets the more useful syntax message only.
    for key_path, message in unsupported_settings(cfg):
        if not v.has_issue_under(key_path):
            v.error(key_path, message)
    if v.issues:
        raise ConfigError(sorted(v.issues, key=_document_order))
    return cfg


def _check_local_routes(v: _Validator, cfg: Config) -> None:
    """Every local domain needs a route once mail is delivered (mode mx or relay).

    Without one, mail accepted for it would be sent to its MX — ourselves — and
    bounce as a loop, or go to the relayhost and come back: either way the sender
    gets backscatter for mail we said 250 to. Postfix delivers $mydestination
    locally; empath has no local delivery agent of its own, so the route says where
    (maildir:, lmtp: to Dovecot, smtp: to a mailbox server).
    """
    if cfg.delivery.mode == "hold" or v.has_issue_under("local_domains"):
        return
    for domain in sorted(cfg.local_domains):
        if domain not in cfg.delivery.routes:
            v.error(
                "local_domains",
                f"{domain!r} has no delivery.routes entry; with mode {cfg.delivery.mode!r} "
                "mail accepted for it would loop back or bounce (add e.g. "
                f"'{domain}: maildir:/var/mail/{domain}' or an lmtp: route)",
            )


def _document_order(issue: ConfigIssue) -> int:
    """Sort key grouping issues by top-level section in PRODUCT.md's order (whole-file
    problems first, unknown top-level keys last); sorting is stable within a section."""
    head = re.split(r"[.\[]", issue.key_path, maxsplit=1)[0]
    if not head:
        return 0
    return TOP_KEYS.index(head) + 1 if head in TOP_KEYS else len(TOP_KEYS) + 1


# ------------------------------------------------------------------ entry points


def load_config_text(text: str, source: Path | None = None, *,
                     check_modules: bool = True) -> Config:
    """Validate config ``text``. ``source`` is the file it came from: it labels error
    messages and anchors a relative ``state_dir``; without it ``<config>`` and the
    current directory are used. Raises ConfigError listing every issue.

    ``check_modules``: build every module to check its options (imports its code);
    tools that only read a setting or two (sendmail, passwd) pass False."""
    label = str(source) if source is not None else NO_SOURCE_LABEL
    base_dir = source.absolute().parent if source is not None else Path.cwd()
    data = parse_yaml(text, label)
    v = _Validator(label, base_dir)
    v.check_modules = check_modules
    return _validate(v, data, source.absolute() if source is not None else None)


def load_config(path: Path, *, check_modules: bool = True) -> Config:
    """Read and validate the config file at ``path`` (see load_config_text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(str(path), "", f"not valid UTF-8: {exc}")]) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([ConfigIssue(str(path), "", f"cannot read: {reason}")]) from None
    return load_config_text(text, path, check_modules=check_modules)
