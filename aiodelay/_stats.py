"""Counters of what aiodelay saw happen to requests."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("Counters", "Stats")


@dataclass(frozen=True)
class Stats:
    """A snapshot of one app's counters (see :func:`aiodelay.stats`).

    ``in_flight``: requests whose handler (or shielded remainder) is running now.
    ``completed``: requests that ended without their client leaving first.
    ``disconnected``: requests whose client left before their response was complete.
    ``cancelled``: of those, the ones whose handler was cancelled.
    ``shielded_ran_on``: of those, the ones whose handler ran to its end anyway: shielded, a
    WebSocket (aiohttp ends its receive loop itself), or one that caught the cancellation.
    """

    in_flight: int
    completed: int
    disconnected: int
    cancelled: int
    shielded_ran_on: int


class Counters:
    """The mutable counters behind :class:`Stats`; one per installed middleware."""

    __slots__ = ("cancelled", "completed", "disconnected", "shielded_ran_on", "started")

    def __init__(self) -> None:
        self.started = 0
        self.completed = 0
        self.disconnected = 0
        self.cancelled = 0
        self.shielded_ran_on = 0

    def snapshot(self) -> Stats:
        return Stats(
            in_flight=self.started - self.completed - self.disconnected,
            completed=self.completed,
            disconnected=self.disconnected,
            cancelled=self.cancelled,
            shielded_ran_on=self.shielded_ran_on,
        )
