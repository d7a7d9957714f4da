"""Every metric empath exports: name, type, help text, label names, buckets.

One table, so names cannot drift between the code that counts, the exposition, the
shipped alert rules (docs/observability/) and their tests. Labels are bounded by
construction: listener roles, results, reasons, next-hop kinds, TLS versions and the
top-N destinations — never an address or a queue id.

Counters are counted in the process where they happen (SMTP workers or the
supervisor) and summed for the service at scrape time (empath/metrics/service.py).
Gauges whose value is the service's state (queue, breakers, listeners) are computed
by the supervisor when scraped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DELIVERY_BUCKETS", "METRICS", "RESIDENCE_BUCKETS", "MetricSpec", "spec"]

Kind = Literal["counter", "gauge", "histogram"]

# Seconds. One transaction to a next hop: a LAN mail store answers in milliseconds, a
# slow remote MX in tens of seconds; the client's own timeouts end at 300 s.
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
# Seconds from receipt to a recipient's final result: first-attempt delivery, then
# each step of the default retry schedule, up to the 5-day queue lifetime.
RESIDENCE_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
                     21600.0, 86400.0, 172800.0, 432000.0)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # Every value of each label, for counters and histograms whose labels are closed
    # sets: each combination is exported from the first scrape on with 0, because
    # Prometheus's rate() and increase() cannot see the first increment of a series
    # that is born with it.
    values: tuple[tuple[str, ...], ...] = ()


LISTENERS = ("smtp", "submission")
NEXTHOPS = ("mx", "smtp", "lmtp", "maildir")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
RRTYPES = ("MX", "A", "AAAA")


_ALL = (
    MetricSpec("empath_build_info", "gauge", "empath build; the value is always 1",
               ("version", "python")),
    MetricSpec("empath_start_time_seconds", "gauge", "Unix time the daemon started"),
    MetricSpec("empath_worker_processes", "gauge", "SMTP worker processes serving"),
    # SMTP front (counted in the workers)
    MetricSpec("empath_smtp_connections_total", "counter",
               "SMTP connections accepted from clients", ("listener",), values=(LISTENERS,)),
    MetricSpec("empath_smtp_connections_refused_total", "counter",
               "SMTP connections refused with 421 by a connection limit",
               ("listener", "reason"),
               values=(LISTENERS, ("max_connections", "per_client", "rate", "auth_failures",
                                   "shutdown"))),
    MetricSpec("empath_smtp_sessions_active", "gauge", "SMTP sessions open now",
               ("listener",)),
    MetricSpec("empath_smtp_listeners_open", "gauge",
               "listening SMTP sockets open (0: the listener is down)", ("listener",)),
    MetricSpec("empath_messages_received_total", "counter",
               "messages accepted (250 to DATA: spooled and fsync'ed)", ("listener",),
               values=(LISTENERS,)),
    MetricSpec("empath_messages_received_bytes_total", "counter",
               "bytes of accepted messages, as spooled", ("listener",), values=(LISTENERS,)),
    MetricSpec("empath_messages_rejected_total", "counter",
               "MAIL, RCPT and DATA commands refused, by reason", ("reason",),
               values=(("relay", "size", "syntax", "policy", "smuggling", "storage"),)),
    MetricSpec("empath_smtp_tls_sessions_total", "counter",
               "inbound STARTTLS handshakes completed, by protocol version",
               ("listener", "version"), values=(LISTENERS, TLS_VERSIONS)),
    MetricSpec("empath_smtp_auth_total", "counter",
               "SMTP AUTH attempts, by result (encryption_required: tried before STARTTLS; "
               "malformed: undecodable or cancelled)", ("listener", "result"),
               values=(LISTENERS, ("success", "failure", "malformed", "encryption_required"))),
    MetricSpec("empath_smtp_timeouts_total", "counter",
               "SMTP sessions closed with 421 by a time limit: a command line or DATA "
               "progress too slow (limits.command_timeout, data_timeout) or the session "
               "too long (max_session_time)", ("listener", "phase"),
               values=(LISTENERS, ("command", "data", "session"))),
    # queue and delivery (counted in the supervisor)
    MetricSpec("empath_delivery_attempts_total", "counter",
               "delivery attempts, one per recipient per attempt, by result and next hop",
               ("result", "nexthop"), values=(("delivered", "deferred", "bounced"), NEXTHOPS)),
    MetricSpec("empath_delivery_duration_seconds", "histogram",
               "duration of one delivery transaction to a next hop", ("nexthop",),
               DELIVERY_BUCKETS, values=(NEXTHOPS,)),
    MetricSpec("empath_queue_residence_seconds", "histogram",
               "time from receipt to a recipient's final result", ("result",),
               RESIDENCE_BUCKETS, values=(("delivered", "bounced"),)),
    MetricSpec("empath_queue_messages", "gauge", "messages in the queue, by state",
               ("state",)),
    MetricSpec("empath_queue_oldest_message_age_seconds", "gauge",
               "age of the oldest message in the queue (0 when empty)"),
    MetricSpec("empath_destination_active_deliveries", "gauge",
               "deliveries in flight per destination domain (top destinations, then other)",
               ("destination",)),
    MetricSpec("empath_destination_circuit_breaker_open", "gauge",
               "1 while the circuit breaker of a next hop (host:port) is open or probing "
               "(top next hops, then other)", ("destination",)),
    MetricSpec("empath_circuit_breakers_open", "gauge",
               "next hops whose circuit breaker is open"),
    MetricSpec("empath_dns_lookups_total", "counter",
               "DNS queries sent by the delivery resolver, by type and outcome",
               ("type", "result"), values=(RRTYPES, ("ok", "nxdomain", "nodata", "error"))),
    MetricSpec("empath_dns_cache_hits_total", "counter",
               "DNS answers served from empath's cache", ("type",), values=(RRTYPES,)),
    MetricSpec("empath_dns_authenticated_total", "counter",
               "DNS answers received by the delivery resolver, by DNSSEC status "
               "(untrusted: the resolver is not on loopback, its AD bit is ignored)",
               ("result",), values=(("authenticated", "unauthenticated", "untrusted"),)),
    MetricSpec("empath_delivery_tls_sessions_total", "counter",
               "outbound SMTP/LMTP sessions opened, by TLS version (none: plain text)",
               ("version",), values=((*TLS_VERSIONS, "none"),)),
    MetricSpec("empath_dsn_sent_total", "counter",
               "delivery status notifications generated, by action", ("action",),
               values=(("failed", "delayed", "delivered"),)),
    MetricSpec("empath_dkim_signatures_total", "counter",
               "DKIM signatures made for outbound messages (error: ours to sign, sent "
               "unsigned)", ("result",), values=(("signed", "error"),)),
    MetricSpec("empath_config_reloads_total", "counter",
               "configuration reloads (SIGHUP, empathctl reload), by result", ("result",),
               values=(("success", "failure"),)),
    MetricSpec("empath_config_last_reload_success", "gauge",
               "1 if the last reload was applied (or none happened), 0 if it was refused"),
    MetricSpec("empath_config_last_reload_timestamp_seconds", "gauge",
               "Unix time of the last reload attempt (start time if none)"),
    MetricSpec("empath_spool_filesystem_free_bytes", "gauge",
               "bytes available to the daemon on the spool's filesystem"),
    MetricSpec("empath_spool_filesystem_size_bytes", "gauge",
               "size of the spool's filesystem"),
    # modules (hooks counted in the workers, events in the supervisor); the module
    # label is a name from the config's modules list, so the set stays bounded
    MetricSpec("empath_module_errors_total", "counter",
               "module calls that raised, ran out of time or returned something invalid "
               "(the client got 451 4.3.0 unless the module is fail_open)",
               ("module", "hook")),
    MetricSpec("empath_module_events_dropped_total", "counter",
               "queue events not given to modules because their queue was full"),
)

METRICS: dict[str, MetricSpec] = {m.name: m for m in _ALL}


def spec(name: str) -> MetricSpec:
    return METRICS[name]
