"""Armory's `armory.track` API, with the tracking state held by armoryd.

Same names, signatures and semantics as Armory's module: a stack of param contexts whose bottom is
the global one, prefix-scoped `track_params`/`track_init_params`/`track_call`, trackable contexts.
Values are recorded as Python's `str(value)` (nested mappings flatten to `key/sub`), which is what
reaches MLflow; `get_current_params()` therefore returns strings.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from functools import wraps
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, TypeVar

from ._connection import connection

T = TypeVar("T")
_ids = itertools.count(1)


def _next_id() -> int:
    return next(_ids)


def _flatten(key: str, value: Any) -> Iterator[Tuple[str, str]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _flatten(f"{key}/{k}", v)
    else:
        yield key, str(value)


def get_current_params() -> Dict[str, str]:
    """The params of the current tracking context."""
    return dict(connection().request("get_params")["params"])


def track_param(key: str, value: Any) -> None:
    """Records a param in the current tracking context (a newer value overwrites)."""
    c = connection()
    for k, v in c.check("param", "param", _flatten(key, value)):
        c.send("param", key=k, value=v)


def reset_params() -> None:
    """Clears the current tracking context."""
    connection().send("reset_params")


@contextmanager
def _context(nested: bool, trackables: bool):
    c = connection()
    c.send("push_context", nested=nested, trackables=trackables)
    try:
        yield
    finally:
        c.send("pop_context")


def tracking_context(nested: bool = False):
    """A scoped tracking context (`nested=True`: starting from a copy of the current one)."""
    return _context(nested, trackables=False)


def trackable_context(nested: bool = False):
    """A tracking context whose params go to the Trackables created inside it, when it ends."""
    return _context(nested, trackables=True)


def _record_call(func: Callable, prefix: str, ignore: Optional[Sequence[str]], kwargs: Mapping[str, Any]) -> None:
    values: Dict[str, str] = {}
    for key, value in kwargs.items():
        if ignore and key in ignore:
            continue
        for k, v in _flatten(key, value):
            values[k] = v
    module = getattr(func, "__module__", None)
    c = connection()
    function = f"{module}.{func.__qualname__}"
    checked = c.check("params", "param", [(f"{prefix}._func", function)] + [(f"{prefix}.{k}", v) for k, v in values.items()])
    c.send("params", prefix=prefix, func=checked[0][1], values={k[len(prefix) + 1:]: v for k, v in checked[1:]})


def track_params(_func: Optional[Callable] = None, *, prefix: Optional[str] = None, ignore: Optional[Sequence[str]] = None):
    """Records a function's keyword arguments as `<prefix>.<name>` params (prefix: its `__name__`),
    with `<prefix>._func`; a prefix recorded before has its old keys removed. Decorator or wrapper."""

    def _decorator(func: Callable[..., T]) -> Callable[..., T]:
        @wraps(func)
        def _wrapper(*args: Any, **kwargs: Any) -> T:
            _record_call(func, prefix if prefix else func.__name__, ignore, kwargs)
            return func(*args, **kwargs)

        return _wrapper

    if _func is None:
        return _decorator
    return _decorator(_func)


def track_init_params(_cls: Optional[Any] = None, *, prefix: Optional[str] = None, ignore: Optional[Sequence[str]] = None):
    """Records a class's initializer keyword arguments (prefix: the class name). Decorator or wrapper."""

    def _decorator(cls: T) -> T:
        if not getattr(cls, "_has_init_tracking", False):
            _prefix = prefix if prefix else getattr(cls, "__name__", "")
            cls.__init__ = track_params(prefix=_prefix, ignore=ignore)(cls.__init__)  # type: ignore[attr-defined]
            setattr(cls, "_has_init_tracking", True)
        return cls

    if _cls is None:
        return _decorator
    return _decorator(_cls)


def track_call(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Invokes a function or class with the arguments, recording the keyword arguments."""
    if isinstance(func, type):
        return track_init_params(func)(*args, **kwargs)
    return track_params(func)(*args, **kwargs)


class Trackable:
    """A mixin: an instance gets the params of the trackable context it was created in, when that
    context ends (`tracked_params`). Works with dataclasses (through `__post_init__`)."""

    def __init__(self) -> None:
        super().__init__()
        self.__post_init__()

    def __post_init__(self) -> None:
        if getattr(self, "_armory_id", None) is None:
            self._armory_id = _next_id()
            self._armory_register()

    def _armory_register(self) -> None:
        connection().send("trackable", id=self._armory_id)

    @property
    def tracked_params(self) -> Dict[str, str]:
        """The params of the trackable context this was created in (empty until it ended)."""
        return dict(connection().request("get_trackable", id=self._armory_id)["params"])
