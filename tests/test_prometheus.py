"""aiodelay.prometheus: the metric families after real requests and real drops, the /metrics
route, setup()'s checks, and multiprocess mode with two real server processes."""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

import aiodelay
import aiodelay.prometheus
from aiodelay.testing import RawClient
from tests.conftest import HandlerRun, Serve

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def _key(name: str, **labels: str) -> tuple[str, Labels]:
    return name, tuple(sorted(labels.items()))


def _samples(text: str) -> Samples:
    """The aiodelay_* samples of a scrape, without ``_created`` timestamps."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("aiodelay_") and not sample.name.endswith("_created"):
                found[_key(sample.name, **sample.labels)] = sample.value
    return found


def _split_histogram(samples: Samples) -> tuple[Samples, list[tuple[float, float]]]:
    """(the samples without the latency buckets and sum, the buckets as (le, count))."""
    rest: Samples = {}
    buckets: list[tuple[float, float]] = []
    for (name, labels), value in samples.items():
        if name == "aiodelay_cancel_latency_seconds_bucket":
            buckets.append((float(dict(labels)["le"]), value))
        elif name != "aiodelay_cancel_latency_seconds_sum":
            rest[name, labels] = value
    return rest, sorted(buckets)


async def _scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    """(Content-Type, body) of one GET of ``path`` on a connection of its own."""
    client = await RawClient.connect(port)
    await client.get(path)
    head = (await client.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    headers = dict(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:] if line)
    )
    assert head.startswith("HTTP/1.1 200 "), head
    body = await client.reader.readexactly(int(headers["content-length"]))
    await client.aclose()
    return headers["content-type"], body.decode()


class _Ends:
    """An observer added after the metrics' one: once it heard a request end, so did they."""

    def __init__(self) -> None:
        self.ended = 0
        self.changed = asyncio.Event()
        self.lost: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)

    def request_started(self, request: web.BaseRequest) -> None:
        pass

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        self.lost[request.path].set()

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        self.ended += 1
        self.changed.set()

    async def wait(self, count: int) -> None:
        async def reached() -> None:
            while self.ended < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(reached(), 5)


_BIG = 16 * 1024 * 1024


