"""Counters of what aiodelay saw happen to requests."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("Counters", "Stats")


@dataclass(frozen=True)
class Stats:
    """A snapshot of one app's counters (see :func:`aiodelay.stats`).

    ``in_flight``: requests whose handler (or shielded remainder) is running now.
    ``completed``: requests that ended without their client leaving first (a handler that
    raised counts here too: its client did not leave).
    ``disconnected``: requests whose client left before their response was complete; each of
    them is counted once more, in exactly one of the four fields that follow, so that
    ``disconnected == cancelled + shielded_ran_on + truncated + failed`` once they ended:
    ``cancelled``: the handler was cancelled (by aiodelay, or by aiohttp's own
    ``handler_cancellation`` for a WebSocket).
    ``shielded_ran_on``: the handler ran to its end anyway: shielded, a WebSocket whose receive
    loop aiohttp ended, or one that caught the cancellation.
    ``truncated``: the handler had returned its response, and the client left while aiohttp
    was still writing it (a large body, a file download).
    ``failed``: the handler raised an error of its own after its client left, or was stopped
    by something else (server shutdown, an outer timeout).
    ``timed_out``: requests whose deadline passed first (``@aiodelay.deadline``): the handler
    was cancelled, its client still there; neither ``completed`` nor ``disconnected``.
    ``budgets_ignored``: budget headers (``setup(app, budget_headers=...)``) that were
    malformed, negative or absurd, and ignored (not requests: a request may bring several).

    A request counts as ``completed`` when its handler returns; if its client then leaves
    before aiohttp has written the whole response, it moves from ``completed`` to
    ``disconnected`` and ``truncated``.
    """

    in_flight: int
    completed: int
    disconnected: int
    cancelled: int
    shielded_ran_on: int
    truncated: int = 0
    failed: int = 0
    timed_out: int = 0
    budgets_ignored: int = 0


class Counters:
    """The mutable counters behind :class:`Stats`; one per installed middleware."""

    __slots__ = (
        "budgets_ignored",
        "cancelled",
        "completed",
        "disconnected",
        "failed",
        "shielded_ran_on",
        "started",
        "timed_out",
        "truncated",
    )

    def __init__(self) -> None:
        self.started = 0
        self.completed = 0
        self.disconnected = 0
        self.cancelled = 0
        self.shielded_ran_on = 0
        self.truncated = 0
        self.failed = 0
        self.timed_out = 0
        self.budgets_ignored = 0

    def count(self, kind: str, disconnected: bool) -> None:
        """One request ended as ``kind`` (an ``Outcome`` kind)."""
        if kind == "timed_out":
            self.timed_out += 1
            return
        if not disconnected:
            self.completed += 1
            return
        self.disconnected += 1
        if kind == "cancelled":
            self.cancelled += 1
        elif kind == "ran_on":
            self.shielded_ran_on += 1
        elif kind == "truncated":
            self.truncated += 1
        else:
            self.failed += 1

    def snapshot(self) -> Stats:
        return Stats(
            in_flight=self.started - self.completed - self.disconnected - self.timed_out,
            completed=self.completed,
            disconnected=self.disconnected,
            cancelled=self.cancelled,
            shielded_ran_on=self.shielded_ran_on,
            truncated=self.truncated,
            failed=self.failed,
            timed_out=self.timed_out,
            budgets_ignored=self.budgets_ignored,
        )
