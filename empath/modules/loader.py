"""Finding and building modules: names from the config → factories → instances.

A module's ``name`` is looked up, in this order:

1. an entry point of that name in the group ``empath.modules`` (how an installed
   package offers a module; empath's built-ins are declared there too);
2. the built-ins below, so a checkout without installed metadata has them as well;
3. a dotted path, ``package.module:Factory`` or ``package.module.Factory``.

Validation is building: the factory is called with the options and must raise
(``ModuleOptionError`` best) when they are wrong. The config loader does this for
every module (``module_issues``), so ``empath check-config``, the start (exit 2)
and a reload (refused, old config kept) all report a bad module by key path.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal

from empath.modules.api import EVENTS, HOOKS, Module, ModuleEnv, ModuleOptionError

if TYPE_CHECKING:
    from empath.config.model import Config, ModuleSpec

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "Loaded", "ModuleLoadError", "build",
           "module_issues", "resolve"]

ENTRY_POINT_GROUP = "empath.modules"
BUILTINS = {
    "recipient_map": "empath.modules.builtin.recipient_map:RecipientMap",
    "header_checks": "empath.modules.builtin.header_checks:HeaderChecks",
}
Role = Literal["check", "worker", "supervisor"]


class ModuleLoadError(Exception):
    """A module that cannot be found or built; ``key`` is ``name`` or ``options``
    (``options.<key>`` for a ModuleOptionError with a key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(eq=False)
class Loaded:
    """One configured module, built: its spec, the instance, and the methods it has."""

    spec: ModuleSpec
    instance: Any
    calls: dict[str, Callable[..., Any]]  # "rcpt", "delivered", "close" → bound method

    @property
    def name(self) -> str:
        return self.spec.name


def _import(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"{target!r} is not module:attribute")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve(name: str) -> Callable[..., Any]:
    """The factory that ``name`` stands for; ModuleLoadError("name", why) if none."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    targets = sorted({ep.value for ep in found})
    try:
        if len(targets) > 1:
            raise ModuleLoadError("name", f"entry point {name!r} in group {ENTRY_POINT_GROUP} "
                                  f"is declared by several packages: {', '.join(targets)}")
        if found:
            factory = found[0].load()
        elif name in BUILTINS:
            factory = _import(BUILTINS[name])
        elif "." in name or ":" in name:
            factory = _import(name)
        else:
            known = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
                           | set(BUILTINS))
            raise ModuleLoadError(
                "name", f"unknown module {name!r}: no entry point of that name in group "
                f"{ENTRY_POINT_GROUP} (known: {', '.join(known)}); or give a dotted "
                "path, package.module:Factory")
    except ModuleLoadError:
        raise
    except Exception as exc:  # ImportError, AttributeError, or the module's own bug
        raise ModuleLoadError("name", f"cannot import {name!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
    if not callable(factory):
        raise ModuleLoadError("name", f"{name!r} is not callable (a class or factory)")
    return factory  # type: ignore[no-any-return]


def _methods(instance: Any) -> dict[str, Callable[..., Any]]:
    """The hook, event and close methods the instance really has: ``Module``'s
    do-nothing defaults are left out, so they cost nothing."""
    out: dict[str, Callable[..., Any]] = {}
    cls = type(instance)
    for key in (*HOOKS, *EVENTS, "close"):
        attr = key if key == "close" else f"on_{key}"
        method = getattr(instance, attr, None)
        if method is None or not callable(method):
            continue
        if isinstance(instance, Module) and getattr(cls, attr, None) is getattr(Module, attr):
            continue
        out[key] = method
    return out


def build(spec: ModuleSpec, config: Config, role: Role) -> Loaded:
    """Resolve and build one module; ModuleLoadError with the key to blame."""
    factory = resolve(spec.name)
    env = ModuleEnv(
        name=spec.name, hostname=config.hostname, postmaster=config.postmaster,
        local_domains=frozenset(config.local_domains), role=role,
        log=logging.getLogger(f"empath.module.{spec.name}"),
    )
    try:
        instance = factory(dict(spec.options), env)
    except ModuleOptionError as exc:
        key = f"options.{exc.key}" if exc.key else "options"
        raise ModuleLoadError(key, str(exc) or type(exc).__name__) from exc
    except (ValueError, TypeError, OSError, KeyError) as exc:
        raise ModuleLoadError("options", f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise ModuleLoadError("name", f"{spec.name!r} failed to initialise: "
                              f"{type(exc).__name__}: {exc}") from exc
    return Loaded(spec, instance, _methods(instance))


def build_all(config: Config, role: Role) -> list[Loaded]:
    """Every configured module, in config order (raises the first ModuleLoadError)."""
    return [build(spec, config, role) for spec in config.modules]


def module_issues(config: Config) -> Iterator[tuple[str, str]]:
    """``(key path, message)`` for every module that cannot be found or built, and
    for a name listed twice (its metadata and metrics would be mixed up)."""
    seen: dict[str, int] = {}
    for i, spec in enumerate(config.modules):
        if spec.name in seen:
            yield (f"modules[{i}].name", f"{spec.name!r} is already modules[{seen[spec.name]}]; "
                   "each module may be listed once")
            continue
        seen[spec.name] = i
        try:
            build(spec, config, "check")
        except ModuleLoadError as exc:
            yield f"modules[{i}].{exc.key}", str(exc)
