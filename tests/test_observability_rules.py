"""The shipped monitoring in docs/observability/ works and matches the daemon's metrics.

promtool (Debian package ``prometheus``) checks the alert rules and runs their unit
tests; every query in the rules and the Grafana dashboard may only use the metric
names of the metrics contract, so renaming a metric in the daemon without updating
the monitoring (or the other way round) fails here. Every alert must have a unit
test that fires, one that stays silent, and a runbook section in the README.

Without promtool the promtool tests skip on a laptop and fail under CI=true.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI

DOCS = Path(__file__).resolve().parent.parent / "docs" / "observability"
RULES = DOCS / "alerts.yml"
RULE_TESTS = DOCS / "alerts.test.yml"
DASHBOARD = DOCS / "empath-dashboard.json"
README = DOCS / "README.md"
PROMETHEUS_EXAMPLE = DOCS / "prometheus.yml.example"

# The metrics contract (.helpers/metrics-contract.md, README.md's metric reference):
# name → {label: its values, or None when the set is bounded but not fixed}. Kept here,
# not read from the docs, so that a rename anywhere is caught.
LISTENER = ("smtp", "submission")
NEXTHOP = ("mx", "smtp", "lmtp", "maildir")
CONTRACT: tuple[tuple[str, dict[str, tuple[str, ...] | None]], ...] = (
    ("empath_build_info", {"version": None, "python": None}),
    ("empath_smtp_connections_total", {"listener": LISTENER}),
    ("empath_smtp_connections_refused_total",
     {"listener": LISTENER, "reason": ("max_connections", "per_client", "rate")}),
    ("empath_smtp_sessions_active", {"listener": LISTENER}),
    ("empath_smtp_listeners_open", {"listener": LISTENER}),
    ("empath_messages_received_total", {"listener": LISTENER}),
    ("empath_messages_received_bytes_total", {"listener": LISTENER}),
    ("empath_messages_rejected_total",
     {"reason": ("relay", "size", "syntax", "policy", "smuggling", "storage")}),
    ("empath_smtp_tls_sessions_total", {"listener": LISTENER, "version": ("TLSv1.2", "TLSv1.3")}),
    ("empath_delivery_attempts_total",
     {"result": ("delivered", "deferred", "bounced"), "nexthop": NEXTHOP}),
    ("empath_delivery_duration_seconds", {"nexthop": NEXTHOP}),
    ("empath_queue_residence_seconds", {"result": ("delivered", "bounced")}),
    ("empath_queue_messages", {"state": ("pending", "active", "deferred", "held")}),
    ("empath_queue_oldest_message_age_seconds", {}),
    ("empath_destination_active_deliveries", {"destination": None}),
    ("empath_destination_circuit_breaker_open", {"destination": None}),
    ("empath_circuit_breakers_open", {}),
    ("empath_dns_lookups_total",
     {"type": ("MX", "A", "AAAA"), "result": ("ok", "nxdomain", "nodata", "error")}),
    ("empath_dns_cache_hits_total", {"type": ("MX", "A", "AAAA")}),
    ("empath_delivery_tls_sessions_total", {"version": ("TLSv1.2", "TLSv1.3", "none")}),
    ("empath_dsn_sent_total", {"action": ("failed", "delayed", "delivered")}),
    ("empath_config_reloads_total", {"result": ("success", "failure")}),
    ("empath_config_last_reload_success", {}),
    ("empath_config_last_reload_timestamp_seconds", {}),
    ("empath_spool_filesystem_free_bytes", {}),
    ("empath_spool_filesystem_size_bytes", {}),
    ("empath_worker_processes", {}),
    ("empath_start_time_seconds", {}),
)
CONTRACT_METRICS = tuple(name for name, _ in CONTRACT)
CONTRACT_HISTOGRAMS = ("empath_delivery_duration_seconds", "empath_queue_residence_seconds")
# A histogram is queried through its series, never by its bare name.
ALLOWED_METRICS = frozenset(
    {m for m in CONTRACT_METRICS if m not in CONTRACT_HISTOGRAMS}
    | {h + s for h in CONTRACT_HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    | {"up"}
)
TARGET_LABELS = ("instance", "job")   # added by the scrape


def series_labels(metric: str) -> dict[str, tuple[str, ...] | None]:
    """The labels of one series name (a histogram's _bucket also has le)."""
    if metric == "up":
        return {}
    base = re.sub(r"_(bucket|sum|count)$", "", metric) if metric not in CONTRACT_METRICS else metric
    labels = dict(dict(CONTRACT).get(base, {}))
    if metric.endswith("_bucket") and base in CONTRACT_HISTOGRAMS:
        labels["le"] = None
    return labels


SEVERITIES = ("critical", "warning", "info")


# ---- promtool ------------------------------------------------------------------

def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is not installed (Debian package prometheus; scripts/install-test-deps)"
        if IN_CI:
            pytest.fail(f"{reason}; it is required under CI=true", pytrace=False)
        pytest.skip(reason)
    return path


def run_promtool(*args: str, cwd: Path = DOCS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def test_promtool_check_rules_accepts_the_alerts() -> None:
    proc = run_promtool("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout + proc.stderr


def test_promtool_unit_tests_of_every_alert_pass() -> None:
    proc = run_promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each dashboard query, with Grafana's variables filled in, goes through
    promtool's PromQL parser as a recording rule; a typo would show only as an empty
    panel in Grafana."""
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
             for i, (_, expr) in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_scrape_config_is_valid_with_token_and_rules(tmp_path: Path) -> None:
    """The example, with its /etc/prometheus paths pointed at real files, is a
    configuration Prometheus accepts: bearer token file, job empath, the rules."""
    text = PROMETHEUS_EXAMPLE.read_text()
    config = yaml.safe_load(text)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "empath"]
    assert job["authorization"]["credentials_file"]
    shutil.copy(RULES, tmp_path / "empath-alerts.yml")
    (tmp_path / "empath-metrics.token").write_text("s3cret-token\n")
    (tmp_path / "prometheus.yml").write_text(text.replace("/etc/prometheus/", f"{tmp_path}/"))
    proc = run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout + proc.stderr


# ---- metric names --------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:[smhdwy]|ms)*|0x[0-9a-fA-F]+)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on",
                       "ignoring", "group_left", "group_right", "inf", "nan", "atan2",
                       # aggregations, which may take their clause before the "("
                       "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                       "count_values", "bottomk", "topk", "quantile"})


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not
    functions (followed by a parenthesis), keywords, label names inside {…} or
    (…) grouping clauses, or range durations."""
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", "1", expr)   # Grafana variables
    names: set[str] = set()
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)
              if not m.group().isspace()]
    depth_braces = 0
    grouping = 0          # inside by (…), on (…) and the like: label names
    paren_stack: list[bool] = []
    for i, (kind, text) in enumerate(tokens):
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "{":
            depth_braces += 1
        elif text == "}":
            depth_braces -= 1
        elif text == "(":
            prev = tokens[i - 1][1].lower() if i else ""
            is_grouping = prev in {"by", "without", "on", "ignoring", "group_left",
                                   "group_right"}
            paren_stack.append(is_grouping)
            grouping += is_grouping
        elif text == ")":
            if paren_stack and paren_stack.pop():
                grouping -= 1
        elif kind == "ident" and not depth_braces and not grouping:
            if text.lower() in _KEYWORDS or nxt == "(":
                continue
            names.add(text)
    return names


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (instance) (rate(empath_dns_lookups_total{type="MX"}[5m])) > 0',
     {"empath_dns_lookups_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(empath_delivery_duration_seconds_bucket[1h])))",
     {"empath_delivery_duration_seconds_bucket"}),
    ('a_metric / on (instance) group_left (version) empath_build_info offset 5m and up == 0',
     {"a_metric", "empath_build_info", "up"}),
    ('time() - empath_start_time_seconds{instance=~"$instance"} > 1e3',
     {"empath_start_time_seconds"}),
])
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_queries_use_only_contract_metric_names() -> None:
    exprs = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()] + dashboard_exprs()
    assert len(exprs) > 40
    unknown = {where: sorted(metric_names(e) - ALLOWED_METRICS) for where, e in exprs}
    assert not {w: n for w, n in unknown.items() if n}, "metric names outside the contract"
    # The same with the plain pattern, which also sees template queries such as
    # label_values(empath_build_info, instance).
    plain = {n for _, e in exprs for n in re.findall(r"empath_[a-z_]+", e)}
    assert plain <= ALLOWED_METRICS, sorted(plain - ALLOWED_METRICS)
    # Every metric of the contract is shown or alerted on somewhere.
    used = {n for _, e in exprs for n in metric_names(e)} | plain
    missing = [m for m in CONTRACT_METRICS
               if m not in used and not any(m + s in used for s in ("_bucket", "_sum", "_count"))]
    assert not missing, f"contract metrics nobody looks at: {missing}"


