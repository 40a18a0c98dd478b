"""The benchmark scripts' one harness: a server in a process of its own.

:class:`ServerProcess` is the parent's side of every server child: it starts the child, waits
for its ``PORT <n>`` line, talks to it a line at a time if the child takes commands (the drop
servers of ``_dropserver.py`` do), keeps or discards its stderr, and stops it.

:func:`run_server` is the body of the simplest child: a script re-runs itself with
``--serve KIND``; that child builds the app, serves it on a free port of 127.0.0.1 with a
plain ``web.AppRunner(app)`` (aiohttp's defaults), prints ``PORT <n>`` on stdout and serves
until its stdin closes (the parent stops it, or died). It also stops by itself after
``max_seconds``, so no server outlives a benchmark.

``--aiodelay-path [LABEL=]DIR`` (:func:`add_checkout_option`, in every script that compares
aiodelay with something) adds, for each aiodelay kind, a kind ``KIND@LABEL`` served by a child
whose ``PYTHONPATH`` puts DIR first, so that it imports another checkout's aiodelay (the
virtualenv's, an editable install of this one, comes after it): two versions of the code in one
run. The label defaults to DIR's last component (``/tmp/base``: ``aiodelay@base``).

Also here: the CPU and ``/proc`` helpers the scripts pin and measure their processes with
(:func:`two_cpus`, :func:`pin_to_cpu`, :func:`raise_fd_limit`, :func:`read_rss`,
:func:`sched`, :func:`cpu_seconds`), and what ``instructions.py`` and ``drop_instructions.py``
share: :func:`callgrind_prelude`, and :func:`run_at_most`, which runs their valgrind runs a few
at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

from _report import git
from aiohttp import web

if TYPE_CHECKING:
    from typing import Self

__all__ = (
    "ServerProcess",
    "add_checkout_option",
    "base_kind",
    "checkout_env",
    "checkout_kinds",
    "cpu_seconds",
    "describe_checkouts",
    "pin_to_cpu",
    "raise_fd_limit",
    "read_rss",
    "run_server",
    "sched",
    "two_cpus",
)

#: A server child stops by itself after this long, whatever happens to its parent.
MAX_SERVER_SECONDS = 1800.0


def two_cpus() -> tuple[int, int] | None:
    """Two distinct CPUs this process may use (server, load generator), or None."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return cpus[0], cpus[1]


def pin_to_cpu(cpu: int | None) -> None:
    """Pin this process to ``cpu`` (no-op for None or where the OS cannot)."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def raise_fd_limit(needed: int) -> int:
    """Raise the soft open-files limit to at least ``needed`` if the hard limit allows it.

    Returns the soft limit in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def read_rss(pid: int | str = "self") -> int:
    """Resident set size of a process in bytes, from ``/proc/PID/status`` (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def sched(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting for one) of a process's main thread (a server's
    event loop) so far, from ``/proc/PID/schedstat``; NaNs where the kernel has no such file.
    """
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as schedstat:
            run, wait = schedstat.read().split()[:2]
        return int(run) / 1e9, int(wait) / 1e9
    except (OSError, ValueError):
        return math.nan, math.nan


def cpu_seconds(pid: int) -> float:
    """CPU time a process has run so far, in seconds.

    From ``/proc/PID/schedstat`` (:func:`sched`: the main thread) where the kernel has it,
    else from the clock ticks of ``/proc/PID/stat`` (all threads).
    """
    run = sched(pid)[0]
    if not math.isnan(run):
        return run
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


# -- another checkout of aiodelay (--aiodelay-path) ------------------------------------------


def checkout(value: str) -> tuple[str, str]:
    """``[LABEL=]DIR`` of ``--aiodelay-path`` as (label, absolute DIR)."""
    label, sep, path = value.partition("=")
    if not sep or "/" in label:  # no label: the whole value is the path
        label, path = "", value
    path = os.path.abspath(path)
    label = label or os.path.basename(path)
    if not os.path.isfile(os.path.join(path, "aiodelay", "__init__.py")):
        raise argparse.ArgumentTypeError(f"{path} holds no aiodelay/__init__.py")
    if not label or "@" in label or "," in label:
        raise argparse.ArgumentTypeError(f"bad label {label!r} for {path}: give LABEL=DIR")
    return label, path


