"""The kernel's word that a peer left, behind data nobody read yet: :class:`Hangups`.

While aiohttp has paused reading (a request body larger than its buffer that the handler does
not read yet, or a full pipelining queue), asyncio cannot see a FIN: the kernel holds it behind
the unread bytes. The kernel knows, though: on Linux, ``EPOLLRDHUP`` reports a peer's FIN (and
``EPOLLERR``/``EPOLLHUP`` a reset) whatever is still unread. A :class:`Hangups` is one small
``select.epoll`` per event loop, itself one readable fd of the loop, that holds only those
events and only for the connections held in it (``Watch.hold`` in ``aiohttp_internals.py``
says which). Elsewhere ``CAN_HOLD`` is False and nothing is held.

It is made when the app starts (``aiodelay.setup()``'s hook), while file descriptors are to be
had, else at the first request that needs it. If the process is out of descriptors then
(``EMFILE``), one WARNING says that detection behind unread data is degraded, and the next
request that needs it tries again; the requests held in the meantime are not watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import weakref
from typing import Protocol

__all__ = ("CAN_HOLD", "Hangups", "Reporter", "hangups_of")

logger = logging.getLogger("aiodelay")


class Reporter(Protocol):
    """What a held connection is told (the connection's ``Watch``)."""

    def hung_up(self, reset: bool) -> None:
        """The peer closed (``reset`` False: a FIN) or reset the connection."""


_HANGUPS: int | None = getattr(select, "EPOLLRDHUP", None) if hasattr(select, "epoll") else None
#: Whether this platform can report a peer leaving behind unread data (Linux's epoll).
CAN_HOLD = _HANGUPS is not None
_RESET = getattr(select, "EPOLLERR", 0) | getattr(select, "EPOLLHUP", 0)


class Hangups:
    """An ``epoll`` instance that reports only peers leaving, for the connections held in it.

    It is registered with the event loop as one readable fd. Each held socket is registered
    for ``EPOLLRDHUP`` (epoll adds ``EPOLLERR`` and ``EPOLLHUP`` by itself), not ``EPOLLIN``:
    unread data does not wake it, a FIN or RST does, even behind unread data. A socket is
    unregistered at its first report (the report would repeat: epoll is level-triggered) or
    when released.
    """

    __slots__ = ("__weakref__", "_epoll", "_held", "_mask")

    def __init__(self, loop: asyncio.AbstractEventLoop, mask: int) -> None:
        self._mask = mask
        self._epoll = select.epoll()
        self._held: dict[int, Reporter] = {}
        try:
            loop.add_reader(self._epoll.fileno(), self._ready)
        except BaseException:
            self._epoll.close()  # not left open by a loop that would not take it
            raise
        weakref.finalize(loop, self._epoll.close)

    def hold(self, fd: int, watch: Reporter) -> int:
        try:
            self._epoll.register(fd, self._mask)
        except OSError:  # a socket the kernel no longer knows: its close is on its way
            return -1
        self._held[fd] = watch
        return fd

    def release(self, fd: int) -> None:
        if self._held.pop(fd, None) is not None:
            with contextlib.suppress(OSError):  # gone from the kernel's set with its socket
                self._epoll.unregister(fd)

    def _ready(self) -> None:
        for fd, events in self._epoll.poll(0):
            watch = self._held.get(fd)
            self.release(fd)
            if watch is not None:
                watch.hung_up(bool(events & _RESET))


_hangups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hangups] = (
    weakref.WeakKeyDictionary()
)
#: Loops where making their Hangups failed and was logged: said once, not per request.
_failed: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def hangups_of(loop: asyncio.AbstractEventLoop) -> Hangups | None:
    """The loop's Hangups, made on first use; None where the platform has no ``EPOLLRDHUP``
    or the loop cannot watch another fd, or when it cannot be made now (no descriptor left:
    logged once, and tried again at the next call)."""
    hangups = _hangups.get(loop)
    if hangups is None and _HANGUPS is not None:
        try:
            hangups = _hangups[loop] = Hangups(loop, _HANGUPS)
        except NotImplementedError:  # a loop that cannot watch another fd: nothing to retry
            return None
        except OSError as exc:
            if loop not in _failed:
                _failed.add(loop)
                logger.warning(
                    "aiodelay cannot see clients leave behind unread request bodies "
                    "(select.epoll() failed: %s); tried again at the next such request",
                    exc.strerror or exc,
                )
            return None
        if loop in _failed:
            _failed.discard(loop)
            logger.info("aiodelay sees clients leave behind unread request bodies again")
    return hangups
