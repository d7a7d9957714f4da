"""Typed configuration objects. Built only by ``empath.config.load``; immutable.

Each field mirrors a key of ``/etc/empath/empath.yaml`` (see PRODUCT.md). Values are
already validated and normalised: domains are lower-case A-labels, networks are
``ipaddress`` objects, paths are absolute ``Path`` objects.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["smtp", "submission"]
DeliveryMode = Literal["mx", "relay", "hold"]
TLSPolicy = Literal["none", "may", "encrypt", "verify"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Listener:
    host: str  # literal IP address (IPv6 without brackets)
    port: int
    role: Role

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_connections: int = 1000
    per_client_connections: int = 20
    per_client_rate: int = 60  # new connections per minute per client address
    max_errors: int = 20
    min_free_space: int = 104_857_600
    # Seconds a client may stay silent between commands (RFC 5321 §4.5.3.2.7: 5 min).
    command_timeout: float = 300.0
    # Seconds to wait for a chunk of DATA (RFC 5321 §4.5.3.2.6: 3 min).
    data_timeout: float = 180.0


@dataclass(frozen=True, slots=True)
class TLSConfig:
    certificate: Path
    key: Path


@dataclass(frozen=True, slots=True)
class SubmissionConfig:
    users_file: Path | None = None


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    tls: TLSPolicy = "may"
    max_connections: int | None = None
    rate: float | None = None  # messages per second


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    mode: DeliveryMode = "hold"
    relayhost: str | None = None
    nameservers: tuple[str, ...] = ()
    routes: dict[str, str] = field(default_factory=dict)  # normalised domain → next hop
    destinations: dict[str, DestinationPolicy] = field(default_factory=dict)
    retry_schedule: tuple[int, ...] = (60, 300, 900, 1800, 3600)
    max_queue_lifetime: int = 432_000
    # Deliveries in flight at once, over all destinations.
    max_deliveries: int = 20
    # Send a delay warning (RFC 3464 "delayed") once a message is this old; None = never.
    delay_warning: int | None = None
    # Circuit breaker per next-hop host: open after this many consecutive connection
    # failures, probe again after the cooldown (seconds).
    breaker_failures: int = 5
    breaker_cooldown: int = 300
    # TCP port for delivery to MX hosts found by MX lookup (smtp:HOST means 25).
    # 25 in production; tests point it at their sinks' port.
    mx_port: int = 25


@dataclass(frozen=True, slots=True)
class ControlConfig:
    socket: Path | None = None
    token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str | None = None
    bearer_token_file: Path | None = None
    web_config: Path | None = None


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    hostname: str
    postmaster: str
    state_dir: Path
    listen: tuple[Listener, ...] = ()
    local_domains: frozenset[str] = frozenset()
    relay_networks: tuple[IPNetwork, ...] = ()
    limits: Limits = field(default_factory=Limits)
    tls: TLSConfig | None = None
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    dkim: dict[str, Any] = field(default_factory=dict)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    modules: tuple[ModuleSpec, ...] = ()
    # Number of SMTP worker processes sharing the listening sockets.
    workers: int = 2
    # Seconds SIGTERM waits for sessions in DATA before answering 421 to the rest.
    shutdown_timeout: float = 30.0
    # The file this was loaded from (None for the embedded default).
    source: Path | None = None

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"
