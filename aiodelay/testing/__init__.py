"""Testing what a handler does when its client leaves: a live server observed by aiodelay and
a client that drops its connection at a chosen moment.

The ``aiodelay_server`` pytest fixture (:mod:`aiodelay.pytest_plugin`, loaded by itself once
aiodelay is installed) is the way in; these are the types it hands out, to annotate tests
with. They need pytest (a wait that runs out fails the test with ``pytest.fail``); the fixture
also needs pytest-asyncio, whose event loop it runs on: ``pip install 'aiodelay[pytest]'``.
"""

from ._client import RawClient
from ._outcome import DropHow, DropKind, DropOutcome
from ._server import AiodelayServer, LiveServer

__all__ = ("AiodelayServer", "DropHow", "DropKind", "DropOutcome", "LiveServer", "RawClient")
