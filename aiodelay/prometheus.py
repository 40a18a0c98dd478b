"""Prometheus metrics of what aiodelay sees: ``aiodelay.prometheus.setup(app)``.

Needs the extra: ``pip install 'aiodelay[prometheus]'`` (the official ``prometheus-client``).
This is the only module of aiodelay that imports ``prometheus_client``; ``import aiodelay``
never does, and an app without :func:`setup` pays nothing for it.

The metric families, fed by an :func:`aiodelay.add_observer` observer (how it counts is below):

``aiodelay_requests_total{route, outcome}``
    Each request once, when it ended, with its :class:`aiodelay.Outcome` kind: ``completed``,
    ``cancelled``, ``ran_on``, ``truncated``, ``failed`` or ``timed_out``. ``truncated`` (the
    handler had returned its response and the client left while it was written) is counted as
    ``truncated`` only, never ``completed`` too. The outcome says what happened to the work,
    not the HTTP status: a 404 or a handler that raised an ``HTTPException`` is
    ``completed``; a handler that raised anything else (a 500) is ``failed``.
``aiodelay_disconnects_total{route, reason}``
    Each request whose client left before its response was complete, once, when it ended;
    ``reason`` is the :class:`aiodelay.ConnectionLost` reason: ``FIN``, ``RST``,
    ``shutdown``, ``closed``. Its sum is the requests counted ``cancelled``, ``ran_on`` and
    ``truncated``, and those ``failed`` after their client left.
``aiodelay_requests_in_flight``
    Requests whose handler started and that have not ended (a gauge; summed over live
    processes in multiprocess mode).
``aiodelay_cancel_latency_seconds``
    From aiodelay seeing the client leave to the handler's end (``outcome.ended_at -
    outcome.lost_at``), one observation per disconnect whose handler was still running:
    not for ``truncated`` requests (their handler had already returned; there was nothing
    left to stop). A cancelled handler lands in the sub-millisecond buckets, plus the time
    its ``finally`` blocks take; a shielded one (``ran_on``) records how long it ran on for
    nobody. Buckets: 100 µs to 10 s in steps of 1, 2.5, 5 per decade, then 30 s and 60 s.
    A cancellation takes 0.05 to 0.4 ms on loopback and behind nginx, which the usual
    Prometheus buckets (from 5 ms) would put all in one bucket; cleanup that awaits a
    database, a shielded handler and a server's shutdown take milliseconds to a minute.

``route`` is the pattern of the route that matched (``request.match_info.route.resource
.canonical``): ``/users/{id}``, for a sub-app's route its full pattern with the prefix
(``/api/users/{id}``), for a static directory its prefix; never the raw path, so the number
of series is bounded by the app's routes. Requests that matched no route (404, 405) share
``route="(unmatched)"``. A series appears with its first event. A sub-app's requests are
counted by the setup of the outermost app that reports to the same registry: a sub-app with a
setup of its own into that registry adds nothing (into another registry, it counts them there).

How it counts: the observer adds to plain ints, per route and outcome, on the app's event loop
(no prometheus-client call and no lock on a request's way), and prometheus-client sees them
when it collects: a collector registered in the registry makes the families from them. Two
apps of a process that report to one registry share the series.

The ``/metrics`` route serves ``prometheus_client.generate_latest`` (with its content type,
``GET`` and ``HEAD``) and is not counted itself: a scrape would otherwise see itself in flight
and outnumber the requests of a quiet app.

Multiprocess mode (gunicorn and its workers): when ``PROMETHEUS_MULTIPROC_DIR`` is set before
the process starts, prometheus-client keeps each worker's values in files in that directory,
and ``/metrics`` on any worker serves the sum over all of them (a fresh ``CollectorRegistry``
with a ``multiprocess.MultiProcessCollector`` per scrape). A worker writes its counts to its
files at most half a second after they changed, before it answers a scrape itself, and at the
app's cleanup; its in-flight count is set each time. So a scrape on any worker sees every
worker's requests that ended more than half a second before it. The directory must exist and be
empty when the server starts (stale files would be added in, under reused pids too); the
process manager empties it before the start, and gunicorn's ``child_exit`` hook must call
``prometheus_client.multiprocess.mark_process_dead(worker.pid)`` so that a dead worker's
in-flight requests stop counting (its counters stay in the sum, as counters must).

Not promised: requests that never reach aiodelay's middleware are not counted (aiohttp answers
a malformed request or one with too large headers itself, before any middleware). A scrape
does not see itself in flight, but another scrape of the app at the same moment may be seen
there, before its handler runs or while its response is written. A route of a custom
``AbstractResource`` is labelled with its ``canonical`` (``python -m aiodelay``'s served
directory is one route, ``/``). In multiprocess mode a scrape reads every worker's files on the
event loop of the worker that serves it, and a worker that is killed (not stopped) takes its
counts of the last half second with it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import Final

try:
    import prometheus_client
except ImportError as exc:
    if not (exc.name or "").startswith("prometheus_client"):
        raise
    # One line that names the fix, not a bare "No module named 'prometheus_client'".
    raise ImportError(
        "aiodelay.prometheus needs prometheus-client: pip install 'aiodelay[prometheus]'",
        name="prometheus_client",
    ) from None
import prometheus_client.metrics
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client import values as _values
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ._core.aiohttp_internals import route_of
from ._core.errors import ConnectionLost
from ._core.installation import add_observer, installed_on
from ._core.observe import Outcome

__all__ = ("LATENCY_BUCKETS", "UNMATCHED", "setup")

#: The ``route`` label of the requests that matched no route (a 404 or 405).
UNMATCHED: Final = "(unmatched)"

#: The buckets of ``aiodelay_cancel_latency_seconds``, in seconds; the module docstring says
#: why these.
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: Multiprocess mode: how long a change may wait before it is written to the worker's files.
_FLUSH_INTERVAL: Final = 0.5

_REQUESTS = "aiodelay_requests"
_REQUESTS_HELP = "Requests that ended, by route pattern and aiodelay outcome."
_DISCONNECTS = "aiodelay_disconnects"
_DISCONNECTS_HELP = "Requests whose client left before the response was complete, by route and how."
_IN_FLIGHT = "aiodelay_requests_in_flight"
_IN_FLIGHT_HELP = "Requests whose handler started and has not ended."
_LATENCY = "aiodelay_cancel_latency_seconds"
_LATENCY_HELP = "From aiodelay seeing the client leave to the handler's end."
_LE: Final = tuple(floatToGoString(b) for b in (*LATENCY_BUCKETS, float("inf")))  # type: ignore[no-untyped-call]


class _Series:
    """One series of one setup: its count, when it appeared, and (multiprocess mode) how much
    of the count is in the worker's files."""

    __slots__ = ("count", "created", "flushed")

    def __init__(self) -> None:
        self.count = 0
        self.created = time.time()
        self.flushed = 0


