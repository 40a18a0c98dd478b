"""A storm of drops: aiodelay, aiohttp's own switch and Twisted side by side, in one run.

For each server kind of ``_dropserver.py`` (``--kinds``: ``aiohttp``, aiohttp's own
``handler_cancellation=True``; ``aiohttp-mw``, the same with an empty middleware;
``aiodelay``; ``aiohttp-log`` and ``aiodelay-log``, a log line per drop; ``twisted``, skipped
with a note when Twisted is not installed) and, with ``--aiodelay-path [LABEL=]DIR``,
``aiodelay@LABEL`` and ``aiodelay-log@LABEL``: the two aiodelay kinds (those of them in
``--kinds``) served with the aiodelay of another checkout, DIR (first on the server's
PYTHONPATH), to compare two versions of the code in one run, the script measures, each
kind's server in a process of its own pinned to one CPU and the client (this process)
pinned to another:

1. **Storm**: ``--count`` clients (default 5,000) each connect and send ``GET /hold/<i>``;
   the handler records ``time.monotonic()`` at its start and waits for ever. When the N-th
   handler has started, the server says so on its stdout; the server's RSS is read (after
   ``gc.collect()`` in the server; with ``--no-collect`` without one: a real server meets a
   storm uncollected, and a collection its held requests made due may then land in the
   storm); then the client closes every socket in one tight loop, taking
   ``time.monotonic()`` just before each ``close()``: a FIN, or with ``SO_LINGER`` 0 an RST
   (a server per storm). The handler's ``except CancelledError`` (Twisted: the
   errback) takes ``time.monotonic()`` too; CLOCK_MONOTONIC is one clock for the whole
   machine on Linux, so latency_i = cancelled_i - closed_i across the two processes. The
   script prints p50/p90/p99/max per kind and each kind's p99 over aiohttp's, and the
   garbage collections of each generation that ran in the server from just before the
   first close until it was idle again (counted with ``gc.callbacks``), with their CPU time
   and longest pause. Two storms of each close (``--storms``):

   - ``paced``: the server runs while the client closes; each latency counts from the
     request's own close. The storm goes at the client's pace, which varies (below);
   - ``burst``: the server process is stopped (SIGSTOP) while the client closes and let go
     on (SIGCONT) after the last close, so that every kind finds all N drops waiting at
     the same instant; each latency counts from that instant.
2. **Memory per held request**: (server RSS with N held - RSS idle) / N from the storms'
   servers.

After the storms, on the same kinds: with ``--tracemalloc`` the traced bytes per held
request of ``held_memory.py`` (servers of their own: tracemalloc slows a server down, so it
never runs in a timed storm), and with ``--rounds N`` (default 300; 0: none) the single drops
of ``single_drop.py``, N rounds per close.

What keeps the comparison fair, and what the script prints so that a reader can judge it:

- every kind is served the same way: 127.0.0.1, the same listen backlog, no access log, the
  same handler shape (record, wait, record on cancellation) and the same warm-up;
- the client's closing is not instantaneous: a ``close()`` costs 7 to 35 us here (it also
  delivers the FIN through the loopback), so 5,000 closes spread over 40 to 150 ms, and a
  paced storm is gentler for a server whose client happened to close slower. Each storm
  prints how long the client took; the burst storms do not depend on it;
- this machine may be shared: each storm prints the server's CPU time per drop (what a
  drop cost it, little disturbed by other processes) and how long the server waited for
  its CPU while other processes ran (``/proc/PID/schedstat``; a storm in which that passes
  a tenth of its time gets a note), and the load average is printed at the start and the
  end; ``--repeat`` runs the storms several times, rotating the order of the kinds, and
  the summary gives medians across repeats. (A lower nice value for the server did not
  make it wait less on this machine, so the script does not offer one.)

Every wait has a timeout (``--timeout``), every server stops by itself when its stdin
closes or after 15 minutes, and every loop is bounded.

Run (from the repository root, in the project's virtualenv, with ``.[bench]`` for Twisted)::

    python benchmarks/storm.py                      # 5,000 per storm, all kinds, ~1.5 min
    python benchmarks/storm.py --count 1000 --closes FIN --kinds aiohttp,aiodelay
    python benchmarks/storm.py --uvloop --repeat 3 --tracemalloc
    python benchmarks/storm.py --count 5000 --no-collect --repeat 3 --rounds 0
    python benchmarks/storm.py --kinds aiohttp,aiodelay --aiodelay-path /tmp/base
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from _drops import (
    LOOPS,
    DropServer,
    add_closes_option,
    add_server_options,
    begin,
    check_options,
    close_all,
    comma_list,
    drop_kinds,
    hold,
)
from _dropserver import BACKLOG, LOGGING, WARMUP
from _report import ms, percentile
from _serve import base_kind, sched
from held_memory import print_traced
from single_drop import print_singles

MODES = ("paced", "burst")


def latencies(
    report: dict[str, Any], ids: Sequence[int], closed_at: Sequence[float]
) -> list[float]:
    started, cancelled = report["started"], report["cancelled"]
    missing = [i for i in ids if str(i) not in started or str(i) not in cancelled]
    if missing:
        raise RuntimeError(f"{len(missing)} requests without a start or a cancellation")
    return [cancelled[str(i)] - closed for i, closed in zip(ids, closed_at, strict=True)]


def settle(pid: int, timeout: float) -> tuple[float, float]:
    """:func:`sched` once the server has gone idle: it neither ran nor waited to run for
    20 ms (it has finished tearing the connections down), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = sched(pid)
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = sched(pid)
        if now[0] - last[0] < 2e-4 and now[1] - last[1] < 2e-4:
            return now
        last = now
    return last


