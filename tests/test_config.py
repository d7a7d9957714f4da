"""Tests for empath.config: validation rules, error reporting, dump round-trip."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from empath.addr import normalize_domain
from empath.config import (
    NOT_SUPPORTED_YET,
    Config,
    ConfigError,
    ConfigIssue,
    Listener,
    default_config_path,
    dump_config,
    load_config,
    load_config_text,
    parse_next_hop,
)
from empath.config.load import TOP_KEYS

REPO = Path(__file__).resolve().parent.parent
BASE = {
    "hostname": "mx.example.com",
    "postmaster": "postmaster@example.com",
    "state_dir": "/var/lib/empath",
}


def load(extra: dict[str, Any] | None = None, **kw: Any) -> Config:
    data = {**BASE, **(extra or {}), **kw}
    return load_config_text(yaml.safe_dump(data, sort_keys=False))


def issues(extra: dict[str, Any] | None = None, **kw: Any) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load(extra, **kw)
    return info.value.issues


def messages(extra: dict[str, Any] | None = None, **kw: Any) -> dict[str, str]:
    """key path → message (last one wins; tests check single issues per key)."""
    return {i.key_path: i.message for i in issues(extra, **kw)}


# --------------------------------------------------------------------- basics


def test_minimal_config_gets_defaults() -> None:
    cfg = load()
    assert cfg.hostname == "mx.example.com"
    assert cfg.postmaster == "postmaster@example.com"
    assert cfg.state_dir == Path("/var/lib/empath")
    assert cfg.listen == ()
    assert cfg.delivery.mode == "hold"
    assert cfg.workers == 2
    assert cfg.shutdown_timeout == 30.0
    assert cfg.limits.command_timeout == 300.0
    assert cfg.limits.data_timeout == 180.0
    assert cfg.tls is None
    assert cfg.source is None


def test_full_supported_config() -> None:
    text = textwrap.dedent(
        """\
        hostname: MX.Example.COM.
        postmaster: postmaster@Example.COM
        listen:
          - {address: "127.0.0.1:2525", role: smtp}
          - {address: "[::1]:2587", role: submission}
        state_dir: /var/lib/empath
        local_domains: [example.com, Example.ORG.]
        relay_networks: [127.0.0.0/8, "::1/128", 192.0.2.7]
        limits: {max_message_size: 1000, max_recipients: 5, max_connections: 10,
                 per_client_connections: 2, per_client_rate: 6, max_errors: 1,
                 min_free_space: 1, command_timeout: 30, data_timeout: 2.5}
        tls: {certificate: /etc/empath/tls/cert.pem, key: /etc/empath/tls/key.pem}
        submission: {users_file: null}
        dkim: {}
        delivery:
          mode: hold
          relayhost: null
          nameservers: []
          routes: {}
          destinations: {}
          retry_schedule: [10, 20]
          max_queue_lifetime: 3600
        control: {socket: null, token_file: null}
        metrics: {listen: null, bearer_token_file: null, web_config: null}
        log: {level: warning}
        modules: []
        workers: 64
        shutdown_timeout: 0.5
        """
    )
    cfg = load_config_text(text)
    assert cfg.hostname == "mx.example.com"
    assert cfg.postmaster == "postmaster@example.com"
    assert cfg.listen == (
        Listener("127.0.0.1", 2525, "smtp"),
        Listener("::1", 2587, "submission"),
    )
    assert cfg.listen[1].address == "[::1]:2587"
    assert cfg.local_domains == {"example.com", "example.org"}
    assert cfg.relay_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    assert cfg.limits.max_recipients == 5
    assert cfg.limits.data_timeout == 2.5
    assert cfg.tls is not None and cfg.tls.key == Path("/etc/empath/tls/key.pem")
    assert cfg.delivery.retry_schedule == (10, 20)
    assert cfg.delivery.max_queue_lifetime == 3600
    assert cfg.log.level == "warning"
    assert cfg.workers == 64
    assert cfg.shutdown_timeout == 0.5


def test_product_example_keys_are_all_known() -> None:
    """Every key of PRODUCT.md's block is known: the only refusals are features not built."""
    text = textwrap.dedent(
        """\
        hostname: mx.example.com
        postmaster: postmaster@example.com
        listen:
          - {address: "127.0.0.1:2525", role: smtp}
          - {address: "127.0.0.1:2587", role: submission}
        state_dir: /var/lib/empath
        local_domains: [example.com]
        relay_networks: [127.0.0.0/8, "::1/128"]
        limits: {max_message_size: 26214400, max_recipients: 100, max_connections: 1000,
                 per_client_connections: 20, per_client_rate: 60,
                 max_errors: 20, min_free_space: 104857600}
        tls: {certificate: /etc/empath/tls/cert.pem, key: /etc/empath/tls/key.pem}
        submission: {users_file: /etc/empath/users}
        dkim: {}
        delivery:
          mode: mx
          relayhost: null
          nameservers: []
          routes: {}
          destinations: {}
          retry_schedule: [60, 300, 900, 1800, 3600]
          max_queue_lifetime: 432000
        control: {socket: /run/empath/control.sock, token_file: null}
        metrics: {listen: "127.0.0.1:9125", bearer_token_file: null, web_config: null}
        log: {level: info}
        modules: []
        """
    )
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    got = {i.key_path: i.message for i in info.value.issues}
    # The block's local domain has no route while mode is mx: refused (it would loop).
    assert "'example.com' has no delivery.routes entry" in got.pop("local_domains")
    # Every other key of the block is built (submission.users_file included).
    assert got == {}