class _Route:
    """One route's series of one setup, by outcome and by disconnect reason."""

    __slots__ = ("label", "outcomes", "reasons")

    def __init__(self, label: str) -> None:
        self.label = label
        self.outcomes: dict[str, _Series] = {}
        self.reasons: dict[str, _Series] = {}


class _Counts:
    """What one :func:`setup` counted, in plain ints and dicts: written only by its app's
    event loop, without a lock; whoever reads them (a scrape, maybe in another thread) copies
    a dict before going through it. The requests that ended are the sum of the outcomes."""

    __slots__ = ("buckets", "latency_sum", "pending", "retired", "routes", "scraping", "started")

    def __init__(self, *, multiprocess_mode: bool) -> None:
        #: Requests started, less the skipped ones (the ``/metrics`` routes) that ended.
        self.started = 0
        #: Requests of a ``/metrics`` route in its handler now: in flight, and not counted.
        self.scraping = 0
        self.routes: list[_Route] = []
        #: The latency histogram: a count per bucket (not cumulative; the last one +Inf).
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        #: Multiprocess mode: the latencies not yet observed in the worker's files.
        self.pending: list[float] | None = [] if multiprocess_mode else None
        #: The setup's app is gone: its counts are read once more, then dropped.
        self.retired = False

    def observe(self, seconds: float) -> None:
        if self.pending is not None:
            self.pending.append(seconds)
        else:
            self.latency_sum += seconds
            self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1


def _in_flight(counts: list[_Counts]) -> int:
    """The requests in flight: started, less ended (read first: ``started`` only grows past
    it), less those in a ``/metrics`` handler."""
    ended = sum(one.count for each in counts for route in list(each.routes)
                for one in route.outcomes.copy().values())  # fmt: skip
    return max(0, sum(each.started - each.scraping for each in counts) - ended)


