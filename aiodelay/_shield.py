"""``aiodelay.shield()``: a critical section that a disconnect does not interrupt."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import TypeVar

from ._lifetime import NOT_SET_UP, running
from ._policy import Policy

__all__ = ("shield",)

_T = TypeVar("_T")


async def shield(aw: Awaitable[_T]) -> _T:
    """Run ``aw`` to its end even if the client leaves meanwhile.

    Inside a cancellable handler, a disconnect during the section is held back; when the
    section ends, the handler is cancelled (``CancelledError`` is raised here, after ``aw``
    finished). Only the disconnect is held back: a server shutdown or an outer timeout
    cancels ``aw`` as usual. Protects the handler's own task; in another task (one started
    by ``aiodelay.spawn``, say) this is a plain ``await``, and outside a request handled by
    aiodelay it raises ``RuntimeError``.
    """
    task = asyncio.current_task()
    if task not in running:
        if inspect.iscoroutine(aw):
            aw.close()  # never started: do not warn "never awaited" on top of the error
        raise RuntimeError(NOT_SET_UP)
    conn = running[task]
    if conn is None:  # a task that aiodelay.spawn() started: nothing to hold back
        return await aw
    life = conn.make_life()
    life.shield_depth += 1
    try:
        result = await aw
    finally:
        life.shield_depth -= 1
    if life.shield_depth == 0 and life.lost is not None and life.policy is Policy.CANCEL:
        life.release()
        raise asyncio.CancelledError("aiodelay: the client left during a shielded section")
    return result
