"""How a request ended (:class:`Outcome`) and the hook that is told (:class:`RequestObserver`).

Not part of the public API: it may change with any release. ``add_observer`` is in
``_account``, which owns the observers of each installation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from aiohttp import web

from ._errors import ConnectionLost

__all__ = ("Outcome", "OutcomeKind", "RequestObserver")

#: ``completed``: the handler finished and the client did not leave while aiodelay watched.
#: ``cancelled``: the client left and the handler was cancelled.
#: ``ran_on``: the client left and the (shielded) handler ran to its end anyway.
#: ``truncated``: the handler had returned its response, and the client left while it was
#: being written.
#: ``failed``: the handler raised (not because of a disconnect), or was cancelled by something
#: other than a disconnect (server shutdown, an outer timeout).
OutcomeKind = Literal["completed", "cancelled", "ran_on", "truncated", "failed"]


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