def test_dev_example_loads_relative_to_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # anywhere but examples/
    path = REPO / "examples" / "dev.yaml"
    cfg = load_config(path)
    assert cfg.state_dir == REPO / "examples" / "dev-state"
    assert cfg.hostname == "localhost"
    assert cfg.postmaster == "postmaster@localhost"
    assert cfg.listen == (
        Listener("127.0.0.1", 2525, "smtp"),
        Listener("127.0.0.1", 2587, "submission"),
    )
    assert cfg.local_domains == {"localhost"}
    assert [str(n) for n in cfg.relay_networks] == ["127.0.0.0/8", "::1/128"]
    assert cfg.delivery.mode == "hold"
    assert cfg.workers == 2
    assert cfg.source == path


def test_relative_state_dir_without_source_uses_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load(state_dir="spool-here").state_dir == tmp_path / "spool-here"


def test_relative_state_dir_with_relative_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config_text(yaml.safe_dump({**BASE, "state_dir": "../st"}), Path("conf/e.yaml"))
    assert cfg.state_dir == tmp_path / "conf" / ".." / "st"
    assert cfg.source == tmp_path / "conf" / "e.yaml"


# ------------------------------------------------------------ error reporting


def test_error_lines_start_with_file_and_key_path(tmp_path: Path) -> None:
    path = tmp_path / "empath.yaml"
    path.write_text(yaml.safe_dump({**BASE, "limits": {"max_recipients": "abc"}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: limits.max_recipients: expected a positive integer, got 'abc'"
    )


def test_no_source_is_labelled_config() -> None:
    with pytest.raises(ConfigError) as info:
        load(workers="x")
    assert str(info.value) == "<config>: workers: expected an integer from 1 to 64, got 'x'"


def test_all_errors_are_collected_in_document_order() -> None:
    found = issues(
        {"hostname": "bad_host", "bogus": 1, "limits": {"max_errors": 0}, "workers": 0},
        postmaster="nobody",
    )
    assert [i.key_path for i in found] == [
        "hostname",
        "postmaster",
        "limits.max_errors",
        "workers",
        "bogus",
    ]
    assert all(i.file == "<config>" for i in found)


def test_unknown_keys_at_every_level_with_suggestion() -> None:
    got = messages(
        limits={"max_recpients": 1},
        delivery={"retry_schedul": [1]},
        hostnam="x",
        log={"levle": "info", "zzzzzz": 1},
    )
    assert got["limits.max_recpients"] == "unknown key (did you mean 'max_recipients'?)"
    assert got["delivery.retry_schedul"] == "unknown key (did you mean 'retry_schedule'?)"
    assert got["hostnam"] == "unknown key (did you mean 'hostname'?)"
    assert got["log.levle"] == "unknown key (did you mean 'level'?)"
    assert got["log.zzzzzz"] == "unknown key"


def test_unknown_key_in_list_items() -> None:
    got = messages(
        listen=[{"address": "127.0.0.1:25", "role": "smtp", "rol": 1}],
        local_domains=["example.com"],
    )
    assert got == {"listen[0].rol": "unknown key (did you mean 'role'?)"}


def test_required_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("log: {level: info}\n")
    assert [(i.key_path, i.message) for i in info.value.issues] == [
        ("state_dir", "required key is missing"),
    ]


def test_hostname_and_postmaster_default_to_this_machine() -> None:
    cfg = load_config_text("state_dir: /var/lib/empath\n")
    assert cfg.hostname == socket.getfqdn().lower().rstrip(".")
    assert cfg.postmaster == f"postmaster@{cfg.hostname}"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "got an empty document"),
        ("- a\n- b\n", "got ['a', 'b']"),
        ("just a string\n", "got 'just a string'"),
    ],
)
def test_top_level_must_be_mapping(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    assert "top level must be a mapping" in str(info.value)
    assert fragment in str(info.value)


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("hostname: a\nlimits: {max_errors: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert issue.key_path == ""
    assert str(issue).startswith(f"{path}: invalid YAML: line ")


def test_duplicate_yaml_keys_are_refused() -> None:
    text = "hostname: a.example\nhostname: b.example\npostmaster: p@a.example\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    assert "duplicate key 'hostname'" in str(info.value)
    assert "line 2" in str(info.value)


def test_yaml_merge_keys_still_work() -> None:
    text = textwrap.dedent(
        """\
        hostname: mx.example.com
        postmaster: postmaster@example.com
        state_dir: /var/lib/empath
        limits: &l {max_errors: 3, max_recipients: 4}
        """
    )
    assert load_config_text(text).limits.max_errors == 3


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"hostname: caf\xe9.example\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid UTF-8" in str(info.value)


def test_config_error_str_one_line_per_issue() -> None:
    err = ConfigError([ConfigIssue("/f", "a.b", "one"), ConfigIssue("/f", "", "two")])
    assert str(err) == "/f: a.b: one\n/f: two"


# ------------------------------------------------------------------ types


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_recipients", True, "expected a positive integer, got true"),
        ("max_recipients", 1.5, "expected a positive integer, got 1.5"),
        ("max_recipients", "10", "expected a positive integer, got '10'"),
        ("max_recipients", 0, "expected a positive integer, got 0"),
        ("max_recipients", -3, "expected a positive integer, got -3"),
        ("max_recipients", None, "expected a positive integer, got null"),
        ("max_errors", 0, "expected a positive integer, got 0"),
        ("command_timeout", 0, "expected a positive number, got 0"),
        ("data_timeout", False, "expected a positive number, got false"),
        ("data_timeout", float("nan"), "expected a positive number, got nan"),
        ("data_timeout", "3m", "expected a positive number, got '3m'"),
    ],
)
def test_limit_types(key: str, value: Any, message: str) -> None:
    assert messages(limits={key: value}) == {f"limits.{key}": message}