class _Checkouts(argparse.Action):
    """Appends a (label, DIR) to ``args.aiodelay_path``; the labels must differ."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        checkouts: list[tuple[str, str]] = [*getattr(namespace, self.dest), values]
        labels = [label for label, _ in checkouts]
        if len(set(labels)) != len(labels):
            parser.error(f"two checkouts labelled {values[0]!r}: give LABEL=DIR")
        setattr(namespace, self.dest, checkouts)


def add_checkout_option(parser: argparse.ArgumentParser) -> None:
    """``--aiodelay-path [LABEL=]DIR`` (repeatable), parsed into ``args.aiodelay_path``."""
    parser.add_argument(
        "--aiodelay-path",
        metavar="[LABEL=]DIR",
        type=checkout,
        action=_Checkouts,
        default=[],
        help="also serve the aiodelay kinds with the aiodelay of checkout DIR (first on the "
        "server's PYTHONPATH), as KIND@LABEL; LABEL defaults to DIR's last component "
        "(repeatable)",
    )


def checkout_kinds(
    kinds: Iterable[str], checkouts: Sequence[tuple[str, str]], of: Iterable[str]
) -> list[str]:
    """``kinds``, then ``KIND@LABEL`` for each checkout and each of ``kinds`` also in ``of``."""
    kinds = list(kinds)
    return kinds + [f"{kind}@{label}" for label, _ in checkouts for kind in kinds if kind in of]


def base_kind(kind: str) -> str:
    """The kind a ``KIND@LABEL`` serves (``aiodelay@base``: ``aiodelay``)."""
    return kind.partition("@")[0]


_checked: dict[str, dict[str, str]] = {}


def checkout_env(kind: str, checkouts: Sequence[tuple[str, str]]) -> dict[str, str] | None:
    """The environment of the child that serves ``kind``: None (this one's) for a kind without
    a label; for ``KIND@LABEL``, PYTHONPATH with the checkout first, checked once by importing
    aiodelay in a child the way the scripts' children do (``RuntimeError`` if that finds
    another copy). No bytecode is written there: the checkout stays as it is."""
    _, sep, label = kind.partition("@")
    if not sep:
        return None
    path = dict(checkouts)[label]
    if path not in _checked:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (path, env.get("PYTHONPATH"))))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        # From this directory, as the children run: sys.path[0] is then where the scripts are.
        found = subprocess.run(
            [sys.executable, "-c", "import aiodelay; print(aiodelay.__file__)"],
            env=env,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        expected = os.path.join(path, "aiodelay", "__init__.py")
        if os.path.realpath(found) != os.path.realpath(expected):
            raise RuntimeError(f"with {path} first on PYTHONPATH, aiodelay is {found}")
        _checked[path] = env
    return _checked[path]


def describe_checkouts(checkouts: Sequence[tuple[str, str]]) -> list[str]:
    """A line per checkout for the report: its label, path and git commit."""
    return [
        f"aiodelay@{label}: {path}/aiodelay (git {git(path, 'describe', '--always', '--dirty')})"
        for label, path in checkouts
    ]


def callgrind_prelude(kinds: Iterable[str], checkouts: Sequence[tuple[str, str]]) -> str:
    """What ``instructions.py`` and ``drop_instructions.py`` do first: find valgrind
    (``RuntimeError`` if it is not on PATH), check that each kind's checkout imports its own
    aiodelay (:func:`checkout_env`, so that a wrong one fails before the long runs), and print
    the versions and the checkouts. valgrind's path."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("valgrind is not on PATH (apt-get install valgrind)")
    for kind in kinds:
        checkout_env(kind, checkouts)
    import aiohttp

    version = subprocess.run([valgrind, "--version"], capture_output=True, text=True)
    print(
        f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, {version.stdout.strip()}"
    )
    for line in describe_checkouts(checkouts):
        print(line)
    return valgrind


_R = TypeVar("_R")


def run_at_most(
    calls: Sequence[Callable[[], _R]], at_once: int, say: Callable[[_R], str]
) -> list[_R]:
    """Run ``calls``, ``at_once`` of them at a time (in threads: each waits for a process of
    its own), and print ``say(result)`` of each as it ends; the results, in the order they
    ended. The first call that raises is raised once the calls not started are cancelled and
    those running have ended."""
    results: list[_R] = []
    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        futures = [pool.submit(call) for call in calls]
        try:
            for future in concurrent.futures.as_completed(futures):
                result = future.result()
                results.append(result)
                print(say(result), flush=True)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def run_server(
    make_app: Callable[[], web.Application],
    *,
    use_uvloop: bool,
    cpu: int | None,
    max_seconds: float = MAX_SERVER_SECONDS,
) -> None:
    """Serve ``make_app()`` until stdin closes; the body of a ``--serve`` child."""
    pin_to_cpu(cpu)
    main = _serve(make_app, max_seconds)
    if use_uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


