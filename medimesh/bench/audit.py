"""``medimesh bench audit``: audit write throughput and verification speed on real PostgreSQL.

Appends go through exactly the auditor's path (``AuditChain.extend`` signing every entry hash,
then ``BufferedSink(PostgresSink)``) with events signed by real actor keys. Verification reads
the trail back from the database and recomputes every hash and both signatures. Everything
runs on a throwaway embedded server in a temporary directory.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medimesh.audit import AuditChain, AuditEvent, sign_event
from medimesh.identity import Identity

__all__ = ["run_audit_bench"]

_EVENTS = ("update.received", "update.accepted", "verdict.signed", "round.closed")


def _events(actors: list[Identity], n: int, start: int = 0) -> list[AuditEvent]:
    """Events shaped like the protocol's: metadata and digests, never patient rows."""
    return [
        sign_event(
            actors[i % len(actors)],
            _EVENTS[i % len(_EVENTS)],
            i // 100,
            subject=f"{i:064x}",
            body={"digest": f"{i * 7919:064x}", "norm": round(0.5 + (i % 97) / 97, 6), "n": i},
        )
        for i in range(start, start + n)
    ]


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def run_audit_bench(
    n_append: int = 20_000, n_verify: int = 100_000, batch: int = 500
) -> dict[str, Any]:
    """Sustained append rate (entries/s) and verification rate over ``n_verify`` stored entries.

    Only the timed append phase signs fresh events; the fill up to ``n_verify`` reuses already
    signed events (an actor signature does not cover seq), which costs verification the same.
    """
    from medimesh.store import BufferedSink, PostgresSink, embedded_server, verify

    if n_append < 1 or n_verify < 1 or batch < 1:
        raise ValueError("n_append, n_verify and batch must be >= 1")
    wall0 = time.perf_counter()
    writer = Identity.generate()
    actors = [Identity.generate() for _ in range(8)]
    signers = {writer.peer_id, *(a.peer_id for a in actors)}

    t0 = time.perf_counter()
    events = _events(actors, n_append)
    sign_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="medimesh-bench-audit-") as tmp:
        t0 = time.perf_counter()
        server = embedded_server(Path(tmp) / "pg")
        startup_s = time.perf_counter() - t0
        try:
            url = str(server.get_uri())
            chain = AuditChain(writer)
            sink = BufferedSink(PostgresSink(url), max_buffer=max(10_000, 2 * batch))
            try:
                latencies: list[float] = []
                t0 = time.perf_counter()
                for i in range(0, n_append, batch):
                    b0 = time.perf_counter()
                    sink.write(chain.extend(events[i : i + batch]))
                    latencies.append(time.perf_counter() - b0)
                drained = sink.flush(timeout=30)
                append_s = time.perf_counter() - t0

                fill = max(0, n_verify - n_append)
                t0 = time.perf_counter()
                fill_batch = max(batch, 2_000)
                for i in range(0, fill, fill_batch):
                    k = min(fill_batch, fill - i)
                    reused = [events[(i + j) % len(events)] for j in range(k)]
                    sink.write(chain.extend(reused))
                drained = sink.flush(timeout=30) and drained
                fill_s = time.perf_counter() - t0
            finally:
                sink.close()

            t0 = time.perf_counter()
            report = asyncio.run(verify(url, signers))
            verify_s = time.perf_counter() - t0
        finally:
            server.cleanup()

    ms = np.array(latencies) * 1000.0
    return {
        "benchmark": "audit",
        "append": {
            "entries": n_append,
            "batch": batch,
            "seconds": round(append_s, 3),
            "entries_per_s": _rate(n_append, append_s),
            "batch_ms": {
                "p50": round(float(np.percentile(ms, 50)), 2),
                "p99": round(float(np.percentile(ms, 99)), 2),
                "max": round(float(ms.max()), 2),
            },
            "all_written": drained,
        },
        "actor_signing": {"events": n_append, "events_per_s": _rate(n_append, sign_s)},
        "fill": {"entries": max(0, n_verify - n_append), "seconds": round(fill_s, 3)},
        "verify": {
            "entries": report.entries,
            "seconds": round(verify_s, 3),
            "entries_per_s": _rate(report.entries, verify_s),
            "ok": report.ok,
            "problem": report.problem,
        },
        "postgres_startup_s": round(startup_s, 3),
        "wall_s": round(time.perf_counter() - wall0, 2),
    }
