"""A live status page: the counters of ``aiodelay.stats(app)``, refreshed every second.

``?json`` gives the counters as JSON; the page polls it (each poll is itself a completed
request, and the one in flight while counting).
"""

import dataclasses

from aiohttp import web

import aiodelay

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>aiodelay status</title>
<style>
body { font-family: sans-serif; max-width: 40em; margin: 2em auto; }
td { padding: .2em 1em; } td.n { text-align: right; font: bold 1.4em monospace; }
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
<p>This page asks the server once a second; each of its requests counts as completed.
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


async def resource(request: web.Request) -> web.Response:
    if "json" in request.query:
        return web.json_response(dataclasses.asdict(aiodelay.stats(request.app)))
    return web.Response(text=PAGE, content_type="text/html")
