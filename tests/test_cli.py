"""``python -m aiodelay``: main(argv) in-process, and as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

import aiodelay
from aiodelay._core.middleware import SHUTDOWN_DRAIN
from aiodelay.server import _cli, main


def _one_error_line(err: str) -> str:
    """The error line, after checking it is the last line and that there is no traceback."""
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m aiodelay: error: ")
    return last


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"aiodelay {aiodelay.__version__}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "http"], "not a port number: 'http'"),
        (["--port", "65536"], "port must be in 0..65535, got 65536"),
        (["--policy", "maybe"], "invalid choice: 'maybe'"),
        (["--host", ""], "expected a host name or address"),
        (["--path"], "expected one argument"),
        (["--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    assert message in _one_error_line(capsys.readouterr().err)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_port_in_use_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, busy_port: int
) -> None:
    assert main(["--port", str(busy_port), "--path", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{busy_port}: " in _one_error_line(err)


@pytest.mark.parametrize(
    ("name", "message"), [("missing", "No such file or directory"), ("file", "not a directory")]
)
def test_unusable_directory_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, message: str
) -> None:
    (tmp_path / "file").write_text("not a directory")
    assert main(["--path", str(tmp_path / name)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in _one_error_line(err)


def _url(line: str) -> str:
    match = re.search(r"http://\S+/", line)
    assert match is not None, line
    return match.group()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_main_serves_the_demo_until_a_signal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """In-process: the demo by default, one line with the URL, Ctrl-C (or SIGTERM) gives 0."""
    visits: list[asyncio.Task[None]] = []
    pages: list[str] = []

    def announce(line: str) -> None:
        print(line)
        visits.append(asyncio.get_running_loop().create_task(visit(_url(line))))

    async def visit(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            for path in ("", "status.rpy?json"):
                async with session.get(url + path) as resp:
                    pages.append(await resp.text())
        signal.raise_signal(signum)

    monkeypatch.setattr(_cli, "_announce", announce)
    assert main(["--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Serving the aiodelay demo at http://127.0.0.1:")
    assert out.count("\n") == 1
    assert "aiodelay demo" in pages[0]
    assert '"completed": 1' in pages[1]
    assert '"GET /status.rpy?json HTTP/1.1" 200' in err  # the access log
    # The stop's own line: its times add up (aiodelay's drain, then aiohttp's two waits).
    drain = SHUTDOWN_DRAIN
    body_reads = drain + _cli.aiohttp_shutdown_timeout(_cli.SHUTDOWN_TIMEOUT)
    assert f"up to {_cli.SHUTDOWN_TIMEOUT:g}s to end" in err, err
    assert f"request-body reads after {body_reads:g}s)" in err, err
    assert "Traceback" not in err


LOGGING_SCRIPT = """\
import logging
from aiohttp import web

async def resource(request):
    logging.getLogger("shop").info("an order for %s", request.query["item"])
    logging.warning("stock is low")  # the root logger
    return web.Response(text="ordered")
"""


def test_a_scripts_own_logging_is_formatted_like_the_servers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "order.rpy").write_text(LOGGING_SCRIPT)
    answers: list[str] = []

    def announce(line: str) -> None:
        asyncio.get_running_loop().create_task(visit(_url(line)))

    async def visit(url: str) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + "order.rpy?item=tea") as resp,
        ):
            answers.append(await resp.text())
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(_cli, "_announce", announce)
    assert main(["--port", "0", "--path", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert answers == ["ordered"]
    # As aiodelay's own lines are: the time, the logger's name, the message; INFO included.
    assert re.search(r"^\d\d:\d\d:\d\d shop: an order for tea$", err, re.MULTILINE), err
    assert re.search(r"^\d\d:\d\d:\d\d root: stock is low$", err, re.MULTILINE), err
    assert re.search(r"^\d\d:\d\d:\d\d aiodelay\.site: loaded script ", err, re.MULTILINE), err
    assert "Traceback" not in err


PENDING_SCRIPT = """\
import logging
from aiodelay import NOT_DONE_YET, Resource

class Pending(Resource):
    def _failed(self, err):
        logging.getLogger("aiodelay").info("errback: %s", err.reason)

    def render_GET(self, request):
        request.on_connection_lost(self._failed)
        request.write(b"started\\n")
        return NOT_DONE_YET  # and never finish

