"""A slow report that stops on the PostgreSQL server when its client leaves, and a payment
write that commits although its client left.

- ``GET /report``: a report query through an asyncpg pool, made slow on purpose (its
  ``pg_sleep`` stands for the cost of a real report over a big table). When the client leaves,
  aiodelay cancels the handler at its ``await``, and asyncpg, on that cancellation, sends
  PostgreSQL a cancel request: the query stops on the server, and the pool gets its connection
  back. Without aiodelay the handler would wait the query out, and the server would run it to
  its end, for nobody.
- The report's time budget: the app's routes have a deadline (60 s by default), which a budget
  from upstream (``grpc-timeout``, ``x-envoy-expected-rq-timeout-ms``) shortens. The report
  runs its query in a transaction whose ``statement_timeout`` is the time the request has left
  (``aiodelay.time_left``): PostgreSQL itself stops the query when the budget ends, with no
  help from the app's process (see :func:`within_budget` for why this rather than asyncpg's
  ``timeout=``), and the client gets the deadline's 504.
- ``POST /payments`` (form fields ``reference`` and ``amount``): ``@aiodelay.shielded``, so a
  client that leaves does not cancel it: the transaction (an insert, then a slow step that
  stands for a payment provider's answer) runs on and commits. A client that retries with the
  same ``reference`` gets the payment that was made, not a second one.

Run it (a DSN of a PostgreSQL server you may create a ``payments`` table in)::

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python examples/postgres/app.py

(``--port PORT`` serves on another port than 8080.)

What is promised: the query stops when the cancellation reaches the handler while it awaits
the query (asyncpg's cancel request goes over a new connection, so the server must accept one
more). What is not: a query run through ``asyncio.shield()`` or in another task is not
cancelled with the handler (its ``statement_timeout`` still stops it when the budget ends).
"""

from __future__ import annotations

import argparse
import contextlib
import decimal
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
from aiohttp import web

import aiodelay

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = ("create_app", "main", "within_budget")

#: A connection of its own, or one of a pool's.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

DSN_ENV = "DATABASE_URL"

#: The headers a budget from upstream is read from: gRPC's and Envoy's.
BUDGET_HEADERS = ("grpc-timeout", "x-envoy-expected-rq-timeout-ms")

#: A query that PostgreSQL cancelled when the request had this little time left (seconds), or
#: less, was stopped by the request's budget (``within_budget``), not by someone else.
DEADLINE_DUE = 0.05

SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    reference text PRIMARY KEY,
    amount numeric(12, 2) NOT NULL CHECK (amount > 0),
    created_at timestamptz NOT NULL DEFAULT now()
)
"""

# pg_sleep() in the target list runs once, whatever the table holds (in FROM, a join with an
# empty table could skip it).
REPORT = """
SELECT count(*) AS payments, coalesce(sum(amount), 0) AS total, pg_sleep($1) AS _
FROM payments
"""

# ON CONFLICT DO NOTHING: a retry with the same reference does not pay twice.
INSERT = """
INSERT INTO payments (reference, amount) VALUES ($1, $2)
ON CONFLICT (reference) DO NOTHING
"""


@dataclass(frozen=True)
class Settings:
    report_seconds: float
    settle_seconds: float


POOL: web.AppKey[asyncpg.Pool[asyncpg.Record]] = web.AppKey("pool")
SETTINGS = web.AppKey("settings", Settings)


def pool(dsn: str, application_name: str) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` that opens the pool (and the table) at startup, closes it at cleanup."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with asyncpg.create_pool(
            dsn, min_size=1, max_size=10, server_settings={"application_name": application_name}
        ) as opened:
            await opened.execute(SCHEMA)
            app[POOL] = opened
            yield

    return ctx


@contextlib.asynccontextmanager
async def within_budget(request: web.BaseRequest, conn: Conn) -> AsyncIterator[None]:
    """A transaction on ``conn`` whose statements PostgreSQL stops when ``request``'s deadline
    passes: ``SET LOCAL statement_timeout`` to the time the request has left
    (``aiodelay.time_left``; no timeout for a request without a deadline).

    Why the server's timer and not asyncpg's ``timeout=``: asyncpg's is a timer in the app's
    process that, when it fires, sends PostgreSQL a cancel request over a new connection,
    which is what the deadline's cancellation of the handler makes asyncpg do already. Both
    need the app's process to be there, its event loop to run, and a new connection to
    reach the server; ``statement_timeout`` needs nothing from the client once the statement
    is sent: a query stops at its budget even if the app was killed, stalled or cut off.

    The timeout (``set_config(..., true)``: ``SET LOCAL`` with a parameter) is set once, at
    the transaction's start, and counts for each statement in it (PostgreSQL 17's
    ``transaction_timeout`` would count the whole transaction): a transaction of several
    statements sets it again before each one. It is rounded up to whole milliseconds and the
    statement starts after the request's deadline was read, so PostgreSQL's timer goes off
    after aiodelay's deadline, whose cancellation usually reaches the handler first. Should
    PostgreSQL's error come first all the same (its server's clock a little fast), this waits
    for the deadline, which is due, so that the client gets the deadline's answer (504), not a
    500 for the ``QueryCanceledError``.
    """
    left = aiodelay.time_left(request)
    try:
        async with conn.transaction():
            if left is not None:
                # statement_timeout = 0 would mean "none": at least 1 ms.
                milliseconds = max(1, math.ceil(left * 1000))
                await conn.execute(
                    "SELECT set_config('statement_timeout', $1, true)", f"{milliseconds}ms"
                )
            yield
    except asyncpg.QueryCanceledError:
        now = aiodelay.time_left(request)
        if left is None or now is None or now > DEADLINE_DUE:
            raise  # not the budget's timeout: someone cancelled it (pg_cancel_backend)
        # Stopped here, within DEADLINE_DUE, by the deadline that is due.
        await aiodelay.notify_finish(request)
        raise


async def report(request: web.Request) -> web.Response:
    async with request.app[POOL].acquire() as conn, within_budget(request, conn):
        return await compute_report(request.app, conn)


async def compute_report(app: web.Application, conn: Conn) -> web.Response:
    """The report's query and response (``report`` runs it within the request's budget)."""
    # Cancelled here when the client leaves: asyncpg then cancels the query on the server.
    row = await conn.fetchrow(REPORT, app[SETTINGS].report_seconds)
    assert row is not None  # an aggregate without GROUP BY returns one row
    return web.json_response({"payments": row["payments"], "total": str(row["total"])})


@aiodelay.shielded  # money moved: finish and commit even if the client is gone
async def pay(request: web.Request) -> web.Response:
    form = await request.post()
    reference, amount = form.get("reference"), form.get("amount")
    if not isinstance(reference, str) or not reference:
        raise web.HTTPBadRequest(text="reference: required\n")
    try:
        value = decimal.Decimal(amount if isinstance(amount, str) else "")
    except decimal.InvalidOperation:
        raise web.HTTPBadRequest(text=f"amount: not a number: {amount!r}\n") from None
    if not value.is_finite() or value <= 0 or value != value.quantize(decimal.Decimal("0.01")):
        raise web.HTTPBadRequest(text=f"amount: not a positive amount in cents: {amount!r}\n")
    settings = request.app[SETTINGS]
    async with request.app[POOL].acquire() as conn, conn.transaction():
        await conn.execute(INSERT, reference, value)
        # Stands for the slow part of a payment (the provider's answer) inside the transaction.
        await conn.execute("SELECT pg_sleep($1)", settings.settle_seconds)
    return web.json_response({"reference": reference, "amount": str(value)}, status=201)


async def create_app(
    dsn: str | None = None,
    *,
    report_seconds: float = 30,
    settle_seconds: float = 2,
    deadline: float | None = 60,
    application_name: str = "aiodelay-example-postgres",
) -> web.Application:
    """The app, with aiodelay set up and an asyncpg pool opened at startup (closed at cleanup).

    ``dsn`` defaults to ``$DATABASE_URL``. ``report_seconds`` and ``settle_seconds`` are how
    long the report query and the payment's slow step take; ``deadline`` is the app's
    routes' (None for none; the shielded payment has none), which a budget from upstream in
    :data:`BUDGET_HEADERS` shortens; ``application_name`` is what PostgreSQL shows for the
    pool's connections in ``pg_stat_activity``.
    """
    dsn = dsn if dsn is not None else os.environ.get(DSN_ENV)
    if not dsn:
        raise ValueError(f"no PostgreSQL DSN: pass dsn= or set {DSN_ENV}")
    for name, seconds in (("report_seconds", report_seconds), ("settle_seconds", settle_seconds)):
        if not 0 <= seconds < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {seconds!r}")

    app = web.Application()
    aiodelay.setup(app, deadline=deadline, budget_headers=BUDGET_HEADERS)
    app[SETTINGS] = Settings(report_seconds, settle_seconds)
    app.cleanup_ctx.append(pool(dsn, application_name))
    app.add_routes([web.get("/report", report), web.post("/payments", pay)])
    return app


def main(argv: Sequence[str]) -> int:
    """Serve on http://127.0.0.1:8080/ (``--port``); a missing DSN or an unreachable server is
    one line."""
    parser = argparse.ArgumentParser(
        prog="examples/postgres/app.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--port", type=_port, default=8080, help="port of 127.0.0.1 (default: 8080)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)  # aiodelay's line for each client that left
    try:
        web.run_app(create_app(), host="127.0.0.1", port=args.port)
    except (ValueError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"examples/postgres: {exc}", file=sys.stderr)
        return 1
    return 0


def _port(text: str) -> int:
    """A TCP port, 1 to 65535, for argparse (which makes a bad one a one-line error)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (1 to 65535): {text!r}")
    return int(text)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
