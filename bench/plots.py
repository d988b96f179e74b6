"""Charts of the benchmark figures: one SVG per benchmark, from bench/results/*.json.

    python -m bench.plots                      # docs/images/*.svg and their section here
    python -m bench.plots --no-docs            # the charts only
    python -m bench.plots --results DIR --out DIR --no-docs

Reads every ``bench/results/*.json`` a chart is known for (not the ``*-quick.json`` or
``*-partial.json`` of short or broken runs), draws it with matplotlib (Agg, SVG) into
``docs/images/NAME.svg`` and writes the "charts" section at the end of docs/benchmarks.md,
which lists them with the results file and the command that measured each. A file whose
layout is not the one expected is skipped with a note, so are files no chart is made of.

The SVGs are reproducible: no date or creator in their metadata, a fixed hash salt for
their element ids, text left as text (``svg.fonttype = none``), so drawing the same
results again gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath
from matplotlib.ticker import FuncFormatter

from bench.async_jobs import SLEEP_SECONDS, write_docs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
IMAGES = ROOT / "docs" / "images"
MARKER = "bench.plots"

STYLE = {
    "svg.hashsalt": "reliable-bench-plots",
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 8.0,
    "axes.titlesize": 8.5,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 8.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 8.0,
}
# No date and no "Matplotlib vX" in the files: the same results give the same bytes.
METADATA: dict[str, Any] = {"Date": None, "Creator": None}
COLOURS = {
    "reliable": "#2b6cb0",
    "variant": "#63a4e0",
    "floor": "#a0aec0",
    "peer": "#dd8452",
    "base": "#a0aec0",
}
TIMES = "\N{MULTIPLICATION SIGN}"
LABEL_SIZE = 7.5  # the text after a bar
MARK_SIZE = 7.0  # an aim's or a bound's
GAP = 0.05  # inches between a bar and its text
DATABASES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


class Unexpected(ValueError):
    """A results file is not laid out as its chart expects."""


@dataclass
class Bar:
    """One horizontal bar: a figure, what it is set against, the range of its runs."""

    label: str
    value: float
    note: str = ""
    role: str = "reliable"
    low: float | None = None
    high: float | None = None
    # A second, larger figure drawn lighter behind the bar (a p99 behind its p50).
    behind: float | None = None


@dataclass
class Panel:
    title: str
    unit: str
    bars: list[Bar | None]  # None: a gap between groups
    log: bool = False
    line: tuple[float, str] | None = None  # a vertical mark: an aim or a bound


@dataclass
class Lines:
    """A panel of lines: readings over time, one line per database."""

    title: str
    x_unit: str
    unit: str
    series: list[tuple[str, list[float], list[float]]]


@dataclass
class Chart:
    name: str
    title: str
    panels: list[Panel | Lines]
    source: str = ""
    commands: list[str] = field(default_factory=list)
    date: str = ""
    shared_x: bool = False  # one x axis for every panel, to compare across them


# -- reading ------------------------------------------------------------------------


def database(name: str) -> str:
    return DATABASES.get(name.lower(), name)


def databases(names: Iterable[str]) -> str:
    return " and ".join(database(name) for name in names)


def number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unexpected(f"not a number: {value!r}")
    return float(value)


def mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise Unexpected(f"{what}: not a non-empty object")
    return value


def span(runs: Any) -> dict[str, float]:
    """``low`` and ``high`` of a list of runs, for a bar's whisker (none for one run)."""
    if not isinstance(runs, list) or len(runs) < 2:
        return {}
    values = [number(run) for run in runs]
    return {"low": min(values), "high": max(values)}


def times(ratio: float, against: str) -> str:
    return f"{ratio:.2f}{TIMES} {against}" if ratio >= 0.1 else f"{ratio:.2g}{TIMES} {against}"


