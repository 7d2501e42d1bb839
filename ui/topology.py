"""The network drawing: who talks through the router, how much, and in what state.

The consortium is a star (AXL's spanning tree is rooted at the router), so the drawing puts
the router in the middle and every enrolled peer around it; a link's width and label come
from the messages delivered to or from that peer. Node status is derived from what the API
exposes, with rules simple enough to state in the legend:

* ``quarantined``: the validator quarantined the hospital (a ``hospital_quarantined`` entry);
* ``down``: the router has no live route to it (``reachable`` is false), or its deliveries
  fail because the actor is dead or cannot be restarted (the router's ``status``);
* ``slow``: it sent a late update recently, or it has been silent for ``SLOW_AFTER_S`` while
  others kept talking;
* ``live``: otherwise (``unknown`` when only enrolment data is available).

A node that talks over AXL (its own process polling its mailbox through the AXL front, e.g.
``medimesh demo --sites processes``) is drawn with a dashed ring and says so in its tooltip;
its status comes from how recently it polled (the router's ``mailbox_status``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from html import escape

from medimesh.client import Network

__all__ = ["SLOW_AFTER_S", "STATUS_COLOURS", "NodeView", "node_views", "topology_svg"]

SLOW_AFTER_S = 15.0
STATUS_COLOURS: Mapping[str, str] = {
    "live": "#16a34a",
    "slow": "#f59e0b",
    "down": "#dc2626",
    "quarantined": "#7c3aed",
    "unknown": "#9ca3af",
}
_ROLE_ORDER = {"router": 0, "coordinator": 1, "validator": 2, "auditor": 3, "hospital": 4}


@dataclass(frozen=True, slots=True)
class NodeView:
    """One peer as drawn: identity, status and traffic on its link to the router."""

    peer_id: str
    name: str
    role: str
    status: str
    messages: int
    bytes: int
    transport: str = "ray"
    runs_as: str = ""


def _status(
    node_reachable: bool | None, last_seen: float | None, newest: float, quarantined: bool,
    late: bool, router_says: str = "unknown",
) -> str:
    if quarantined:
        return "quarantined"
    if node_reachable is False or router_says == "down":
        return "down"
    if router_says in ("slow", "restarting"):
        return "slow"
    if node_reachable is None:
        return "unknown"
    if late or (last_seen and newest - last_seen > SLOW_AFTER_S):
        return "slow"
    return "live"


def node_views(
    network: Network, quarantined: Collection[str] = (), late: Collection[str] = ()
) -> list[NodeView]:
    """Peers in drawing order (router, coordinator, validator, hospitals by name)."""
    traffic: dict[str, int] = {}
    for e in network.edges:
        traffic[e.source] = traffic.get(e.source, 0) + e.messages
        traffic[e.target] = traffic.get(e.target, 0) + e.messages
    seen = [n.last_seen for n in network.nodes if n.last_seen]
    newest = max(seen) if seen else 0.0
    out = [
        NodeView(
            n.peer_id,
            n.name,
            n.role,
            _status(n.reachable, n.last_seen, newest, n.peer_id in quarantined,
                    n.peer_id in late, n.status),
            traffic.get(n.peer_id, 0) if n.role != "router" else sum(
                e.messages for e in network.edges
            ),
            n.bytes_in + n.bytes_out,
            n.transport,
            n.runs_as,
        )
        for n in network.nodes
    ]
    return sorted(out, key=lambda v: (_ROLE_ORDER.get(v.role, 5), v.name))


def _legend(x: float, y: float, axl: bool) -> Iterable[str]:
    for i, (status, colour) in enumerate(STATUS_COLOURS.items()):
        yy = y + i * 16
        yield (
            f'<circle cx="{x}" cy="{yy}" r="5" fill="{colour}"/>'
            f'<text x="{x + 10}" y="{yy + 4}" fill="#374151">{status}</text>'
        )
    if axl:
        yy = y + len(STATUS_COLOURS) * 16
        yield (
            f'<circle cx="{x}" cy="{yy}" r="5" fill="white" stroke="#111827" '
            f'stroke-dasharray="2 2"/><text x="{x + 10}" y="{yy + 4}" fill="#374151">over AXL'
            "</text>"
        )


def topology_svg(nodes: list[NodeView], width: int = 640, height: int = 440) -> str:
    """Router in the centre, peers on an ellipse; link width ~ log(messages)."""
    if not nodes:
        return (
            '<svg xmlns="http://www.w3.org/2000/svg" class="mm-chart" data-chart="topology" '
            f'data-nodes="0" viewBox="0 0 {width} 60" width="100%" style="max-width:{width}px">'
            '<text x="20" y="34" fill="#6b7280" font-family="system-ui, sans-serif">'
            "no nodes reported yet</text></svg>"
        )
    router = next((n for n in nodes if n.role == "router"), None)
    peers = [n for n in nodes if n is not router]
    cx, cy = width / 2 - 40, height / 2
    rx, ry = min(cx - 60, 250), cy - 50
    most = max([p.messages for p in peers] + [1])
    small = len(peers) > 16
    links: list[str] = []
    circles: list[str] = []
    for i, p in enumerate(peers):
        a = -math.pi / 2 + 2 * math.pi * i / max(len(peers), 1)
        x, y = cx + rx * math.cos(a), cy + ry * math.sin(a)
        w = 1 + 5 * math.log1p(p.messages) / math.log1p(most)
        mx, my = (cx + x) / 2, (cy + y) / 2
        links.append(
            f'<g class="mm-link" data-peer="{escape(p.name)}" data-messages="{p.messages}">'
            f"<title>{escape(p.name)} ↔ router: {p.messages} messages, {p.bytes:,} bytes</title>"
            f'<line x1="{cx:.1f}" y1="{cy:.1f}" x2="{x:.1f}" y2="{y:.1f}" stroke="#94a3b8" '
            f'stroke-width="{w:.1f}"/>'
            + (
                ""
                if small
                else f'<text x="{mx:.1f}" y="{my:.1f}" dy="-3" text-anchor="middle" '
                f'font-size="10" fill="#475569">{p.messages}</text>'
            )
            + "</g>"
        )
        circles.append(_node(p, x, y, 10 if small else 16, not small or p.role != "hospital"))
    if router is not None:
        circles.append(_node(router, cx, cy, 24, True))
    body = [f'<rect width="{width}" height="{height}" fill="white"/>', *links, *circles,
            *_legend(width - 90, 20, any(n.transport == "axl" for n in nodes))]
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" class="mm-chart" data-chart="topology" '
        f'data-nodes="{len(nodes)}" viewBox="0 0 {width} {height}" width="100%" '
        f'style="max-width:{width}px" font-family="system-ui, sans-serif" font-size="12" '
        'role="img">' + "".join(body) + "</svg>"
    )


def _node(n: NodeView, x: float, y: float, r: int, label: bool) -> str:
    colour = STATUS_COLOURS.get(n.status, STATUS_COLOURS["unknown"])
    letter = (n.role[:1] or "?").upper()
    axl = n.transport == "axl"
    where = (f", over AXL ({escape(n.runs_as)})" if n.runs_as else ", over AXL") if axl else ""
    ring = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r + 4}" fill="none" stroke="#111827" '
            'stroke-width="1.5" stroke-dasharray="3 2"/>') if axl else ""
    text = (
        f'<text x="{x:.1f}" y="{y + r + 14:.1f}" text-anchor="middle" fill="#111827">'
        f"{escape(n.name)}</text>"
        if label
        else ""
    )
    return (
        f'<g class="mm-node" data-name="{escape(n.name)}" data-role="{escape(n.role)}" '
        f'data-status="{n.status}" data-transport="{escape(n.transport)}">'
        f"<title>{escape(n.name)} ({escape(n.role)}{where}): {n.status}, "
        f"{n.messages} messages, peer {escape(n.peer_id[:16])}…</title>{ring}"
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colour}" stroke="white" '
        f'stroke-width="2"/><text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" '
        f'fill="white" font-weight="bold">{letter}</text>{text}</g>'
    )
