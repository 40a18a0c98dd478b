"""How a request ends: the place that decides it, counts it, writes its INFO line, makes
aiohttp's access log say what went on the wire, and tells the observers. (One end is not
decided here, for its cost: a request that nothing stopped, that nothing waits for and that
nobody observes, the middleware counts completed itself; see :func:`end`.)

A request meets this module three times: :func:`started` (observers told, where there are
sub-apps with aiodelay of their own; the middleware tells an installation's own observers),
the connection's events while it runs or while aiohttp writes its response (:data:`EVENTS`,
the listener of every connection's Watch), and :func:`end`, the middleware's one call when
the handler returned or raised (:func:`written` or :func:`record_completed` for a response
the middleware wrote). How an
end is classified (``cause`` is what stopped the request first, see ``state.py``; *gone* means
that the client is gone now, so nothing more reaches it; :func:`_classify` is this table):

=========================  ==============================  ========================================
the handler...             when                            outcome; what aiohttp gets
=========================  ==============================  ========================================
returned (or raised an     the client left first           ``ran_on``; logged as what went out
HTTPException)             the deadline passed first       ``timed_out``; its answer goes out (if
                                                           gone: logged as what went out)
                           the client is gone only now     ``ran_on`` (an RST read in the very turn
                                                           the handler returned; asyncio's loop)
                           otherwise                       ``completed`` once aiohttp has written
                                                           the response, ``truncated`` if the
                                                           client leaves first; the response
was cancelled by aiodelay  the deadline passed             ``timed_out``; the deadline's status, or
                                                           the connection cut if the response had
                                                           started (if gone: what went out)
                           the client left                 ``cancelled`` (``failed``: the server's
                                                           shutdown); what went out (a middleware
                                                           outside aiodelay's: the CancelledError,
                                                           where aiohttp logs nothing)
was cancelled by           a WebSocket whose client left   ``cancelled``; the CancelledError
something else             the server shuts down           ``failed``, its reason ``"shutdown"``
                           otherwise (an outer timeout)    ``failed``; the CancelledError
raised ConnectionError     the client left, or is gone     ``cancelled`` under the cancel policy
(a write or a body read                                    with no grace; else ``ran_on`` for
failed)                                                    aiodelay's ``ConnectionLost`` (the
                                                           handler's work ran to its end and says
                                                           so), ``failed`` for any other;
                                                           logged as what went out
raised anything else       the deadline passed first       ``timed_out``; the exception goes on
                           otherwise                       ``failed``; the exception goes on
=========================  ==============================  ========================================

A request that failed without its client leaving is counted ``completed`` (``aiodelay.Stats``):
its client got the server's answer (aiohttp's 500).

(The module is longer than the others: every way a request can end but the plain completion
is decided, counted, logged and told here, so that the counters, the log lines, the access log
and the observers cannot disagree.)
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import logging
import sys
from sys import _getframe
from time import monotonic
from typing import Any

from aiohttp import web

from .aiohttp_internals import (
    Watch,
    abort_connection,
    access_logged,
    as_sent,
    bytes_written,
    close_unread,
    fail_as_aiohttp,
    how_peer_left,
    log_bytes_sent,
    peer_gone,
    response_written,
    status_line_sent,
)
from .client import trusted_remote
from .errors import ConnectionLost, DeadlineExceeded, seconds_text
from .observe import Outcome, OutcomeKind, Unfrozen, make_outcome, note_budget
from .policy import Policy
from .state import ENDED, RUNNING, SETTLED, WRITING, RequestState

__all__ = (
    "EVENTS",
    "WRITES_HERE",
    "end",
    "logger",
    "notify_finish",
    "record_completed",
    "started",
    "write_failed",
    "writes_here",
    "written",
)

logger = logging.getLogger("aiodelay")
_new = object.__new__

#: Hand a cancellation on to a middleware outside aiodelay's when aiohttp logs nothing: from
#: Python 3.11 on (on 3.10 the cancelled task is left in a reference cycle).
_HAND_ON = sys.version_info >= (3, 11)
_NO_CONTEXT = contextvars.Context()


def started(state: RequestState) -> None:
    """Tell the observers of every installation on the request's way that it started."""
    request = state.request
    assert request is not None
    installation = state.installation
    if not installation.nested:
        for observer in installation.observers:
            try:
                observer.request_started(request)
            except Exception:  # one broken observer must not break the request
                logger.exception("observer %r failed", observer)
        return
    for each in installation.installations(request):
        for observer in each.observers:
            try:
                observer.request_started(request)
            except Exception:
                logger.exception("observer %r failed", observer)


