"""What one ``aiodelay.setup()`` keeps (:class:`Installation`), and each route's plan.

An :class:`Installation` is made by each ``aiodelay.setup(app)`` or ``aiodelay.middleware()``
(the middleware is one): the defaults it was given, the counters behind ``aiodelay.stats()``,
its observers, the handlers that run on after their client left, and the threads of
``aiodelay.to_thread``.

A request routed into a sub-app is handled by the installations of every app on its way that
has aiodelay installed: the outermost one watches the connection and does all the work; each
counts the request and tells its observers. What a route's requests get is worked out once per
route, into a :class:`RoutePlan`: those installations, the policy (the route's mark, else the
innermost installation's default), the deadline, the grace, and the aiohttp-remotes
middlewares on the way (which say who the client is behind a proxy).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import hdrs, web

from .aiohttp_internals import route_of
from .budget import check_budget_headers
from .client import remotes_on_the_way
from .deadlines import DeadlineQueue
from .observe import RequestObserver
from .owned import ThreadJob
from .policy import (
    Limit,
    Policy,
    check_seconds,
    coerce_policy,
    deadline_of,
    grace_of,
    marks_a_deadline,
    policy_of,
)
from .stats import Counters

__all__ = (
    "NOT_SET_UP",
    "ROUTES_PER_REQUEST",
    "Installation",
    "RoutePlan",
    "add_observer",
    "app_key",
    "installation_of",
    "installed_on",
)

#: How many routes' plans an installation keeps (:meth:`Installation.plan_for`).
PLANS_KEPT = 1024

#: An attribute that a custom router resource sets to True when it makes its routes as
#: requests come (the server's scripts): their handlers, and with them their deadlines,
#: cannot be learned when the app starts (:meth:`Installation.learn`).
ROUTES_PER_REQUEST = "aiodelay_routes_per_request"

NOT_SET_UP = (
    "aiodelay is not installed on this request's app: call aiodelay.setup(app) "
    "(or add aiodelay.middleware() to its middlewares)"
)


class Running(Protocol):
    """A request whose handler runs on after its client left (a ``RequestState``)."""

    task: asyncio.Task[Any] | None


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What every request of one route gets, worked out once."""

    #: The installations of the apps on the route's way, outermost (the watching one) first.
    installations: tuple[Installation, ...]
    #: What the client leaving does to the handler.
    policy: Policy
    #: Seconds a cancellable handler may run on after its client left, or None.
    grace: float | None
    #: The deadline (seconds, status), or None.
    deadline: Limit
    #: The deadline is the app's default, not the route's own (WebSockets are exempt).
    deadline_by_default: bool
    #: Where the route's requests wait for their deadline (shared by the routes of one
    #: deadline), or None without one.
    deadlines: DeadlineQueue | None
    #: aiodelay is the first middleware of the served app: no other middleware sees what it
    #: returns.
    outermost: bool
    #: Nothing but aiohttp touches a response of the route after aiodelay: it is outermost,
    #: and no app on the way has ``on_response_prepare`` handlers (``outcome.writes_here``).
    last_to_touch: bool
    #: aiohttp-remotes' middlewares on the way (see ``client.trusted_remote``).
    remotes: tuple[Any, ...]
    #: The headers the route's budget from upstream is read from, and sent in by
    #: ``budget_trace``: the ``budget_headers`` of the innermost installation on its way (a
    #: sub-app's own setup decides for its routes, as its default deadline does).
    budget_headers: tuple[str, ...] = ()
    #: The status a budget from upstream is answered with when it runs out, or None: the
    #: route takes no budget (no ``budget_headers``; shielded, ``@aiodelay.deadline(None)``, or
    #: a ``@aiodelay.grace`` without a deadline of its own).
    budget_status: int | None = None
    #: The route takes a budget by default, not by a deadline of its own (WebSockets do not).
    budget_by_default: bool = False

    def deadline_for(self, request: web.BaseRequest) -> Limit:
        """The request's deadline: the plan's, unless it is the app's default and the request
        asks for a WebSocket (the default is not for a WebSocket's whole life)."""
        if self.deadline_by_default and request.headers.get(hdrs.UPGRADE, "").lower() == (
            "websocket"
        ):
            return None
        return self.deadline


