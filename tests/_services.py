"""Real services for end-to-end tests: gunicorn and nginx as child processes, on loopback.

- :func:`require` skips a test whose tool is missing, with a message saying what to install;
  in CI (the ``CI`` environment variable set, as ``.ci/run`` does) it fails instead.
- :class:`Lines` reads a child's output as it comes, and waits for a line (never a sleep).
- :func:`gunicorn` runs ``python -m gunicorn`` with aiohttp's worker on a free port of
  127.0.0.1 (``--bind 127.0.0.1:0``; the port is read from its "Listening at" line).
- :func:`run_example` runs an example app as its README says, on the port given with ``--port``.
- :func:`nginx` runs nginx with a complete configuration (the deployment guide's), in the
  foreground, with its prefix, and so its pid file, logs and temp directories, under a test's
  directory: never the system's nginx or its files.

Each child runs in its own session; what is still running at the end is stopped by its pid
(SIGKILL to its process group only if it does not stop by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = (
    "Gunicorn",
    "Lines",
    "Nginx",
    "free_port",
    "gunicorn",
    "nginx",
    "require",
    "run_example",
)

_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# nginx lives in /usr/sbin, which is not on every user's PATH.
_SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])


def missing(message: str) -> NoReturn:
    """Skip the test, saying what to install; in CI, where it is installed, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require(tool: str) -> str:
    """The path of ``tool`` (``"nginx"``), ``sys.executable`` for ``"gunicorn"`` (run as
    ``python -m gunicorn``, so it is the virtualenv's) or the DSN of a PostgreSQL server for
    ``"postgresql"`` (``$AIODELAY_TEST_PG_DSN``); skip or fail if it is missing."""
    if tool == "postgresql":
        dsn = os.environ.get("AIODELAY_TEST_PG_DSN")
        if not dsn:
            missing(
                "AIODELAY_TEST_PG_DSN is not set: this test needs a real PostgreSQL (Debian: "
                'apt-get install -y postgresql, then eval "$(.ci/postgres.sh start)" for a '
                "throwaway cluster; .ci/run does both)"
            )
        return dsn
    if tool == "gunicorn":
        if importlib.util.find_spec("gunicorn") is None:
            missing("gunicorn is not installed: pip install -e '.[test]' (or pip install gunicorn)")
        return sys.executable
    if tool == "nginx":
        found = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), _SBIN]))
        if found is None:
            missing(
                "nginx not found: this test needs a real nginx "
                "(Debian: apt-get install -y nginx-light; .ci/run installs it)"
            )
        return found
    raise ValueError(f"unknown tool {tool!r}")


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Lines:
    """The lines a child writes to a pipe, read as they come."""

    def __init__(self, name: str, stream: asyncio.StreamReader) -> None:
        self.name = name
        self.lines: list[str] = []
        self.ended = False
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        try:
            while line := await stream.readline():
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.set()
        finally:
            self.ended = True
            self._changed.set()

    async def wait(
        self, match: Callable[[str], bool], what: str, *, count: int = 1, timeout: float = 10
    ) -> list[str]:
        """The first ``count`` lines (so far, from the start) for which ``match`` is true, once
        there are that many; ``AssertionError`` saying what was awaited, with the output, if
        the output ends first or ``timeout`` runs out."""

        async def lines() -> list[str]:
            while True:
                found = [line for line in self.lines if match(line)]
                if len(found) >= count:
                    return found[:count]
                if self.ended:
                    raise AssertionError(f"{self.name} ended before {what}:\n{self.text()}")
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(lines(), timeout)
        except asyncio.TimeoutError:
            message = f"no {what} after {timeout}s from {self.name}:\n{self.text()}"
            raise AssertionError(message) from None

    async def finished(self, timeout: float = 10) -> None:
        """Wait until the output ended (every process that held the pipe closed it)."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)

    def text(self) -> str:
        return "\n".join(self.lines[-60:])

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def _spawn(
    name: str, argv: Sequence[str], **kwargs: object
) -> tuple[asyncio.subprocess.Process, Lines]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # the child and its workers: a group of their own
        **kwargs,  # type: ignore[arg-type]
    )
    assert proc.stdout is not None
    return proc, Lines(name, proc.stdout)


async def _stop(proc: asyncio.subprocess.Process, sig: signal.Signals, timeout: float) -> None:
    """Send ``sig`` if it still runs and wait ``timeout`` for it; then SIGKILL its group."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of its group (its own session)
    await proc.wait()


