"""What a disconnect does to a handler: the ``cancel`` and ``shield`` policies."""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ("Policy", "cancellable", "coerce_policy", "policy_of", "shielded")

_POLICY_ATTR = "_aiodelay_policy"

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


def _mark(handler: _H, policy: Policy, decorator: str) -> _H:
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
        setattr(target, _POLICY_ATTR, policy)
    except (AttributeError, TypeError):
        raise TypeError(f"@aiodelay.{decorator} cannot mark {handler!r}") from None
    return target  # type: ignore[no-any-return]


def cancellable(handler: _H) -> _H:
    """Mark a handler (function or ``web.View`` class) to be cancelled when its client leaves,
    whatever the app-wide policy is."""
    return _mark(handler, Policy.CANCEL, "cancellable")


def shielded(handler: _H) -> _H:
    """Mark a handler (function or ``web.View`` class) to run to its end when its client
    leaves, whatever the app-wide policy is. Its response is dropped quietly."""
    return _mark(handler, Policy.SHIELD, "shielded")


def policy_of(handler: object, default: Policy) -> Policy:
    """The policy a route handler was marked with, else ``default``."""
    policy: Policy = getattr(handler, _POLICY_ATTR, default)
    return policy
