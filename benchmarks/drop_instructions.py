"""What a dropped request costs the server, counted in CPU instructions (callgrind).

``storm.py`` measures a storm's CPU time per drop, which varies by 15% or more on a shared
machine; the instructions a drop executes hardly vary. For each kind of drop server
(``_dropserver.py``: ``aiohttp``, ``aiohttp-mw``, ``aiodelay``, ``aiohttp-log``,
``aiodelay-log``; not Twisted) and each close (``FIN``, ``RST``), the script runs one process
under callgrind with one asyncio loop, in which the kind's app is served on a free port of
127.0.0.1 by ``web.AppRunner`` and ``TCPSite``, and a client in the same loop:

1. holds ``--warmup`` requests and drops them (not counted: first-time costs; none with
   ``--warmup 0``);
2. holds ``--count`` requests (one connection each) until their handlers have all started;
3. zeroes callgrind's counters, closes every client socket in one tight loop (a burst storm:
   the server runs only once the last is closed), runs the loop until every handler has seen
   its cancellation, the server holds no connection, and ten more turns have passed; then
   has callgrind write its counters.

What step 3 counted, divided by ``--count``, is what one drop costs the process. The client's
closes and the loop's turns are in it too: the kind ``protocol`` (always measured), a plain
``asyncio.Protocol`` server that holds each request and forgets its connection when it is
lost, measures that share, and it is subtracted from the other kinds: what remains is the
server's share, per drop. The garbage collections during step 3 (per generation, from
``gc.callbacks``) are counted too; the client's allocations are the same for every kind.

Counting only step 3 takes callgrind's client requests (``CALLGRIND_ZERO_STATS``,
``CALLGRIND_DUMP_STATS``), compiled at start-up into a small shared library (a C compiler and
valgrind's ``callgrind.h`` are needed: Debian's ``valgrind`` package has it) that the measured
process calls through ``ctypes``.

Runs use ``PYTHONHASHSEED`` ``--hash-seed`` + repeat, as ``instructions.py`` does (see there
for how much the seed and the memory layout move counts), and ``--aiodelay-path`` compares
another checkout's aiodelay, seed by seed.

Run (from the repository root, in the project's virtualenv)::

    python benchmarks/drop_instructions.py                     # every kind, FIN and RST, ~4 min
    python benchmarks/drop_instructions.py --kinds aiohttp-log,aiodelay-log --repeat 3
    python benchmarks/drop_instructions.py --aiodelay-path base=/tmp/base --closes FIN
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TextIO

import _dropserver
from _drops import CLOSES, close_all, comma_list, open_held
from _serve import (
    add_checkout_option,
    base_kind,
    callgrind_prelude,
    checkout_env,
    checkout_kinds,
    raise_fd_limit,
    run_at_most,
)

#: The drop servers measured (Twisted's runs no asyncio loop to count in).
KINDS = tuple(kind for kind in _dropserver.KINDS if kind != "twisted")
#: The client's closes and the loop's turns alone, subtracted from every other kind.
PROTOCOL = "protocol"
#: Each kind is held against this one (and the log kinds against ``aiohttp-log``).
REFERENCE = "aiohttp"
#: Turns of the loop run after the server is idle, inside the count.
TURNS = 10

SHIM = r"""
#include <valgrind/callgrind.h>
void zero_stats(void) { CALLGRIND_ZERO_STATS; }
void dump_stats(void) { CALLGRIND_DUMP_STATS; }
"""


# -- the measured process ------------------------------------------------------------------


class Held(asyncio.Protocol):
    """The ``protocol`` kind's connection: it holds its request and forgets it when lost."""

    def __init__(self, recorder: _dropserver.Recorder, connections: set[Held]) -> None:
        self.recorder = recorder
        self.connections = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.recorder.start(0, 0.0)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.recorder.cancel(0, 0.0)


#: Turns of the loop a server may take to let go of its connections once every handler saw
#: its cancellation (aiodelay's teardown takes two).
MAX_TURNS = 1000


