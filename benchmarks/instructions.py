"""What a hello-world request costs the server, counted in CPU instructions (callgrind).

Requests per second on a shared machine vary by up to ±30% between runs (``overhead.py``);
the instructions a request executes, counted by ``valgrind --tool=callgrind``, hardly vary.
For each kind of app the script runs, under callgrind, one process with one asyncio loop in
which the app is served on a free port of 127.0.0.1 by a plain ``web.AppRunner(app)`` and
``TCPSite`` (aiohttp's defaults; no access log, logging being unconfigured) and a minimal
client, in the same loop, sends N ``GET / HTTP/1.1`` one after the other on one keep-alive
connection (``asyncio.open_connection``; after the first response, whose headers it parses,
it reads each response as that many bytes). The kinds (the apps of ``_apps.make_app``):

- ``bare``: the app alone (one route returning ``web.Response(text="Hello, world")``);
- ``empty``: the app with one empty pass-through ``@web.middleware``;
- ``aiodelay``: the app with ``aiodelay.setup(app)``;
- ``deadline``: with ``aiodelay.setup(app, deadline=30)``;
- ``observer``: with ``aiodelay.setup(app)`` and ``aiodelay.add_observer(app, obs)``, ``obs``
  an observer whose three methods do nothing;
- ``metrics``: with ``aiodelay.setup(app)`` and ``aiodelay.prometheus.setup(app)``;
- ``handwritten``: without aiodelay, the Prometheus middleware people write by hand: a
  counter of requests by method, route and status and a histogram of the handler's time by
  route (prometheus-client, a registry of its own);
- ``protocol`` (always measured): no aiohttp server but a minimal ``asyncio.Protocol`` that
  answers each request with a response of the same bytes. It measures what the client and the
  loop spend, which is subtracted from every other kind: what remains is the server's share.

Each kind runs twice, with N1 and N2 requests (``--requests``, default 1,000 and 3,000), in
separate valgrind runs of the whole program; (I2 - I1) / (N2 - N1) is then what one request
costs, the interpreter's start-up, the imports and building the app cancelling out. Runs go
in parallel (``--jobs``, default 2); each takes 10 to 20 s here.

Instruction counts are nearly deterministic, but for the seed of Python's string hashing:
with one ``PYTHONHASHSEED``, two runs differ by some tens of thousands of instructions in 1.7
billion; from one seed to another the start-up varies by about a million and a request by up
to 0.5% (where strings collide in dicts). So all runs of one repeat, every kind, N1 and N2
alike, use the same seed, and repeat r the seed ``--hash-seed`` + r (default 1, 2, 3, ...;
``--hash-seed random``: a random one per run, and the start-up no longer cancels exactly).
``--repeat`` measures every kind with several seeds; the table gives the median and the spread
(max - min) of the server's share across them, and two checkouts are compared seed by seed.
The memory layout moves counts too (CPython 3.11's method cache is indexed by the addresses of
attribute names): it changes with anything that changes the allocations at start-up, even the
length of the interpreter's path, so two checkouts of the same code (different paths, one on
PYTHONPATH, one without bytecode files) measured up to about 1,000 instructions per request
(0.4%) apart with one seed, and a few hundred apart in the median of three. Differences that
small are noise; differences of several thousand are not.

Ratios are given as requests per second would compare: instructions of the reference divided
by those of the kind (0.967x: the kind costs 3.4% more per request). ``vs aiodelay`` is against
the ``aiodelay`` kind of the same checkout.

``--aiodelay-path [LABEL=]DIR`` (repeatable) also runs the aiodelay kinds with the aiodelay of
another checkout, DIR, first on the measured process's PYTHONPATH, as ``aiodelay@LABEL``,
``deadline@LABEL``, ... (LABEL defaults to DIR's last component): two versions of the code
compared in one run. Every measured process reports which aiodelay it imported and a digest
of its sources: the script stops if that is not the copy intended, and notes it if the sources
changed during the run (someone editing the code under test).

Run (from the repository root, in the project's virtualenv; needs valgrind)::

    python benchmarks/instructions.py                          # all kinds, about 2 min
    python benchmarks/instructions.py --kinds empty,aiodelay --repeat 3
    python benchmarks/instructions.py --aiodelay-path /tmp/base --repeat 3   # about 8 min
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import NamedTuple

from _apps import AIODELAY_KINDS, APP_KINDS, TEXT, make_app
from _serve import (
    add_checkout_option,
    base_kind,
    callgrind_prelude,
    checkout_env,
    checkout_kinds,
    run_at_most,
)
from aiohttp import web

KINDS = APP_KINDS
#: The kinds with aiodelay: those that --aiodelay-path runs again with another checkout.
AIODELAY = AIODELAY_KINDS
#: The client and the loop alone, subtracted from every other kind.
PROTOCOL = "protocol"

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# -- the measured process ------------------------------------------------------------------


def protocol_response() -> bytes:
    """A response of the bytes aiohttp sends for ``hello`` (the Date fixed at start-up)."""
    from aiohttp.helpers import rfc822_formatted_time
    from aiohttp.http import SERVER_SOFTWARE

    return (
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(TEXT)}\r\nDate: {rfc822_formatted_time()}\r\n"
        f"Server: {SERVER_SOFTWARE}\r\n\r\n{TEXT}"
    ).encode()


class Answer(asyncio.Protocol):
    """The ``protocol`` kind's server: ``response`` for each request's end of headers."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.pending += data
        while (end := self.pending.find(b"\r\n\r\n")) >= 0:
            self.pending = self.pending[end + 4 :]
            self.transport.write(self.response)


