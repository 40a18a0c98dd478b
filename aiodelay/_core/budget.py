"""Deadlines that travel: a request's time budget read from upstream, and sent downstream.

gRPC sends the time a call has left in ``grpc-timeout`` (``<digits><unit>``, units ``H M S m u
n``); Envoy tells its upstreams its own in ``x-envoy-expected-rq-timeout-ms`` (milliseconds).
An app that opts in (``aiodelay.setup(app, budget_headers=(...))``) reads them: the request's
deadline becomes the smaller of its route's deadline and the budget (a budget only shortens),
and a request whose budget is already spent is answered at once with the deadline's status.
A value that is malformed, negative or absurd (more than :data:`MAX_BUDGET`) is ignored: it
is counted (``Stats.budgets_ignored``) and logged once per header name at DEBUG, never a 500.

:func:`budget_trace` sends the budget on: an ``aiohttp.TraceConfig`` whose
``on_request_start`` sets the headers of a ``ClientSession`` call made while a request with a
deadline is handled to the time it has left (less a margin). The call needs no timeout of its
own: when the budget runs out, the request's deadline cancels the handler, and with it the
await of the call.

What is trusted: only the time a header says, and only to shorten. An upstream cannot give a
request more time than its route has, nor make aiodelay run a shielded route or a WebSocket
under a deadline (the routes a default deadline leaves alone are left alone by a budget too).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import re
from collections.abc import Callable, Iterable
from time import monotonic
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .deadlines import DeadlineQueue

if TYPE_CHECKING:
    from .installation import Installation
    from .state import RequestState

__all__ = (
    "ENVOY",
    "GRPC",
    "HANDLED",
    "KNOWN",
    "MAX_BUDGET",
    "BudgetDeadline",
    "budget_of",
    "budget_trace",
    "check_budget_headers",
    "header_value",
    "parse_grpc_timeout",
    "parse_milliseconds",
)

logger = logging.getLogger("aiodelay")

GRPC = "grpc-timeout"
ENVOY = "x-envoy-expected-rq-timeout-ms"

#: A budget longer than this is taken for a mistake, and ignored (a day).
MAX_BUDGET = 86400.0

# ASCII digits only: re's \d (and int()) take any Unicode digit (an Arabic-Indic 5 too).
_GRPC = re.compile(r"([0-9]{1,8})([HMSmun])")
#: Seconds per unit (H, M, S), or units per second (m, u, n): divided, as the milliseconds
#: header is, so that the same time in both headers is the same float (239 * 1e-3 is not 0.239).
_GRPC_PER_SECOND = {"m": 1_000, "u": 1_000_000, "n": 1_000_000_000}
_GRPC_SECONDS = {"H": 3600, "M": 60, "S": 1}
_MILLISECONDS = re.compile(r"[0-9]{1,12}")
#: What HTTP takes for whitespace around a header's value (str.strip() would take any Unicode
#: space too).
_HTTP_WHITESPACE = " \t"


def parse_grpc_timeout(value: str) -> float | None:
    """Seconds of a ``grpc-timeout`` value (``250m``, ``1S``, ``100u``...), or None if it is
    not one (gRPC allows at most eight digits)."""
    match = _GRPC.fullmatch(value.strip(_HTTP_WHITESPACE))
    if match is None:
        return None
    count, unit = int(match[1]), match[2]
    if unit in _GRPC_SECONDS:
        return float(count * _GRPC_SECONDS[unit])
    return count / _GRPC_PER_SECOND[unit]


def parse_milliseconds(value: str) -> float | None:
    """Seconds of a whole number of milliseconds (``x-envoy-expected-rq-timeout-ms``), or
    None if it is not one."""
    value = value.strip(_HTTP_WHITESPACE)
    if _MILLISECONDS.fullmatch(value) is None:
        return None
    return int(value) / 1000


#: The budget headers aiodelay reads and sends, each with its parser.
KNOWN: dict[str, Callable[[str], float | None]] = {
    GRPC: parse_grpc_timeout,
    ENVOY: parse_milliseconds,
}


def check_budget_headers(names: object) -> tuple[str, ...]:
    """``names`` (``budget_headers=``) as lower-case header names aiodelay knows; TypeError
    or ValueError otherwise."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(
            f"budget_headers takes a tuple of header names, e.g. ({GRPC!r},), got {names!r}"
        )
    checked: list[str] = []
    for name in names:
        if not isinstance(name, str) or name.lower() not in KNOWN:
            known = ", ".join(map(repr, KNOWN))
            raise ValueError(
                f"budget_headers: {name!r} is not a budget header aiodelay reads ({known})"
            )
        if name.lower() not in checked:
            checked.append(name.lower())
    return tuple(checked)


class BudgetDeadline(DeadlineQueue):
    """The deadline a budget from upstream sets for one request: a queue of one (budgets
    differ from request to request, so requests cannot share one), whose timer goes when the
    request ends (:meth:`close`). A shared queue keeps its timer for the requests still in it;
    this one's would wait, up to :data:`MAX_BUDGET`, for nobody."""

    __slots__ = ()

    def close(self) -> None:
        """The request ended: cancel the timer (asyncio and uvloop then let go of it)."""
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()


