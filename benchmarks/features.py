"""What each feature of aiodelay costs a hello-world request, in instructions and in requests/s.

The kinds of app (``_apps.make_app``), one table row each:

- ``empty``: aiohttp with one empty middleware (the reference of everything aiodelay adds);
- ``aiodelay``: ``aiodelay.setup(app)``;
- ``deadline``: ``aiodelay.setup(app, deadline=30)``, a default deadline no request reaches;
- ``metrics``: ``aiodelay.setup(app)`` and ``aiodelay.prometheus.setup(app)``;
- ``observer``: ``aiodelay.setup(app)`` and one observer whose three methods do nothing;
- ``handwritten``: the Prometheus middleware people write by hand, without aiodelay (a request
  counter and a duration histogram): what the metrics cost without aiodelay;
- ``bare`` (only with ``--kinds``): aiohttp without any middleware.

Instructions come from ``instructions.py`` (callgrind, the server's share of a request, one
value per hash seed, ``--repeat`` seeds), requests/s from ``overhead.py`` (wrk against each
app in a process of its own, all apps loaded in ``--rounds`` rounds whose order rotates).
Both scripts print their own detailed reports as they finish; then this one prints a header
(date, machine, versions, the exact commands) and one Markdown table per measure, ready to be
pasted into the docs. Each row gives the kind's instructions (median over the seeds) or
requests/s (median over the rounds), its extra cost per request over its reference, and its
ratio to ``empty`` and to ``aiodelay`` as requests/s compare (0.973x: 2.8% more work per
request). In instructions a ratio is that of the medians, in requests/s the median of the
rounds' ratios (each round's runs are neighbours in time); in brackets the lowest and the
highest ratio of a single seed or round. ``--aiodelay-path`` adds rows ``KIND@LABEL`` served
with another checkout's aiodelay, held to the same targets against ``aiodelay@LABEL``.

Targets (each verdict compares the ratio as printed, to three decimals):

- ``aiodelay`` >= 0.973x ``empty`` (the aim: 0.98x);
- ``deadline`` >= 0.98x ``aiodelay``;
- ``metrics`` >= 0.97x ``aiodelay``, and its extra cost over ``aiodelay`` at most one third of
  ``handwritten``'s extra cost over ``empty``;
- ``observer`` >= 0.97x ``aiodelay``.

``empty`` and ``aiodelay`` are always measured, ``handwritten`` too when ``metrics`` is.

Run (from the repository root, in the project's virtualenv; needs valgrind and wrk)::

    python benchmarks/features.py               # about 9 min on 2 idle cores
    python benchmarks/features.py --no-wall --repeat 5
    python benchmarks/features.py --aiodelay-path base=/tmp/base

How long it takes: the instructions about 2 min per seed (``--repeat``, default 3) on two idle
cores, two valgrind runs at a time, and several times that when other work shares the cores;
the requests/s 2 s of warm-up plus ``--rounds`` x ``--duration`` seconds (default 5 x 5) per
kind, about 3 min for the six kinds. ``--aiodelay-path`` adds the aiodelay kinds once more to
both.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import instructions
import overhead
from _apps import AIODELAY_KINDS
from _report import describe_machine, git, version
from _serve import (
    add_checkout_option,
    base_kind,
    describe_checkouts,
)

#: The kinds, in the order of the tables' rows.
KINDS = ("bare", "empty", "aiodelay", "deadline", "metrics", "observer", "handwritten")
#: The kinds measured without --kinds.
DEFAULT_KINDS = KINDS[1:]

DESCRIPTIONS = {
    "bare": "aiohttp without any middleware",
    "empty": "aiohttp with one empty middleware",
    "aiodelay": "`aiodelay.setup(app)`",
    "deadline": "`setup(app, deadline=30)`, a default deadline no request reaches",
    "metrics": "`setup(app)` + `aiodelay.prometheus.setup(app)`",
    "observer": "`setup(app)` + one observer whose three methods do nothing",
    "handwritten": "the hand-written Prometheus middleware without aiodelay",
}


class Target(NamedTuple):
    """A kind's target: at least ``minimum`` times ``reference``'s requests/s."""

    reference: str
    minimum: float
    aim: float | None = None


TARGETS = {
    "aiodelay": Target("empty", 0.973, aim=0.98),
    "deadline": Target("aiodelay", 0.98),
    "metrics": Target("aiodelay", 0.97),
    "observer": Target("aiodelay", 0.97),
}
#: The metrics' extra cost over aiodelay is at most this share of the hand-written
#: middleware's extra cost over the empty one.
METRICS_SHARE = 1 / 3


class Measure(NamedTuple):
    """One measure's numbers, as the table needs them."""

    title: str
    unit: str  # the header of the values' column
    values: dict[str, float]  # the column's value per kind
    #: Per kind, what one request costs, a value per seed or round; the kinds' values of one
    #: seed or round belong together.
    costs: dict[str, list[float]]
    paired: bool  # ratios: the median of the pairs' ratios, else the ratio of the medians
    pair: str  # what a pair is: "seed" or "round"
    show: Callable[[float], str]  # a value
    show_extra: Callable[[float], str]  # a difference of costs


