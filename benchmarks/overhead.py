"""What aiodelay costs per request: requests/s of a hello-world app with and without it.

Copies of the same app (``_apps.make_app``), each served in a process of its own by a plain
``web.AppRunner(app)`` (aiohttp's defaults) on a free port of 127.0.0.1; by default three:

- ``bare``: the app alone;
- ``empty``: the app with one empty pass-through ``@web.middleware`` (what any middleware
  costs: aiohttp's middleware chain);
- ``aiodelay``: the app with ``aiodelay.setup(app)``;

and with ``--kinds`` any of these too:

- ``deadline``: with ``aiodelay.setup(app, deadline=30)``;
- ``observer``: with ``aiodelay.setup(app)`` and an observer whose three methods do nothing;
- ``metrics`` (also ``--metrics``): with ``aiodelay.setup(app)`` and
  ``aiodelay.prometheus.setup(app)`` (needs ``pip install 'aiodelay[prometheus]'``);
- ``handwritten``: without aiodelay, the Prometheus middleware people write by hand (a
  request counter and a duration histogram, prometheus-client);
- ``aiodelay@LABEL`` (``deadline@LABEL``, ...), with ``--aiodelay-path [LABEL=]DIR``: the
  same app served with the aiodelay of another checkout, DIR (first on the server's
  PYTHONPATH), to compare two versions of the code in one run.

Load runs alternate between them for several rounds (the order rotates each round), so that
drift of a shared machine hits all alike; the script prints requests/s of each run, the
median per app and the ratios aiodelay/bare and aiodelay/empty (and each other kind against
its reference: ``aiodelay``, or ``empty`` for ``handwritten``). The load generator is ``wrk``
(``-t1 -cN -dS``) when it is on PATH, else a bounded aiohttp client loop in another process
(much slower per request than wrk: its numbers say less). With two or more CPUs, the servers
are pinned to one and the load generator to another.

Besides requests/s of wall time, each run is also counted in requests per second of the
server's own CPU time (``/proc/PID/schedstat``): that is what a request costs the server, and
other processes competing for its CPU disturb it much less than they disturb requests/s. The
ratios are given of the medians of both, and as the median of the per-round ratios (each
round's runs are neighbours in time). A target counts as met when both ratios of medians
reach it.

Run (from the repository root, in the project's virtualenv)::

    python benchmarks/overhead.py                  # 5 rounds x 5 s per app, about 1.5 min
    python benchmarks/overhead.py --uvloop --rounds 7 --duration 10
    python benchmarks/overhead.py --metrics        # and the app with Prometheus metrics
    python benchmarks/overhead.py --kinds empty,aiodelay,deadline,observer
    python benchmarks/overhead.py --aiodelay-path /tmp/base   # and aiodelay@base
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

from _apps import AIODELAY_KINDS, APP_KINDS, make_app
from _report import describe_machine, version
from _serve import (
    ServerProcess,
    add_checkout_option,
    base_kind,
    checkout_env,
    checkout_kinds,
    cpu_seconds,
    describe_checkouts,
    run_server,
    two_cpus,
)
from aiohttp import ClientSession, TCPConnector

#: The kinds measured by default.
KINDS = ("bare", "empty", "aiodelay")
ALL_KINDS = APP_KINDS
#: The kinds that --aiodelay-path serves again with another checkout's aiodelay.
AIODELAY = AIODELAY_KINDS


class Run(NamedTuple):
    """One load run against one server."""

    rps: float  # requests per second of wall time
    #: Requests per second of the server's CPU time: what one request costs the server,
    #: much less disturbed than ``rps`` by other processes sharing its CPU.
    per_cpu: float


# -- load generators ------------------------------------------------------------------------


def run_wrk(wrk: str, url: str, connections: int, duration: int, cpu: int | None) -> int:
    """Number of requests wrk completed against ``url`` in ``duration`` seconds."""
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", url + "/"]
    taskset = shutil.which("taskset")
    if cpu is not None and taskset:
        cmd = [taskset, "-c", str(cpu), *cmd]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, timeout=duration + 30
    ).stdout
    for problem in ("Non-2xx or 3xx responses", "Socket errors"):
        if problem in out:
            print(f"  wrk reported {problem.lower()}:\n{out}", file=sys.stderr)
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise RuntimeError(f"no request count in wrk's output:\n{out}")
    return int(match.group(1))


def run_client_load(url: str, connections: int, duration: int, cpu: int | None) -> int:
    """Requests done by the fallback aiohttp-client load, run in a child (``--load``)."""
    cmd = [sys.executable, __file__, "--load", url, "--connections", str(connections)]
    cmd += ["--duration", str(duration)]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, timeout=duration + 30
    ).stdout
    return int(out.split()[-1])


async def client_load(url: str, connections: int, duration: float) -> int:
    """``connections`` keep-alive clients doing GET ``url`` in a loop for ``duration`` s."""
    done = 0
    errors = 0

    async def worker(session: ClientSession, deadline: float) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            async with session.get(url + "/") as resp:
                await resp.read()
                if resp.status == 200:
                    done += 1
                else:
                    errors += 1

    async with ClientSession(connector=TCPConnector(limit=connections)) as session:
        deadline = time.perf_counter() + duration
        await asyncio.gather(*(worker(session, deadline) for _ in range(connections)))
    if errors:
        print(f"client load: {errors} non-200 responses", file=sys.stderr)
    return done


# -- the comparison ----------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, list[Run]]:
    """Load the kinds of ``args`` (from :func:`parse_args`) in rounds and print the report;
    return the runs of each kind, one per round, in the order of the rounds."""
    kinds = checkout_kinds(args.kinds, args.aiodelay_path, AIODELAY)
    cpus = two_cpus()
    server_cpu, load_cpu = cpus if cpus is not None else (None, None)
    wrk = None if args.no_wrk else shutil.which("wrk")
    loop_name = "uvloop" if args.uvloop else "asyncio"
    pinning = f"servers on CPU {server_cpu}, load on CPU {load_cpu}" if cpus else "not pinned"
    print(f"python {sys.version.split()[0]}, aiohttp {version('aiohttp')}, {loop_name} loop")
    print(f"machine: {describe_machine()}")
    print(
        f"load: {'wrk -t1' if wrk else 'aiohttp client (wrk not found)'}, "
        f"{args.connections} connections, {args.rounds} rounds x {args.duration} s per app; "
        f"{pinning}"
    )
    for line in describe_checkouts(args.aiodelay_path):
        print(line)

    def load(server: ServerProcess, duration: int) -> Run:
        cpu_before = cpu_seconds(server.pid)
        if wrk:
            requests = run_wrk(wrk, server.url, args.connections, duration, load_cpu)
        else:
            requests = run_client_load(server.url, args.connections, duration, load_cpu)
        cpu = cpu_seconds(server.pid) - cpu_before
        return Run(requests / duration, requests / cpu if cpu else 0.0)

    runs: dict[str, list[Run]] = {kind: [] for kind in kinds}
    with contextlib.ExitStack() as stack:
        servers = {}
        for kind in kinds:
            argv = [__file__, "--serve", base_kind(kind)]
            if args.uvloop:
                argv.append("--uvloop")
            if server_cpu is not None:
                argv += ["--cpu", str(server_cpu)]
            env = checkout_env(kind, args.aiodelay_path)
            servers[kind] = stack.enter_context(ServerProcess(argv, env=env))
        for kind in kinds:  # warm-up: imports, caches, the first connections
            load(servers[kind], args.warmup)
        header = "  ".join(f"{kind:>21s}" for kind in kinds)
        print(f"round   {header}   (req/s, req/CPU-s)")
        for rnd in range(args.rounds):
            # Rotate the order, so that no app always follows the same one.
            shift = rnd % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                runs[kind].append(load(servers[kind], args.duration))
            cells = (f"{runs[k][-1].rps:10.0f} {runs[k][-1].per_cpu:10.0f}" for k in kinds)
            print(f"{rnd + 1:5d}   " + "  ".join(cells), flush=True)
    report(runs)
    return runs


def report(runs: dict[str, list[Run]]) -> None:
    """Medians per app, and the ratios between apps three ways."""
    print()
    kinds = tuple(runs)
    rps = {kind: statistics.median(run.rps for run in runs[kind]) for kind in kinds}
    per_cpu = {kind: statistics.median(run.per_cpu for run in runs[kind]) for kind in kinds}
    width = max(9, *(len(kind) for kind in kinds))  # kind@LABEL from --aiodelay-path is longer
    for kind in kinds:
        values = [run.rps for run in runs[kind]]
        spread = max(values) / min(values) - 1
        print(
            f"median {kind:{width}s} {rps[kind]:9.0f} req/s (max/min {spread:+.1%})"
            f"   {per_cpu[kind]:9.0f} req per server CPU-second"
        )
    print()
    print(
        f"{'ratio':{2 * width - 2}s} {'medians: req/s':>20s} {'req/CPU-s':>10s} {'per round':>15s}"
        "   (per round: median of the rounds' req/CPU-s ratios)"
    )
    ratios: list[tuple[str, str, str, float | None]] = [
        ("empty/bare", "empty", "bare", None),
        ("aiodelay/bare", "aiodelay", "bare", 0.97),
        ("aiodelay/empty", "aiodelay", "empty", 0.98),
    ]
    # What each feature adds to aiodelay; the metrics also against any middleware, as the
    # hand-written ones.
    ratios += [(f"{kind}/aiodelay", kind, "aiodelay", None) for kind in AIODELAY[1:]]
    ratios += [(f"{kind}/empty", kind, "empty", None) for kind in ("metrics", "handwritten")]
    for kind in kinds:  # another checkout (--aiodelay-path): against empty, and this one's
        if "@" in kind:
            target = 0.98 if base_kind(kind) == "aiodelay" else None
            ratios += [(f"{kind}/empty", kind, "empty", target)]
            ratios += [(f"{base_kind(kind)}/{kind}", base_kind(kind), kind, None)]
    for name, num, den, target in ratios:
        if num not in runs or den not in runs:
            continue
        wall, cpu = rps[num] / rps[den], per_cpu[num] / per_cpu[den]
        paired = statistics.median(
            n.per_cpu / d.per_cpu for n, d in zip(runs[num], runs[den], strict=True) if d.per_cpu
        )
        note = "" if target is None else f"   target >= {target}: {_verdict(wall, cpu, target)}"
        print(f"{name:{2 * width - 2}s} {wall:20.3f} {cpu:10.3f} {paired:15.3f}{note}")


def _verdict(wall: float, cpu: float, target: float) -> str:
    if wall >= target and cpu >= target:
        return "met"
    if wall < target and cpu < target:
        return "MISSED"
    return "by one measure only"


def comma_list(value: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items or any(item not in ALL_KINDS for item in items):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(ALL_KINDS)}"
        )
    return list(dict.fromkeys(items))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of ``argv``, checked (a bad one exits through ``parser.error``);
    ``args.kinds`` includes ``metrics`` if ``--metrics`` was given."""
    parser = argparse.ArgumentParser(
        prog=os.path.basename(__file__),  # also when features.py runs this
        description="requests/s of a hello-world app: bare, with an empty middleware, with "
        "aiodelay (and with --kinds: with aiodelay's features, or the hand-written Prometheus "
        "middleware)",
    )
    parser.add_argument(
        "--kinds",
        type=comma_list,
        default=list(KINDS),
        help=f"apps to load, in this order (default {','.join(KINDS)}; any of "
        f"{','.join(ALL_KINDS)})",
    )
    parser.add_argument("--rounds", type=int, default=5, help="load runs per app (default 5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per app (2)")
    parser.add_argument("--connections", type=int, default=50, help="concurrent connections (50)")
    parser.add_argument("--uvloop", action="store_true", help="serve with uvloop's event loop")
    parser.add_argument("--no-wrk", action="store_true", help="use the aiohttp client load")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="also the app with aiodelay.prometheus.setup(app) (needs aiodelay[prometheus]): "
        "the kind metrics",
    )
    add_checkout_option(parser)
    # The children this script runs: a server, or the fallback load generator.
    parser.add_argument("--serve", choices=ALL_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.warmup < 1 or args.connections < 1:
        parser.error("--rounds, --duration, --warmup and --connections must be at least 1")
    if args.metrics and "metrics" not in args.kinds:
        args.kinds.append("metrics")
    kinds = checkout_kinds(args.kinds, args.aiodelay_path, AIODELAY)
    if args.rounds * len(kinds) * args.duration > 3600:
        parser.error("that would run for more than an hour: lower --rounds or --duration")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        kind: str = args.serve
        run_server(lambda: make_app(kind), use_uvloop=args.uvloop, cpu=args.cpu)
        return 0
    if args.load:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        print(asyncio.run(client_load(args.load, args.connections, args.duration)))
        return 0
    measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
