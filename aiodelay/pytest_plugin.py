"""pytest fixtures that drop real connections, so you can test what your handlers do when the
client leaves.

Loaded automatically once aiodelay is installed (entry point ``pytest11: aiodelay``): in every
pytest run of every project that has aiodelay among its dependencies, whatever it tests with
(pytest-asyncio, anyio, trio, plain pytest). So this module imports nothing beyond pytest and
aiodelay's own dependencies, and loading it cannot fail for want of a test library.

The ``aiodelay_server`` fixture runs on pytest-asyncio's event loop (``pip install
'aiodelay[pytest]'`` brings it). It is registered at ``pytest_configure``, once pytest-asyncio's
plugin is known to be active; without it, pytest runs as if aiodelay were not there, and only
a test that asks for ``aiodelay_server`` fails, with one line saying what is missing.

aiohttp's own ``TestServer`` (behind ``aiohttp_client``) forces ``handler_cancellation=True``,
so a disconnect test built on it passes with or without aiodelay. ``aiodelay_server`` starts
the app the way production does, on a real socket, and :meth:`LiveServer.drop` sends a
request over another real socket and drops it at a chosen moment::

    async def test_report_is_cancelled(aiodelay_server: AiodelayServer) -> None:
        server = await aiodelay_server(create_app())
        outcome = await server.drop("GET", "/report")
        assert outcome.cancelled

The client, the server and the result types live in :mod:`aiodelay.testing` and are
re-exported here, like pytest-aiohttp's types, to annotate tests with.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import NoReturn

import pytest

from aiodelay.testing import AiodelayServer, DropHow, DropKind, DropOutcome, LiveServer, RawClient

# The fixture itself is not exported: importing it into a conftest would register it twice.
__all__ = ("AiodelayServer", "DropHow", "DropKind", "DropOutcome", "LiveServer", "RawClient")

_PLUGIN_NAME = "aiodelay.fixtures"


@pytest.hookimpl(trylast=True)  # after any plugin that registers pytest-asyncio itself
def pytest_configure(config: pytest.Config) -> None:
    asyncio_plugin = sys.modules.get("pytest_asyncio.plugin")
    if asyncio_plugin is not None and config.pluginmanager.is_registered(asyncio_plugin):
        from aiodelay.testing import _fixture

        config.pluginmanager.register(_fixture, _PLUGIN_NAME)
    else:
        config.pluginmanager.register(_Unavailable(_missing()), _PLUGIN_NAME)


def _missing() -> str:
    """One line: why ``aiodelay_server`` cannot run, and what to do about it."""
    try:
        installed = importlib.util.find_spec("pytest_asyncio") is not None
    except (ImportError, ValueError):  # a broken or half-removed installation
        installed = False
    if installed:
        return (
            "aiodelay_server needs pytest-asyncio's plugin, which is installed but not "
            "loaded (disabled with -p no:asyncio?)"
        )
    return (
        "aiodelay_server needs pytest-asyncio, which is not installed: "
        "pip install 'aiodelay[pytest]'"
    )


class _Unavailable:
    """Stands in for the fixtures when pytest-asyncio is not active."""

    def __init__(self, why: str) -> None:
        self.why = why

    @pytest.fixture
    def aiodelay_server(self) -> NoReturn:
        """Unavailable: needs pytest-asyncio (pip install 'aiodelay[pytest]')."""
        pytest.fail(self.why, pytrace=False)
