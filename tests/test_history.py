"""The history the status page shows: the last interrupted requests and the per-second counts."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

import aiodelay
from aiodelay import OutcomeKind
from aiodelay._core.errors import Reason
from aiodelay.server._history import (
    PATH_LIMIT,
    History,
    Interruption,
    history_key,
    history_of,
    keep_history,
)

WALL = 1_700_000_000.0  # what the wall clock says when the monotonic clock says NOW
NOW = 1000.0


class Clock:
    """A monotonic clock the test moves; the wall clock moves with it."""

    def __init__(self) -> None:
        self.now = NOW

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL + (self.now - NOW)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _history(clock: Clock, **config: int) -> History:
    return History(clock=clock.monotonic, wall_clock=clock.wall, **config)


def _end(
    history: History,
    path: str = "/",
    *,
    left_at: float | None,
    started_at: float | None = None,
    reason: Reason | None = "FIN",
    kind: OutcomeKind = "cancelled",
    method: str = "GET",
    client: str | None = "192.0.2.7",
) -> None:
    """Tell ``history`` that a request ended (its client left at ``left_at``)."""
    end = left_at if left_at is not None else NOW
    outcome = aiodelay.Outcome(
        kind,
        None if reason is None else aiodelay.ConnectionLost(reason),
        end - 1 if started_at is None else started_at,
        left_at,
        end,
        client,
    )
    request = make_mocked_request(method, path)
    history.request_started(request)
    history.request_ended(request, outcome)


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC while the test runs."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_keeps_the_last_20_interrupted_requests_newest_first(clock: Clock) -> None:
    history = _history(clock)
    for number in range(25):
        _end(history, f"/{number}", left_at=NOW)
    assert [row.path for row in history.rows()] == [f"/{n}" for n in range(24, 4, -1)]


def test_a_request_whose_client_stayed_is_not_kept(clock: Clock) -> None:
    history = _history(clock)
    _end(history, left_at=None, reason=None, kind="completed")
    _end(history, left_at=None, reason=None, kind="failed")  # an error, not a disconnect
    assert history.rows() == []
    assert history.per_second() == [0] * 300


def test_one_row_says_what_happened(clock: Clock, utc: None) -> None:
    history = _history(clock)
    _end(
        history,
        "/upload",
        method="POST",
        started_at=NOW - 3.0,
        left_at=NOW - 1.75,  # 1.25 s after the start; recorded 1.75 s later (it ran on)
        reason="RST",
        kind="ran_on",
        client="2001:db8::1",
    )
    [row] = history.rows()
    assert row == Interruption(
        at=WALL - 1.75,
        method="POST",
        path="/upload",
        reason="RST",
        after=1.25,
        outcome="ran_on",
        client="2001:db8::1",
    )
    assert row.time_of_day == "22:13:18.250"  # 1699999998.25 in UTC
    assert row.as_json() == {
        "time": "22:13:18.250",
        "at": WALL - 1.75,
        "method": "POST",
        "path": "/upload",
        "reason": "RST",
        "after": 1.25,
        "outcome": "ran_on",
        "client": "2001:db8::1",
    }


def test_without_the_time_it_left_the_end_is_used(clock: Clock) -> None:
    history = _history(clock)
    _end(history, left_at=None, started_at=NOW - 2, reason="closed", kind="truncated")
    [row] = history.rows()
    assert (row.at, row.after, row.reason) == (WALL, 2.0, "closed")


def test_a_long_path_is_cut_short(clock: Clock) -> None:
    history = _history(clock)
    _end(history, "/" + "a" * 1000, left_at=NOW)
    [row] = history.rows()
    assert len(row.path) == PATH_LIMIT
    assert row.path == "/" + "a" * (PATH_LIMIT - 2) + "…"


def test_counts_per_second_over_the_last_300_seconds(clock: Clock) -> None:
    history = _history(clock)
    _end(history, left_at=NOW + 0.2)
    _end(history, left_at=NOW + 0.7)  # the same second
    _end(history, left_at=NOW + 3.5)
    clock.now = NOW + 3.9
    counts = history.per_second()
    assert len(counts) == 300
    assert (counts[-4], counts[-1], sum(counts)) == (2, 1, 3)  # now is the last one

    clock.now = NOW + 299.9  # second NOW is the oldest of the window
    counts = history.per_second()
    assert (counts[0], counts[3], sum(counts)) == (2, 1, 3)

    clock.now = NOW + 300.0  # and now it is out
    counts = history.per_second()
    assert (counts[2], sum(counts)) == (1, 1)

    # Second NOW + 300 reuses the slot of second NOW: it starts again from 0.
    _end(history, left_at=NOW + 300.5)
    counts = history.per_second()
    assert (counts[2], counts[-1], sum(counts)) == (1, 1, 2)

    clock.now = NOW + 10_000  # long quiet: all stale
    assert history.per_second() == [0] * 300
    assert len(history.rows()) == 4  # the rows stay


def test_an_interruption_before_the_window_is_listed_but_not_counted(clock: Clock) -> None:
    history = _history(clock, seconds=60)
    _end(history, "/ran-on", left_at=NOW - 60)  # its handler ran on for a minute
    _end(history, "/just-in", left_at=NOW - 59)
    assert [row.path for row in history.rows()] == ["/just-in", "/ran-on"]
    assert history.per_second() == [1] + [0] * 59


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"rows": 0}, ValueError, "rows must be at least 1, got 0"),
        ({"seconds": -5}, ValueError, "seconds must be at least 1, got -5"),
        ({"rows": 2.5}, TypeError, "rows must be an int, got 2.5"),
        ({"seconds": "300"}, TypeError, "seconds must be an int, got '300'"),
        ({"seconds": True}, TypeError, "seconds must be an int, got True"),
    ],
)
def test_bad_config_is_refused(config: dict[str, object], error: type, message: str) -> None:
    with pytest.raises(error, match=f"^{message}$"):
        History(**config)  # type: ignore[arg-type]


def test_keep_history_stores_it_on_the_app_once() -> None:
    app = web.Application()
    aiodelay.setup(app)
    history = keep_history(app, rows=5)
    assert app[history_key] is history is history_of(app)
    with pytest.raises(RuntimeError, match="keeps a history already"):
        keep_history(app)


def test_keep_history_needs_aiodelay_and_history_of_names_the_fix() -> None:
    app = web.Application()
    with pytest.raises(RuntimeError, match=r"aiodelay\.setup\(app\)"):
        keep_history(app)
    assert history_key not in app
    with pytest.raises(RuntimeError, match=r"keep_history\(app\)"):
        history_of(app)


def test_keep_history_refuses_a_started_app() -> None:
    app = web.Application()
    aiodelay.setup(app)
    app.freeze()
    with pytest.raises(RuntimeError, match="before the app starts"):
        keep_history(app)