_SELECTOR = re.compile(r"\b(empath_[a-z_]+|up)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def label_problems(expr: str, templates: str = "") -> list[str]:
    """Labels and label values that the contract does not give the selected metrics:
    a typo such as result="defered" matches nothing, and the panel or alert stays
    empty without any error. ``templates`` holds legends ({{label}}) or annotations
    ($labels.label) shown for the result."""
    known = set(TARGET_LABELS)
    for metric in metric_names(expr):
        known |= set(series_labels(metric))
    problems = []
    for sel in _SELECTOR.finditer(expr):
        labels: dict[str, tuple[str, ...] | None] = dict.fromkeys(TARGET_LABELS)
        labels.update(series_labels(sel.group(1)))
        for name, op, value in _MATCHER.findall(sel.group(2)):
            if name not in labels:
                problems.append(f"{sel.group(1)} has no label {name}")
                continue
            allowed = labels[name]
            if allowed is None or "$" in value:
                continue
            if op in ("=~", "!~"):
                if re.search(r"[\\.*+?()\[\]{}^]", value):
                    continue   # a real pattern, not a list of values
                values = value.split("|")
            else:
                values = [value]
            problems += [f"{sel.group(1)}{{{name}}} has no value {v!r}"
                         for v in values if v not in allowed]
    for clause in _GROUPING.finditer(expr):
        problems += [f"grouping by unknown label {label}"
                     for label in (x.strip() for x in clause.group(1).split(","))
                     if label and label not in known]
    shown = re.findall(r"\{\{\s*(\w+)\s*\}\}", templates)
    shown += re.findall(r"\$labels\.(\w+)", templates)
    problems += [f"shows unknown label {label}" for label in shown if label not in known]
    return problems


@pytest.mark.parametrize("expr", [
    'sum(rate(empath_delivery_attempts_total{result="defered"}[5m]))',
    'empath_queue_messages{status="pending"}',
    'sum by (listener) (empath_queue_messages)',
    'empath_dsn_sent_total{action=~"failed|bounced"}',
])
def test_label_check_catches_typos(expr: str) -> None:
    assert label_problems(expr)


def test_queries_use_only_contract_labels_and_values() -> None:
    problems = {}
    for rule in alert_rules():
        shown = " ".join(rule["annotations"].values())
        problems[f"alert {rule['alert']}"] = label_problems(rule["expr"], shown)
    for where, expr, legend in dashboard_targets():
        problems[where] = label_problems(expr, legend)
    assert not {w: p for w, p in problems.items() if p}


# ---- the alerts ----------------------------------------------------------------

def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    (group,) = doc["groups"]
    assert group["name"] == "empath"
    return [r for r in group["rules"] if "alert" in r]


def rule_test_cases() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(test group, alert_rule_test case) pairs from alerts.test.yml."""
    doc = yaml.safe_load(RULE_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    for group in doc["tests"]:
        for case in group.get("alert_rule_test", []):
            yield group, case


def test_every_alert_has_for_severity_and_annotations() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], rule["alert"]


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    fires: dict[str, int] = {}
    silent: dict[str, int] = {}
    rules = {r["alert"]: r for r in alert_rules()}
    for group, case in rule_test_cases():
        name = case["alertname"]
        assert name in rules, f"test for an alert that does not exist: {name}"
        expected = case.get("exp_alerts") or []
        if expected:
            fires[name] = fires.get(name, 0) + 1
            for alert in expected:
                assert alert["exp_labels"]["severity"] == rules[name]["labels"]["severity"]
                assert set(alert["exp_annotations"]) == set(rules[name]["annotations"]), name
        else:
            # A silent case must feed the alert's own metrics, not an empty database.
            fed = {metric_names(s["series"]).pop() for s in group["input_series"]}
            assert fed & metric_names(rules[name]["expr"]), f"{name}: silent case has no input"
            silent[name] = silent.get(name, 0) + 1
    assert sorted(set(rules) - set(fires)) == [], "alerts without a case where they fire"
    assert sorted(set(rules) - set(silent)) == [], "alerts without a case where they are silent"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_to_its_runbook_section() -> None:
    text = README.read_text()
    sections = {_slug(h): h for h in re.findall(r"^### (.+)$", text, re.MULTILINE)}
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("file:///usr/share/doc/empath/docs/observability/README.md#"), url
        anchor = url.split("#", 1)[1]
        assert anchor == _slug(rule["alert"]), url
        assert sections.get(anchor) == rule["alert"], f"no runbook section for {rule['alert']}"
        body = text.split(f"### {rule['alert']}\n", 1)[1].split("\n### ", 1)[0]
        assert re.search(r"`(empathctl|journalctl|empath|df|curl|systemctl|swaks) ", body), \
            f"the runbook of {rule['alert']} names no command to run"
        assert f"(#{anchor})" in text, f"{rule['alert']} missing from the alert table"


# ---- the dashboard -------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    d: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return d


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(where, expr, what is shown of its labels) for every panel target and
    annotation query."""
    d = dashboard()
    found = [(f"panel {p['title']!r}", t["expr"], t.get("legendFormat", ""))
             for p in d["panels"] for t in p.get("targets", []) if t.get("expr")]
    found += [(f"annotation {a['name']!r}", a["expr"], a.get("textFormat", ""))
              for a in d["annotations"]["list"] if a.get("expr")]
    return found


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(where, expr) for where, expr, _ in dashboard_targets()]


