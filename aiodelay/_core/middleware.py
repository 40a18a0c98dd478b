"""``setup(app)``, ``middleware()`` and ``stats(app)``: where a request enters aiodelay.

The middleware starts each request (a new state from ``state.new_state``, or its connection's
previous one when nothing can reach that any more), runs the handler (or awaits the "not done
yet" awaitable it returned) with the request's deadline armed, and ends it: itself when
nothing stopped it, nothing waits for it and nobody observes it (the common case, kept free of
calls for its cost), else through ``outcome.end``; an observed request's plain response it
then writes itself, as aiohttp would next, and hands the result to ``outcome.written``.
Everything else a request meets happens below it, in ``state`` and ``outcome``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Iterable
from time import monotonic
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from . import aiohttp_internals
from .aiohttp_internals import (
    EMPTY_PAYLOAD,
    SOCKET_TRANSPORT,
    Watch,
    busy,
    close_after,
    close_waiting,
    gone_before_watched,
    install_watch,
    note_departures,
    server_of,
    take_over_pre_shutdown,
    worth_reading,
)
from .budget import HANDLED, BudgetDeadline, budget_of
from .deadlines import DeadlineQueue
from .errors import ConnectionLost
from .hangups import CAN_HOLD, hangups_of
from .installation import Installation, RoutePlan, app_key, installed_on
from .outcome import EVENTS, WRITES_HERE, end, record_completed, started, write_failed, written
from .policy import Policy
from .state import (
    CANCEL_MESSAGE,
    DEADLINE_MESSAGE,
    ENDED,
    ONLY_THE_WATCH,
    RUNNING,
    SETTLED,
    WRITING,
    RequestState,
    getrefcount,
    new_state,
)
from .stats import Stats

__all__ = ("Middleware", "app_key", "middleware", "setup", "stats")

logger = logging.getLogger("aiodelay")

# asyncio.current_task() is C code from Python 3.12 on; on 3.10 and 3.11 it is a Python
# function around this dict, and its frame was a tenth of aiodelay's cost per request.
_current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = (
    None if sys.version_info >= (3, 12) else asyncio.tasks._current_tasks  # type: ignore[attr-defined]
)
_current_task = asyncio.current_task
_get_running_loop = asyncio.get_running_loop
#: The phases in which a request's state may serve the next request on its connection.
_DONE = (ENDED, SETTLED)

#: How long the app's cleanup waits for functions that ``aiodelay.to_thread`` still runs.
THREAD_CLEANUP_TIMEOUT = 5.0

#: How long at most a graceful shutdown keeps reading connections that wait for a request,
#: while a client may still send one on them (see ``aiohttp_internals.worth_reading``): one
#: accepted just before (a client, a proxy, connects to send one at once), and, if requests
#: were in flight, the idle ones (nginx sends its next request on any connection of its pool).
SHUTDOWN_DRAIN = 0.25

#: Classes known to be StreamResponse subclasses: isinstance() on StreamResponse goes
#: through ABCMeta (it is a MutableMapping), too slow to pay on every request.
_RESPONSE_CLASSES: set[type] = set()


class Middleware(Installation):
    """The aiodelay middleware; one instance per :func:`setup` or :func:`middleware` call."""

    __middleware_version__ = 1  # aiohttp's marker of a new-style middleware
    __slots__ = ()

    def __repr__(self) -> str:
        return f"<aiodelay middleware policy={self.policy.value!r}>"

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Every request's way, so written for its cost (each Python call here is a tenth of
        # what aiodelay costs a request): aiohttp's request is read directly (its _protocol,
        # _payload and _payload_writer, which aiohttp_internals.missing_internals() checks),
        # and a request's start, and its end when nothing stopped it and nobody waits for it,
        # are made here, not in calls.
        transport = request._protocol.transport
        if transport.__class__ is SOCKET_TRANSPORT:
            watch = transport._protocol  # type: ignore[union-attr]  # (get_protocol())
        elif transport is None:
            watch = None  # the connection is gone
        else:
            watch = transport.get_protocol()
        if type(watch) is not Watch and watch is not None:
            # The first request on this connection (on the next ones the Watch is there);
            # also when the transport is already closing, so that aiohttp's connection_lost
            # still goes through the Watch.
            watch = self._watch(request, transport)  # type: ignore[arg-type]
        if _current_tasks is None:
            task = _current_task()
        else:
            task = _current_tasks.get(_get_running_loop())
        assert task is not None  # aiohttp runs each request in a task of its own
        state = None if watch is None else watch.state
        if (
            state is not None
            and state.phase in _DONE
            and state.cause is None
            and state.extras is None
            and state.installation is self
        ):
            # The connection's previous request ended plainly (nothing stopped it, it owned
            # nothing, nothing waited for it): if nothing can reach its state any more (no one
            # holds that request, a clone of it, or the state), the state object serves this
            # request. No allocation on a keep-alive connection's every request, and nothing
            # can tell the two apart, since the old one cannot be asked any more.
            state.request = None  # the connection moved on: the previous request goes
            if getrefcount(state) > ONLY_THE_WATCH:
                state = new_state(request, self, watch)
        else:
            if self.nested is None:
                self.learn(request.app)
            state = new_state(request, self, watch)
        if self.shutting_down:
            # Read once the shutdown began, or before it but not started then: its connection
            # closes after it, and its response says so (take_over_pre_shutdown).
            close_after(request)
        if state is None:
            # aiodelay is installed on an app and on a sub-app: the outer one watches, counts
            # and tells for both, under the sub-app's policy.
            return await handler(request)
        # RUNNING (state.py), and counted as started by every installation on its way.
        state.request = request
        state.task = task
        state.watch = watch
        state.started_at = monotonic()
        state.phase = RUNNING
        state.response = state.route_plan = None
        # (aiohttp_internals.STATE: kept for the request and its clones, on their writer)
        request._payload_writer._aiodelay_state = state  # type: ignore[attr-defined]
        self.counters.started += 1
        if self.nested:
            for other in self.installations(request)[1:]:
                other.counters.started += 1
        if watch is None:
            gone: ConnectionLost | None = gone_before_watched(request)
        else:
            gone = watch.lost  # a pipelined request read before the peer left
        held = deadlines = None
        try:
            if self.nested:
                started(state)
            elif self.observers:
                # (outcome.started, inlined: the observers of this installation alone)
                for observer in self.observers:
                    try:
                        observer.request_started(request)
                    except Exception:  # one broken observer must not break the request
                        logger.exception("observer %r failed", observer)
            # aiohttp may pause reading for this request (an upload not all here yet, a full
            # pipelining queue): then only the kernel can tell that the client left.
            if watch is not None and (request._payload is not EMPTY_PAYLOAD or watch.queued):
                held = watch
                held.hold(request)
            if self.timed:
                deadlines = self._arm(state, request)
            if gone is not None and EVENTS.client_left(state, gone, False, in_task=True):
                raise asyncio.CancelledError(CANCEL_MESSAGE)  # no work for a client gone
            response = await handler(request)
            if response.__class__ not in _RESPONSE_CLASSES:
                response = await _not_done_yet(request, response)
        except BaseException as exc:
            logged = end(state, None, exc)
            if logged is None:
                raise
            return logged
        finally:
            if deadlines is not None:
                deadlines.pending.pop(state, None)  # (gone already if it passed)
            if held is not None:
                held.release()
        writes = False
        if (
            state.phase == RUNNING
            and state.extras is None
            and watch is not None
            and watch.lost is None
            and not (
                transport._closing  # type: ignore[union-attr]  # (is_closing())
                if transport.__class__ is SOCKET_TRANSPORT
                else transport.is_closing()  # type: ignore[union-attr]  # (the watch's)
            )
        ):
            # Nothing stopped it, it owns nothing, nothing waits for it, its client is there.
            if not (self.nested or self.observers):
                # Most requests, nobody observing them: ENDED, counted completed now (the
                # "otherwise" row of outcome.py's table); recounted as truncated if the client
                # leaves before aiohttp has written the response (EVENTS.closed).
                state.phase = ENDED
                state.response = response
                self.counters.completed += 1
                return response
            if (
                not self.nested
                and response.__class__ in WRITES_HERE
                and (
                    plan := state.route_plan
                    or self._plans.get(request._match_info._route)  # type: ignore[union-attr]
                    or self.plan_for(request)
                ).last_to_touch
            ):
                # Observed (all but the first request of a response class): its outcome
                # waits for the write, which the middleware makes (below).
                state.route_plan = plan
                state.response = response
                state.phase = WRITING
                writes = True
        if not writes:
            response = end(state, response, None)  # type: ignore[assignment]
            writes = (
                state.phase == WRITING
                and response.__class__ in WRITES_HERE
                and (kept := state.route_plan) is not None
                and kept.last_to_touch
            )
        if writes:
            # Observed, or awaited with notify_finish: its outcome waits for the write, done
            # here as aiohttp would do it next (see outcome.written).
            watch = state.watch
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                pass  # its client left: truncated (aiohttp's own write_eof finds that out)
            except Exception as exc:
                write_failed(state, request, exc)  # as aiohttp would have: logged, closed
            finally:
                if state.phase == WRITING:
                    if request._payload_writer._eof:  # type: ignore[attr-defined]
                        record_completed(state, request)  # all of it went out
                    else:
                        written(state, request, watch)
        return response

    def _watch(self, request: web.Request, transport: asyncio.BaseTransport) -> Watch:
        """Watch the connection of ``request``, its first; and, at the first request of each
        server, learn how its peers leave and take over its graceful shutdown."""
        watch = install_watch(request, transport, EVENTS)
        server = server_of(request)
        if server is not None and server not in self.servers:
            self.servers.add(server)
            note_departures(server)
            take_over_pre_shutdown(
                server, self._shutdown_began, self._shutdown_ended, drain=self.drains
            )
        return watch

    def _arm(self, state: RequestState, request: web.Request) -> DeadlineQueue | None:
        """Put the request in the queue of its deadline, if it has one (and return the
        queue, which it leaves when it ends); nothing at all in an app where no route can
        have a deadline."""
        # (plan_for's lookup, without its frame: a kept plan of the route, else plan_for)
        route = request._match_info._route  # type: ignore[union-attr]
        plan = state.route_plan = self._plans.get(route) or self.plan_for(request)
        if plan.budget_status is not None:
            budgeted = self._budget(state, request, plan)
            if budgeted is not None:
                HANDLED.set((state, request))  # (for budget_trace in the handler's child tasks)
                return budgeted
        deadlines = plan.deadlines
        if deadlines is None or (
            plan.deadline_by_default
            and request._message.upgrade  # (a WebSocket handshake, say)
            and not plan.deadline_for(request)
        ):
            return None
        if deadlines.timer is not None and deadlines.loop is _get_running_loop():
            # (DeadlineQueue.add, without its frame: its timer is set on this loop already)
            deadlines.pending[state] = state.started_at + deadlines.seconds
        else:
            deadlines.add(state, state.started_at)
        if plan.budget_headers:
            HANDLED.set((state, request))  # (an app that reads budgets; others pay nothing)
        return deadlines

    def _budget(
        self, state: RequestState, request: web.Request, plan: RoutePlan
    ) -> DeadlineQueue | None:
        """The queue of the request's deadline if a budget from upstream sets it (shorter
        than its route's), None if it does not; raises the CancelledError that stops it
        before its handler starts if its budget is spent already (see ``budget.py``)."""
        found = budget_of(request, plan.budget_headers, plan.installations)
        if found is None or (plan.budget_by_default and request._message.upgrade):
            return None
        seconds, header = found
        status = plan.budget_status
        assert status is not None
        limit = plan.deadline_for(request)
        if limit is not None and limit[0] <= seconds:
            return None  # the route's own deadline comes first
        if seconds <= 0:
            state.budget_spent(seconds, status, header)
            raise asyncio.CancelledError(DEADLINE_MESSAGE)
        budget = BudgetDeadline(seconds, status)
        extras = state.more()
        extras.budget = budget
        extras.budget_from = header
        budget.add(state, state.started_at)
        return budget

    def _shutdown_began(self) -> None:
        self.shutting_down = True

    def _shutdown_ended(self, server: web.Server) -> None:
        self.servers.discard(server)
        if not self.drains:
            # middleware() alone has no lifecycle hook to start afresh with (setup()'s does):
            # a later runner of the same middleware, a restarted app, an app factory's next
            # app, must not find it shutting down.
            self.shutting_down = False

    async def _on_shutdown(self, app: web.Application) -> None:
        self.shutting_down = True
        # The first on_shutdown hook (see setup()): what clients send before they learn of the
        # shutdown is served while the app's resources are all there, each answer saying that
        # the connection closes. While requests were in flight, the clients are busy: idle
        # connections are kept reading too, and each closes after the request it brings
        # (under load, nginx cycles through its pool in a moment); not when nothing was (then
        # closing an idle connection races with no one). Bounded: a connection that brings
        # nothing is not waited for long.
        idle = any(busy(server) for server in self.servers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_DRAIN
        while (left := deadline - loop.time()) > 0:
            tasks = [task for server in self.servers for task in worth_reading(server, idle=idle)]
            if not tasks:
                break
            await asyncio.wait(tasks, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for server in self.servers:
            close_waiting(server)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        self.shutting_down = False
        if CAN_HOLD:
            # Made now, while descriptors are to be had: made at the first upload instead, a
            # server out of descriptors then would not see its clients leave behind it.
            hangups_of(asyncio.get_running_loop())
        yield
        self.servers.clear()
        # aiohttp's graceful shutdown waited for these; what still runs now would be
        # destroyed pending when the loop closes. Cancel it and let its finally blocks run.
        tasks = [state.task for state in self.running_on if state.task is not None]
        tasks = [task for task in tasks if not task.done()]
        for task in tasks:
            task.cancel("aiodelay: the server is shutting down")
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Threads cannot be cancelled: they were told to stop when their requests ended.
        # Wait for them a bounded time (so that the app's other cleanup runs), and say which
        # ones are left behind: they run on, and the process cannot exit before they return
        # (the loop's default executor is joined by asyncio.run and web.run_app, and its
        # threads again at the interpreter's exit).
        if self.threads:
            _, left = await asyncio.wait(
                [job.done for job in self.threads], timeout=THREAD_CLEANUP_TIMEOUT
            )
            for job in self.threads:
                if job.done in left:
                    logger.warning(
                        "%r still runs %.1fs after cleanup began: left behind, and the "
                        "process exits only once it returns (only aiodelay.check_cancelled() "
                        "in it can end it sooner)",
                        job,
                        THREAD_CLEANUP_TIMEOUT,
                    )


async def _not_done_yet(request: web.Request, result: object) -> web.StreamResponse:
    """Await a handler's "not done yet" result (a Future, Task or coroutine) to its response.

    Also where a response of a class not seen before is checked once."""
    if isinstance(result, web.StreamResponse):
        _RESPONSE_CLASSES.add(result.__class__)
        return result
    if inspect.isawaitable(result):
        later = await result
        if isinstance(later, web.StreamResponse):
            return later
        got = f"an awaitable that resolved to {later!r}"
    else:
        got = repr(result)
    handler = request.match_info.handler
    name = getattr(handler, "__qualname__", repr(handler))
    logger.error(
        "handler %s for %s %s returned %s, not a web.StreamResponse: answering 500",
        name,
        request.method,
        request.path,
        got,
    )
    return web.Response(status=500, text="500: Internal Server Error")


def middleware(
    *,
    policy: Policy | str = Policy.CANCEL,
    deadline: float | None = None,
    budget_headers: Iterable[str] = (),
) -> Middleware:
    """The aiodelay middleware, for ``web.Application(middlewares=[...])``.

    Put it first so that it also cancels the middlewares after it. Unlike :func:`setup`, it
    has no app lifecycle hooks: at server shutdown, ``notify_finish`` futures of stopped
    requests are cancelled rather than failed with ``reason="shutdown"``, shielded handlers
    still running after their client left are not cancelled at cleanup, and cleanup does not
    wait for ``aiodelay.to_thread`` functions still running. ``policy``, ``deadline`` and
    ``budget_headers`` are :func:`setup`'s.
    """
    return _new(policy, deadline, budget_headers)


def _new(policy: Policy | str, deadline: float | None, budget_headers: Iterable[str]) -> Middleware:
    """A middleware for the aiohttp at hand: degraded (and said so, once) if it lacks an
    internal that aiodelay relies on."""
    if not aiohttp_internals.MISSING:
        return Middleware(policy=policy, deadline=deadline, budget_headers=budget_headers)
    # Imported only then: degraded.py builds on this module.
    from .degraded import DegradedMiddleware, warn_once

    mw = DegradedMiddleware(policy=policy, deadline=deadline, budget_headers=budget_headers)
    warn_once()
    return mw


def setup(
    app: web.Application,
    *,
    policy: Policy | str = Policy.CANCEL,
    deadline: float | None = None,
    budget_headers: Iterable[str] = (),
) -> None:
    """Install aiodelay on ``app``: the middleware outermost, and its lifecycle hooks.

    ``policy`` is what a disconnect does to handlers not marked with
    ``@aiodelay.cancellable`` or ``@aiodelay.shielded``: ``"cancel"`` (the default) or
    ``"shield"``. Raises ``ValueError`` for another policy, ``RuntimeError`` if aiodelay is
    already set up on ``app`` or ``app`` is frozen (already started).

    ``deadline`` is the default deadline of the app's routes in seconds (``None``: none), as
    :func:`aiodelay.deadline` gives one route, answered with 504. Shielded routes and
    WebSocket upgrades are left alone unless they carry their own ``@aiodelay.deadline``;
    ``@aiodelay.deadline(None)`` exempts a route.

    ``budget_headers`` (none by default) are the headers a request's time budget from upstream
    is read from: ``"grpc-timeout"`` (gRPC's ``<digits><unit>``) and
    ``"x-envoy-expected-rq-timeout-ms"`` (Envoy's milliseconds). A request's deadline is then
    the smaller of its route's and its budget (a budget only shortens; the routes a default
    deadline leaves alone take none); one whose budget is spent on arrival is answered at once
    with its deadline's status, and counted ``timed_out``. A malformed, negative or absurd
    value is ignored (``Stats.budgets_ignored``). ``ValueError`` for another header.
    :func:`aiodelay.budget_trace` sends the budget on to the app's own HTTP calls.
    """
    if not isinstance(app, web.Application):
        raise TypeError(f"aiodelay.setup() takes a web.Application, got {app!r}")
    mw = _new(policy, deadline, budget_headers)
    if app_key in app or any(isinstance(m, Installation) for m in app.middlewares):
        raise RuntimeError("aiodelay is already installed on this app")
    if app.frozen:
        raise RuntimeError("aiodelay.setup() must be called before the app starts")
    app[app_key] = mw
    mw.drains = True
    app.middlewares.insert(0, mw)
    # First: the requests that clients sent before they learned of the shutdown are served
    # before the app's own hooks tear anything down (see Middleware._on_shutdown).
    app.on_shutdown.insert(0, mw._on_shutdown)
    app.cleanup_ctx.append(mw._lifecycle)


def stats(app: web.Application) -> Stats:
    """A snapshot of what aiodelay counted on ``app`` since it was set up.

    For a sub-app with aiodelay of its own, that is the requests routed into it; for the main
    app, all of its requests, the sub-app's included. See :class:`aiodelay.Stats`.
    """
    return installed_on(app).counters.snapshot()
