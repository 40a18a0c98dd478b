"""The deployment guide (docs/deployment.md), run for real: nginx in front of gunicorn.

gunicorn runs ``tests.deploy_app:serve`` with two ``aiohttp.GunicornWebWorker`` workers (and
``GunicornUVLoopWebWorker`` ones) and the guide's ``examples/deployment/gunicorn.conf.py``;
nginx runs the guide's ``examples/deployment/nginx.conf`` (foreground, its own prefix, the
test's free ports): upstream ``keepalive``, ``X-Forwarded-For``, and ``proxy_buffering off``
for ``/stream/``. The client connects from 127.0.0.2 while nginx connects to gunicorn from
127.0.0.1, so a log line that names 127.0.0.2 names the client, not nginx. The workers write
what happens in them to their stderr (see ``tests/deploy_app.py``), and gunicorn's log has
aiodelay's INFO lines and the access lines; the test reads both as they come.

With ``tests.deploy_app:serve_metrics``, ``PROMETHEUS_MULTIPROC_DIR`` and the hooks of
``examples/deployment/prometheus_hooks.py`` added to the guide's ``gunicorn.conf.py``, every
scrape of ``/metrics``, whichever worker answers it, shows the sum over both workers.

Needs nginx (Debian: ``nginx-light``) and gunicorn (in the ``test`` extra): without them the
tests are skipped, saying what to install; in CI (``CI`` set, as ``.ci/run`` does) they fail.

Run with ``-s`` to see how long after the client's drop the handler was cancelled in the
worker, through nginx, and how many requests plain aiohttp loses when gunicorn reloads
under load (printed, not asserted).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import re
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from aiodelay.testing import RawClient
from tests import deploy_app
from tests._services import Gunicorn, Lines, Nginx, free_port, gunicorn, nginx, require

ROOT = Path(__file__).parent.parent
CLIENT = "127.0.0.2"  # loopback too; nginx itself connects to gunicorn from 127.0.0.1

# The guide's files, run as they are: docs/deployment.md includes them.
DEPLOYMENT = ROOT / "examples" / "deployment"
NGINX_CONF = (DEPLOYMENT / "nginx.conf").read_text(encoding="utf-8")
# gunicorn's logging; gunicorn runs in ROOT.
GUNICORN_CONF_ARG = "examples/deployment/gunicorn.conf.py"
# The hooks of prometheus-client's multiprocess mode, which the guide adds to that file.
METRICS_HOOKS = DEPLOYMENT / "prometheus_hooks.py"

# The guide's warning: proxy_ignore_client_abort on, nginx keeps the upstream request open.
IGNORING = NGINX_CONF.replace(
    "$proxy_add_x_forwarded_for;\n        }\n\n        location /stream/",
    "$proxy_add_x_forwarded_for;\n            proxy_ignore_client_abort on;\n"
    "        }\n\n        location /stream/",
)
assert IGNORING != NGINX_CONF


def _on_ports(conf: str, *, upstream: int, listen: int) -> str:
    """The guide's nginx.conf with the test's free ports instead of 8000 (gunicorn) and 80."""
    for shown, used in [
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream};"),
        ("listen 80;", f"listen 127.0.0.1:{listen};"),
    ]:
        assert conf.count(shown) == 1, shown
        conf = conf.replace(shown, used)
    return conf


GUNICORN_ARGS = ["--graceful-timeout", str(deploy_app.GRACEFUL_TIMEOUT)]
GUIDE = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")

# A line of gunicorn's log, in its default format: "[time] [pid] [LEVEL] message".
_LOG_LINE = re.compile(r"\[[^]]+\] \[(?P<pid>\d+)\] \[(?P<level>[A-Z]+)\] (?P<message>.*)")

Kind = Literal["hold", "stream"]
How = Literal["FIN", "RST"]
_ids = itertools.count(1)


@dataclass
class Deployment:
    gunicorn: Gunicorn
    nginx: Nginx

    @property
    def app(self) -> Lines:
        return self.gunicorn.output

    async def event(self, event: str, rid: str, *, timeout: float = 10) -> dict[str, Any]:
        """The worker's ``event`` line about request ``rid``."""
        [line] = await self.app.wait(
            lambda line: _event(line, event, rid), f"{event!r} of request {rid}", timeout=timeout
        )
        return _parse(line)

    async def log(self, rid: str) -> dict[str, Any]:
        """aiodelay's INFO line about request ``rid`` (its path ends with the id), as
        gunicorn's log shows it: ``pid``, ``level`` and ``message``."""
        [line] = await self.app.wait(
            lambda line: f"/{rid} from " in line and _LOG_LINE.fullmatch(line) is not None,
            f"the INFO line of request {rid} in gunicorn's log",
        )
        found = _LOG_LINE.fullmatch(line)
        assert found is not None
        return {**found.groupdict(), "pid": int(found["pid"])}

    async def access(self, rid: str) -> str:
        """The access-log line of request ``rid`` in gunicorn's log."""
        [line] = await self.app.wait(
            lambda line: f'/{rid} HTTP/1.1" ' in line,
            f"the access line of request {rid} in gunicorn's log",
        )
        return line

    async def send(self, path: str) -> tuple[str, RawClient, dict[str, Any]]:
        """``GET path`` (``{id}`` in it replaced by a new request id) from 127.0.0.2, through
        nginx; returns once its handler runs in a worker."""
        rid = str(next(_ids))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.nginx.port, local_addr=(CLIENT, 0)
        )
        client = RawClient(reader, writer)
        await client.get(path.format(id=rid))
        started = await self.event("started", rid)
        return rid, client, started

    async def request(self, kind: Kind) -> tuple[str, RawClient, dict[str, Any]]:
        """A request to ``/{kind}/{id}``, once its handler runs (for a stream: once the first
        chunk reached the client)."""
        rid, client, started = await self.send(f"/{kind}/{{id}}")
        if kind == "stream":
            await asyncio.wait_for(client.read_until(b"first chunk"), 10)
        return rid, client, started