_said_ignored: set[str] = set()

#: The request with a deadline whose handler runs in this context, in an app that reads
#: budgets (set by the middleware): the tasks the handler starts (``asyncio.gather``,
#: ``wait_for`` before Python 3.12, ``create_task``) copy it, so that their calls find it too.
#: With the request: a state may serve a connection's next request, which this one is not.
HANDLED: contextvars.ContextVar[tuple[RequestState, web.BaseRequest] | None] = (
    contextvars.ContextVar("aiodelay_budget_request", default=None)
)


def budget_of(
    request: web.BaseRequest, names: tuple[str, ...], counted_in: Iterable[Installation]
) -> tuple[float, str] | None:
    """The budget ``request`` came with (seconds, and the header that said so: the smallest,
    if several do), or None. An ignored value is counted in each of ``counted_in`` (the
    installations on the request's way, as its other counts are)."""
    headers = request.headers
    found: tuple[float, str] | None = None
    for name in names:
        for value in headers.getall(name, ()):
            seconds = KNOWN[name](value)
            if seconds is None or seconds > MAX_BUDGET:
                for each in counted_in:
                    each.counters.budgets_ignored += 1
                if name not in _said_ignored:
                    _said_ignored.add(name)
                    logger.debug(
                        "ignored the budget %s: %r (malformed, negative or over %gs; said "
                        "once per header)",
                        name,
                        value[:64],
                        MAX_BUDGET,
                    )
                continue
            if found is None or seconds < found[0]:
                found = (seconds, name)
    return found


def header_value(name: str, seconds: float) -> str:
    """``seconds`` left (not under 0), as header ``name`` says it: whole milliseconds, for
    ``grpc-timeout`` with its unit (seconds past eight digits of milliseconds)."""
    milliseconds = int(max(0.0, seconds) * 1000)  # (int() of -inf would raise)
    if name == GRPC:
        if milliseconds <= 99_999_999:
            return f"{milliseconds}m"
        return f"{min(milliseconds // 1000, 99_999_999)}S"
    return str(milliseconds)


def budget_trace(*, margin: float = 0.01) -> aiohttp.TraceConfig:
    """An ``aiohttp.TraceConfig`` that sends a request's remaining budget downstream:
    ``aiohttp.ClientSession(trace_configs=[aiodelay.budget_trace()])``.

    A call made while a request with a deadline is handled (in the handler's task, or a
    coroutine it awaits) carries the time the request has left, less ``margin`` seconds (for
    the way there and back), in the headers of the app's ``budget_headers``, or in
    ``grpc-timeout`` if it has none. A value the call sets itself in one of those headers
    stands if it gives less time (else it is replaced). Calls made outside a request, or for a
    request without a deadline, are untouched.

    The call ends when the request's deadline passes: a call the handler awaits, as the
    deadline cancels the handler; a call in a task the handler started (in an app that reads
    budgets), as that task is cancelled then if the call has not been answered (its response
    head); a call in an ``aiodelay.shield()`` section runs on, as the section does.
    """
    if (
        isinstance(margin, bool)
        or not isinstance(margin, (int, float))
        or not 0 <= margin < math.inf  # (an infinite margin failed every call it traced)
    ):
        raise ValueError(f"budget_trace(margin=...) takes seconds >= 0, got {margin!r}")
    # Imported here: the request lookup lives with the middleware, which imports this module.
    from .shield import running_state

    async def on_request_start(
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        task = asyncio.current_task()
        state = running_state(task)
        if state is None:
            handled = HANDLED.get()
            if handled is None or handled[0].request is not handled[1]:
                return
            state = handled[0]
        at = state.deadline_at()
        if at is None:
            return
        left = at - monotonic() - margin
        if task is not None and task is not state.task:
            # A task the handler started: its call ends when the budget does, as a call the
            # handler awaits itself does (the deadline cancels the handler, and its await).
            context.aiodelay_budget = asyncio.get_running_loop().call_later(
                max(0.0, left + margin), task.cancel, _OUT_OF_BUDGET
            )
        plan = state.route_plan  # (set: the request waits for a deadline)
        names = (plan.budget_headers if plan is not None else ()) or (GRPC,)
        headers: Any = params.headers
        for name in names:
            own = headers.get(name)
            if own is not None and (seconds := KNOWN[name](own)) is not None and seconds <= left:
                continue  # the call's own budget is shorter: it stands (a budget only shortens)
            headers[name] = header_value(name, left)

    async def on_request_done(
        session: aiohttp.ClientSession, context: SimpleNamespace, params: object
    ) -> None:
        timer: asyncio.TimerHandle | None = getattr(context, "aiodelay_budget", None)
        if timer is not None:
            timer.cancel()

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    trace.on_request_end.append(on_request_done)
    trace.on_request_exception.append(on_request_done)
    trace.freeze()
    return trace


_OUT_OF_BUDGET = "aiodelay: the request's budget ran out during this call"
