"""A stream that writes a line every second until you leave.

Each line is written from a request-owned timer (``request.call_later``): when you close the
tab, aiodelay cancels the pending timer and the stream stops; the log says "cancelled".
A stream has no end to run on to, so it is marked ``@aiodelay.cancellable``: it stops when you
leave also under ``python -m aiodelay --policy shield``.
"""

import time

import aiodelay
from aiodelay import NOT_DONE_YET, Resource


@aiodelay.cancellable
class Ticker(Resource):
    def _tick(self, request, count):
        request.write(f"{count:4d}  {time.strftime('%H:%M:%S')}  still here\n".encode())
        request.call_later(1, self._tick, request, count + 1)

    def render_GET(self, request):
        request.set_header("Content-Type", "text/plain; charset=utf-8")
        # Without sniffing, a browser shows each line as it arrives.
        request.set_header("X-Content-Type-Options", "nosniff")
        request.write(b"A line every second until you leave (close the tab, or press Esc).\n\n")
        self._tick(request, 1)
        return NOT_DONE_YET


resource = Ticker()