def shown(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


# -- one chart per benchmark ------------------------------------------------------


def core(data: dict[str, Any]) -> list[Chart]:
    results = mapping(data["results"], "results")
    enqueues: list[Bar | None] = []
    drain: list[Bar | None] = []
    wakeup: list[Bar | None] = []
    for name, row in results.items():
        db = database(name)
        e, d, w = row["enqueue"], row["drain"], row["wakeup"]
        enqueues += [
            Bar(f"{db}: reliable", number(e["reliable"]), times(number(e["ratio"]), "floor")),
            Bar(f"{db}: raw floor", number(e["floor"]), role="floor"),
        ]
        if "floor_autocommit" in e:
            enqueues.append(
                Bar(f"{db}: autocommit INSERT", number(e["floor_autocommit"]), role="floor")
            )
        runs = d.get("runs", {})
        drain += [
            Bar(
                f"{db}: reliable",
                number(d["reliable"]),
                times(number(d["ratio"]), "floor"),
                **span(runs.get("reliable")),
            ),
            Bar(f"{db}: raw floor", number(d["floor"]), role="floor", **span(runs.get("floor"))),
        ]
        wakeup += [
            Bar(
                f"{db}: reliable",
                number(w["reliable_p50"]),
                behind=number(w["reliable_p99"]),
            ),
            Bar(
                f"{db}: raw signal",
                number(w["floor_p50"]),
                role="floor",
                behind=number(w["floor_p99"]),
            ),
        ]
        for bars in (enqueues, drain, wakeup):
            bars.append(None)
    sizes = data.get("sizes", {})
    drained = f"{sizes['drain']:,} no-op jobs, " if "drain" in sizes else ""
    return [
        Chart(
            "core",
            f"Enqueue, drain and wake-up: reliable beside the raw floor, on {databases(results)}",
            [
                Panel("Enqueue, one job per transaction", "jobs/s", enqueues),
                Panel(
                    f"Drain, {drained}4 threads (median, whiskers: range of runs)",
                    "jobs/s",
                    drain,
                ),
                Panel("Wake-up latency, enqueue to attempt start: p50 (p99 lighter)", "ms", wakeup),
            ],
        )
    ]


def enqueue(data: dict[str, Any]) -> list[Chart]:
    results = mapping(data["results"], "results")
    panels: list[Panel] = []
    for name, row in results.items():
        db = database(name)
        medians = mapping(row["median"], f"{name}.median")
        rounds = row.get("rounds", {})
        notes: dict[str, list[str]] = {}
        for key, ratio in row.get("ratios", {}).items():
            mine, _, theirs = key.partition(" / ")
            notes.setdefault(mine, []).append(times(number(ratio), theirs))
        single: list[Bar | None] = []
        batch: list[Bar | None] = []
        for figure, value in medians.items():
            ours = figure.startswith("enqueue")
            role = "reliable" if ours else "floor" if "floor" in figure else "peer"
            if ours and figure != "enqueue":
                role = "variant"
            bar = Bar(
                f"reliable {figure}" if ours else f"raw {figure}" if role == "floor" else figure,
                number(value),
                ", ".join(notes.get(figure, [])),
                role,
                **span(rounds.get(figure)),
            )
            (batch if "many" in figure or "bulk" in figure else single).append(bar)
        panels.append(Panel(f"{db}: single enqueues, one commit each", "jobs/s", single))
        if batch:
            size = f" of {data['batch']:,} jobs" if "batch" in data else ""
            panels.append(Panel(f"{db}: one batch{size}", "jobs/s", batch))
    rounds_note = f", median of {data['rounds']} rounds" if "rounds" in data else ""
    return [
        Chart(
            "enqueue",
            f"Enqueue rate beside the raw floor and huey / PgQueuer on {databases(results)}"
            f"{rounds_note} (whiskers: range)",
            panels,
        )
    ]


def flow(data: dict[str, Any]) -> list[Chart]:
    results = mapping(data["results"], "results")
    panels: list[Panel] = []
    for name, cases in results.items():
        cases = mapping(cases, name)
        uncapped = number(cases["uncapped"]["drain"])
        bars: list[Bar | None] = [
            Bar(
                case,
                number(row["drain"]),
                times(number(row["ratio"]), "uncapped"),
                "reliable" if case == "uncapped" else "variant",
                **span(row.get("runs")),
            )
            for case, row in cases.items()
        ]
        panels.append(
            Panel(
                f"{database(name)}: drain of no-op jobs by flow-control case",
                "jobs/s",
                bars,
                line=(0.75 * uncapped, f"aim: 0.75{TIMES} uncapped"),
            )
        )
    jobs = f"{data['jobs']:,} jobs, " if "jobs" in data else ""
    rounds = f"median of {data['rounds']} runs" if "rounds" in data else "median"
    charts = [
        Chart(
            "flow",
            f"Flow control on {databases(results)}: {jobs}{rounds} (whiskers: range)",
            panels,
        )
    ]
    peers = data.get("peers")
    if isinstance(peers, dict) and isinstance(peers.get("peers"), dict):
        charts.append(flow_peers(data, peers))
    return charts


def flow_peers(data: dict[str, Any], peers: dict[str, Any]) -> Chart:
    ours = mapping(data["results"], "results")["PostgreSQL"]
    libraries: list[tuple[str, str, dict[str, Any]]] = [("reliable (4 threads)", "reliable", ours)]
    for library, peer in mapping(peers["peers"], "peers.peers").items():
        version = f" {peer['version']}" if "version" in peer else ""
        setups = [("4 in flight", peer), *peer.get("variants", {}).items()]
        libraries += [
            (f"{library}{version} ({setup})", "peer", mapping(what["cases"], library))
            for setup, what in setups
        ]
    panels = []
    for case in [case for case in ours if case != "rate limit"]:
        bars: list[Bar | None] = [
            Bar(
                label,
                number(cases[case]["drain"]),
                "" if case == "uncapped" else times(number(cases[case]["ratio"]), "uncapped"),
                role,
            )
            for label, role, cases in libraries
            if case in cases
        ]
        panels.append(Panel(f"PostgreSQL: {case}", "jobs/s", bars, log=True))
    jobs = f"reliable {data['jobs']:,} jobs" if "jobs" in data else "reliable"
    peer_jobs = f", the peers {peers['jobs']:,} each" if "jobs" in peers else ""
    notes = peers.get("notes", {})
    return Chart(
        "flow-peers",
        "Drain with flow control on PostgreSQL beside DBOS and PgQueuer: one worker process "
        f"each ({jobs}{peer_jobs})",
        panels,
        commands=[data.get("command", "python -m bench.flow")]
        + ([notes["command"]] if "command" in notes else []),
        date=str(data.get("date", "")),
        shared_x=True,
    )


def steps(data: dict[str, Any]) -> list[Chart]:
    results = mapping(data["results"], "results")
    rate, resume, wake = [], [], []
    for name, row in results.items():
        db = database(name)
        rate.append(Bar(db, number(row["steps_per_second"])))
        resume.append(Bar(db, number(row["resume_100_steps_ms"])))
        wake.append(Bar(db, number(row["wake_p50_ms"]), behind=number(row["wake_p99_ms"])))
    return [
        Chart(
            "steps",
            f"Durable steps on {databases(results)}",
            [
                Panel("No-op steps in one job, one committed write each", "steps/s", [*rate]),
                Panel("Resume a job of 100 completed steps", "ms", [*resume]),
                Panel("Sleeping job due to resumed: p50 (p99 lighter)", "ms", [*wake]),
            ],
        )
    ]


def http(data: dict[str, Any]) -> list[Chart]:
    cases = data["cases"]
    if not isinstance(cases, list) or not cases:
        raise Unexpected("cases: not a non-empty list")
    by_database: dict[str, list[Bar | None]] = {}
    for case in cases:
        bars = by_database.setdefault(database(case["database"]), [])
        framework = case["framework"]
        if bars:
            bars.append(None)
        bars += [
            Bar(f"{framework}: plain INSERT route", number(case["plain"]["rate"]), role="floor"),
            Bar(
                f"{framework}: offloaded route",
                number(case["offloaded"]["rate"]),
                times(number(case["ratio"]), "plain"),
            ),
        ]
    how = data.get("setup", {})
    setup = (
        f": {how['workers']} server processes, {how['connections']} keep-alive connections"
        if "workers" in how and "connections" in how
        else ""
    )
    return [
        Chart(
            "http",
            f"HTTP requests answered per second, offloaded beside plain, on "
            f"{' and '.join(by_database)}",
            [Panel(f"{db}{setup}", "requests/s", bars) for db, bars in by_database.items()],
        )
    ]


def retention(data: dict[str, Any]) -> list[Chart]:
    results = mapping(data["results"], "results")
    claims: list[Bar | None] = []
    drain: list[Bar | None] = []
    purge: list[Bar | None] = []
    for name, row in results.items():
        db = database(name)
        quiet, busy = row["without_purge"], row["during_purge"]
        claims += [
            Bar(
                f"{db}: without a purge",
                number(quiet["p50_ms"]),
                role="floor",
                behind=number(quiet["p99_ms"]),
            ),
            Bar(
                f"{db}: during the purge",
                number(busy["p50_ms"]),
                f"p99 {times(number(row['p99_ratio']), 'without')}",
                behind=number(busy["p99_ms"]),
            ),
            None,
        ]
        without = number(quiet["drain_per_second"])
        during = number(busy["drain_per_second"])
        drain += [
            Bar(f"{db}: without a purge", without, role="floor"),
            Bar(f"{db}: during the purge", during, times(during / without, "without")),
            None,
        ]
        purge.append(Bar(db, number(row["purge_rows_per_second"])))
    rows = f"{data['rows']:,} finished jobs" if "rows" in data else "finished jobs"
    return [
        Chart(
            "retention",
            f"Purging {rows} while a worker drains, on {databases(results)}",
            [
                Panel("Worker's claim (settle and lease): p50 (p99 lighter)", "ms", claims),
                Panel("Drain of no-op jobs by the worker", "jobs/s", drain),
                Panel("reliable purge --older-than 7d", "rows/s", purge),
            ],
        )
    ]


def dashboard(data: dict[str, Any]) -> list[Chart]:
    backends = mapping(data["backends"], "backends")
    panels = []
    for name, row in backends.items():
        bars: list[Bar | None] = [
            Bar(page, number(timing["p50_ms"]), behind=number(timing["p99_ms"]))
            for page, timing in mapping(row["pages"], f"{name}.pages").items()
        ]
        panels.append(
            Panel(
                f"{database(name)}: time of one page, p50 (p99 lighter)",
                "ms",
                bars,
                line=(100.0, "aim: 100 ms"),
            )
        )
    jobs = f" at {data['jobs']:,} jobs" if "jobs" in data else ""
    return [Chart("dashboard", f"Dashboard pages{jobs} on {databases(backends)}", panels)]


def async_jobs(data: dict[str, Any]) -> list[Chart]:
    results = mapping(data["results"], "results")
    drain: list[Bar | None] = []
    sleepers: list[Bar | None] = []
    for name, row in results.items():
        db = database(name)
        drain += [
            Bar(
                f"{db}: async def no-ops",
                number(row["async_noop_per_second"]),
                times(number(row["async_over_sync"]), "plain"),
            ),
            Bar(f"{db}: plain no-ops", number(row["sync_noop_per_second"]), role="floor"),
            None,
        ]
        sleepers.append(
            Bar(db, number(row["sleepers_seconds"]), f"{number(row['sleepers_per_second']):,.0f}/s")
        )
    count = int(number(data["sleepers"]))
    concurrency = str(data.get("async_concurrency", "")).split(" ")[0]
    bound = None
    if concurrency.isdigit():
        seconds = count * SLEEP_SECONDS / int(concurrency)
        bound = (
            seconds,
            f"bound: {count:,} {TIMES} {SLEEP_SECONDS} s / {concurrency} = {seconds:g} s",
        )
    return [
        Chart(
            "async_jobs",
            f"Async jobs on one worker (4 threads) on {databases(results)}",
            [
                Panel(
                    f"Drain of {number(data['drain']):,.0f} no-op jobs (median)", "jobs/s", drain
                ),
                Panel(
                    f"{count:,} jobs that each await asyncio.sleep({SLEEP_SECONDS}): "
                    "worker start to last success",
                    "s",
                    sleepers,
                    line=bound,
                ),
            ],
        )
    ]


def transactions(data: dict[str, Any]) -> list[Chart]:
    results = mapping(data["results"], "results")
    rate: list[Bar | None] = []
    latency: list[Bar | None] = []
    for name, row in results.items():
        db = database(name)
        one, two = row["one_transaction"], row["two_transactions"]
        rate += [
            Bar(
                f"{db}: one transaction",
                number(one["orders_per_second"]),
                times(number(row["speedup"]), "two"),
            ),
            Bar(f"{db}: two transactions", number(two["orders_per_second"]), role="floor"),
            None,
        ]
        latency += [
            Bar(f"{db}: one transaction", number(one["p50_ms"]), behind=number(one["p99_ms"])),
            Bar(
                f"{db}: two transactions",
                number(two["p50_ms"]),
                role="floor",
                behind=number(two["p99_ms"]),
            ),
            None,
        ]
    orders = f"{data['orders_per_way']:,} orders each way" if "orders_per_way" in data else ""
    return [
        Chart(
            "transactions",
            f"An order and its job in one transaction, beside two, on {databases(results)}",
            [
                Panel(f"Orders written, one at a time ({orders})", "orders/s", rate),
                Panel("Latency of one order: p50 (p99 lighter)", "ms", latency),
            ],
        )
    ]


def revisions(data: dict[str, Any]) -> list[Chart]:
    figures = mapping(data["figures"], "figures")
    base, head = str(data["base"]), str(data["head"])
    by_unit: dict[str, list[Bar | None]] = {}
    for figure, row in figures.items():
        bars = by_unit.setdefault(str(row["unit"]), [])
        if bars:
            bars.append(None)
        bars += [
            Bar(
                f"{figure}: base {base}",
                number(row["base"]),
                "",
                "base",
                **span(row.get("base_runs")),
            ),
            Bar(
                f"{figure}: head {head}",
                number(row["head"]),
                times(number(row["ratio"]), "base"),
                **span(row.get("head_runs")),
            ),
        ]
    names = {figure.split(" ")[0] for figure in figures}
    known = [name for name in DATABASES.values() if name in names]
    known += sorted(names - set(known))
    rounds = int(number(data["rounds"]))
    return [
        Chart(
            "revisions",
            f"Revision {head} beside {base}, bench.core --quick on {' and '.join(known)}: "
            f"median of {rounds} rounds (whiskers: range)",
            [
                Panel(
                    "Rates (higher is better)"
                    if unit.endswith("/s")
                    else "Latency (lower is better)",
                    unit,
                    bars,
                )
                for unit, bars in by_unit.items()
            ],
            commands=[f"python -m bench.revisions --base {base} --head {head} --rounds {rounds}"],
        )
    ]


def backlog(data: dict[str, Any]) -> list[Chart]:
    results = mapping(data["results"], "results")
    claims: list[Bar | None] = []
    polls: list[Bar | None] = []
    enqueues: list[Bar | None] = []
    series = []
    for name, row in results.items():
        db = database(name)
        for bars, figures in ((claims, row["claim"]), (polls, row["idle_poll"])):
            empty, full = figures["empty"], figures["backlog"]
            bars += [
                Bar(
                    f"{db}: empty table",
                    number(empty["median_ms"]),
                    role="floor",
                    behind=number(empty["p90_ms"]),
                ),
                Bar(
                    f"{db}: with the backlog",
                    number(full["median_ms"]),
                    times(number(figures["ratio"]), "empty"),
                    behind=number(full["p90_ms"]),
                ),
                None,
            ]
        enqueued = row["enqueue"]
        enqueues += [
            Bar(f"{db}: empty table", number(enqueued["empty"]), role="floor"),
            Bar(
                f"{db}: with the backlog",
                number(enqueued["backlog"]),
                times(number(enqueued["ratio"]), "empty"),
            ),
            None,
        ]
        memory = row["memory"]
        samples = memory["samples"]
        growth = 1 + number(memory["growth"])
        series.append(
            (
                f"{db}: last / at {number(memory['baseline_at_s']):g} s = {growth:.3f}{TIMES}",
                [number(at) / 60 for at, _ in samples],
                [number(kib) / 1024 for _, kib in samples],
            )
        )
    first = next(iter(results.values()))
    size = f"{first['backlog']['queued']:,} queued and {first['backlog']['finished']:,} finished"
    runs = [row.get("run", {}) for row in results.values()]
    return [
        Chart(
            "backlog",
            f"A backlog of {size} jobs beside an empty table, on {databases(results)}",
            [
                Panel(
                    f"Claim of {first['batch']} jobs, median (p90 lighter); "
                    f"aim: {first['claim'].get('aim', '')}",
                    "ms",
                    claims,
                ),
                Panel("Idle poll, no job due: median (p90 lighter)", "ms", polls),
                Panel("Enqueue, one job per transaction", "jobs/s", enqueues),
                Lines("A worker draining the backlog database: resident set", "min", "MiB", series),
            ],
            commands=sorted({str(run["command"]) for run in runs if "command" in run}),
            date=", ".join(sorted({str(run["date"]) for run in runs if "date" in run})),
        )
    ]


def scaling(data: dict[str, Any]) -> list[Chart]:
    results = mapping(data["results"], "results")
    aim = re.search(r"(\w+): (\d+) processes ≥ ([\d.]+)", str(data.get("aim", {}).get("aim", "")))
    panels = []
    for name, row in results.items():
        db = database(name)
        processes = mapping(row["processes"], f"{name}.processes")
        bars: list[Bar | None] = []
        for count, figures in processes.items():
            rates = [run["rate"] for run in figures.get("runs", [])]
            bars.append(
                Bar(
                    f"{count} process{'es' if count != '1' else ''}",
                    number(figures["rate"]),
                    f"{times(number(figures['ratio']), 'one')}, machine CPU "
                    f"{number(figures['machine_busy']):.0%} busy",
                    "reliable" if count == "1" else "variant",
                    **span(rates),
                )
            )
        line = None
        if aim and database(aim[1]) == db:
            one = number(next(iter(processes.values()))["rate"])
            line = (float(aim[3]) * one, f"aim: {aim[2]} processes ≥ {float(aim[3]):g}{TIMES} one")
        threads = f" of {row['threads']} threads" if "threads" in row else ""
        panels.append(
            Panel(
                f"{db}: {number(row['jobs']):,.0f} no-op jobs drained by worker processes{threads}",
                "jobs/s",
                bars,
                line=line,
            )
        )
    rounds = next(iter(results.values())).get("rounds")
    median = f", median of {rounds} rounds (whiskers: range)" if rounds else ""
    cpus = data.get("machine", {}).get("cpus")
    cores = f" on {cpus} cores" if cpus else ""
    counts = sorted({int(count) for row in results.values() for count in row["processes"]})
    shown_counts = ", ".join(str(count) for count in counts)
    return [
        Chart("scaling", f"Scaling out: {shown_counts} worker processes{cores}{median}", panels)
    ]


# In the order of their sections in docs/benchmarks.md, which the charts' section follows.
DRAWERS: dict[str, Callable[[dict[str, Any]], list[Chart]]] = {
    "core": core,
    "flow": flow,
    "steps": steps,
    "http": http,
    "retention": retention,
    "revisions": revisions,
    "dashboard": dashboard,
    "transactions": transactions,
    "async_jobs": async_jobs,
    "enqueue": enqueue,
    "backlog": backlog,
    "scaling": scaling,
}


def order(path: Path) -> tuple[int, str]:
    """Results files in the page's order, those of one family together, others last."""
    families = list(DRAWERS)
    family = path.stem if path.stem in DRAWERS else path.stem.split("-")[0]
    return (families.index(family) if family in DRAWERS else len(families), path.stem)


def shown_path(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def drawer(stem: str) -> Callable[[dict[str, Any]], list[Chart]] | None:
    """The chart of a results file: by its name, or its family's (``revisions-operators``)."""
    if stem in DRAWERS:
        return DRAWERS[stem]
    family = stem.split("-")[0]
    return DRAWERS.get(family)


# -- drawing ------------------------------------------------------------------------


def positions(panel: Panel) -> list[tuple[float, Bar]]:
    """Each bar with its place on the y axis, a bar's height apart and more between groups."""
    rows: list[tuple[float, Bar]] = []
    y, gap = 0.0, False
    for bar in panel.bars:
        if bar is None:
            gap = bool(rows)
            continue
        y += 0.6 if gap else 0.0
        rows.append((y, bar))
        y, gap = y + 1.0, False
    return rows


def extent(panel: Panel) -> tuple[float, float]:
    """The y axis's limits: from below the last bar to above the first (and the mark's label)."""
    return positions(panel)[-1][0] + 0.6, -1.35 if panel.line else -0.6


def inches(texts: Iterable[str], size: float, weight: str = "normal") -> float:
    """The width of the widest of ``texts`` in the charts' font, without drawing it."""
    font = FontProperties(family=STYLE["font.family"], size=size, weight=weight)
    measure = TextToPath()
    return max(measure.get_text_width_height_descent(t, font, ismath=False)[0] for t in texts) / 72


def label(bar: Bar, unit: str) -> str:
    """The text written after a bar: its figure (p50 / p99), unit and ratio."""
    text = f"{shown(bar.value)} {unit}"
    if bar.behind is not None:
        text = f"{shown(bar.value)} / {shown(bar.behind)} {unit}"
    return f"{text}   {bar.note}" if bar.note else text


def bold(bar: Bar) -> str:
    """Ratios in bold."""
    return "bold" if TIMES in bar.note else "normal"


def end(bar: Bar) -> float:
    return max(bar.value, bar.high or bar.value, bar.behind or bar.value)


def limits(panel: Panel, axis_inches: float) -> tuple[float, float]:
    """The x axis's limits: from zero (or below the least bar, on a log scale) to where the
    text after the longest bar still fits in the axes."""
    rows = positions(panel)
    reach = max(end(bar) for _, bar in rows)
    if panel.line:
        reach = max(reach, panel.line[0])
    low = (
        min(bar.value for _, bar in rows) / 3
        if panel.log
        else min(0.0, *(b.value for _, b in rows))
    )
    scale = (lambda x: math.log10(x)) if panel.log else (lambda x: x)
    high = scale(reach) + 0.05 * (scale(reach) - scale(low))
    texts = [(end(bar), inches([label(bar, panel.unit)], LABEL_SIZE, bold(bar))) for _, bar in rows]
    if panel.line:
        texts.append((panel.line[0], inches([f" {panel.line[1]}"], MARK_SIZE)))
    for x, text_inches in texts:
        share = (GAP + text_inches + 0.05) / axis_inches
        # x + share * (high - low) <= high, in the axis's own scale
        high = max(high, (scale(x) - share * scale(low)) / (1 - share))
    return low, 10**high if panel.log else high


def draw_panel(ax: Axes, panel: Panel, bounds: tuple[float, float], axis_inches: float) -> None:
    low, high = bounds
    if panel.log:
        ax.set_xscale("log")
        step = 10 ** (GAP / axis_inches * (math.log10(high) - math.log10(low)))

        def after(x: float) -> float:
            return x * step
    else:

        def after(x: float) -> float:
            return x + GAP / axis_inches * (high - low)

    base = low if panel.log else 0.0
    rows = positions(panel)
    for y, bar in rows:
        colour = COLOURS.get(bar.role, COLOURS["reliable"])
        if bar.behind is not None:
            ax.barh(y, bar.behind - base, left=base, height=0.7, color=colour, alpha=0.35)
        ax.barh(y, bar.value - base, left=base, height=0.7, color=colour)
        if bar.low is not None and bar.high is not None:
            ax.errorbar(
                bar.value,
                y,
                xerr=[[bar.value - bar.low], [bar.high - bar.value]],
                fmt="none",
                ecolor="#1a202c",
                elinewidth=0.8,
                capsize=2,
            )
        ax.text(
            after(end(bar)),
            y,
            label(bar, panel.unit),
            va="center",
            ha="left",
            fontsize=LABEL_SIZE,
            fontweight=bold(bar),
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.3},
        )
    if panel.line:
        x, mark = panel.line
        ax.axvline(x, color="#c53030", linestyle="--", linewidth=0.9)
        ax.text(x, -0.68, f" {mark}", color="#c53030", fontsize=MARK_SIZE, va="bottom", ha="left")
    ax.set_yticks([y for y, _ in rows], [bar.label for _, bar in rows])
    ax.set_ylim(*extent(panel))
    ax.set_xlim(low, high)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.10g}"))
    ax.set_xlabel(panel.unit + (", log scale" if panel.log else ""))
    ax.set_title(panel.title)
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", color="#e2e8f0", linewidth=0.6)
    ax.set_axisbelow(True)