resource = Pending()
"""


# (the whole stop, seconds; what aiohttp gets as shutdown_timeout, which it waits twice)
SHUTDOWN_SPLITS = [
    (3.0, 1.375),  # the CLI's: aiodelay's drain (0.25 s) first, then 2 x 1.375 s
    (1.0, 0.375),
    (0.1, 0.025),  # shorter than the drain can be: aiohttp keeps half, never 0 (no timeout)
]


@pytest.mark.parametrize(("total", "expected"), SHUTDOWN_SPLITS)
def test_the_stop_time_is_shared_between_the_drain_and_aiohttp(
    total: float, expected: float
) -> None:
    assert _cli.aiohttp_shutdown_timeout(total) == pytest.approx(expected)


def test_stop_fails_pending_requests_with_reason_shutdown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "pending.rpy").write_text(PENDING_SCRIPT)
    monkeypatch.setattr(_cli, "SHUTDOWN_TIMEOUT", 0.1)
    tasks: list[asyncio.Task[None]] = []

    def announce(line: str) -> None:
        tasks.append(asyncio.get_running_loop().create_task(visit(_url(line))))

    async def visit(url: str) -> None:
        async with aiohttp.ClientSession() as session, session.get(url + "pending.rpy") as resp:
            await resp.content.readline()  # the handler runs
            signal.raise_signal(signal.SIGINT)
            with contextlib.suppress(aiohttp.ClientError):
                await resp.read()

    monkeypatch.setattr(_cli, "_announce", announce)
    assert main(["--port", "0", "--path", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "errback: shutdown" in err
    assert "Traceback" not in err


SLOW_SCRIPT = """\
from aiodelay import NOT_DONE_YET, Resource

class Slow(Resource):
    def render_GET(self, request):
        request.write(b"started\\n")
        return NOT_DONE_YET  # and never finish

resource = Slow()
"""


async def _read_until(stream: asyncio.StreamReader, marker: str, seen: list[str]) -> str:
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise AssertionError(f"output ended before {marker!r}:\n{''.join(seen)}")
        seen.append(line)
        if marker in line:
            return line


async def test_python_m_aiodelay_serves_logs_and_stops_on_sigint(tmp_path: Path) -> None:
    (tmp_path / "slow.rpy").write_text(SLOW_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiodelay",
        "--port",
        "0",
        "--path",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    out: list[str] = []
    err: list[str] = []
    try:
        line = await asyncio.wait_for(_read_until(proc.stdout, "Serving", out), 20)
        port = int(_url(line).rstrip("/").rsplit(":", 1)[1])

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow.rpy HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"started" not in received:
            chunk = await asyncio.wait_for(reader.read(1024), 10)
            assert chunk, "connection closed before the script started"
            received += chunk
        writer.close()  # leave: a FIN

        logged = await asyncio.wait_for(_read_until(proc.stderr, "interrupted by", err), 10)
        assert "GET /slow.rpy from 127.0.0.1 interrupted by FIN" in logged
        assert logged.rstrip().endswith(": cancelled")

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        err.append((await proc.stderr.read()).decode())
        out.append((await proc.stdout.read()).decode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "".join(out).count("\n") == 1  # one line: the URL
    assert "Traceback" not in "".join(err)
    assert "stopping" in "".join(err)


# Both scripts say on stderr when they started and how their notify_finish future ended.
RECORD = """\
import sys

def record(name):
    def done(future):
        if future.cancelled():
            outcome = "cancelled"
        else:
            err = future.exception()
            outcome = f"{type(err).__name__} {getattr(err, 'reason', '')}".strip()
        print(f"{name} notify_finish: {outcome}", file=sys.stderr, flush=True)
    return done

"""

OPEN_STREAM_SCRIPT = (
    RECORD
    + """\
from aiodelay import NOT_DONE_YET, Resource

class Stream(Resource):
    def _tick(self, request):
        request.write(b"tick\\n")
        request.call_later(0.1, self._tick, request)

    def render_GET(self, request):
        request.notify_finish().add_done_callback(record("stream"))
        self._tick(request)
        print("started stream", file=sys.stderr, flush=True)
        return NOT_DONE_YET

resource = Stream()
"""
)

PENDING_HANDLER_SCRIPT = (
    RECORD
    + """\
import asyncio
import aiodelay

