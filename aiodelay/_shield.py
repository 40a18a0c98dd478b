"""``aiodelay.shield()``: a critical section that a disconnect does not interrupt."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import TypeVar

from ._account import NOT_SET_UP, logger
from ._connection import running_connection
from ._owned import spawned

__all__ = ("shield",)

_T = TypeVar("_T")


async def shield(aw: Awaitable[_T]) -> _T:
    """Run ``aw`` to its end even if the client leaves meanwhile.

    Inside a cancellable handler, a disconnect during the section is held back; when the
    section ends, the handler is cancelled (``CancelledError`` is raised here, after ``aw``
    finished; if ``aw`` raised, the handler is cancelled all the same and what ``aw`` raised
    is logged and is the ``CancelledError``'s ``__cause__``). Only the disconnect is
    held back: a server shutdown or an outer timeout cancels ``aw`` as usual.

    It finds its request on the call stack, below the handler's frame (a cost that grows
    with the stack's depth, paid only here). Protects the handler's own task; in another
    task (one started by ``aiodelay.spawn``, say) this is a plain ``await``, and outside a
    request handled by aiodelay it raises ``RuntimeError``.
    """
    conn = running_connection()
    if conn is None:
        if asyncio.current_task() in spawned:  # started by aiodelay.spawn(): nothing to hold
            return await aw
        if inspect.iscoroutine(aw):
            aw.close()  # never started: do not warn "never awaited" on top of the error
        raise RuntimeError(NOT_SET_UP)
    life = conn.make_life()
    life.shield_depth += 1
    try:
        result = await aw
    except Exception as exc:
        life.shield_depth -= 1
        stop = life.section_ended()
        if stop is not None:
            # The section is over; the handler is cancelled now. What it raised is not
            # lost: it is logged, and it is the CancelledError's __cause__.
            logger.error(
                "aiodelay.shield(): the section raised after the client left or the deadline "
                "passed, in %s",
                life.where(),
                exc_info=exc,
            )
            raise asyncio.CancelledError(stop) from exc
        raise
    except BaseException:
        life.shield_depth -= 1  # a cancellation (not aiodelay's) goes through as it is
        raise
    life.shield_depth -= 1
    stop = life.section_ended()
    if stop is not None:
        raise asyncio.CancelledError(stop)
    return result