class _ConnectionEvents:
    """What a connection's events do to the request on it (the listener of every Watch)."""

    def running(self, state: RequestState) -> bool:
        return state.phase < ENDED

    def client_left(
        self, state: RequestState, lost: ConnectionLost, websocket: bool, in_task: bool = False
    ) -> bool:
        """The client left (``in_task``: before the handler started, told by the middleware
        in the request's own task). True if the handler is (to be) stopped now."""
        if state.phase == RUNNING:
            stopping = state.client_left(lost, websocket=websocket, in_task=in_task)
            installation = state.installation
            if installation.nested or installation.observers:  # (most drops: nobody to tell)
                _tell_lost(state)
            return stopping
        if state.phase in (ENDED, WRITING) and state.cause is None and state.response is not None:
            # Its response is being written: what was handed over so far is what aiohttp's
            # access log is to show. Whether all of it gets out, the close tells.
            log_bytes_sent(state.response)
        return False  # stopped, or running on, already: what came first decides

    def closed(self, state: RequestState) -> None:
        watch, state.watch = state.watch, None
        if state.phase != ENDED:
            # Its end lets go (the handler runs on); its callback will, once aiohttp is done
            # (WRITING); or it has let go (SETTLED).
            return
        request = state.request
        if (
            request is not None
            and not response_written(request)
            and not (watch is not None and watch.is_websocket())
        ):
            # Counted completed when its handler returned; aiohttp may still get the rest out
            # (a client that half-closed, and reads on): once it is done, it is known.
            _settle_when_written(state, request, watch, counted=True)
            return
        state.let_go()


#: The listener of every connection's Watch.
EVENTS = _ConnectionEvents()


def end(
    state: RequestState, response: web.StreamResponse | None, exc: BaseException | None
) -> web.StreamResponse | None:
    """The handler returned ``response`` or raised ``exc``: decide how the request ended (the
    table above), count and record it, and say what aiohttp gets: a response (to send, or
    only to log), or None to let ``exc`` go on unchanged.

    (A request that nothing stopped, that owns nothing and that nothing waits for, whose client
    is there, the middleware ends itself, without this call: ENDED and counted completed if
    nobody observes it, else WRITING, written by the middleware; the "otherwise" row of the
    table.)"""
    if exc is None and state.phase == RUNNING and state.extras is None:
        watch = state.watch
        if watch is not None and watch.lost is None and not watch.transport.is_closing():
            # Nothing stopped it, it owns nothing, nothing waits for it, its client is there.
            state.phase = ENDED
            return _completed(state, state.request, response)  # type: ignore[arg-type]
    return _end(state, response, exc)


