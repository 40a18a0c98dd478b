"""examples/chain: a client leaving A stops A, B and C; so does A's time budget running out.

Three real services on 127.0.0.1, each served like production (``handler_cancellation=False``)
with aiodelay installed; A calls B and B calls C over ``aiohttp.ClientSession``. The test waits
until C is working, drops the connection at A, and waits for each service's aiodelay to report
its handler cancelled. The times (from the drop to each cancellation) are printed (``pytest
-s``) and put in the assertion messages; only a generous bound is asserted.

With budgets (``--budgets``: ``budget_headers`` and ``budget_trace()``), A has a deadline of
:data:`A_DEADLINE`, B and C their own of 5 s and 10 s, and the client waits: B and C stop when
A's budget runs out (as a rule C at its deadline, answering 504, and B and A passing that on),
directly and with B behind a real nginx (the deployment guide's ``nginx.conf``, which passes
the headers through). The times, from the moment A's budget ran out to each handler's end, are
printed. The controls, without budgets: directly, B and C still stop, but only because A
closes its call to B (they answer nothing); behind an nginx that keeps the upstream request
when its client leaves (``proxy_ignore_client_abort on``), B and C run on after A answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

import aiodelay
from examples.chain import app as chain
from tests._services import Lines, Nginx, _spawn, _stop, free_port, nginx, require
from tests.conftest import Drop, Serve, Served
from tests.test_deployment import IGNORING, NGINX_CONF, _on_ports

#: A's own deadline; B's and C's are 5 s and 10 s, and C would work 30 s.
A_DEADLINE = 1.0
#: How close to the end of A's budget B and C must stop: generous, for a loaded 2-core machine
#: (they stop a few milliseconds before it: each call's budget is less budget_trace's margin).
NEAR = 0.3


class Watch:
    """One service's handler of ``/work``: started (an event) and how it ended."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = asyncio.Event()
        self.ended: asyncio.Future[aiodelay.Outcome] = asyncio.get_running_loop().create_future()

    def request_started(self, request: web.BaseRequest) -> None:
        self.started.set()

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        pass  # the outcome says it too

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        if not self.ended.done():
            self.ended.set_result(outcome)


class Answer:
    """The status a service's ``/work`` answered with, ``None`` if it answered nothing; and
    when its deadline was to pass (``time.monotonic()``), as its handler started."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.deadline_at: float | None = None

    @web.middleware
    async def note_deadline(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        left = aiodelay.time_left(request)  # (inside aiodelay's middleware: the deadline is set)
        if left is not None:
            self.deadline_at = time.monotonic() + left
        return await handler(request)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        self.status = response.status


def _watched(app: web.Application, watch: Watch, answer: Answer) -> web.Application:
    aiodelay.add_observer(app, watch)
    app.on_response_prepare.append(answer.on_response_prepare)
    app.middlewares.append(answer.note_deadline)
    return app


class Chain:
    """A (own deadline :data:`A_DEADLINE`, sending its budget on) -> B (5 s) -> C (10 s), B and C
    reading and sending budgets if asked, each service watched: how its handler ended, and the
    status it answered with."""

    def __init__(self) -> None:
        self.watches = {name: Watch(name) for name in "ABC"}
        self.answers = {name: Answer() for name in "ABC"}

    async def start_b_and_c(self, serve: Serve, *, budgets: bool) -> int:
        """Serve C, then B calling C; B's port."""
        headers = chain.BUDGET_HEADERS if budgets else ()
        c = await chain.create_app("C", deadline=10, budget_headers=headers)
        served_c = await serve(_watched(c, self.watches["C"], self.answers["C"]))
        b = await chain.create_app(
            "B", f"http://127.0.0.1:{served_c.port}", deadline=5, budget_headers=headers
        )
        served_b = await serve(_watched(b, self.watches["B"], self.answers["B"]))
        return served_b.port

    async def start_a(self, serve: Serve, b_url: str) -> Served:
        """Serve A, calling ``b_url`` (B, or a proxy in front of it)."""
        a = await chain.create_app(
            "A", b_url, deadline=A_DEADLINE, budget_headers=chain.BUDGET_HEADERS
        )
        return await serve(_watched(a, self.watches["A"], self.answers["A"]))

    async def start(self, serve: Serve, *, budgets: bool) -> Served:
        """The whole chain, A calling B directly; A's server."""
        b_port = await self.start_b_and_c(serve, budgets=budgets)
        return await self.start_a(serve, f"http://127.0.0.1:{b_port}")

    def report(self, outcomes: Mapping[str, aiodelay.Outcome]) -> str:
        """Each ended handler's end, from the moment A's budget ran out, how and its status,
        and the event loop."""
        ran_out = outcomes["A"].started_at + A_DEADLINE
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        return f"({loop}) " + ", ".join(
            f"{name} {outcome.kind} {(outcome.ended_at - ran_out) * 1000:+.1f} ms "
            f"(answered {self.answers[name].status})"
            for name, outcome in outcomes.items()
        )


