"""What stops a handler: the ``cancel`` and ``shield`` policies for a client that leaves, a
``deadline``, and the ``grace`` a leaving client gives it."""

from __future__ import annotations

import enum
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = (
    "Limit",
    "Policy",
    "cancellable",
    "check_seconds",
    "coerce_policy",
    "copy_marks",
    "deadline",
    "deadline_of",
    "grace",
    "grace_of",
    "marks_a_deadline",
    "policy_of",
    "shielded",
)

_POLICY_ATTR = "_aiodelay_policy"
_DEADLINE_ATTR = "_aiodelay_deadline"
_GRACE_ATTR = "_aiodelay_grace"
_MARKS = (_POLICY_ATTR, _DEADLINE_ATTR, _GRACE_ATTR)

#: A deadline: (seconds, the status to answer with), or None for no deadline.
Limit = tuple[float, int] | None

_H = TypeVar("_H", bound=Callable[..., Any])


class Policy(str, enum.Enum):
    """What happens to a handler whose client goes away.

    ``CANCEL``: the handler is cancelled at the ``await`` it is waiting on (its ``finally``
    blocks run), together with any pending "not done yet" awaitable it returned.

    ``SHIELD``: the handler runs to its end although nobody will read the response; the
    response is dropped quietly.
    """

    CANCEL = "cancel"
    SHIELD = "shield"

    def __str__(self) -> str:
        return self.value


def coerce_policy(value: object) -> Policy:
    """``value`` as a :class:`Policy`; ``ValueError`` naming the valid values otherwise."""
    if isinstance(value, Policy):
        return value
    if isinstance(value, str):
        try:
            return Policy(value)
        except ValueError:
            pass
    valid = ", ".join(repr(p.value) for p in Policy)
    raise ValueError(f"policy must be one of {valid} (or aiodelay.Policy), got {value!r}")


def _mark(handler: _H, attribute: str, value: object, decorator: str) -> _H:
    if not callable(handler):
        raise TypeError(f"@aiodelay.{decorator} goes on a handler function or web.View class")
    target: Any = handler
    if not (inspect.iscoroutinefunction(handler) or inspect.isclass(handler)):
        # aiohttp accepts a plain function only if it returns a response (it asserts so), and
        # deprecates it. Wrapped in ``async def``, it may return a "not done yet" future too.
        @functools.wraps(handler)
        async def target(*args: Any, **kwargs: Any) -> Any:
            return handler(*args, **kwargs)

    try:
        setattr(target, attribute, value)
    except (AttributeError, TypeError):
        raise TypeError(f"@aiodelay.{decorator} cannot mark {handler!r}") from None
    return target  # type: ignore[no-any-return]


def cancellable(handler: _H) -> _H:
    """Mark a handler (function or ``web.View`` class) to be cancelled when its client leaves,
    whatever the app-wide policy is.

    On a plain (not ``async``) function, returns an ``async def`` wrapper of it, so that it
    may also return a pending future (a "not done yet" result)."""
    return _mark(handler, _POLICY_ATTR, Policy.CANCEL, "cancellable")


def shielded(handler: _H) -> _H:
    """Mark a handler (function or ``web.View`` class) to run to its end when its client
    leaves, whatever the app-wide policy is. Its response is dropped quietly.

    On a plain (not ``async``) function, returns an ``async def`` wrapper of it, as
    :func:`cancellable` does."""
    return _mark(handler, _POLICY_ATTR, Policy.SHIELD, "shielded")


def policy_of(handler: object, default: Policy) -> Policy:
    """The policy a route handler was marked with, else ``default``."""
    policy: Policy = getattr(handler, _POLICY_ATTR, default)
    return policy


def check_seconds(value: object, what: str, *, allow_none: bool = False) -> float | None:
    """``value`` as a positive, finite number of seconds; TypeError or ValueError otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} takes a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def deadline(seconds: float | None, *, status: int = 504) -> Callable[[_H], _H]:
    """Stop a handler (function or ``web.View`` class) that runs longer than ``seconds``.

    When the deadline passes, the handler is cancelled at its current ``await`` (its timers,
    tasks and threads from ``aiodelay.call_later``/``spawn``/``to_thread`` too; an
    ``aiodelay.shield()`` section first runs to its end), ``notify_finish`` fails with
    :class:`aiodelay.DeadlineExceeded`, and the client gets ``status`` with a short text body,
    or, if the response had started (a stream), an incomplete response: the connection is
    closed. ``deadline(None)`` exempts a route from the app's default
    (``aiodelay.setup(app, deadline=...)``). ``TypeError``/``ValueError`` for a bad value.
    """
    limit: Limit = None
    if seconds is not None:
        checked = check_seconds(seconds, "@aiodelay.deadline")
        assert checked is not None
        limit = (checked, _check_status(status))
    else:
        _check_status(status)

    def mark(handler: _H) -> _H:
        return _mark(handler, _DEADLINE_ATTR, limit, "deadline")

    return mark


def grace(seconds: float) -> Callable[[_H], _H]:
    """Let a cancellable handler run ``seconds`` longer after its client left (to finish a
    cache fill or a write): it is cancelled then if it has not ended. Counted and logged as
    ran on if it ended in time, as cancelled otherwise. ``TypeError``/``ValueError`` for a
    bad value."""
    checked = check_seconds(seconds, "@aiodelay.grace")

    def mark(handler: _H) -> _H:
        return _mark(handler, _GRACE_ATTR, checked, "grace")

    return mark


def _check_status(status: object) -> int:
    if isinstance(status, bool) or not isinstance(status, int):
        raise TypeError(f"status must be an int, got {status!r}")
    if not 400 <= status <= 599:
        raise ValueError(f"status must be an error status (400 to 599), got {status}")
    return status


_UNMARKED = object()


def deadline_of(handler: object, default: Limit, policy: Policy) -> Limit:
    """The deadline of a route: its own mark, else ``default`` unless it is shielded."""
    marked = getattr(handler, _DEADLINE_ATTR, _UNMARKED)
    if marked is not _UNMARKED:
        return marked  # type: ignore[return-value]
    return default if policy is Policy.CANCEL else None


def marks_a_deadline(handler: object) -> bool:
    """Whether ``handler`` carries ``@aiodelay.deadline`` with a number of seconds."""
    return getattr(handler, _DEADLINE_ATTR, None) is not None


def copy_marks(marked: object, handler: _H) -> _H | None:
    """A handler that calls ``handler`` and carries the marks ``marked`` carries
    (``@shielded``/``@cancellable``, ``@deadline``, ``@grace``), or None if it carries none.

    For a handler made from a marked object that is not the route's handler itself: the
    bound ``render`` of a marked :class:`aiodelay.Resource` (subclass), a script's wrapper."""
    marks = {name: getattr(marked, name) for name in _MARKS if hasattr(marked, name)}
    if not marks:
        return None

    @functools.wraps(handler, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
    async def carrier(*args: Any, **kwargs: Any) -> Any:
        return await handler(*args, **kwargs)

    for name, value in marks.items():
        setattr(carrier, name, value)
    return carrier  # type: ignore[return-value]


def grace_of(handler: object) -> float | None:
    grace_seconds: float | None = getattr(handler, _GRACE_ATTR, None)
    return grace_seconds