def draw_lines(ax: Axes, panel: Lines) -> None:
    top = max(y for _, _, ys in panel.series for y in ys)
    colours = ("#2b6cb0", "#dd8452", "#38a169", "#805ad5")
    for index, (name, xs, ys) in enumerate(panel.series):
        ax.plot(xs, ys, color=colours[index % len(colours)], linewidth=1.2, label=name)
    ax.set_ylim(0, top * 1.25)
    ax.set_xlim(0, max(max(xs) for _, xs, _ in panel.series) or 1)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.10g}"))
    ax.set_xlabel(panel.x_unit)
    ax.set_ylabel(panel.unit)
    ax.set_title(panel.title)
    ax.legend(loc="lower right", frameon=False, fontsize=LABEL_SIZE)
    ax.grid(color="#e2e8f0", linewidth=0.6)
    ax.set_axisbelow(True)


def draw(chart: Chart, path: Path) -> None:
    """One figure, panels stacked, laid out here (no layout engine: one drawing pass)."""
    bars = [panel for panel in chart.panels if isinstance(panel, Panel)]
    for panel in bars:
        if not any(bar is not None for bar in panel.bars):
            raise Unexpected(f"{panel.title}: no figures")
    for lines in chart.panels:
        if isinstance(lines, Lines) and not all(xs and ys for _, xs, ys in lines.series):
            raise Unexpected(f"{lines.title}: no readings")
    width, bar_height, right = 8.0, 0.24, 0.15
    title = textwrap.fill(chart.title, 100)
    above, below = 0.3, 0.45  # a panel's title; its tick labels and axis label
    top = 0.02 + 0.19 * (title.count("\n") + 1)
    heights = [
        bar_height * (extent(panel)[0] - extent(panel)[1]) if isinstance(panel, Panel) else 1.6
        for panel in chart.panels
    ]
    height = top + sum(above + h + below for h in heights)
    labels = [bar.label for panel in bars for bar in panel.bars if bar is not None]
    left = 0.12 + max(inches(labels, STYLE["ytick.labelsize"]) if labels else 0.0, 0.45) + 0.08
    axis_inches = width - left - right
    bounds = {id(panel): limits(panel, axis_inches) for panel in bars}
    if chart.shared_x:
        shared = (min(b[0] for b in bounds.values()), max(b[1] for b in bounds.values()))
        bounds = dict.fromkeys(bounds, shared)
    figure = Figure(figsize=(width, height))
    figure.text(0.1 / width, 1 - 0.08 / height, title, fontsize=9.5, fontweight="bold", va="top")
    y = height - top
    for panel, h in zip(chart.panels, heights, strict=True):
        y -= above + h
        ax = figure.add_axes((left / width, y / height, axis_inches / width, h / height))
        if isinstance(panel, Panel):
            draw_panel(ax, panel, bounds[id(panel)], axis_inches)
        else:
            draw_lines(ax, panel)
        y -= below
    figure.savefig(path, format="svg", metadata={**METADATA, "Title": chart.title})