def test_limits_timeouts_accept_ints_as_float() -> None:
    cfg = load(limits={"command_timeout": 60, "data_timeout": 0.5})
    assert cfg.limits.command_timeout == 60.0
    assert isinstance(cfg.limits.command_timeout, float)


@pytest.mark.parametrize(
    ("value", "ok"), [(1, True), (64, True), (0, False), (65, False), (True, False)]
)
def test_workers_range(value: Any, ok: bool) -> None:
    if ok:
        assert load(workers=value).workers == value
    else:
        assert "workers" in messages(workers=value)


def test_shutdown_timeout() -> None:
    assert load(shutdown_timeout=5).shutdown_timeout == 5.0
    assert messages(shutdown_timeout=0) == {"shutdown_timeout": "expected a positive number, got 0"}


@pytest.mark.parametrize(
    ("section", "value"),
    [("limits", [1]), ("delivery", "hold"), ("log", "info"), ("tls", "yes")],
)
def test_sections_must_be_mappings(section: str, value: Any) -> None:
    got = messages({section: value})
    assert list(got) == [section]
    assert got[section].startswith("expected a mapping, got ")


def test_null_sections_mean_defaults() -> None:
    cfg = load(limits=None, delivery=None, log=None, listen=None, local_domains=None, modules=None)
    assert cfg.limits == type(cfg.limits)()
    assert cfg.listen == ()


def test_non_string_keys() -> None:
    got = messages(limits={1: 2})
    assert got == {"limits.1": "keys must be strings, got 1"}


# -------------------------------------------------------- hostname/postmaster


def test_hostname_normalised() -> None:
    assert load(hostname="MX.Bücher.Example.").hostname == "mx.xn--bcher-kva.example"


@pytest.mark.parametrize("value", ["", "bad host", "-x.example", "1.2.3.4", 5, None])
def test_hostname_invalid(value: Any) -> None:
    assert "hostname" in messages(hostname=value)


