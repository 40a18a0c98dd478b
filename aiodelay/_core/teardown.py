"""Teardown that waits for the cancelled handlers: :func:`after_cancelled`.

When a client leaves, aiodelay cancels the handler at once; the handler sees its
``CancelledError`` at the next turn of the loop. The connection's teardown (the close after a
FIN, aiohttp's own ``connection_lost`` after an RST) costs about as much as the cancellation
itself, so in a storm of drops, where one turn of the loop reads thousands of them, doing it at
once would make the last handler wait for every other connection's teardown. Instead, the
teardowns deferred in one turn of the loop run two turns later, in one batch: after the
handlers cancelled in that turn have seen their cancellation (unless a handler waits on a task
that waits on another, which passes it on a turn later). Nothing else is promised about the
order.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ("after_cancelled",)

logger = logging.getLogger("aiodelay")
_NO_CONTEXT = contextvars.Context()
_T = TypeVar("_T")


class _Batch:
    """The calls deferred in the current turn of one loop. Only the loop's scheduled callbacks
    refer to it (``_last``, below, holds a weak reference): a loop closed before the calls ran
    drops them with its ready queue, and the calls, which refer to the loop's transports, do
    not keep the loop alive."""

    __slots__ = ("__weakref__", "_calls")

    def __init__(self) -> None:
        #: Each call, then its argument: two items, and no tuple made per call (in a storm, a
        #: container object per drop made before the drops before it are freed makes the
        #: garbage collector run more often).
        self._calls: list[Any] = []

    def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        # The handlers cancelled in the turn before see their CancelledError in this one: the
        # calls deferred then run after them, at the next turn. Calls deferred from now on
        # (drops read in this turn) make a batch of their own, two turns from theirs.
        calls, self._calls = self._calls, []
        loop.call_soon(self._run, loop, calls, context=_NO_CONTEXT)

    def _run(self, loop: asyncio.AbstractEventLoop, calls: list[Any]) -> None:
        for index in range(0, len(calls), 2):
            try:
                calls[index](calls[index + 1])
            except Exception:  # one connection's teardown must not stop the others'
                logger.exception("aiodelay: tearing down a connection failed")
            except BaseException:
                # KeyboardInterrupt, SystemExit: the calls not run yet go first in the next
                # batch, so that their connections are still closed if the loop runs on.
                rest = calls[index + 2 :]
                if rest:
                    if not self._calls:
                        loop.call_soon(self._turn, loop, context=_NO_CONTEXT)
                    self._calls[:0] = rest
                raise


#: The loop whose batch was last added to, and that batch, both weakly (neither is kept alive
#: by it). A loop runs in one thread at a time, and a storm's drops come in one loop: each drop
#: finds its batch here with two weak references called, no dictionary lookup (a Python
#: frame, that of ``WeakKeyDictionary.get``). A call from another loop makes a batch of its
#: own, which takes this place; one loop with two batches in one turn (threads that take
#: turns) runs each batch two turns after its first call, as promised.
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], weakref.ref[_Batch]] | None = None


def after_cancelled(call: Callable[[_T], object], arg: _T) -> None:
    """Run ``call(arg)`` two turns of the running loop from now, once the handlers cancelled
    in this turn have seen their ``CancelledError``. An exception it raises is logged on the
    ``aiodelay`` logger; the other calls of the batch still run. (One argument: a tuple of
    arguments would be one more object per drop for the garbage collector to count.)"""
    global _last
    loop = asyncio.get_running_loop()
    last = _last
    batch = last[1]() if last is not None and last[0]() is loop else None
    if batch is None:
        batch = _Batch()
        _last = (weakref.ref(loop), weakref.ref(batch))
    calls = batch._calls  # (the batch's add, here: one frame less per drop)
    if not calls:
        loop.call_soon(batch._turn, loop, context=_NO_CONTEXT)
    calls.append(call)
    calls.append(arg)