async def _ended(watches: Mapping[str, Watch]) -> dict[str, aiodelay.Outcome]:
    return {name: await asyncio.wait_for(w.ended, 5) for name, w in watches.items()}


def _assert_stopped_by_the_budget(
    chain_: Chain, outcomes: Mapping[str, aiodelay.Outcome], report: str
) -> None:
    """A answers 504; B and C stop near the end of A's budget, each with the budget it was sent
    (its outcome names the header; its deadline is near its sender's, not its own 5 s or 10 s),
    and at least one of them at its own deadline.

    As a rule C's deadline runs out first: C answers 504 and B and A pass it on. On a loaded
    machine a timer may fire later than the margins now and then: then B answered first, and C
    stopped because its client left."""
    ran_out = outcomes["A"].started_at + A_DEADLINE
    deadlines = [chain_.answers[name].deadline_at for name in "ABC"]
    known = [at for at in deadlines if at is not None]
    assert len(known) == 3, f"{deadlines} ({report})"
    for before, after in itertools.pairwise(known):
        # Each budget is the sender's time left less budget_trace's margin, taken as it
        # arrives: the sender's deadline, give or take the margin and the way between them.
        assert abs(after - before) < NEAR, f"{known} ({report})"
    assert chain_.answers["A"].status == 504, report
    for name, outcome in outcomes.items():
        assert abs(outcome.ended_at - ran_out) < NEAR, f"{name} ({report})"
        if outcome.lost is None:
            assert chain_.answers[name].status == 504, f"{name} ({report})"
        else:  # its client left, having answered first
            assert name != "A", f"A: its client left ({report})"
            assert outcome.kind == "cancelled", f"{name} ({report})"
    for name in "BC":
        # Either header: A and B send both, with the same milliseconds.
        assert outcomes[name].budget_from in chain.BUDGET_HEADERS, f"{name} ({report})"
    # The budgets themselves stopped the chain, not only A closing its call to B.
    assert "timed_out" in (outcomes["B"].kind, outcomes["C"].kind), report


@pytest.mark.parametrize("how", ["FIN", "RST"])
async def test_dropping_the_client_at_a_cancels_a_b_and_c(serve: Serve, how: Drop) -> None:
    watches = {name: Watch(name) for name in "ABC"}
    c = await chain.create_app("C")
    aiodelay.add_observer(c, watches["C"])
    served_c = await serve(c)
    b = await chain.create_app("B", f"http://127.0.0.1:{served_c.port}")
    aiodelay.add_observer(b, watches["B"])
    served_b = await serve(b)
    a = await chain.create_app("A", f"http://127.0.0.1:{served_b.port}")
    aiodelay.add_observer(a, watches["A"])
    served_a = await serve(a)

    client = await served_a.get("/work")
    await asyncio.wait_for(watches["C"].started.wait(), 5)  # the request reached the end
    dropped_at = time.monotonic()
    client.drop(how)

    outcomes = {name: await asyncio.wait_for(w.ended, 5) for name, w in watches.items()}
    times = {name: (o.ended_at - dropped_at) * 1000 for name, o in outcomes.items()}
    report = ", ".join(f"{name} cancelled {ms:.1f} ms after the drop" for name, ms in times.items())
    print(f"\nchain, client dropped by {how} at A: {report}")
    for name, outcome in outcomes.items():
        assert outcome.kind == "cancelled", f"{name}: {outcome.kind} ({report})"
        assert outcome.lost is not None, f"{name}: aiodelay did not see its client leave"
        # Generous: C would work 30 s; the point is that it stopped, not how fast.
        assert times[name] < 5000, report
    # Each one's client was the service before it, and it left only after that one stopped.
    assert outcomes["A"].ended_at <= outcomes["B"].ended_at <= outcomes["C"].ended_at, report


async def test_the_chain_answers_when_the_client_stays(serve: Serve) -> None:
    served_c = await serve(await chain.create_app("C", work_seconds=0.01))
    served_b = await serve(await chain.create_app("B", f"http://127.0.0.1:{served_c.port}"))
    served_a = await serve(await chain.create_app("A", f"http://127.0.0.1:{served_b.port}"))
    client = await served_a.get("/work")
    assert await client.read_response() == (200, b"A <- B <- C done")


async def test_create_app_rejects_a_non_positive_work_time() -> None:
    with pytest.raises(ValueError, match="work_seconds must be positive"):
        await chain.create_app("C", work_seconds=0)


