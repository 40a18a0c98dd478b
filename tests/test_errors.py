"""Why a request ended before its response was complete (``aiodelay/_core/errors.py``):
ConnectionLost and its reason, DeadlineExceeded and its deadline, through copies and pickles."""

from __future__ import annotations

import copy
import pickle
import sys

import pytest

import aiodelay

pytestmark = pytest.mark.both_loops


@pytest.mark.parametrize("message", [None, "the connection was closed before the handler started"])
def test_connection_lost_copies_and_pickles_with_its_reason(message: str | None) -> None:
    """ConnectionLost keeps its reason in a slot (no per-drop __dict__); copies and pickles
    still carry reason and message."""
    lost = aiodelay.ConnectionLost("closed", message)
    for again in (copy.copy(lost), pickle.loads(pickle.dumps(lost))):
        assert type(again) is aiodelay.ConnectionLost
        assert again.reason == "closed"
        assert str(again) == str(lost)


@pytest.mark.parametrize(
    ("reason", "says"),
    [("FIN", "(FIN)"), ("RST", "(RST)"), ("shutdown", "shut down"), ("closed", "was closed")],
)
def test_connection_lost_without_a_message_says_its_reasons(reason: str, says: str) -> None:
    """Without a message, a ConnectionLost says its reason's, as its only argument (an
    OSError without an errno)."""
    lost = aiodelay.ConnectionLost(reason)  # type: ignore[arg-type]
    assert says in str(lost)
    assert lost.args == (str(lost),)
    assert (lost.errno, lost.strerror) == (None, None)


def test_exception_notes_and_attributes_survive_a_copy() -> None:
    """Attributes other than the reason (and Python 3.11's notes) live in the instance
    __dict__, which copies and pickles carry too."""
    lost = aiodelay.ConnectionLost("RST")
    lost.where = "upstream"  # type: ignore[attr-defined]
    if sys.version_info >= (3, 11):
        lost.add_note("seen behind a proxy")
    for again in (copy.copy(lost), pickle.loads(pickle.dumps(lost))):
        assert again.reason == "RST"
        assert again.where == "upstream"  # type: ignore[union-attr]
        assert getattr(again, "__notes__", None) == getattr(lost, "__notes__", None)


@pytest.mark.parametrize("upstream", [None, "grpc-timeout"])
def test_deadline_exceeded_copies_and_pickles_with_its_deadline(upstream: str | None) -> None:
    """Its args hold the message alone, which its __init__ cannot take: copies and pickles
    go by its deadline, status and upstream instead."""
    exceeded = aiodelay.DeadlineExceeded(0.25, 503, upstream)
    for again in (copy.copy(exceeded), pickle.loads(pickle.dumps(exceeded))):
        assert type(again) is aiodelay.DeadlineExceeded
        assert (again.seconds, again.status, again.upstream) == (0.25, 503, upstream)
        assert str(again) == str(exceeded)