async def drop_storm(
    kind: str, close: str, count: int, warmup: int, shim: Any, log: TextIO
) -> list[int]:
    """Serve ``kind``, hold and drop ``warmup`` requests, then hold ``count`` and count their
    drop (see the module's docstring); the collections during it, per generation. The log
    kinds write their lines to ``log``."""
    loop = asyncio.get_running_loop()
    reached = {"STARTED": asyncio.Event(), "CANCELLED": asyncio.Event()}

    def emit(line: str) -> None:
        reached[line.split()[0]].set()

    recorder = _dropserver.Recorder(emit, dict)
    connections: set[Held] = set()
    if kind == PROTOCOL:
        server = await loop.create_server(
            lambda: Held(recorder, connections),
            "127.0.0.1",
            0,
            backlog=_dropserver.BACKLOG,
        )
        port = server.sockets[0].getsockname()[1]
        busy: Callable[[], int] = connections.__len__
    else:
        from aiohttp import web

        runner = _dropserver.make_runner(kind, recorder, _dropserver.drop_logger(kind, log))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=_dropserver.BACKLOG)
        await site.start()
        port = runner.addresses[0][1]
        server_of_runner = runner.server
        assert server_of_runner is not None
        busy = lambda: len(server_of_runner.connections)  # noqa: E731 - (a new list each time)
    try:
        counted: list[int] = []
        for held, measured in ((warmup, False), (count, True)):
            if not held:
                continue  # (no warm-up)
            for event in reached.values():
                event.clear()
            recorder.want_started = recorder.n_started + held
            recorder.want_cancelled = recorder.n_cancelled + held
            socks = await open_held(port, range(held))
            await reached["STARTED"].wait()
            recorder.collections.take()  # (counted from here)
            if measured:
                shim.zero_stats()
            close_all(socks, close)
            await reached["CANCELLED"].wait()
            for _ in range(MAX_TURNS):
                if not busy():
                    break
                await asyncio.sleep(0)
            else:
                raise RuntimeError(f"{kind}: connections still open {MAX_TURNS} turns on")
            for _ in range(TURNS):
                await asyncio.sleep(0)
            if measured:
                shim.dump_stats()
                counted = recorder.collections.take()["counts"]
        return counted
    finally:
        if kind == PROTOCOL:
            server.close()
        else:
            await runner.cleanup()


def run_measured(kind: str, close: str, count: int, warmup: int, shim_path: str) -> int:
    """The body of a ``--measure`` child (the process valgrind counts)."""
    raise_fd_limit(_dropserver.files_needed(count + warmup))
    shim = ctypes.CDLL(shim_path)
    with open(os.devnull, "w", encoding="utf-8") as log:
        collections = asyncio.run(drop_storm(kind, close, count, warmup, shim, log))
    print("GC " + json.dumps(collections))
    module = sys.modules.get("aiodelay")
    print(f"AIODELAY {getattr(module, '__file__', None) or '-'}")
    return 0


# -- the harness ---------------------------------------------------------------------------


class Run(NamedTuple):
    """One valgrind run of one kind and close."""

    kind: str
    close: str
    repeat: int
    instructions: int  # counted while the requests were dropped
    collections: list[int]  # during the drops, per generation
    aiodelay: str  # aiodelay/__init__.py the process imported, or "-"
    seconds: float