def _parse(line: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(line.partition("deploy-app ")[2])
    return data


def _event(line: str, event: str, rid: str | None) -> bool:
    if not line.startswith("deploy-app "):
        return False
    data = _parse(line)
    return bool(data["event"] == event and (rid is None or data.get("id") == rid))


@pytest.fixture
def worker_class() -> str:
    return "aiohttp.GunicornWebWorker"


@pytest.fixture
def nginx_conf() -> str:
    return NGINX_CONF


@contextlib.asynccontextmanager
async def _deploy(
    prefix: Path,
    *,
    app: str = "tests.deploy_app:serve",
    worker_class: str = "aiohttp.GunicornWebWorker",
    nginx_conf: str = NGINX_CONF,
    gunicorn_conf: str = GUNICORN_CONF_ARG,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Deployment]:
    """gunicorn running ``app`` with two workers and the configuration file ``gunicorn_conf``,
    behind nginx running ``nginx_conf`` (its files under ``prefix``)."""
    require("nginx")  # skip (or fail in CI) before starting gunicorn for nothing
    async with gunicorn(
        app,
        workers=2,
        worker_class=worker_class,
        args=[*GUNICORN_ARGS, "-c", gunicorn_conf, *args],
        cwd=ROOT,
        env=env,
    ) as server:
        # Both workers' apps have started: a connection may go to either.
        await server.output.wait(lambda line: _event(line, "ready", None), "ready apps", count=2)
        port = free_port()
        conf = _on_ports(nginx_conf, upstream=server.port, listen=port)
        async with nginx(prefix, conf, port=port) as proxy:
            yield Deployment(server, proxy)


@pytest.fixture
async def deployment(
    tmp_path: Path, worker_class: str, nginx_conf: str
) -> AsyncIterator[Deployment]:
    async with _deploy(
        tmp_path / "nginx", worker_class=worker_class, nginx_conf=nginx_conf
    ) as deployed:
        yield deployed


# Each drop: what the client requests and how it leaves.
DROPS: list[tuple[Kind, How]] = [
    ("hold", "FIN"),  # a held request, the client closes
    ("hold", "RST"),  # a held request, the client resets
    ("stream", "FIN"),  # a stream (proxy_buffering off) after its first chunk, closed
    ("stream", "RST"),  # the same, reset
]


_OLD_UVLOOP_WORKER = pytest.mark.skipif(
    tuple(int(part) for part in aiohttp.__version__.split(".")[:2]) < (3, 11),
    reason="aiohttp 3.10's GunicornUVLoopWebWorker calls asyncio.get_event_loop() with no loop "
    "set, which current uvloop refuses: that worker does not start at all",
)


@pytest.mark.parametrize(
    "worker_class",
    [
        "aiohttp.GunicornWebWorker",
        pytest.param("aiohttp.GunicornUVLoopWebWorker", marks=_OLD_UVLOOP_WORKER),
    ],
)
async def test_drops_through_nginx_cancel_the_handlers_in_both_workers(
    deployment: Deployment,
) -> None:
    pids: dict[tuple[Kind, How], set[int]] = {drop: set() for drop in DROPS}
    latencies: dict[tuple[Kind, How], list[float]] = {drop: [] for drop in DROPS}
    # Which worker accepts a connection is the kernel's choice: drop each case at least three
    # times, and on until both workers have had some (bounded).
    for _ in range(40):
        if len(set().union(*pids.values())) == 2 and len(latencies["hold", "FIN"]) >= 3:
            break
        for kind, how in DROPS:
            rid, client, started = await deployment.request(kind)
            assert started["remote"] == CLIENT  # the handler's request.remote, via XFF
            dropped = time.monotonic()
            client.drop(how)
            cancelled = await deployment.event("cancelled", rid)
            ended = await deployment.event("ended", rid)
            finish = await deployment.event("finish", rid)
            log = await deployment.log(rid)
            assert cancelled["pid"] == started["pid"] == ended["pid"] == log["pid"]
            # nginx closes its connection to the worker: the worker sees a FIN, whichever
            # way the client left.
            assert (ended["kind"], ended["reason"], ended["client"]) == ("cancelled", "FIN", CLIENT)
            assert (finish["error"], finish["reason"]) == ("ConnectionLost", "FIN")
            message = log["message"]
            assert log["level"] == "INFO"
            assert message.startswith(f"GET /{kind}/{rid} from {CLIENT} interrupted by FIN")
            assert message.endswith(": cancelled")
            # aiohttp's access line, in gunicorn's log too: 499 when no status line went out.
            # It names nginx: aiohttp logs the request before aiohttp-remotes' middleware.
            access = await deployment.access(rid)
            status = 499 if kind == "hold" else 200
            assert "[INFO] 127.0.0.1 [" in access, access
            assert f'"GET /{kind}/{rid} HTTP/1.1" {status} ' in access, access
            pids[kind, how].add(started["pid"])
            latencies[kind, how].append(cancelled["t"] - dropped)
    else:
        raise AssertionError(f"every request went to one worker: {pids}")
    workers = set().union(*pids.values())
    assert len(workers) == 2, workers
    assert deployment.gunicorn.pid not in workers
    served = collections.Counter(
        _parse(line)["pid"] for line in deployment.app.lines if _event(line, "started", None)
    )
    print(f"\nrequests per worker: {dict(served)}")
    print("client drop -> handler cancelled in the worker, through nginx (ms):")
    for (kind, how), times in latencies.items():
        shown = ", ".join(f"{t * 1000:.2f}" for t in times)  # in the order they ran
        print(f"  {kind:6} {how}: {shown}")


# 32 MiB: far more than the socket buffers between the worker and the client hold, far less
# than nginx buffers to its temporary file (proxy_max_temp_file_size, 1 GiB by default).
DOWNLOAD = 32 << 20


async def test_with_proxy_buffering_a_download_completes_for_a_client_that_reads_nothing(
    deployment: Deployment,
) -> None:
    # location / (proxy_buffering on, nginx's default): nginx takes the whole response into its
    # buffers and a temporary file, so the handler ends as it would for a fast client, and
    # the app cannot tell that the client has not read it.
    rid, client, _ = await deployment.send(f"/download/{{id}}?size={DOWNLOAD}")
    ended = await deployment.event("ended", rid)
    assert (ended["kind"], ended["reason"]) == ("completed", None)
    client.drop("RST")


async def test_without_proxy_buffering_a_download_goes_at_the_clients_pace(
    deployment: Deployment,
) -> None:
    # location /stream/ (proxy_buffering off): the handler waits in write() for the client,
    # and is cancelled when it leaves. nginx closes its connection to the worker with response
    # data unread: the worker sees an RST.
    rid, client, _ = await deployment.send(f"/stream/download/{{id}}?size={DOWNLOAD}")
    await asyncio.wait_for(client.read_until(b"\r\n\r\n"), 10)  # the head came through
    client.drop("FIN")
    ended = await deployment.event("ended", rid)
    assert (ended["kind"], ended["reason"]) == ("cancelled", "RST")


# The same drop (FIN, while the handler works for a second), with nginx as the guide
# configures it and with proxy_ignore_client_abort on.
IGNORE_CASES = [(NGINX_CONF, "cancelled"), (IGNORING, "completed")]


@pytest.mark.parametrize(("nginx_conf", "expected"), IGNORE_CASES, ids=["default", "ignoring"])
async def test_with_proxy_ignore_client_abort_the_handler_runs_on(
    deployment: Deployment, expected: str
) -> None:
    rid, client, _ = await deployment.send("/work/{id}?seconds=1")
    client.drop("FIN")
    ended = await deployment.event("ended", rid)
    assert ended["kind"] == expected, ended


async def test_graceful_stop_ends_pending_requests_with_reason_shutdown(
    deployment: Deployment,
) -> None:
    # Pending requests, in each worker if the kernel lets us (which worker accepts a connection
    # is its choice, and a worker woken first may take them all: seen in CI, 40 of 40), so
    # open held requests and streams until both have some, bounded; one worker is enough.
    clients: list[RawClient] = []
    try:
        await _stop_with_pending_requests(deployment, clients)
    finally:
        for client in clients:
            client.writer.transport.abort()


async def _stop_with_pending_requests(deployment: Deployment, clients: list[RawClient]) -> None:
    pending: dict[str, int] = {}  # request id -> worker pid
    held: list[RawClient] = []  # the clients of held requests (no response head yet)
    for _ in range(40):
        kind: Kind = "stream" if len(clients) % 2 else "hold"
        rid, client, started = await deployment.request(kind)
        clients.append(client)
        if kind == "hold":
            held.append(client)
        pending[rid] = started["pid"]
        if len(set(pending.values())) == 2:
            break

    stopping = time.monotonic()
    deployment.gunicorn.proc.send_signal(signal.SIGTERM)
    timeout = deploy_app.GRACEFUL_TIMEOUT + 5
    for rid in pending:
        ended = await deployment.event("ended", rid, timeout=timeout)
        finish = await deployment.event("finish", rid, timeout=timeout)
        # The server stopped the request: counted as interrupted, with reason "shutdown".
        assert (ended["kind"], ended["reason"]) == ("failed", "shutdown"), ended
        assert (finish["error"], finish["reason"]) == ("ConnectionLost", "shutdown"), finish
        # ended by aiohttp's cancellation, before the arbiter's SIGKILL would have come
        assert ended["t"] - stopping < deploy_app.GRACEFUL_TIMEOUT
    # The worker closes the connection of a cancelled request without an answer: nginx tells
    # its client 502 Bad Gateway (what the guide says the client gets).
    for client in held:
        status, _ = await asyncio.wait_for(client.read_response(), timeout)
        assert status == 502
    assert await asyncio.wait_for(deployment.gunicorn.proc.wait(), timeout) == 0
    # Each worker ended by itself (a worker that the arbiter SIGKILLs says nothing, and
    # gunicorn still exits 0: the exit status alone proves nothing).
    output = "\n".join(deployment.app.lines)
    for pid in set(pending.values()):
        assert f"Worker exiting (pid: {pid})" in output, output
    assert "Traceback" not in output, output
    print(
        "\nSIGTERM -> pending handlers ended with reason='shutdown' (s): "
        + ", ".join(
            f"{json.loads(line.partition(' ')[2])['t'] - stopping:.3f}"
            for line in deployment.app.lines
            if _event(line, "ended", None)
        )
    )


async def test_given_an_app_the_worker_is_killed_before_pending_requests_end() -> None:
    """The trap that ``serve()`` avoids: when the factory returns an app, the worker builds
    the runner with ``shutdown_timeout`` = 95% of ``--graceful-timeout``; aiohttp waits that
    twice for a pending handler, so the arbiter's SIGKILL comes first. The handler never
    ends (no ``finally``, no ``notify_finish`` outcome), and gunicorn still exits 0."""
    async with gunicorn(
        "tests.deploy_app:create_app", workers=1, args=["--graceful-timeout", "1"], cwd=ROOT
    ) as server:
        [ready] = await server.output.wait(lambda line: _event(line, "ready", None), "ready app")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        client = RawClient(reader, writer)
        await client.get("/hold/pending")
        await server.output.wait(lambda line: _event(line, "started", "pending"), "started")
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.proc.wait(), 10) == 0
        await server.output.finished()  # all of the output, the killed worker's included
        client.writer.transport.abort()
    output = server.output
    events = [_parse(line)["event"] for line in output.lines if line.startswith("deploy-app ")]
    assert events == ["ready", "started"], output.text()
    assert f"Worker exiting (pid: {_parse(ready)['pid']})" not in output.text()