class Installation:
    """What one aiodelay installation keeps; the middleware is one (it subclasses this)."""

    __slots__ = (
        "_alone",
        "_deadline_queues",
        "_plans",
        "budget_headers",
        "counters",
        "deadline",
        "drains",
        "nested",
        "observers",
        "policy",
        "running_on",
        "servers",
        "shutting_down",
        "threads",
        "timed",
    )

    def __init__(
        self,
        *,
        policy: Policy | str = Policy.CANCEL,
        deadline: float | None = None,
        budget_headers: Iterable[str] = (),
    ) -> None:
        self.policy = coerce_policy(policy)
        seconds = check_seconds(deadline, "deadline", allow_none=True)
        #: The default deadline of the app's routes (answered with 504), or None.
        self.deadline: Limit = None if seconds is None else (seconds, 504)
        #: The headers a budget from upstream is read from (``budget.py``), none by default.
        self.budget_headers = check_budget_headers(budget_headers)
        self.counters = Counters()
        self.observers: list[RequestObserver] = []
        #: Requests whose handler runs on after their client left (shielded, WebSockets).
        self.running_on: set[Running] = set()
        #: Functions that ``aiodelay.to_thread`` runs in threads now (``ThreadJob``).
        self.threads: set[ThreadJob] = set()
        self.shutting_down = False
        #: The aiohttp servers (``web.Server``, one per runner) of the connections this
        #: installation watches: at shutdown, each connection's last response says it closes.
        self.servers: set[web.Server] = set()
        #: Whether its ``on_shutdown`` hook (``setup()``'s) serves what clients send before
        #: they learn of a shutdown.
        self.drains = False
        #: Learned from the app's routes at the first request (:meth:`learn`), None before:
        #: whether any route can have a deadline, and whether other installations are on the
        #: way of some route (sub-apps with aiodelay of their own).
        self.timed: bool | None = None if seconds is None and not self.budget_headers else True
        self.nested: bool | None = None
        self._plans: dict[object, RoutePlan] = {}
        self._deadline_queues: dict[tuple[float, int], DeadlineQueue] = {}
        self._alone: tuple[Installation, ...] = (self,)

    def learn(self, app: web.Application) -> None:
        """Look through ``app``'s routes and sub-apps once (it is frozen: they do not change):
        can a route have a deadline, and do other installations handle some routes too.

        A resource that makes its routes per request (:data:`ROUTES_PER_REQUEST`) may have
        a deadline on any of them: its requests look for one."""
        timed = self.deadline is not None or bool(self.budget_headers)
        nested = False
        apps = [app]
        while apps:
            current = apps.pop()
            installed = installation_of(current)
            if installed is not None and installed is not self:
                nested = True
                timed = timed or installed.deadline is not None or bool(installed.budget_headers)
            for resource in current.router.resources():
                sub_app = resource.get_info().get("app")
                if isinstance(sub_app, web.Application):
                    apps.append(sub_app)
                timed = timed or getattr(resource, ROUTES_PER_REQUEST, False) is True
                for route in resource:
                    timed = timed or marks_a_deadline(route.handler)
        self.timed, self.nested = timed, nested

    def installations(self, request: web.BaseRequest) -> tuple[Installation, ...]:
        """The installations that handle ``request`` (this one, the watching one, first)."""
        return self.plan_for(request).installations if self.nested else self._alone

    def plan_for(self, request: web.BaseRequest) -> RoutePlan:
        """The plan of the route ``request`` matched, worked out on its first request.

        Kept per route (a route's apps do not change once the app runs); a request that
        matched no route (a 404) has a route object of its own, and its plan is not kept."""
        if request.__class__ is not web.Request and not isinstance(request, web.Request):
            return self._plan(request, None, ())
        route = route_of(request)
        plan = self._plans.get(route)
        if plan is None:
            plan = self._plan(request, route.handler, request.match_info.apps)
            if isinstance(route, web.ResourceRoute):
                if len(self._plans) >= PLANS_KEPT:
                    # A custom resource may make a route per request (the server's scripts
                    # do): the plans are a cache, not a registry of every route ever seen.
                    self._plans.clear()
                self._plans[route] = plan
        return plan

    def _plan(
        self, request: web.BaseRequest, handler: object, apps: tuple[web.Application, ...]
    ) -> RoutePlan:
        found = self.on_the_way(apps)
        innermost = found[-1]
        outermost = bool(apps) and _first_middleware(apps[0]) is self
        policy = policy_of(handler, innermost.policy)
        limit = deadline_of(handler, innermost.deadline, policy)
        budget_headers = innermost.budget_headers
        budgeted = deadline_of(handler, _ANY_BUDGET, policy) if budget_headers else None
        grace = grace_of(handler)
        if budgeted is _ANY_BUDGET and grace is not None:
            # A client that hangs up lets a grace route's work finish its grace; a budget it
            # sends must not cut that work sooner: only a deadline of the route's own does.
            budgeted = None
        return RoutePlan(
            installations=tuple(found),
            policy=policy,
            grace=grace,
            deadline=limit,
            deadline_by_default=limit is not None and limit is innermost.deadline,
            deadlines=None if limit is None else self._deadline_queue(limit),
            outermost=outermost,
            last_to_touch=outermost and not any(app.on_response_prepare for app in apps),
            remotes=remotes_on_the_way(apps),
            budget_headers=budget_headers,
            budget_status=None if budgeted is None else budgeted[1],
            budget_by_default=budgeted is _ANY_BUDGET,
        )

    def on_the_way(self, apps: Iterable[web.Application]) -> list[Installation]:
        """This installation, then those of ``apps`` (a route's way into sub-apps, the
        outermost first) that are not this one: the installations that handle its requests."""
        found = [self]
        for app in apps:
            installed = installation_of(app)
            if installed is not None and installed not in found:
                found.append(installed)
        return found

    def _deadline_queue(self, limit: tuple[float, int]) -> DeadlineQueue:
        """The queue of this installation's requests whose deadline is ``limit``."""
        queue = self._deadline_queues.get(limit)
        if queue is None:
            queue = self._deadline_queues[limit] = DeadlineQueue(*limit)
        return queue


