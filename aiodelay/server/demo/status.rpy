"""A live status page: the counters of ``aiodelay.stats(app)``, the last interrupted requests
and a chart of interruptions per second over the last five minutes, refreshed every second.

``?json`` gives it all as JSON; the page polls it once a second.  The numbers leave out this
page's own requests (the page itself and each of its polls, counted in ``"left_out"``):
otherwise "in flight" would never be 0 (the poll asking is in flight) and "completed" would
rise every second.  Only requests of this page that ended are left out of "completed"; one
whose client left before it was sent still counts as "disconnected", which it was, and is
listed with the other interrupted requests.

The JSON view also has ``"interrupted"``: the last 20 interrupted requests, the newest first,
each with ``time`` (the server's local time of day), ``at`` (Unix time), ``method``, ``path``,
``reason`` (how the client left), ``after`` (seconds from the request's start to its client
leaving), ``outcome`` (what its handler did: cancelled, ran_on, truncated, failed) and
``client``; ``"per_second"``: the interruptions in each of the last 300 seconds, the oldest
first; ``"chart"``: the page's chart of them, an SVG document.  The history is the one
``python -m aiodelay`` keeps of its app (``aiodelay.server.history_of``).  The page needs no script
library: the chart is drawn here, as inline SVG.
"""

import dataclasses
import html

from aiohttp import web

import aiodelay
from aiodelay.server import history_of