async def ask(port: int, requests: int) -> int:
    """``requests`` GETs in a row on one connection; the size of each response in bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    response = head + await reader.readexactly(length)
    size = len(response)
    for _ in range(requests - 1):
        writer.write(REQUEST)
        response = await reader.readexactly(size)
        if not response.startswith(b"HTTP/1.1 200 "):
            break
    if not response.startswith(b"HTTP/1.1 200 ") or not response.endswith(TEXT.encode()):
        raise RuntimeError(f"unexpected response: {response!r}")
    writer.close()
    await writer.wait_closed()
    return size


async def serve_and_ask(kind: str, requests: int) -> int:
    if kind == PROTOCOL:
        response = protocol_response()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Answer(response), "127.0.0.1", 0)
        try:
            return await ask(server.sockets[0].getsockname()[1], requests)
        finally:
            server.close()
            await server.wait_closed()
    runner = web.AppRunner(make_app(kind))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return await ask(runner.addresses[0][1], requests)
    finally:
        await runner.cleanup()


def source_digest(package_file: str) -> str:
    """A digest of the ``.py`` files of the package of ``package_file``: which code ran."""
    root = os.path.dirname(package_file)
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as source:
                    digest.update(source.read() + b"\0")
    return digest.hexdigest()[:12]


def run_measured(kind: str, requests: int) -> int:
    """The body of a ``--measure`` child (the process valgrind counts)."""
    size = asyncio.run(serve_and_ask(kind, requests))
    module = sys.modules.get("aiodelay")
    print(f"SIZE {size}")
    if module is None or module.__file__ is None:
        print("AIODELAY - -")
    else:  # after the requests: the same work in both runs of a kind, so it cancels out
        print(f"AIODELAY {module.__file__} {source_digest(module.__file__)}")
    return 0


# -- the harness ---------------------------------------------------------------------------


class Run(NamedTuple):
    """One valgrind run of one kind."""

    kind: str
    requests: int
    repeat: int
    instructions: int
    size: int  # bytes of each response
    aiodelay: str  # aiodelay/__init__.py the process imported, or "-"
    digest: str  # of that aiodelay's sources when the process ended, or "-"
    seconds: float


def callgrind(
    valgrind: str, kind: str, requests: int, repeat: int, args: argparse.Namespace, out_dir: str
) -> Run:
    """Run ``kind`` with ``requests`` requests under callgrind; its whole-program count."""
    out = os.path.join(out_dir, f"callgrind.{kind}.{requests}.{repeat}.out")
    cmd = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
    cmd += [__file__, "--measure", base_kind(kind), "--count", str(requests)]
    env = dict(checkout_env(kind, args.aiodelay_path) or os.environ)
    if args.hash_seed == "random":
        env.pop("PYTHONHASHSEED", None)
    else:
        env["PYTHONHASHSEED"] = str(int(args.hash_seed) + repeat)
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.monotonic() - started
    if proc.returncode:
        raise RuntimeError(f"{kind} x {requests} failed ({proc.returncode}):\n{proc.stderr}")
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    instructions = None
    with open(out, encoding="utf-8", errors="replace") as counts:
        for line in counts:
            if line.startswith(("summary:", "totals:")):
                instructions = int(line.split()[1])
                break
    if instructions is None:
        raise RuntimeError(f"no summary line in {out}")
    if not args.keep:
        os.unlink(out)
    aiodelay, digest = lines["AIODELAY"].split()
    return Run(kind, requests, repeat, instructions, int(lines["SIZE"]), aiodelay, digest, seconds)


def check_aiodelay(runs: Sequence[Run], checkouts: Sequence[tuple[str, str]]) -> list[str]:
    """Which aiodelay each kind imported (and a digest of its sources); RuntimeError if a kind
    imported another one. A kind whose runs saw different sources gets a note: the code under
    test changed during the run, and its numbers mix two versions."""
    paths = {label: os.path.realpath(path) + os.sep for label, path in checkouts}
    lines = []
    for kind in dict.fromkeys(run.kind for run in runs):
        found = {run.aiodelay for run in runs if run.kind == kind}
        _, sep, label = kind.partition("@")
        path = found.pop() if len(found) == 1 else ""
        if base_kind(kind) not in AIODELAY:
            right = path == "-"
        elif sep:
            right = os.path.realpath(path) == os.path.join(paths[label], "aiodelay", "__init__.py")
        else:  # the virtualenv's: none of the other checkouts'
            right = path not in ("", "-") and not os.path.realpath(path).startswith(
                tuple(paths.values())
            )
        if not right:
            raise RuntimeError(f"{kind} imported aiodelay from {sorted(found) or path}")
        if path != "-":
            digests = sorted({run.digest for run in runs if run.kind == kind})
            lines.append(f"{kind:18s} imported {path}, sources {', '.join(digests)}")
            if len(digests) > 1:
                lines.append(f"{'':18s} note: its sources changed during the run")
    return lines


def report(runs: Sequence[Run], kinds: Sequence[str], n1: int, n2: int) -> dict[str, list[float]]:
    """Print the server's instructions per request, per kind, and the ratios; return those
    instructions per request, a list per kind with a value per repeat (seed), in order."""
    count = {(run.kind, run.requests, run.repeat): run.instructions for run in runs}
    repeats = sorted({run.repeat for run in runs})

    def per_request(kind: str, repeat: int) -> float:
        return (count[kind, n2, repeat] - count[kind, n1, repeat]) / (n2 - n1)

    client = [per_request(PROTOCOL, r) for r in repeats]
    server = {
        kind: [per_request(kind, r) - per_request(PROTOCOL, r) for r in repeats] for kind in kinds
    }
    median = {kind: statistics.median(values) for kind, values in server.items()}

    def spread(values: Sequence[float]) -> str:
        return f"{max(values) - min(values):8,.0f}" if len(values) > 1 else f"{'-':>8s}"

    def versus(kind: str, reference: str) -> str:
        if reference not in median or reference == kind:
            return f"{'':19s}"
        extra = median[kind] - median[reference]
        return f"{extra:+9,.0f} {median[reference] / median[kind]:7.3f}x"

    print(
        f"\ninstructions per request, server side: ((I{n2} - I{n1}) / {n2 - n1}) of the kind "
        f"minus the same of {PROTOCOL!r}; medians of {len(repeats)} repeat(s)"
    )
    print(
        f"{'kind':18s} {'instr/req':>10s} {'spread':>8s}   {'vs empty':>19s}   "
        f"{'vs aiodelay':>19s}   (spread: max - min across repeats; ratios as req/s would be)"
    )
    print(
        f"{'client + loop':18s} {statistics.median(client):10,.0f} {spread(client)}   "
        f"(the {PROTOCOL!r} kind, subtracted from the others)"
    )
    for kind in kinds:
        _, sep, label = kind.partition("@")
        own = f"aiodelay{sep}{label}"  # the aiodelay kind of the same checkout
        print(
            f"{kind:18s} {median[kind]:10,.0f} {spread(server[kind])}   {versus(kind, 'empty')}"
            f"   {versus(kind, own)}"
        )
    labelled = [kind for kind in kinds if "@" in kind and base_kind(kind) in median]
    if labelled:
        print(
            "\nthis checkout vs another, seed by seed (server side): median of the differences "
            "in instructions per request, their spread, each; ratio of the medians as req/s "
            "would be"
        )
        for kind in labelled:
            this = base_kind(kind)
            diffs = [a - b for a, b in zip(server[this], server[kind], strict=True)]
            each = ", ".join(f"{diff:+,.0f}" for diff in diffs)
            print(
                f"{this:10s} vs {kind:18s} {statistics.median(diffs):+9,.0f} {spread(diffs)}"
                f"   {median[kind] / median[this]:.3f}x   ({each})"
            )
    return server


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Measure the kinds of ``args`` (from :func:`parse_args`) and print the report; return
    the server's instructions per request, per kind, a value per repeat (see :func:`report`).
    ``RuntimeError`` if a run fails."""
    n1, n2 = args.requests
    kinds = checkout_kinds(
        [kind for kind in KINDS if kind in args.kinds], args.aiodelay_path, AIODELAY
    )
    valgrind = callgrind_prelude(kinds, args.aiodelay_path)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    seeds = "random" if args.hash_seed == "random" else f"{args.hash_seed} + repeat"
    print(
        f"{len(kinds) + 1} kinds x {n1} and {n2} requests x {args.repeat} repeat(s), "
        f"{args.jobs} run(s) at a time, PYTHONHASHSEED {seeds}"
    )
    jobs = [
        (kind, requests, repeat)
        for repeat in range(args.repeat)
        for kind in [PROTOCOL, *kinds]
        for requests in (n1, n2)
    ]
    with tempfile.TemporaryDirectory(prefix="instructions-") as scratch:
        out_dir = args.keep or scratch
        runs = run_at_most(
            [functools.partial(callgrind, valgrind, *job, args, out_dir) for job in jobs],
            args.jobs,
            lambda run: (
                f"  {run.kind:18s} {run.requests:6d} requests, repeat {run.repeat + 1}: "
                f"{run.instructions:15,d} instructions, {run.seconds:5.1f} s"
            ),
        )
    sizes = {run.size for run in runs}
    if len(sizes) != 1:
        sized = sorted({(run.kind, run.size) for run in runs})
        print(f"note: the responses differ in size: {sized}")
    for line in check_aiodelay(runs, args.aiodelay_path):
        print(line)
    return report(runs, kinds, n1, n2)


