"""The effective config as YAML: what ``empath check-config`` prints.

Every key is written, defaults included, so an operator sees what the daemon will
actually do. The output is itself a valid config: ``load_config_text(dump_config(c))``
gives back ``c`` (apart from ``source``), which the tests check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from empath.config.model import Config

__all__ = ["config_to_dict", "dump_config"]


def _path(value: Path | None) -> str | None:
    return None if value is None else str(value)


def _plain(value: Any) -> Any:
    """Paths to strings, tuples to lists, recursively: safe_dump knows neither."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (str/int/float/bool/None/list/dict) in PRODUCT.md's key order."""
    limits = cfg.limits
    delivery = cfg.delivery
    return {
        "hostname": cfg.hostname,
        "postmaster": cfg.postmaster,
        "listen": [{"address": lst.address, "role": lst.role} for lst in cfg.listen],
        "state_dir": str(cfg.state_dir),
        "local_domains": sorted(cfg.local_domains),
        "relay_networks": [str(n) for n in cfg.relay_networks],
        "limits": {
            "max_message_size": limits.max_message_size,
            "max_recipients": limits.max_recipients,
            "max_connections": limits.max_connections,
            "per_client_connections": limits.per_client_connections,
            "per_client_rate": limits.per_client_rate,
            "max_errors": limits.max_errors,
            "min_free_space": limits.min_free_space,
            "command_timeout": limits.command_timeout,
            "data_timeout": limits.data_timeout,
            "max_session_time": limits.max_session_time,
            "max_header_size": limits.max_header_size,
            "auth_failures": limits.auth_failures,
            "auth_failure_window": limits.auth_failure_window,
            "auth_failure_delay": limits.auth_failure_delay,
        },
        "tls": None
        if cfg.tls is None
        else {"certificate": str(cfg.tls.certificate), "key": str(cfg.tls.key)},
        "submission": {"users_file": _path(cfg.submission.users_file),
                       "sender_login_match": cfg.submission.sender_login_match},
        "dkim": _plain(cfg.dkim),
        "delivery": {
            "mode": delivery.mode,
            "relayhost": delivery.relayhost,
            "nameservers": list(delivery.nameservers),
            "routes": dict(delivery.routes),
            "destinations": {
                domain: {"tls": p.tls, "max_connections": p.max_connections, "rate": p.rate,
                         "dnssec": p.dnssec}
                for domain, p in delivery.destinations.items()
            },
            "retry_schedule": list(delivery.retry_schedule),
            "max_queue_lifetime": delivery.max_queue_lifetime,
            "max_deliveries": delivery.max_deliveries,
            "delay_warning": delivery.delay_warning,
            "breaker_failures": delivery.breaker_failures,
            "breaker_cooldown": delivery.breaker_cooldown,
            "mx_port": delivery.mx_port,
        },
        "control": {
            "socket": _path(cfg.control.socket),
            "token_file": _path(cfg.control.token_file),
        },
        "metrics": {
            "listen": cfg.metrics.listen,
            "bearer_token_file": _path(cfg.metrics.bearer_token_file),
            "web_config": _path(cfg.metrics.web_config),
        },
        "log": {"level": cfg.log.level},
        "modules": [{"name": m.name, "options": _plain(m.options), "fail_open": m.fail_open,
                     "timeout": m.timeout} for m in cfg.modules],
        "workers": cfg.workers,
        "shutdown_timeout": cfg.shutdown_timeout,
    }


def dump_config(cfg: Config) -> str:
    """The effective configuration as a YAML document (loadable by load_config_text)."""
    header = f"# effective configuration loaded from {cfg.source}\n" if cfg.source else ""
    body = yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return header + body