@dataclass
class Storm:
    """What one storm measured."""

    kind: str
    close: str
    mode: str  # paced or burst
    latencies: list[float]
    closing: float  # seconds the client took to close all its sockets
    drained: float  # first close (burst: the server's resumption) -> last cancellation, s
    cpu: float  # server CPU seconds from just before the first close until it was idle again
    waited: float  # seconds the server waited for its CPU meanwhile (other processes ran)
    rss_per_request: float
    load: float  # 1-minute load average right after the storm
    # The server's garbage collections from just before the first close until it was idle
    # again: how many of each generation, their CPU seconds, the longest pause (wall clock).
    gc_counts: list[int] = field(default_factory=lambda: [0, 0, 0])
    gc_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    gc_longest: float = 0.0
    notes: list[str] = field(default_factory=list)


def process_state(pid: int) -> str:
    """The state letter of ``/proc/PID/stat`` (``T``: stopped)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def paused(pid: int, timeout: float) -> Iterator[list[float]]:
    """The server process stopped (SIGSTOP) for the body; yields a list that holds, after
    the body, the ``time.monotonic()`` just before it was let go on (SIGCONT)."""
    resumed: list[float] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while process_state(pid) not in "Tt":
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {pid} did not stop on SIGSTOP")
            time.sleep(0.001)
        yield resumed
    finally:
        resumed.append(time.monotonic())
        os.kill(pid, signal.SIGCONT)


def run_storm(kind: str, close: str, mode: str, args: argparse.Namespace, cpu: int | None) -> Storm:
    count: int = args.count
    with DropServer(kind, args, cpu, count=count) as server:
        warm = range(count, count + WARMUP)
        close_all(hold(server, warm, args.timeout), close)
        server.expect("CANCELLED")
        server.report()
        collect = not args.no_collect
        rss_idle, _ = server.memory(collect)
        ids = range(count)
        socks = hold(server, ids, args.timeout)
        rss_held, _ = server.memory(collect)
        server.collections()  # counted from here
        if mode == "paced":
            cpu_before, wait_before = sched(server.pid)
            closed_at, ended = close_all(socks, close)
            start = closed_at[0]
        else:
            with paused(server.pid, args.timeout) as resumed:
                closed_at, ended = close_all(socks, close)
                cpu_before, wait_before = sched(server.pid)
            start = resumed[0]
        server.expect("CANCELLED")
        cpu_after, wait_after = settle(server.pid, min(args.timeout, 5.0))
        collections = server.collections()
        report = server.report()
        # burst: every close is in the kernel before the server runs again; each request's
        # latency is from that moment.
        lat = latencies(report, ids, closed_at if mode == "paced" else [start] * count)
        last_cancel = max(report["cancelled"][str(i)] for i in ids)
        storm = Storm(
            kind=kind,
            close=close,
            mode=mode,
            latencies=sorted(lat),
            closing=ended - closed_at[0],
            drained=last_cancel - start,
            cpu=cpu_after - cpu_before,
            waited=wait_after - wait_before,
            rss_per_request=(rss_held - rss_idle) / count,
            load=os.getloadavg()[0],
            gc_counts=collections["counts"],
            gc_seconds=collections["seconds"],
            gc_longest=collections["longest"],
        )
        if storm.waited > 0.1 * storm.drained:
            share = storm.waited / storm.drained
            storm.notes.append(
                f"the server waited for its CPU {share:.0%} of the storm's time: other processes "
                "took it"
            )
        expected = count + WARMUP
        if "aiodelay_cancelled" in report and report["aiodelay_cancelled"] != expected:
            storm.notes.append(
                f"aiodelay counted {report['aiodelay_cancelled']} cancellations, not {expected}"
            )
        text = server.stderr_text()
        if base_kind(kind) in LOGGING:
            if server.log_to == "devnull":
                storm.notes.append("log lines went to /dev/null (not counted)")
            else:
                lines = text.count("interrupted by")
                storm.notes.append(f"{lines} log lines ({len(text.encode()) / 1e6:.2f} MB) written")
                if lines != expected:
                    storm.notes.append(f"expected {expected} log lines")
        elif text.strip():
            storm.notes.append("server stderr: " + server.stderr_tail())
    return storm


# -- reporting -----------------------------------------------------------------------------


def print_storms(
    storms: list[Storm], kinds: Sequence[str], closes: Sequence[str], modes: Sequence[str]
) -> None:
    print(
        "\nstorm: client close (burst: the server let go on) -> handler saw it (ms); p99 ratio "
        "to aiohttp's; medians across repeats when --repeat > 1"
    )
    print(f"{'':26s}{'p50':>9s}{'p90':>9s}{'p99':>9s}{'max':>9s}  {'p99/aiohttp':>11s}  runs")
    groups = [(mode, close) for mode in modes for close in closes]
    for mode, close in groups:
        base = None
        for kind in kinds:
            runs = [s for s in storms if (s.kind, s.close, s.mode) == (kind, close, mode)]
            if not runs:
                continue
            cells = "".join(
                f"{statistics.median(percentile(s.latencies, pct) for s in runs) * 1e3:9.3f}"
                for pct in (50, 90, 99, 100)
            )
            p99 = statistics.median(percentile(s.latencies, 99) for s in runs)
            if kind == "aiohttp":
                base = p99
            ratio = f"{p99 / base:10.2f}x" if base else f"{'':11s}"
            each = ", ".join(f"{percentile(s.latencies, 99) * 1e3:.1f}" for s in runs)
            print(f"{kind:13s} {mode:6s} {close:4s}{cells}  {ratio}  p99s {each}")
    print(
        "\nwhat a drop cost the server (CPU time from the first close until idle, per drop; "
        "little disturbed by other processes), the part of it in garbage collections, and the "
        "storms' conditions (medians)"
    )
    print(f"{'':26s}{'cpu us/drop':>12s}{'vs aiohttp':>11s}{'gc us/drop':>11s}"
          f"{'client closing ms':>19s}{'server waited ms':>18s}")  # fmt: skip
    for mode, close in groups:
        base = None
        for kind in kinds:
            runs = [s for s in storms if (s.kind, s.close, s.mode) == (kind, close, mode)]
            if not runs:
                continue
            per_drop = statistics.median(s.cpu / len(s.latencies) for s in runs)
            if kind == "aiohttp":
                base = per_drop
            ratio = f"{per_drop / base:10.2f}x" if base else f"{'':11s}"
            in_gc = statistics.median(sum(s.gc_seconds) / len(s.latencies) for s in runs)
            closing = statistics.median(s.closing for s in runs)
            waited = statistics.median(s.waited for s in runs)
            print(
                f"{kind:13s} {mode:6s} {close:4s}{per_drop * 1e6:12.1f}{ratio}{in_gc * 1e6:11.1f}"
                f"{closing * 1e3:19.1f}{waited * 1e3:18.1f}"
            )
    print_collections(storms, kinds, groups)
    print("\nmemory per held request (RSS, from the storms' servers; KB = 1000 B)")
    base_rss = None
    for kind in kinds:
        values = [s.rss_per_request for s in storms if s.kind == kind]
        if not values:
            continue
        mean = statistics.fmean(values)
        if kind == "aiohttp":
            base_rss = mean
        diff = f"  {(mean - base_rss) / 1e3:+6.2f} KB vs aiohttp" if base_rss is not None else ""
        each = ", ".join(f"{v / 1e3:.2f}" for v in values)
        print(f"{kind:13s} {mean / 1e3:6.2f} KB{diff}   (storms: {each})")


def gc_text(counts: Sequence[float]) -> str:
    """Collections per generation as ``gen0/gen1/gen2``."""
    return "/".join(f"{count:g}" for count in counts)


def print_collections(
    storms: list[Storm], kinds: Sequence[str], groups: Sequence[tuple[str, str]]
) -> None:
    print(
        "\ngarbage collections in the server during the storm (from just before the first close "
        "until idle; medians), per generation 0/1/2, the CPU time they took and the longest "
        "pause (wall clock)"
    )
    print(f"{'':26s}{'gen 0/1/2':>12s}{'cpu ms':>9s}{'longest ms':>12s}  runs")
    for mode, close in groups:
        for kind in kinds:
            runs = [s for s in storms if (s.kind, s.close, s.mode) == (kind, close, mode)]
            if not runs:
                continue
            counts = [statistics.median(s.gc_counts[gen] for s in runs) for gen in range(3)]
            total = statistics.median(sum(s.gc_seconds) for s in runs)
            longest = statistics.median(s.gc_longest for s in runs)
            each = ", ".join(gc_text(s.gc_counts) for s in runs)
            print(
                f"{kind:13s} {mode:6s} {close:4s}{gc_text(counts):>12s}{total * 1e3:9.1f}"
                f"{longest * 1e3:12.1f}  {each}"
            )


def print_storm(storm: Storm) -> None:
    lat = storm.latencies
    count = len(lat)
    print(
        f"{storm.kind:13s} {storm.mode:6s} {storm.close:4s}{ms(lat, (50, 90, 99, 100))}"
        f"  closing {storm.closing * 1e3:6.1f} ms ({storm.closing / count * 1e6:5.1f} us/close)"
        f"  drained {storm.drained * 1e3:6.1f} ms  server cpu {storm.cpu / count * 1e6:5.1f} "
        f"us/drop, waited {storm.waited * 1e3:6.1f} ms  rss {storm.rss_per_request / 1e3:5.2f} "
        f"KB/req  load {storm.load:.2f}  gc {gc_text(storm.gc_counts)} "
        f"({sum(storm.gc_seconds) * 1e3:.1f} ms cpu, longest {storm.gc_longest * 1e3:.1f})",
        flush=True,
    )
    for note in storm.notes:
        print(f"{'':26s}note: {note}", flush=True)


def measure(args: argparse.Namespace) -> int:
    kinds = drop_kinds(args)
    closes: list[str] = args.closes
    modes: list[str] = args.storms
    server_cpu = begin(__file__, args, args.count)
    loop_name = "uvloop" if args.uvloop else "asyncio"
    print(
        f"settings: {args.count} requests per storm, storms {','.join(modes)}, closes "
        f"{','.join(closes)}, "
        f"repeat {args.repeat}, {args.rounds} single drops per close, aiohttp kinds on "
        f"{loop_name}, listen backlog {BACKLOG}, warm-up {WARMUP} held+dropped, timeout "
        f"{args.timeout:g} s"
    )
    collected = "none (--no-collect)" if args.no_collect else "gc.collect() before each storm"
    print(f"servers' collection before a storm: {collected}")
    log_sink = "a file" if args.log_to == "file" else "/dev/null"
    print(f"log kinds: a line per drop to the server's stderr, redirected to {log_sink}")

    print(
        f"\n{'storms':26s}{'p50':>9s}{'p90':>9s}{'p99':>9s}{'max':>9s}  (ms, client close -> "
        "handler saw it)"
    )
    storms: list[Storm] = []
    for repeat in range(args.repeat):
        order = kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]
        for mode in modes:
            for close in closes:
                for kind in order:
                    storm = run_storm(kind, close, mode, args, server_cpu)
                    storms.append(storm)
                    print_storm(storm)
    print_storms(storms, kinds, closes, modes)
    if args.tracemalloc:
        print_traced(kinds, args, server_cpu)
    if args.rounds:
        print_singles(kinds, closes, args.rounds, args, server_cpu)

    loads = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at the end: {loads}")
    print("servers' event loops: " + ", ".join(f"{kind} {loop}" for kind, loop in LOOPS.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="a storm of drops: aiohttp's handler_cancellation, aiodelay and Twisted"
    )
    parser.add_argument(
        "--count", type=int, default=5000, help="requests held per storm (default 5000)"
    )
    add_closes_option(parser)
    parser.add_argument(
        "--storms",
        type=comma_list(MODES),
        default=list(MODES),
        help="paced: latency from each client's own close while the server runs; burst: the "
        "server is stopped while the client closes, latency from when it runs again "
        "(default paced,burst)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=300,
        help="single drops per close after the storms, as single_drop.py (default 300; 0: none)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="storms per kind and close (default 1)"
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also measure traced bytes per held request, as held_memory.py",
    )
    parser.add_argument(
        "--no-collect",
        action="store_true",
        help="no gc.collect() in the servers before a storm, as in a real server (the RSS "
        "per held request is then read without one too)",
    )
    add_server_options(parser)
    args = parser.parse_args(argv)
    check_options(parser, args)
    if not 0 <= args.rounds <= 100_000:
        parser.error("--rounds must be between 0 and 100000")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be between 1 and 20")
    try:
        return measure(args)
    except RuntimeError as exc:
        print(f"storm.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
