"""An internal hook on each request's start and end (used by aiodelay's pytest plugin).

Not part of the public API: it may change with any release.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from aiohttp import web

from ._errors import ConnectionLost

__all__ = ("Outcome", "OutcomeKind", "RequestObserver", "add_observer")

#: ``completed``: the handler finished and the client did not leave while aiodelay watched.
#: ``cancelled``: the client left and the handler was cancelled.
#: ``ran_on``: the client left and the (shielded) handler ran to its end anyway.
#: ``failed``: the handler raised (not because of a disconnect), or was cancelled by something
#: other than a disconnect (server shutdown, an outer timeout).
OutcomeKind = Literal["completed", "cancelled", "ran_on", "failed"]


@dataclass(frozen=True)
class Outcome:
    """How a request ended; the times are ``time.monotonic()`` values."""

    kind: OutcomeKind
    lost: ConnectionLost | None
    started_at: float
    lost_at: float | None
    ended_at: float


class RequestObserver(Protocol):
    """Called synchronously from the request's task; must not raise."""

    def request_started(self, request: web.BaseRequest) -> None: ...

    def request_lost(self, request: web.BaseRequest, lost: ConnectionLost) -> None:
        """The client left while the handler runs (before it is cancelled, if it will be)."""

    def request_ended(self, request: web.BaseRequest, outcome: Outcome) -> None: ...


def add_observer(app: web.Application, observer: RequestObserver) -> Callable[[], None]:
    """Observe the requests of ``app`` (which has aiodelay installed); returns the remover."""
    from ._middleware import installed_on

    observers = installed_on(app).observers
    observers.append(observer)
    return lambda: observers.remove(observer)
