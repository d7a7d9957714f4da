"""empath configuration: load and validate ``/etc/empath/empath.yaml``.

Public face of the package; the validator lives in ``load``, the YAML dump in
``dump``, the list of not-yet-built features in ``features``.

    cfg = load_config(default_config_path())   # raises ConfigError
    print(dump_config(cfg))
"""

from __future__ import annotations

import os
from pathlib import Path

from empath.config.dump import dump_config
from empath.config.errors import ConfigError, ConfigIssue
from empath.config.features import NOT_SUPPORTED_YET
from empath.config.load import load_config, load_config_text
from empath.config.model import (
    Config,
    ControlConfig,
    DeliveryConfig,
    DeliveryMode,
    DestinationPolicy,
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
from empath.config.nexthop import NextHop, parse_next_hop

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "NOT_SUPPORTED_YET",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "ControlConfig",
    "DeliveryConfig",
    "DeliveryMode",
    "DestinationPolicy",
    "IPNetwork",
    "Limits",
    "Listener",
    "LogConfig",
    "MetricsConfig",
    "ModuleSpec",
    "NextHop",
    "Role",
    "SubmissionConfig",
    "TLSConfig",
    "TLSPolicy",
    "default_config_path",
    "dump_config",
    "load_config",
    "load_config_text",
    "parse_next_hop",
]

DEFAULT_CONFIG_PATH = Path("/etc/empath/empath.yaml")


def default_config_path() -> Path:
    """``$EMPATH_CONFIG`` if set and non-empty, else /etc/empath/empath.yaml.

    An empty variable counts as unset: ``Environment=EMPATH_CONFIG=`` in a unit
    override should restore the default, not point at the current directory.
    """
    return Path(os.environ.get("EMPATH_CONFIG") or DEFAULT_CONFIG_PATH)