def render(results: Path = RESULTS, out: Path = IMAGES) -> list[Chart]:
    """Draw a chart of every results file in ``results`` into ``out``; the charts drawn."""
    out.mkdir(parents=True, exist_ok=True)
    drawn: list[Chart] = []
    with matplotlib.rc_context(STYLE):
        for path in sorted(results.glob("*.json"), key=order):
            if path.stem.endswith(("-quick", "-partial")):
                continue
            make = drawer(path.stem)
            if make is None:
                print(f"{path.name}: no chart for this file, skipped")
                continue
            try:
                data = mapping(json.loads(path.read_text()), path.name)
                charts = make(data)
                for chart in charts:
                    chart.name = path.stem + chart.name.removeprefix(make.__name__)
                    chart.source = f"bench/results/{path.name}"
                    chart.commands = chart.commands or [
                        str(data.get("command", f"python -m bench.{make.__name__}"))
                    ]
                    chart.date = chart.date or str(data.get("date", ""))
                    draw(chart, out / f"{chart.name}.svg")
            except (
                KeyError,
                TypeError,
                ValueError,
                AttributeError,
                IndexError,
                ArithmeticError,
            ) as error:
                print(f"{path.name}: not the layout expected, skipped ({error!r})")
                continue
            for chart in charts:
                print(f"{path.name}: {shown_path(out / (chart.name + '.svg'))}")
            drawn += charts
    return drawn


def section(charts: Sequence[Chart], images: str = "images") -> str:
    """The charts' section of docs/benchmarks.md, between its markers."""
    lines = [
        f"<!-- {MARKER}:begin (generated by python -m bench.plots) -->",
        "",
        "## Charts",
        "",
        "The figures above as charts, one per benchmark, each drawn from its results file "
        "(whiskers: the range of the runs where there were several). Redrawn from "
        "bench/results/*.json by:",
        "",
        "```sh",
        "python -m bench.plots",
        "```",
    ]
    for chart in charts:
        commands = " and ".join(f"`{command}`" for command in chart.commands)
        date = f" on {chart.date}" if chart.date else ""
        lines += [
            "",
            f"![{chart.title}]({images}/{chart.name}.svg)",
            "",
            f"{chart.source}, measured{date} by {commands}.",
        ]
    lines += ["", f"<!-- {MARKER}:end -->"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="bench/results")
    parser.add_argument("--out", type=Path, default=IMAGES, help="docs/img")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/benchmarks.md")
    args = parser.parse_args(argv)
    charts = render(args.results, args.out)
    if not args.no_docs:
        write_docs(section(charts), MARKER)


if __name__ == "__main__":
    main()
