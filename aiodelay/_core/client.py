"""Which client a request came from, as the app itself trusts it.

Behind a reverse proxy ``request.remote`` is the proxy. aiohttp apps trust a proxy's
``X-Forwarded-For`` / ``Forwarded`` headers through aiohttp-remotes, whose middlewares hand the
handler a clone of the request with the client's address. aiodelay's middleware runs outside
them and sees the original, so for the requests it records (the INFO line, observers) it asks
those middlewares what they make of the request: each of aiohttp-remotes' middlewares is run
once more on the request, with a handler that only takes the clone. Nothing else is run, and
nothing at all on the hot path of a request that completes unobserved.

Not promised: other middlewares that rewrite ``remote`` are not consulted (only
aiohttp-remotes', whose work is a pure function of the headers); one that would refuse the
request (``XForwardedStrict`` and an untrusted proxy) leaves ``request.remote``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

__all__ = ("remotes_on_the_way", "trusted_remote")

_REMOTES = "aiohttp_remotes"


def remotes_on_the_way(apps: tuple[web.Application, ...]) -> tuple[Any, ...]:
    """The aiohttp-remotes middlewares of ``apps`` (a route's way), outermost first."""
    return tuple(
        middleware
        for app in apps
        for middleware in app.middlewares
        if type(getattr(middleware, "__self__", None)).__module__.startswith(_REMOTES)
    )


def trusted_remote(request: web.BaseRequest, remotes: tuple[Any, ...]) -> str | None:
    """The client address that the request's apps trust: ``request.remote`` as seen through
    ``remotes``, the aiohttp-remotes middlewares on its way (:func:`remotes_on_the_way`)."""
    current: web.BaseRequest = request
    for middleware in remotes:
        current = _through(middleware, current)
    return current.remote


def _through(middleware: Any, request: web.BaseRequest) -> web.BaseRequest:
    """The request that ``middleware`` hands on to its handler (``request`` if none)."""
    seen: list[web.BaseRequest] = []

    async def take(handed: web.BaseRequest) -> web.StreamResponse:
        seen.append(handed)
        return web.Response()

    step = middleware(request, take)
    try:
        step.send(None)
    except StopIteration:
        pass
    except Exception:  # it refuses the request (an untrusted proxy): the app answers 400
        return request
    else:
        step.close()  # it waits for something: not a rewrite of the headers, leave it
        return request
    return seen[-1] if seen else request