def test_postmaster() -> None:
    assert load(postmaster="Postmaster@EXAMPLE.com").postmaster == "Postmaster@example.com"
    assert "postmaster" in messages(postmaster="no-at-sign")
    assert "postmaster" in messages(postmaster="a@-bad-")


# ---------------------------------------------------------------- state_dir


@pytest.mark.parametrize(
    "value", ["/etc/empath", "/usr/local/empath", "/", "/var", "/proc/1", "/etc/../etc/x"]
)
def test_state_dir_in_system_location(value: str) -> None:
    assert "state_dir" in messages(state_dir=value)


def test_state_dir_relative_into_system_location(tmp_path: Path) -> None:
    text = yaml.safe_dump({**BASE, "state_dir": "../../../../../../../../../etc/x"})
    with pytest.raises(ConfigError) as info:
        load_config_text(text, tmp_path / "e.yaml")
    assert info.value.issues[0].key_path == "state_dir"
    assert "inside the system directory /etc" in info.value.issues[0].message


@pytest.mark.parametrize("value", ["~/spool", "", 3, ["/a"]])
def test_state_dir_invalid(value: Any) -> None:
    assert "state_dir" in messages(state_dir=value)


# -------------------------------------------------------------------- listen


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:25", "127.0.0.1", 25),
        ("0.0.0.0:2525", "0.0.0.0", 2525),
        ("[::]:25", "::", 25),
        ("[2001:DB8::1]:65535", "2001:db8::1", 65535),
    ],
)
def test_listen_ok(address: str, host: str, port: int) -> None:
    (lst,) = load(listen=[{"address": address, "role": "smtp"}]).listen
    assert (lst.host, lst.port, lst.role) == (host, port, "smtp")


@pytest.mark.parametrize(
    "address",
    [
        "localhost:25",  # not a literal IP
        "127.0.0.1",  # no port
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:smtp",
        "::1:25",  # IPv6 without brackets
        "[::1]",
        "[127.0.0.1]:25",
        "[::1]x25",
        "[::1:25",
        ":25",
        25,
    ],
)
def test_listen_bad_address(address: Any) -> None:
    assert list(messages(listen=[{"address": address, "role": "smtp"}])) == ["listen[0].address"]


def test_listen_role_and_shape() -> None:
    got = messages(
        listen=[
            {"address": "127.0.0.1:25", "role": "smtps"},
            {"address": "127.0.0.1:26"},
            "127.0.0.1:27",
            None,
        ]
    )
    assert got["listen[0].role"] == "expected one of 'smtp', 'submission', got 'smtps'"
    assert got["listen[1].role"] == "required key is missing"
    assert got["listen[2]"] == "expected a mapping, got '127.0.0.1:27'"
    assert got["listen[3]"] == "expected a mapping, got null"


def test_listen_duplicates_refused() -> None:
    got = messages(
        listen=[
            {"address": "[::1]:25", "role": "smtp"},
            {"address": "[0:0::1]:25", "role": "submission"},
        ]
    )
    assert got == {"listen[1].address": "duplicate of listen[0].address"}


def test_listen_must_be_list() -> None:
    assert messages(listen={"address": "127.0.0.1:25"}) == {
        "listen": "expected a list, got {'address': '127.0.0.1:25'}"
    }


# ------------------------------------------------------ domains and networks


def test_local_domains_normalised() -> None:
    cfg = load(local_domains=["Example.COM.", "bücher.example", "xn--bcher-kva.example"])
    assert cfg.local_domains == {"example.com", "xn--bcher-kva.example"}


def test_local_domains_errors_name_the_index() -> None:
    got = messages(local_domains=["ok.example", "bad_domain", 7])
    assert set(got) == {"local_domains[1]", "local_domains[2]"}


def test_relay_networks_strict() -> None:
    got = messages(relay_networks=["10.0.0.1/8", "2001:db8::1/32", "nonsense", "10.0.0.0/33"])
    assert got["relay_networks[0]"] == "'10.0.0.1/8' has host bits set; did you mean '10.0.0.0/8'?"
    assert "2001:db8::/32" in got["relay_networks[1]"]
    assert "invalid network 'nonsense'" in got["relay_networks[2]"]
    assert "invalid network '10.0.0.0/33'" in got["relay_networks[3]"]


# ----------------------------------------------------------------------- tls


def test_tls() -> None:
    cfg = load(tls={"certificate": "/c.pem", "key": "/k.pem"})
    assert cfg.tls is not None and cfg.tls.certificate == Path("/c.pem")
    assert load(tls=None).tls is None
    got = messages(tls={"certificate": "cert.pem"})
    assert got == {
        "tls.certificate": "expected an absolute path, got 'cert.pem'",
        "tls.key": "required key is missing",
    }