def reference(kind: str) -> str | None:
    """The kind that ``kind``'s extra cost is counted over."""
    base, sep, label = kind.partition("@")
    if base in TARGETS:
        ref = TARGETS[base].reference
        return f"{ref}{sep}{label}" if ref in AIODELAY_KINDS else ref
    return None if base == "empty" else "empty"


class Comparison(NamedTuple):
    """``kind`` against ``ref``: the ratio as requests/s compare, its range over the pairs,
    and the extra cost per request."""

    ratio: float
    low: float
    high: float
    extra: float
    #: The ratio per pair, and the extra cost per pair.
    ratios: list[float]
    extras: list[float]


def compare(measure: Measure, kind: str, ref: str) -> Comparison:
    kind_costs, ref_costs = measure.costs[kind], measure.costs[ref]
    ratios = [r / k for r, k in zip(ref_costs, kind_costs, strict=True)]
    extras = [k - r for r, k in zip(ref_costs, kind_costs, strict=True)]
    if measure.paired:
        ratio, extra = statistics.median(ratios), statistics.median(extras)
    else:
        kind_median, ref_median = statistics.median(kind_costs), statistics.median(ref_costs)
        ratio, extra = ref_median / kind_median, kind_median - ref_median
    return Comparison(ratio, min(ratios), max(ratios), extra, ratios, extras)


def reaches(ratio: float, minimum: float) -> bool:
    """Whether ``ratio``, rounded as printed, is at least ``minimum``."""
    return round(ratio, 3) >= minimum


def verdict(measure: Measure, kind: str) -> tuple[str, str]:
    """The target of ``kind`` and whether it is met, as table cells ("" if it has none)."""
    base = base_kind(kind)
    target = TARGETS.get(base)
    ref = reference(kind)
    if target is None or ref is None:
        return "", ""
    versus = compare(measure, kind, ref)
    goal = f">= {target.minimum}x `{ref}`"
    met = reaches(versus.ratio, target.minimum)
    each = [reaches(ratio, target.minimum) for ratio in versus.ratios]
    notes = []
    if target.aim is not None:
        goal += f" (aim {target.aim}x)"
        if met:
            notes.append(f"aim {'met' if reaches(versus.ratio, target.aim) else 'not met'}")
    if base == "metrics":
        if "handwritten" in measure.costs:
            handwritten = compare(measure, "handwritten", "empty")
            limit = handwritten.extra * METRICS_SHARE
            goal += f"; extra <= 1/3 of `handwritten`'s ({measure.show_extra(limit)})"
            within = versus.extra <= limit
            notes.append(f"extra {'within' if within else 'over'} 1/3")
            met = met and within
            each = [
                ok and extra <= hand * METRICS_SHARE
                for ok, extra, hand in zip(each, versus.extras, handwritten.extras, strict=True)
            ]
        else:
            notes.append("extra not compared: `handwritten` not measured")
    text = "met" if met else "not met"
    if len(each) > 1:
        notes.append(f"{sum(each)} of {len(each)} {measure.pair}s")
    return goal, f"{text} ({'; '.join(notes)})" if notes else text


