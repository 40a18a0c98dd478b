"""``python -m aiodelay``: serve a directory (or the bundled demo site) with aiodelay set up.

``main(argv)`` returns the exit status: 0 after Ctrl-C or SIGTERM (a graceful stop), 1 when the
server cannot start (port in use, unreadable directory, an unusable ``PROMETHEUS_MULTIPROC_DIR``
with ``--metrics``), 2 for bad arguments and for ``--metrics`` without prometheus-client
installed.  Every error is one line on stderr, never a traceback.  ``aiodelay.prometheus`` (and
with it ``prometheus_client``) is imported only with ``--metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from aiohttp import web
from aiohttp.log import access_logger

from .._core.middleware import SHUTDOWN_DRAIN
from .._core.policy import Policy
from .._version import __version__
from ._site import create_app

__all__ = ("DEMO_DIR", "main")

DEMO_DIR = Path(__file__).parent / "demo"

#: The longest a stop waits, in all, for requests in flight before they are cancelled (their
#: ``notify_finish`` futures then fail with reason "shutdown").  aiohttp's default, 60 s
#: (really 120 s, see below), would keep an open stream holding Ctrl-C for minutes.
SHUTDOWN_TIMEOUT = 3.0


def aiohttp_shutdown_timeout(total: float) -> float:
    """The ``shutdown_timeout`` to give aiohttp for handlers to be cancelled at most ``total``
    seconds after a stop began.

    aiohttp (3.10 to 3.14, ``RequestHandler.shutdown``) waits ``shutdown_timeout`` for the
    handler, then interrupts a request-body read in progress, waits ``shutdown_timeout``
    again, and only then cancels the handler's task: twice the timeout for a handler that
    does not end by itself.  Connections are shut down concurrently, so this does not grow
    with their number.  The app's ``on_shutdown`` hooks run before the first wait, so aiodelay
    knows the cancellations are the shutdown's (``notify_finish`` fails with "shutdown");
    aiodelay's first one serves what clients still send, for up to ``SHUTDOWN_DRAIN``, which
    comes out of ``total`` (but of a ``total`` under twice that: aiohttp keeps half of it).
    """
    return max(total - SHUTDOWN_DRAIN, total / 2) / 2


_PROG = "python -m aiodelay"
_NO_METRICS = "--metrics needs prometheus-client: pip install 'aiodelay[prometheus]'"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Serve a directory with aiodelay: static files, listings and .rpy scripts "
        "whose work stops when the client goes away.  Without --path, a demo site.",
    )
    parser.add_argument(
        "--path", type=Path, metavar="DIR", help="the directory to serve (default: the demo site)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=8080,
        help="the port to listen on, 0 for any free one (default: %(default)s)",
    )
    parser.add_argument(
        "--policy",
        choices=[p.value for p in Policy],
        default=Policy.CANCEL.value,
        help="what a client leaving does to its request (default: %(default)s)",
    )
    parser.add_argument(
        "--no-scripts",
        dest="scripts",
        action="store_false",
        help="static-only mode: .rpy scripts are not run (they give a 404 page saying so)",
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log each request (default: on)",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="serve Prometheus metrics at /metrics (needs: pip install 'aiodelay[prometheus]')",
    )
    parser.add_argument("--version", action="version", version=f"aiodelay {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until Ctrl-C or SIGTERM; returns the exit status.

    While it runs, the root logger writes to stderr from INFO up, in the server's format (a
    handler and the level are added, and taken back when it returns): scripts' own lines are
    the site's log too. A program that configured the root logger itself and calls this gets
    each line from its own handlers too."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if not args.host:
            parser.error("argument --host: expected a host name or address")
    except SystemExit as exc:  # argparse's exit (2 after its one-line error, 0 for --version)
        return exc.code if isinstance(exc.code, int) else 2
    if args.metrics:
        try:
            from .. import prometheus
        except ImportError as exc:
            if not (exc.name or "").startswith("prometheus_client"):
                raise
            print(f"{_PROG}: error: {_NO_METRICS}", file=sys.stderr)
            return 2
    root: Path = args.path if args.path is not None else DEMO_DIR
    try:
        app = create_app(root, scripts=args.scripts, policy=args.policy)
    except OSError as exc:
        return _fail(f"cannot serve {root}: {exc.strerror or exc}")
    if args.metrics:
        try:
            prometheus.setup(app)
        except (RuntimeError, ValueError) as exc:  # PROMETHEUS_MULTIPROC_DIR is unusable
            return _fail(str(exc))
    with _logging_to_stderr():
        try:
            return asyncio.run(
                _serve(app, args.host, args.port, args.access_log, root, args.metrics)
            )
        except KeyboardInterrupt:  # where signal handlers cannot be installed
            return 0


async def _serve(
    app: web.Application, host: str, port: int, access_log: bool, root: Path, metrics: bool
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not on Windows (Ctrl-C is then KeyboardInterrupt), nor outside the main thread.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        app,
        handler_cancellation=False,
        access_log=access_logger if access_log else None,
        shutdown_timeout=aiohttp_shutdown_timeout(SHUTDOWN_TIMEOUT),
    )
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            return _fail(f"cannot listen on {_address(host, port)}: {exc.strerror or exc}")
        what = "the aiodelay demo" if root == DEMO_DIR else str(root)
        bound_host, bound_port = runner.addresses[0][:2]
        url = f"http://{_address(bound_host, bound_port)}/"
        also = f", metrics at {url}metrics" if metrics else ""
        _announce(f"Serving {what} at {url} (Ctrl-C to stop){also}")
        await stop.wait()
        logging.getLogger("aiodelay").info(
            "stopping: requests in flight have up to %gs to end (aiohttp interrupts "
            "request-body reads after %gs), then they are cancelled",
            SHUTDOWN_TIMEOUT,
            # (after aiodelay's drain and aiohttp's first wait)
            SHUTDOWN_DRAIN + aiohttp_shutdown_timeout(SHUTDOWN_TIMEOUT),
        )
    finally:
        await runner.cleanup()
    return 0


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _announce(line: str) -> None:
    print(line, flush=True)


def _fail(message: str) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 1


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced, as under pytest)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


@contextlib.contextmanager
def _logging_to_stderr() -> Iterator[None]:
    """INFO lines on stderr, one format for all, while the server runs (and no longer).

    On the root logger, not only aiodelay's and aiohttp's: a script's own ``logging`` lines
    (any logger, the root one included) are the served site's log too, and without a handler
    they would be dropped below WARNING and written bare from it (logging's last resort).
    """
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