def build_shim(directory: str) -> str:
    """Compile the client requests' shared library into ``directory``; its path."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH: needed for callgrind's client requests")
    source = os.path.join(directory, "callgrind_shim.c")
    with open(source, "w", encoding="utf-8") as file:
        file.write(SHIM)
    library = os.path.join(directory, "callgrind_shim.so")
    proc = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", library, source],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        first = (proc.stderr.strip().splitlines() or ["no message"])[0]
        raise RuntimeError(
            "compiling callgrind's client requests failed (valgrind/callgrind.h comes with "
            f"Debian's valgrind package): {first}"
        )
    return library


def callgrind(
    valgrind: str, kind: str, close: str, repeat: int, args: argparse.Namespace, scratch: str
) -> Run:
    """Run ``kind`` with ``close`` under callgrind; what the drops counted."""
    out = os.path.join(scratch, f"callgrind.{kind}.{close}.{repeat}.out")
    cmd = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
    cmd += [__file__, "--measure", base_kind(kind), "--close", close]
    cmd += ["--count", str(args.count), "--warmup", str(args.warmup), "--shim", args.shim]
    env = dict(checkout_env(kind, args.aiodelay_path) or os.environ)
    env["PYTHONHASHSEED"] = str(args.hash_seed + repeat)
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.monotonic() - started
    if proc.returncode:
        raise RuntimeError(f"{kind} {close} failed ({proc.returncode}):\n{proc.stderr}")
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    if "GC" not in lines or "AIODELAY" not in lines:
        raise RuntimeError(f"{kind} {close}: the measured process did not report its drops")
    instructions = None
    try:
        with open(out + ".1", encoding="utf-8", errors="replace") as counts:  # the dump's file
            for line in counts:
                if line.startswith(("summary:", "totals:")):
                    instructions = int(line.split()[1])
                    break
    except FileNotFoundError:
        raise RuntimeError(f"{kind} {close}: callgrind wrote no count of the drops") from None
    if instructions is None:
        raise RuntimeError(f"no summary line in {out}.1")
    return Run(
        kind,
        close,
        repeat,
        instructions,
        json.loads(lines["GC"]),
        lines["AIODELAY"].strip(),
        seconds,
    )


def report(runs: Sequence[Run], kinds: Sequence[str], closes: Sequence[str], count: int) -> None:
    """Print the server's instructions per drop and collections per storm, per kind."""
    repeats = sorted({run.repeat for run in runs})
    by = {(run.kind, run.close, run.repeat): run for run in runs}

    def server(kind: str, close: str) -> list[float]:
        return [
            (by[kind, close, r].instructions - by[PROTOCOL, close, r].instructions) / count
            for r in repeats
        ]

    print(
        f"\ninstructions per drop, server side: what {count:,} drops counted, less the "
        f"{PROTOCOL!r} kind's, / {count:,}; medians of {len(repeats)} repeat(s) (spread: max - "
        "min); ratios as drops per second would be; collections (gen 0/1/2) during the "
        "storm, medians"
    )
    print(
        f"{'kind':18s} {'close':5s} {'instr/drop':>10s} {'spread':>8s} {'vs aiohttp':>18s} "
        f"{'vs aiohttp-log':>18s} {'gc 0/1/2':>10s}"
    )
    for close in closes:
        own = [by[PROTOCOL, close, r].instructions / count for r in repeats]
        collected = [by[PROTOCOL, close, r].collections for r in repeats]
        print(
            f"{PROTOCOL:18s} {close:5s} {statistics.median(own):10,.0f} {'':8s} "
            f"{'(client + loop: subtracted)':>37s} {gc_text(collected):>10s}"
        )
        medians = {kind: statistics.median(server(kind, close)) for kind in kinds}
        for kind in kinds:
            values = server(kind, close)
            spread = f"{max(values) - min(values):8,.0f}" if len(values) > 1 else f"{'-':>8s}"

            log_reference = "aiohttp-log" if base_kind(kind) in _dropserver.LOGGING else ""
            collected = [by[kind, close, r].collections for r in repeats]
            against = versus(medians, kind, REFERENCE), versus(medians, kind, log_reference)
            print(
                f"{kind:18s} {close:5s} {medians[kind]:10,.0f} {spread} {against[0]} "
                f"{against[1]} {gc_text(collected):>10s}"
            )
    labelled = [kind for kind in kinds if "@" in kind]
    if labelled:
        print(
            "\nthis checkout vs another, seed by seed (server side): median of the differences "
            "in instructions per drop (each)"
        )
        for close in closes:
            for kind in labelled:
                this = base_kind(kind)
                if this not in kinds:
                    continue
                pairs = zip(server(this, close), server(kind, close), strict=True)
                diffs = [a - b for a, b in pairs]
                each = ", ".join(f"{diff:+,.0f}" for diff in diffs)
                median = statistics.median(diffs)
                print(f"{this:12s} vs {kind:18s} {close:5s} {median:+9,.0f}   ({each})")