# Budgets: the client waits, A's deadline is A_DEADLINE, B's 5 s and C's 10 s.


@pytest.mark.both_loops
async def test_a_budget_running_out_at_a_stops_b_and_c(serve: Serve) -> None:
    services = Chain()
    served_a = await services.start(serve, budgets=True)
    client = await served_a.get("/work")
    status, body = await asyncio.wait_for(client.read_response(), 5)
    outcomes = await _ended(services.watches)
    report = services.report(outcomes)
    print(f"\nchain with budgets, from the end of A's {A_DEADLINE:g} s budget: {report}")
    assert status == 504, body
    _assert_stopped_by_the_budget(services, outcomes, report)
    # C's 504 comes back up, unless the way back took longer than the margins (a loaded
    # machine, now and then): then B's budget or A's own deadline answered first.
    assert body.startswith((b"A <- B <- 504: ", b"A <- 504: ", b"504: ")), body


@pytest.mark.both_loops
async def test_without_budgets_b_and_c_stop_only_because_a_closes_its_call(serve: Serve) -> None:
    # The control: A's deadline cancels its call to B, which closes the connection; B's and C's
    # aiodelay see their clients leave. They stop, but answer nothing: only A says 504.
    services = Chain()
    served_a = await services.start(serve, budgets=False)
    client = await served_a.get("/work")
    status, _ = await asyncio.wait_for(client.read_response(), 5)
    outcomes = await _ended(services.watches)
    report = services.report(outcomes)
    print(f"\nchain without budgets, from the end of A's {A_DEADLINE:g} s deadline: {report}")
    assert (status, outcomes["A"].kind) == (504, "timed_out"), report
    for name in "BC":
        assert outcomes[name].kind == "cancelled", f"{name} ({report})"
        assert outcomes[name].lost is not None, f"{name} ({report})"
        assert services.answers[name].status is None, f"{name} ({report})"
        assert outcomes[name].budget_from is None, f"{name} ({report})"


# The same with A -> nginx -> B. With the guide's nginx.conf, nginx closes its connection to B
# when A closes its own; with proxy_ignore_client_abort on (the guide's warning), it does not,
# and only the budget stops B and C.
NGINX_CASES = [NGINX_CONF, IGNORING]
NGINX_IDS = ["default", "ignoring-client-abort"]


@contextlib.asynccontextmanager
async def _behind_nginx(
    serve: Serve, tmp_path: Path, conf: str, *, budgets: bool
) -> AsyncIterator[tuple[Chain, Served, Nginx]]:
    """The chain with nginx running ``conf`` between A and B."""
    require("nginx")  # skip (or fail in CI) before starting anything for nothing
    services = Chain()
    b_port = await services.start_b_and_c(serve, budgets=budgets)
    port = free_port()
    async with nginx(
        tmp_path / "nginx", _on_ports(conf, upstream=b_port, listen=port), port=port
    ) as proxy:
        served_a = await services.start_a(serve, f"http://127.0.0.1:{port}")
        yield services, served_a, proxy


@pytest.mark.both_loops
@pytest.mark.parametrize("conf", NGINX_CASES, ids=NGINX_IDS)
async def test_a_budget_running_out_stops_b_and_c_behind_nginx(
    serve: Serve, tmp_path: Path, conf: str
) -> None:
    async with _behind_nginx(serve, tmp_path, conf, budgets=True) as (services, served_a, _):
        client = await served_a.get("/work")
        status, body = await asyncio.wait_for(client.read_response(), 5)
        outcomes = await _ended(services.watches)
    report = services.report(outcomes)
    conf_id = NGINX_IDS[NGINX_CASES.index(conf)]
    print(f"\nchain with budgets, nginx ({conf_id}) between A and B: {report}")
    assert status == 504, body
    _assert_stopped_by_the_budget(services, outcomes, report)


@pytest.mark.both_loops
async def test_without_budgets_b_and_c_run_on_behind_an_nginx_ignoring_client_aborts(
    serve: Serve, tmp_path: Path
) -> None:
    # The control: nginx keeps its request to B when A closes its own, so nobody leaves B.
    async with _behind_nginx(serve, tmp_path, IGNORING, budgets=False) as (services, a, proxy):
        client = await a.get("/work")
        status, _ = await asyncio.wait_for(client.read_response(), 5)
        a_outcome = await asyncio.wait_for(services.watches["A"].ended, 5)
        assert (status, a_outcome.kind) == (504, "timed_out")
        # Still running well after A answered (the budget stops them tens of ms before it).
        b_and_c = [services.watches[name].ended for name in "BC"]
        ended, _ = await asyncio.wait(b_and_c, timeout=NEAR)
        assert not ended, [f.result() for f in ended]
        print(
            f"\nchain without budgets, nginx ignoring client aborts between A and B: B and C "
            f"still running {(time.monotonic() - a_outcome.ended_at) * 1000:.0f} ms after A "
            f"answered 504"
        )
        # Clean up: nginx's fast stop closes its connection to B, which B's aiodelay sees.
        proxy.proc.send_signal(signal.SIGTERM)
        outcomes = await _ended({name: services.watches[name] for name in "BC"})
    for name, outcome in outcomes.items():
        assert outcome.kind == "cancelled", f"{name}: {outcome}"
        assert services.answers[name].status is None, name