async def resource(request):
    aiodelay.notify_finish(request).add_done_callback(record("pending"))
    print("started pending", file=sys.stderr, flush=True)
    await asyncio.Event().wait()  # no response, ever
"""
)


async def _get_started(
    port: int, name: str, stderr: asyncio.StreamReader, seen: list[str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection, request ``/name.rpy``, return once the script says it started."""
    connection = await asyncio.open_connection("127.0.0.1", port)
    connection[1].write(f"GET /{name}.rpy HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await asyncio.wait_for(_read_until(stderr, f"started {name}", seen), 10)
    return connection


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_stop_with_requests_in_flight_takes_at_most_the_promised_3s(
    tmp_path: Path, signum: int
) -> None:
    """docs/server.md and the log promise 3 s; aiohttp waits its shutdown_timeout twice.

    With an open stream and a pending handler, the process exits with 0 within 3.5 s of the
    signal (3 s and the cleanup), and both notify_finish futures fail with reason "shutdown".
    """
    (tmp_path / "stream.rpy").write_text(OPEN_STREAM_SCRIPT)
    (tmp_path / "pending.rpy").write_text(PENDING_HANDLER_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "aiodelay", "--port", "0", "--path", str(tmp_path)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    out: list[str] = []
    err: list[str] = []
    connections = []
    try:
        line = await asyncio.wait_for(_read_until(proc.stdout, "Serving", out), 20)
        port = int(_url(line).rstrip("/").rsplit(":", 1)[1])
        connections.append(await _get_started(port, "stream", proc.stderr, err))
        connections.append(await _get_started(port, "pending", proc.stderr, err))

        loop = asyncio.get_running_loop()
        signalled = loop.time()
        proc.send_signal(signum)
        status = await asyncio.wait_for(proc.wait(), 20)
        took = loop.time() - signalled
        err.append((await proc.stderr.read()).decode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for _, writer in connections:
            writer.close()
    log = "".join(err)
    assert status == 0
    assert took < 3.5, f"the stop took {took:.2f}s\n{log}"
    assert "stream notify_finish: ConnectionLost shutdown" in log
    assert "pending notify_finish: ConnectionLost shutdown" in log
    assert "requests in flight have up to 3s to end" in log
    assert "Traceback" not in log


# -- --metrics -------------------------------------------------------------------------------


def test_metrics_serves_prometheus_metrics_on_the_same_port(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "hello.txt").write_text("hello")
    scrapes: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    def announce(line: str) -> None:
        print(line)
        tasks.append(asyncio.get_running_loop().create_task(visit(_url(line))))

    async def visit(url: str) -> None:
        # One connection: each request starts after the previous one ended (and was counted).
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for path in ("metrics", "", "metrics"):
                async with session.get(url + path) as resp:
                    text = await resp.text()
                    if path == "metrics":
                        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
                        scrapes.append(text)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(_cli, "_announce", announce)
    assert main(["--port", "0", "--path", str(tmp_path), "--metrics", "--no-access-log"]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(
        r"Serving \S+ at (http://127\.0\.0\.1:\d+/) \(Ctrl-C to stop\), metrics at \1metrics\n",
        out,
    ), out
    assert "Traceback" not in err
    # Every file of the served directory is one route, "/"; the scrapes are not counted.
    sample = 'aiodelay_requests_total{outcome="completed",route="/"} '
    before, after = (_value(scrape, sample) for scrape in scrapes)
    assert after == before + 1
    assert "/metrics" not in scrapes[1]


def _value(scrape: str, prefix: str) -> float:
    for line in scrape.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


WITHOUT_PROMETHEUS = """\
import sys
sys.modules["prometheus_client"] = None  # import prometheus_client now fails, as uninstalled
from aiodelay.server import main
sys.exit(main(["--metrics", "--port", "0"]))
"""


def test_metrics_without_prometheus_client_exits_2_saying_what_to_install() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PROMETHEUS], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "python -m aiodelay: error: --metrics needs prometheus-client: "
        "pip install 'aiodelay[prometheus]'\n"
    )


def test_metrics_with_a_missing_multiprocess_directory_exits_1_with_one_line(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")}
    done = subprocess.run(
        [sys.executable, "-m", "aiodelay", "--metrics", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.count("\n") == 1
    assert "PROMETHEUS_MULTIPROC_DIR is not set to a directory" in _one_error_line(done.stderr)
