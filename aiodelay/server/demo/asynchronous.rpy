"""An asynchronous response that always completes: its work runs to the end even if you leave.

``@aiodelay.shielded`` exempts this handler from cancellation. Leave before the three seconds
are up and the work still finishes: the server log says "ran on (shielded)", and the status
page counts it under "shielded, ran on". Stay, and you get the page.
"""

import asyncio

from aiohttp import web

import aiodelay

WORK_SECONDS = 3


@aiodelay.shielded
async def resource(request: web.Request) -> web.Response:
    started = asyncio.get_running_loop().time()
    await asyncio.sleep(WORK_SECONDS)  # the work that must not be cut short
    took = asyncio.get_running_loop().time() - started
    return web.Response(
        text=f"<!DOCTYPE html><title>Done</title><p>The work took {took:.1f} s and completed.</p>"
        '<p><a href="./">Back to the demos</a></p>',
        content_type="text/html",
    )
