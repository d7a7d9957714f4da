"""The one table of config keys whose feature is not built yet.

PRODUCT.md promises that such keys are refused ("not supported yet"), never
silently ignored: an operator who sets ``delivery.routes`` must not believe mail
is being routed. When a feature lands, delete its line here (and nothing else in
the loader changes): the loader already validates the syntax of every one of
these keys, so values are checked before they are refused, and kept once allowed.

Each entry names the key path, which is also the attribute path on ``Config``
(``operator.attrgetter`` reads it), and a predicate on the validated value that
says whether the unsupported feature is being asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from operator import attrgetter
from typing import Any, NamedTuple

from empath.config.model import Config

__all__ = ["NOT_SUPPORTED_YET", "Unsupported", "unsupported_settings"]

_DEFAULT_MESSAGE = "not supported yet; remove the key or leave it empty"


def _is_set(value: object) -> bool:
    """True for a non-None scalar or a non-empty collection (``{}``/``[]``/null = unset)."""
    if value is None:
        return False
    if isinstance(value, Sized) and not isinstance(value, str):
        return len(value) > 0
    return True


class Unsupported(NamedTuple):
    key_path: str
    active: Callable[[Any], bool]
    # May use {value!r}; must contain "not supported yet" (tests and docs grep for it).
    message: str = _DEFAULT_MESSAGE


NOT_SUPPORTED_YET: tuple[Unsupported, ...] = (
)


def unsupported_settings(cfg: Config) -> Iterator[tuple[str, str]]:
    """Yield ``(key_path, message)`` for every setting in ``cfg`` that asks for an
    unbuilt feature."""
    for entry in NOT_SUPPORTED_YET:
        value = attrgetter(entry.key_path)(cfg)
        if entry.active(value):
            yield entry.key_path, entry.message.format(value=value)
