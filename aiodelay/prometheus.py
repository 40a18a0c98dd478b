"""Prometheus metrics of what aiodelay sees: ``aiodelay.prometheus.setup(app)``.

Needs the extra: ``pip install 'aiodelay[prometheus]'`` (the official ``prometheus-client``).
This is the only module of aiodelay that imports ``prometheus_client``; ``import aiodelay``
never does, and an app without :func:`setup` pays nothing for it.

The metric families, fed by an :func:`aiodelay.add_observer` observer:

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
``route="(unmatched)"``. A series appears with its first event.

The ``/metrics`` route serves ``prometheus_client.generate_latest`` (with its content type,
``GET`` and ``HEAD``) and is not counted itself: a scrape would otherwise see itself in flight
and outnumber the requests of a quiet app.

Multiprocess mode (gunicorn and its workers): when ``PROMETHEUS_MULTIPROC_DIR`` is set before
the process starts, prometheus-client keeps each worker's values in files in that directory,
and ``/metrics`` on any worker serves the sum over all of them (a fresh ``CollectorRegistry``
with a ``multiprocess.MultiProcessCollector`` per scrape). The directory must exist and be
empty when the server starts (stale files would be added in, under reused pids too); the
process manager empties it before the start, and gunicorn's ``child_exit`` hook must call
``prometheus_client.multiprocess.mark_process_dead(worker.pid)`` so that a dead worker's
in-flight requests stop counting (its counters stay in the sum, as counters must).

Not promised: requests that never reach aiodelay's middleware are not counted (aiohttp answers
a malformed request or one with too large headers itself, before any middleware). A route of a
custom ``AbstractResource`` is labelled with its ``canonical`` (``python -m aiodelay``'s served
directory is one route, ``/``). In multiprocess mode a scrape reads every worker's files on the
event loop of the worker that serves it.
"""

from __future__ import annotations

import os
import weakref
from typing import Final

import prometheus_client
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client import values as _values

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


class _Families:
    """The four metric families, made once per registry (or once per process in
    multiprocess mode): two apps of one process that report to one registry share them."""

    def __init__(self, registry: CollectorRegistry | None, *, multiprocess_mode: bool) -> None:
        self.requests = Counter(
            "aiodelay_requests",
            "Requests that ended, by route pattern and aiodelay outcome.",
            ("route", "outcome"),
            registry=registry,
        )
        self.disconnects = Counter(
            "aiodelay_disconnects",
            "Requests whose client left before the response was complete, by route and how.",
            ("route", "reason"),
            registry=registry,
        )
        self.in_flight = Gauge(
            "aiodelay_requests_in_flight",
            "Requests whose handler started and has not ended.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.latency = Histogram(
            "aiodelay_cancel_latency_seconds",
            "From aiodelay seeing the client leave to the handler's end.",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        #: The ids of the requests in flight (requests are not hashable): the gauge goes down
        #: once per request that it went up for.
        self.tracked: set[int] = set()
        #: Outside multiprocess mode the gauge is read at scrape time, not kept per request.
        self.live_gauge = multiprocess_mode
        if not multiprocess_mode:
            tracked = self.tracked
            self.in_flight.set_function(lambda: len(tracked))


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_multiprocess_families: _Families | None = None

#: What a label lookup is cached under: the matched resource (None: no route matched) and the
#: outcome or the disconnect's reason.
_Key = tuple["web.AbstractResource | None", str]


class _Metrics:
    """The observer that feeds the families; one per :func:`setup`.

    The labelled children are cached per (resource, outcome): ``Counter.labels()`` validates
    and locks on every call, which would be most of what a request costs here.
    """

    __slots__ = ("_disconnects", "_families", "_requests", "_skip")

    def __init__(self, families: _Families, skip: web.AbstractResource | None) -> None:
        self._families = families
        self._skip = skip  # the /metrics resource
        self._requests: dict[_Key, Counter] = {}
        self._disconnects: dict[_Key, Counter] = {}

    def _resource(self, request: web.BaseRequest) -> web.AbstractResource | None:
        match_info = getattr(request, "match_info", None)  # a web.Request has one
        if match_info is None:
            return None
        resource: web.AbstractResource | None = match_info.route.resource
        return resource  # None for a 404 or 405: aiohttp's system route

    def request_started(self, request: web.BaseRequest) -> None:
        if self._skip is not None and self._resource(request) is self._skip:
            return
        families = self._families
        families.tracked.add(id(request))
        if families.live_gauge:
            families.in_flight.inc()

    def request_lost(self, request: web.BaseRequest, lost: ConnectionLost) -> None:
        pass  # counted when the request ends, with its outcome

    def request_ended(self, request: web.BaseRequest, outcome: Outcome) -> None:
        resource = self._resource(request)
        if resource is not None and resource is self._skip:
            return
        families = self._families
        tracked = families.tracked
        if id(request) in tracked:
            tracked.remove(id(request))
            if families.live_gauge:
                families.in_flight.dec()
        kind = outcome.kind
        child = self._requests.get((resource, kind))
        if child is None:
            child = self._requests[resource, kind] = families.requests.labels(
                _label(resource), kind
            )
        child.inc()
        lost = outcome.lost
        if lost is None:
            return
        reason = lost.reason
        child = self._disconnects.get((resource, reason))
        if child is None:
            child = self._disconnects[resource, reason] = families.disconnects.labels(
                _label(resource), reason
            )
        child.inc()
        if kind != "truncated" and outcome.lost_at is not None:
            families.latency.observe(max(0.0, outcome.ended_at - outcome.lost_at))


def _label(resource: web.AbstractResource | None) -> str:
    """The route label: the resource's pattern, with a sub-app's prefix."""
    return UNMATCHED if resource is None else resource.canonical


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
    requests are counted too. ``path``: where ``GET`` serves the metrics, ``None`` to collect
    them only (serve them yourself, with ``prometheus_client``). ``registry``: where the
    families are registered and what ``path`` serves; ``None`` is prometheus-client's default
    ``REGISTRY``. In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) the families are
    registered nowhere (their values go to the directory's files) and ``path`` serves
    ``registry`` if one is given (add a ``MultiProcessCollector`` to it yourself), else the sum
    over all processes. See the module docstring for the families and their labels.
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
    families = _families(None if multiprocess_dir else registry, multiprocess_dir is not None)
    resource = None
    if path is not None:
        served = registry
        if served is None and multiprocess_dir is None:
            served = prometheus_client.REGISTRY
        resource = app.router.add_get(path, _handler(served)).resource
    observer = _Metrics(families, resource)
    app[metrics_key] = observer
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


def _families(registry: CollectorRegistry | None, multiprocess_mode: bool) -> _Families:
    global _multiprocess_families
    if multiprocess_mode:
        if _multiprocess_families is None:
            _multiprocess_families = _Families(None, multiprocess_mode=True)
        return _multiprocess_families
    target = prometheus_client.REGISTRY if registry is None else registry
    families = _by_registry.get(target)
    if families is None:
        families = _by_registry[target] = _Families(target, multiprocess_mode=False)
    return families


def _handler(registry: CollectorRegistry | None) -> Handler:
    """The ``/metrics`` handler: ``registry``, or (None) the sum over all processes."""

    async def metrics(request: web.Request) -> web.Response:
        if registry is None:
            served = CollectorRegistry()
            multiprocess.MultiProcessCollector(served)  # type: ignore[no-untyped-call]
        else:
            served = registry
        body = prometheus_client.generate_latest(served)
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    return metrics
