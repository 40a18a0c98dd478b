"""examples/postgres against a real PostgreSQL: the work stops on the database server.

The report's query must disappear from ``pg_stat_activity`` (seen from a connection of the test's
own) within 1 s of its client leaving, or of the end of its time budget (a budget from
upstream, or its route's deadline: PostgreSQL's own ``statement_timeout`` stops it even where the
app cannot), and a shielded payment must commit although its client left. A control shows that
without aiodelay the same query runs to its end for nobody. The server is
``$AIODELAY_TEST_PG_DSN`` (``eval "$(.ci/postgres.sh start)"`` makes a throwaway one); without
it these tests skip, and in CI they fail.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest
from aiohttp import web

import aiodelay
from examples.postgres import app as example
from tests._services import free_port, require, run_example
from tests.conftest import Drop, Serve, Served

# The server has 1 s to drop the query after the client left or the budget ended (asyncpg's
# cancel request, or PostgreSQL's statement_timeout, takes milliseconds on loopback); the report
# query itself would run 30 s.
STOPS_WITHIN = 1.0
REPORT_SECONDS = 30.0
# The budget the tests' upstream sends: 300 ms, as each header says it.
BUDGET = 0.3
BUDGETS = [
    # (header, value): 300 ms
    ("grpc-timeout", "300m"),
    ("x-envoy-expected-rq-timeout-ms", "300"),
]


class Ended:
    """The outcome of the first request of an app that ends (an aiodelay observer)."""

    def __init__(self) -> None:
        self.outcome: asyncio.Future[aiodelay.Outcome] = asyncio.get_running_loop().create_future()

    def request_started(self, request: web.BaseRequest) -> None:
        pass

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        pass

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)


@dataclass
class Database:
    dsn: str
    # The test's own connection, not one of the app's pool.
    admin: asyncpg.Connection[asyncpg.Record]
    name: str  # the application_name of this test's app: its backends and nobody else's

    async def active(self, marker: str) -> list[asyncpg.Record]:
        """This test's backends running a statement that contains ``marker``."""
        return await self.admin.fetch(
            "SELECT pid, state, query FROM pg_stat_activity"
            " WHERE application_name = $1 AND state = 'active' AND strpos(query, $2) > 0",
            self.name,
            marker,
        )

    async def poll(
        self, done: Callable[[], Awaitable[bool]], what: str, *, timeout: float = 10
    ) -> float:
        """Seconds until ``done()`` is true; ``AssertionError`` naming ``what`` after ``timeout``.

        PostgreSQL has no event a client can wait on for "a backend started or stopped a
        statement" (LISTEN/NOTIFY carries only what sessions send), so this is a bounded poll
        of pg_stat_activity with short pauses between the queries: the one sleep of the test.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not await done():
            if loop.time() - start > timeout:
                raise AssertionError(f"no {what} after {timeout}s")
            await asyncio.sleep(0.005)
        return loop.time() - start


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    dsn = require("postgresql")
    try:
        admin = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"cannot connect to AIODELAY_TEST_PG_DSN={dsn}: {exc}", pytrace=False)
    name = f"aiodelay-test-{uuid.uuid4().hex[:12]}"
    try:
        yield Database(dsn, admin, name)
    finally:
        # A test that failed may have left a 30 s query running: end this test's backends.
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            name,
        )
        await admin.close()


async def started(db: Database, marker: str) -> int:
    """The pid of the backend that runs the handler's statement, once it runs."""
    await db.poll(lambda: _any(db.active(marker)), f"active statement with {marker!r}")
    [row] = await db.active(marker)
    pid: int = row["pid"]
    return pid


async def _any(rows: Awaitable[list[asyncpg.Record]]) -> bool:
    return bool(await rows)


async def _none(rows: Awaitable[list[asyncpg.Record]]) -> bool:
    return not await rows


@pytest.mark.parametrize("how", ["FIN", "RST"])
async def test_report_query_stops_on_the_server_when_the_client_leaves(
    serve: Serve, db: Database, how: Drop
) -> None:
    app = await example.create_app(db.dsn, report_seconds=REPORT_SECONDS, application_name=db.name)
    ended = Ended()
    aiodelay.add_observer(app, ended)
    served = await serve(app)
    client = await served.get("/report")
    pid = await started(db, "pg_sleep")

    client.drop(how)
    gone = await db.poll(lambda: _none(db.active("pg_sleep")), "end of the report query")
    print(f"\nreport query gone from pg_stat_activity {gone * 1000:.1f} ms after {how}")
    assert gone < STOPS_WITHIN

    outcome = await asyncio.wait_for(ended.outcome, 5)
    assert outcome.kind == "cancelled"
    # Cancelled, not killed: the backend is still there, idle, back in the app's pool.
    state = await db.admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
    assert state == "idle"


