"""The registry of attribution methods: the service, the job runner and the tasks look a method up here instead
of branching on its name. Adding a method is one module declaring `METHOD` and one line in BUILT_IN below
(docs/methods.md, "Adding a method")."""

from __future__ import annotations

import threading

from worker.methods import (
    datainf,
    gradient_similarity,
    influence,
    meta_instance_influence,
    meta_task_influence,
    source,
    tracin,
)
from worker.methods.base import Method

BUILT_IN: tuple[Method, ...] = (
    influence.METHOD,
    source.METHOD,
    datainf.METHOD,
    tracin.METHOD,
    gradient_similarity.METHOD,
    meta_task_influence.METHOD,
    meta_instance_influence.METHOD,
)
DEFAULT_METHOD = "influence"

_lock = threading.Lock()
_methods: dict[str, Method] = {method.name: method for method in BUILT_IN}
_version = 0


class UnknownMethod(KeyError):
    """No method of that name is registered."""


def get_method(name: str) -> Method:
    method = _methods.get(name)
    if method is None:
        raise UnknownMethod(name)
    return method


def all_methods() -> tuple[Method, ...]:
    """Every registered method, built-in ones first, in registration order."""
    return tuple(_methods.values())


def method_names() -> tuple[str, ...]:
    return tuple(_methods)


def version() -> int:
    """Changes whenever the set of methods changes (schemas built from the registry are cached by it)."""
    return _version


def register(method: Method) -> None:
    """Add a method (e.g. a test's toy method). A name may be registered once."""
    global _version
    with _lock:
        if method.name in _methods:
            raise ValueError(f"method {method.name!r} is already registered")
        _methods[method.name] = method
        _version += 1


def unregister(name: str) -> None:
    """Remove a method added with `register` (built-in methods stay)."""
    global _version
    with _lock:
        if any(method.name == name for method in BUILT_IN):
            raise ValueError(f"method {name!r} is built in")
        if _methods.pop(name, None) is not None:
            _version += 1
