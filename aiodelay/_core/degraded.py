"""What aiodelay does on an aiohttp that lacks an internal it relies on: degrade, never break.

``aiohttp_internals.MISSING`` says what the aiohttp at hand lacks (nothing, on every release CI
tests). If it is not empty, :func:`warn_once` logs one WARNING on the ``aiodelay`` logger that
names the aiohttp version and what is missing, and ``setup()`` / ``middleware()`` install a
:class:`DegradedMiddleware`, which reads one internal, once (aiohttp's server, through the
first request), and none on the way of a request:

- no Watch on the connection: a client leaving is seen by aiohttp's own
  ``handler_cancellation`` (the server cancels the request's task when the connection is lost),
  which the middleware turns on at the first request when the server can be reached, else a
  second WARNING says to pass ``handler_cancellation=True`` to ``web.AppRunner`` or
  ``web.run_app``;
- policies still hold: a shielded handler (a ``@shielded`` route, or ``policy="shield"``) runs
  in a task of its own that aiohttp's cancellation does not reach, and is cancelled at the app's
  cleanup if it still runs then;
- counts (``aiodelay.stats``) and the INFO line of a request whose client left still work,
  also with aiodelay set up on a sub-app too: the outermost middleware handles the request,
  under the policy of the innermost app that has aiodelay, and counts it in each.

Not available degraded: detection behind unread request bodies (the kernel's watch), how the
client left (FIN or RST: the line says "a disconnect"), deadlines and grace periods, observers,
the access log's true byte counts, and the functions that take a request (``notify_finish``,
``call_later``, ``spawn``, ``to_thread``), which raise ``RuntimeError`` with a one-line
message (``is_disconnected`` still answers, from the connection alone).
A shielded handler runs in another task: a context variable it sets is not seen by the
middlewares outside it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from contextvars import ContextVar
from time import monotonic
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from . import aiohttp_internals
from .aiohttp_internals import AIOHTTP_VERSION, turn_on_handler_cancellation
from .errors import seconds_text
from .installation import Installation
from .middleware import Middleware
from .policy import Policy, policy_of

__all__ = ("DegradedMiddleware", "warn_once")

logger = logging.getLogger("aiodelay")

_warned = False


def warn_once() -> None:
    """Log, once per process, that aiodelay runs degraded on this aiohttp and why."""
    global _warned
    if _warned:
        return
    _warned = True
    logger.warning(
        "aiodelay does not know aiohttp %s: it lacks %s. aiodelay runs degraded: aiohttp's "
        "own handler_cancellation stops a request whose client left; policies, stats and the "
        "log still work; deadlines, observers and notify_finish do not. Supported: aiohttp "
        "3.10 to 3.14",
        AIOHTTP_VERSION,
        ", ".join(aiohttp_internals.MISSING),
    )


class _RunningOn:
    """A shielded handler that runs on after its client left (what the cleanup cancels)."""

    __slots__ = ("task",)

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task: asyncio.Task[Any] | None = task


#: The degraded middleware that handles the request of this task: a sub-app's own aiodelay
#: leaves the request to the outer one (as the Watch's state does when not degraded).
_HANDLING: ContextVar[DegradedMiddleware | None] = ContextVar("aiodelay_degraded", default=None)


class DegradedMiddleware(Middleware):
    """The aiodelay middleware on an aiohttp it does not know (see the module's docstring)."""

    __slots__ = ("_looked",)

    def __init__(
        self,
        *,
        policy: Policy | str = Policy.CANCEL,
        deadline: float | None = None,
        budget_headers: Iterable[str] = (),
    ):
        super().__init__(policy=policy, deadline=deadline, budget_headers=budget_headers)
        #: Whether the first request looked for aiohttp's server (to turn its cancellation on).
        self._looked = False

    def __repr__(self) -> str:
        return f"<aiodelay middleware policy={self.policy.value!r} degraded>"

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if _HANDLING.get() is not None:
            return await handler(request)  # an outer aiodelay handles it, for this one too
        handling = _HANDLING.set(self)
        try:
            return await self._handle(request, handler)
        finally:
            _HANDLING.reset(handling)

    async def _handle(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self._looked:
            self._looked = True
            if not turn_on_handler_cancellation(request):
                logger.warning(
                    "aiodelay runs degraded and cannot reach aiohttp's server to turn on its "
                    "handler_cancellation: pass handler_cancellation=True to web.AppRunner or "
                    "web.run_app, or a client that leaves is not seen"
                )
        mine = self._installations(request)
        for each in mine:
            each.counters.started += 1
        policy = policy_of(request.match_info.handler, mine[-1].policy)
        began = monotonic()
        task: asyncio.Task[web.StreamResponse] | None = None
        try:
            if policy is Policy.SHIELD:
                task = asyncio.ensure_future(handler(request))
                response = await asyncio.shield(task)
            else:
                response = await handler(request)
        except asyncio.CancelledError:
            if self.shutting_down:
                _count(mine, "failed", True)  # stopped by the server's shutdown
                raise
            if request.transport is not None:
                _count(mine, "failed", False)  # not the client: an outer timeout?
                raise
            if task is None or task.done():
                _count(mine, "cancelled", True)
                self._log(request, began, "cancelled")
            else:
                self._run_on(task, mine)
                self._log(request, began, "shielded, runs on")
            raise
        except BaseException:
            _count(mine, "failed", request.transport is None)
            raise
        _count(mine, "completed", False)
        return response

    def _installations(self, request: web.Request) -> list[Installation]:
        """This installation, then those of the apps on the request's way into sub-apps (from
        the request's public ``match_info``: no plan, which reads internals)."""
        return self.on_the_way(getattr(request.match_info, "apps", ()))

    def _run_on(self, task: asyncio.Task[web.StreamResponse], mine: list[Installation]) -> None:
        running = _RunningOn(task)
        self.running_on.add(running)

        def done(task: asyncio.Task[web.StreamResponse]) -> None:
            self.running_on.discard(running)
            running.task = None
            kind = "ran_on" if not task.cancelled() and task.exception() is None else "failed"
            _count(mine, kind, True)

        task.add_done_callback(done)

    @staticmethod
    def _log(request: web.BaseRequest, began: float, what: str) -> None:
        logger.info(
            "%s %s from %s interrupted by a disconnect after %s: %s",
            request.method,
            request.path,
            request.remote,
            seconds_text(monotonic() - began),
            what,
        )


def _count(installations: list[Installation], kind: str, disconnected: bool) -> None:
    for each in installations:
        each.counters.count(kind, disconnected)
