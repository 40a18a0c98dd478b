"""Token-by-token streaming, the shape of an LLM response, as server-sent events.

``GET /`` is a page that opens an ``EventSource`` on ``GET /tokens`` and shows the tokens as
they come. The handler of ``/tokens`` pulls each token from a slow async generator (a sleep
stands in for the model computing the next token) and sends it with aiohttp-sse. When the tab
closes, the browser closes the connection; aiodelay sees it and cancels the handler, and the
cancellation reaches the generator where it waits for the next token: the generation stops
there, not at the next write, and no token is computed for nobody.

Each generation is recorded in ``app[GENERATIONS]`` (how many tokens it produced, of how
many, and how it stopped), which the app logs and the test reads.

Run it: ``python examples/stream/app.py [--port PORT]`` (needs ``pip install aiohttp-sse``),
open http://127.0.0.1:8080/ and close the tab before the end: the log says after how many tokens
the generation stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp_sse import sse_response

import aiodelay

__all__ = ("GENERATIONS", "Generation", "create_app", "generate", "main")

TEXT = "Once upon a time a client left, and the work stopped at once."
WORDS = TEXT.split()


@dataclass
class Generation:
    """One generation: ``produced`` tokens of ``total``, and how it stopped (``running``
    while it runs)."""

    total: int
    produced: int = 0
    stopped: Literal["running", "completed", "cancelled", "write failed"] = "running"


GENERATIONS = web.AppKey("generations", list[Generation])
TOTAL = web.AppKey("total", int)
DELAY = web.AppKey("delay", float)

log = logging.getLogger("stream")

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>aiodelay: streaming tokens</title>
<p>Tokens received: <span id="count">0</span> (close this tab: the server stops generating)</p>
<p id="text"></p>
<script>
let received = 0;
const source = new EventSource("/tokens");
source.onmessage = (event) => {
  received += 1;
  document.getElementById("count").textContent = received;
  document.getElementById("text").textContent += event.data + " ";
};
source.addEventListener("done", () => source.close());  // or EventSource reconnects
</script>
"""


async def generate(total: int, delay: float) -> AsyncIterator[str]:
    """Yield ``total`` tokens, one every ``delay`` seconds: a stand-in for a model."""
    for i in range(total):
        await asyncio.sleep(delay)  # the model computing the next token
        yield WORDS[i % len(WORDS)]


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def tokens(request: web.Request) -> web.StreamResponse:
    """Stream the tokens as events (``message``), then a ``done`` event."""
    app = request.app
    generation = Generation(total=app[TOTAL])
    app[GENERATIONS].append(generation)
    async with sse_response(request) as events:
        try:
            async for token in generate(generation.total, app[DELAY]):
                generation.produced += 1
                await events.send(token)
            await events.send("", event="done")
        except asyncio.CancelledError:
            generation.stopped = "cancelled"
            log.info(
                "client left: stopped after %d of %d tokens", generation.produced, generation.total
            )
            raise
        except ConnectionError:  # without aiodelay: the next write finds the client gone
            generation.stopped = "write failed"
            raise
        generation.stopped = "completed"
    return events


async def create_app(*, total: int = 200, delay: float = 0.05) -> web.Application:
    """The page and its stream of ``total`` tokens, one every ``delay`` seconds."""
    if total < 1:
        raise ValueError(f"total must be at least 1, got {total!r}")
    if delay < 0:
        raise ValueError(f"delay must not be negative, got {delay!r}")
    app = web.Application()
    aiodelay.setup(app)
    app[TOTAL] = total
    app[DELAY] = delay
    app[GENERATIONS] = []
    app.router.add_get("/", page)
    app.router.add_get("/tokens", tokens)
    return app


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="examples/stream/app.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--port", type=_port, default=8080, help="port of 127.0.0.1 (default: 8080)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        web.run_app(create_app(), host="127.0.0.1", port=args.port)
    except OSError as exc:  # the port is taken, or not ours to listen on
        print(
            f"examples/stream: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _port(text: str) -> int:
    """A TCP port, 1 to 65535, for argparse (which makes a bad one a one-line error)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (1 to 65535): {text!r}")
    return int(text)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
