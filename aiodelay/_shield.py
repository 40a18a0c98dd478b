"""``aiodelay.shield()``: a critical section that a disconnect does not interrupt."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Awaitable
from typing import TypeVar

from ._lifetime import NOT_SET_UP, Lifetime
from ._policy import Policy

__all__ = ("enter", "leave", "shield")

_T = TypeVar("_T")

#: The lifetime of the request whose handler runs in this context.
_current: contextvars.ContextVar[Lifetime] = contextvars.ContextVar("aiodelay_lifetime")


def enter(life: Lifetime) -> contextvars.Token[Lifetime]:
    return _current.set(life)


def leave(token: contextvars.Token[Lifetime]) -> None:
    _current.reset(token)


async def shield(aw: Awaitable[_T]) -> _T:
    """Run ``aw`` to its end even if the client leaves meanwhile.

    Inside a cancellable handler, a disconnect during the section is held back; when the
    section ends, the handler is cancelled (``CancelledError`` is raised here, after ``aw``
    finished). Only the disconnect is held back: a server shutdown or an outer timeout
    cancels ``aw`` as usual. Protects the handler's own task; in another task this is a plain
    ``await``.
    """
    life = _current.get(None)
    if life is None:
        if inspect.iscoroutine(aw):
            aw.close()  # never started: do not warn "never awaited" on top of the error
        raise RuntimeError(NOT_SET_UP)
    if asyncio.current_task() is not life.task:
        return await aw
    life.shield_depth += 1
    try:
        result = await aw
    finally:
        life.shield_depth -= 1
    if life.shield_depth == 0 and life.lost is not None and life.policy is Policy.CANCEL:
        life.release()
        raise asyncio.CancelledError("aiodelay: the client left during a shielded section")
    return result
