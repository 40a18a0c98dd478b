"""The ``aiodelay_server`` fixture on pytest-asyncio's event loop.

Imported only by :func:`aiodelay.pytest_plugin.pytest_configure`, once it has seen that
pytest-asyncio's plugin is active: importing pytest-asyncio from a plugin that every pytest
run loads would break the runs of projects that do not use it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from ._server import AiodelayServer, live_servers


@pytest_asyncio.fixture
async def aiodelay_server() -> AsyncIterator[AiodelayServer]:
    """Factory: ``await aiodelay_server(app)`` serves ``app`` and returns a :class:`LiveServer`.

    Served like production: ``web.AppRunner(app, handler_cancellation=False, **runner_kwargs)``
    (pass ``handler_cancellation=True`` to test that setting) on a free port of ``127.0.0.1``.
    ``aiodelay.setup(app)`` is applied if aiodelay is not installed on ``app`` yet; to test
    another policy, call ``aiodelay.setup(app, policy=...)`` yourself first, and to serve the
    app exactly as it is (a control without aiodelay), pass ``setup_aiodelay=False``.
    ``ssl_context`` (a server-side ``ssl.SSLContext``) serves over TLS, for
    :meth:`LiveServer.connect` with a client context that trusts it.
    ``shutdown_timeout`` is how long teardown lets running handlers finish before aiohttp
    cancels them (aiohttp's own default of 60 s would stall a test that left one running).
    Servers are closed in reverse order when the test ends.
    """
    async with live_servers() as start:
        yield start
