"""pytest fixtures that drop real connections, so you can test what your handlers do when the
client leaves.

Loaded automatically once aiodelay is installed (entry point ``pytest11: aiodelay``); it needs
pytest-asyncio, whose event loop it uses. aiohttp's own ``TestServer`` (behind
``aiohttp_client``) forces ``handler_cancellation=True``, so a disconnect test built on it
passes with or without aiodelay. ``aiodelay_server`` starts the app the way production
does, on a real socket, and :meth:`LiveServer.drop` sends a request over another real socket
and drops it at a chosen moment::

    async def test_report_is_cancelled(aiodelay_server: AiodelayServer) -> None:
        server = await aiodelay_server(create_app())
        outcome = await server.drop("GET", "/report")
        assert outcome.cancelled

The client, the server and the result types live in :mod:`aiodelay.testing` and are
re-exported here, like pytest-aiohttp's types, to annotate tests with.
"""

from aiodelay.testing import AiodelayServer, DropHow, DropKind, DropOutcome, LiveServer
from aiodelay.testing._fixture import aiodelay_server  # noqa: F401  (the plugin's fixture)

# The fixture itself is not exported: importing it into a conftest would register it twice.
__all__ = ("AiodelayServer", "DropHow", "DropKind", "DropOutcome", "LiveServer")