async def test_without_aiodelay_the_report_query_runs_to_its_end(
    serve: Serve, db: Database
) -> None:
    # The control: the same query and pool, no aiodelay (nor its budget: within_budget needs
    # aiodelay); the query is short here, since it runs its whole length after the client left.
    app = web.Application()
    app[example.SETTINGS] = example.Settings(report_seconds=1.0, settle_seconds=0)
    app.cleanup_ctx.append(example.pool(db.dsn, db.name))
    returned: asyncio.Future[web.StreamResponse] = asyncio.get_running_loop().create_future()

    async def report(request: web.Request) -> web.StreamResponse:
        async with request.app[example.POOL].acquire() as conn:
            response = await example.compute_report(request.app, conn)
        returned.set_result(response)
        return response

    app.router.add_get("/report", report)
    served = await serve(app)
    client = await served.get("/report")
    await started(db, "pg_sleep")

    client.drop("FIN")
    response = await asyncio.wait_for(returned, 10)
    assert response.status == 200  # the whole report was computed, for a client long gone
    assert await db.active("pg_sleep") == []


def _get(path: str, headers: dict[str, str]) -> bytes:
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{fields}\r\n".encode()


async def _report_within_budget(
    served: Served, db: Database, headers: dict[str, str], ended: Ended, path: str = "/report"
) -> aiodelay.Outcome:
    """GET ``path`` with ``headers``, whose budget (or the route's deadline) is :data:`BUDGET`:
    the deadline's 504 must come at about the budget, and the query must be gone from
    pg_stat_activity within :data:`STOPS_WITHIN` of the budget's end. The request's outcome."""
    client = await served.connect()
    await client.send(_get(path, headers))
    await started(db, "pg_sleep")
    status, body = await asyncio.wait_for(client.read_response(), BUDGET + 10)
    answered = time.monotonic()
    assert status == 504, body
    outcome = await asyncio.wait_for(ended.outcome, 5)
    # The budget counts from when the request reached aiodelay.
    budget_ended = outcome.started_at + BUDGET
    await db.poll(lambda: _none(db.active("pg_sleep")), "end of the query")
    gone = time.monotonic() - budget_ended
    print(
        f"\n{headers or 'route deadline'}: 504 {(answered - budget_ended) * 1000:.1f} ms and"
        f" query gone from pg_stat_activity {gone * 1000:.1f} ms after the"
        f" {BUDGET * 1000:.0f} ms budget ended"
    )
    assert 0 <= answered - budget_ended < STOPS_WITHIN
    assert gone < STOPS_WITHIN
    return outcome


@pytest.mark.both_loops
@pytest.mark.parametrize(("header", "value"), BUDGETS)
async def test_report_query_stops_on_the_server_when_the_budget_from_upstream_ends(
    serve: Serve, db: Database, header: str, value: str
) -> None:
    # The route's own deadline is 60 s: the budget from upstream shortens it to 300 ms.
    app = await example.create_app(db.dsn, report_seconds=REPORT_SECONDS, application_name=db.name)
    ended = Ended()
    aiodelay.add_observer(app, ended)
    served = await serve(app)

    outcome = await _report_within_budget(served, db, {header: value}, ended)
    assert (outcome.kind, outcome.budget_from) == ("timed_out", header)
    # The connection went back to the pool, idle: nothing of the transaction is left open.
    busy = await db.admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state <> 'idle'",
        db.name,
    )
    assert busy == 0


@pytest.mark.both_loops
async def test_report_query_stops_on_the_server_when_the_route_deadline_passes(
    serve: Serve, db: Database
) -> None:
    app = await example.create_app(
        db.dsn, report_seconds=REPORT_SECONDS, deadline=BUDGET, application_name=db.name
    )
    ended = Ended()
    aiodelay.add_observer(app, ended)
    served = await serve(app)

    outcome = await _report_within_budget(served, db, {}, ended)
    assert (outcome.kind, outcome.budget_from) == ("timed_out", None)