#: What ``deadline_of`` answers for a route that takes a budget by default (a cancellable
#: route with no deadline mark): any budget, answered 504.
_ANY_BUDGET: Limit = (math.inf, 504)


def _first_middleware(app: web.Application) -> object:
    return app.middlewares[0] if app.middlewares else None


app_key = web.AppKey("aiodelay", Installation)


def installation_of(app: web.Application) -> Installation | None:
    """The aiodelay installation of ``app`` (by ``setup()``, or ``middleware()`` in its
    middlewares), or None."""
    installed = app.get(app_key)
    if installed is None:
        for candidate in app.middlewares:
            if isinstance(candidate, Installation):
                return candidate
    return installed


def installed_on(app: web.Application) -> Installation:
    """The aiodelay installation of ``app``; RuntimeError if there is none."""
    installed = installation_of(app)
    if installed is None:
        raise RuntimeError(
            "aiodelay is not installed on this app: call aiodelay.setup(app) "
            "(or add aiodelay.middleware() to its middlewares)"
        )
    return installed


def add_observer(app: web.Application, observer: RequestObserver) -> Callable[[], None]:
    """Tell ``observer`` (a :class:`aiodelay.RequestObserver`) about each request of ``app``
    (and of its sub-apps): its start, its client leaving, how it ended.

    ``app`` must have aiodelay installed (``RuntimeError`` otherwise). Returns a function that
    removes the observer again (a second call does nothing). A request that returned a
    response is recorded once the response is written, so that the outcome can say whether
    it got there (``"truncated"`` if not): aiodelay, the first middleware of the app, writes
    it itself as aiohttp would next (a ``FileResponse``, or a response class with its own
    ``prepare``, is left to aiohttp and recorded when aiohttp's task of the request ends).
    An observer that raises is logged on the ``aiodelay`` logger; the other observers and the
    request go on.
    """
    observers = installed_on(app).observers
    observers.append(observer)

    def remove() -> None:
        if observer in observers:
            observers.remove(observer)

    return remove