def test_tls_files_not_checked_for_existence() -> None:
    cfg = load(tls={"certificate": "/nonexistent/c.pem", "key": "/nonexistent/k.pem"})
    assert cfg.tls is not None


# ----------------------------------------------------------------- delivery


def test_delivery_mode_values() -> None:
    assert messages(delivery={"mode": "smtp"}) == {
        "delivery.mode": "expected one of 'mx', 'relay', 'hold', got 'smtp'"
    }


def test_relayhost_rules() -> None:
    got = messages(delivery={"mode": "relay"})
    assert got["delivery.relayhost"] == "required when mode is 'relay' (HOST:PORT)"
    got = messages(delivery={"mode": "hold", "relayhost": "smtp.example:587"})
    assert got == {"delivery.relayhost": "only used with mode 'relay', but mode is 'hold'"}
    got = messages(delivery={"mode": "relay", "relayhost": "bad host:587"})
    assert "delivery.relayhost" in got
    assert "not supported yet" not in got["delivery.relayhost"]


def test_retry_schedule_and_lifetime() -> None:
    assert messages(delivery={"retry_schedule": []}) == {
        "delivery.retry_schedule": (
            "expected a non-empty list of positive integers (seconds), got []"
        )
    }
    got = messages(delivery={"retry_schedule": [60, 0, "x"], "max_queue_lifetime": 1.5})
    assert set(got) == {
        "delivery.retry_schedule[1]",
        "delivery.retry_schedule[2]",
        "delivery.max_queue_lifetime",
    }


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("smtp:127.0.0.1:2626", "smtp:127.0.0.1:2626"),
        ("smtp:Mail.Example.COM", "smtp:mail.example.com"),
        ("smtp:[::1]:25", "smtp:[::1]:25"),
        ("smtp:[2001:DB8::1]", "smtp:[2001:db8::1]"),
        ("lmtp:127.0.0.1:24", "lmtp:127.0.0.1:24"),
        ("lmtp:[::1]:24", "lmtp:[::1]:24"),
        ("lmtp:/run/dovecot/lmtp", "lmtp:/run/dovecot/lmtp"),
        ("maildir:/var/mail/corp/", "maildir:/var/mail/corp"),
        ("mx:Relay.Partner.Example.", "mx:relay.partner.example"),
        ("SMTP:a.example", "smtp:a.example"),
    ],
)
def test_next_hop_grammar_ok(text: str, canonical: str) -> None:
    assert str(parse_next_hop(text)) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:25",  # no transport
        "smtp:",
        "smtp:::1:25",
        "smtp:host:0",
        "smtp:bad host",
        "lmtp:127.0.0.1",  # TCP LMTP needs a port
        "lmtp:run/dovecot",
        "maildir:relative",
        "maildir:",
        "mx:",
        "mx:1.2.3.4",
        "uucp:host",
    ],
)
def test_next_hop_grammar_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_next_hop(text)


def test_routes_validated_before_refused() -> None:
    got = messages(delivery={"routes": {"a.example": "lmtp:host", "B.example": "smtp:x"}})
    assert got == {
        "delivery.routes[a.example]": (
            "next hop 'lmtp:host': LMTP over TCP needs a port (lmtp:HOST:PORT), "
            "or give an absolute socket path (lmtp:/run/dovecot/lmtp)"
        )
    }
    # Syntactically fine: kept in canonical form (domain normalised, port explicit
    # only when given).
    cfg = load(delivery={"routes": {"B.example.": "smtp:x.example", "c.example": "smtp:[::1]:26"}})
    assert cfg.delivery.routes == {"b.example": "smtp:x.example", "c.example": "smtp:[::1]:26"}


def test_local_domain_needs_a_route_when_delivering() -> None:
    got = messages(local_domains=["a.example", "b.example"],
                   delivery={"mode": "mx", "routes": {"a.example": "maildir:/var/mail/a"}})
    assert got == {"local_domains": (
        "'b.example' has no delivery.routes entry; with mode 'mx' mail accepted for it "
        "would loop back or bounce (add e.g. 'b.example: maildir:/var/mail/b.example' "
        "or an lmtp: route)")}
    # hold delivers nothing, so nothing can loop.
    assert load(local_domains=["b.example"], delivery={"mode": "hold"}).local_domains == {
        "b.example"}
    cfg = load(local_domains=["a.example"],
               delivery={"mode": "mx", "mx_port": 2526,
                         "routes": {"a.example": "lmtp:127.0.0.1:24"}})
    assert cfg.delivery.mx_port == 2526