def table(measure: Measure, kinds: Sequence[str]) -> list[str]:
    """The Markdown table of ``measure``, a row per kind."""

    def ratio(kind: str, ref: str) -> str:
        if kind == ref:
            return "1"
        if ref not in measure.costs:
            return ""
        versus = compare(measure, kind, ref)
        text = f"{versus.ratio:.3f}x"
        if len(versus.ratios) > 1:
            text += f" ({versus.low:.3f}-{versus.high:.3f})"
        return text

    rows = [
        [
            "kind",
            measure.unit,
            "extra per request",
            "vs one empty middleware",
            "vs aiodelay alone",
            "target",
            "verdict",
        ]
    ]
    for kind in kinds:
        base, sep, label = kind.partition("@")
        own = f"aiodelay{sep}{label}"  # the aiodelay kind of the same checkout
        ref = reference(kind)
        extra = ""
        if ref is not None:
            extra = f"{measure.show_extra(compare(measure, kind, ref).extra)} over `{ref}`"
        rows.append(
            [
                f"{DESCRIPTIONS[base]}{f', checkout {label}' if label else ''} (`{kind}`)",
                measure.show(measure.values[kind]),
                extra,
                ratio(kind, "empty"),
                ratio(kind, own) if base in AIODELAY_KINDS else "",
                *verdict(measure, kind),
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(f"{cell:{w}s}" for cell, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


# -- the two measures ------------------------------------------------------------------------


def instructions_measure(args: argparse.Namespace) -> Measure:
    """Run ``instructions.py`` with ``args.instructions_args``."""
    server = instructions.measure(args.instructions_args)
    return Measure(
        title="Instructions per request (callgrind, server side)",
        unit="instructions",
        values={kind: statistics.median(values) for kind, values in server.items()},
        costs=server,
        paired=False,
        pair="seed",
        show=lambda value: f"{round(value, -2):,.0f}",
        show_extra=lambda extra: f"{round(extra, -2):+,.0f}",
    )


def wall_measure(args: argparse.Namespace) -> Measure:
    """Run ``overhead.py`` with ``args.wall_args``."""
    runs = overhead.measure(args.wall_args)
    if any(run.rps <= 0 for kind_runs in runs.values() for run in kind_runs):
        raise RuntimeError("a load run completed no request")
    # (overhead.py loads the apps with wrk if it is on PATH, else with an aiohttp client)
    load = "wrk" if shutil.which("wrk") else "an aiohttp client, not wrk"
    return Measure(
        title=f"Requests per second ({load})",
        unit="req/s",
        values={
            kind: statistics.median(run.rps for run in kind_runs)
            for kind, kind_runs in runs.items()
        },
        costs={kind: [1 / run.rps for run in kind_runs] for kind, kind_runs in runs.items()},
        paired=True,
        pair="round",
        show=lambda value: f"{value:,.0f}",
        show_extra=lambda extra: f"{extra * 1e6:+.1f} µs",
    )


# -- the report ------------------------------------------------------------------------------


def command(script: str, argv: Sequence[str]) -> str:
    """The command line that runs ``script`` with ``argv``, from the current directory."""
    return shlex.join(["python", os.path.relpath(script), *argv])


def version_of(program: str, *argv: str) -> str:
    """The first line ``program argv`` prints (wrk prints its version with its usage)."""
    path = shutil.which(program)
    if path is None:
        return f"{program}: not found"
    proc = subprocess.run([path, *argv], capture_output=True, text=True, timeout=30)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[0].split(" Copyright")[0] if lines else f"{program}: ?"


def aiodelay_sources() -> tuple[str, str]:
    """The directory of the aiodelay this process imports, and a digest of its sources."""
    import aiodelay

    path = aiodelay.__file__ or ""
    return os.path.dirname(path), instructions.source_digest(path)


def header(args: argparse.Namespace) -> list[str]:
    """Date, machine, versions and commands of this run."""
    import aiohttp

    import aiodelay

    prometheus = version("prometheus-client")
    package, digest = aiodelay_sources()
    root = os.path.dirname(package)
    commit = git(root, "rev-parse", "--short", "HEAD")
    lines = [
        f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"machine: {describe_machine()}",
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"prometheus-client {prometheus}, asyncio's loop",
        f"aiodelay {aiodelay.__version__}: {package} (git {commit}, sources {digest})",
        *describe_checkouts(args.aiodelay_path),
    ]
    if args.instructions_args:
        lines.append(version_of("valgrind", "--version"))
    if args.wall_args:
        lines.append(version_of("wrk", "-v"))
    lines.append(f"command: {command(__file__, args.argv)}")
    if args.instructions_args:
        lines.append(f"  instructions: {command(instructions.__file__, args.instructions_argv)}")
    if args.wall_args:
        lines.append(f"  requests/s: {command(overhead.__file__, args.wall_argv)}")
    return lines


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


# -- the command line ------------------------------------------------------------------------


def comma_list(value: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items or any(item not in KINDS for item in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(KINDS)}")
    return items


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of ``argv``, and the arguments of the two scripts (``instructions_args``
    and ``wall_args``, None for a half not run), all checked before anything runs."""
    parser = argparse.ArgumentParser(
        description="what each feature of aiodelay costs a hello-world request, in "
        "instructions (callgrind) and in requests/s (wrk), against its targets"
    )
    parser.add_argument(
        "--kinds",
        type=comma_list,
        default=list(DEFAULT_KINDS),
        help=f"apps to measure (default {','.join(DEFAULT_KINDS)}; also: bare); empty and "
        "aiodelay are always measured, handwritten too with metrics",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="hash seeds of the instructions (default 3)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="load rounds of the requests/s (default 5)"
    )
    parser.add_argument(
        "--duration", type=int, default=5, help="seconds per app and round (default 5)"
    )
    parser.add_argument("--no-wall", action="store_true", help="no requests/s: instructions only")
    parser.add_argument(
        "--no-instructions", action="store_true", help="no instructions: requests/s only"
    )
    add_checkout_option(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.no_wall and args.no_instructions:
        parser.error("--no-wall and --no-instructions leave nothing to measure")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be between 1 and 20")
    if args.rounds < 1 or args.duration < 1:
        parser.error("--rounds and --duration must be at least 1")
    wanted = {*args.kinds, "empty", "aiodelay"}
    if "metrics" in wanted:
        wanted.add("handwritten")
    args.kinds = [kind for kind in KINDS if kind in wanted]
    common = ["--kinds", ",".join(args.kinds)]
    for label, path in args.aiodelay_path:
        common += ["--aiodelay-path", f"{label}={path}"]
    args.instructions_argv = [*common, "--repeat", str(args.repeat)]
    args.wall_argv = [*common, "--rounds", str(args.rounds), "--duration", str(args.duration)]
    args.instructions_args = (
        None if args.no_instructions else instructions.parse_args(args.instructions_argv)
    )
    args.wall_args = None if args.no_wall else overhead.parse_args(args.wall_argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lines = header(args)
    print("\n".join(lines), flush=True)
    _, digest = aiodelay_sources()
    halves: list[tuple[str, Callable[[argparse.Namespace], Measure]]] = []
    if args.instructions_args:
        halves.append(("instructions", instructions_measure))
    if args.wall_args:
        halves.append(("requests/s", wall_measure))
    started = time.monotonic()
    report: list[str] = []
    failed = False
    for name, run in halves:
        print(f"\n-- {name} " + "-" * 60, flush=True)
        began = time.monotonic()
        try:
            measure = run(args)
        except RuntimeError as exc:
            print(f"features.py: error: {exc}", file=sys.stderr)
            failed = True
            continue
        kinds = [kind for kind in measure.costs if base_kind(kind) in args.kinds]
        kinds.sort(key=lambda kind: (kind.partition("@")[2], KINDS.index(base_kind(kind))))
        took = minutes(time.monotonic() - began)
        report += ["", f"{measure.title}, {took}:", "", *table(measure, kinds)]
    print(f"\n-- report {'-' * 60}\n")
    print("\n".join(lines))
    print(f"took {minutes(time.monotonic() - started)}")
    _, now = aiodelay_sources()
    if now != digest:
        print(
            f"note: aiodelay's sources changed during the run ({digest} at the start, {now} at "
            "the end): the numbers mix versions of the code"
        )
    print("\n".join(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