def comma_list(value: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items or any(item not in KINDS for item in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(KINDS)}")
    return items


def two_counts(value: str) -> tuple[int, int]:
    try:
        n1, n2 = (int(item) for item in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected N1,N2, e.g. 1000,3000") from None
    if not 2 <= n1 < n2 <= 100_000:
        raise argparse.ArgumentTypeError("expected 2 <= N1 < N2 <= 100000")
    return n1, n2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of ``argv``, checked (a bad one exits through ``parser.error``)."""
    parser = argparse.ArgumentParser(
        prog=os.path.basename(__file__),  # also when features.py runs this
        description="instructions the server spends per hello-world request (callgrind), "
        "for several kinds of app",
    )
    parser.add_argument(
        "--kinds",
        type=comma_list,
        default=list(KINDS),
        help=f"apps to measure (default {','.join(KINDS)}; {PROTOCOL!r} is always measured)",
    )
    parser.add_argument(
        "--requests",
        type=two_counts,
        default=(1000, 3000),
        metavar="N1,N2",
        help="requests in the two runs of each kind (default 1000,3000)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="measurements of each kind (default 1)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="valgrind runs at a time (default 2)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds allowed per run (default 600)"
    )
    parser.add_argument(
        "--hash-seed",
        default="1",
        help="PYTHONHASHSEED of the first repeat's runs, the next one's + 1, ... (default 1); "
        "'random': a random one per run",
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="keep the callgrind.*.out files in DIR (for callgrind_annotate)",
    )
    add_checkout_option(parser)
    # The measured process, run under valgrind.
    parser.add_argument("--measure", choices=(PROTOCOL, *KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 20 or not 1 <= args.jobs <= 64:
        parser.error("--repeat must be between 1 and 20, --jobs between 1 and 64")
    if args.hash_seed != "random" and not (
        args.hash_seed.isdigit() and int(args.hash_seed) + args.repeat <= 4294967295
    ):
        parser.error("--hash-seed must be 'random' or a number from 0 to 4294967295")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        return run_measured(args.measure, args.count)
    try:
        measure(args)
    except RuntimeError as exc:
        print(f"instructions.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
