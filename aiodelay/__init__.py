"""aiodelay: stop the work of an aiohttp request when its client goes away.

Install with :func:`setup` (or :func:`middleware`); what is and is not detected is in the
documentation's page on detection (``docs/detection.md``).
"""

from ._core.budget import budget_trace
from ._core.errors import ConnectionLost, DeadlineExceeded
from ._core.installation import add_observer
from ._core.middleware import middleware, setup, stats
from ._core.observe import Outcome, OutcomeKind, RequestObserver
from ._core.owned import check_cancelled
from ._core.policy import Policy, cancellable, deadline, grace, shielded
from ._core.requests import (
    call_later,
    is_disconnected,
    notify_finish,
    spawn,
    time_left,
    to_thread,
)
from ._core.shield import shield
from ._core.stats import Stats
from ._resource import NOT_DONE_YET, Resource, ResourceRequest
from ._version import __version__ as __version__

__all__ = (
    "NOT_DONE_YET",
    "ConnectionLost",
    "DeadlineExceeded",
    "Outcome",
    "OutcomeKind",
    "Policy",
    "RequestObserver",
    "Resource",
    "ResourceRequest",
    "Stats",
    "add_observer",
    "budget_trace",
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
    "time_left",
    "to_thread",
)
