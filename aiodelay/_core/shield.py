"""``aiodelay.shield()``: a critical section that a disconnect does not interrupt."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Awaitable
from types import FrameType
from typing import TypeVar

from .middleware import Middleware
from .outcome import logger
from .owned import spawned
from .state import ENDED, RequestState

__all__ = ("running_state", "shield")

_T = TypeVar("_T")

#: The code of the coroutine that runs each request's handler, whose local ``state`` is its
#: request's state.
_RUNS_HANDLERS = Middleware.__call__.__code__
if "state" not in _RUNS_HANDLERS.co_varnames:  # whoever renames it learns it here, not in use
    raise RuntimeError("Middleware.__call__ has no local variable 'state' for shield() to find")

_NOT_IN_A_HANDLER = (
    "aiodelay.shield() protects the handler's own task: await it in the request's handler "
    "(or in a coroutine that the handler awaits), not in a task the handler started (a task "
    "started with aiodelay.spawn() may await it: there it is a plain await); and aiodelay "
    "must be installed on the app (aiodelay.setup(app))"
)


async def shield(aw: Awaitable[_T]) -> _T:
    """Run ``aw`` to its end even if the client leaves meanwhile.

    Inside a cancellable handler, a disconnect during the section is held back; when the
    section ends, the handler is cancelled (``CancelledError`` is raised here, after ``aw``
    finished; if ``aw`` raised, the handler is cancelled all the same and what ``aw`` raised
    is logged and is the ``CancelledError``'s ``__cause__``). Only the disconnect is
    held back: a server shutdown or an outer timeout cancels ``aw`` as usual.

    It finds its request on the call stack, below the handler's frame (a cost that grows
    with the stack's depth, paid only here), so it protects the handler's own task: in a task
    started by ``aiodelay.spawn`` this is a plain ``await``; in another task, or outside a
    request handled by aiodelay, it raises ``RuntimeError``.
    """
    task = asyncio.current_task()
    state = running_state(task)
    if state is None:
        if task in spawned:  # started by aiodelay.spawn(): nothing to hold
            return await aw
        if inspect.iscoroutine(aw):
            aw.close()  # never started: do not warn "never awaited" on top of the error
        raise RuntimeError(_NOT_IN_A_HANDLER)
    state.shield_entered()
    try:
        result = await aw
    except Exception as exc:
        stop = state.shield_left()
        if stop is not None:
            # The section is over; the handler is cancelled now. What it raised is not
            # lost: it is logged, and it is the CancelledError's __cause__.
            logger.error(
                "aiodelay.shield(): the section raised after the client left or the deadline "
                "passed, in %s",
                state.where(),
                exc_info=exc,
            )
            raise asyncio.CancelledError(stop) from exc
        raise
    except BaseException:
        state.shield_left()  # a cancellation (not aiodelay's) goes through as it is
        raise
    stop = state.shield_left()
    if stop is not None:
        raise asyncio.CancelledError(stop)
    return result


def running_state(task: asyncio.Task[object] | None) -> RequestState | None:
    """The state of the request whose handler ``task`` runs, found in the middleware's frame
    below the caller's (the caller must run in that task, called from the handler, also
    through other coroutines it awaits), or None. (Also what ``budget_trace`` asks.)"""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _RUNS_HANDLERS:
            # (Before Python 3.13 this leaves a snapshot of the frame's variables on the
            # frame: the same objects the frame holds anyway, for no longer than it lives.)
            state = frame.f_locals.get("state")
            if isinstance(state, RequestState) and state.task is task and state.phase < ENDED:
                return state
        frame = frame.f_back
    return None