async def _serve(make_app: Callable[[], web.Application], max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stdin = sys.stdin.fileno()
    # Readable stdin means EOF here: the parent never writes, it only closes the pipe.
    loop.add_reader(stdin, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    deadline = loop.call_later(max_seconds, stop.set)
    runner = web.AppRunner(make_app())
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(f"PORT {port}", flush=True)
        await stop.wait()
    finally:
        deadline.cancel()
        loop.remove_reader(stdin)
        await runner.cleanup()


class ServerProcess:
    """A server child of a benchmark script, as a context manager; its stdin and stdout are a
    line channel.

    ``argv`` is the child's command line after the interpreter, ``env`` its environment (None:
    this process's). The child says ``PORT <n>``, maybe followed by words of its own
    (:attr:`said`: the drop servers name their event loop), on its stdout when it serves;
    after that the parent may :meth:`send` it lines and :meth:`expect` its answers (the
    ``--serve`` children of :func:`run_server` read none: their stdin only tells them when to
    stop). Every wait, for the ``PORT`` line, an answer or the child's exit, lasts at most
    ``timeout`` seconds, and a wait that runs out raises ``RuntimeError``.

    The child's stderr is this process's (``stderr="inherit"``), or kept in a temporary file
    (``"capture"``: :meth:`stderr_text`, and the last lines in the error when the child
    dies), or thrown away (``"devnull"``). On exit the child is let go on in case it was
    stopped (SIGCONT: a stopped process would never see its stdin close), its stdin is
    closed, and it is killed if it has not stopped within ``timeout``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 15.0,
        env: dict[str, str] | None = None,
        stderr: Literal["inherit", "capture", "devnull"] = "inherit",
        name: str | None = None,
    ) -> None:
        self.argv = [sys.executable, *argv]
        self.timeout = timeout
        self.env = env
        self.stderr = stderr
        self.name = name or " ".join(os.path.basename(arg) for arg in argv[:3])
        self.port = 0
        #: The words after the port on the child's ``PORT`` line.
        self.said: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._buffer = b""

    @property
    def pid(self) -> int:
        assert self._proc is not None, "the server is not running"
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        if self.stderr == "capture":
            self._stderr = tempfile.TemporaryFile()
        elif self.stderr == "devnull":
            self._stderr = open(os.devnull, "wb")  # closed in _stop()
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=self.env,
        )
        try:
            _, port, *self.said = self.expect("PORT").split()
            self.port = int(port)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def send(self, line: str) -> None:
        """Write ``line`` to the child's stdin."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()

    def expect(self, word: str, timeout: float | None = None) -> str:
        """The child's next line, which must start with ``word``."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                raise RuntimeError(f"{self.name} server: no {word} line within the timeout")
            data = os.read(fd, 1 << 20)
            if not data:
                raise RuntimeError(f"{self.name} server exited: {self.stderr_tail()}")
            self._buffer += data
        raw, self._buffer = self._buffer.split(b"\n", 1)
        line = raw.decode()
        if not line.startswith(word):
            raise RuntimeError(f"{self.name} server said {line[:200]!r}, not {word}")
        return line

    def command(self, line: str) -> str:
        """Send ``line``, and return the answer, which starts with the line's first word."""
        self.send(line)
        return self.expect(line.split()[0])

    def stderr_text(self) -> str:
        """What the child wrote to stderr so far ("" unless ``stderr="capture"``)."""
        stderr = self._stderr
        if stderr is None or self.stderr != "capture":
            return ""
        stderr.flush()
        stderr.seek(0)
        text = stderr.read().decode(errors="replace")
        stderr.seek(0, os.SEEK_END)
        return text

    def stderr_tail(self) -> str:
        """The last lines of :meth:`stderr_text`, joined with `` | ``, for an error message."""
        if self.stderr == "inherit":
            return "(its stderr is above)"
        if self.stderr == "devnull":
            return "(its stderr went to /dev/null)"
        tail = self.stderr_text().strip().splitlines()[-5:]
        return " | ".join(tail) or "(nothing on stderr)"

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):  # a stopped child would never see EOF
                os.kill(proc.pid, signal.SIGCONT)
            assert proc.stdin is not None
            assert proc.stdout is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