def _end(
    state: RequestState, response: web.StreamResponse | None, exc: BaseException | None
) -> web.StreamResponse | None:
    """The end of a request that is not plain: first what the end itself says about the
    client, then the table above (:func:`_classify`), then the record and the answer."""
    request = state.request
    assert request is not None  # the handler has just ended
    ours = isinstance(exc, asyncio.CancelledError) and state.take_back_cancellation()
    state.ended()
    # Whether the client is gone now matters only where its leaving did not stop the request
    # (the table above): not asked on the drop path, where an RST's socket is closed already.
    gone = None if isinstance(state.cause, ConnectionLost) else _gone(state, request)
    if state.cause is None:
        if gone is not None and not _websocket(state) and _answered_or_tripped(exc):
            # Gone at the very end (on asyncio's loop an RST is reported a turn after it was
            # read; the handler's result may come in between), or found gone by a write or a
            # body read that failed: nothing reaches that client.
            _lost_now(state, gone)
        elif (
            isinstance(exc, asyncio.CancelledError)
            and not ours
            and state.installation.shutting_down
        ):
            _lost_now(state, ConnectionLost("shutdown"))  # the server stopped it
    kind, note, answer, error = _classify(state, request, exc, ours, gone)
    if kind == "completed":
        return _completed(state, request, response)
    _record(state, kind, note, error)
    if answer is _SEND:
        return response  # (None for an HTTPException, which aiohttp sends)
    if answer is _GO_ON:
        return None
    outermost = (state.route_plan or state.plan).outermost  # (asked for already, on a drop)
    if answer is _QUIET and not outermost and _HAND_ON and not access_logged(request):
        # A middleware outside aiodelay's sees the cancellation, as without aiodelay, where
        # aiohttp logs nothing. Where aiodelay is outermost, the response goes to aiohttp
        # alone, and not the CancelledError: that would stay, with its traceback and every
        # frame in it, on aiohttp's task of the connection until the connection's deferred
        # teardown (teardown.py), and make the collector run more often in a storm of drops.
        return None
    if answer is _DEADLINE:
        timed_out = state.timed_out
        assert timed_out is not None
        return web.Response(
            status=timed_out.status,
            text=f"{timed_out.status}: {timed_out}\n",  # (says whose budget ran out)
        )
    if answer is _CUT:
        abort_connection(request)  # the response had started: the client sees it cut
    close_unread(request)  # no lingering over the body of a connection that ends
    # For aiohttp to log, not to send: what went out (499 if nothing; one shared response
    # where no other middleware can see it).
    return as_sent(request, response, exc=exc, shared=outermost)


# What aiohttp gets (the last column of the table above).
_SEND = "the response goes out as it is"
_GO_ON = "the exception goes on unchanged"
_DEADLINE = "the deadline's status, with a short text"
_CUT = "the connection cut (a response had started), logged as what went out"
_LOGGED = "logged as what went out"
_QUIET = (
    "logged as what went out; a middleware outside aiodelay's gets the CancelledError where "
    "aiohttp logs nothing"
)


def _answered_or_tripped(exc: BaseException | None) -> bool:
    """The handler answered, or raised a ConnectionError (a write or a body read failed)."""
    return exc is None or isinstance(exc, (web.HTTPException, ConnectionError))


def _classify(
    state: RequestState,
    request: web.BaseRequest,
    exc: BaseException | None,
    ours: bool,
    gone: ConnectionLost | None,
) -> tuple[OutcomeKind, str, str, BaseException | None]:
    """The table above: the outcome, the INFO line's note, what aiohttp gets, and the error
    the request ended with (for ``notify_finish``), from what the state and the wire say."""
    cause = state.cause
    timed_out = cause if isinstance(cause, DeadlineExceeded) else None
    lost = cause if isinstance(cause, ConnectionLost) else None
    # (Exception first: isinstance() on HTTPException, a StreamResponse, is ABCMeta's Python
    # __instancecheck__, which a CancelledError need not pay.)
    if exc is None or (isinstance(exc, Exception) and isinstance(exc, web.HTTPException)):
        if timed_out is not None:
            if gone is None:
                return (
                    "timed_out",
                    "the handler caught the cancellation and answered itself",
                    _SEND,
                    None,
                )
            return (
                "timed_out",
                "the handler caught the cancellation and answered, but its client left "
                "before the answer went out",
                _LOGGED,
                None,
            )
        if lost is not None:
            return "ran_on", _ran_on_note(state), _LOGGED, None
        return "completed", "", _SEND, None
    if isinstance(exc, asyncio.CancelledError):
        if ours and timed_out is not None:
            if gone is not None:
                return (
                    "timed_out",
                    "cancelled; its client left before the answer went out",
                    _LOGGED,
                    None,
                )
            if status_line_sent(request):
                return "timed_out", "cancelled, its response cut short", _CUT, None
            return "timed_out", f"cancelled, answered {timed_out.status}", _DEADLINE, None
        if ours and lost is not None:
            if lost.reason == "shutdown":
                # A connection that aiohttp closes at shutdown stops the request as the
                # shutdown's cancellation would: counted the same way, whichever came first.
                return "failed", "stopped by the server's shutdown", _QUIET, None
            grace = (state.route_plan or state.plan).grace  # (asked for when the client left)
            note = "" if grace is None else f"after its {seconds_text(grace)} grace"
            return "cancelled", note, _QUIET, None
        kind: OutcomeKind = "timed_out" if timed_out is not None else "failed"
        if state.installation.shutting_down:
            return kind, "stopped by the server's shutdown", _GO_ON, ConnectionLost("shutdown")
        if lost is not None and _websocket(state):
            # aiohttp's handler_cancellation=True cancels a WebSocket handler whose client
            # left: it goes on to aiohttp, as without aiodelay.
            return "cancelled", "a WebSocket, by aiohttp's handler_cancellation", _GO_ON, None
        note = "stopped by a cancellation that was not aiodelay's (an outer timeout?)"
        return kind, note, _GO_ON, asyncio.CancelledError()
    if isinstance(exc, ConnectionError) and lost is not None and timed_out is None:
        # The handler tripped over its client leaving (a write or a body read failed), before
        # or instead of being cancelled: as quiet as a cancellation, if that is what the
        # policy would have done; if it was to run on, it failed, unless what it raised is
        # aiodelay's own word that the client left, once its work ran to its end.
        plan = state.plan
        if plan.policy is Policy.CANCEL and plan.grace is None and not _websocket(state):
            return "cancelled", "", _LOGGED, None
        if isinstance(exc, ConnectionLost):
            return "ran_on", _ran_on_note(state), _LOGGED, None
        return "failed", _raised(exc), _LOGGED, None
    # The handler's own error (an upstream refused, a bug): it goes on to aiohttp, which logs
    # it and answers 500 if it can.
    if timed_out is not None:
        return "timed_out", _raised(exc), _GO_ON, None
    return "failed", _raised(exc) if lost is not None else "", _GO_ON, _without_traceback(exc)


