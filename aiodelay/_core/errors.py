"""Why a request ended before its response was complete."""

from __future__ import annotations

from typing import Any, Literal

__all__ = ("ConnectionLost", "DeadlineExceeded", "Reason", "seconds_text")

#: How the request lost its client:
#:
#: ``"FIN"``      the peer closed its side of the connection (a normal close, or a half-close,
#:                which aiohttp treats as a close);
#: ``"RST"``      the peer reset the connection, or the transport failed;
#: ``"shutdown"`` the server stopped the request while shutting down;
#: ``"closed"``   the server side closed the connection (aiohttp closed it), or it was gone
#:                before the request reached aiodelay and how the peer left is not known.
Reason = Literal["FIN", "RST", "shutdown", "closed"]

_MESSAGES: dict[str, str] = {
    "FIN": "the client closed the connection (FIN)",
    "RST": "the client reset the connection (RST)",
    "shutdown": "the server shut down before the response was complete",
    "closed": "the connection was closed before the response was complete",
}


#: ``args`` of a ConnectionLost with its reason's message.
_ARGS: dict[str, tuple[str]] = {reason: (message,) for reason, message in _MESSAGES.items()}


def seconds_text(seconds: float) -> str:
    """``seconds`` for a message: ``"0.300s"`` (milliseconds), or with three significant
    digits below a millisecond (``"0.00025s"``, ``"1e-300s"``), never a misleading ``"0.000s"``."""
    return f"{seconds:.3f}s" if seconds >= 0.001 else f"{seconds:.3g}s"


class ConnectionLost(ConnectionError):
    """The request's client went away (or the server stopped the request) before the
    response was completely written.

    ``reason`` says how: ``"FIN"`` (the client closed), ``"RST"`` (it reset, or the transport
    failed), ``"shutdown"`` (the server stopped the request) or ``"closed"`` (the server side
    closed the connection first). ``__cause__`` holds the transport's own error when there was
    one.
    """

    # The reason and the transport's error in slots: a drop allocates no instance __dict__
    # (one object less for the GC to visit; the __dict__ is still made if something sets
    # another attribute).
    __slots__ = ("_error", "reason")

    reason: Reason
    #: The transport's own error, as it reported it, or None: aiodelay hands it on to
    #: aiohttp two turns later (``__cause__`` holds it too, but code that raises the
    #: ConnectionLost ``from None`` clears that). Not public.
    _error: BaseException | None

    def __init__(self, reason: Reason, message: str | None = None) -> None:
        self._error = None
        if message:
            super().__init__(message)
        else:
            # Its reason's message, in a tuple shared by every such instance: a drop makes no
            # tuple of its own (one object less per drop for the garbage collector to count).
            self.args = _ARGS[reason]
        self.reason = reason

    def __reduce__(self) -> tuple[type[ConnectionLost], tuple[Reason, str], dict[str, Any] | None]:
        # BaseException's own gives args (the message alone, which __init__ cannot take) and
        # __dict__, not slots; copy and pickle use it.
        return type(self), (self.reason, str(self)), (self.__dict__ or None)

    def __repr__(self) -> str:
        return f"ConnectionLost({self.reason!r})"


class DeadlineExceeded(TimeoutError):
    """The request ran longer than its deadline (``@aiodelay.deadline`` or
    ``aiodelay.setup(app, deadline=...)``, or the budget it came with from upstream) and was
    stopped.

    ``seconds`` is the deadline; ``status`` the status the client was answered with if no
    status line had gone out yet; ``upstream`` the header the budget came in
    (``"grpc-timeout"``...) when the deadline was the upstream's, else None.
    """

    seconds: float
    status: int
    upstream: str | None

    def __init__(self, seconds: float, status: int, upstream: str | None = None) -> None:
        from_upstream = "" if upstream is None else f" (the budget in {upstream})"
        super().__init__(
            f"the request exceeded its {seconds_text(seconds)} deadline{from_upstream}"
        )
        self.seconds = seconds
        self.status = status
        self.upstream = upstream

    def __reduce__(
        self,
    ) -> tuple[type[DeadlineExceeded], tuple[float, int, str | None], dict[str, Any]]:
        # (BaseException's own gives args, the message alone, which __init__ cannot take.)
        return type(self), (self.seconds, self.status, self.upstream), self.__dict__

    def __repr__(self) -> str:
        return f"DeadlineExceeded({self.seconds!r})"