class _Sink:
    """Where the counts of the setups that share metric families go: one per registry, or
    one per process in multiprocess mode. Two apps of a process that report to one registry
    show up in the same series."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # between readers; never taken on a request's way
        self._counts: list[_Counts] = []

    def add(self, observer: _Metrics) -> None:
        with self._lock:
            self._counts.append(observer.counts)
        weakref.finalize(observer, _retire, observer.counts)

    def _live_counts(self) -> list[_Counts]:
        """The counts of the setups (the caller holds the lock); those whose app is gone are
        read one last time (:meth:`_retired`) and dropped."""
        gone = [each for each in self._counts if each.retired]
        if gone:
            self._retired(gone)
            self._counts = [each for each in self._counts if each not in gone]
        return list(self._counts)

    def _retired(self, gone: list[_Counts]) -> None:
        raise NotImplementedError


def _retire(counts: _Counts) -> None:
    counts.retired = True  # (a weakref callback: it may run in any thread, at any time)


class _Collector(_Sink, Collector):
    """The families of one registry, made from the counts at each collection."""

    def __init__(self) -> None:
        super().__init__()
        self._created = time.time()
        #: The series of setups whose app is gone, by route label (counters never go down).
        self._gone = _Counts(multiprocess_mode=False)
        self._gone_routes: dict[str, _Route] = {}

    def describe(self) -> Iterator[Metric]:
        """The families, without samples: what the registry checks names against."""
        yield CounterMetricFamily(_REQUESTS, _REQUESTS_HELP, labels=("route", "outcome"))
        yield CounterMetricFamily(_DISCONNECTS, _DISCONNECTS_HELP, labels=("route", "reason"))
        yield GaugeMetricFamily(_IN_FLIGHT, _IN_FLIGHT_HELP)
        yield HistogramMetricFamily(_LATENCY, _LATENCY_HELP)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            live = self._live_counts()
            in_flight = _in_flight(live)
            counts = [*live, self._gone]
            requests: dict[tuple[str, str], tuple[int, float]] = {}
            disconnects: dict[tuple[str, str], tuple[int, float]] = {}
            for each in counts:
                for route in list(each.routes):
                    _merge(requests, route.label, route.outcomes)
                    _merge(disconnects, route.label, route.reasons)
            buckets = [
                sum(column) for column in zip(*(each.buckets for each in counts), strict=True)
            ]
            latency_sum = sum(each.latency_sum for each in counts)
        created = prometheus_client.metrics._use_created  # disable_created_metrics() says no
        family = CounterMetricFamily(_REQUESTS, _REQUESTS_HELP, labels=("route", "outcome"))
        for labels, (value, since) in _by_age(requests):
            family.add_metric(labels, value, created=since if created else None)
        yield family
        family = CounterMetricFamily(_DISCONNECTS, _DISCONNECTS_HELP, labels=("route", "reason"))
        for labels, (value, since) in _by_age(disconnects):
            family.add_metric(labels, value, created=since if created else None)
        yield family
        yield GaugeMetricFamily(_IN_FLIGHT, _IN_FLIGHT_HELP, value=in_flight)
        cumulative = list(zip(_LE, map(float, itertools.accumulate(buckets)), strict=True))
        histogram = HistogramMetricFamily(
            _LATENCY, _LATENCY_HELP, buckets=cumulative, sum_value=latency_sum
        )
        if created:
            histogram.add_sample(_LATENCY + "_created", {}, self._created)
        yield histogram

    def _retired(self, gone: list[_Counts]) -> None:
        into = self._gone
        for each in gone:
            for route in list(each.routes):
                kept = self._gone_routes.get(route.label)
                if kept is None:
                    kept = self._gone_routes[route.label] = _Route(route.label)
                    into.routes.append(kept)
                _fold(kept.outcomes, route.outcomes)
                _fold(kept.reasons, route.reasons)
            into.buckets = [a + b for a, b in zip(into.buckets, each.buckets, strict=True)]
            into.latency_sum += each.latency_sum


def _merge(
    into: dict[tuple[str, str], tuple[int, float]], label: str, series: dict[str, _Series]
) -> None:
    """Add ``series`` into ``into`` by (route, value): routes of two resources or two apps with
    the same label are one series, as old as its oldest part."""
    for value, each in series.copy().items():
        count, created = into.get((label, value), (0, each.created))
        into[label, value] = (count + each.count, min(created, each.created))


def _fold(into: dict[str, _Series], series: dict[str, _Series]) -> None:
    for value, each in series.copy().items():
        kept = into.get(value)
        if kept is None:
            kept = into[value] = _Series()
            kept.created = each.created
        kept.count += each.count


def _by_age(
    series: dict[tuple[str, str], tuple[int, float]],
) -> list[tuple[tuple[str, str], tuple[int, float]]]:
    """The series in the order they appeared, as prometheus-client lists its children."""
    return sorted(series.items(), key=lambda item: item[1][1])


class _Flusher(_Sink):
    """Multiprocess mode: the process's counts, written to prometheus-client's metrics (and
    so to the worker's files) at most ``_FLUSH_INTERVAL`` after a change, at the app's
    cleanup, and before the worker answers a scrape."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = Counter(_REQUESTS, _REQUESTS_HELP, ("route", "outcome"), registry=None)
        self.disconnects = Counter(
            _DISCONNECTS, _DISCONNECTS_HELP, ("route", "reason"), registry=None
        )
        self.in_flight = Gauge(
            _IN_FLIGHT, _IN_FLIGHT_HELP, registry=None, multiprocess_mode="livesum"
        )
        self.latency = Histogram(_LATENCY, _LATENCY_HELP, registry=None, buckets=LATENCY_BUCKETS)
        #: A flush is due (its timer is armed): the requests need not arm another.
        self.armed = False

    def arm(self) -> None:
        """Flush in ``_FLUSH_INTERVAL`` (called on a request's way, on the app's loop)."""
        self.armed = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # told outside an event loop: nothing to wait with
            self.flush()
        else:
            loop.call_later(_FLUSH_INTERVAL, self._due)

    def _due(self) -> None:
        if self.armed:  # not flushed since (a scrape or the cleanup flushes too)
            self.flush()

    def flush(self) -> None:
        """Write what changed since the last flush; set the in-flight gauge."""
        with self._lock:
            self.armed = False  # a change from now on arms the next flush
            counts = self._live_counts()
            for each in counts:
                self._write(each)
            self.in_flight.set(_in_flight(counts))

    def _retired(self, gone: list[_Counts]) -> None:
        for each in gone:
            self._write(each)  # its last changes; then it is dropped

    def _write(self, counts: _Counts) -> None:
        for route in list(counts.routes):
            for family, series in (
                (self.requests, route.outcomes),
                (self.disconnects, route.reasons),
            ):
                for value, one in series.copy().items():
                    count = one.count
                    if count != one.flushed:
                        family.labels(route.label, value).inc(count - one.flushed)
                        one.flushed = count
        pending = counts.pending
        if pending:
            latencies = pending[:]
            del pending[: len(latencies)]
            for seconds in latencies:
                self.latency.observe(seconds)


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Collector] = weakref.WeakKeyDictionary()
_flusher: _Flusher | None = None