def _raised(exc: BaseException) -> str:
    """The INFO line's note on a handler that raised ``exc`` (made only where it is said)."""
    return f"the handler raised {type(exc).__name__}"


def _completed(
    state: RequestState, request: web.BaseRequest, response: web.StreamResponse | None
) -> web.StreamResponse | None:
    """The handler answered and its client is there: completed, once aiohttp has written the
    response (``truncated`` if its client leaves first)."""
    state.response = response
    extras = state.extras
    if (extras is not None and extras.waiters) or _observed(state):
        # Settled once the response is written: told then.
        if writes_here(state, response):
            state.phase = WRITING  # the middleware writes it next (written())
        else:
            _settle_when_written(state, request, state.watch, counted=False)
        return response
    for installation in state.installation.installations(request):
        installation.counters.completed += 1
    if state.watch is None:
        state.let_go()
    return response


def _ran_on_note(state: RequestState) -> str:
    """What the INFO line says of a handler that ran to its end after its client left."""
    extras = state.extras
    if extras is not None and extras.websocket:
        return "WebSocket: aiohttp ended it"
    plan = state.plan
    if plan.policy is Policy.SHIELD:
        return "shielded"
    if plan.grace is not None:
        return f"within its {seconds_text(plan.grace)} grace"
    return "it ended before the cancellation took effect"


def _gone(state: RequestState, request: web.BaseRequest) -> ConnectionLost | None:
    """How the client left, if it is gone now (nothing more reaches it), else None."""
    watch = state.watch
    return (watch.lost if watch is not None else None) or peer_gone(request)


def _websocket(state: RequestState) -> bool:
    """The request is a WebSocket (a handshake was accepted on its connection)."""
    extras, watch = state.extras, state.watch
    return (extras is not None and extras.websocket) or (watch is not None and watch.is_websocket())


def _lost_now(state: RequestState, lost: ConnectionLost) -> None:
    """The client is found gone as the handler ends, before anything told the request."""
    state.cause = lost
    state.cause_at = monotonic()
    _tell_lost(state)


def _observed(state: RequestState) -> bool:
    installation = state.installation
    if not installation.nested:
        return bool(installation.observers)
    assert state.request is not None
    return any(each.observers for each in installation.installations(state.request))