def test_routes_duplicate_domain_spellings() -> None:
    got = messages(
        delivery={"routes": {"example.com": "smtp:a.example", "EXAMPLE.com.": "smtp:b.example"}}
    )
    assert got == {
        "delivery.routes[EXAMPLE.com.]": "same domain as 'example.com' (both are example.com)"
    }


def test_destinations_validated() -> None:
    got = messages(
        delivery={
            "destinations": {
                "a.example": {"tls": "must", "max_connections": 0, "rate": -1, "x": 1},
                "bad domain": {},
            }
        }
    )
    assert set(got) == {
        "delivery.destinations[a.example].tls",
        "delivery.destinations[a.example].max_connections",
        "delivery.destinations[a.example].rate",
        "delivery.destinations[a.example].x",
        "delivery.destinations[bad domain]",
    }


def test_destination_dnssec_policy() -> None:
    """``dnssec: may`` (default) | ``require`` per destination (docs/dnssec.md)."""
    cfg = load(delivery={"destinations": {"Bank.example": {"dnssec": "require"},
                                          "b.example": {"tls": "verify"}}})
    assert cfg.delivery.destinations["bank.example"].dnssec == "require"
    assert cfg.delivery.destinations["b.example"].dnssec == "may"
    got = messages(delivery={"destinations": {"a.example": {"dnssec": "yes"},
                                              "b.example": {"dnssec": True}}})
    assert set(got) == {"delivery.destinations[a.example].dnssec",
                        "delivery.destinations[b.example].dnssec"}
    assert "'may', 'require'" in got["delivery.destinations[a.example].dnssec"]


def test_nameservers_validated() -> None:
    got = messages(delivery={"nameservers": ["127.0.0.1:5353", "dns.example", "::1", "[::1]:0"]})
    assert set(got) == {
        "delivery.nameservers[1]",
        "delivery.nameservers[2]",
        "delivery.nameservers[3]",
    }


# ---------------------------------------------------- other sections, syntax


def test_dkim_modules_metrics_control_syntax() -> None:
    got = messages(
        dkim={"a.example": {"selector": "s_1", "key": "rel.key"}, "b.example": "x"},
        modules=[{"options": []}, "name"],
        metrics={"listen": "localhost:9125", "web_config": "web.yml"},
        control={"socket": "control.sock"},
        submission={"users_file": 1},
        log={"level": "verbose"},
    )
    assert set(got) == {
        "dkim[a.example].selector",
        "dkim[a.example].key",
        "dkim[b.example]",
        "modules[0].name",
        "modules[0].options",
        "modules[1]",
        "metrics.listen",
        "metrics.web_config",
        "control.socket",
        "submission.users_file",
        "log.level",
    }
    assert not any("not supported yet" in m for m in got.values())


# ------------------------------------------------------- not supported yet


# Empty since modules landed: every key of PRODUCT.md is built. A key added to
# features.NOT_SUPPORTED_YET needs an example here.
UNSUPPORTED_EXAMPLES: dict[str, dict[str, Any]] = {}


def test_every_table_entry_has_an_example() -> None:
    assert {e.key_path for e in NOT_SUPPORTED_YET} == set(UNSUPPORTED_EXAMPLES)


def test_not_supported_yet() -> None:
    for key_path, example in sorted(UNSUPPORTED_EXAMPLES.items()):
        by_path = {i.key_path: i.message for i in issues(example)}
        assert key_path in by_path
        assert "not supported yet" in by_path[key_path]
        assert all("not supported yet" in m for m in by_path.values())


def test_modules_keys_are_built(tmp_path: Path) -> None:
    """Modules landed: each entry is kept with its options, fail_open and timeout,
    once the module is found and its options accepted (tests/test_modules.py)."""
    users = tmp_path / "recipients"
    users.write_text("alice@example.com\n")
    cfg = load(modules=[{"name": "recipient_map", "options": {"path": str(users)},
                         "fail_open": True, "timeout": 2}])
    (spec,) = cfg.modules
    assert (spec.name, spec.options, spec.fail_open, spec.timeout) == (
        "recipient_map", {"path": str(users)}, True, 2.0)


