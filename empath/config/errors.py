"""Configuration errors: every problem found in one file, each tied to its key path.

The loader collects all issues before raising, so an operator fixing a config (or
Ansible running ``empath check-config``) sees every mistake in one pass instead of
one per reload attempt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigIssue"]


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: ``file`` is the config path (or ``<config>``), ``key_path`` is
    e.g. ``limits.max_recipients`` or ``listen[1].address`` (empty for problems
    that concern the whole file, such as a YAML syntax error)."""

    file: str
    key_path: str
    message: str

    def __str__(self) -> str:
        if self.key_path:
            return f"{self.file}: {self.key_path}: {self.message}"
        return f"{self.file}: {self.message}"


class ConfigError(Exception):
    """The configuration was refused; ``issues`` lists every reason.

    ``str()`` gives one line per issue, ready for stderr or the journal.
    """

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: list[ConfigIssue] = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))