async def test_each_outcome_is_counted_under_its_route_pattern(serve: Serve) -> None:
    """A completed request, FIN and RST drops that cancel, a shielded handler that runs on, a
    download cut short, a 404 and a 405, a sub-app route: the exact samples afterwards."""
    probes = {"fin": HandlerRun(), "rst": HandlerRun()}
    ends = _Ends()

    async def user(request: web.Request) -> web.Response:
        return web.Response(text=request.match_info["id"])

    async def hold(request: web.Request) -> web.Response:
        await probes[request.match_info["name"]].run(request, asyncio.Future())
        raise AssertionError("not reached")

    shielded_started = asyncio.Event()

    @aiodelay.shielded
    async def shielded(request: web.Request) -> web.Response:
        shielded_started.set()
        await ends.lost["/shielded"].wait()  # and runs on after its client left
        return web.Response(text="done anyway")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * _BIG)

    async def item(request: web.Request) -> web.Response:
        return web.Response(text="item")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/users/{id}", user)
    app.router.add_get("/hold/{name}", hold)
    app.router.add_get("/shielded", shielded)
    app.router.add_get("/big", big)
    sub = web.Application()
    sub.router.add_get("/items/{id}", item)
    app.add_subapp("/api", sub)
    registry = CollectorRegistry()
    aiodelay.prometheus.setup(app, registry=registry)
    aiodelay.add_observer(app, ends)
    served = await serve(app)

    client = await served.get("/users/1")
    assert await client.read_response() == (200, b"1")
    await client.get("/api/items/7")
    assert await client.read_response() == (200, b"item")
    await client.get("/nope")
    assert (await client.read_response())[0] == 404
    await client.send(b"POST /users/2 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
    assert (await client.read_response())[0] == 405
    await ends.wait(4)

    for name, how in (("fin", "FIN"), ("rst", "RST")):
        dropped = await served.get(f"/hold/{name}")
        await probes[name].wait_started()
        dropped.drop(how)  # type: ignore[arg-type]
        await probes[name].wait_ended()
        assert probes[name].cancelled
    await ends.wait(6)

    dropped = await served.get("/shielded")
    await asyncio.wait_for(shielded_started.wait(), 5)
    dropped.drop("FIN")
    await ends.wait(7)

    downloader = await RawClient.connect(served.port)
    served.clients.append(downloader)
    sock = downloader.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    await downloader.get("/big")
    await downloader.read_until(b"x" * 1024)
    downloader.drop("RST")  # with unread bytes: what a browser stopping a download sends
    await ends.wait(8)

    content_type, text = await _scrape(served.port)
    assert content_type == CONTENT_TYPE_LATEST
    samples, buckets = _split_histogram(_samples(text))
    total = "aiodelay_requests_total"
    disconnects = "aiodelay_disconnects_total"
    assert samples == {
        _key(total, route="/users/{id}", outcome="completed"): 1,
        _key(total, route="/api/items/{id}", outcome="completed"): 1,
        _key(total, route="(unmatched)", outcome="completed"): 2,
        _key(total, route="/hold/{name}", outcome="cancelled"): 2,
        _key(total, route="/shielded", outcome="ran_on"): 1,
        _key(total, route="/big", outcome="truncated"): 1,
        _key(disconnects, route="/hold/{name}", reason="FIN"): 1,
        _key(disconnects, route="/hold/{name}", reason="RST"): 1,
        _key(disconnects, route="/shielded", reason="FIN"): 1,
        _key(disconnects, route="/big", reason="RST"): 1,
        _key("aiodelay_requests_in_flight"): 0,
        # One per disconnect whose handler was running: not the truncated download's.
        _key("aiodelay_cancel_latency_seconds_count"): 3,
    }
    assert buckets[-1] == (float("inf"), 3)
    assert [count for _, count in buckets] == sorted(count for _, count in buckets)
    assert len(buckets) == len(aiodelay.prometheus.LATENCY_BUCKETS) + 1
    # The scrape itself is not counted: a second one shows the same.
    assert _samples((await _scrape(served.port))[1]) == _samples(text)
    assert "/metrics" not in text


async def test_the_in_flight_gauge_counts_a_held_request_and_returns_to_0(serve: Serve) -> None:
    probe = HandlerRun()

    async def hold(request: web.Request) -> web.Response:
        await probe.run(request, asyncio.Future())
        raise AssertionError("not reached")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/hold", hold)
    registry = CollectorRegistry()
    aiodelay.prometheus.setup(app, registry=registry)
    served = await serve(app)
    client = await served.get("/hold")
    await probe.wait_started()
    during = _samples((await _scrape(served.port))[1])
    assert during[_key("aiodelay_requests_in_flight")] == 1
    client.drop("RST")
    await probe.wait_ended()
    assert registry.get_sample_value("aiodelay_requests_in_flight") == 0
    assert registry.get_sample_value("aiodelay_cancel_latency_seconds_count") == 1


async def test_default_registry_path_none_and_a_custom_path(serve: Serve) -> None:
    """registry=None is prometheus-client's REGISTRY (its process metrics served too);
    path=None serves nothing (a request there is an unmatched 404); another path works."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    def count(route: str, outcome: str = "completed") -> float:
        labels = {"route": route, "outcome": outcome}
        return REGISTRY.get_sample_value("aiodelay_requests_total", labels) or 0.0

    apps = []
    for path in ("/metrics", None, "/-/metrics"):
        app = web.Application()
        aiodelay.setup(app)
        app.router.add_get("/hello", hello)
        aiodelay.prometheus.setup(app, path=path)  # one registry: the families are shared
        apps.append(await serve(app))
    default, silent, custom = apps
    before = count("/hello"), count("(unmatched)")
    for served in apps:
        client = await served.get("/hello")
        assert await client.read_response() == (200, b"hi")
    client = await silent.get("/metrics")
    assert (await client.read_response())[0] == 404
    await client.get("/hello")  # after the 404 ended: this request's start is its end's cue
    assert await client.read_response() == (200, b"hi")
    _, text = await _scrape(default.port)
    assert "python_info" in text  # REGISTRY's own collectors
    assert _samples(text) == _samples((await _scrape(custom.port, "/-/metrics"))[1])
    assert (count("/hello"), count("(unmatched)")) == (before[0] + 4, before[1] + 1)


# How the setups of an app and its sub-app report: into one registry (the sub-app's setup adds
# nothing: the outer one counts its requests already), or each into its own (each counts them).
SUB_APP_REGISTRIES = ["shared", "separate"]


@pytest.mark.parametrize("registries", SUB_APP_REGISTRIES)
async def test_a_sub_app_with_a_setup_of_its_own_counts_each_request_once(
    serve: Serve, registries: str
) -> None:
    """Regression: with setup() on an app and on its sub-app, each request of the sub-app was
    counted twice (and, in multiprocess mode, stayed in flight for good)."""
    probe = HandlerRun()

    async def x(request: web.Request) -> web.Response:
        return web.Response(text="x")

    async def hold(request: web.Request) -> web.Response:
        await probe.run(request, asyncio.Future())
        raise AssertionError("not reached")

    outer, inner = CollectorRegistry(), CollectorRegistry()
    if registries == "shared":
        inner = outer
    app = web.Application()
    aiodelay.setup(app)
    sub = web.Application()
    aiodelay.setup(sub)
    sub.router.add_get("/x", x)
    sub.router.add_get("/hold", hold)
    aiodelay.prometheus.setup(sub, registry=inner)  # before add_subapp, which freezes its routes
    app.add_subapp("/s", sub)
    aiodelay.prometheus.setup(app, registry=outer)
    ends = _Ends()
    aiodelay.add_observer(app, ends)
    served = await serve(app)

    client = await served.get("/s/x")
    for _ in range(2):
        assert await client.read_response() == (200, b"x")
        await client.get("/s/x")
    assert await client.read_response() == (200, b"x")
    await client.get("/s/nope")
    assert (await client.read_response())[0] == 404
    await ends.wait(4)
    labels = {"route": "/s/x", "outcome": "completed"}
    for registry in (outer, inner):
        assert registry.get_sample_value("aiodelay_requests_total", labels) == 3
    held = await served.get("/s/hold")
    await probe.wait_started()
    for registry in (outer, inner):
        assert registry.get_sample_value("aiodelay_requests_in_flight") == 1
    if registries == "shared":  # either app's /metrics serves it, and is not counted
        _, text = await _scrape(served.port, "/s/metrics")
        assert _samples(text) == _samples((await _scrape(served.port))[1])
    else:
        await _scrape(served.port, "/s/metrics")
        await _scrape(served.port)
    held.drop("RST")
    await ends.wait(5 + 2)
    total, disconnects = "aiodelay_requests_total", "aiodelay_disconnects_total"
    expected = {
        _key(total, route="/s/x", outcome="completed"): 3,
        _key(total, route="(unmatched)", outcome="completed"): 1,
        _key(total, route="/s/hold", outcome="cancelled"): 1,
        _key(disconnects, route="/s/hold", reason="RST"): 1,
        _key("aiodelay_requests_in_flight"): 0,
        _key("aiodelay_cancel_latency_seconds_count"): 1,
    }
    if registries == "separate":  # to the outer setup, the sub-app's /metrics is a route
        expected[_key(total, route="/s/metrics", outcome="completed")] = 1
    assert _split_histogram(_samples((await _scrape(served.port))[1]))[0] == expected
    if registries == "separate":
        del expected[_key(total, route="/s/metrics", outcome="completed")]
    assert _split_histogram(_samples((await _scrape(served.port, "/s/metrics"))[1]))[0] == (
        expected
    )


async def test_the_counts_of_an_app_that_is_gone_stay_in_its_registry() -> None:
    """Counters never go down: an app's counts outlive it in its registry, which does not keep
    the app's observer for them. (The observer is driven by hand: aiohttp keeps an app it
    served in a cache of its own for a while.)"""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    registry = CollectorRegistry()
    labels = {"route": "/hello", "outcome": "completed"}
    for count in (1, 2):
        app = web.Application()
        aiodelay.setup(app)
        app.router.add_get("/hello", hello)
        aiodelay.prometheus.setup(app, registry=registry, path=None)
        match_info = await app.router.resolve(make_mocked_request("GET", "/hello", app=app))
        # What the observer reads of a request: the route it matched (``match_info.route``,
        # read through aiohttp's attribute behind it, ``_match_info``).
        matched = SimpleNamespace(match_info=match_info, _match_info=match_info)
        request = cast(web.Request, matched)
        observer = app[aiodelay.prometheus.metrics_key]
        observer.request_started(request)
        observer.request_ended(request, aiodelay.Outcome("completed", None, 0.0, None, 0.1))
        gone = weakref.ref(observer)
        del app, match_info, matched, request, observer
        gc.collect()
        assert gone() is None
        assert registry.get_sample_value("aiodelay_requests_total", labels) == count
        assert registry.get_sample_value("aiodelay_requests_in_flight") == 0


class _NotAnApp:
    pass


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        # Not an app, a path that is not a str or not absolute, a registry of the wrong type.
        ((_NotAnApp(),), {}, TypeError, "takes a web.Application"),
        ((), {"path": b"/metrics"}, TypeError, "path must be a str or None"),
        ((), {"path": "metrics"}, ValueError, "path must start with '/'"),
        ((), {"registry": "default"}, TypeError, "must be a prometheus_client.CollectorRegistry"),
    ],
)
def test_setup_rejects_bad_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    app = web.Application()
    aiodelay.setup(app)
    with pytest.raises(error, match=message):
        aiodelay.prometheus.setup(*(args or (app,)), **kwargs)
    assert aiodelay.prometheus.metrics_key not in app
    assert len(app.router.resources()) == 0


def test_setup_configuration_is_keyword_only() -> None:
    app = web.Application()
    aiodelay.setup(app)
    with pytest.raises(TypeError, match="positional"):
        aiodelay.prometheus.setup(app, "/metrics")  # type: ignore[call-arg]


def test_setup_without_aiodelay_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"call aiodelay\.setup\(app\) first"):
        aiodelay.prometheus.setup(web.Application(), registry=CollectorRegistry())


def test_setup_twice_on_one_app_is_an_error() -> None:
    app = web.Application()
    aiodelay.setup(app)
    registry = CollectorRegistry()
    aiodelay.prometheus.setup(app, registry=registry)
    with pytest.raises(RuntimeError, match="already called on this app"):
        aiodelay.prometheus.setup(app, registry=registry, path="/other")
    assert len([r for r in app.router.resources() if r.canonical.endswith("metrics")]) == 1


def test_setup_on_a_sub_app_already_added_names_the_fix() -> None:
    app, sub = web.Application(), web.Application()
    aiodelay.setup(sub)
    app.add_subapp("/s", sub)
    with pytest.raises(RuntimeError, match="on a sub-app before it is added to its parent"):
        aiodelay.prometheus.setup(sub, registry=CollectorRegistry())
    aiodelay.prometheus.setup(sub, registry=CollectorRegistry(), path=None)  # adds no route


def test_multiprocess_dir_set_after_import_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    app = web.Application()
    aiodelay.setup(app)
    with pytest.raises(RuntimeError, match="set after prometheus_client was imported"):
        aiodelay.prometheus.setup(app)


# -- nothing imported without setup() -----------------------------------------------------

NOT_IMPORTED = """\
import asyncio, sys
import aiohttp
from aiohttp import web
import aiodelay, aiodelay.server._cli

