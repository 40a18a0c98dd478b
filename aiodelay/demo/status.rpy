"""A live status page: the counters of ``aiodelay.stats(app)``, refreshed every second.

``?json`` gives the counters as JSON; the page polls it once a second.  The numbers leave out
this page's own requests (the page itself and each of its polls, counted in ``"left_out"``):
otherwise "in flight" would never be 0 (the poll asking is in flight) and "completed" would
rise every second.  Only requests of this page that ended are left out of "completed"; one
whose client left before it was sent still counts as "disconnected", which it was.
"""

import dataclasses

from aiohttp import web

import aiodelay

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>aiodelay status</title>
<style>
body { font-family: sans-serif; max-width: 40em; margin: 2em auto; }
td { padding: .2em 1em; }
/* Wider than six digits, so the labels stay put while the numbers grow. */
td.n { width: 7ch; text-align: right; font: bold 1.4em monospace; }
</style></head>
<body>
<h1>aiodelay status</h1>
<table>
<tr><td class="n" id="in_flight">-</td><td>in flight: handlers running now</td></tr>
<tr><td class="n" id="completed">-</td><td>completed: the client stayed to the end</td></tr>
<tr><td class="n" id="disconnected">-</td><td>disconnected: the client left first</td></tr>
<tr><td class="n" id="cancelled">-</td><td>cancelled: of those, work stopped</td></tr>
<tr><td class="n" id="shielded_ran_on">-</td><td>shielded, ran on: of those, work finished</td></tr>
<tr><td class="n" id="truncated">-</td><td>truncated: of those, left mid-response</td></tr>
<tr><td class="n" id="failed">-</td><td>failed: of those, error or shutdown</td></tr>
</table>
<p id="state">connecting...</p>
<p>This page asks the server once a second. The numbers leave out its own requests
(<span id="left_out">-</span> so far: the page and its polls).
<a href="./">Back to the demos</a></p>
<script>
async function refresh() {
  try {
    const response = await fetch("status.rpy?json", {cache: "no-store"});
    const stats = await response.json();
    for (const [name, value] of Object.entries(stats)) {
      const cell = document.getElementById(name);
      if (cell) cell.textContent = value;
    }
    document.getElementById("state").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    document.getElementById("state").textContent = "server unreachable: " + error;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body></html>
"""

# This page's own requests, in flight and completed.  Kept in the script, so an edit of this
# file (which reloads it) starts them again from 0.
own = {"in_flight": 0, "completed": 0}


def _ended(finished):
    own["in_flight"] -= 1
    if not finished.cancelled() and finished.exception() is None:
        own["completed"] += 1


async def resource(request: web.Request) -> web.Response:
    own["in_flight"] += 1
    aiodelay.notify_finish(request).add_done_callback(_ended)
    if "json" in request.query:
        counters = dataclasses.asdict(aiodelay.stats(request.app))
        for name, count in own.items():
            counters[name] -= count
        counters["left_out"] = own["in_flight"] + own["completed"]
        return web.json_response(counters)
    return web.Response(text=PAGE, content_type="text/html")
