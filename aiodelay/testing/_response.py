"""The response side of :meth:`LiveServer.drop`'s client: what the client received before
it left, counted as the bytes arrive."""

from __future__ import annotations

from multidict import CIMultiDict


class ResponseReader:
    """Just enough HTTP/1.1 response parsing to count body bytes as they arrive:
    ``Content-Length``, ``chunked`` (extensions and trailers ignored), or until close."""

    def __init__(self, method: str) -> None:
        self._no_body = method.upper() == "HEAD"
        self._buf = bytearray()
        self.status: int | None = None
        self.body = bytearray()
        self.done = False  # the whole response arrived
        self.eof = False  # the server closed its side (or reset)
        self.error: str | None = None
        self._left: int | None = None  # Content-Length still to come; None: until close
        self._chunked = False
        self._chunk: int | None = None  # chunk bytes still to come, -1: its CRLF, None: size

    def feed(self, data: bytes) -> None:
        if not data:
            self.eof = True
            if self.status is not None and self._left is None and not self._chunked:
                self.done = True
            return
        self._buf += data
        try:
            while not self.done and self._step():
                pass
        except ValueError as exc:  # not HTTP/1.1 as we know it: stop reading, say why
            self.error = f"malformed response: {exc}"
            self.eof = True

    def _step(self) -> bool:
        if self.status is None:
            return self._parse_head()
        if not self._chunked:
            take = len(self._buf) if self._left is None else min(self._left, len(self._buf))
            self.body += self._buf[:take]
            del self._buf[:take]
            if self._left is not None:
                self._left -= take
                self.done = self._left == 0
            return False
        if self._chunk is None:
            end = self._buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(self._buf[:end]).split(b";")[0], 16)
            del self._buf[: end + 2]
            self._chunk = size
            self.done = size == 0
            return True
        if self._chunk == -1:
            if len(self._buf) < 2:
                return False
            del self._buf[:2]
            self._chunk = None
            return True
        take = min(self._chunk, len(self._buf))
        self.body += self._buf[:take]
        del self._buf[:take]
        self._chunk -= take
        if self._chunk:
            return False
        self._chunk = -1
        return True

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        if 100 <= status < 200:
            return True  # an interim response (100 Continue): the real one follows
        self.status = status
        fields = CIMultiDict(
            (name, value.strip()) for name, _, value in (line.partition(":") for line in lines[1:])
        )
        if self._no_body or status in (204, 304):
            self.done = True
        elif "chunked" in fields.get("Transfer-Encoding", "").lower():
            self._chunked = True
        elif "Content-Length" in fields:
            self._left = int(fields["Content-Length"].strip())
            self.done = self._left == 0
        return True