#: How many routes an observer keeps the series of, by route object (a resource may make a
#: route per request, as ``python -m aiodelay``'s scripts do; they are counted all the same).
_ROUTES_KEPT = 1024


class _Metrics:
    """The observer of one :func:`setup`: counts each request in plain ints, on its app's
    loop, and leaves the rest to whoever reads them.

    A request costs an int added to at its start; at its end, a look at the route it matched,
    two dict lookups and an int added to: no prometheus-client call, no lock. The first
    request also settles which setups count what (:meth:`_first`)."""

    __slots__ = (
        "__weakref__",
        "_app",
        "_by_resource",
        "_by_route",
        "_count_in",
        "_covered",
        "_skips",
        "_unmatched",
        "counts",
        "home",
        "sink",
    )

    def __init__(self, app: web.Application, sink: _Sink, *, multiprocess_mode: bool) -> None:
        self._app = app
        self.sink = sink
        self.counts = _Counts(multiprocess_mode=multiprocess_mode)
        #: Where this app's requests are counted: its own counts, or an outer app's.
        self.home = self.counts
        #: The counts once the first request came, unless an outer app's setup counts this
        #: app's requests into the same families (then None, and ``_covered``).
        self._count_in: _Counts | None = None
        self._covered = False
        #: The resources not counted: the ``/metrics`` routes of this app and of the sub-apps
        #: it counts for.
        self._skips: set[web.AbstractResource] = set()
        self._by_resource: dict[web.AbstractResource, _Route] = {}
        self._by_route: dict[web.AbstractRoute, _Route] = {}
        self._unmatched: _Route | None = None

    def request_started(self, request: web.BaseRequest) -> None:
        counts = self._count_in
        if counts is None:
            counts = self._first()
            if counts is None:
                return
        counts.started += 1  # a skipped one is taken off when it ends

    def request_lost(self, request: web.BaseRequest, lost: ConnectionLost) -> None:
        pass  # counted when the request ends, with its outcome

    def request_ended(self, request: web.BaseRequest, outcome: Outcome) -> None:
        # Subscripts, not .get(): a miss (a route's first request, a 404, a scrape, a sub-app's
        # request to a setup that an outer one counts for) pays an exception, which costs
        # less there than two method calls on every request.
        try:
            route = self._by_route[route_of(request)]
        except (AttributeError, KeyError):  # (a BaseRequest has no match_info)
            found = self._route(request)
            if found is None:
                return
            route = found
        kind = outcome.kind
        try:
            series = route.outcomes[kind]
        except KeyError:
            series = route.outcomes[kind] = _Series()
        series.count += 1
        if kind != "completed":  # (a completed request's client did not leave)
            lost = outcome.lost
            if lost is not None:
                self._lost(route, outcome, lost)

    def _route(self, request: web.BaseRequest) -> _Route | None:
        """The series of the route ``request`` matched; None: it is not counted here."""
        counts = self._count_in
        if counts is None:
            return None
        try:
            key: web.AbstractRoute | None = route_of(request)
        except AttributeError:
            key = None
        resource = None if key is None else key.resource
        if resource is None:  # no route matched; aiohttp makes a route per such request
            if self._unmatched is None:
                self._unmatched = _Route(UNMATCHED)
                counts.routes.append(self._unmatched)
            return self._unmatched
        if resource in self._skips:
            counts.started -= 1
            return None
        route = self._by_resource.get(resource)
        if route is None:
            route = self._by_resource[resource] = _Route(resource.canonical)
            counts.routes.append(route)
        if isinstance(key, web.ResourceRoute):
            if len(self._by_route) >= _ROUTES_KEPT:
                self._by_route.clear()
            self._by_route[key] = route
        return route

    def _lost(self, route: _Route, outcome: Outcome, lost: ConnectionLost) -> None:
        reason = lost.reason
        series = route.reasons.get(reason)
        if series is None:
            series = route.reasons[reason] = _Series()
        series.count += 1
        if outcome.kind != "truncated" and outcome.lost_at is not None:
            self.counts.observe(max(0.0, outcome.ended_at - outcome.lost_at))

    def _first(self) -> _Counts | None:
        """At the first request: count, unless an outer app's setup counts this app's
        requests into the same families (its observer sees them too, and first). And take
        over the sub-apps for which that holds, with their ``/metrics`` routes."""
        if self._covered:
            return None
        apps = [self._app]
        while apps:
            for resource in apps.pop().router.resources():
                sub_app = resource.get_info().get("app")
                if not isinstance(sub_app, web.Application):
                    continue
                apps.append(sub_app)
                inner = sub_app.get(metrics_key)
                if inner is not None and inner.sink is self.sink and inner._count_in is None:
                    inner._covered = True
                    inner.home = self.counts
                    self._skips |= inner._skips
        self._count_in = self.counts
        return self.counts


