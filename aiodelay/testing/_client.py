"""The raw client: one real TCP (or TLS) connection to a :class:`LiveServer`, written and
dropped by hand, for tests that need more control over the wire than :meth:`LiveServer.drop`
gives (keep-alive, pipelining, a half-read response, TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from asyncio.trsock import TransportSocket
from dataclasses import dataclass, field

from ._outcome import DropHow

HOST = "127.0.0.1"


def reset_on_close(sock: socket.socket | TransportSocket) -> None:
    """Make the socket's close send an RST instead of a FIN (``SO_LINGER`` on, 0 s): how
    both clients leave by ``"RST"``."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass
class RawClient:
    """One real TCP (or TLS) connection to ``127.0.0.1``, written and dropped by hand.

    ``reader`` and ``writer`` are asyncio's streams of the connection, for whatever the
    methods below do not cover. Made by :meth:`LiveServer.connect` (closed when the test
    ends) or by :meth:`connect` (closed by whoever made it).
    """

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: What :meth:`read_until` has read so far.
    received: bytearray = field(default_factory=bytearray)

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None = None) -> RawClient:
        """Open a connection to ``127.0.0.1:port`` (TLS with the client context ``tls``)."""
        reader, writer = await asyncio.open_connection(HOST, port, ssl=tls)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def get(self, path: str = "/", *, close: bool = False) -> None:
        """Send ``GET path`` (with ``Connection: close`` if ``close``)."""
        conn = b"Connection: close\r\n" if close else b""
        await self.send(b"GET %s HTTP/1.1\r\nHost: test\r\n%s\r\n" % (path.encode(), conn))

    async def read_response(self) -> tuple[int, bytes]:
        """Read one complete ``Content-Length`` response: (status, body).

        Not promised: chunked responses (read them with ``reader`` or :meth:`read_until`).
        """
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return status, body

    async def read_until(self, marker: bytes) -> bytes:
        """Read until ``marker`` has arrived; all received so far (``received``).
        ``ConnectionError`` if the server closes the connection first."""
        while marker not in self.received:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError(f"closed before {marker!r} arrived")
            self.received += chunk
        return bytes(self.received)

    def drop(self, how: DropHow) -> None:
        """Leave: a FIN (orderly close), an RST (``SO_LINGER`` 0, then close), or a
        half-close (``shutdown(SHUT_WR)``: a FIN, while still reading).

        Closing a socket that has unread data sends an RST, not a FIN (TCP's rule): to send a
        FIN while the server is still writing, half-close.
        """
        if how == "half-close":
            self.writer.write_eof()
        elif how == "RST":
            reset_on_close(self.writer.get_extra_info("socket"))
            # With TLS, close the socket right away so no close_notify goes out first.
            self.writer.transport.abort()
        elif how == "FIN":
            self.writer.close()
        else:
            raise ValueError(f"how must be 'FIN', 'RST' or 'half-close', got {how!r}")

    async def aclose(self) -> None:
        """Close the connection (a FIN) and wait until it is closed."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()