COLUMNS = ("time", "method", "path", "reason", "after", "outcome", "client")

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>aiodelay status</title>
<style>
body { font-family: sans-serif; max-width: 56em; margin: 2em auto; padding: 0 1em; color: #222; }
table.counters td { padding: .2em 1em; }
/* Wider than six digits, so the labels stay put while the numbers grow. */
td.n { width: 7ch; text-align: right; font: bold 1.4em monospace; }
h2 { font-size: 1.15em; margin: 1.8em 0 .4em; }
h2 small { font-weight: normal; color: #555; }
#chart svg { display: block; width: 100%; height: auto; }
table.rows { border-collapse: collapse; width: 100%; font-size: .9em; }
table.rows th, table.rows td { padding: .3em .6em; text-align: left; white-space: nowrap; }
table.rows th { border-bottom: 2px solid #888; }
table.rows td { border-bottom: 1px solid #ddd; }
/* "monospace" twice: the browser's default size for text, not its smaller one for code. */
.rows td.time, .rows td.path, .rows td.after, .rows td.client { font-family: monospace, monospace; }
table.rows .after { text-align: right; }
table.rows td.path { max-width: 24em; overflow: hidden; text-overflow: ellipsis; }
table.rows td.none { color: #555; font-style: italic; }
</style></head>
<body>
<h1>aiodelay status</h1>
<table class="counters">
<tr><td class="n" id="in_flight">-</td><td>in flight: handlers running now</td></tr>
<tr><td class="n" id="completed">-</td><td>completed: the client stayed to the end</td></tr>
<tr><td class="n" id="disconnected">-</td><td>disconnected: the client left first</td></tr>
<tr><td class="n" id="cancelled">-</td><td>cancelled: of those, work stopped</td></tr>
<tr><td class="n" id="shielded_ran_on">-</td><td>shielded, ran on: of those, work finished</td></tr>
<tr><td class="n" id="truncated">-</td><td>truncated: of those, left mid-response</td></tr>
<tr><td class="n" id="failed">-</td><td>failed: of those, error or shutdown</td></tr>
<tr><td class="n" id="timed_out">-</td><td>timed out: the deadline passed first</td></tr>
<tr><td class="n" id="budgets_ignored">-</td><td>budgets ignored: malformed budget headers</td></tr>
</table>
<h2>Interruptions per second, last 5 minutes
<small>(<span id="total"><!--total--></span> in all)</small></h2>
<div id="chart"><!--chart--></div>
<h2>Last 20 interrupted requests <small>(newest first)</small></h2>
<table class="rows">
<thead><tr><th class="time">time</th><th>method</th><th class="path">path</th><th>reason</th>
<th class="after">client left after</th><th>outcome</th><th class="client">client</th></tr></thead>
<tbody id="rows"><!--rows--></tbody>
</table>
<p id="state">connecting...</p>
<p>This page asks the server once a second. The numbers leave out its own requests
(<span id="left_out">-</span> so far: the page and its polls).
<a href="./">Back to the demos</a></p>
<script>
const COUNTERS = ["in_flight", "completed", "disconnected", "cancelled", "shielded_ran_on",
                  "truncated", "failed", "timed_out", "budgets_ignored", "left_out"];
const COLUMNS = ["time", "method", "path", "reason", "after", "outcome", "client"];
// Text only (textContent), never markup: a path is whatever the client sent.
function row(item) {
  const tr = document.createElement("tr");
  for (const name of COLUMNS) {
    const td = tr.appendChild(document.createElement("td"));
    td.className = name;
    const value = item[name];
    if (name === "after") td.textContent = value.toFixed(3) + " s";
    else if (name === "outcome") td.textContent = value.replace("_", " ");
    else td.textContent = value === null ? "-" : value;
    if (name === "path") td.title = value;
  }
  return tr;
}
async function refresh() {
  try {
    const response = await fetch("status.rpy?json", {cache: "no-store"});
    const stats = await response.json();
    for (const name of COUNTERS) document.getElementById(name).textContent = stats[name];
    document.getElementById("total").textContent = stats.per_second.reduce((a, b) => a + b, 0);
    document.getElementById("chart").innerHTML = stats.chart;  // drawn by the server
    if (stats.interrupted.length) {
      document.getElementById("rows").replaceChildren(...stats.interrupted.map(row));
    }
    // hh:mm:ss, like the times of the table (the server's clock there, the browser's here)
    const now = new Date().toTimeString().slice(0, 8);
    document.getElementById("state").textContent = "updated " + now;
  } catch (error) {
    document.getElementById("state").textContent = "server unreachable: " + error;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body></html>
"""

NO_ROWS = '<tr><td class="none" colspan="7">No interrupted requests yet.</td></tr>'

# The chart's size (SVG user units, scaled to the page's width) and its plot area's margins.
WIDTH, HEIGHT = 720, 130
LEFT, RIGHT, TOP, BOTTOM = 40, 12, 14, 26


def _scale(peak):
    """The top of the y axis: 1, 2, 5, 10, 20, 50, ... at least ``peak``."""
    top = 1
    while True:
        for step in (1, 2, 5):
            if top * step >= peak:
                return top * step
        top *= 10


def chart(per_second):
    """An SVG bar chart of ``per_second`` (the oldest second first, now last)."""
    seconds = len(per_second)
    top = _scale(max(per_second, default=0))
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    base = TOP + plot_height
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="interruptions per second over the last {seconds} seconds" '
        'font-family="sans-serif" font-size="12" fill="#444">'
    ]
    marks = (0, top // 2, top) if top % 2 == 0 else (0, top)
    for value in marks:  # the scale: gridlines with their value
        y = base - plot_height * value / top
        stroke = "#888" if value == 0 else "#ddd"
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="{stroke}"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value}</text>'
        )
    for ago in range(0, seconds + 1, 60):  # the time axis: a tick a minute
        x = LEFT + plot_width * (seconds - ago) / seconds
        label = "now" if ago == 0 else f"\u2212{ago // 60} min"
        anchor = "end" if ago == 0 else "middle"
        out.append(
            f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#888"/>'
            f'<text x="{x:.1f}" y="{base + 17}" text-anchor="{anchor}">{label}</text>'
        )
    width = plot_width / seconds
    for index, count in enumerate(per_second):
        if count:
            height = plot_height * min(count, top) / top
            out.append(
                f'<rect x="{LEFT + index * width:.1f}" y="{base - height:.1f}" '
                f'width="{max(width - 0.4, 1):.1f}" height="{height:.1f}" fill="#c0392b">'
                f"<title>{count}</title></rect>"
            )
    out.append("</svg>")
    return "".join(out)


def rows(interrupted):
    """The table rows of ``interrupted`` (``Interruption`` objects), escaped for HTML."""
    if not interrupted:
        return NO_ROWS
    lines = []
    for item in interrupted:
        shown = {
            "time": item.time_of_day,
            "method": item.method,
            "path": item.path,
            "reason": item.reason,
            "after": f"{item.after:.3f} s",
            "outcome": item.outcome.replace("_", " "),
            "client": item.client or "-",
        }
        cells = [
            f'<td class="{name}"'
            + (f' title="{html.escape(shown[name])}"' if name == "path" else "")
            + f">{html.escape(shown[name])}</td>"
            for name in COLUMNS
        ]
        lines.append(f"<tr>{''.join(cells)}</tr>")
    return "\n".join(lines)


# This page's own requests, in flight and completed.  Kept in the script, so an edit of this
# file (which reloads it) starts them again from 0.
# This page's own requests: the notify_finish futures of those not yet seen ended, and how
# many ended complete. A future is done at the moment aiodelay counts its request (its
# callbacks come later): looking at done() keeps the two in step for every poll. Kept in the
# script, so an edit of this file (which reloads it) starts them again from 0.
own = {"pending": set(), "completed": 0}


def _own_counts():
    pending = own["pending"]
    for finished in [future for future in pending if future.done()]:
        pending.discard(finished)
        if not finished.cancelled() and finished.exception() is None:
            own["completed"] += 1
    return {"in_flight": len(pending), "completed": own["completed"]}


async def resource(request: web.Request) -> web.Response:
    own["pending"].add(aiodelay.notify_finish(request))
    history = history_of(request.app)
    interrupted = history.rows()
    per_second = history.per_second()
    if "json" in request.query:
        counters = dataclasses.asdict(aiodelay.stats(request.app))
        mine = _own_counts()
        for name, count in mine.items():
            counters[name] -= count
        counters["left_out"] = mine["in_flight"] + mine["completed"]
        counters["interrupted"] = [item.as_json() for item in interrupted]
        counters["per_second"] = per_second
        counters["chart"] = chart(per_second)
        return web.json_response(counters)
    page = (
        PAGE.replace("<!--total-->", str(sum(per_second)))
        .replace("<!--chart-->", chart(per_second))
        .replace("<!--rows-->", rows(interrupted))
    )
    return web.Response(text=page, content_type="text/html")