@pytest.mark.both_loops
@pytest.mark.parametrize(("header", "value"), BUDGETS)
async def test_postgres_stops_the_query_at_the_budget_where_the_app_cannot(
    serve: Serve, db: Database, header: str, value: str
) -> None:
    # The query runs in an aiodelay.shield() section, which the deadline does not interrupt:
    # no cancel request goes from the app to PostgreSQL, as when the app's process is stalled
    # or cut off from the server. The statement_timeout of within_budget stops it all the same.
    app = await example.create_app(db.dsn, application_name=db.name)
    errors: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def report(request: web.Request) -> web.Response:
        async with (
            request.app[example.POOL].acquire() as conn,
            example.within_budget(request, conn),
        ):
            try:
                await aiodelay.shield(conn.fetchval(example.REPORT, REPORT_SECONDS))
            except asyncio.CancelledError as exc:
                errors.set_result(exc.__cause__)
                raise
        return web.Response(text="computed\n")

    app.router.add_get("/shielded", report)
    ended = Ended()
    aiodelay.add_observer(app, ended)
    served = await serve(app)

    outcome = await _report_within_budget(served, db, {header: value}, ended, "/shielded")
    assert (outcome.kind, outcome.budget_from) == ("timed_out", header)
    stopped = await asyncio.wait_for(errors, 5)
    # Stopped by PostgreSQL's timer, not by a cancel request ("due to user request").
    assert isinstance(stopped, asyncpg.QueryCanceledError)
    assert "statement timeout" in str(stopped)


@pytest.mark.both_loops
async def test_report_answers_the_deadline_when_postgres_stops_the_query_first(
    serve: Serve, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL's timer set 20 ms short of the budget, as if its clock ran fast: the query
    # fails first (statement timeout), and the client must get the deadline's 504 all the
    # same, not a 500 for the QueryCanceledError.
    time_left = aiodelay.time_left

    def early(request: web.BaseRequest) -> float | None:
        left = time_left(request)
        return None if left is None else max(0.0, left - 0.02)

    monkeypatch.setattr(aiodelay, "time_left", early)
    app = await example.create_app(db.dsn, report_seconds=REPORT_SECONDS, application_name=db.name)
    ended = Ended()
    aiodelay.add_observer(app, ended)
    served = await serve(app)

    outcome = await _report_within_budget(served, db, {"grpc-timeout": "300m"}, ended)
    assert (outcome.kind, outcome.budget_from) == ("timed_out", "grpc-timeout")


def _post(path: str, form: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
    ) % (path.encode(), len(form), form)


@pytest.mark.parametrize("how", ["FIN", "RST"])
async def test_shielded_payment_commits_although_the_client_left(
    serve: Serve, db: Database, how: Drop
) -> None:
    app = await example.create_app(db.dsn, settle_seconds=0.5, application_name=db.name)
    ended = Ended()
    aiodelay.add_observer(app, ended)
    served = await serve(app)
    reference = f"test-{uuid.uuid4()}"
    client = await served.connect()
    await client.send(_post("/payments", f"reference={reference}&amount=12.50".encode()))
    await started(db, "pg_sleep")
    # Inserted but not committed yet: the test's own connection does not see it.
    query = "SELECT amount FROM payments WHERE reference = $1"
    assert await db.admin.fetchval(query, reference) is None

    client.drop(how)
    outcome = await asyncio.wait_for(ended.outcome, 10)
    assert outcome.kind == "ran_on"
    assert outcome.lost is not None
    assert str(await db.admin.fetchval(query, reference)) == "12.50"


async def test_payment_rejects_a_bad_amount_in_one_line(serve: Serve, db: Database) -> None:
    app = await example.create_app(db.dsn, settle_seconds=0, application_name=db.name)
    served = await serve(app)
    client = await served.connect()
    await client.send(_post("/payments", b"reference=x&amount=1.001"))
    assert await client.read_response() == (
        400,
        b"amount: not a positive amount in cents: '1.001'\n",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # (DATABASE_URL, what the one line says)
        (None, "no PostgreSQL DSN: pass dsn= or set DATABASE_URL"),
        ("postgres://postgres@127.0.0.1:{port}/x", "Connect call failed"),
        ("nonsense://", "invalid DSN"),
    ],
)
def test_main_reports_a_missing_or_unreachable_database_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: str | None,
    message: str,
) -> None:
    if env is None:
        monkeypatch.delenv(example.DSN_ENV, raising=False)
    else:
        monkeypatch.setenv(example.DSN_ENV, env.format(port=free_port()))
    assert example.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("examples/postgres: ")
    assert message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
async def test_create_app_rejects_bad_durations(seconds: float) -> None:
    with pytest.raises(ValueError, match="report_seconds must be a finite number >= 0"):
        await example.create_app("postgresql://unused", report_seconds=seconds)


async def test_run_as_the_readme_says_on_the_port_given(db: Database) -> None:
    port = free_port()
    async with (
        run_example("postgres/app.py", port=port, env={example.DSN_ENV: db.dsn}),
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/payments", data={"reference": db.name, "amount": "1.50"}
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