def test_dkim_keys_are_built() -> None:
    """DKIM landed: the key is kept (files are read by the daemon, not here), with the
    default list of headers to sign unless one is given."""
    cfg = load(dkim={"Example.COM.": {"selector": "S1", "key": "/etc/empath/dkim/k"},
                     "example.org": {"selector": "s2", "key": "/k2",
                                     "headers": ["from", "Subject", "X-Custom"]}})
    assert cfg.dkim["example.com"]["selector"] == "s1"
    assert str(cfg.dkim["example.com"]["key"]) == "/etc/empath/dkim/k"
    assert cfg.dkim["example.com"]["headers"][:2] == ("From", "To")
    assert cfg.dkim["example.org"]["headers"] == ("from", "Subject", "X-Custom")


def test_dkim_headers_validated() -> None:
    got = messages(dkim={
        "a.example": {"selector": "s1", "key": "/k", "headers": ["Subject"]},
        "b.example": {"selector": "s1", "key": "/k",
                      "headers": ["From", "Received", "from", "Bad Name", 3]},
        "c.example": {"selector": "s1", "key": "/k", "headers": "From"},
    })
    assert "must include From" in got["dkim[a.example].headers"]
    assert "must not be signed" in got["dkim[b.example].headers[1]"]
    assert "listed twice" in got["dkim[b.example].headers[2]"]
    assert "not a header field name" in got["dkim[b.example].headers[3]"]
    assert "dkim[b.example].headers[4]" in got
    assert "dkim[c.example].headers" in got
    assert not any("not supported yet" in m for m in got.values())


def test_metrics_keys_are_built() -> None:
    """Metrics landed: its keys load and are kept, none is refused."""
    cfg = load(metrics={"listen": "127.0.0.1:9125", "bearer_token_file": "/etc/empath/mt",
                        "web_config": "/etc/empath/web.yml"})
    assert cfg.metrics.listen == "127.0.0.1:9125"
    assert str(cfg.metrics.bearer_token_file) == "/etc/empath/mt"
    assert str(cfg.metrics.web_config) == "/etc/empath/web.yml"


def test_delivery_keys_are_built() -> None:
    """Delivery landed: its keys load and are kept, none is refused."""
    cfg = load(delivery={
        "mode": "relay", "relayhost": "smarthost.example:587",
        "nameservers": ["127.0.0.1:5353"],
        "routes": {"example.test": "smtp:127.0.0.1:2626"},
        "destinations": {"example.com": {"tls": "verify", "max_connections": 5, "rate": 10}},
    })
    d = cfg.delivery
    assert (d.mode, d.relayhost, d.nameservers) == ("relay", "smarthost.example:587",
                                                    ("127.0.0.1:5353",))
    assert d.routes == {"example.test": "smtp:127.0.0.1:2626"}
    assert d.destinations["example.com"].tls == "verify"
    assert d.destinations["example.com"].max_connections == 5


@pytest.mark.parametrize(
    "empty",
    [
        {"delivery": {"mode": "hold", "relayhost": None, "nameservers": [], "routes": {}}},
        {"delivery": {"destinations": None}},
        {"dkim": {}, "modules": [], "submission": {"users_file": None}},
        {"control": {"socket": None, "token_file": None}},
        {"metrics": {"listen": None, "bearer_token_file": None, "web_config": None}},
    ],
)
def test_empty_unsupported_keys_are_fine(empty: dict[str, Any]) -> None:
    load(empty)


# ----------------------------------------------------------- dump / paths


def test_dump_round_trip_full() -> None:
    cfg = load(
        hostname="Mx.Bücher.Example",
        listen=[
            {"address": "127.0.0.1:25", "role": "smtp"},
            {"address": "[::1]:587", "role": "submission"},
        ],
        local_domains=["b.example", "a.example", "yes.example"],
        relay_networks=["::1/128", "10.0.0.0/8"],
        limits={"data_timeout": 12.5, "max_errors": 3},
        tls={"certificate": "/etc/empath/c.pem", "key": "/etc/empath/k.pem"},
        log={"level": "debug"},
        workers=3,
    )
    dumped = dump_config(cfg)
    again = load_config_text(dumped)
    assert again == cfg
    # Every top-level key is shown, defaults included.
    assert list(yaml.safe_load(dumped)) == list(TOP_KEYS)


def test_dump_has_source_comment(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path)
    dumped = dump_config(cfg)
    assert dumped.startswith(f"# effective configuration loaded from {path}\n")
    assert load_config_text(dumped, path) == cfg


def test_dev_example_round_trips() -> None:
    cfg = load_config(REPO / "examples" / "dev.yaml")
    again = load_config_text(dump_config(cfg))
    assert dataclasses.replace(again, source=cfg.source) == cfg


