"""The hello-world apps that ``instructions.py`` and ``overhead.py`` measure (and
``features.py`` through them), one kind of app each (:func:`make_app`): one copy of each app,
so that instructions and requests/s are counted on the same code.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

if TYPE_CHECKING:
    from aiodelay import ConnectionLost, Outcome

__all__ = ("AIODELAY_KINDS", "APP_KINDS", "TEXT", "make_app")

#: The kinds of app :func:`make_app` builds.
APP_KINDS = ("bare", "empty", "aiodelay", "deadline", "observer", "metrics", "handwritten")
#: The kinds with aiodelay: those that --aiodelay-path serves again with another checkout.
AIODELAY_KINDS = ("aiodelay", "deadline", "observer", "metrics")
#: The body of every app's one response.
TEXT = "Hello, world"


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=TEXT)


@web.middleware
async def passthrough(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)


class NoOpObserver:
    """An observer that does nothing: what being observed costs by itself."""

    def request_started(self, request: web.BaseRequest) -> None:
        pass

    def request_lost(self, request: web.BaseRequest, lost: ConnectionLost) -> None:
        pass

    def request_ended(self, request: web.BaseRequest, outcome: Outcome) -> None:
        pass


def handwritten_metrics(app: web.Application) -> Middleware:
    """The Prometheus HTTP metrics people write by hand, without aiodelay, for ``app``.

    A counter of requests by method, route and status and a histogram of the handler's time
    by route, fed by one middleware (the route is the matched resource's ``canonical``), in a
    ``CollectorRegistry`` of their own served on ``/metrics``.
    """
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Histogram,
        generate_latest,
    )

    registry = CollectorRegistry()
    requests = Counter(
        "http_requests_total",
        "HTTP requests by method, route and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    duration = Histogram(
        "http_request_duration_seconds",
        "Time spent in the handler, by route.",
        ["route"],
        registry=registry,
    )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/metrics", metrics)

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = "(unmatched)" if resource is None else resource.canonical
        status = 500
        started = time.perf_counter()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            duration.labels(route).observe(time.perf_counter() - started)
            requests.labels(request.method, route, str(status)).inc()

    return count


def make_app(kind: str) -> web.Application:
    """The hello-world app of ``kind``: one route, ``GET /``, answering ``TEXT``, and

    - ``bare``: nothing else;
    - ``empty``: one empty pass-through ``@web.middleware``;
    - ``aiodelay``: ``aiodelay.setup(app)``;
    - ``deadline``: ``aiodelay.setup(app, deadline=30)`` (a default deadline no request
      reaches);
    - ``observer``: ``aiodelay.setup(app)`` and ``aiodelay.add_observer(app, obs)``, ``obs``
      an observer whose three methods do nothing;
    - ``metrics``: ``aiodelay.setup(app)`` and ``aiodelay.prometheus.setup(app)``;
    - ``handwritten``: :func:`handwritten_metrics`, without aiodelay.

    Only the aiodelay kinds import aiodelay, only ``metrics`` and ``handwritten``
    prometheus-client.
    """
    if kind not in APP_KINDS:
        raise ValueError(f"unknown kind of app {kind!r}")
    app = web.Application(middlewares=[passthrough] if kind == "empty" else [])
    app.router.add_get("/", hello)
    if kind == "handwritten":
        app.middlewares.append(handwritten_metrics(app))
    if kind in AIODELAY_KINDS:
        import aiodelay

        if kind == "deadline":
            aiodelay.setup(app, deadline=30)
        else:
            aiodelay.setup(app)
        if kind == "observer":
            aiodelay.add_observer(app, NoOpObserver())
        if kind == "metrics":
            from aiodelay import prometheus

            prometheus.setup(app)
    return app
