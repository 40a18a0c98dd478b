"""What happened lately: an app's last interrupted requests, and how many there were each second.

``python -m aiodelay``'s status page shows it. :func:`keep_history` makes a :class:`History`,
adds it to the app as an observer (``aiodelay.add_observer``) and stores it under
:data:`history_key`; :func:`history_of` gives it back to a script (``history_of(request.app)``).
The site of ``python -m aiodelay`` (``create_app``) keeps one, so every ``.rpy`` script it
serves can read it.

An *interrupted* request is one whose client left before it ended (its outcome's ``lost`` is
set): the requests ``aiodelay.stats()`` counts as ``disconnected``, whatever happened to their
handler next (cancelled, ran on, truncated, failed). A request whose client stayed costs one
method call that returns at once; nothing of a request is kept but a few strings and numbers.

Memory is bounded: the last ``rows`` interruptions (20 by default; each path cut to
:data:`PATH_LIMIT` characters) and one counter per second for the last ``seconds`` (300).

Not promised: the per-second bins are whole seconds of the monotonic clock (the one
``aiodelay.Outcome`` times are read on), not of the wall clock; an interruption is binned at
the second its client left, so one whose handler ran on for longer than ``seconds`` after that
is listed but not counted. Times of day are the server's local time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .._core.errors import ConnectionLost, Reason
from .._core.installation import add_observer
from .._core.observe import Outcome, OutcomeKind

__all__ = ("PATH_LIMIT", "History", "Interruption", "history_key", "history_of", "keep_history")

#: The longest path an :class:`Interruption` keeps; a longer one ends in ``"…"``.
PATH_LIMIT = 200


@dataclass(frozen=True, slots=True)
class Interruption:
    """One interrupted request, as the status page lists it.

    ``at``: when its client left (Unix time, seconds); ``after``: how long after the request
    reached aiodelay that was (seconds); ``outcome``: what happened to its handler (an
    ``aiodelay.OutcomeKind``); ``client``: the client address the app trusts (``None`` if
    aiohttp knew none). ``method`` and ``path`` are the request's, as the client sent them:
    escape them before putting them in HTML.
    """

    at: float
    method: str
    path: str
    reason: Reason
    after: float
    outcome: OutcomeKind
    client: str | None

    @property
    def time_of_day(self) -> str:
        """``at`` as the server's local time of day, to the millisecond: ``"14:03:07.125"``."""
        seconds, millis = divmod(round(self.at * 1000), 1000)
        return f"{time.strftime('%H:%M:%S', time.localtime(seconds))}.{millis:03d}"

    def as_json(self) -> dict[str, Any]:
        """The fields, and ``time`` (:attr:`time_of_day`), for ``json.dumps``."""
        return {
            "time": self.time_of_day,
            "at": self.at,
            "method": self.method,
            "path": self.path,
            "reason": self.reason,
            "after": self.after,
            "outcome": self.outcome,
            "client": self.client,
        }


class History:
    """An ``aiodelay.RequestObserver`` that keeps the last ``rows`` interrupted requests and
    the number of interruptions in each of the last ``seconds`` seconds.

    ``clock`` and ``wall_clock`` are ``time.monotonic`` and ``time.time`` (tests pass their
    own); ``rows`` and ``seconds`` must be positive integers (``TypeError``, ``ValueError``).
    """

    __slots__ = ("_clock", "_counts", "_rows", "_stamps", "_wall_clock", "seconds")

    def __init__(
        self,
        *,
        rows: int = 20,
        seconds: int = 300,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (("rows", rows), ("seconds", seconds)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        self.seconds = seconds
        self._rows: deque[Interruption] = deque(maxlen=rows)
        # A ring of per-second counters: _counts[s % seconds] counts second s (of the
        # monotonic clock) if _stamps[s % seconds] == s; else it is stale and means 0.
        self._counts = [0] * seconds
        self._stamps = [-1] * seconds
        self._clock = clock
        self._wall_clock = wall_clock

    def request_started(self, request: web.BaseRequest) -> None:
        pass

    def request_lost(self, request: web.BaseRequest, lost: ConnectionLost) -> None:
        pass  # recorded at its end, when the outcome is known

    def request_ended(self, request: web.BaseRequest, outcome: Outcome) -> None:
        lost = outcome.lost
        if lost is None:
            return  # its client stayed: nothing to keep
        left_at = outcome.ended_at if outcome.lost_at is None else outcome.lost_at
        now = self._clock()
        path = request.path
        if len(path) > PATH_LIMIT:
            path = path[: PATH_LIMIT - 1] + "…"
        self._rows.append(
            Interruption(
                at=self._wall_clock() - (now - left_at),
                method=request.method,
                path=path,
                reason=lost.reason,
                after=max(left_at - outcome.started_at, 0.0),
                outcome=outcome.kind,
                client=outcome.client,
            )
        )
        second = int(left_at)
        if second <= int(now) - self.seconds:
            return  # it left before the window began (a handler that ran on for long)
        slot = second % self.seconds
        if self._stamps[slot] != second:
            self._stamps[slot] = second
            self._counts[slot] = 0
        self._counts[slot] += 1

    def rows(self) -> list[Interruption]:
        """The last interrupted requests, the newest first."""
        return list(reversed(self._rows))

    def per_second(self) -> list[int]:
        """How many requests were interrupted in each of the last ``seconds`` seconds: the
        oldest first, the current second (still counting) last."""
        now = int(self._clock())
        counts, stamps, size = self._counts, self._stamps, self.seconds
        return [
            counts[second % size] if stamps[second % size] == second else 0
            for second in range(now - size + 1, now + 1)
        ]


history_key = web.AppKey("aiodelay.history", History)


def keep_history(app: web.Application, *, rows: int = 20, seconds: int = 300) -> History:
    """Keep a :class:`History` of ``app``'s requests (and its sub-apps'), which
    :func:`history_of` gives back.

    ``app`` must have aiodelay installed and not be started yet (``RuntimeError``), and keep
    no history yet (``RuntimeError``). Observing an app makes aiodelay write each response to
    its end itself (see ``aiodelay.add_observer``).
    """
    history = History(rows=rows, seconds=seconds)
    if history_key in app:
        raise RuntimeError("this app keeps a history already")
    if app.frozen:
        raise RuntimeError("keep_history() must be called before the app starts")
    add_observer(app, history)  # RuntimeError if aiodelay is not installed
    app[history_key] = history
    return history


def history_of(app: web.Application) -> History:
    """The :class:`History` that :func:`keep_history` keeps of ``app``; ``RuntimeError`` if
    there is none."""
    history = app.get(history_key)
    if history is None:
        raise RuntimeError(
            "this app keeps no history of interrupted requests: "
            "call aiodelay.server.keep_history(app) before it starts"
        )
    return history
