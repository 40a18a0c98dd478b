"""Three services in a chain, A -> B -> C, each calling the next with ``aiohttp.ClientSession``.

C does the slow work (a sleep standing in for a query or a model call); B and A wait on the
service after them. Each has aiodelay installed, and nothing else is needed for a client that
leaves A to stop the work everywhere: aiodelay cancels A's handler, the cancellation closes
A's unfinished request to B (an aiohttp client connection with a response still to come is
closed, not pooled), which B's aiodelay sees as its client leaving; and so on to C.

Not promised: a service that pools its downstream connections differently (HTTP/2, a proxy
that buffers the response) may keep the downstream request open after its client left; then
the next service does not see anyone leave.

Deadlines travel too, when the services opt in (``--budgets``): each reads the time its caller
has left from ``grpc-timeout`` or ``x-envoy-expected-rq-timeout-ms``
(``aiodelay.setup(app, budget_headers=...)``), keeps the smaller of that and its own
``--deadline``, and sends what is left on to the next service (its ``ClientSession`` has
``trace_configs=[aiodelay.budget_trace()]``). A service answers with the status of the one after
it, so the 504 of the last one whose budget ran out comes back up the chain.

Run the chain (three shells, from the repository root)::

    python examples/chain/app.py C 8083
    python examples/chain/app.py B 8082 http://127.0.0.1:8083
    python examples/chain/app.py A 8081 http://127.0.0.1:8082
    curl http://127.0.0.1:8081/work     # then Ctrl-C: each service logs its cancellation

With budgets: A has a second, B five, C ten; all three stop after A's second, with a 504::

    python examples/chain/app.py C 8083 --deadline 10 --budgets
    python examples/chain/app.py B 8082 http://127.0.0.1:8083 --deadline 5 --budgets
    python examples/chain/app.py A 8081 http://127.0.0.1:8082 --deadline 1 --budgets
    curl -i http://127.0.0.1:8081/work
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from collections.abc import AsyncIterator, Iterable, Sequence

import aiohttp
from aiohttp import web

import aiodelay

__all__ = ("BUDGET_HEADERS", "create_app", "main")

#: The headers ``--budgets`` reads a budget from and sends it on in.
BUDGET_HEADERS = ("grpc-timeout", "x-envoy-expected-rq-timeout-ms")

NAME = web.AppKey("name", str)
DOWNSTREAM = web.AppKey("downstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
WORK_SECONDS = web.AppKey("work_seconds", float)
SEND_BUDGETS = web.AppKey("send_budgets", bool)

log = logging.getLogger("chain")


async def work(request: web.Request) -> web.Response:
    """Call the next service and pass its answer on; the last one does the slow work."""
    app = request.app
    name = app[NAME]
    left = aiodelay.time_left(request)
    if left is None:
        log.info("%s: working, no deadline", name)
    else:
        log.info("%s: working, %.3fs left", name, left)  # (its own deadline, or the budget)
    try:
        if DOWNSTREAM in app:
            async with app[SESSION].get(app[DOWNSTREAM] + "/work") as response:
                answer = await response.text()
            # The next service's status is ours: its 504 (its budget ran out) comes back up.
            return web.Response(status=response.status, text=f"{name} <- {answer}")
        await asyncio.sleep(app[WORK_SECONDS])
        return web.Response(text=f"{name} done")
    except asyncio.CancelledError:
        if aiodelay.time_left(request) == 0.0:
            log.info("%s: out of time, work cancelled", name)
        else:
            log.info("%s: the client left, work cancelled", name)
        raise


async def _session(app: web.Application) -> AsyncIterator[None]:
    # budget_trace() puts the time the request has left in the headers of each call.
    traces = [aiodelay.budget_trace()] if app[SEND_BUDGETS] else []
    async with aiohttp.ClientSession(trace_configs=traces) as session:
        app[SESSION] = session
        yield


async def create_app(
    name: str,
    downstream: str | None = None,
    *,
    work_seconds: float = 30.0,
    deadline: float | None = None,
    budget_headers: Iterable[str] = (),
) -> web.Application:
    """Service ``name`` of the chain: ``GET /work`` calls ``downstream`` (a base URL such as
    ``http://127.0.0.1:8083``) or, without one, works for ``work_seconds`` seconds.

    ``deadline``: the service's own deadline in seconds (504 when it passes), none by default.
    ``budget_headers`` (none by default): the headers a budget from upstream is read from
    (:data:`BUDGET_HEADERS` for both that aiodelay knows); with any, the calls to
    ``downstream`` carry the time the request has left, in the same headers."""
    if not work_seconds > 0:
        raise ValueError(f"work_seconds must be positive, got {work_seconds!r}")
    budget_headers = tuple(budget_headers)
    app = web.Application()
    aiodelay.setup(app, deadline=deadline, budget_headers=budget_headers)
    app[NAME] = name
    app[WORK_SECONDS] = work_seconds
    if downstream is not None:
        app[DOWNSTREAM] = downstream.rstrip("/")
        app[SEND_BUDGETS] = bool(budget_headers)
        app.cleanup_ctx.append(_session)
    app.router.add_get("/work", work)
    return app


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="examples/chain/app.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("name", metavar="NAME", help="the service's name in the log (A, B, C)")
    parser.add_argument("port", metavar="PORT", type=_port, help="port of 127.0.0.1")
    parser.add_argument(
        "downstream",
        metavar="DOWNSTREAM_URL",
        nargs="?",
        help="the next service (http://127.0.0.1:8083); without one, this service does the work",
    )
    parser.add_argument(
        "--deadline",
        type=_seconds,
        metavar="SECONDS",
        help="this service's own deadline in seconds (default: none)",
    )
    parser.add_argument(
        "--budgets",
        action="store_true",
        help=f"read a budget from upstream ({', '.join(BUDGET_HEADERS)}) and send it on",
    )
    parser.add_argument(
        "--work",
        type=_seconds,
        metavar="SECONDS",
        default=30.0,
        help="seconds the last service works (default: 30)",
    )
    args = parser.parse_args(argv)
    if args.downstream is not None and not args.downstream.startswith(("http://", "https://")):
        parser.error(f"DOWNSTREAM_URL must start with http:// or https://, got {args.downstream!r}")
    logging.basicConfig(level=logging.INFO)
    app = create_app(
        args.name,
        args.downstream,
        work_seconds=args.work,
        deadline=args.deadline,
        budget_headers=BUDGET_HEADERS if args.budgets else (),
    )
    try:
        web.run_app(app, host="127.0.0.1", port=args.port)
    except OSError as exc:  # the port is taken, or not ours to listen on
        print(
            f"examples/chain: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _port(text: str) -> int:
    """A TCP port, 1 to 65535, for argparse (which makes a bad one a one-line error)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (1 to 65535): {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds, for argparse."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return seconds


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