def test_default_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMPATH_CONFIG", raising=False)
    assert default_config_path() == Path("/etc/empath/empath.yaml")
    monkeypatch.setenv("EMPATH_CONFIG", "")
    assert default_config_path() == Path("/etc/empath/empath.yaml")
    monkeypatch.setenv("EMPATH_CONFIG", "/srv/e.yaml")
    assert default_config_path() == Path("/srv/e.yaml")


# ------------------------------------------------------------ properties

_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789äöüéñçå"
_labels = st.text(alphabet=_LETTERS, min_size=1, max_size=12)
_tlds = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=6)
_domains = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(_labels, min_size=1, max_size=3),
    _tlds,
)


@st.composite
def _spellings(draw: Callable[[st.SearchStrategy[Any]], Any], domain: str) -> str:
    # (not st.DrawFn: Debian bookworm's hypothesis 6.36 predates it)
    """One of the many ways an operator might write ``domain``."""
    form = draw(st.sampled_from(["u", "a"]))
    text = domain if form == "u" else domain.encode("idna").decode("ascii")
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    text = "".join(c.upper() if f else c for c, f in zip(text, flips, strict=True))
    if draw(st.booleans()):
        text += "."
    return text


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), _domains)
def test_domain_spellings_normalise_to_one(data: st.DataObject, domain: str) -> None:
    spellings = data.draw(st.lists(_spellings(domain), min_size=1, max_size=5))
    cfg = load(local_domains=spellings, hostname=spellings[0])
    assert cfg.local_domains == {normalize_domain(domain)}
    assert cfg.hostname == normalize_domain(domain)
    assert cfg.hostname.isascii() and cfg.hostname == cfg.hostname.lower()
    # As mapping keys, two spellings of one domain are a conflict, never two routes.
    if len(set(spellings)) > 1:
        routes = {s: "smtp:127.0.0.1:25" for s in spellings}
        assert any("same domain as" in m for m in messages(delivery={"routes": routes}).values())


_networks = st.one_of(
    st.builds(
        lambda a, p: ipaddress.ip_network((a, p), strict=False),
        st.ip_addresses(v=4),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, p: ipaddress.ip_network((a, p), strict=False),
        st.ip_addresses(v=6),
        st.integers(0, 128),
    ),
)


@settings(max_examples=100)
@given(
    domains=st.lists(_domains, max_size=4),
    networks=st.lists(_networks, max_size=4),
    limit=st.integers(1, 2**40),
    timeout=st.floats(min_value=1e-3, max_value=1e6, allow_nan=False),
    ports=st.lists(st.integers(1, 65535), unique=True, max_size=3),
    v6=st.booleans(),
)
def test_dump_round_trip_property(
    domains: list[str],
    networks: list[Any],
    limit: int,
    timeout: float,
    ports: list[int],
    v6: bool,
) -> None:
    host = "[::1]" if v6 else "127.0.0.1"
    cfg = load(
        local_domains=domains,
        relay_networks=[str(n) for n in networks],
        limits={"max_message_size": limit, "command_timeout": timeout},
        listen=[{"address": f"{host}:{p}", "role": "smtp"} for p in ports],
    )
    assert load_config_text(dump_config(cfg)) == cfg


_yaml_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        ["127.0.0.1:25", "[::1]:25", "example.com", "/abs", "smtp", "hold", "smtp:x.example"]
    ),
)
_yaml_values = st.recursive(
    _yaml_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.one_of(
                st.sampled_from(["address", "role", "tls", "name", "a.example"]),
                st.text(max_size=6),
            ),
            children,
            max_size=3,
        ),
    ),
    max_leaves=10,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*TOP_KEYS, "extra"]), _yaml_values, max_size=8))
def test_arbitrary_input_gives_config_or_config_error(data: dict[str, Any]) -> None:
    """Whatever the file contains, the loader answers with a Config or a ConfigError
    whose issues all carry the file label; it never crashes with another exception."""
    try:
        load_config_text(yaml.safe_dump(data))
    except ConfigError as exc:
        assert exc.issues
        assert all(str(i).startswith("<config>: ") for i in exc.issues)


def test_destination_dnssec_survives_the_dump_round_trip() -> None:
    cfg = load(delivery={"destinations": {"a.example": {"dnssec": "require"}}})
    assert cfg.delivery.destinations["a.example"].dnssec == "require"
    assert load_config_text(dump_config(cfg)) == dataclasses.replace(cfg, source=None)
