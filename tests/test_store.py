"""The PostgreSQL store against a real embedded server (pgserver), one per test module.

Every test gets a fresh database on that server (CREATE DATABASE costs ~30 ms), so tampering
in one test cannot leak into another. The outage test runs its own server, because it stops it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import numpy as np
import pytest

from medimesh.audit import GENESIS, AuditChain, AuditEntry, MemorySink, sign_event
from medimesh.identity import Identity, Member
from medimesh.model import Model, model_hash
from medimesh.store import (
    DATA_DIR_ENV,
    DATABASE_URL_ENV,
    MIGRATIONS,
    BufferedSink,
    InvalidEntry,
    PostgresSink,
    Store,
    StoreBackpressure,
    StoreConflict,
    StoreError,
    StoreUnavailable,
    database_url,
    verify,
)

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def writer() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def actor() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def signers(writer: Identity, actor: Identity) -> set[str]:
    return {writer.peer_id, actor.peer_id}


def make_entries(chain: AuditChain, actor: Identity, n: int, start: int = 0) -> list[AuditEntry]:
    """Signed, chained entries whose bodies exercise jsonb's number and text reformatting."""
    events = [
        sign_event(
            actor,
            "update.accepted" if i % 3 else "round.opened",
            i // 10,
            subject=f"site-{i % 4}",
            body={
                "i": i,
                "score": 0.1 + i / 7,
                "tiny": 1e-7,
                "huge": 1e300,
                "whole": 2.0,
                "digest": f"{i:064x}",
                "note": "naïve → ok",
                "nested": {"b": [1, 2.5, None, True], "a": "x"},
            },
        )
        for i in range(start, start + n)
    ]
    return chain.extend(events)


