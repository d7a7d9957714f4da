"""Static checks of the Ansible role that need no Ansible: its variables are all
documented, with the defaults they really have. (The role itself is tested on booted
Debian 12 containers by scripts/molecule-test.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

ROLE = Path(__file__).resolve().parents[1] / "ansible/roles/empath"


def load(rel: str) -> Any:
    return yaml.safe_load((ROLE / rel).read_text())


def spec_options() -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = load("meta/argument_specs.yml")["argument_specs"][
        "main"]["options"]
    return options


def test_every_default_is_documented_and_every_documented_variable_has_a_default() -> None:
    defaults = load("defaults/main.yml")
    assert sorted(defaults) == sorted(spec_options())


def test_documented_defaults_are_the_real_ones() -> None:
    defaults = load("defaults/main.yml")
    wrong = {name: (opt.get("default"), defaults[name])
             for name, opt in spec_options().items() if opt.get("default") != defaults[name]}
    assert wrong == {}


def test_every_variable_has_a_type_and_a_description_and_choices_hold_the_default() -> None:
    for name, opt in spec_options().items():
        assert opt.get("type"), name
        assert opt.get("description"), name
        if "choices" in opt:
            assert opt["default"] in opt["choices"], name


def test_secrets_are_marked_no_log() -> None:
    opts = spec_options()
    assert opts["empath_tls_key"].get("no_log") is True
    assert opts["empath_metrics_token"].get("no_log") is True


def _filters() -> Any:
    spec = importlib.util.spec_from_file_location("empath_role_filters",
                                                  ROLE / "filter_plugins/empath.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FilterModule().filters()["empath_restart_only"]


def test_restart_only_keys_of_a_config() -> None:
    restart_only = _filters()
    a = {"state_dir": "/var/lib/empath", "metrics": {"listen": "127.0.0.1:9125"},
         "log": {"level": "info"}}
    assert restart_only(a) == {"listen": None, "state_dir": "/var/lib/empath",
                               "workers": None, "control.socket": None,
                               "metrics.listen": "127.0.0.1:9125"}
    # A reloadable key does not count; a restart-only one does.
    assert restart_only(a) == restart_only(a | {"log": {"level": "debug"}})
    assert restart_only(a) != restart_only(a | {"metrics": {"listen": "127.0.0.1:9126"}})
    # The packaged default file, an empty file, and garbage.
    assert restart_only(None) == restart_only({}) == restart_only("text")
