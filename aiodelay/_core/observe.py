"""How a request ended (:class:`Outcome`) and the hook that is told (:class:`RequestObserver`).

Public as ``aiodelay.Outcome`` and ``aiodelay.RequestObserver``; ``aiodelay.add_observer`` is in
``installation``, which keeps the observers of each installation; ``outcome`` tells them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from aiohttp import web

from .errors import ConnectionLost

__all__ = ("Outcome", "OutcomeKind", "RequestObserver", "Unfrozen", "make_outcome", "note_budget")

#: ``completed``: the handler finished and the client did not leave while aiodelay watched.
#: ``cancelled``: the client left and the handler was cancelled.
#: ``ran_on``: the client left and the (shielded) handler ran to its end anyway.
#: ``truncated``: the handler had returned its response, and the client left while it was
#: being written.
#: ``failed``: the handler raised (not because of a disconnect), or was cancelled by something
#: other than a disconnect (server shutdown, an outer timeout).
#: ``timed_out``: its deadline passed first, and the handler was cancelled.
OutcomeKind = Literal["completed", "cancelled", "ran_on", "truncated", "failed", "timed_out"]


@dataclass(frozen=True)
class Outcome:
    """How one request ended, as :func:`aiodelay.add_observer`'s observers are told.

    ``kind`` is one of ``"completed"``, ``"cancelled"``, ``"ran_on"``, ``"truncated"``,
    ``"failed"``, ``"timed_out"`` (see :data:`OutcomeKind`). ``lost`` is the
    :class:`aiodelay.ConnectionLost` saying how the client left (its ``reason``: ``"FIN"``,
    ``"RST"``, ``"shutdown"``, ``"closed"``), ``None`` if it did not leave first.
    ``client`` is the client's address as the app trusts it (through aiohttp-remotes'
    middlewares behind a proxy, else ``request.remote``). The times are
    ``time.monotonic()`` values: the request reached aiodelay, aiodelay saw the client leave
    (``None`` if it did not), the outcome was recorded (the handler ended, or aiohttp was done
    writing its response). ``budget_from`` is the header whose budget from upstream set the
    request's deadline (``"grpc-timeout"``...; ``setup(app, budget_headers=...)``), ``None``
    if its deadline, if any, was its route's own.
    """

    kind: OutcomeKind
    lost: ConnectionLost | None
    started_at: float
    lost_at: float | None
    ended_at: float
    client: str | None = None
    budget_from: str | None = None


_new = object.__new__


class Unfrozen:
    """An :class:`Outcome` being made: of the same layout (a plain instance with a
    ``__dict__``), without the frozen dataclass's ``__setattr__``; its fields set, its
    ``__class__`` becomes ``Outcome`` (:func:`make_outcome`, and ``outcome.record_completed``
    without the call)."""


def make_outcome(
    kind: OutcomeKind,
    lost: ConnectionLost | None,
    started_at: float,
    lost_at: float | None,
    ended_at: float,
    client: str | None,
) -> Outcome:
    """``Outcome(kind, lost, started_at, lost_at, ended_at, client)``, made for every observed
    request: the frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``, which took a third of what one no-op observer cost a request.
    Here the fields are set as on any plain instance, which the interpreter specialises, and
    the instance then becomes an ``Outcome`` (on CPython 3.11, about 1,450 instructions fewer
    per observed request than filling its ``__dict__``, measured with
    ``benchmarks/instructions.py``). ``Outcome`` must keep a ``__dict__``, no ``__slots__``:
    ``__class__`` can only be assigned between classes of the same layout."""
    outcome: Any = _new(Unfrozen)
    outcome.kind = kind
    outcome.lost = lost
    outcome.started_at = started_at
    outcome.lost_at = lost_at
    outcome.ended_at = ended_at
    outcome.client = client
    outcome.__class__ = Outcome
    return outcome  # type: ignore[no-any-return]


def note_budget(outcome: Outcome, header: str | None) -> None:
    """Say in ``outcome`` that a budget from upstream, in ``header``, set the request's
    deadline (made by :func:`make_outcome`; the field's default, None, says it did not)."""
    if header is not None:
        outcome.__dict__["budget_from"] = header


class RequestObserver(Protocol):
    """What :func:`aiodelay.add_observer` calls, synchronously, from the request's task (or,
    for ``request_lost`` and a response cut short, from the transport's callback).

    An observer must be quick and should not raise: an exception is logged on the ``aiodelay``
    logger with its traceback and the request goes on. The ``request`` is the one aiohttp
    made (not a clone a middleware inside aiodelay's handed on).
    """

    def request_started(self, request: web.BaseRequest) -> None:
        """The request reached aiodelay's middleware; its handler runs next."""

    def request_lost(self, request: web.BaseRequest, lost: ConnectionLost) -> None:
        """The client left while the handler runs (before it is cancelled, if it will be)."""

    def request_ended(self, request: web.BaseRequest, outcome: Outcome) -> None:
        """The request ended; called once per request, also for one whose response was cut
        short after its handler returned (``outcome.kind == "truncated"``)."""
