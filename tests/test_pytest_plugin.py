"""The pytest plugin: ``aiodelay_server`` and ``LiveServer.drop`` over real sockets.

The first part uses the fixture directly (the plugin is loaded through its entry point, as
for any user); the second runs generated test files with ``pytester``, and one in a fresh
project in a subprocess, to show what a user sees: passing tests, readable failures, and the
plugin loading by itself; the third runs pytest where pytest-asyncio is not installed, to
show that the plugin then stays out of the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import site
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import aiodelay
from aiodelay.pytest_plugin import AiodelayServer, DropOutcome
from aiodelay.testing._response import ResponseReader
from tests.conftest import Certs

pytest_plugins = ("pytester",)

FOREVER = web.AppKey("forever", asyncio.Event)


async def report(request: web.Request) -> web.Response:
    await request.app[FOREVER].wait()  # a slow query: longer than the client waits
    return web.Response(text="report")


@aiodelay.shielded
async def charge(request: web.Request) -> web.Response:
    # Work that lasts exactly until aiodelay has seen the client leave, then finishes: a
    # shielded handler that deterministically outlives its client.
    with contextlib.suppress(aiodelay.ConnectionLost):
        await aiodelay.notify_finish(request)
    return web.Response(text="charged")


@aiodelay.shielded
async def held(request: web.Request) -> web.Response:
    await request.app[FOREVER].wait()  # runs on until the test sets the event
    return web.Response(text="held")


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"x" * 100)
    await request.app[FOREVER].wait()
    return response


async def upload(request: web.Request) -> web.Response:
    body = await request.read()  # the client leaves before the body is complete
    return web.Response(text=str(len(body)))


async def quick(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app() -> web.Application:
    app = web.Application()
    app[FOREVER] = asyncio.Event()
    app.router.add_get("/report", report)
    app.router.add_post("/charge", charge)
    app.router.add_get("/held", held)
    app.router.add_get("/stream", stream)
    app.router.add_post("/upload", upload)
    app.router.add_get("/quick", quick)
    return app


# -- the usability bar: each test body is at most five lines --------------------------------
# The two tests that take ``repetition`` are the determinism check: once by default,
# ``pytest --repeat-drops 200`` runs each 200 times (see tests/conftest.py).


@pytest.mark.both_loops  # uvloop implements sockets its own way
async def test_report_is_cancelled_when_the_client_leaves(
    aiodelay_server: AiodelayServer, repetition: int
) -> None:
    server = await aiodelay_server(create_app())
    outcome = await server.drop("GET", "/report")
    assert outcome.cancelled
    assert outcome.reason == "FIN"


@pytest.mark.both_loops  # uvloop implements sockets its own way
async def test_shielded_charge_finishes_after_the_client_left(
    aiodelay_server: AiodelayServer, repetition: int
) -> None:
    server = await aiodelay_server(create_app())
    outcome = await server.drop("POST", "/charge", data=b"amount=5", how="RST")
    assert outcome.ran_on
    assert outcome.reason == "RST"


# -- moments and ways to drop -------------------------------------------------------------


@pytest.mark.both_loops  # uvloop implements sockets its own way
@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("FIN", "FIN"),
        ("RST", "RST"),
        ("half-close", "FIN"),  # aiohttp answers a half-close by closing
    ],
)
async def test_drop_is_seen_with_the_reason_of_how_the_client_left(
    aiodelay_server: AiodelayServer, how: Any, reason: str
) -> None:
    server = await aiodelay_server(create_app())
    outcome = await server.drop("GET", "/report", how=how)
    assert (outcome.kind, outcome.reason, outcome.how) == ("cancelled", reason, how)


@pytest.mark.both_loops  # uvloop implements sockets its own way
async def test_drop_after_response_bytes_happens_mid_stream(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app())
    outcome = await server.drop("GET", "/stream", after_response_bytes=100)
    assert outcome.cancelled
    assert (outcome.status, outcome.received) == (200, b"x" * 100)  # chunked, decoded


@pytest.mark.both_loops  # uvloop implements sockets its own way
async def test_drop_after_request_bytes_happens_mid_upload(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app())
    outcome = await server.drop("POST", "/upload", data=b"y" * 1000, after_request_bytes=10)
    assert outcome.cancelled
    assert outcome.moment == "after 10 of 1000 request body bytes"


@pytest.mark.both_loops  # uvloop implements sockets its own way
async def test_drop_after_seconds_counts_from_the_handler_start(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app())
    outcome = await server.drop("GET", "/report", after_seconds=0.05)
    assert outcome.record is not None
    # The wait is timed by the loop, whose clock ticks in milliseconds on uvloop (uv_now).
    assert outcome.dropped_at - outcome.record.started_at >= 0.05 - 0.001
    assert outcome.cancelled


async def test_cancelled_after_is_the_time_from_drop_to_cancellation(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app())
    outcome = await server.drop("GET", "/report")
    assert outcome.record is not None
    assert outcome.cancelled_after == outcome.record.ended_at - outcome.dropped_at
    assert 0 <= outcome.cancelled_after < 1


async def test_handler_that_ended_before_the_drop_is_completed(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app())
    outcome = await server.drop("GET", "/quick", after_response_bytes=2)
    assert (outcome.kind, outcome.lost, outcome.received) == ("completed", None, b"ok")
    assert outcome.ended_after is None
    assert outcome.cancelled_after is None


@pytest.mark.both_loops  # uvloop implements sockets its own way
async def test_wait_seen_reports_a_shielded_handler_still_running(
    aiodelay_server: AiodelayServer,
) -> None:
    app = create_app()
    server = await aiodelay_server(app)
    outcome = await server.drop("GET", "/held", wait="seen")
    assert (outcome.kind, outcome.reason, outcome.record) == ("running", "FIN", None)
    app[FOREVER].set()
    assert (await outcome.wait_ended()).ran_on


async def test_wait_ended_returns_a_new_outcome_and_leaves_the_old_one_as_it_was(
    aiodelay_server: AiodelayServer,
) -> None:
    app = create_app()
    server = await aiodelay_server(app)
    outcome = await server.drop("GET", "/held", wait="seen")
    app[FOREVER].set()
    ended = await outcome.wait_ended()
    assert (ended.kind, ended.reason, ended.record is not None) == ("ran_on", "FIN", True)
    assert (outcome.kind, outcome.reason, outcome.record) == ("running", "FIN", None)
    assert await ended.wait_ended() == ended  # already ended: an equal copy, at once


async def test_a_second_drop_on_the_same_server_is_matched_to_its_own_request(
    aiodelay_server: AiodelayServer,
) -> None:
    app = create_app()
    server = await aiodelay_server(app)
    held = await server.drop("GET", "/held", wait="seen")
    reported = await server.drop("GET", "/report", how="RST")
    app[FOREVER].set()
    assert (reported.kind, (await held.wait_ended()).kind) == ("cancelled", "ran_on")


# -- the server ---------------------------------------------------------------------------


async def test_server_installs_aiodelay_when_the_app_lacks_it(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app())
    assert aiodelay.stats(server.app).in_flight == 0  # raises if not installed


async def test_server_keeps_the_apps_own_aiodelay_setup(aiodelay_server: AiodelayServer) -> None:
    app = create_app()
    aiodelay.setup(app, policy="shield")
    server = await aiodelay_server(app)
    outcome = await server.drop("GET", "/report", wait="seen")
    assert outcome.running  # the app's shield policy holds, not a second, cancelling setup
    app[FOREVER].set()
    assert (await outcome.wait_ended()).ran_on


async def test_server_accepts_aiodelay_as_a_listed_middleware(
    aiodelay_server: AiodelayServer,
) -> None:
    app = web.Application(middlewares=[aiodelay.middleware()])
    app[FOREVER] = asyncio.Event()
    app.router.add_get("/report", report)
    server = await aiodelay_server(app)
    assert (await server.drop("GET", "/report")).cancelled


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_server_runs_like_production_unless_asked(
    aiodelay_server: AiodelayServer, handler_cancellation: bool
) -> None:
    kwargs: dict[str, Any] = {"handler_cancellation": True} if handler_cancellation else {}
    server = await aiodelay_server(create_app(), **kwargs)
    assert server.runner.server is not None
    assert server.runner.server.handler_cancellation is handler_cancellation
    assert server.host == "127.0.0.1"
    assert server.url.port == server.port
    assert str(server.make_url("/a?b=c")) == f"http://127.0.0.1:{server.port}/a?b=c"


async def test_server_serves_the_app_as_it_is_when_asked_not_to_set_up_aiodelay(
    aiodelay_server: AiodelayServer,
) -> None:
    app = web.Application()
    app.router.add_get("/quick", quick)
    server = await aiodelay_server(app, setup_aiodelay=False)
    client = await server.connect()
    await client.get("/quick")
    assert await asyncio.wait_for(client.read_response(), 5) == (200, b"ok")
    with pytest.raises(RuntimeError, match=r"not installed"):
        aiodelay.stats(app)
    with pytest.raises(RuntimeError, match=r"^drop\(\) needs aiodelay on the app"):
        await server.drop("GET", "/quick")


async def test_server_adds_its_observer_on_the_first_drop_only(
    aiodelay_server: AiodelayServer,
) -> None:
    # An observed request takes another path through aiodelay: a server that no test drops
    # from serves the app as it was set up.
    from aiodelay._core.installation import installed_on

    app = create_app()
    server = await aiodelay_server(app)
    assert installed_on(app).observers == []
    assert (await server.drop("GET", "/quick", after_response_bytes=2)).completed
    assert (await server.drop("GET", "/quick", after_response_bytes=2)).completed
    assert len(installed_on(app).observers) == 1
    await server.close()
    assert installed_on(app).observers == []


async def test_connect_gives_a_raw_connection_that_the_server_aborts_when_it_closes(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app())
    client = await server.connect()
    await client.get("/quick")
    assert await asyncio.wait_for(client.read_response(), 5) == (200, b"ok")
    assert server.clients == [client]
    await server.close()
    assert client.writer.transport.is_closing()
    assert server.clients == []


async def test_server_speaks_tls_with_an_ssl_context(
    aiodelay_server: AiodelayServer, certs: Certs
) -> None:
    server = await aiodelay_server(create_app(), ssl_context=certs.server)
    assert str(server.make_url("/quick")) == f"https://127.0.0.1:{server.port}/quick"
    client = await server.connect(tls=certs.client)
    await client.get("/quick")
    assert await asyncio.wait_for(client.read_response(), 5) == (200, b"ok")
    with pytest.raises(ValueError, match=r"pass tls="):
        await server.connect()
    with pytest.raises(ValueError, match=r"^drop\(\) speaks plain HTTP"):
        await server.drop("GET", "/quick")


async def test_a_runner_the_test_stopped_is_not_cleaned_up_again(
    aiodelay_server: AiodelayServer,
) -> None:
    app = create_app()
    cleanups: list[web.Application] = []

    async def count(app: web.Application) -> None:
        cleanups.append(app)

    app.on_cleanup.append(count)
    server = await aiodelay_server(app)
    await server.runner.cleanup()  # the test stops the server itself
    await server.close()  # as the fixture does when the test ends
    assert cleanups == [app]


# -- misuse and timeouts ------------------------------------------------------------------

BAD_ARGUMENTS = [
    # (keyword arguments to drop(), the error, a part of its message)
    ({"after_seconds": 1, "after_response_bytes": 1}, TypeError, "at most one of"),
    ({"how": "FYN"}, ValueError, "how must be one of"),
    ({"wait": "forever"}, ValueError, "wait must be one of"),
    ({"timeout": 0}, ValueError, "timeout must be positive"),
    ({"after_request_bytes": 5}, ValueError, "between 0 and len(data) = 0"),
    ({"after_response_bytes": -1}, ValueError, "after_response_bytes must be >= 0"),
    ({"after_seconds": -1}, ValueError, "after_seconds must be >= 0"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGUMENTS)
async def test_drop_rejects_bad_arguments_before_connecting(
    aiodelay_server: AiodelayServer, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    server = await aiodelay_server(create_app())
    with pytest.raises(error, match=re.escape(message)):
        await server.drop("GET", "/report", **kwargs)


async def test_drop_rejects_a_path_without_leading_slash(aiodelay_server: AiodelayServer) -> None:
    server = await aiodelay_server(create_app())
    with pytest.raises(ValueError, match="path must start with '/'"):
        await server.drop("GET", "report")


async def test_a_raw_client_rejects_an_unknown_way_to_leave(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app())
    client = await server.connect()
    with pytest.raises(ValueError, match=r"^how must be 'FIN', 'RST' or 'half-close', got 'FYN'$"):
        client.drop("FYN")  # type: ignore[arg-type]


async def test_a_request_that_never_reaches_a_handler_fails_readably(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app())
    expected = (
        "GET /bad path (drop by FIN when the handler started): the handler did not start: "
        "the server closed the connection; the client had received status 400 and body b"
    )
    with pytest.raises(pytest.fail.Exception, match=f"^{re.escape(expected)}"):
        await server.drop("GET", "/bad path")  # aiohttp answers 400 itself


async def test_a_handler_that_outlives_the_timeout_fails_readably(
    aiodelay_server: AiodelayServer,
) -> None:
    app = create_app()
    server = await aiodelay_server(app)
    with pytest.raises(pytest.fail.Exception, match=r"still running 0\.1s after the drop"):
        await server.drop("GET", "/held", timeout=0.1)
    app[FOREVER].set()


def test_outcome_repr_says_what_happened() -> None:
    outcome = DropOutcome(
        method="GET",
        path="/report",
        how="RST",
        moment="when the handler started",
        kind="ran_on",
        lost=aiodelay.ConnectionLost("RST"),
        status=None,
        received=b"",
        dropped_at=1.0,
        record=None,
        _probe=None,  # type: ignore[arg-type]
    )
    assert repr(outcome) == (
        "<DropOutcome GET /report dropped by RST when the handler started: ran_on, "
        "aiodelay saw RST, no response head, 0 body bytes received>"
    )


def test_plugin_re_exports_the_types_of_aiodelay_testing() -> None:
    # The documented import path (aiodelay.pytest_plugin) and the home of the types agree.
    import aiodelay.pytest_plugin
    import aiodelay.testing

    names = ("AiodelayServer", "DropHow", "DropKind", "DropOutcome", "LiveServer", "RawClient")
    assert aiodelay.testing.__all__ == aiodelay.pytest_plugin.__all__ == names
    for name in names:
        assert getattr(aiodelay.pytest_plugin, name) is getattr(aiodelay.testing, name)


# -- what a user sees: generated projects -------------------------------------------------

USER_TESTS = """
    import asyncio

    from aiohttp import web

    import aiodelay
    from aiodelay.pytest_plugin import AiodelayServer


    async def report(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response(text="report")


    @aiodelay.shielded
    async def charge(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response(text="charged")


    def create_app() -> web.Application:
        app = web.Application()
        app.router.add_get("/report", report)
        app.router.add_post("/charge", charge)
        return app


    async def test_report_is_cancelled(aiodelay_server: AiodelayServer) -> None:
        server = await aiodelay_server(create_app())
        outcome = await server.drop("GET", "/report")
        assert outcome.{report_expectation}


    async def test_charge_runs_on(aiodelay_server: AiodelayServer) -> None:
        server = await aiodelay_server(create_app())
        outcome = await server.drop("POST", "/charge", data=b"amount=5")
        assert outcome.ran_on
"""

PYTEST_INI = """
    [pytest]
    asyncio_mode = auto
    asyncio_default_fixture_loop_scope = function
    filterwarnings = error
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A user's project, run in a fresh interpreter (runpytest_subprocess): in-process, the
    inner run would find aiodelay already imported by this suite and warn that it cannot
    rewrite its asserts, which its filterwarnings=error turns into a failure."""
    pytester.makeini(textwrap.dedent(PYTEST_INI))
    return pytester


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_generated_tests_using_the_fixture_pass(project: pytest.Pytester, mode: str) -> None:
    tests = textwrap.dedent(USER_TESTS.format(report_expectation="cancelled"))
    if mode == "strict":  # pytest-asyncio's strict mode: tests say they are asyncio's
        tests = f"import pytest\npytestmark = pytest.mark.asyncio\n{tests}"
    project.makepyfile(tests)
    result = project.runpytest_subprocess("-o", f"asyncio_mode={mode}")
    result.assert_outcomes(passed=2)


def test_a_wrong_expectation_fails_with_a_readable_message(project: pytest.Pytester) -> None:
    project.makepyfile(textwrap.dedent(USER_TESTS.format(report_expectation="ran_on")))
    result = project.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*assert False",
            "*where False = <DropOutcome GET /report dropped by FIN when the handler started: "
            "cancelled, aiodelay saw FIN, no response head, 0 body bytes received, "
            "ended * ms after the drop>.ran_on",
        ]
    )


def test_servers_are_closed_in_reverse_order(project: pytest.Pytester) -> None:
    project.makepyfile(
        textwrap.dedent(
            """
            from aiohttp import web

            closed = []

            def app_named(name):
                async def on_cleanup(app):
                    closed.append(name)
                app = web.Application()
                app.on_cleanup.append(on_cleanup)
                return app

            async def test_start_two(aiodelay_server):
                await aiodelay_server(app_named("first"))
                await aiodelay_server(app_named("second"))

            def test_closed_last_first():
                assert closed == ["second", "first"]
            """
        )
    )
    project.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=2)


def test_plugin_loads_by_itself_in_a_fresh_project(tmp_path: Path) -> None:
    # A separate interpreter, no conftest and no -p: only the installed entry point.
    (tmp_path / "pytest.ini").write_text(textwrap.dedent(PYTEST_INI))
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(USER_TESTS.format(report_expectation="cancelled"))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


# -- loading where pytest-asyncio is not installed ----------------------------------------
# aiodelay is a runtime dependency of applications: its entry point loads in the pytest runs
# of projects that test with plain pytest, anyio or trio. Those runs must not notice it.

# The distributions an environment without pytest-asyncio would not have: pytest-asyncio and
# pytest-aiohttp, which is built on it.
ASYNCIO_PLUGINS = re.compile(r"^(pytest[_-]asyncio|pytest[_-]aiohttp)\b", re.IGNORECASE)

# Run pytest on the site directories in $TEST_SITE only (python -S: no site-packages of its own).
RUN_PYTEST = (
    "import os, site, sys; "
    "[site.addsitedir(d) for d in os.environ['TEST_SITE'].split(os.pathsep)]; "
    "import pytest; "
    "sys.exit(pytest.main(sys.argv[1:]))"
)

SYNC_TESTS = """
    import importlib.util


    def test_ok():
        assert 1


    def test_pytest_asyncio_is_absent():
        assert importlib.util.find_spec("pytest_asyncio") is None
"""

FIXTURE_TEST = """
    async def test_uses_the_fixture(aiodelay_server):
        await aiodelay_server(None)
"""

NOT_INSTALLED = (
    "aiodelay_server needs pytest-asyncio, which is not installed: pip install 'aiodelay[pytest]'"
)


@pytest.fixture(scope="module")
def site_without_pytest_asyncio(tmp_path_factory: pytest.TempPathFactory) -> str:
    """This environment's site directories, rebuilt from symlinks minus pytest-asyncio and
    pytest-aiohttp: aiodelay and its metadata (so its pytest11 entry point) are installed,
    pytest-asyncio is not, as in a project that tests with something else."""
    sites = []
    for each in site.getsitepackages():
        source = Path(each)
        if not source.is_dir():
            continue
        copy = tmp_path_factory.mktemp("site")
        for entry in source.iterdir():
            if not ASYNCIO_PLUGINS.match(entry.name):
                (copy / entry.name).symlink_to(entry)
        sites.append(str(copy))
    return os.pathsep.join(sites)


def run_without_pytest_asyncio(
    site_dirs: str, project: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
    env["TEST_SITE"] = site_dirs
    return subprocess.run(
        [sys.executable, "-S", "-c", RUN_PYTEST, "-p", "no:cacheprovider", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


@pytest.fixture
def plain_project(tmp_path: Path) -> Path:
    """A project that does not use pytest-asyncio, strict about warnings."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")
    (tmp_path / "test_sync.py").write_text(textwrap.dedent(SYNC_TESTS))
    return tmp_path


def test_sync_tests_pass_without_pytest_asyncio(
    site_without_pytest_asyncio: str, plain_project: Path
) -> None:
    result = run_without_pytest_asyncio(site_without_pytest_asyncio, plain_project, "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    assert result.stderr == ""


def test_fixtures_listing_works_without_pytest_asyncio(
    site_without_pytest_asyncio: str, plain_project: Path
) -> None:
    result = run_without_pytest_asyncio(site_without_pytest_asyncio, plain_project, "--fixtures")
    assert result.returncode == 0, result.stdout + result.stderr
    # aiodelay's entry point was loaded from its installed metadata, and says what it needs:
    assert "fixtures defined from aiodelay.pytest_plugin" in result.stdout
    assert "aiodelay_server -- " in result.stdout
    assert "Unavailable: needs pytest-asyncio (pip install 'aiodelay[pytest]')." in result.stdout


def test_the_fixture_without_pytest_asyncio_fails_with_one_line(
    site_without_pytest_asyncio: str, plain_project: Path
) -> None:
    (plain_project / "test_fixture.py").write_text(textwrap.dedent(FIXTURE_TEST))
    result = run_without_pytest_asyncio(
        site_without_pytest_asyncio, plain_project, "-q", "test_fixture.py"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    heading = next(i for i, line in enumerate(lines) if "ERROR at setup of test_uses" in line)
    # The whole report of the error: one line, then pytest's summary.
    assert lines[heading + 1] == NOT_INSTALLED
    assert "short test summary info" in lines[heading + 2]
    assert "Traceback" not in result.stdout + result.stderr
    assert "pytest_plugin.py" not in result.stdout + result.stderr


def test_the_fixture_says_so_when_pytest_asyncio_is_disabled(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(textwrap.dedent(FIXTURE_TEST))
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:aiohttp")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_uses_the_fixture*",
            "aiodelay_server needs pytest-asyncio's plugin, which is installed but not loaded "
            "(disabled with -p no:asyncio?)",
            "*short test summary info*",
        ]
    )


# -- the response reader ------------------------------------------------------------------

RESPONSES = [
    # (method, the bytes as they arrive in separate reads, status, body, complete)
    ("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], 200, b"ok", True),
    ("GET", [b"HTTP/1.1 200 OK\r\nContent-Len", b"gth: 5\r\n\r\nab", b"c"], 200, b"abc", False),
    # chunked, split inside a size line, a chunk and its CRLF; extensions ignored
    (
        "GET",
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r", b"\nhel", b"lo\r", b"\n"],
        200,
        b"hello",
        False,
    ),
    (
        "GET",
        [b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\n\r\n"],
        200,
        b"abc",
        True,
    ),
    # no length: the body lasts until the server closes (b"" is the close)
    ("GET", [b"HTTP/1.1 200 OK\r\n\r\nuntil", b" close", b""], 200, b"until close", True),
    # an interim 100 Continue before the real response
    ("POST", [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n\r\n"], 201, b"", False),
    # responses without a body
    ("HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"], 200, b"", True),
    ("GET", [b"HTTP/1.1 204 No Content\r\n\r\n"], 204, b"", True),
]


@pytest.mark.parametrize(("method", "reads", "status", "body", "complete"), RESPONSES)
def test_response_reader_counts_body_bytes_as_they_arrive(
    method: str, reads: list[bytes], status: int, body: bytes, complete: bool
) -> None:
    response = ResponseReader(method)
    for data in reads:
        response.feed(data)
    assert (response.status, bytes(response.body), response.done) == (status, body, complete)
    assert response.error is None


def test_response_reader_stops_at_a_malformed_response() -> None:
    response = ResponseReader("GET")
    response.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert response.eof
    assert response.error == "malformed response: invalid literal for int() with base 16: b'zz'"
