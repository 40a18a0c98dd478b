"""What :meth:`LiveServer.drop` reports: how the client left and what became of the handler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import aiodelay

#: How the client drops the connection:
#: ``"FIN"`` closes the socket (what a browser closing a tab does);
#: ``"RST"`` resets it (``SO_LINGER`` 0, then close: a crashed or impatient client);
#: ``"half-close"`` only shuts down the sending side (``shutdown(SHUT_WR)``), the client could
#: still read; aiohttp answers a half-close by closing, so aiodelay reports it as ``"FIN"``.
DropHow = Literal["FIN", "RST", "half-close"]

#: What became of the handler: aiodelay's own verdict (``completed``, ``cancelled``,
#: ``ran_on``, ``truncated``, ``failed``, see ``DropOutcome``), or ``running`` if it had not
#: ended yet.
DropKind = Literal[
    "completed", "cancelled", "ran_on", "truncated", "failed", "timed_out", "running"
]


class _EndWaiter(Protocol):
    """The connection an outcome came from, which can wait for its handler's end."""

    async def wait_ended(self, timeout: float) -> DropOutcome: ...


@dataclass(frozen=True, repr=False)
class DropOutcome:
    """What happened to one request that :meth:`LiveServer.drop` dropped.

    ``kind`` is one of:

    - ``"cancelled"``: aiodelay saw the client leave and cancelled the handler;
    - ``"ran_on"``: aiodelay saw the client leave and the handler ran to its end anyway
      (``@aiodelay.shielded``, the ``"shield"`` policy, or a handler that swallowed the
      cancellation);
    - ``"completed"``: the handler finished before aiodelay saw the client leave (it was
      faster than the drop, or the drop could not be seen);
    - ``"truncated"``: the handler had returned its response, and the client left while it
      was being written (e.g. ``after_response_bytes=N`` on a large body);
    - ``"timed_out"``: the route's deadline (``@aiodelay.deadline``) passed before the drop:
      the handler was cancelled and answered (``status`` 504 unless set otherwise, the text
      in ``received``); drop with ``after_seconds`` longer than the deadline to test one;
    - ``"failed"``: the handler raised, or was cancelled by something else than the drop;
    - ``"running"``: the handler had not ended when ``drop()`` returned (only with
      ``wait="seen"``); :meth:`wait_ended` returns a new outcome once it has ended.

    An outcome is a snapshot, frozen when it was made: it never changes afterwards.

    ``lost`` is aiodelay's :class:`~aiodelay.ConnectionLost` (``reason`` ``"FIN"``, ``"RST"``,
    ...) once it saw the client leave, else ``None``. ``status`` and ``received`` are the
    response status and the response body bytes (de-chunked) the client had received before
    it dropped the connection. ``ended_after`` is the time from the drop to the handler's end,
    ``None`` if it is still running or ended before the drop; for a cancelled handler that is
    the time from the drop to the cancellation (also as ``cancelled_after``).
    ``record`` is the core's raw record (``None`` while running): its times are
    ``time.monotonic()`` values, like ``dropped_at``.
    """

    method: str
    path: str
    how: DropHow
    moment: str
    kind: DropKind
    lost: aiodelay.ConnectionLost | None
    status: int | None
    received: bytes
    dropped_at: float
    record: aiodelay.Outcome | None
    _probe: _EndWaiter = field(compare=False)

    @property
    def cancelled(self) -> bool:
        return self.kind == "cancelled"

    @property
    def ran_on(self) -> bool:
        return self.kind == "ran_on"

    @property
    def completed(self) -> bool:
        return self.kind == "completed"

    @property
    def truncated(self) -> bool:
        return self.kind == "truncated"

    @property
    def timed_out(self) -> bool:
        return self.kind == "timed_out"

    @property
    def running(self) -> bool:
        return self.kind == "running"

    @property
    def reason(self) -> str | None:
        """``lost.reason`` (``"FIN"``, ``"RST"``, ...), or ``None`` if it was not seen."""
        return None if self.lost is None else self.lost.reason

    @property
    def ended_after(self) -> float | None:
        if self.record is None or self.record.ended_at < self.dropped_at:
            return None
        return self.record.ended_at - self.dropped_at

    @property
    def cancelled_after(self) -> float | None:
        return self.ended_after if self.cancelled else None

    async def wait_ended(self, *, timeout: float = 5.0) -> DropOutcome:
        """Wait for the handler to end and return a NEW outcome that says how it ended.

        This outcome is not updated: it stays ``"running"``, so keep the returned one
        (``outcome = await outcome.wait_ended()``). On an outcome whose handler had already
        ended, returns an equal copy at once. Fails the test after ``timeout`` seconds.
        """
        __tracebackhide__ = True
        return await self._probe.wait_ended(timeout)

    def __repr__(self) -> str:
        parts = [f"{self.method} {self.path} dropped by {self.how} {self.moment}: {self.kind}"]
        if self.lost is not None:
            parts.append(f"aiodelay saw {self.lost.reason}")
        elif self.record is not None and self.record.ended_at < self.dropped_at:
            parts.append("the handler had ended before the drop")
        elif self.kind != "failed":
            parts.append("aiodelay did not see the client leave")
        parts.append(f"status {self.status}" if self.status else "no response head")
        parts.append(f"{len(self.received)} body bytes received")
        if self.ended_after is not None:
            parts.append(f"ended {self.ended_after * 1000:.1f} ms after the drop")
        return f"<DropOutcome {', '.join(parts)}>"

    __str__ = __repr__
