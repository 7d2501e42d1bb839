"""The Auditor actor class as a plain object, against real PostgreSQL (pgserver) and without.

Each test gets a fresh database on a module-wide server; the outage tests run their own server
because they stop it. No Ray: the actor is a plain class, which is what Ray wraps.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytest

from medimesh.actors.auditor import Auditor
from medimesh.audit import AuditEvent, sign_event
from medimesh.errors import ConfigError
from medimesh.identity import Identity, Member, Roster
from medimesh.model import Model, model_hash
from medimesh.store import Store, StoreBackpressure, StoreError

if TYPE_CHECKING:
    pass

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Consortium:
    """Keys and roster for a tiny federation: the auditor, a coordinator, two hospitals."""

    def __init__(self) -> None:
        self.auditor = Identity.generate()
        self.coordinator = Identity.generate()
        self.hospitals = [Identity.generate(), Identity.generate()]
        self.roster = Roster(
            [
                Member("auditor", "auditor", self.auditor.peer_id),
                Member("coordinator", "coordinator", self.coordinator.peer_id),
                *(Member(f"hospital-{i}", "hospital", h.peer_id) for i, h in
                  enumerate(self.hospitals)),
            ]
        )

    def events(self, n: int, start: int = 0) -> list[AuditEvent]:
        signers = [self.coordinator, *self.hospitals]
        return [
            sign_event(
                signers[i % 3],
                "round.opened" if i % 5 == 0 else "update.accepted",
                i // 5,
                subject=f"{i:064x}",
                body={"i": i, "norm": 0.25 + i / 3},
            )
            for i in range(start, start + n)
        ]

    def make(self, url: str | None = None, **kw: Any) -> Auditor:
        return Auditor(self.auditor.seed, self.roster.to_json(), database_url=url, **kw)


@pytest.fixture(scope="module")
def fed() -> Consortium:
    return Consortium()


def _model(seed: int, shape: tuple[int, int] = (6, 3)) -> Model:
    rng = np.random.default_rng(seed)
    return Model(rng.normal(size=shape), rng.normal(size=shape[1]))


def _record_lineage(aud: Auditor, n: int = 3) -> list[str]:
    """Record an initial model and n-1 descendants; returns their hashes, oldest first."""
    hashes: list[str] = []
    for r in range(n):
        m = _model(r)
        h = model_hash(m)
        aud.record_model(
            h,
            r,
            hashes[-1] if hashes else "",
            m.weights,
            m.bias,
            [f"{r:02d}" + "a" * 62, f"{r:02d}" + "b" * 62] if r else [],
            [f"{r:02d}" + "c" * 62] if r else [],
        )
        hashes.append(h)
    return hashes


# ---------------------------------------------------------------------------------- no database


def test_same_api_without_a_database(fed: Consortium, tmp_path: Path) -> None:
    aud = fed.make()
    assert aud.append(fed.events(7)) == 7
    assert aud.flush() and aud.backlog() == 0
    report = aud.verify()
    assert report["ok"] and report["entries"] == 7
    assert [e.seq for e in aud.entries(event="round.opened")] == [1, 6]
    assert [e.seq for e in aud.entries(limit=2)] == [6, 7]
    hashes = _record_lineage(aud)
    got = aud.get_model(hashes[2])
    assert got is not None and got["parent_hash"] == hashes[1]
    assert [m["model_hash"] for m in aud.models()] == hashes
    aud.record_round(1, {"top1": float("nan"), "n": np.int64(3)}, hashes[1])
    assert aud.rounds() == [
        {"round": 1, "metrics": {"top1": None, "n": 3}, "model_hash": hashes[1],
         "closed_at": aud.rounds()[0]["closed_at"]}
    ]
    assert aud.latest_checkpoint() is None
    aud.save_checkpoint(1, {"phase": "done"}, hashes[1])
    assert aud.latest_checkpoint() == {"round": 1, "state": {"phase": "done"},
                                       "model_hash": hashes[1]}
    assert aud.close()
    with pytest.raises(StoreError, match="closed"):
        aud.append(fed.events(1, start=7))  # refused loudly, not buffered into nowhere

    path = tmp_path / "audit.jsonl"
    first = Auditor(fed.auditor.seed, fed.roster.to_json(), str(path))
    first.append(fed.events(3))
    again = Auditor(fed.auditor.seed, fed.roster.to_json(), str(path))
    assert again.head() == first.head()
    again.append(fed.events(2, start=3))
    assert again.verify()["ok"] and again.verify()["entries"] == 5


# ------------------------------------------------------------------------------- with database


def test_append_and_verify_with_a_database(fed: Consortium, url: str) -> None:
    aud = fed.make(url)
    try:
        for i in range(4):
            aud.append(fed.events(10, start=10 * i))
        assert aud.backlog() == 0
        report = aud.verify()
        assert report == {
            "ok": True,
            "entries": 40,
            "head_hash": aud.head()[1],
            "broken_seq": None,
            "problem": "",
        }
        assert [e.seq for e in aud.entries(event="round.opened", limit=3)] == [26, 31, 36]
        assert [e.seq for e in aud.entries(round_=2)] == list(range(11, 16))
        assert len(aud.entries()) == 40
    finally:
        aud.close()

    async def stored_nodes() -> set[tuple[str, str]]:
        async with await Store.open(url) as store:
            return {(n.name, n.peer_id) for n in await store.nodes()}

    assert run(stored_nodes()) == {(m.name, m.peer_id) for m in fed.roster}


def test_restart_continues_the_chain(fed: Consortium, url: str) -> None:
    first = fed.make(url)
    first.append(fed.events(5))
    head = first.head()
    first.close()

    second = fed.make(url)
    try:
        assert second.head() == head
        assert second.append(fed.events(4, start=5)) == 9
        report = second.verify()
        assert report["ok"] and report["entries"] == 9
        assert [e.seq for e in second.entries()] == list(range(1, 10))
    finally:
        second.close()


def test_records_round_trip(fed: Consortium, url: str) -> None:
    aud = fed.make(url)
    try:
        hashes = _record_lineage(aud)
        aud.record_model(hashes[1], 1, hashes[0], _model(1).weights, _model(1).bias, [], [])
        with pytest.raises(ConfigError, match="does not match"):
            aud.record_model("0" * 64, 9, "", _model(9).weights, _model(9).bias, [], [])
        aud.record_round(1, {"top1": 0.5, "loss": math.inf}, hashes[1])
        aud.record_round(2, {"top1": 0.75}, hashes[2])
        aud.save_checkpoint(1, {"phase": "collect"}, hashes[1])
        aud.save_checkpoint(2, {"phase": "done", "pending": []}, hashes[2])
        assert aud.backlog() == 0
    finally:
        aud.close()

    again = fed.make(url)  # everything below is read back from PostgreSQL
    try:
        models = again.models()
        assert [m["model_hash"] for m in models] == hashes
        assert all("weights" not in m for m in models)
        assert models[0]["parent_hash"] is None
        got = again.get_model(hashes[2])
        assert got is not None
        m2 = _model(2)
        assert got["round"] == 2 and got["parent_hash"] == hashes[1]
        assert got["provenance"] == {"updates": ["02" + "a" * 62, "02" + "b" * 62],
                                     "verdicts": ["02" + "c" * 62]}
        assert np.array_equal(got["weights"], m2.weights.astype(np.float32))
        assert np.array_equal(got["bias"], m2.bias.astype(np.float32))
        assert model_hash(Model(got["weights"], got["bias"])) == hashes[2]
        assert again.get_model("f" * 64) is None
        assert [(r["round"], r["metrics"], r["model_hash"]) for r in again.rounds()] == [
            (1, {"top1": 0.5, "loss": None}, hashes[1]),
            (2, {"top1": 0.75}, hashes[2]),
        ]
        assert again.latest_checkpoint() == {
            "round": 2,
            "state": {"phase": "done", "pending": []},
            "model_hash": hashes[2],
        }
    finally:
        again.close()


# ------------------------------------------------------------------------------------ outages


def test_database_outage_buffers_then_delivers_exactly_once(
    fed: Consortium, tmp_path: Path, start_pg: Any
) -> None:
    data_dir = tmp_path / "pg"
    server = start_pg(data_dir)
    uri = str(server.get_uri())
    aud = fed.make(uri)
    try:
        aud.append(fed.events(10))
        hashes = _record_lineage(aud, 2)
        assert aud.backlog() == 0

        server.cleanup()  # the database goes away
        for i in range(1, 4):
            assert aud.append(fed.events(10, start=10 * i)) == 10 * (i + 1)  # no exception
        assert aud.backlog() == 30
        m = _model(5)
        aud.record_model(model_hash(m), 2, hashes[1], m.weights, m.bias, ["d" * 64], [])
        aud.record_round(2, {"top1": 0.9}, model_hash(m))
        aud.save_checkpoint(2, {"phase": "done"}, model_hash(m))
        assert aud.backlog() == 33  # 30 entries + 3 records, none lost
        # Reads keep working from what is pending or remembered.
        assert aud.latest_checkpoint() == {"round": 2, "state": {"phase": "done"},
                                           "model_hash": model_hash(m)}
        got = aud.get_model(model_hash(m))
        assert got is not None and got["provenance"]["updates"] == ["d" * 64]
        assert [r["round"] for r in aud.rounds()] == [2]
        assert not aud.flush(timeout_s=0.3)

        server = start_pg(data_dir)
        assert aud.append(fed.events(5, start=40)) == 45
        assert aud.flush(timeout_s=10)
        assert aud.backlog() == 0
        assert [e.seq for e in aud.entries()] == list(range(1, 46))  # each exactly once
        report = aud.verify()
        assert report["ok"] and report["entries"] == 45
        assert [x["model_hash"] for x in aud.models()] == [*hashes, model_hash(m)]
        assert aud.close()
    finally:
        aud.close()
        server.cleanup()

    again_server = start_pg(data_dir)
    try:

        async def counts() -> tuple[int, int, int]:
            async with await Store.open(uri) as store:
                return (
                    len(await store.entries()),
                    len(await store.models()),
                    len(await store.rounds()),
                )

        assert run(counts()) == (45, 3, 1)
    finally:
        again_server.cleanup()


def test_backpressure_rewinds_and_never_drops(
    fed: Consortium, tmp_path: Path, start_pg: Any
) -> None:
    data_dir = tmp_path / "pg"
    server = start_pg(data_dir)
    aud = fed.make(str(server.get_uri()), max_buffer=10)
    try:
        aud.append(fed.events(2))
        server.cleanup()
        aud.append(fed.events(8, start=2))
        assert aud.backlog() == 8
        refused = fed.events(5, start=10)
        with pytest.raises(StoreBackpressure, match="buffer full"):
            aud.append(refused)
        assert aud.head()[0] == 10 and aud.backlog() == 8  # chain rewound, nothing half-kept
        server = start_pg(data_dir)
        assert aud.append(refused) == 15  # the caller's retry goes through
        assert aud.flush(timeout_s=10)
        report = aud.verify()
        assert report["ok"] and report["entries"] == 15
    finally:
        aud.close()
        server.cleanup()
