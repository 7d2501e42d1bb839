"""Charts as small, self-contained SVG strings.

Why hand-written SVG instead of a plotting library: the charts are simple, render identically
in every browser without JavaScript, stay tiny in screenshots, and carry ``data-*`` attributes
(rounds drawn, candidate ranks) that tests read directly instead of guessing at pixels. Every
function here is pure: data in, markup out; text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

__all__ = [
    "BLUE",
    "GREEN",
    "GREY",
    "RED",
    "Bar",
    "Baseline",
    "RoundPoint",
    "accuracy_chart",
    "duration_chart",
    "empty_chart",
    "probability_chart",
    "updates_chart",
]

BLUE, GREEN, ORANGE, RED, GREY = "#2563eb", "#16a34a", "#ea580c", "#dc2626", "#6b7280"
_FONT = 'font-family="system-ui, sans-serif" font-size="12"'


@dataclass(frozen=True, slots=True)
class Bar:
    """One ranked candidate: its name and probability (0..1)."""

    label: str
    value: float


@dataclass(frozen=True, slots=True)
class RoundPoint:
    """What the training charts need from one closed round (None: not measured)."""

    round: int
    top1: float | None
    top3: float | None
    accepted: int
    rejected: int
    duration_s: float | None


@dataclass(frozen=True, slots=True)
class Baseline:
    """A hospital's isolated model, drawn as a dashed reference line at ``top1``: its top-1 on
    all sites' test patients (the patients the global line is scored on); ``own_top1`` (its
    own test split only) goes in the tooltip."""

    name: str
    top1: float
    own_top1: float | None = None


def _num(x: float) -> str:
    return f"{x:.1f}"


def _svg(width: int, height: int, chart: str, body: list[str], **data: object) -> str:
    attrs = "".join(f' data-{k.replace("_", "-")}="{escape(str(v))}"' for k, v in data.items())
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="mm-chart" data-chart="{chart}"{attrs} '
        f'viewBox="0 0 {width} {height}" width="100%" style="max-width:{width}px" {_FONT} '
        f'role="img">' + "".join(body) + "</svg>"
    )


def empty_chart(chart: str, message: str, width: int = 640, height: int = 60) -> str:
    """A placeholder with a sentence instead of an empty frame."""
    body = [
        f'<rect width="{width}" height="{height}" fill="#f9fafb" stroke="#e5e7eb"/>',
        f'<text x="{width / 2}" y="{height / 2 + 4}" text-anchor="middle" fill="{GREY}">'
        f"{escape(message)}</text>",
    ]
    return _svg(width, height, chart, body, rounds=0)


def probability_chart(bars: Sequence[Bar], highlight: int = 3, width: int = 640) -> str:
    """Horizontal bars in rank order; the first ``highlight`` candidates are coloured."""
    if not bars:
        return empty_chart("differential", "no candidates")
    row, label_w, top = 24, 230, 8
    height = top * 2 + row * len(bars)
    plot_w = width - label_w - 60
    body = [f'<rect width="{width}" height="{height}" fill="white"/>']
    for i, b in enumerate(bars):
        y = top + i * row
        p = min(max(b.value, 0.0), 1.0)
        colour = BLUE if i < highlight else "#93c5fd"
        name = b.label if len(b.label) <= 34 else b.label[:33] + "…"
        body.append(
            f'<g class="mm-bar" data-rank="{i + 1}" data-name="{escape(b.label)}" '
            f'data-probability="{p:.4f}"><title>{escape(b.label)}: {p:.1%}</title>'
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" fill="#111827">'
            f"{i + 1}. {escape(name)}</text>"
            f'<rect x="{label_w}" y="{y + 4}" width="{_num(max(p * plot_w, 1.0))}" '
            f'height="{row - 8}" rx="3" fill="{colour}"/>'
            f'<text x="{_num(label_w + max(p * plot_w, 1.0) + 6)}" y="{y + 16}" '
            f'fill="#111827">{p:.1%}</text></g>'
        )
    return _svg(width, height, "differential", body, top=bars[0].label, candidates=len(bars))


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _floor(points: Sequence[RoundPoint], baselines: Sequence[Baseline]) -> float:
    """The y axis starts a little below the lowest value (0.1 steps) so changes are visible."""
    values = [v for p in points for v in (p.top1, p.top3) if v is not None and math.isfinite(v)]
    values += [b.top1 for b in baselines if math.isfinite(b.top1)]
    lo = min(values, default=0.0)
    return min(max(math.floor((lo - 0.05) * 10) / 10, 0.0), 0.9)


def accuracy_chart(
    points: Sequence[RoundPoint], baselines: Sequence[Baseline] = (), width: int = 760,
    height: int = 300,
) -> str:
    """Global top-1 and top-3 per round; each hospital's isolated model as a dashed reference
    line, scored on the same patients as the global model (all sites' test patients)."""
    if not points:
        return empty_chart("accuracy", "waiting for the first round to close…", width)
    left, right, top, bottom = 44, 170 if baselines else 20, 30, 34
    pw, ph = width - left - right, height - top - bottom
    first = min(p.round for p in points)
    last = max(p.round for p in points)
    span = max(last - first, 1)
    y0 = _floor(points, baselines)
    step = 0.1 if 1.0 - y0 <= 0.5 + 1e-9 else 0.2
    if step == 0.2:
        y0 = math.floor(y0 * 5 + 1e-9) / 5  # ticks at 0.0, 0.2, … 1.0

    def x(r: int) -> float:
        return left + (r - first) / span * pw if last > first else left + pw / 2

    def y(v: float) -> float:
        return top + (1.0 - (min(max(v, y0), 1.0) - y0) / (1.0 - y0)) * ph

    body = [f'<rect width="{width}" height="{height}" fill="white"/>']
    for tick in (y0 + step * k for k in range(round((1.0 - y0) / step) + 1)):
        body.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{_num(y(tick))}" y2="{_num(y(tick))}" '
            f'stroke="#e5e7eb"/><text x="{left - 6}" y="{_num(y(tick) + 4)}" text-anchor="end" '
            f'fill="{GREY}">{tick:.2f}</text>'
        )
    step = max(1, math.ceil((last - first + 1) / 10))
    for r in range(first, last + 1, step):
        body.append(
            f'<text x="{_num(x(r))}" y="{height - bottom + 16}" text-anchor="middle" '
            f'fill="{GREY}">{r}</text>'
        )
    body.append(
        f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle" fill="{GREY}">round'
        "</text>"
    )
    label_y = top - 11.0
    for i, b in enumerate(sorted(baselines, key=lambda b: -b.top1)):
        if not _finite(b.top1):
            continue
        yy = _num(y(b.top1))
        label_y = max(y(b.top1), label_y + 11)  # labels never overlap
        own = (f"; {b.own_top1:.3f} on its own test patients"
               if b.own_top1 is not None and _finite(b.own_top1) else "")
        body.append(
            f'<g class="mm-baseline" data-series="isolated-all-sites" data-name="{escape(b.name)}"'
            f' data-top1="{b.top1:.4f}"'
            + (f' data-own-top1="{b.own_top1:.4f}"' if own else "")
            + f"><title>{escape(b.name)} alone: top-1 {b.top1:.3f} on all sites' test "
            f"patients{own}</title>"
            f'<line x1="{left}" x2="{left + pw}" y1="{yy}" y2="{yy}" stroke="{GREY}" '
            f'stroke-dasharray="4 3" stroke-width="1"/>'
            + (
                f'<text x="{left + pw + 4}" y="{_num(label_y)}" dy="4" fill="{GREY}" '
                f'font-size="10">'
                f"{escape(b.name)} alone {b.top1:.2f}</text>"
                if i < 10
                else ""
            )
            + "</g>"
        )
    for key, colour, name in (("top3", ORANGE, "top-3"), ("top1", BLUE, "top-1")):
        pts = [(p.round, getattr(p, key)) for p in points if _finite(getattr(p, key))]
        if not pts:
            continue
        path = " ".join(f"{_num(x(r))},{_num(y(v))}" for r, v in pts)
        body.append(
            f'<polyline class="mm-series" data-series="{key}" points="{path}" fill="none" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        for r, v in pts:
            body.append(
                f'<circle class="mm-point" data-series="{key}" data-round="{r}" '
                f'data-value="{v:.4f}" cx="{_num(x(r))}" cy="{_num(y(v))}" r="3" '
                f'fill="{colour}"><title>round {r}: {name} {v:.3f}</title></circle>'
            )
    legend = [("top1", "top-1 (federated model)", BLUE, ""), ("top3", "top-3", ORANGE, "")]
    if baselines:
        legend.append(("isolated-all-sites", "one hospital alone (top-1)", GREY, "4 3"))
    lx = left + 8
    for series, text, colour, dash in legend:
        body.append(
            f'<g class="mm-legend" data-series="{series}">'
            f'<line x1="{lx}" x2="{lx + 18}" y1="10" y2="10" stroke="{colour}" '
            f'stroke-width="2" stroke-dasharray="{dash or "none"}"/>'
            f'<text x="{lx + 22}" y="14" fill="#111827">{escape(text)}</text></g>'
        )
        lx += 40 + 7 * len(text)
    if baselines:
        body.append(
            f'<text x="{left + 8}" y="{top - 4}" fill="{GREY}" font-size="10">all lines scored '
            "on the same patients: every site's test split</text>"
        )
    evaluated = sum(1 for p in points if _finite(p.top1))
    return _svg(
        width, height, "accuracy", body, rounds=len(points), evaluated=evaluated,
        last_round=last, baselines=len(baselines),
    )


def _bars_frame(width: int, height: int, left: int, top: int, ph: float, vmax: float,
                fmt: str) -> list[str]:
    body = [f'<rect width="{width}" height="{height}" fill="white"/>']
    for frac in (0.0, 0.5, 1.0):
        yy = top + (1 - frac) * ph
        body.append(
            f'<line x1="{left}" x2="{width - 10}" y1="{_num(yy)}" y2="{_num(yy)}" '
            f'stroke="#e5e7eb"/><text x="{left - 6}" y="{_num(yy + 4)}" text-anchor="end" '
            f'fill="{GREY}">{format(vmax * frac, fmt)}</text>'
        )
    return body


def updates_chart(points: Sequence[RoundPoint], width: int = 420, height: int = 200) -> str:
    """Accepted (green) and rejected (red) updates per round, stacked."""
    if not points:
        return empty_chart("updates", "no rounds yet", width)
    left, top, bottom = 36, 24, 30
    ph = height - top - bottom
    vmax = max(1, max(p.accepted + p.rejected for p in points))
    slot = (width - left - 10) / len(points)
    bw = max(min(slot * 0.7, 28), 1.5)
    body = _bars_frame(width, height, left, top, ph, vmax, ".0f")
    step = max(1, math.ceil(len(points) / 10))
    for i, p in enumerate(points):
        x0 = left + i * slot + (slot - bw) / 2
        acc_h = p.accepted / vmax * ph
        rej_h = p.rejected / vmax * ph
        body.append(
            f'<g class="mm-round" data-round="{p.round}" data-accepted="{p.accepted}" '
            f'data-rejected="{p.rejected}"><title>round {p.round}: {p.accepted} accepted, '
            f"{p.rejected} rejected</title>"
            f'<rect x="{_num(x0)}" y="{_num(top + ph - acc_h)}" width="{_num(bw)}" '
            f'height="{_num(acc_h)}" fill="{GREEN}"/>'
            f'<rect x="{_num(x0)}" y="{_num(top + ph - acc_h - rej_h)}" width="{_num(bw)}" '
            f'height="{_num(rej_h)}" fill="{RED}"/></g>'
        )
        if i % step == 0:
            body.append(
                f'<text x="{_num(x0 + bw / 2)}" y="{height - bottom + 14}" text-anchor="middle" '
                f'fill="{GREY}">{p.round}</text>'
            )
    body.append(
        f'<text x="{left}" y="14" fill="#111827">updates per round: '
        f'<tspan fill="{GREEN}">■ accepted</tspan> <tspan fill="{RED}">■ rejected</tspan></text>'
    )
    return _svg(width, height, "updates", body, rounds=len(points))


def duration_chart(points: Sequence[RoundPoint], width: int = 420, height: int = 200) -> str:
    """Wall time of each round (train, route, validate, aggregate, audit), in seconds."""
    timed = [p for p in points if _finite(p.duration_s)]
    if not timed:
        return empty_chart("duration", "no round timings yet", width)
    left, top, bottom = 44, 24, 30
    ph = height - top - bottom
    vmax = max(max(p.duration_s or 0.0 for p in timed), 1e-3)
    slot = (width - left - 10) / len(timed)
    bw = max(min(slot * 0.7, 28), 1.5)
    body = _bars_frame(width, height, left, top, ph, vmax, ".2f")
    step = max(1, math.ceil(len(timed) / 10))
    for i, p in enumerate(timed):
        d = p.duration_s or 0.0
        x0 = left + i * slot + (slot - bw) / 2
        h = d / vmax * ph
        body.append(
            f'<rect class="mm-round" data-round="{p.round}" data-seconds="{d:.4f}" '
            f'x="{_num(x0)}" y="{_num(top + ph - h)}" width="{_num(bw)}" height="{_num(h)}" '
            f'fill="{BLUE}"><title>round {p.round}: {d * 1000:.0f} ms</title></rect>'
        )
        if i % step == 0:
            body.append(
                f'<text x="{_num(x0 + bw / 2)}" y="{height - bottom + 14}" text-anchor="middle" '
                f'fill="{GREY}">{p.round}</text>'
            )
    body.append(f'<text x="{left}" y="14" fill="#111827">round duration (s)</text>')
    return _svg(width, height, "duration", body, rounds=len(timed))
