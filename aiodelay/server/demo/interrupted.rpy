"""Twisted Web's "Interrupted Responses" example, ported line by line.

The page takes five seconds. Leave before that (press Esc) and the delayed render is
cancelled: no page content, and one line in the server log ("... interrupted by FIN after
1.204s: cancelled").

Under ``python -m aiodelay --policy shield`` the render runs on to its end instead: aiodelay
holds the errback back until the work is done, the request stays in flight for the five
seconds, and the log says "... interrupted by FIN after 1.204s: ran on (shielded), ended after
5.002s".

    python -m aiodelay [--policy shield]
    open http://127.0.0.1:8080/interrupted.rpy
"""

import asyncio

from aiodelay import NOT_DONE_YET, Resource


class DelayedResource(Resource):
    def _delayed_render(self, request):
        request.write(b"<html><body>Sorry to keep you waiting.</body></html>")
        request.finish()

    def _response_failed(self, err, call):
        call.cancel()

    def render_GET(self, request):
        call = asyncio.get_running_loop().call_later(5, self._delayed_render, request)
        request.on_connection_lost(self._response_failed, call)
        return NOT_DONE_YET


resource = DelayedResource()