# The command line: bad arguments are one line, never a traceback.
BAD_ARGUMENTS = [
    (["C"], "the following arguments are required: PORT"),
    (["C", "port"], "argument PORT: not a port (1 to 65535): 'port'"),
    (["C", "70000"], "argument PORT: not a port (1 to 65535): '70000'"),
    (["B", "8082", "127.0.0.1:8083"], "DOWNSTREAM_URL must start with http:// or https://"),
    (["C", "8083", "--deadline", "0"], "argument --deadline: not a positive number of seconds"),
    (["C", "8083", "--deadline", "nan"], "argument --deadline: not a positive number of seconds"),
    (["C", "8083", "--work", "-1"], "argument --work: not a positive number of seconds"),
    (["C", "8083", "--budgets=yes"], "argument --budgets: ignored explicit argument 'yes'"),
]


@pytest.mark.parametrize(("argv", "error"), BAD_ARGUMENTS)
def test_bad_arguments_are_a_one_line_error(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        chain.main(argv)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.splitlines()[-1].startswith(f"examples/chain/app.py: error: {error}"), stderr
    assert "Traceback" not in stderr


async def test_the_readme_commands_with_budgets_answer_504_after_a_second() -> None:
    # As the README runs it: three processes, C, B and A, with --budgets and their deadlines.
    ports = {name: free_port() for name in "ABC"}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    commands = {
        "C": ["C", str(ports["C"]), "--deadline", "10", "--budgets"],
        "B": ["B", str(ports["B"]), url["C"], "--deadline", "5", "--budgets"],
        "A": ["A", str(ports["A"]), url["B"], "--deadline", str(A_DEADLINE), "--budgets"],
    }
    async with contextlib.AsyncExitStack() as stack:
        logs = {
            name: await stack.enter_async_context(_example(argv, ports[name]))
            for name, argv in commands.items()
        }
        async with aiohttp.ClientSession() as session:
            asked_at = time.monotonic()
            async with session.get(url["A"] + "/work") as response:
                body = await response.text()
            answered_in = time.monotonic() - asked_at
        print(
            f"\nthe README's chain, budgets: answered {response.status} in {answered_in:.3f} s:"
            f" {body.strip()}"
        )
        assert response.status == 504, body
        assert abs(answered_in - A_DEADLINE) < NEAR, answered_in
        # B and C worked with A's budget, less the margins, not with their own 5 s and 10 s.
        for name in "BC":
            (line,) = await logs[name].wait(_says(f"{name}: working"), f"{name}'s start")
            left = float(line.rsplit(", ", 1)[1].removesuffix("s left"))
            assert A_DEADLINE - NEAR < left < A_DEADLINE, line
        # C's deadline, that budget, passes first and its 504 comes back up; but the way
        # between three processes may take longer than the margins now and then, and then B's
        # budget or A's own deadline answers a 504 first, and C stops because its client left.
        assert body.startswith(("A <- B <- 504: ", "A <- 504: ", "504: ")), body
        if body.startswith("A <- B <- "):
            assert "budget" in body, body  # C says its deadline was the budget from upstream
        # Either way C stopped now, not at the end of its 30 s of work.
        (end,) = await logs["C"].wait(
            lambda line: "work cancelled" in line, "C's end", timeout=3 * NEAR
        )
        print(f"C's end: {end}")


def _says(text: str) -> Callable[[str], bool]:
    """A match for ``Lines.wait``: a line with ``text`` in it."""
    return lambda line: text in line


@contextlib.asynccontextmanager
async def _example(argv: list[str], port: int) -> AsyncIterator[Lines]:
    """``python examples/chain/app.py *argv``, once it listens on ``port``; Ctrl-C at the end."""
    script = Path(chain.__file__)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc, lines = await _spawn(argv[0], [sys.executable, str(script), *argv], env=env)
    try:
        await lines.wait(lambda line: f"127.0.0.1:{port}" in line, f"'Running on' port {port}")
        yield lines
    finally:
        await _stop(proc, signal.SIGINT, 10)
        await lines.close()
