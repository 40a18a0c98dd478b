"""The epoll watch (``hangups.py``) in a server out of file descriptors.

The server runs in a subprocess with a low ``RLIMIT_NOFILE`` (set there, so the test process
keeps its own), and says on its output what its observer and its loggers heard. Both tests
fail if aiodelay makes its epoll only at the first request with a body and gives up when
that fails: the drops behind the unread bodies are never seen, and nothing is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import select
import socket
import struct
import sys
import termios
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import PAUSING_UPLOAD

pytestmark = pytest.mark.skipif(
    not hasattr(select, "EPOLLRDHUP"), reason="the epoll watch is Linux's"
)

# The server: an upload handler that never reads its body (it waits until it is cancelled),
# an observer that prints each start and end, and each client that left with whether reading
# was paused then (the tests check that asyncio could not have seen it), aiodelay's and
# asyncio's log on stdout (each of asyncio's lines once: a flood of them would fill the pipe
# and stall the server).
# argv: the descriptor limit, then "starve" to start the app with no descriptor left (they
# are given back before the server listens).
SERVER = textwrap.dedent(
    """
    import asyncio, logging, resource, sys
    from aiohttp import web
    import aiodelay

    limit, starve = int(sys.argv[1]), sys.argv[2] == "starve"
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    logging.basicConfig(
        stream=sys.stdout, level=logging.WARNING, format="log %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("aiodelay").setLevel(logging.INFO)
    said = set()

    def once(record):  # asyncio logs each failed accept, with its traceback
        record.exc_info = record.exc_text = None
        new = record.getMessage() not in said
        said.add(record.getMessage())
        return new

    logging.getLogger("asyncio").addFilter(once)
    sys.stdout.reconfigure(line_buffering=True)

    class Observer:
        def request_started(self, request):
            print("started", request.path)

        def request_lost(self, request, lost):
            reading = request.transport is not None and request.transport.is_reading()
            print("lost", lost.reason, "reading" if reading else "paused")

        def request_ended(self, request, outcome):
            print("ended", outcome.kind, outcome.lost and outcome.lost.reason)

    async def upload(request):
        await asyncio.Event().wait()

    async def main():
        app = web.Application()
        aiodelay.setup(app)
        aiodelay.add_observer(app, Observer())
        app.router.add_post("/upload", upload)
        runner = web.AppRunner(app, handler_cancellation=False, access_log=None)
        spare = []
        while starve:
            try:
                spare.append(open("/dev/null"))
            except OSError:
                break
        await runner.setup()
        for each in spare:
            each.close()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print("port", runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@dataclass
class Starved:
    proc: asyncio.subprocess.Process
    port: int = 0
    lines: list[str] = field(default_factory=list)

    async def line(self, wanted: str, timeout: float = 10) -> str:
        """The next line of the server's output that starts with ``wanted`` (earlier lines
        are kept in ``lines``)."""
        assert self.proc.stdout is not None

        async def read() -> str:
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"the server ended before {wanted!r}: {self.tail()}")
                text = raw.decode().rstrip("\n")
                self.lines.append(text)
                if text.startswith(wanted):
                    return text

        try:
            return await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {wanted!r} in {timeout}s: {self.tail()}") from None

    def tail(self) -> list[str]:
        """The last lines of the output."""
        return self.lines[-20:]


@contextlib.asynccontextmanager
async def starved_server(limit: int, mode: str) -> AsyncIterator[Starved]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER,
        str(limit),
        mode,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    server = Starved(proc)
    try:
        server.port = int((await server.line("port", timeout=60)).split()[1])
        yield server
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _upload_head() -> bytes:
    return b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 20000000\r\n\r\n"


def _drop(sock: socket.socket, how: str) -> None:
    if how == "RST":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# Once this body has arrived, reading is paused, so asyncio cannot see a FIN behind it: only
# the epoll watch can (the servers say "paused" when they see the client leave).
_BODY = b"x" * PAUSING_UPLOAD


async def _upload(sock: socket.socket) -> None:
    """Send the upload's head and :data:`_BODY`, and return once the server's kernel has
    acknowledged every byte (the socket's count of bytes not sent or not acknowledged,
    ``TIOCOUTQ``, is 0): from then on a FIN is not held behind data. asyncio has no wait for
    that (the kernel's only report of it, an acknowledgement timestamp on the socket's error
    queue, is far more machinery than this): it is asked every 10 ms, for up to 10 s."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, _upload_head() + _BODY)
    deadline = loop.time() + 10
    while left := _unacknowledged(sock):
        if loop.time() > deadline:
            raise AssertionError(f"the server's kernel left {left} bytes unacknowledged")
        await asyncio.sleep(0.01)


def _unacknowledged(sock: socket.socket) -> int:
    count: int = struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]
    return count


async def test_drops_behind_unread_bodies_are_seen_when_descriptors_ran_out() -> None:
    """The case as it was found: under a limit of 64 descriptors, 80 idle connections use them all
    up; then two of the accepted ones start a 20 MB upload, send a little more of it than
    aiohttp buffers (the handler reads none of it), and leave, one by FIN, one by RST. Both
    are seen, each with its reason, while the server is still out of descriptors."""
    async with starved_server(64, "plain") as server:
        socks: list[socket.socket] = []
        try:
            for _ in range(80):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.setblocking(False)
                socks.append(sock)
            # asyncio says so when accept() fails for want of a descriptor.
            await server.line("log asyncio ERROR socket.accept() out of system resource")
            uploading = socks[:2]  # connected first: accepted first
            for sock in uploading:
                await _upload(sock)
                await server.line("started /upload")
            _drop(uploading[0], "FIN")
            _drop(uploading[1], "RST")
            ends = {await server.line("ended"), await server.line("ended")}
        finally:
            for sock in socks:
                sock.close()
    assert ends == {"ended cancelled FIN", "ended cancelled RST"}, server.tail()
    lost = sorted(line for line in server.lines if line.startswith("lost"))
    assert lost == ["lost FIN paused", "lost RST paused"], server.tail()
    assert not [line for line in server.lines if line.startswith("log aiodelay WARNING")]


async def test_no_descriptor_at_startup_is_logged_once_and_retried() -> None:
    """The app starts with no descriptor to spare: one WARNING says that detection behind
    unread bodies is degraded. Descriptors come back before the server listens; the first
    upload makes the epoll after all (one line says so), and its client's FIN is seen."""
    async with starved_server(64, "starve") as server:
        warned = [line for line in server.lines if line.startswith("log aiodelay WARNING")]
        assert len(warned) == 1, server.tail()
        assert "cannot see clients leave behind unread request bodies" in warned[0]
        assert "Too many open files" in warned[0]
        sock = socket.create_connection(("127.0.0.1", server.port))
        try:
            sock.setblocking(False)
            await _upload(sock)
            await server.line("started /upload")
            await server.line("log aiodelay INFO aiodelay sees clients leave")
            _drop(sock, "FIN")
            assert await server.line("ended") == "ended cancelled FIN"
            assert [line for line in server.lines if line.startswith("lost")] == [
                "lost FIN paused"
            ], server.tail()
        finally:
            sock.close()
    assert len([line for line in server.lines if line.startswith("log aiodelay WARNING")]) == 1