async def main():
    async def hello(request):
        return web.Response(text="hi")
    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/") as resp:
            assert await resp.text() == "hi"
    await runner.cleanup()
    print(aiodelay.stats(app).completed, "prometheus_client" in sys.modules)

asyncio.run(main())
"""


def test_aiodelay_without_setup_never_imports_prometheus_client() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NOT_IMPORTED], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "False"]


WITHOUT_THE_EXTRA = """\
import sys
sys.modules["prometheus_client"] = None  # import prometheus_client now fails, as uninstalled
import aiodelay.prometheus
"""


def test_import_without_the_extra_is_one_line_naming_what_to_install() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_EXTRA], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    # The error's own line, and no second exception chained to it ("During handling...").
    assert done.stderr.splitlines()[-1] == (
        "ImportError: aiodelay.prometheus needs prometheus-client: "
        "pip install 'aiodelay[prometheus]'"
    )
    assert done.stderr.count("Traceback") == 1


# -- multiprocess mode: server processes, one directory -----------------------------------

# A worker: /work and /hold, or with "nested" on its command line, a sub-app at /s with its
# own setup() and those routes. Its lines: PORT, each request's end and each flush of its
# counts into its files (with time.monotonic()).
WORKER = """\
import asyncio, signal, sys, time
from aiohttp import web
import aiodelay, aiodelay.prometheus

