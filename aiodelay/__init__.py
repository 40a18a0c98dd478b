"""aiodelay: stop the work of an aiohttp request when its client goes away.

Install with :func:`setup` (or :func:`middleware`); see the README for what is and is not
detected.
"""

from ._account import add_observer
from ._errors import ConnectionLost, DeadlineExceeded
from ._middleware import middleware, setup, stats
from ._observe import Outcome, OutcomeKind, RequestObserver
from ._owned import check_cancelled
from ._policy import Policy, cancellable, deadline, grace, shielded
from ._request import call_later, is_disconnected, notify_finish, spawn, to_thread
from ._resource import NOT_DONE_YET, Resource
from ._shield import shield
from ._stats import Stats

__version__ = "0.1.0"

__all__ = (
    "NOT_DONE_YET",
    "ConnectionLost",
    "DeadlineExceeded",
    "Outcome",
    "OutcomeKind",
    "Policy",
    "RequestObserver",
    "Resource",
    "Stats",
    "add_observer",
    "call_later",
    "cancellable",
    "check_cancelled",
    "deadline",
    "grace",
    "is_disconnected",
    "middleware",
    "notify_finish",
    "setup",
    "shield",
    "shielded",
    "spawn",
    "stats",
    "to_thread",
)