def _tell_lost(state: RequestState) -> None:
    """Tell the observers that the request's client left."""
    installation = state.installation
    if not (installation.nested or installation.observers):
        return  # (most requests: nobody to tell, no call to ask)
    lost, request = state.lost, state.request
    if lost is None or request is None or not _observed(state):
        return
    for installation in state.installation.installations(request):
        for observer in installation.observers:
            try:
                observer.request_lost(request, lost)
            except Exception:  # called from the transport: must not break its close
                logger.exception("observer %r failed", observer)


def writes_here(state: RequestState, response: web.StreamResponse | None) -> bool:
    """Whether the middleware writes the response of a request whose outcome waits for the
    write (:func:`written`) rather than leaving it to aiohttp and asking once aiohttp's task
    is done (:func:`_settle_when_written`): where nothing but aiohttp would touch the response
    after aiodelay (``RoutePlan.last_to_touch``: aiodelay is the served app's first
    middleware, and no ``on_response_prepare`` handlers, which see ``request.app`` as aiohttp
    sets it), and for a response class whose ``prepare`` and ``write_eof`` do nothing the
    second time (aiohttp's): not a ``FileResponse``, a WebSocket, or a class that overrides
    them. Such classes are then in :data:`WRITES_HERE` (the middleware asks that, and
    ``RoutePlan.last_to_touch``, once the request is WRITING)."""
    if response is None or not state.plan.last_to_touch:
        return False
    cls = response.__class__
    if cls in WRITES_HERE:
        return True
    if cls in _WRITTEN_BY_AIOHTTP:
        return False
    if cls.prepare is web.StreamResponse.prepare and cls.write_eof in (
        web.StreamResponse.write_eof,
        web.Response.write_eof,
    ):
        WRITES_HERE.add(cls)
        return True
    _WRITTEN_BY_AIOHTTP.add(cls)
    return False


#: Response classes whose ``prepare`` and ``write_eof`` return at once once the response is
#: sent (:func:`writes_here`), and those found otherwise.
WRITES_HERE: set[type] = set()
_WRITTEN_BY_AIOHTTP: set[type] = set()


def write_failed(state: RequestState, request: web.BaseRequest, exc: Exception) -> None:
    """Writing the response in the middleware raised ``exc`` (not a ``ConnectionError``: a
    header aiohttp cannot write, say): what aiohttp does when its own write raises, it logs
    the error and closes the connection; the request failed."""
    fail_as_aiohttp(request, exc)
    if state.phase == WRITING:
        _record(state, "failed", f"writing the response raised {type(exc).__name__}", exc)


def written(state: RequestState, request: web.BaseRequest, watch: Watch | None) -> None:
    """The middleware wrote the response (:func:`writes_here`), as aiohttp would have right
    after the middleware returned it (``prepare``, then ``write_eof``; aiohttp's own calls
    then find it sent and return at once), or its client left first: settle the request,
    ``completed`` or ``truncated``. Writing in the middleware costs an observed request
    nothing more than aiohttp's writing, where asking after aiohttp's task ended (a done
    callback) cost a callback scheduled and run on the loop."""
    if state.phase != WRITING:
        return
    if response_written(request):
        record_completed(state, request)
    else:
        _response_done(state, request, watch, False, None)


def _settle_when_written(
    state: RequestState, request: web.BaseRequest, watch: Watch | None, *, counted: bool
) -> None:
    """Settle the request once aiohttp is done with its response (its task ends): completed,
    or truncated if not all of it went out (``watch`` says how the client left).
    ``counted``: it was counted completed when its handler returned."""
    if state.phase == WRITING:
        return
    state.phase = WRITING
    task = state.task
    assert task is not None
    task.add_done_callback(
        functools.partial(_response_done, state, request, watch, counted),
        context=_NO_CONTEXT,  # needs none of the request's context variables
    )


def _response_done(
    state: RequestState,
    request: web.BaseRequest,
    watch: Watch | None,
    counted: bool,
    task: asyncio.Task[Any] | None,
) -> None:
    """aiohttp (or the middleware, :func:`written`) is done with the request's response: it
    got there, or its client left."""
    if state.phase == SETTLED:
        return
    if response_written(request):
        if counted:
            state.settle()
        else:
            record_completed(state, request)
        return
    lost = (watch.lost if watch is not None else None) or how_peer_left(request)
    state.cause, state.cause_at = lost, monotonic()
    _record_truncated(state, request, recount=counted)


