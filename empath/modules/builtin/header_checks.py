"""``header_checks``: regular expressions on header fields → reject, hold or tag.

::

    modules:
      - name: header_checks
        options:
          rules:
            - {header: Subject, regex: "(?i)viagra", action: reject, text: "No spam here"}
            - {header: X-Mailer, regex: "^BulkMailer", action: hold, text: "bulk mailer"}
            - {header: From, regex: "@partner\\.example>?$", action: tag, text: "partner"}

or ``options: {path: /etc/empath/header_checks.yaml}``, a YAML file holding the
same list of rules (read at start and at every reload).

Each rule: ``header`` (the field name, any case), ``regex`` (Python syntax,
searched in the unfolded value; ``(?i)`` for case-insensitive), ``action`` and
``text``. Rules are tried in order against every field of that name:

- ``reject``: the first matching reject rule refuses the message at DATA with
  ``550 5.7.1 <text>``.
- ``hold``: the message is queued held (``empathctl queue list --status held``)
  until released; the client gets the normal 250.
- ``tag``: adds ``X-Empath-Tag: <text>`` (or the rule's ``tag_header``).

What matched is kept in the message's metadata (``matched``: rule numbers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from empath.modules.api import (
    DataContext,
    Module,
    ModuleEnv,
    ModuleOptionError,
    Reject,
    Verdict,
)

__all__ = ["ACTIONS", "HeaderChecks", "Rule", "parse_rules"]

ACTIONS = ("reject", "hold", "tag")
RULE_KEYS = ("header", "regex", "action", "text", "tag_header")
DEFAULT_TAG_HEADER = "X-Empath-Tag"
_FIELD_NAME = re.compile(r"[!-9;-~]+")


@dataclass(frozen=True, slots=True)
class Rule:
    header: str  # lower-case
    regex: re.Pattern[str]
    action: str
    text: str
    tag_header: str


def _rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ModuleOptionError(f"expected a mapping, got {raw!r}", key=where)
    unknown = sorted(str(k) for k in raw if k not in RULE_KEYS)
    if unknown:
        raise ModuleOptionError("unknown key", key=f"{where}.{unknown[0]}")
    for key in ("header", "regex", "action"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ModuleOptionError("required: a non-empty string", key=f"{where}.{key}")
    header = raw["header"]
    if not _FIELD_NAME.fullmatch(header):
        raise ModuleOptionError(f"{header!r} is not a header field name", key=f"{where}.header")
    try:
        regex = re.compile(raw["regex"])
    except re.error as exc:
        raise ModuleOptionError(f"invalid regular expression: {exc}",
                                key=f"{where}.regex") from None
    action = raw["action"]
    if action not in ACTIONS:
        raise ModuleOptionError(f"must be one of {', '.join(ACTIONS)}, got {action!r}",
                                key=f"{where}.action")
    default = {"reject": "Message content rejected", "hold": "held by header_checks",
               "tag": "header_checks"}[action]
    text = raw.get("text", default)
    if not isinstance(text, str) or not text or not text.isprintable() or len(text) > 400 or (
            action == "tag" and not text.isascii()):
        raise ModuleOptionError("must be one printable line of at most 400 characters"
                                + (" (ASCII for a tag)" if action == "tag" else ""),
                                key=f"{where}.text")
    tag_header = raw.get("tag_header", DEFAULT_TAG_HEADER)
    if not isinstance(tag_header, str) or not _FIELD_NAME.fullmatch(tag_header):
        raise ModuleOptionError("not a header field name", key=f"{where}.tag_header")
    return Rule(header.lower(), regex, action, text, tag_header)


def parse_rules(raw: Any, key: str) -> tuple[Rule, ...]:
    if not isinstance(raw, list) or not raw:
        raise ModuleOptionError("expected a non-empty list of rules", key=key)
    return tuple(_rule(r, f"{key}[{i}]") for i, r in enumerate(raw))


class HeaderChecks(Module):
    def __init__(self, options: Mapping[str, Any], env: ModuleEnv) -> None:
        super().__init__(options, env)
        unknown = sorted(set(options) - {"rules", "path"})
        if unknown:
            raise ModuleOptionError("unknown option", key=unknown[0])
        if ("rules" in options) == ("path" in options):
            raise ModuleOptionError("give either rules (a list) or path (a YAML file of rules)")
        if "rules" in options:
            self.rules = parse_rules(options["rules"], "rules")
            return
        raw = options["path"]
        if not isinstance(raw, str) or not Path(raw).is_absolute():
            raise ModuleOptionError("must be an absolute path", key="path")
        try:
            data = yaml.safe_load(Path(raw).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ModuleOptionError(f"cannot read {raw}: {exc}", key="path") from None
        try:
            self.rules = parse_rules(data, "rules")
        except ModuleOptionError as exc:
            raise ModuleOptionError(f"{raw}: {exc.key}: {exc}", key="path") from None

    async def on_data(self, ctx: DataContext) -> Verdict:
        matched: list[int] = []
        hold: str | None = None
        tags: list[tuple[str, str]] = []
        for n, rule in enumerate(self.rules):
            if not any(rule.regex.search(value) for name, value in ctx.headers
                       if name.lower() == rule.header):
                continue
            matched.append(n)
            if rule.action == "reject":
                return Reject(550, "5.7.1", rule.text)
            if rule.action == "hold":
                hold = hold or rule.text
            elif (rule.tag_header, rule.text) not in tags:
                tags.append((rule.tag_header, rule.text))
        if matched:
            ctx.metadata["matched"] = matched
        for name, text in tags:
            ctx.add_header(name, text)
        if hold is not None:
            ctx.hold(hold)
        return None