def _gunicorn_version() -> tuple[int, ...]:
    release = re.match(r"\d+(?:\.\d+)*", importlib.metadata.version("gunicorn"))
    return tuple(int(part) for part in release[0].split(".")) if release else ()


@dataclass
class Gunicorn:
    proc: asyncio.subprocess.Process
    port: int
    output: Lines

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.asynccontextmanager
async def gunicorn(
    app: str,
    *,
    workers: int = 2,
    worker_class: str = "aiohttp.GunicornWebWorker",
    args: Sequence[str] = (),
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    start_timeout: float = 30,
) -> AsyncIterator[Gunicorn]:
    """``gunicorn APP --worker-class WORKER_CLASS -w WORKERS --bind 127.0.0.1:0 ARGS``, running
    until the block ends (then SIGINT: a quick stop), with ``env`` (None: this process's
    environment). Yields once the arbiter listens and every worker has booted; its output
    (stdout and stderr) is in ``.output``."""
    python = require("gunicorn")
    argv = [python, "-m", "gunicorn", app, "--worker-class", worker_class]
    argv += ["-w", str(workers), "--bind", "127.0.0.1:0", *args]
    if _gunicorn_version() >= (25, 1):
        argv.append("--no-control-socket")  # else it makes ~/.gunicorn/gunicorn.ctl
    proc, output = await _spawn("gunicorn", argv, cwd=cwd, env=env)
    try:
        [listening] = await output.wait(
            lambda line: "Listening at: " in line, "'Listening at'", timeout=start_timeout
        )
        found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", listening)
        assert found is not None, listening
        await output.wait(
            lambda line: "Booting worker with pid" in line,
            f"{workers} booted workers",
            count=workers,
            timeout=start_timeout,
        )
        yield Gunicorn(proc, int(found[1]), output)
    finally:
        await _stop(proc, signal.SIGINT, 10)
        await output.close()


@dataclass
class Nginx:
    proc: asyncio.subprocess.Process
    port: int
    prefix: Path
    output: Lines

    def access_log(self) -> str:
        return (self.prefix / "access.log").read_text(encoding="utf-8", errors="replace")


def _nginx_conf(prefix: Path, conf: str) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # As root, nginx's workers would switch to "nobody", who cannot enter a test's directory.
        conf = "user root;\n" + conf
    path = prefix / "nginx.conf"
    path.write_text(conf, encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def nginx(prefix: Path, conf: str, *, port: int) -> AsyncIterator[Nginx]:
    """nginx with the complete configuration ``conf``, which runs it in the foreground
    (``daemon off``), logs to stderr at ``notice``, listens on ``127.0.0.1:port`` and keeps its
    files under the prefix (relative paths), here ``prefix``. Yields once it listens (its
    master logs "start worker process" after it opened the listening sockets)."""
    binary = require("nginx")
    path = _nginx_conf(prefix, conf)
    argv = [binary, "-p", str(prefix), "-c", str(path), "-e", "stderr"]
    proc, output = await _spawn("nginx", argv)
    try:
        await output.wait(lambda line: "start worker process" in line, "a started worker")
        yield Nginx(proc, port, prefix, output)
    finally:
        await _stop(proc, signal.SIGQUIT, 10)  # SIGQUIT: nginx's graceful stop
        await output.close()


@contextlib.asynccontextmanager
async def run_example(
    script: str, *args: str, port: int, env: Mapping[str, str] | None = None
) -> AsyncIterator[Lines]:
    """``python examples/<script> *args --port PORT``, run as its README says, once it says it
    listens on ``port``; stopped as Ctrl-C stops it (SIGINT) at the end."""
    argv = [sys.executable, str(_EXAMPLES / script), *args, "--port", str(port)]
    proc, lines = await _spawn(
        script, argv, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    )
    try:
        await lines.wait(
            lambda line: f"Running on http://127.0.0.1:{port}" in line, f"'Running on' port {port}"
        )
        yield lines
    finally:
        await _stop(proc, signal.SIGINT, 10)
        await lines.close()