class _MultiprocessMetrics(_Metrics):
    """Multiprocess mode: also arms the flush of the process's counts, after a change."""

    __slots__ = ("_flusher",)

    def __init__(self, app: web.Application, flusher: _Flusher) -> None:
        super().__init__(app, flusher, multiprocess_mode=True)
        self._flusher = flusher

    def request_started(self, request: web.BaseRequest) -> None:
        super().request_started(request)
        if not self._flusher.armed:
            self._flusher.arm()

    def request_ended(self, request: web.BaseRequest, outcome: Outcome) -> None:
        super().request_ended(request, outcome)
        if not self._flusher.armed:
            self._flusher.arm()


metrics_key = web.AppKey("aiodelay.prometheus", _Metrics)


def setup(
    app: web.Application,
    *,
    path: str | None = "/metrics",
    registry: CollectorRegistry | None = None,
) -> None:
    """Count ``app``'s requests in Prometheus metrics and serve them at ``path``.

    ``app`` must have aiodelay set up (``RuntimeError`` naming the fix otherwise) and must not
    have started; call this once per app (``RuntimeError`` the second time). Its sub-apps'
    requests are counted too, once: a sub-app with a setup of its own into the same registry
    adds nothing to them (with another registry, each registry counts them once). Call it on a
    sub-app before adding the sub-app to its parent (aiohttp freezes a sub-app's routes then).
    ``path``: where ``GET`` serves the metrics, ``None`` to collect them only (serve them
    yourself, with ``prometheus_client``). ``registry``: where the families are registered
    and what ``path`` serves; ``None`` is prometheus-client's default ``REGISTRY``. In
    multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) the families are registered nowhere
    (their values go to the directory's files) and ``path`` serves ``registry`` if one is
    given (add a ``MultiProcessCollector`` to it yourself), else the sum over all processes.
    See the module docstring for the families and their labels.
    """
    if not isinstance(app, web.Application):
        raise TypeError(f"aiodelay.prometheus.setup() takes a web.Application, got {app!r}")
    if path is not None and not isinstance(path, str):
        raise TypeError(f"path must be a str or None, got {path!r}")
    if path is not None and not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")
    if registry is not None and not isinstance(registry, CollectorRegistry):
        raise TypeError(f"registry must be a prometheus_client.CollectorRegistry, got {registry!r}")
    try:
        installed_on(app)
    except RuntimeError:
        raise RuntimeError(
            "aiodelay.prometheus.setup() needs aiodelay on the app: call aiodelay.setup(app) "
            "first (or add aiodelay.middleware() to its middlewares)"
        ) from None
    if metrics_key in app:
        raise RuntimeError("aiodelay.prometheus.setup() was already called on this app")
    if app.frozen:
        raise RuntimeError("aiodelay.prometheus.setup() must be called before the app starts")
    multiprocess_dir = _multiprocess_dir()
    if app.pre_frozen and (path is not None or multiprocess_dir is not None):
        raise RuntimeError(
            "aiodelay.prometheus.setup() must be called on a sub-app before it is added to "
            "its parent app"
        )
    observer: _Metrics
    if multiprocess_dir is None:
        observer = _Metrics(app, _collector(registry), multiprocess_mode=False)
        flusher = None
    else:
        flusher = _process_flusher()
        observer = _MultiprocessMetrics(app, flusher)
        app.on_cleanup.append(_flush_at_cleanup)
    if path is not None:
        served = registry
        if served is None and multiprocess_dir is None:
            served = prometheus_client.REGISTRY
        resource = app.router.add_get(path, _handler(observer, served, flusher)).resource
        if resource is not None:  # (a route added to the router has its resource)
            observer._skips.add(resource)
    app[metrics_key] = observer
    observer.sink.add(observer)
    add_observer(app, observer)