def test_the_guide_shows_the_files_and_commands_this_test_runs() -> None:
    # The guide includes the files whole; the test runs them (with its ports).
    for name in ("nginx.conf", "gunicorn.conf.py", "prometheus_hooks.py"):
        assert f"```{{literalinclude}} ../examples/deployment/{name}\n" in GUIDE, name
    assert (
        "gunicorn 'tests.deploy_app:serve' --worker-class aiohttp.GunicornWebWorker -w 2"
        f" --bind 127.0.0.1:0 --graceful-timeout 5 -c {GUNICORN_CONF_ARG}\n" in GUIDE
    )
    assert (
        "PROMETHEUS_MULTIPROC_DIR=DIR gunicorn 'tests.deploy_app:serve_metrics' --worker-class"
        " aiohttp.GunicornWebWorker -w 2 --bind 127.0.0.1:0 --graceful-timeout 5"
        " -c gunicorn.conf.py\n" in GUIDE
    )


# -- Prometheus metrics: both workers, one directory, every scrape the sum ------------------

# A series: its name and its labels, sorted.
Series = tuple[str, tuple[tuple[str, str], ...]]


def _metrics(text: str) -> dict[Series, float]:
    """The ``aiodelay_`` samples of an exposition, but the histogram's buckets and ``_sum``
    (which depend on timing)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("aiodelay_") and not sample.name.endswith(("_bucket", "_sum"))
    }


def _expected(
    sent: collections.Counter[tuple[str, str]], *, live: bool = True
) -> dict[Series, float]:
    """What a scrape shows after the requests ``sent`` ((route, outcome) -> count; the drops
    all seen as a FIN from nginx); ``live``: with the in-flight gauge (the workers run)."""
    expected: dict[Series, float] = {}
    for (route, outcome), count in sent.items():
        expected["aiodelay_requests_total", (("outcome", outcome), ("route", route))] = count
        if outcome == "cancelled":
            expected["aiodelay_disconnects_total", (("reason", "FIN"), ("route", route))] = count
    if live:
        expected["aiodelay_requests_in_flight", ()] = 0
    cancelled = sum(count for (_, outcome), count in sent.items() if outcome == "cancelled")
    expected["aiodelay_cancel_latency_seconds_count", ()] = cancelled
    return expected


def _with_metrics_hooks(directory: Path) -> str:
    """The guide's gunicorn.conf.py with the metrics hooks added, as the guide says: written
    to ``directory``, its path returned."""
    conf = directory / "gunicorn.conf.py"
    logging_conf = (ROOT / GUNICORN_CONF_ARG).read_text(encoding="utf-8")
    conf.write_text(logging_conf + "\n" + METRICS_HOOKS.read_text(encoding="utf-8"))
    return str(conf)


async def test_metrics_of_both_workers_add_up_in_every_scrape(tmp_path: Path) -> None:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    # A previous run's file: gunicorn.conf.py's on_starting must remove it before the workers
    # start (it would be added in, and break the scrapes).
    leftover = directory / "counter_1.db"
    leftover.write_bytes(b"a previous run")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    async with _deploy(
        tmp_path / "nginx",
        app="tests.deploy_app:serve_metrics",
        gunicorn_conf=_with_metrics_hooks(tmp_path),
        env=env,
    ) as deployment:
        assert not leftover.exists()
        sent: collections.Counter[tuple[str, str]] = collections.Counter()
        served: dict[str, set[int]] = {"completed": set(), "dropped": set()}
        split: collections.Counter[int] = collections.Counter()  # requests per worker
        # Completed requests and drops through nginx, until both workers have served some of
        # each (which worker takes a connection is the kernel's choice; bounded).
        for _ in range(20):
            if all(len(pids) == 2 for pids in served.values()):
                break
            for kind, how in DROPS:
                rid, client, started = await deployment.send("/work/{id}?seconds=0")
                assert await asyncio.wait_for(client.read_response(), 10) == (200, b"done")
                await client.aclose()
                ended = await deployment.event("ended", rid)
                assert (ended["kind"], ended["pid"]) == ("completed", started["pid"])
                sent["/work/{id}", "completed"] += 1
                served["completed"].add(started["pid"])
                split[started["pid"]] += 1
                rid, client, started = await deployment.request(kind)
                client.drop(how)
                ended = await deployment.event("ended", rid)
                assert (ended["kind"], ended["reason"]) == ("cancelled", "FIN"), ended
                sent[f"/{kind}/{{id}}", "cancelled"] += 1
                served["dropped"].add(started["pid"])
                split[started["pid"]] += 1
        else:
            raise AssertionError(f"every request went to one worker: {served}")
        workers = served["completed"]
        assert workers == served["dropped"]
        assert deployment.gunicorn.pid not in workers
        expected = _expected(sent)

        # Scrapes, the first through nginx (whose pooled upstream connection ties it to one
        # worker), then each on a new connection straight to gunicorn (the kernel picks the
        # worker), until each worker has answered two; bounded. Each one shows the sum over
        # both workers, and not itself (the /metrics route is not counted). Which worker
        # answered a scrape: its witness's line.
        # A worker writes its counts to its files at most half a second after they changed
        # (and right before it answers a scrape): until then, a scrape answered by the other
        # worker misses them. Scrape until the sums show (each scrape a round trip; bounded);
        # every scrape after that must show them.
        polls = 0
        deadline = time.monotonic() + 5
        while True:
            polls += 1
            client = await RawClient.connect(deployment.gunicorn.port)
            await client.get("/metrics", close=True)
            status, body = await asyncio.wait_for(client.read_response(), 10)
            await client.aclose()
            assert status == 200, body
            if _metrics(body.decode()) == expected:
                break
            assert time.monotonic() < deadline, body.decode()
        answered: list[int] = []
        # (400: on a loaded machine the kernel once gave 99 of 100 new connections to one.)
        for n in range(1, 401):
            port = deployment.nginx.port if n == 1 else deployment.gunicorn.port
            client = await RawClient.connect(port)
            await client.get("/metrics", close=True)
            status, body = await asyncio.wait_for(client.read_response(), 10)
            await client.aclose()
            assert status == 200, body
            found = await deployment.app.wait(
                lambda line: _event(line, "ended", "metrics"),
                f"scrape {n}'s end",
                count=polls + n,
            )
            answered.append(_parse(found[-1])["pid"])
            assert _metrics(body.decode()) == expected, (answered[-1], body.decode())
            if all(answered.count(pid) >= 2 for pid in workers):
                break
        else:
            raise AssertionError(f"every scrape went to one worker: {answered}")
        assert set(answered) == workers
        print(f"\nsent: {dict(sent)}, per worker: {dict(split)}; scrapes answered by: {answered}")
        print("\n".join(line for line in body.decode().splitlines() if "aiodelay_" in line))

        # A graceful stop: both workers exit by themselves, and gunicorn's child_exit hook
        # marks them dead (their in-flight files go; their counters stay).
        deployment.gunicorn.proc.send_signal(signal.SIGTERM)
        timeout = deploy_app.GRACEFUL_TIMEOUT + 5
        assert await asyncio.wait_for(deployment.gunicorn.proc.wait(), timeout) == 0
    output = "\n".join(deployment.app.lines)
    for pid in workers:
        assert f"Worker exiting (pid: {pid})" in output, output
    assert "Traceback" not in output, output
    files = sorted(path.name for path in directory.iterdir())
    assert {f"counter_{pid}.db" for pid in workers} <= set(files), files
    assert not [name for name in files if name.startswith("gauge_live")], files
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    assert _metrics(generate_latest(registry).decode()) == _expected(sent, live=False)


# -- Reloads under load: no POST answered 502 --------------------------------------------------

# The load of the reload test: CLIENTS clients through nginx, each sending requests one after
# the other, half of them writes (POST, which nginx never retries on another connection), each
# answered after up to WORK seconds; DROPPING of them leave before their answer (at a random
# moment within WORK), as clients do.
CLIENTS = 100
WORK = 0.03
DROPPING = 0.3
RELOADS = 3


class Load:
    """CLIENTS clients sending requests to a port through one pool of connections, until
    stopped. ``got``: (method, status) -> count, status 0 for a client that left before its
    answer (aiohttp's client then closes the connection)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: collections.Counter[tuple[str, int]] = collections.Counter()
        self._stop = asyncio.Event()
        self._answered = asyncio.Event()
        self._ids = itertools.count()
        self._task = asyncio.ensure_future(self._run())

    async def answers(self, count: int) -> None:
        """Wait until ``count`` more requests have been answered or left."""
        target = sum(self.got.values()) + count
        while sum(self.got.values()) < target:
            assert not self._task.done(), self._task
            self._answered.clear()
            await asyncio.wait_for(self._answered.wait(), 30)

    async def stop(self) -> collections.Counter[tuple[str, int]]:
        self._stop.set()
        await self._task
        return self.got

    async def _run(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
            await asyncio.gather(*(self._client(random.Random(n), session) for n in range(CLIENTS)))

    async def _client(self, rng: random.Random, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            method = "POST" if rng.random() < 0.5 else "GET"
            route = "write" if method == "POST" else "read"
            url = f"http://127.0.0.1:{self.port}/{route}/{next(self._ids)}"
            leave = rng.uniform(0, WORK) if rng.random() < DROPPING else None
            try:
                exchange = self._exchange(
                    session, method, f"{url}?seconds={rng.uniform(0, WORK):.4f}"
                )
                self.got[method, await asyncio.wait_for(exchange, leave)] += 1
            except asyncio.TimeoutError:
                self.got[method, 0] += 1
            self._answered.set()

    @staticmethod
    async def _exchange(session: aiohttp.ClientSession, method: str, url: str) -> int:
        data = b"x" * 1024 if method == "POST" else None
        async with session.request(method, url, data=data) as response:
            await response.read()
            return response.status


async def _reloads_under_load(
    prefix: Path, *, app: str, **deploy: Any
) -> collections.Counter[tuple[str, int]]:
    """What the load's clients got while gunicorn, running ``app`` behind nginx, reloaded
    RELOADS times (SIGHUP: new workers start, then the old ones stop gracefully). Then a
    graceful stop: every worker ended by itself, without a traceback, and gunicorn exited 0."""
    async with _deploy(prefix, app=app, **deploy) as deployment:
        output = deployment.app
        load = Load(deployment.nginx.port)
        try:
            for n in range(1, RELOADS + 1):
                # Each reload under a load that has run a while: the old workers' connections
                # busy or pooled in nginx.
                await load.answers(CLIENTS * 4)
                deployment.gunicorn.proc.send_signal(signal.SIGHUP)
                await output.wait(
                    lambda line: _event(line, "ready", None),
                    "new apps",
                    count=2 + 2 * n,
                    timeout=30,
                )
                await output.wait(
                    lambda line: "Worker exiting" in line,
                    "old workers gone",
                    count=2 * n,
                    timeout=30,
                )
            await load.answers(CLIENTS * 4)
        finally:
            got = await load.stop()
        deployment.gunicorn.proc.send_signal(signal.SIGTERM)
        timeout = deploy_app.GRACEFUL_TIMEOUT + 5
        assert await asyncio.wait_for(deployment.gunicorn.proc.wait(), timeout) == 0
        await output.finished()
    text = "\n".join(output.lines)
    assert text.count("Worker exiting") == 2 * (RELOADS + 1), text
    assert "Traceback" not in text, text
    return got


_UVLOOP_WORKER_STARTS = tuple(int(part) for part in aiohttp.__version__.split(".")[:2]) >= (3, 11)


async def test_reloads_under_load_answer_no_post_with_a_502(tmp_path: Path) -> None:
    """docs/deployment.md, *Reloads*: gunicorn reloaded three times under load, behind nginx
    with upstream keepalive. aiohttp alone, the control, loses requests at each reload (nginx
    answers a POST with 502; it retries a GET on another connection, which hides most of
    theirs); with aiodelay, with and without its metrics, none. Run with ``-s`` to see the
    counts (the control's is printed, not asserted: it is chance, from a few to a hundred)."""
    metrics = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "multiproc")}
    with_metrics: dict[str, Any] = {
        "app": "tests.deploy_app:serve_metrics",
        "gunicorn_conf": _with_metrics_hooks(tmp_path),
        "env": metrics,
    }
    cases: dict[str, dict[str, Any]] = {
        "plain aiohttp": {"app": "tests.deploy_app:serve_plain"},
        "aiodelay": {"app": "tests.deploy_app:serve"},
        "aiodelay + metrics": with_metrics,
    }
    if _UVLOOP_WORKER_STARTS:  # (see _OLD_UVLOOP_WORKER)
        cases["aiodelay + metrics, uvloop"] = {
            **with_metrics,
            "worker_class": "aiohttp.GunicornUVLoopWebWorker",
        }
    runs = {
        name: await _reloads_under_load(tmp_path / str(n), **case)
        for n, (name, case) in enumerate(cases.items())
    }
    print(f"\n{RELOADS} reloads under load, through nginx (POST 502 | GET 502 | answered | left):")
    for name, got in runs.items():
        answered = sum(n for (_, status), n in got.items() if status)
        left = sum(n for (_, status), n in got.items() if not status)
        print(f"  {name:26} {got['POST', 502]:5} | {got['GET', 502]:5} | {answered:6} | {left:5}")
    for name, got in runs.items():
        assert {status for _, status in got} <= {0, 200, 502}, (name, got)
        assert got["POST", 200] > CLIENTS, (name, got)  # the load ran
        if name != "plain aiohttp":
            assert got["POST", 502] == got["GET", 502] == 0, (name, got)
