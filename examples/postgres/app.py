"""A slow report that stops on the PostgreSQL server when its client leaves, and a payment
write that commits although its client left.

- ``GET /report``: a report query through an asyncpg pool, made slow on purpose (its
  ``pg_sleep`` stands for the cost of a real report over a big table). When the client leaves,
  aiodelay cancels the handler at its ``await``, and asyncpg, on that cancellation, sends
  PostgreSQL a cancel request: the query stops on the server, and the pool gets its connection
  back. Without aiodelay the handler would wait the query out, and the server would run it to
  its end, for nobody.
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
cancelled with the handler.
"""

from __future__ import annotations

import argparse
import decimal
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from aiohttp import web

import aiodelay

__all__ = ("create_app", "main")

DSN_ENV = "DATABASE_URL"

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


async def report(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    async with request.app[POOL].acquire() as conn:
        # Cancelled here when the client leaves: asyncpg then cancels the query on the server.
        row = await conn.fetchrow(REPORT, settings.report_seconds)
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
    application_name: str = "aiodelay-example-postgres",
) -> web.Application:
    """The app, with aiodelay set up and an asyncpg pool opened at startup (closed at cleanup).

    ``dsn`` defaults to ``$DATABASE_URL``. ``report_seconds`` and ``settle_seconds`` are how
    long the report query and the payment's slow step take; ``application_name`` is what
    PostgreSQL shows for the pool's connections in ``pg_stat_activity``.
    """
    dsn = dsn if dsn is not None else os.environ.get(DSN_ENV)
    if not dsn:
        raise ValueError(f"no PostgreSQL DSN: pass dsn= or set {DSN_ENV}")
    for name, seconds in (("report_seconds", report_seconds), ("settle_seconds", settle_seconds)):
        if not 0 <= seconds < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {seconds!r}")

    app = web.Application()
    aiodelay.setup(app)
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