def _record_truncated(
    state: RequestState, request: web.BaseRequest, *, recount: bool = False
) -> None:
    response = state.response
    sent = log_bytes_sent(response) if response is not None else 0
    _record(
        state,
        "truncated",
        f"{sent or bytes_written(request)} bytes handed to the transport",
        request=request,
        recount=recount,
    )


def notify_finish(state: RequestState) -> asyncio.Future[None]:
    """``aiodelay.notify_finish``: a new future, resolved when the outcome is known."""
    future = state.notify_finish()
    if not future.done() and state.phase == ENDED:  # (in WRITING it is settled anyway)
        request = state.request
        if request is None or response_written(request):
            # The connection moved on, or aiohttp has written it all.
            state.settle()
        else:
            _settle_when_written(state, request, state.watch, counted=True)
    return future


def _record(
    state: RequestState,
    kind: OutcomeKind,
    note: str,
    error: BaseException | None = None,
    *,
    request: web.BaseRequest | None = None,
    recount: bool = False,
) -> None:
    """The end of one request: SETTLED (the ``notify_finish`` futures resolved, the request let
    go), its counters in every installation on its way, its INFO line if its client left or
    its deadline passed, and the observers told (an :class:`Outcome` is made only for them).
    ``recount``: it was counted ``completed`` when its handler returned."""
    request = request or state.request
    assert request is not None
    state.settle(error)
    installation = state.installation
    plan = state.route_plan  # (asked for already on a drop: its installations at hand)
    # (a plan asked for already, on a drop, has its installations at hand; only a nested
    # installation counts in more than itself: one shared by two apps learned its first's)
    installations = (
        plan.installations
        if plan is not None and installation.nested
        else installation.installations(request)
    )
    cause = state.cause
    lost = cause if isinstance(cause, ConnectionLost) else None
    disconnected = lost is not None
    observed = False
    for each in installations:
        counters = each.counters
        if recount:
            counters.completed -= 1
        counters.count(kind, disconnected)
        if each.observers:
            observed = True
    # (a cause is the client leaving or the deadline passing: both are logged)
    logged = cause is not None and logger.isEnabledFor(logging.INFO)
    if observed or logged:
        remotes = (plan or installation.plan_for(request)).remotes
        client = trusted_remote(request, remotes) if remotes else request.remote
        ended_at = monotonic()
        started_at = state.started_at
        if logged and isinstance(cause, DeadlineExceeded):
            _info(
                "%s %s from %s exceeded its %s deadline%s: %s",
                request.method,
                request.path,
                client,
                seconds_text(cause.seconds),
                "" if cause.upstream is None else f" (the budget in {cause.upstream})",
                note,
            )
        elif logged and lost is not None:
            _info(
                "%s %s from %s interrupted by %s after %.3fs: %s",
                request.method,
                request.path,
                client,
                lost.reason,
                (state.cause_at or started_at) - started_at,
                _what(kind, note, ended_at - started_at),
            )
        if observed:
            lost_at = state.cause_at if disconnected else None
            outcome = make_outcome(kind, lost, started_at, lost_at, ended_at, client)
            if state.extras is not None:
                note_budget(outcome, state.extras.budget_from)
            for each in installations:
                for observer in each.observers:
                    try:
                        observer.request_ended(request, outcome)
                    except Exception:  # one broken observer must not take the others' record
                        logger.exception("observer %r failed", observer)