def _multiprocess_dir() -> str | None:
    """The multiprocess directory if prometheus-client is in multiprocess mode, else None."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # its deprecated lower-case name is not read
    multiprocess_mode = getattr(_values.ValueClass, "_multiprocess", False)
    if not multiprocess_mode:
        if path:
            raise RuntimeError(
                "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported: "
                "set it in the environment before the process starts"
            )
        return None
    if not path or not os.path.isdir(path):
        raise ValueError(f"PROMETHEUS_MULTIPROC_DIR is not set to a directory: {path!r}")
    return path


def _collector(registry: CollectorRegistry | None) -> _Collector:
    """The collector of ``registry`` (None: ``REGISTRY``), registered with its first setup."""
    target = prometheus_client.REGISTRY if registry is None else registry
    collector = _by_registry.get(target)
    if collector is None:
        collector = _Collector()
        target.register(collector)
        _by_registry[target] = collector
    return collector


def _process_flusher() -> _Flusher:
    global _flusher
    if _flusher is None:
        _flusher = _Flusher()
    return _flusher


async def _flush_at_cleanup(app: web.Application) -> None:
    """Write the worker's last counts: the app's requests have all ended."""
    if _flusher is not None:
        _flusher.flush()


def _handler(
    observer: _Metrics, registry: CollectorRegistry | None, flusher: _Flusher | None
) -> Handler:
    """The ``/metrics`` handler: ``registry``, or (None) the sum over all processes."""

    async def metrics(request: web.Request) -> web.Response:
        counts = observer.home
        counts.scraping += 1  # in flight, and not to be seen there
        try:
            if flusher is not None:
                flusher.flush()  # this worker's counts, up to now
            if registry is None:
                served = CollectorRegistry()
                multiprocess.MultiProcessCollector(served)  # type: ignore[no-untyped-call]
            else:
                served = registry
            body = prometheus_client.generate_latest(served)
        finally:
            counts.scraping -= 1
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    return metrics