async def _tamper(url: str, *statements: str) -> None:
    """What a superuser can do: switch the trigger off, rewrite history, switch it back on."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only")
        for sql in statements:
            await conn.execute(sql)
        await conn.execute("ALTER TABLE audit_entries ENABLE TRIGGER audit_entries_append_only")
    finally:
        await conn.close()


async def _seed(url: str, entries: Sequence[AuditEntry]) -> None:
    async with await Store.open(url) as store:
        await store.append_entries(entries)


# ----------------------------------------------------------------------------------- schema


def test_migrations_run_once(url: str) -> None:
    async def scenario() -> None:
        async with await Store.open(url) as first:
            assert await first.schema_versions() == [v for v, _ in MIGRATIONS]
        async with await Store.open(url) as second:
            assert await second.migrate() == []
            assert await second.schema_versions() == [v for v, _ in MIGRATIONS]

    run(scenario())


# ------------------------------------------------------------------------------ audit trail


def test_append_and_read_back(url: str, writer: Identity, actor: Identity) -> None:
    chain = AuditChain(writer)
    first, second = make_entries(chain, actor, 12), make_entries(chain, actor, 13, start=12)

    async def scenario() -> None:
        async with await Store.open(url) as store:
            assert await store.head() == (0, GENESIS)
            assert await store.append_entries(first) == 12
            assert await store.append_entries(second) == 13
            assert await store.entries() == first + second  # bodies exact, floats included
            assert await store.head() == chain.head
            assert await store.entries(after_seq=20) == second[8:]
            assert await store.entries(after_seq=3, limit=2) == first[3:5]
            assert [e.seq for e in await store.entries(event="round.opened")] == [
                e.seq for e in first + second if e.event == "round.opened"
            ]
            assert await store.entries(round=2) == (first + second)[20:]
            assert [e async for e in store.iter_entries(after_seq=5, page=4)] == (first + second)[
                5:
            ]
            # A retry after a lost acknowledgement is a no-op, overlapping or not.
            assert await store.append_entries(second) == 0
            assert await store.append_entries(first[5:] + second[:2]) == 0
            assert len(await store.entries()) == 25

    run(scenario())


def test_conflicts_are_refused(url: str, writer: Identity, actor: Identity) -> None:
    ours = make_entries(AuditChain(writer), actor, 5)
    forked = make_entries(AuditChain(Identity.generate()), actor, 6)

    async def scenario() -> None:
        async with await Store.open(url) as store:
            await store.append_entries(ours)
            with pytest.raises(StoreConflict, match="different hash"):
                await store.append_entries(forked[:5])
            with pytest.raises(StoreConflict, match="fork"):
                await store.append_entries(forked[5:])  # seq 6 not linked to our seq 5
            later = make_entries(AuditChain(writer, last_seq=9, last_hash="ab" * 32), actor, 1)
            with pytest.raises(StoreConflict, match="gap"):
                await store.append_entries(later)
            with pytest.raises(InvalidEntry, match="contiguous"):
                await store.append_entries([ours[0], ours[2]])
            assert await store.entries() == ours  # nothing half-written

    run(scenario())


def test_unstorable_bodies_are_refused(url: str, writer: Identity, actor: Identity) -> None:
    chain = AuditChain(writer)
    nan = chain.extend([sign_event(actor, "x", 0, body={"v": float("nan")})])
    chain2 = AuditChain(writer)
    nul = chain2.extend([sign_event(actor, "x", 0, body={"v": "a\x00b"})])

    async def scenario() -> None:
        async with await Store.open(url) as store:
            for bad in (nan, nul):
                with pytest.raises(InvalidEntry):
                    await store.append_entries(bad)

    run(scenario())


def test_chain_verifies_from_the_database(
    url: str, writer: Identity, actor: Identity, signers: set[str]
) -> None:
    entries = make_entries(AuditChain(writer), actor, 30)

    async def scenario() -> None:
        await _seed(url, entries)
        report = await verify(url, signers, page=7)  # several pages, prefetching
        assert report.ok, report
        assert report.entries == 30 and report.head_hash == entries[-1].entry_hash
        async with await Store.open(url) as store:
            assert (await verify(store, signers)).ok

    run(scenario())


def test_trigger_rejects_update_delete_truncate(
    url: str, writer: Identity, actor: Identity
) -> None:
    async def scenario() -> None:
        await _seed(url, make_entries(AuditChain(writer), actor, 3))
        conn = await asyncpg.connect(url)
        try:
            for sql in (
                "UPDATE audit_entries SET subject = 'x' WHERE seq = 2",
                "DELETE FROM audit_entries WHERE seq = 3",
                "TRUNCATE audit_entries",
            ):
                with pytest.raises(asyncpg.RaiseError, match="append-only"):
                    await conn.execute(sql)
            assert await conn.fetchval("SELECT count(*) FROM audit_entries") == 3
        finally:
            await conn.close()

    run(scenario())


def _resigned_body_sql(entry: AuditEntry) -> str:
    """Rewrite both body columns consistently, as a careful attacker would."""
    body = {**entry.body, "score": 0.99}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    quoted = text.replace("'", "''")
    return (
        f"UPDATE audit_entries SET body = '{quoted}'::jsonb, body_canonical = '{quoted}'"
        f" WHERE seq = {entry.seq}"
    )


@pytest.mark.parametrize(
    ("tamper", "broken_seq", "problem"),
    [
        ("rewrite-body", 4, "bad actor signature"),
        ("edit-jsonb-only", 4, "body column differs from body_canonical"),
        ("delete-row", 6, "sequence gap: expected 5, found 6 (removed row(s))"),
        ("swap-seq", 3, "prev_hash does not match"),
        ("rewrite-subject", 7, "bad actor signature"),
        ("forge-entry-hash", 8, "entry_hash does not match"),
    ],
)
def test_superuser_tampering_is_detected(
    url: str,
    writer: Identity,
    actor: Identity,
    signers: set[str],
    tamper: str,
    broken_seq: int,
    problem: str,
) -> None:
    entries = make_entries(AuditChain(writer), actor, 10)
    statements = {
        "rewrite-body": [_resigned_body_sql(entries[3])],
        "edit-jsonb-only": ["UPDATE audit_entries SET body = body || '{\"i\": 99}' WHERE seq = 4"],
        "delete-row": ["DELETE FROM audit_entries WHERE seq = 5"],
        "swap-seq": [
            "UPDATE audit_entries SET seq = 1000 WHERE seq = 3",
            "UPDATE audit_entries SET seq = 3 WHERE seq = 4",
            "UPDATE audit_entries SET seq = 4 WHERE seq = 1000",
        ],
        "rewrite-subject": ["UPDATE audit_entries SET subject = 'site-9' WHERE seq = 7"],
        "forge-entry-hash": [
            "UPDATE audit_entries SET entry_hash = repeat('0', 63) || '1' WHERE seq = 8"
        ],
    }[tamper]

    async def scenario() -> None:
        await _seed(url, entries)
        assert (await verify(url, signers)).ok
        await _tamper(url, *statements)
        report = await verify(url, signers)
        assert not report.ok
        assert report.broken_seq == broken_seq, report
        assert problem in report.problem, report

    run(scenario())


def test_unknown_signer_is_named(url: str, writer: Identity, actor: Identity) -> None:
    async def scenario() -> None:
        await _seed(url, make_entries(AuditChain(writer), actor, 3))
        report = await verify(url, {writer.peer_id})
        assert not report.ok and report.broken_seq == 1
        assert report.problem.startswith("unknown signer: actor")
        report = await verify(url, {actor.peer_id})
        assert report.problem.startswith("unknown signer: writer")

    run(scenario())


def test_notify_reaches_listeners(url: str, writer: Identity, actor: Identity) -> None:
    chain = AuditChain(writer)

    async def scenario() -> None:
        heard: list[int] = []
        first = make_entries(chain, actor, 4)
        async with await Store.open(url) as store:
            async with await store.listen() as feed, await store.listen(heard.append):
                await store.append_entries(first)
                assert await asyncio.wait_for(anext(feed), 5) == 4
                await store.append_entries(make_entries(chain, actor, 2, start=4))
                assert await asyncio.wait_for(anext(feed), 5) == 6
                await store.append_entries(first)  # a retry
                await asyncio.sleep(0.05)
            assert heard == [4, 6]  # a no-op retry announces nothing

    run(scenario())


# ---------------------------------------------------------------------- synchronous sinks


def test_postgres_sink_is_an_audit_sink(
    url: str, writer: Identity, actor: Identity, signers: set[str]
) -> None:
    chain = AuditChain(writer)
    entries = make_entries(chain, actor, 8)
    with PostgresSink(url) as sink:
        sink.write(entries[:5])
        sink.write(entries[5:])
        sink.write(entries[5:])  # idempotent
        assert list(sink.entries()) == entries
        assert sink.head() == chain.head
        assert sink.verify(signers).ok


def healthy(sink: BufferedSink) -> bool:
    return sink.last_error is None


def test_buffered_sink_survives_a_database_outage(
    tmp_path: Path, writer: Identity, actor: Identity, signers: set[str], start_pg: Any
) -> None:
    data_dir = tmp_path / "pg"
    server = start_pg(data_dir)
    chain = AuditChain(writer)
    batches = [make_entries(chain, actor, 5, start=5 * i) for i in range(10)]
    try:
        sink = BufferedSink(PostgresSink(server.get_uri(), connect_timeout=2), max_buffer=100)
        for batch in batches[:3]:
            sink.write(batch)
        assert sink.pending == 0 and healthy(sink)

        server.cleanup()  # pg_ctl stop; the next get_server on this directory starts it again
        for batch in batches[3:8]:
            sink.write(batch)  # no exception: buffered in order
        assert sink.pending == 25
        assert not healthy(sink)
        assert not sink.flush(timeout=0.3, interval=0.1)

        server = start_pg(data_dir)
        sink.write(batches[8])  # retries the buffer first, then writes this batch
        sink.write(batches[9])
        assert sink.flush(timeout=10)
        assert sink.pending == 0 and healthy(sink)
        stored = list(sink.entries())
        assert [e.seq for e in stored] == list(range(1, 51))  # each entry exactly once
        assert stored == [e for b in batches for e in b]
        assert sink.close()
        report = run(verify(server.get_uri(), signers))
        assert report.ok and report.entries == 50
    finally:
        server.cleanup()


class FlakySink:
    """A MemorySink that can be switched off, to drive BufferedSink deterministically."""

    def __init__(self) -> None:
        self.inner = MemorySink()
        self.down = False
        self.calls = 0

    def write(self, entries: Sequence[AuditEntry]) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("down for the test")
        self.inner.write(entries)

    def entries(self) -> Iterator[AuditEntry]:
        return self.inner.entries()


def test_buffered_sink_applies_backpressure(writer: Identity, actor: Identity) -> None:
    chain = AuditChain(writer)
    flaky = FlakySink()
    sink = BufferedSink(flaky, max_buffer=10, chunk=3)
    flaky.down = True
    a = make_entries(chain, actor, 6)
    b = make_entries(AuditChain(writer, *chain.head), actor, 5, start=6)
    c = make_entries(AuditChain(writer, *chain.head), actor, 4, start=6)
    sink.write(a)
    assert sink.pending == 6
    with pytest.raises(StoreBackpressure, match="buffer full"):
        sink.write(b)  # 6 + 5 > 10: refused whole, nothing dropped
    assert sink.pending == 6
    sink.write(c)  # 6 + 4 fits (c also starts at seq 7)
    assert sink.pending == 10
    with pytest.raises(InvalidEntry, match="does not follow"):
        sink.write(a)  # would break the buffered chain
    assert [e.seq for e in sink.entries()] == list(range(1, 11))  # buffered ones are visible
    flaky.down = False
    assert sink.flush(timeout=1)
    assert [e.seq for e in flaky.entries()] == list(range(1, 11))
    assert sink.pending == 0


# -------------------------------------------------------------------- models and the rest


def test_models_rounds_nodes_checkpoints_round_trip(url: str, writer: Identity) -> None:
    rng = np.random.default_rng(7)
    parent = Model(np.zeros((5, 3)), np.zeros(3))
    child = Model(rng.normal(size=(5, 3)), rng.normal(size=3))
    digests = {"updates": ["u" * 64, "v" * 64], "verdicts": ["w" * 64]}

    async def scenario() -> None:
        async with await Store.open(url) as store:
            p_hash = await store.put_model(parent, 0)
            c_hash = await store.put_model(
                child, 1, parent_hash=p_hash, updates=digests["updates"], verdicts=["w" * 64]
            )
            assert c_hash == model_hash(child)
            assert await store.put_model(child, 1) == c_hash  # idempotent
            got = await store.get_model(c_hash)
            assert got is not None
            assert got.weights == np.ascontiguousarray(child.weights, dtype="<f4").tobytes()
            assert got.bias == np.ascontiguousarray(child.bias, dtype="<f4").tobytes()
            assert got.shape == (5, 3) and got.parent_hash == p_hash and got.round == 1
            assert got.provenance == digests
            assert model_hash(got.to_model()) == c_hash
            assert np.array_equal(got.to_model().weights, child.weights.astype(np.float32))
            assert [m.model_hash for m in await store.models()] == [p_hash, c_hash]
            assert await store.get_model("0" * 64) is None

            await store.put_round(1, {"accuracy": 0.5}, None)
            with pytest.raises(StoreError, match="not storable"):
                await store.put_round(2, {"loss": float("nan")})
            await store.put_round(1, {"accuracy": 0.75, "sites": 4}, c_hash, closed_at=12.5)
            [r1] = await store.rounds()
            assert (r1.round, r1.metrics, r1.model_hash, r1.closed_at) == (
                1,
                {"accuracy": 0.75, "sites": 4},
                c_hash,
                12.5,
            )

            member = Member("auditor-1", "auditor", writer.peer_id)
            await store.register_node(member, enrolled_at=1.0)
            await store.register_node(member, enrolled_at=2.0)  # re-enrolment keeps the first
            [node] = await store.nodes()
            assert node.member() == member and node.enrolled_at == 1.0

            assert await store.latest_checkpoint() is None
            await store.save_checkpoint(1, {"phase": "collect", "pending": ["a"]}, c_hash)
            cid = await store.save_checkpoint(2, {"phase": "aggregate", "x": 1.5})
            cp = await store.latest_checkpoint()
            assert cp is not None
            assert (cp.id, cp.round, cp.model_hash, cp.state) == (
                cid,
                2,
                None,
                {"phase": "aggregate", "x": 1.5},
            )

    run(scenario())


def test_database_url_resolution(
    pg: PostgresServer, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATABASE_URL_ENV, url)
    assert database_url() == url
    assert database_url(data_dir="/nonexistent/ignored") == url

    async def opened_from_env() -> list[int]:
        async with await Store.open() as store:
            return await store.schema_versions()

    assert run(opened_from_env()) == [v for v, _ in MIGRATIONS]

    monkeypatch.delenv(DATABASE_URL_ENV)
    assert database_url(pg.pgdata) == pg.get_uri()  # same directory: the running server
    monkeypatch.setenv(DATA_DIR_ENV, str(pg.pgdata))
    assert database_url() == pg.get_uri()