def record_completed(state: RequestState, request: web.BaseRequest) -> None:
    """:func:`_record` of an observed request that completed (its response written, nothing
    stopped it), the observers' every request: counted, and the observers told. (Made twice
    over for its cost: directly where one installation observes and nothing waits, the
    common case; the same, through every installation on the request's way, otherwise.)"""
    plan = state.route_plan or state.installation.plan_for(request)
    watch, extras, installation = state.watch, state.extras, state.installation
    if extras is None and not installation.nested:
        # Most observed requests (one installation, nothing waits for them), written for
        # their cost: settle() and make_outcome() inlined, no loop over installations
        # (about 1,150 instructions fewer per observed request, benchmarks/instructions.py).
        state.phase = SETTLED
        state.request = state.task = state.response = state.watch = None
        installation.counters.completed += 1
        observers = installation.observers
        if not observers:
            return
        remotes = plan.remotes
        if remotes:
            client = trusted_remote(request, remotes)
        elif watch is not None and plan.outermost:
            client = watch.remote  # (aiohttp's own request: its connection's peer)
        else:
            client = request.remote
        outcome: Any = _new(Unfrozen)  # (make_outcome)
        outcome.kind = "completed"
        outcome.lost = None
        outcome.started_at = state.started_at
        outcome.lost_at = None
        outcome.ended_at = monotonic()
        outcome.client = client
        outcome.__class__ = Outcome
        for observer in observers:
            try:
                observer.request_ended(request, outcome)
            except Exception:  # one broken observer must not take the others' record
                logger.exception("observer %r failed", observer)
        return
    if extras is None:
        # (settle(), inlined: nothing waits for it, it owns nothing)
        state.phase = SETTLED
        state.request = state.task = state.response = state.watch = None
    else:
        state.settle()
    made = None
    for each in plan.installations if installation.nested else (installation,):
        each.counters.completed += 1
        if each.observers:
            if made is None:
                remotes = plan.remotes
                if remotes:
                    client = trusted_remote(request, remotes)
                elif watch is not None and plan.outermost:
                    client = watch.remote  # (aiohttp's own request: its connection's peer)
                else:
                    client = request.remote
                made = make_outcome("completed", None, state.started_at, None, monotonic(), client)
                if extras is not None:
                    note_budget(made, extras.budget_from)
            for observer in each.observers:
                try:
                    observer.request_ended(request, made)
                except Exception:  # one broken observer must not take the others' record
                    logger.exception("observer %r failed", observer)


def _what(kind: OutcomeKind, note: str, total: float) -> str:
    """What the INFO line says became of an interrupted request."""
    if kind == "cancelled":
        return f"cancelled ({note})" if note else "cancelled"
    if kind == "ran_on":
        return f"ran on ({note}), ended after {total:.3f}s"
    if kind == "truncated":
        return f"the handler had returned; its response was cut short ({note})"
    return note or "failed"


def _info(message: str, *args: object) -> None:
    """An INFO line on the ``aiodelay`` logger (asked ``isEnabledFor`` already): what
    ``logger.info(message, *args)`` here would log, the same record through the same
    ``makeRecord`` (the record factory) and ``handle`` (the logger's filters, its handlers and
    its parents'), without the search for the caller: the logging module would walk the stack
    from its own frames to this one, in Python, which cost a dropped request about 14,000 of
    the some 80,000 instructions its line costs (``benchmarks/drop_instructions.py``). The
    record says it was made here, in ``_info``, as ``findCaller`` would have said.

    Through ``logger.info`` itself where that could differ: a logger of a class of its own
    (``logging.setLoggerClass``: its ``_log`` or ``findCaller`` may add to the record), or no
    caller wanted (``logging._srcfile`` set to None, as the logging HOWTO suggests for speed).
    (Its frame is not kept in a variable: a frame that refers to itself is a reference cycle,
    left to the garbage collector, which then runs more often in a storm of drops.)"""
    if logger.__class__ is not logging.Logger or logging._srcfile is None:
        logger.info(message, *args)
        return
    line = _getframe().f_lineno
    record = logger.makeRecord(
        logger.name, logging.INFO, _INFO_FILE, line, message, args, None, "_info"
    )
    logger.handle(record)


_INFO_FILE = _info.__code__.co_filename


def _without_traceback(exc: BaseException) -> BaseException:
    """A copy of ``exc`` to keep on the request for later ``notify_finish`` calls: the
    original's traceback holds the frames that hold the request (a reference cycle)."""
    try:
        kept = copy.copy(exc)
    except Exception:  # an exception class that cannot be copied: keep the original
        return exc
    kept.__traceback__ = None
    kept.__context__ = kept.__cause__ = None
    return kept