def grafana_to_promql(expr: str) -> str:
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
            .replace("$__interval", "1m").replace("$instance", ".*"))


def test_dashboard_datasource_and_instance_variable() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    inst = variables["instance"]
    assert inst["type"] == "query" and inst["multi"] and inst["includeAll"]
    assert "empath_build_info" in inst["definition"]
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = []
    for panel in d["panels"]:
        ids.append(panel["id"])
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ds, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == ds, panel["title"]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_every_dashboard_query_follows_the_instance_variable() -> None:
    """Picking an instance must narrow every panel, so each selector of an empath
    metric carries instance=~"$instance"."""
    for where, expr in dashboard_exprs():
        for m in re.finditer(r"(empath_[a-z_]+)(\{[^}]*\})?", expr):
            assert m.group(2) and 'instance=~"$instance"' in m.group(2), \
                f'{where}: {m.group(1)} without instance=~"$instance" in {expr}'


def test_dashboard_shows_what_an_operator_looks_for() -> None:
    titles = {p["title"] for p in dashboard()["panels"]}
    for wanted in ("Queue by state", "Oldest message age", "Rejected by reason",
                   "Delivery attempts by result", "Delivery attempts by next hop",
                   "Delivery duration", "Queue residence (receipt to final result)",
                   "Active sessions", "Inbound TLS", "Outbound TLS", "DNS lookups",
                   "DNS cache hit ratio", "Circuit breakers", "Reloads",
                   "Spool file system", "Build info"):
        assert wanted in titles
    quantiles = [e for _, e in dashboard_exprs() if "histogram_quantile" in e]
    assert any("0.99" in e and "empath_delivery_duration_seconds_bucket" in e for e in quantiles)
    assert any("0.5" in e and "empath_delivery_duration_seconds_bucket" in e for e in quantiles)
