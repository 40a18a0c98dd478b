"""Where a request's end is recorded: one :class:`Book` per installation, and :func:`record`.

A :class:`Book` is what one ``aiodelay.setup()`` (or ``aiodelay.middleware()``) keeps: the
default policy, the counters behind ``aiodelay.stats()``, the observers, and the handlers that
run on after their client left. :func:`record` is the one place that says how a request ended:
every path (a handler that completed, was cancelled, ran on, failed, or whose response was cut
short after it returned) goes through it, so the counters, the INFO line and the observers
cannot disagree.

A request routed into a sub-app is recorded in the books of every app on its way that has
aiodelay installed (``aiodelay.stats(sub)`` counts the sub-app's requests, and
``aiodelay.stats(app)`` counts them too); the innermost one's policy applies to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic
from typing import Any, Protocol

from aiohttp import web

from ._client import trusted_remote
from ._errors import ConnectionLost
from ._observe import Outcome, OutcomeKind, RequestObserver
from ._owned import ThreadJob
from ._policy import Limit, Policy, check_seconds, coerce_policy
from ._stats import Counters

__all__ = (
    "NOT_SET_UP",
    "Book",
    "add_observer",
    "book_key",
    "books_of",
    "installed_on",
    "logger",
    "record",
    "started",
)

logger = logging.getLogger("aiodelay")

NOT_SET_UP = (
    "aiodelay is not installed on this request's app: call aiodelay.setup(app) "
    "(or add aiodelay.middleware() to its middlewares)"
)


class Running(Protocol):
    """A request whose handler runs on after its client left (a ``Lifetime``)."""

    task: asyncio.Task[Any] | None


class Book:
    """What one aiodelay installation keeps; the middleware is one (it subclasses this)."""

    __slots__ = (
        "chains",
        "counters",
        "deadline",
        "limits",
        "observers",
        "orphans",
        "policy",
        "quick",
        "remotes",
        "shutting_down",
        "threads",
        "timed",
    )

    def __init__(
        self, *, policy: Policy | str = Policy.CANCEL, deadline: float | None = None
    ) -> None:
        self.policy = coerce_policy(policy)
        seconds = check_seconds(deadline, "deadline", allow_none=True)
        #: The default deadline of the app's routes (answered with 504), or None.
        self.deadline: Limit = None if seconds is None else (seconds, 504)
        #: The deadline of each route, kept once looked up (a route's mark does not change).
        self.limits: dict[object, tuple[Limit, bool]] = {}
        #: Whether any request may have a deadline: None until the routes are known.
        self.timed: bool | None = None if seconds is None else True
        self.counters = Counters()
        #: The installations of each route's requests (see ``books_of``).
        self.chains: dict[object, tuple[Book, ...]] = {}
        #: The aiohttp-remotes middlewares on each route's way (see ``trusted_remote``).
        self.remotes: dict[object, tuple[Any, ...]] = {}
        #: Whether a drop can stop each route's handler with no Lifetime (``stop_quickly``).
        self.quick: dict[object, bool] = {}
        self.observers: list[RequestObserver] = []
        #: Requests whose handler runs on after their client left (shielded, WebSockets).
        self.orphans: set[Running] = set()
        #: Functions that ``aiodelay.to_thread`` runs in threads now (``ThreadJob``).
        self.threads: set[ThreadJob] = set()
        self.shutting_down = False


book_key = web.AppKey("aiodelay", Book)


def _book_of(app: web.Application) -> Book | None:
    book = app.get(book_key)
    if book is None:
        for candidate in app.middlewares:
            if isinstance(candidate, Book):
                return candidate
    return book


def installed_on(app: web.Application) -> Book:
    """The aiodelay installation of ``app``; RuntimeError if there is none."""
    book = _book_of(app)
    if book is None:
        raise RuntimeError(
            "aiodelay is not installed on this app: call aiodelay.setup(app) "
            "(or add aiodelay.middleware() to its middlewares)"
        )
    return book


def books_of(request: web.BaseRequest, watching: Book) -> tuple[Book, ...]:
    """The installations a request is recorded in: ``watching`` (the outermost, whose
    middleware watches the connection) and those of the apps it was routed through, outermost
    first. The last one's policy is the request's default.

    Kept per route by ``watching`` (a route's apps do not change once the app runs); a
    request that matched no route has a route object of its own, and is not kept."""
    if not isinstance(request, web.Request):
        return (watching,)
    match_info = request.match_info
    route = match_info.route
    chains = watching.chains
    books = chains.get(route)
    if books is None:
        found = [watching]
        for app in match_info.apps:
            book = _book_of(app)
            if book is not None and book not in found:
                found.append(book)
        books = tuple(found)
        if isinstance(route, web.ResourceRoute):
            chains[route] = books
    return books


def add_observer(app: web.Application, observer: RequestObserver) -> Callable[[], None]:
    """Tell ``observer`` (a :class:`aiodelay.RequestObserver`) about each request of ``app``
    (and of its sub-apps): its start, its client leaving, how it ended.

    ``app`` must have aiodelay installed (``RuntimeError`` otherwise). Returns a function that
    removes the observer again (a second call does nothing). An observed app pays for it on
    every request: a request that returned a response is recorded once aiohttp is done
    writing it (a callback on aiohttp's task of the request), so that the outcome can say
    whether it got there (``"truncated"`` if not).
    """
    observers = installed_on(app).observers
    observers.append(observer)

    def remove() -> None:
        if observer in observers:
            observers.remove(observer)

    return remove


def started(observers: list[RequestObserver], request: web.BaseRequest) -> None:
    """Tell ``observers`` that ``request`` started."""
    for observer in observers:
        try:
            observer.request_started(request)
        except Exception:  # one broken observer must not break the request
            logger.exception("observer %r failed", observer)


def record(
    books: tuple[Book, ...],
    request: web.BaseRequest,
    kind: OutcomeKind,
    lost: ConnectionLost | None,
    started_at: float,
    lost_at: float | None,
    *,
    note: str = "",
    recount: bool = False,
    deadline: float | None = None,
) -> None:
    """The end of one request: its counters in every book, its INFO line if its client left,
    and the observers (an :class:`Outcome` is made only for them).

    ``note`` completes the INFO line (what ran on, what was sent). ``recount``: the request
    was counted ``completed`` when its handler returned, and is now known to have lost its
    client while its response was written. ``deadline``: the seconds of a ``"timed_out"``
    request's deadline.
    """
    disconnected = lost is not None
    observed = False
    for book in books:
        counters = book.counters
        if recount:
            counters.completed -= 1
        counters.count(kind, disconnected)
        if book.observers:
            observed = True
    timed_out = kind == "timed_out"
    logged = (disconnected or timed_out) and logger.isEnabledFor(logging.INFO)
    if not (observed or logged):
        return
    client = trusted_remote(request, books[0].remotes)
    ended_at = monotonic()
    if logged and timed_out:
        logger.info(
            "%s %s from %s exceeded its %.3fs deadline: %s",
            request.method,
            request.path,
            client,
            deadline or 0.0,
            note,
        )
    elif logged and lost is not None:
        spent = (lost_at or started_at) - started_at
        logger.info(
            "%s %s from %s interrupted by %s after %.3fs: %s",
            request.method,
            request.path,
            client,
            lost.reason,
            spent,
            _what(kind, note, ended_at - started_at),
        )
    if observed:
        outcome = Outcome(kind, lost, started_at, lost_at, ended_at, client)
        for book in books:
            for observer in book.observers:
                try:
                    observer.request_ended(request, outcome)
                except Exception:  # one broken observer must not take the others' record
                    logger.exception("observer %r failed", observer)


def _what(kind: OutcomeKind, note: str, total: float) -> str:
    """What the INFO line says became of an interrupted request."""
    if kind == "cancelled":
        return f"cancelled ({note})" if note else "cancelled"
    if kind == "ran_on":
        return f"ran on ({note}), ended after {total:.3f}s"
    if kind == "truncated":
        return f"the handler had returned; its response was cut short ({note})"
    return note or "failed"
