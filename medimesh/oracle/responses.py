"""The oracle's JSON answers, shaped from store records (no I/O here).

Every float that reaches a response passes :func:`finite` (JSON has no NaN or infinity);
every audit entry is returned whole (:func:`entry_dict`), so a client can re-verify it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from medimesh.audit import AuditEntry
from medimesh.runs import UNNAMED_RUN
from medimesh.store import RoundRecord, RunRecord, StoredModel

__all__ = [
    "ERR",
    "audit_page",
    "baselines_doc",
    "entry_dict",
    "finite",
    "model_dict",
    "network_from_nodes",
    "network_from_router",
    "ready_doc",
    "round_dict",
    "round_metrics_of",
    "run_dict",
    "run_setup",
]

ERR: dict[str, Any] = {
    "description": "Error with a human-readable detail",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"detail": {}},
                "required": ["detail"],
            }
        }
    },
}


def entry_dict(e: AuditEntry) -> dict[str, Any]:
    """An audit entry as JSON (every field, so a client can re-verify it)."""
    return {
        "seq": e.seq,
        "at": e.at,
        "actor": e.actor,
        "event": e.event,
        "round": e.round,
        "subject": e.subject,
        "body": e.body,
        "signature": e.signature,
        "prev_hash": e.prev_hash,
        "entry_hash": e.entry_hash,
        "writer": e.writer,
        "writer_signature": e.writer_signature,
    }


def model_dict(m: StoredModel, active: str | None) -> dict[str, Any]:
    return {
        "model_hash": m.model_hash,
        "round": m.round,
        "parent_hash": m.parent_hash,
        "n_features": m.shape[0],
        "n_classes": m.shape[1],
        "provenance": m.provenance,
        "created_at": m.created_at,
        "active": m.model_hash == active,
    }


def run_dict(r: RunRecord, served: str | None) -> dict[str, Any]:
    return {
        "run_id": r.run_id,
        "started_at": r.started_at,
        "rounds": r.rounds,
        "last_round": r.last_round,
        "final_top1": finite(r.final_top1),
        "final_top3": finite(r.final_top3),
        "model_hash": r.model_hash,
        "model_round": r.model_round,
        "info": finite(r.info),
        "served": r.run_id == served,
    }


def baselines_doc(run_id: str | None, setup: dict[str, Any]) -> dict[str, Any]:
    """/baselines from a run's signed ``setup_completed`` entry: one row per hospital."""
    raw = setup.get("baselines")
    rows = []
    for site, b in sorted(raw.items()) if isinstance(raw, dict) else []:
        if not isinstance(b, dict):
            continue
        # Coordinators before cross-site baselines wrote own-site scores as top1/top3/n_test.
        own1 = b.get("own_site_top1", b.get("top1"))
        own3 = b.get("own_site_top3", b.get("top3"))
        rows.append({
            "site": str(site),
            "own_site_top1": finite(own1),
            "own_site_top3": finite(own3),
            "own_site_n": b.get("own_site_n", b.get("n_test")),
            "all_sites_top1": finite(b.get("all_sites_top1")),
            "all_sites_top3": finite(b.get("all_sites_top3")),
            "all_sites_n": b.get("all_sites_n"),
            "all_sites_evaluated_by": b.get("all_sites_evaluated_by"),
        })
    return {
        "run_id": run_id,
        "cross_baselines": bool(setup.get("cross_baselines", False)),
        "definition": (
            "each hospital's isolated model (its own rows only): own_site_* scored on its own "
            "test split; all_sites_* on every site's test patients, the same patients the "
            "federated model's per-round top1/top3 are computed on"
        ),
        "sites": rows,
    }


def finite(obj: Any) -> Any:
    """JSON has no NaN/inf: replace them with null so a metrics row never breaks a response."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def network_from_router(stats: dict[str, Any], topo: dict[str, Any]) -> dict[str, Any]:
    nodes = [{"peer_id": pid, **info} for pid, info in sorted(stats.get("peers", {}).items())]
    root = topo.get("our_public_key", "")
    if root and root not in stats.get("peers", {}):
        nodes.insert(0, {"peer_id": root, "name": "router", "role": "router", "reachable": True})
    return {
        "source": "router",
        "nodes": nodes,
        "edges": list(stats.get("edges", [])),
        "messages_by_type": dict(stats.get("messages_by_type", {})),
        "bytes_by_type": dict(stats.get("bytes_by_type", {})),
        "topology": topo,
    }


def network_from_nodes(records: list[Any]) -> dict[str, Any]:
    nodes = [
        {
            "peer_id": n.peer_id,
            "name": n.name,
            "role": n.role,
            "reachable": None,
            "msgs_out": 0,
            "bytes_out": 0,
            "msgs_in": 0,
            "bytes_in": 0,
            "dropped": 0,
            "last_seen": None,
        }
        for n in records
    ]
    root = next((n.peer_id for n in records if n.role == "router"), "")
    peers = sorted(n.peer_id for n in records if n.peer_id != root)
    tree = [{"public_key": p, "parent": root, "sequence": i} for i, p in enumerate(peers)]
    return {
        "source": "store",
        "nodes": nodes,
        "edges": [],
        "messages_by_type": {},
        "bytes_by_type": {},
        "topology": {
            "our_ipv6": "",
            "our_public_key": root,
            "peers": peers,
            "tree": tree if root else [],
        },
    }


def round_dict(r: RoundRecord) -> dict[str, Any]:
    """One closed round as /rounds lists it."""
    return {
        "round": r.round,
        "metrics": finite(r.metrics),
        "model_hash": r.model_hash,
        "closed_at": r.closed_at,
        "run_id": r.run_id,
    }


def round_metrics_of(
    rows: Iterable[RoundRecord], model_hash: str, served_run: str | None
) -> Any:
    """The metrics of the round that produced ``model_hash`` (every run's rounds; the served
    run's row first if several runs have it), or None."""
    ordered = sorted(rows, key=lambda r: r.run_id != served_run)
    return next((finite(r.metrics) for r in ordered if r.model_hash == model_hash), None)


def run_setup(entries: Sequence[AuditEntry], run_id: str) -> dict[str, Any]:
    """The body of a run's newest ``setup_completed`` entry ({} if none); entries from before
    runs had ids belong to the unnamed run."""
    for e in reversed(entries):
        if e.body.get("run_id", UNNAMED_RUN) == run_id:
            return e.body
    return {}


def audit_page(rows: Sequence[AuditEntry], after_seq: int, limit: int) -> dict[str, Any]:
    """One /audit page from up to ``limit + 1`` rows (the extra row only says there is more)."""
    page = rows[:limit]
    return {
        "entries": [entry_dict(e) for e in page],
        "next_after_seq": page[-1].seq if page else after_seq,
        "has_more": len(rows) > limit,
    }


def ready_doc(
    *,
    model_hash: str | None,
    model_round: int | None,
    run_id: str | None,
    vouched_by: dict[str, Any] | None,
    refused: dict[str, Any] | None,
    roster: str,
    problems: list[str],
) -> tuple[dict[str, Any], int]:
    """The /ready body and its status: 200 when nothing is missing, else 503."""
    body = {
        "ready": not problems,
        "model_hash": model_hash,
        "model_round": model_round,
        "run_id": run_id,
        "vouched_by": vouched_by,
        "refused": refused,
        "roster": roster,
        "problems": problems,
    }
    return body, 200 if not problems else 503