class Said:
    def request_started(self, request): pass
    def request_lost(self, request, lost): pass
    def request_ended(self, request, outcome):
        print("ended", request.path, outcome.kind, time.monotonic(), flush=True)

async def work(request):
    return web.Response(text="done")

async def hold(request):
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"started\\n")
    await asyncio.Event().wait()

async def main():
    app = web.Application()
    aiodelay.setup(app)
    routes = app
    if sys.argv[1:] == ["nested"]:
        routes = web.Application()
        aiodelay.setup(routes)
    routes.router.add_get("/work", work)
    routes.router.add_get("/hold", hold)
    if routes is not app:
        aiodelay.prometheus.setup(routes)
        app.add_subapp("/s", routes)
    aiodelay.prometheus.setup(app)
    aiodelay.add_observer(app, Said())
    flusher = aiodelay.prometheus._flusher
    flush = flusher.flush
    def said_flush():
        flush()
        print("flushed", time.monotonic(), flush=True)
    flusher.flush = said_flush
    runner = web.AppRunner(app, handler_cancellation=False, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("PORT", runner.addresses[0][1], flush=True)
    try:
        await asyncio.wait_for(stop.wait(), 60)  # never outlives a hung test
    finally:
        await runner.cleanup()

asyncio.run(main())
"""


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.port = 0
        self.clients: list[RawClient] = []

    async def line(self, prefix: str) -> str:
        """The next line that starts with ``prefix`` (the lines before it are skipped)."""
        assert self.proc.stdout is not None
        while True:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), 20)).decode()
            if not line:
                assert self.proc.stderr is not None
                err = (await self.proc.stderr.read()).decode()
                raise AssertionError(f"the worker exited before {prefix!r}:\n{err}")
            if line.startswith(prefix):
                return line.strip()

    async def scrape(self, path: str = "/metrics") -> Samples:
        """The samples (without the histogram's buckets) of a scrape; the worker writes its
        own counts to its files first."""
        _, text = await _scrape(self.port, path)
        return _split_histogram(_samples(text))[0]

    async def connect(self) -> RawClient:
        client = await RawClient.connect(self.port)
        self.clients.append(client)
        return client

    async def hold(self, path: str = "/hold") -> RawClient:
        client = await self.connect()
        await client.get(path)
        await client.read_until(b"started\n")
        return client

    async def work(self, count: int, path: str = "/work") -> None:
        """``count`` requests of ``path`` on one connection, each to its end."""
        client = await self.connect()
        for _ in range(count):
            await client.get(path)
            assert await client.read_response() == (200, b"done")
            await self.line(f"ended {path} completed")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class StartWorker(Protocol):
    async def __call__(self, *args: str) -> _Worker: ...


@pytest.fixture
async def start_worker(tmp_path: Path) -> AsyncIterator[StartWorker]:
    """Start workers (``python -c WORKER *args``) on one multiprocess directory, which exists
    and is empty when the first starts; all stopped at teardown."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    started: list[_Worker] = []

    async def start(*args: str) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        worker = _Worker(proc)
        started.append(worker)
        worker.port = int((await worker.line("PORT")).split()[1])
        return worker

    try:
        yield start
    finally:
        for worker in started:
            for client in worker.clients:
                client.writer.transport.abort()
            await worker.stop()


TOTAL, DISCONNECTS = "aiodelay_requests_total", "aiodelay_disconnects_total"


async def test_multiprocess_one_scrape_on_either_process_shows_the_sum(
    start_worker: StartWorker, tmp_path: Path
) -> None:
    """A worker writes its counts to its files before it answers a scrape (and on its own
    within a second, see below): scraping b, then a, shows both."""
    a, b = await start_worker(), await start_worker()
    await a.work(3)
    await b.work(4)
    held = [await a.hold(), await b.hold()]
    # The gauge is summed over the live processes. (b's scrape writes b's counts.)
    await b.scrape()
    assert (await a.scrape())[_key("aiodelay_requests_in_flight")] == 2
    held[0].drop("RST")
    held[1].drop("FIN")
    await a.line("ended /hold cancelled")
    await b.line("ended /hold cancelled")

    expected = {
        _key(TOTAL, route="/work", outcome="completed"): 3 + 4,
        _key(TOTAL, route="/hold", outcome="cancelled"): 2,
        _key(DISCONNECTS, route="/hold", reason="RST"): 1,
        _key(DISCONNECTS, route="/hold", reason="FIN"): 1,
        _key("aiodelay_requests_in_flight"): 0,
        _key("aiodelay_cancel_latency_seconds_count"): 2,
    }
    await b.scrape()
    assert await a.scrape() == expected
    assert await b.scrape() == expected

    # A worker killed with a request in flight: its in-flight count stays in the directory
    # until gunicorn's child_exit hook (here: the test) calls mark_process_dead; its
    # counters stay in the sum for good.
    held.append(await b.hold())
    await b.scrape()
    assert (await a.scrape())[_key("aiodelay_requests_in_flight")] == 1
    b.proc.kill()
    await b.proc.wait()
    assert (await a.scrape())[_key("aiodelay_requests_in_flight")] == 1
    directory = str(tmp_path / "multiproc")
    multiprocess.mark_process_dead(b.proc.pid, directory)  # type: ignore[no-untyped-call]
    assert await a.scrape() == expected


async def test_multiprocess_a_worker_writes_its_counts_by_itself_within_a_second(
    start_worker: StartWorker,
) -> None:
    """Not scraped itself, a worker writes its counts to its files less than a second after a
    request ended: a scrape of another worker shows them."""
    a, b = await start_worker(), await start_worker()
    client = await b.connect()
    await client.get("/work")
    assert await client.read_response() == (200, b"done")
    ended = float((await b.line("ended /work completed")).split()[-1])
    flushed = float((await b.line("flushed")).split()[-1])
    assert flushed - ended < 1
    samples = await a.scrape()
    assert samples[_key(TOTAL, route="/work", outcome="completed")] == 1
    assert samples[_key("aiodelay_requests_in_flight")] == 0


async def test_multiprocess_a_worker_that_stops_writes_its_last_counts(
    start_worker: StartWorker,
) -> None:
    """Stopped right after its requests (sooner than a flush would come by itself), a
    worker still leaves all of them in its files."""
    a, b = await start_worker(), await start_worker()
    await b.work(2)
    await b.stop()
    assert b.proc.returncode == 0
    samples = await a.scrape()
    assert samples[_key(TOTAL, route="/work", outcome="completed")] == 2
    assert samples[_key("aiodelay_requests_in_flight")] == 0


async def test_multiprocess_a_sub_app_with_a_setup_of_its_own_counts_each_request_once(
    start_worker: StartWorker,
) -> None:
    """Regression: with setup() on an app and on its sub-app, each request of the sub-app was
    counted twice, and stayed in flight for good."""
    worker = await start_worker("nested")
    await worker.work(3, "/s/work")
    held = await worker.hold("/s/hold")
    assert (await worker.scrape())[_key("aiodelay_requests_in_flight")] == 1
    held.drop("RST")
    await worker.line("ended /s/hold cancelled")
    expected = {
        _key(TOTAL, route="/s/work", outcome="completed"): 3,
        _key(TOTAL, route="/s/hold", outcome="cancelled"): 1,
        _key(DISCONNECTS, route="/s/hold", reason="RST"): 1,
        _key("aiodelay_requests_in_flight"): 0,
        _key("aiodelay_cancel_latency_seconds_count"): 1,
    }
    assert await worker.scrape("/s/metrics") == expected
    assert await worker.scrape() == expected


async def test_a_file_served_with_metrics_on_logs_no_error(
    serve: Serve, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "hello.txt").write_text("hello")

    async def hello(request: web.Request) -> web.FileResponse:
        return web.FileResponse(tmp_path / "hello.txt")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/hello.txt", hello)
    registry = CollectorRegistry()
    aiodelay.prometheus.setup(app, registry=registry)
    ends = _Ends()
    aiodelay.add_observer(app, ends)
    served = await serve(app)
    client = await served.get("/hello.txt")
    assert await client.read_response() == (200, b"hello")
    await client.get("/hello.txt")  # the connection is kept alive, and the file sent again
    assert await client.read_response() == (200, b"hello")
    await ends.wait(2)
    labels = {"route": "/hello.txt", "outcome": "completed"}
    assert registry.get_sample_value("aiodelay_requests_total", labels) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
