"""Pages from the Jinja2 templates shipped with the package, and the SVG plots the
server draws (no script is needed to see them).

Autoescaping is on for every template: a value shows as text, whatever it holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..serialization import dumps

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
NONE = "\u2013"  # an en dash: no value
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def when(value: datetime | float | None) -> str:
    """A UTC time as ``2026-01-31 12:00:05``."""
    if value is None:
        return NONE
    if not isinstance(value, datetime):
        value = datetime.fromtimestamp(value, tz=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    """A duration as ``850 ms``, ``12.5 s``, ``3.0 min`` or ``2.0 h``."""
    if value is None:
        return NONE
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def pretty(value: Any) -> str:
    """A value as indented JSON (tagged types as stored), for a ``<pre>``."""
    try:
        return json.dumps(json.loads(dumps(value)), indent=2, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, seconds=seconds, pretty=pretty)
    return env


_ENV = environment()


def render(template: str, **context: Any) -> bytes:
    return _ENV.get_template(template).render(**context).encode()


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    kind: str
    title: str


@dataclass(frozen=True, slots=True)
class Plot:
    """An SVG bar plot, drawn by the template from these numbers."""

    width: int
    height: int
    bars: list[Bar]
    top: int
    labels: list[tuple[float, str]]


def throughput_plot(
    buckets: list[tuple[float, int, int]], width: int = 720, height: int = 160
) -> Plot:
    """Succeeded and failed jobs per bucket (start time, succeeded, failed), stacked."""
    top = max([ok + bad for _, ok, bad in buckets] + [1])
    top = _nice(top)
    plot_height = height - 20
    step = width / max(len(buckets), 1)
    bars: list[Bar] = []
    labels: list[tuple[float, str]] = []
    for i, (start, ok, bad) in enumerate(buckets):
        x = i * step
        ok_h = plot_height * ok / top
        bad_h = plot_height * bad / top
        stamp = datetime.fromtimestamp(start, tz=timezone.utc).strftime("%H:%M")
        if ok:
            bars.append(
                Bar(x, plot_height - ok_h, step * 0.8, ok_h, "ok", f"{stamp}: {ok} succeeded")
            )
        if bad:
            bars.append(
                Bar(
                    x,
                    plot_height - ok_h - bad_h,
                    step * 0.8,
                    bad_h,
                    "bad",
                    f"{stamp}: {bad} failed",
                )
            )
        if i % 10 == 0:
            labels.append((x, stamp))
    return Plot(width, height, bars, top, labels)


def _nice(value: int) -> int:
    magnitude: int = 10 ** max(0, int(math.log10(value)))
    for factor in (1, 2, 5, 10):
        if value <= factor * magnitude:
            return factor * magnitude
    return value


def timeline(
    spans: list[tuple[str, float, float | None, str]], now: float, width: int = 720
) -> Plot:
    """One bar per step (name, started, finished or ``None``, status), on a shared axis."""
    if not spans:
        return Plot(width, 0, [], 0, [])
    start = min(s for _, s, _, _ in spans)
    end = max((f if f is not None else now) for _, _, f, _ in spans)
    total = max(end - start, 1e-3)
    row = 22
    bars = []
    for i, (name, began, ended, status) in enumerate(spans):
        stop = ended if ended is not None else now
        x = 160 + (width - 170) * (began - start) / total
        w = max(2.0, (width - 170) * (stop - began) / total)
        bars.append(Bar(x, i * row + 4, w, row - 8, status, f"{name}: {seconds(stop - began)}"))
    labels = [(float(i * row + row - 7), name) for i, (name, _, _, _) in enumerate(spans)]
    return Plot(width, row * len(spans) + 4, bars, 0, labels)