def versus(medians: dict[str, float], kind: str, reference: str) -> str:
    """What ``kind`` costs more than ``reference``, and their ratio (blank: no reference)."""
    if reference not in medians or base_kind(kind) == reference:
        return f"{'':18s}"
    extra = medians[kind] - medians[reference]
    return f"{extra:+9,.0f} {medians[reference] / medians[kind]:6.3f}x"


def gc_text(collections: Sequence[Sequence[int]]) -> str:
    """The median collections per generation, as ``0/1/2``."""
    return "/".join(f"{statistics.median(run[g] for run in collections):g}" for g in range(3))


def measure(args: argparse.Namespace) -> None:
    kinds = checkout_kinds(args.kinds, args.aiodelay_path, _dropserver.AIODELAY)
    valgrind = callgrind_prelude(kinds, args.aiodelay_path)
    print(
        f"{len(kinds) + 1} kinds x {', '.join(args.closes)} x {args.repeat} repeat(s), "
        f"{args.count:,} drops counted after {args.warmup} not, {args.jobs} run(s) at a time, "
        f"PYTHONHASHSEED {args.hash_seed} + repeat"
    )
    jobs = [
        (kind, close, repeat)
        for repeat in range(args.repeat)
        for kind in [PROTOCOL, *kinds]
        for close in args.closes
    ]
    with tempfile.TemporaryDirectory(prefix="drop-instructions-") as scratch:
        args.shim = build_shim(scratch)
        runs = run_at_most(
            [functools.partial(callgrind, valgrind, *job, args, scratch) for job in jobs],
            args.jobs,
            lambda run: (
                f"  {run.kind:18s} {run.close}, repeat {run.repeat + 1}: "
                f"{run.instructions:15,d} instructions, {run.seconds:5.1f} s"
            ),
        )
    for kind in dict.fromkeys(run.kind for run in runs):
        imported = sorted({run.aiodelay for run in runs if run.kind == kind})
        if base_kind(kind) in _dropserver.AIODELAY:
            print(f"{kind:18s} imported {', '.join(imported)}")
    report(runs, kinds, args.closes, args.count)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="instructions the server spends per dropped request (callgrind)"
    )
    parser.add_argument(
        "--kinds",
        type=comma_list(KINDS),
        default=list(KINDS),
        help=f"drop servers to measure (default {','.join(KINDS)}; {PROTOCOL!r} always is)",
    )
    parser.add_argument(
        "--closes",
        type=comma_list(CLOSES),
        default=list(CLOSES),
        help="how clients leave: FIN (close), RST (SO_LINGER 0) (default FIN,RST)",
    )
    parser.add_argument("--count", type=int, default=500, help="drops counted (default 500)")
    parser.add_argument("--warmup", type=int, default=50, help="drops before (default 50)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per kind (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at a time (default 2)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    parser.add_argument(
        "--hash-seed", type=int, default=1, help="PYTHONHASHSEED of the first repeat (default 1)"
    )
    add_checkout_option(parser)
    # The measured child's own options.
    parser.add_argument("--measure", choices=(PROTOCOL, *KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--close", choices=CLOSES, help=argparse.SUPPRESS)
    parser.add_argument("--shim", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("count", "repeat", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        return run_measured(args.measure, args.close, args.count, args.warmup, args.shim)
    try:
        measure(args)
    except (RuntimeError, subprocess.SubprocessError) as exc:
        print(f"drop_instructions.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
