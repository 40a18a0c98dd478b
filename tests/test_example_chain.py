"""examples/chain: a client leaving A stops A, B and C.

Three real services on 127.0.0.1, each served like production (``handler_cancellation=False``)
with aiodelay installed; A calls B and B calls C over ``aiohttp.ClientSession``. The test waits
until C is working, drops the connection at A, and waits for each service's aiodelay to report
its handler cancelled. The times (from the drop to each cancellation) are printed (``pytest
-s``) and put in the assertion messages; only a generous bound is asserted.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

import aiodelay
from examples.chain import app as chain
from tests.conftest import Drop, Serve


class Watch:
    """One service's handler of ``/work``: started (an event) and how it ended."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = asyncio.Event()
        self.ended: asyncio.Future[aiodelay.Outcome] = asyncio.get_running_loop().create_future()

    def request_started(self, request: web.BaseRequest) -> None:
        self.started.set()

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        pass  # the outcome says it too

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        if not self.ended.done():
            self.ended.set_result(outcome)


@pytest.mark.parametrize("how", ["FIN", "RST"])
async def test_dropping_the_client_at_a_cancels_a_b_and_c(serve: Serve, how: Drop) -> None:
    watches = {name: Watch(name) for name in "ABC"}
    c = await chain.create_app("C")
    aiodelay.add_observer(c, watches["C"])
    served_c = await serve(c)
    b = await chain.create_app("B", f"http://127.0.0.1:{served_c.port}")
    aiodelay.add_observer(b, watches["B"])
    served_b = await serve(b)
    a = await chain.create_app("A", f"http://127.0.0.1:{served_b.port}")
    aiodelay.add_observer(a, watches["A"])
    served_a = await serve(a)

    client = await served_a.get("/work")
    await asyncio.wait_for(watches["C"].started.wait(), 5)  # the request reached the end
    dropped_at = time.monotonic()
    client.drop(how)

    outcomes = {name: await asyncio.wait_for(w.ended, 5) for name, w in watches.items()}
    times = {name: (o.ended_at - dropped_at) * 1000 for name, o in outcomes.items()}
    report = ", ".join(f"{name} cancelled {ms:.1f} ms after the drop" for name, ms in times.items())
    print(f"\nchain, client dropped by {how} at A: {report}")
    for name, outcome in outcomes.items():
        assert outcome.kind == "cancelled", f"{name}: {outcome.kind} ({report})"
        assert outcome.lost is not None, f"{name}: aiodelay did not see its client leave"
        # Generous: C would work 30 s; the point is that it stopped, not how fast.
        assert times[name] < 5000, report
    # Each one's client was the service before it, and it left only after that one stopped.
    assert outcomes["A"].ended_at <= outcomes["B"].ended_at <= outcomes["C"].ended_at, report


async def test_the_chain_answers_when_the_client_stays(serve: Serve) -> None:
    served_c = await serve(await chain.create_app("C", work_seconds=0.01))
    served_b = await serve(await chain.create_app("B", f"http://127.0.0.1:{served_c.port}"))
    served_a = await serve(await chain.create_app("A", f"http://127.0.0.1:{served_b.port}"))
    client = await served_a.get("/work")
    assert await client.read_response() == (200, b"A <- B <- C done")


async def test_create_app_rejects_a_non_positive_work_time() -> None:
    with pytest.raises(ValueError, match="work_seconds must be positive"):
        await chain.create_app("C", work_seconds=0)
