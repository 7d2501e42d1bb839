"""The PostgreSQL store: audit trail, models, rounds, nodes and coordinator checkpoints.

One implementation on asyncpg. By default it runs an embedded PostgreSQL (``pgserver``) in
``.medimesh/pg``; ``MEDIMESH_DATABASE_URL`` points it at any external server instead. The schema
is migrated on open. ``audit_entries`` is append-only (a trigger refuses UPDATE, DELETE and
TRUNCATE), but a superuser can disable triggers, so integrity rests on :func:`verify`, which
recomputes the hash chain and both signatures from what is stored.

The auditor actor is synchronous, so :class:`PostgresSink` wraps the async store in an event
loop of its own, and :class:`BufferedSink` keeps entries in order while the database is down.
Only audit entries, model parameters, metrics, enrolment and round state live here: never a
patient row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import numpy as np

from medimesh.audit import GENESIS, AuditEntry, AuditSink, ChainReport, canonical, verify_chain
from medimesh.errors import MediMeshError
from medimesh.identity import Member, Role
from medimesh.model import Model, model_hash
from medimesh.runs import RUN_ID_PATTERN, UNNAMED_RUN, is_run_id

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

__all__ = [
    "DATABASE_URL_ENV",
    "DATA_DIR_ENV",
    "MIGRATIONS",
    "NOTIFY_CHANNEL",
    "AuditFeed",
    "BufferedSink",
    "Checkpoint",
    "InvalidEntry",
    "NodeRecord",
    "PostgresSink",
    "RoundRecord",
    "RunRecord",
    "Store",
    "StoreBackpressure",
    "StoreConflict",
    "StoreError",
    "StoreIntegrityError",
    "StoreUnavailable",
    "StoredModel",
    "database_url",
    "default_data_dir",
    "embedded_server",
    "validate_entries",
    "verify",
]

DATABASE_URL_ENV = "MEDIMESH_DATABASE_URL"
DATA_DIR_ENV = "MEDIMESH_DATA_DIR"
NOTIFY_CHANNEL = "medimesh_audit"
_MIGRATION_LOCK = 0x4D4D_5354  # pg_advisory_xact_lock key: "MMST"
_PAGE = 5_000

_log = logging.getLogger(__name__)
T = TypeVar("T")


# --------------------------------------------------------------------------------------- errors


class StoreError(MediMeshError):
    """Base class of store failures."""


class StoreUnavailable(StoreError):
    """The database cannot be reached right now; retrying later may succeed."""


class StoreBackpressure(StoreError):
    """The write buffer is full: the caller must slow down rather than have entries dropped."""


class StoreIntegrityError(StoreError):
    """Retrying cannot help: the data itself is refused. Buffers keep it and fail loudly."""


class StoreConflict(StoreIntegrityError):
    """An entry's seq is already stored with a different hash, or it does not extend the chain."""


class InvalidEntry(StoreIntegrityError):
    """An entry PostgreSQL cannot store faithfully (NaN, NUL, not JSON, broken batch chain)."""


# ----------------------------------------------------------------------------------- migrations

_V1_TABLES = """
CREATE TABLE audit_entries (
    seq              bigint PRIMARY KEY CHECK (seq >= 1),
    at               double precision NOT NULL,
    actor            text NOT NULL,
    event            text NOT NULL,
    round            integer NOT NULL,
    subject          text NOT NULL,
    body             jsonb NOT NULL,
    body_canonical   text NOT NULL,
    signature        text NOT NULL,
    prev_hash        text NOT NULL,
    entry_hash       text NOT NULL UNIQUE,
    writer           text NOT NULL,
    writer_signature text NOT NULL
);
CREATE INDEX audit_entries_round ON audit_entries (round);
CREATE INDEX audit_entries_event ON audit_entries (event);

CREATE TABLE models (
    model_hash  text PRIMARY KEY,
    round       integer NOT NULL,
    parent_hash text,
    weights     bytea NOT NULL,
    bias        bytea NOT NULL,
    n_features  integer NOT NULL CHECK (n_features >= 1),
    n_classes   integer NOT NULL CHECK (n_classes >= 1),
    provenance  jsonb NOT NULL DEFAULT '{"updates": [], "verdicts": []}',
    created_at  double precision NOT NULL,
    CHECK (octet_length(weights) = 4 * n_features * n_classes),
    CHECK (octet_length(bias) = 4 * n_classes)
);
CREATE INDEX models_round ON models (round);

CREATE TABLE rounds (
    round      integer PRIMARY KEY,
    metrics    jsonb NOT NULL DEFAULT '{}',
    model_hash text,
    closed_at  double precision
);

CREATE TABLE nodes (
    peer_id     text PRIMARY KEY CHECK (peer_id ~ '^[0-9a-f]{64}$'),
    role        text NOT NULL,
    name        text NOT NULL,
    enrolled_at double precision NOT NULL
);

CREATE TABLE checkpoints (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    round      integer NOT NULL,
    model_hash text,
    state      jsonb NOT NULL,
    created_at double precision NOT NULL
);
"""

_V2_APPEND_ONLY = """
CREATE FUNCTION medimesh_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_entries is append-only: % is not allowed', TG_OP
        USING HINT = 'the audit trail only grows; run "medimesh audit verify" to check it';
END;
$$;
CREATE TRIGGER audit_entries_append_only
    BEFORE UPDATE OR DELETE ON audit_entries
    FOR EACH ROW EXECUTE FUNCTION medimesh_audit_append_only();
CREATE TRIGGER audit_entries_no_truncate
    BEFORE TRUNCATE ON audit_entries
    FOR EACH STATEMENT EXECUTE FUNCTION medimesh_audit_append_only();
"""

# Runs (medimesh.runs): every model, round and checkpoint belongs to one run. A model row is
# keyed by its hash, and two runs can produce the same parameters (the initial model of two
# runs on the same data), so membership is its own table. Rows from before this migration
# belong to the run named 'unnamed'.
_V3_RUNS = f"""
CREATE TABLE runs (
    run_id     text PRIMARY KEY CHECK (run_id ~ '{RUN_ID_PATTERN}'),
    started_at double precision NOT NULL,
    info       jsonb NOT NULL DEFAULT '{{}}'
);
CREATE TABLE run_models (
    run_id     text NOT NULL REFERENCES runs (run_id),
    model_hash text NOT NULL REFERENCES models (model_hash),
    round      integer NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (run_id, model_hash)
);
CREATE INDEX run_models_round ON run_models (run_id, round, created_at);
INSERT INTO runs (run_id, started_at, info)
    SELECT '{UNNAMED_RUN}',
           COALESCE((SELECT min(created_at) FROM models), extract(epoch FROM now())),
           '{{"note": "stored before runs had ids"}}'
    WHERE EXISTS (SELECT 1 FROM models) OR EXISTS (SELECT 1 FROM rounds)
       OR EXISTS (SELECT 1 FROM checkpoints);
INSERT INTO run_models (run_id, model_hash, round, created_at)
    SELECT '{UNNAMED_RUN}', model_hash, round, created_at FROM models;
ALTER TABLE rounds ADD COLUMN run_id text REFERENCES runs (run_id);
UPDATE rounds SET run_id = '{UNNAMED_RUN}';
ALTER TABLE rounds ALTER COLUMN run_id SET NOT NULL;
ALTER TABLE rounds DROP CONSTRAINT rounds_pkey;
ALTER TABLE rounds ADD PRIMARY KEY (run_id, round);
ALTER TABLE checkpoints ADD COLUMN run_id text REFERENCES runs (run_id);
UPDATE checkpoints SET run_id = '{UNNAMED_RUN}';
ALTER TABLE checkpoints ALTER COLUMN run_id SET NOT NULL;
CREATE INDEX checkpoints_run ON checkpoints (run_id, id);
"""

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, _V1_TABLES), (2, _V2_APPEND_ONLY), (3, _V3_RUNS)
)
"""Ordered (version, sql). Append new versions; never edit an applied one."""

_INSERT_ENTRIES = """
WITH ins AS (
    INSERT INTO audit_entries (seq, at, actor, event, round, subject, body, body_canonical,
                               signature, prev_hash, entry_hash, writer, writer_signature)
    SELECT s, a, ac, ev, r, su, c::jsonb, c, si, ph, eh, w, ws
    FROM unnest($1::bigint[], $2::float8[], $3::text[], $4::text[], $5::int[], $6::text[],
                $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[])
         AS t(s, a, ac, ev, r, su, c, si, ph, eh, w, ws)
    ORDER BY s
    ON CONFLICT DO NOTHING
    RETURNING seq
)
SELECT count(*)::int AS n, max(seq) AS last FROM ins
"""

_ENTRY_COLUMNS = (
    "seq, at, actor, event, round, subject, body::text AS body_jsonb, body_canonical, "
    "signature, prev_hash, entry_hash, writer, writer_signature"
)


# --------------------------------------------------------------------------- locating the server


def default_data_dir() -> Path:
    """``$MEDIMESH_DATA_DIR`` if set, else ``.medimesh/pg`` under the working directory."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path.cwd() / ".medimesh" / "pg"


def embedded_server(data_dir: str | os.PathLike[str] | None = None) -> PostgresServer:
    """Start (or reuse) the embedded PostgreSQL in ``data_dir``; returns the pgserver handle.

    pgserver stops the server when the last handle in the process exits; as root it runs
    postgres as a ``pgserver`` system user it creates. Starting a fresh directory takes ~1 s.
    """
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; harmless, but fatal
        # under -W error (as in our pytest configuration).
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

        server = get_server(path, cleanup_mode="stop")
    _lock_down(server)
    return server


def _lock_down(server: PostgresServer) -> None:
    """Replace pgserver's ``trust`` with peer auth and close the socket to other OS users
    (medimesh/pg_auth.py says what and why). Idempotent; reloads the server if it changed."""
    import pwd
    import signal

    from medimesh import pg_auth

    pgdata = Path(server.pgdata)
    owner = pgdata.stat()
    me = pwd.getpwuid(os.geteuid()).pw_name
    changed = False
    for name, text in (("pg_hba.conf", pg_auth.hba_text()),
                       ("pg_ident.conf", pg_auth.ident_text({me}))):
        conf = pgdata / name
        if conf.read_text() != text:
            conf.write_text(text)  # rewriting keeps the server user's ownership and mode
            changed = True
    main = pgdata / "postgresql.conf"
    if pg_auth.CONF_MARK not in main.read_text():
        with main.open("a") as fh:
            fh.write("\n" + "\n".join(pg_auth.conf_lines()) + "\n")  # from the next start on
    info = server.get_postmaster_info()
    sock_dir = info.socket_dir
    if sock_dir is not None:
        if sock_dir.resolve() != pgdata:  # pgserver's runtime-directory fallback, made 0777
            os.chown(sock_dir, owner.st_uid, owner.st_gid)
            sock_dir.chmod(pg_auth.SOCKET_DIR_MODE)
        sock = info.socket_path
        if sock is not None and sock.exists():
            sock.chmod(0o700)
    if changed and info.pid is not None:
        os.kill(info.pid, signal.SIGHUP)  # reload pg_hba.conf / pg_ident.conf


def database_url(data_dir: str | os.PathLike[str] | None = None) -> str:
    """``$MEDIMESH_DATABASE_URL`` when set, else the URI of the embedded server in ``data_dir``."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return url
    return str(embedded_server(data_dir).get_uri())


# ---------------------------------------------------------------------------------- the records


@dataclass(frozen=True, slots=True)
class StoredModel:
    """A global model as stored: float32 little-endian parameters plus where it came from."""

    model_hash: str
    round: int
    parent_hash: str | None
    weights: bytes
    bias: bytes
    shape: tuple[int, int]
    provenance: dict[str, list[str]]
    created_at: float

    def to_model(self) -> Model:
        w = np.frombuffer(self.weights, dtype="<f4").reshape(self.shape).astype(np.float32)
        b = np.frombuffer(self.bias, dtype="<f4").astype(np.float32)
        return Model(w, b)


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """A closed (or closing) round of one run: its metrics and the model it produced."""

    round: int
    metrics: dict[str, Any]
    model_hash: str | None
    closed_at: float | None
    run_id: str = UNNAMED_RUN


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run: when it started, how far it got, and its last round's accuracy."""

    run_id: str
    started_at: float
    info: dict[str, Any]
    rounds: int  # closed rounds stored
    last_round: int | None
    model_hash: str | None  # the newest model of the run (what an oracle for it serves)
    model_round: int | None
    final_top1: float | None  # the last stored round's top-1 (None: not evaluated yet)
    final_top3: float | None


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """An enrolled node as stored."""

    peer_id: str
    role: Role
    name: str
    enrolled_at: float

    def member(self) -> Member:
        return Member(self.name, self.role, self.peer_id)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Coordinator state saved at a round boundary, so a restart resumes there."""

    id: int
    round: int
    model_hash: str | None
    state: dict[str, Any]
    created_at: float
    run_id: str = UNNAMED_RUN


# --------------------------------------------------------------------------------- validation


def _has_nul(obj: Any) -> bool:
    if isinstance(obj, str):
        return "\x00" in obj
    if isinstance(obj, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return any(_has_nul(v) for v in obj)
    return False


def _body_text(entry: AuditEntry) -> str:
    """The canonical body text, or InvalidEntry if jsonb/text columns could not hold it."""
    try:
        text = json.dumps(
            entry.body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise InvalidEntry(f"entry {entry.seq}: body is not plain JSON ({exc})") from None
    if _has_nul(entry.body):
        raise InvalidEntry(f"entry {entry.seq}: body contains a NUL character")
    return text


def validate_entries(entries: Sequence[AuditEntry]) -> list[str]:
    """Refuse, before buffering, what the database would refuse forever; returns body texts.

    A batch must be one contiguous chain segment (as :class:`AuditChain` produces), so a
    poisoned or shuffled batch fails here instead of blocking a retry buffer.
    """
    texts: list[str] = []
    prev: AuditEntry | None = None
    for e in entries:
        if not 1 <= e.seq < 2**63 or not -(2**31) <= e.round < 2**31:
            raise InvalidEntry(f"entry {e.seq}: seq or round out of range")
        if prev is not None and (e.seq != prev.seq + 1 or e.prev_hash != prev.entry_hash):
            raise InvalidEntry(f"entry {e.seq}: batch is not one contiguous chain segment")
        fields = (e.actor, e.event, e.subject, e.signature, e.prev_hash, e.entry_hash, e.writer)
        if any("\x00" in f for f in (*fields, e.writer_signature)):
            raise InvalidEntry(f"entry {e.seq}: a text field contains a NUL character")
        texts.append(_body_text(e))
        prev = e
    return texts


def _json(obj: Any, what: str) -> str:
    """Strict JSON for a jsonb column: NaN or an unserialisable value is a caller bug."""
    try:
        return json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not storable as JSON: {exc}") from None


def _strictly_equal(x: Any, y: Any) -> bool:
    """JSON equality where true is not 1 (Python's == would say it is)."""
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_strictly_equal(v, y[k]) for k, v in x.items())
    if isinstance(x, list):
        return len(x) == len(y) and all(map(_strictly_equal, x, y))
    return bool(x == y)


def _same_json(jsonb_text: str, canonical_text: str) -> bool:
    """Whether the ``body`` column still says what ``body_canonical`` says.

    Fast path: re-canonicalising jsonb's output reproduces the exact text. Otherwise compare
    with exact Decimal numbers, since jsonb legitimately rewrites e.g. 1e300 as 1000…0.
    """
    try:
        if canonical(json.loads(jsonb_text)).decode() == canonical_text:
            return True
        return _strictly_equal(
            json.loads(jsonb_text, parse_float=Decimal, parse_int=Decimal),
            json.loads(canonical_text, parse_float=Decimal, parse_int=Decimal),
        )
    except ValueError:
        return False


def _row_entry(row: asyncpg.Record) -> tuple[AuditEntry, bool]:
    """An entry built from ``body_canonical`` (exact), plus whether ``body`` still agrees."""
    consistent = _same_json(row["body_jsonb"], row["body_canonical"])
    try:
        body = json.loads(row["body_canonical"])
    except ValueError:
        body, consistent = json.loads(row["body_jsonb"]), False
    entry = AuditEntry(
        seq=row["seq"],
        at=row["at"],
        actor=row["actor"],
        event=row["event"],
        round=row["round"],
        subject=row["subject"],
        body=body if isinstance(body, dict) else {},
        signature=row["signature"],
        prev_hash=row["prev_hash"],
        entry_hash=row["entry_hash"],
        writer=row["writer"],
        writer_signature=row["writer_signature"],
    )
    return entry, consistent and isinstance(body, dict)


_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
)

_CLOSE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *_TRANSIENT)


@contextlib.asynccontextmanager
async def _db_errors(what: str) -> AsyncIterator[None]:
    """Turn 'the database went away' into StoreUnavailable, so callers can retry on one type."""
    try:
        yield
    except _TRANSIENT as exc:
        raise StoreUnavailable(
            f"{what}: database unreachable ({type(exc).__name__}: {exc})"
        ) from exc


# --------------------------------------------------------------------------------- live feed


class AuditFeed:
    """Sequence numbers announced by ``NOTIFY medimesh_audit`` after each committed batch.

    Each number is the last seq of a batch; notifications can coalesce, so read
    ``entries(after_seq=last_seen)`` rather than assuming one notification per entry. Use as an
    async context manager and either iterate it or pass a callback to :meth:`Store.listen`.
    """

    def __init__(self, conn: asyncpg.Connection, callback: Callable[[int], object] | None) -> None:
        self._conn = conn
        self._callback = callback
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._closed = False

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            seq = int(payload)
        except ValueError:
            return
        if self._callback is not None:
            self._callback(seq)
        else:
            self._queue.put_nowait(seq)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(*_TRANSIENT):
            await self._conn.remove_listener(NOTIFY_CHANNEL, self._on_notify)
        await self._conn.close(timeout=5)

    async def __aenter__(self) -> AuditFeed:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AuditFeed:
        return self

    async def __anext__(self) -> int:
        if self._closed:
            raise StopAsyncIteration
        return await self._queue.get()


# -------------------------------------------------------------------------------------- Store


class Store:
    """Async access to every MediMesh table over one asyncpg pool. Open with :meth:`open`."""

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self._pool = pool
        self._url = url

    @classmethod
    async def open(
        cls,
        url: str | None = None,
        *,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout: float = 5.0,
        command_timeout: float = 60.0,
        migrate: bool = True,
    ) -> Store:
        """Connect (starting the embedded server if no URL is known) and migrate the schema.
        ``migrate=False``: the application role, which may not create tables (medimesh.db_roles);
        the owner migrated already."""
        if url is None:
            url = await asyncio.to_thread(database_url)
        async with _db_errors("open"):
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                command_timeout=command_timeout,
            )
        store = cls(pool, url)
        try:
            if migrate:
                await store.migrate()
        except BaseException:
            pool.terminate()
            raise
        return store

    @property
    def url(self) -> str:
        return self._url

    async def close(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout)
        except _CLOSE_ERRORS:
            self._pool.terminate()

    def terminate(self) -> None:
        """Drop every connection at once: for a server that is already gone."""
        self._pool.terminate()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # -- schema

    async def migrate(self) -> list[int]:
        """Apply pending migrations under an advisory lock; returns the versions applied now."""
        applied: list[int] = []
        async with _db_errors("migrate"), self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, applied_at double precision NOT NULL)"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            known = {v for v, _ in MIGRATIONS}
            if done - known:
                raise StoreError(
                    f"database schema has versions {sorted(done - known)} this build does not know"
                )
            for version, sql in MIGRATIONS:
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    version,
                    time.time(),
                )
                applied.append(version)
        return applied

    async def schema_versions(self) -> list[int]:
        async with _db_errors("schema_versions"):
            rows = await self._pool.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [r["version"] for r in rows]

    # -- audit

    async def append_entries(self, entries: Sequence[AuditEntry]) -> int:
        """Insert a contiguous batch in one transaction; returns how many rows were new.

        Idempotent: an entry whose seq is stored with the same hash is skipped, so a retry after
        a lost acknowledgement is safe. A different hash, or a batch whose first entry does not
        link to the stored predecessor, raises :class:`StoreConflict` and inserts nothing.
        """
        if not entries:
            return 0
        texts = validate_entries(entries)
        first = entries[0]
        cols: list[list[Any]] = [[] for _ in range(12)]
        for e, text in zip(entries, texts, strict=True):
            for col, value in zip(
                cols,
                (
                    e.seq,
                    e.at,
                    e.actor,
                    e.event,
                    e.round,
                    e.subject,
                    text,
                    e.signature,
                    e.prev_hash,
                    e.entry_hash,
                    e.writer,
                    e.writer_signature,
                ),
                strict=True,
            ):
                col.append(value)
        async with (
            _db_errors("append_entries"),
            self._pool.acquire() as conn,
            conn.transaction(),
        ):
            prev = GENESIS
            if first.seq > 1:
                prev = await conn.fetchval(
                    "SELECT entry_hash FROM audit_entries WHERE seq = $1", first.seq - 1
                )
                if prev is None:
                    raise StoreConflict(
                        f"entry {first.seq} would leave a gap: seq {first.seq - 1} is missing"
                    )
            if prev != first.prev_hash:
                raise StoreConflict(f"entry {first.seq} does not extend the stored chain (fork)")
            row = await conn.fetchrow(_INSERT_ENTRIES, *cols)
            inserted, last = int(row["n"]), row["last"]
            if inserted != len(entries):
                found = await conn.fetch(
                    "SELECT seq, entry_hash FROM audit_entries WHERE seq = ANY($1::bigint[])",
                    cols[0],
                )
                stored = {r["seq"]: r["entry_hash"] for r in found}
                for e in entries:
                    if stored.get(e.seq) != e.entry_hash:
                        raise StoreConflict(
                            f"entry {e.seq} conflicts with the stored trail (different hash)"
                        )
            if inserted:
                await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(last))
        return inserted

    async def _entry_rows(
        self,
        after_seq: int = 0,
        limit: int | None = None,
        event: str | None = None,
        round_: int | None = None,
    ) -> list[tuple[AuditEntry, bool]]:
        where: list[str] = ["seq > $1"]
        args: list[object] = [after_seq]
        if event is not None:
            args.append(event)
            where.append(f"event = ${len(args)}")
        if round_ is not None:
            args.append(round_)
            where.append(f"round = ${len(args)}")
        sql = f"SELECT {_ENTRY_COLUMNS} FROM audit_entries WHERE {' AND '.join(where)} ORDER BY seq"
        if limit is not None:
            args.append(limit)
            sql += f" LIMIT ${len(args)}"
        async with _db_errors("entries"):
            rows = await self._pool.fetch(sql, *args)
        return [_row_entry(r) for r in rows]

    async def entries(
        self,
        after_seq: int = 0,
        limit: int | None = None,
        event: str | None = None,
        round: int | None = None,
    ) -> list[AuditEntry]:
        """Entries with seq > after_seq in seq order, optionally filtered; bodies are exact."""
        return [e for e, _ in await self._entry_rows(after_seq, limit, event, round)]

    async def iter_entries(
        self, after_seq: int = 0, page: int = _PAGE
    ) -> AsyncIterator[AuditEntry]:
        """Every entry after ``after_seq``, fetched in keyset pages so memory stays flat."""
        while True:
            rows = await self.entries(after_seq=after_seq, limit=page)
            for e in rows:
                yield e
            if len(rows) < page:
                return
            after_seq = rows[-1].seq

    async def tail(
        self, limit: int, event: str | None = None, round: int | None = None
    ) -> list[AuditEntry]:
        """The newest ``limit`` entries matching the filters, in seq order (for display)."""
        where: list[str] = ["TRUE"]
        args: list[object] = []
        if event is not None:
            args.append(event)
            where.append(f"event = ${len(args)}")
        if round is not None:
            args.append(round)
            where.append(f"round = ${len(args)}")
        args.append(limit)
        sql = (
            f"SELECT {_ENTRY_COLUMNS} FROM audit_entries WHERE {' AND '.join(where)}"
            f" ORDER BY seq DESC LIMIT ${len(args)}"
        )
        async with _db_errors("tail"):
            rows = await self._pool.fetch(sql, *args)
        return [_row_entry(r)[0] for r in reversed(rows)]

    async def head(self) -> tuple[int, str]:
        """(last seq, its entry_hash), or (0, GENESIS): what an AuditChain resumes from."""
        async with _db_errors("head"):
            row = await self._pool.fetchrow(
                "SELECT seq, entry_hash FROM audit_entries ORDER BY seq DESC LIMIT 1"
            )
        return (0, GENESIS) if row is None else (int(row["seq"]), str(row["entry_hash"]))

    async def listen(self, callback: Callable[[int], object] | None = None) -> AuditFeed:
        """Subscribe to new-entry notifications on a dedicated connection (not the pool's)."""
        async with _db_errors("listen"):
            conn = await asyncpg.connect(self._url)
        feed = AuditFeed(conn, callback)
        try:
            await conn.add_listener(NOTIFY_CHANNEL, feed._on_notify)
        except BaseException:
            await conn.close()
            raise
        return feed

    # -- runs

    @staticmethod
    def _run_id(run: str) -> str:
        if not is_run_id(run):
            raise StoreError(f"invalid run id {run!r}: letters, digits, '.', '_', '-' (≤ 64)")
        return run

    @staticmethod
    async def _ensure_run(conn: asyncpg.Connection, run: str, at: float) -> None:
        """Create the run's row if it is missing (a write that names a run creates it)."""
        await conn.execute(
            "INSERT INTO runs (run_id, started_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            run,
            at,
        )

    async def start_run(
        self, run: str, started_at: float | None = None, info: dict[str, Any] | None = None
    ) -> None:
        """Record that a run started (idempotent: a second call keeps the first row)."""
        async with _db_errors("start_run"):
            await self._pool.execute(
                "INSERT INTO runs (run_id, started_at, info) VALUES ($1, $2, $3::jsonb)"
                " ON CONFLICT (run_id) DO NOTHING",
                self._run_id(run),
                time.time() if started_at is None else started_at,
                _json(info or {}, "run info"),
            )

    _RUNS_SQL = """
        SELECT r.run_id, r.started_at, r.info::text AS info,
               (SELECT count(*) FROM rounds o WHERE o.run_id = r.run_id)::int AS n_rounds,
               last.round AS last_round, last.metrics::text AS last_metrics,
               newest.model_hash AS model_hash, newest.round AS model_round
        FROM runs r
        LEFT JOIN LATERAL (
            SELECT round, metrics FROM rounds o WHERE o.run_id = r.run_id
            ORDER BY round DESC LIMIT 1) last ON TRUE
        LEFT JOIN LATERAL (
            SELECT model_hash, round FROM run_models m WHERE m.run_id = r.run_id
            ORDER BY round DESC, created_at DESC LIMIT 1) newest ON TRUE
    """

    @staticmethod
    def _run_record(r: asyncpg.Record) -> RunRecord:
        metrics = json.loads(r["last_metrics"]) if r["last_metrics"] is not None else {}

        def score(key: str) -> float | None:
            v = metrics.get(key) if isinstance(metrics, dict) else None
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

        return RunRecord(
            run_id=r["run_id"],
            started_at=r["started_at"],
            info=json.loads(r["info"]),
            rounds=r["n_rounds"],
            last_round=r["last_round"],
            model_hash=r["model_hash"],
            model_round=r["model_round"],
            final_top1=score("top1"),
            final_top3=score("top3"),
        )

    async def runs(self) -> list[RunRecord]:
        """Every run, newest first (by start time)."""
        async with _db_errors("runs"):
            rows = await self._pool.fetch(
                self._RUNS_SQL + " ORDER BY r.started_at DESC, r.run_id DESC"
            )
        return [self._run_record(r) for r in rows]

    async def get_run(self, run: str) -> RunRecord | None:
        """One run, or None if no run has that id."""
        if not is_run_id(run):
            return None
        async with _db_errors("get_run"):
            row = await self._pool.fetchrow(self._RUNS_SQL + " WHERE r.run_id = $1", run)
        return None if row is None else self._run_record(row)

    # -- models

    async def put_model(
        self,
        model: Model,
        round_: int,
        *,
        parent_hash: str | None = None,
        updates: Sequence[str] = (),
        verdicts: Sequence[str] = (),
        created_at: float | None = None,
        run: str = UNNAMED_RUN,
    ) -> str:
        """Store a global model as float32 LE with its provenance, as a model of ``run``;
        returns its hash.

        Idempotent on the hash: storing the same parameters twice keeps the first row (and
        a second run that produces them gets its own membership row).
        """
        digest = model_hash(model)
        w = np.ascontiguousarray(model.weights, dtype="<f4")
        b = np.ascontiguousarray(model.bias, dtype="<f4")
        provenance = json.dumps({"updates": list(updates), "verdicts": list(verdicts)})
        at = time.time() if created_at is None else created_at
        async with _db_errors("put_model"), self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO models (model_hash, round, parent_hash, weights, bias, n_features,"
                " n_classes, provenance, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8::jsonb,$9)"
                " ON CONFLICT (model_hash) DO NOTHING",
                digest,
                round_,
                parent_hash,
                w.tobytes(),
                b.tobytes(),
                int(w.shape[0]),
                int(w.shape[1]),
                provenance,
                at,
            )
            await self._ensure_run(conn, self._run_id(run), at)
            await conn.execute(
                "INSERT INTO run_models (run_id, model_hash, round, created_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                run,
                digest,
                round_,
                at,
            )
        return digest

    @staticmethod
    def _model(row: asyncpg.Record) -> StoredModel:
        return StoredModel(
            model_hash=row["model_hash"],
            round=row["round"],
            parent_hash=row["parent_hash"],
            weights=bytes(row["weights"]),
            bias=bytes(row["bias"]),
            shape=(row["n_features"], row["n_classes"]),
            provenance=json.loads(row["provenance"]),
            created_at=row["created_at"],
        )

    async def get_model(self, model_hash: str) -> StoredModel | None:
        async with _db_errors("get_model"):
            row = await self._pool.fetchrow(
                "SELECT * FROM models WHERE model_hash = $1", model_hash
            )
        return None if row is None else self._model(row)

    async def models(self, run: str | None = None) -> list[StoredModel]:
        """Every stored model (or only ``run``'s, with the round it had there), oldest first."""
        async with _db_errors("models"):
            if run is None:
                rows = await self._pool.fetch("SELECT * FROM models ORDER BY round, created_at")
            else:
                rows = await self._pool.fetch(
                    "SELECT m.model_hash, rm.round, m.parent_hash, m.weights, m.bias,"
                    " m.n_features, m.n_classes, m.provenance, rm.created_at"
                    " FROM run_models rm JOIN models m USING (model_hash)"
                    " WHERE rm.run_id = $1 ORDER BY rm.round, rm.created_at",
                    run,
                )
        return [self._model(r) for r in rows]

    async def latest_model(self, run: str) -> StoredModel | None:
        """The newest model of ``run`` (highest round, then latest stored), or None."""
        async with _db_errors("latest_model"):
            row = await self._pool.fetchrow(
                "SELECT m.model_hash, rm.round, m.parent_hash, m.weights, m.bias,"
                " m.n_features, m.n_classes, m.provenance, rm.created_at"
                " FROM run_models rm JOIN models m USING (model_hash)"
                " WHERE rm.run_id = $1 ORDER BY rm.round DESC, rm.created_at DESC LIMIT 1",
                run,
            )
        return None if row is None else self._model(row)

    # -- rounds

    async def put_round(
        self,
        round_: int,
        metrics: dict[str, Any],
        model_hash: str | None = None,
        closed_at: float | None = None,
        *,
        run: str = UNNAMED_RUN,
    ) -> None:
        """Record (or update) a round of ``run``: metrics and resulting model, aggregates only."""
        text = _json(metrics, "round metrics")
        async with _db_errors("put_round"), self._pool.acquire() as conn, conn.transaction():
            await self._ensure_run(conn, self._run_id(run), closed_at or time.time())
            await conn.execute(
                "INSERT INTO rounds (run_id, round, metrics, model_hash, closed_at)"
                " VALUES ($1, $2, $3::jsonb, $4, $5) ON CONFLICT (run_id, round) DO UPDATE SET"
                " metrics = EXCLUDED.metrics, model_hash = EXCLUDED.model_hash,"
                " closed_at = EXCLUDED.closed_at",
                run,
                round_,
                text,
                model_hash,
                closed_at,
            )

    async def rounds(self, run: str | None = None) -> list[RoundRecord]:
        """``run``'s rounds in order; None: every run's, runs in start order."""
        async with _db_errors("rounds"):
            if run is None:
                rows = await self._pool.fetch(
                    "SELECT o.* FROM rounds o JOIN runs r USING (run_id)"
                    " ORDER BY r.started_at, o.run_id, o.round"
                )
            else:
                rows = await self._pool.fetch(
                    "SELECT * FROM rounds WHERE run_id = $1 ORDER BY round", run
                )
        return [
            RoundRecord(
                r["round"], json.loads(r["metrics"]), r["model_hash"], r["closed_at"], r["run_id"]
            )
            for r in rows
        ]

    # -- nodes

    async def register_node(self, member: Member, enrolled_at: float | None = None) -> None:
        """Enrol (or re-describe) a node; the peer id is the key."""
        async with _db_errors("register_node"):
            await self._pool.execute(
                "INSERT INTO nodes (peer_id, role, name, enrolled_at) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (peer_id) DO UPDATE SET role = EXCLUDED.role, name = EXCLUDED.name",
                member.peer_id,
                member.role,
                member.name,
                time.time() if enrolled_at is None else enrolled_at,
            )

    async def nodes(self) -> list[NodeRecord]:
        async with _db_errors("nodes"):
            rows = await self._pool.fetch("SELECT * FROM nodes ORDER BY enrolled_at, name")
        return [NodeRecord(r["peer_id"], r["role"], r["name"], r["enrolled_at"]) for r in rows]

    # -- checkpoints

    async def save_checkpoint(
        self,
        round_: int,
        state: dict[str, Any],
        model_hash: str | None = None,
        *,
        run: str = UNNAMED_RUN,
    ) -> int:
        """Save coordinator state of ``run`` (JSON, no patient data); returns its id."""
        text = _json(state, "checkpoint state")
        now = time.time()
        async with _db_errors("save_checkpoint"), self._pool.acquire() as conn, \
                conn.transaction():
            await self._ensure_run(conn, self._run_id(run), now)
            value = await conn.fetchval(
                "INSERT INTO checkpoints (run_id, round, model_hash, state, created_at)"
                " VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING id",
                run,
                round_,
                model_hash,
                text,
                now,
            )
        return int(value)

    async def latest_checkpoint(self, run: str | None = None) -> Checkpoint | None:
        """The newest checkpoint of ``run`` (None: of any run)."""
        async with _db_errors("latest_checkpoint"):
            if run is None:
                r = await self._pool.fetchrow(
                    "SELECT * FROM checkpoints ORDER BY id DESC LIMIT 1"
                )
            else:
                r = await self._pool.fetchrow(
                    "SELECT * FROM checkpoints WHERE run_id = $1 ORDER BY id DESC LIMIT 1", run
                )
        if r is None:
            return None
        return Checkpoint(
            r["id"], r["round"], r["model_hash"], json.loads(r["state"]), r["created_at"],
            r["run_id"],
        )


# ------------------------------------------------------------------------------------- verify


async def verify(
    store_or_url: Store | str | None, known_signers: set[str] | None = None, *, page: int = _PAGE
) -> ChainReport:
    """Recompute the stored chain with :func:`medimesh.audit.verify_chain`.

    Bodies come from ``body_canonical`` (jsonb reformats numbers); a row whose ``body`` column
    no longer matches it was edited in place and is reported as broken. Pages are fetched on
    demand from a worker thread, so memory stays flat and the event loop stays free.
    """
    owned = not isinstance(store_or_url, Store)
    store = await Store.open(store_or_url) if not isinstance(store_or_url, Store) else store_or_url
    loop = asyncio.get_running_loop()
    mismatch: list[int] = []

    def rows() -> Iterator[AuditEntry]:
        def fetch(after: int) -> Future[list[tuple[AuditEntry, bool]]]:
            return asyncio.run_coroutine_threadsafe(store._entry_rows(after, page), loop)

        pending: Future[list[tuple[AuditEntry, bool]]] | None = fetch(0)
        try:
            while pending is not None:
                batch = pending.result()
                if not batch:
                    return
                pending = fetch(batch[-1][0].seq) if len(batch) == page else None
                for entry, consistent in batch:
                    if not consistent:
                        mismatch.append(entry.seq)
                        return
                    yield entry
        finally:
            if pending is not None:
                pending.cancel()

    try:
        report = await asyncio.to_thread(verify_chain, rows(), known_signers)
    finally:
        if owned:
            await store.close()
    if report.ok and mismatch:
        return ChainReport(
            False,
            report.entries + 1,
            report.head_hash,
            mismatch[0],
            "body column differs from body_canonical (row edited in place)",
        )
    return report


# ------------------------------------------------------------------------ synchronous adapters


class PostgresSink:
    """An :class:`AuditSink` over :class:`Store` for synchronous callers (the auditor actor).

    It owns an event loop on a daemon thread. The store opens lazily and is dropped after a
    connection failure, so the next call reconnects (and re-checks migrations) by itself.
    """

    def __init__(
        self, url: str | None = None, *, timeout: float = 30.0, connect_timeout: float = 5.0,
        migrate: bool = True,
    ) -> None:
        self._url = url if url is not None else database_url()
        self._migrate = migrate
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._store: Store | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="medimesh-postgres-sink", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return self._url

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise StoreError("PostgresSink is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(self._timeout)
        except TimeoutError:
            fut.cancel()
            raise StoreUnavailable(f"store call took longer than {self._timeout} s") from None

    async def _with_store(self, op: Callable[[Store], Awaitable[T]]) -> T:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._store is None:
                # min_size=0: no asyncpg background "restore the floor" retries while the
                # server is down; this sink reconnects on its next call instead.
                self._store = await Store.open(
                    self._url, min_size=0, connect_timeout=self._connect_timeout,
                    migrate=self._migrate,
                )
            store = self._store
        try:
            return await op(store)
        except StoreUnavailable:
            if self._store is store:
                self._store = None
                store.terminate()
            raise

    def write(self, entries: Sequence[AuditEntry]) -> None:
        if entries:
            batch = list(entries)
            self._call(self._with_store(lambda s: s.append_entries(batch)))

    async def _page(self, after: int) -> list[AuditEntry]:
        return await self._with_store(lambda s: s.entries(after_seq=after, limit=_PAGE))

    def entries(self) -> Iterator[AuditEntry]:
        """All entries in seq order, fetched page by page as the iterator is consumed."""
        after = 0
        while True:
            page = self._call(self._page(after))
            yield from page
            if len(page) < _PAGE:
                return
            after = page[-1].seq

    def head(self) -> tuple[int, str]:
        return self._call(self._with_store(lambda s: s.head()))

    def call(self, op: Callable[[Store], Awaitable[T]]) -> T:
        """Run one :class:`Store` operation synchronously (models, rounds, nodes, checkpoints).

        Same reconnect-on-next-call behaviour as :meth:`write`; failures to reach the database
        raise :class:`StoreUnavailable`, so callers can buffer and retry.
        """
        return self._call(self._with_store(op))

    def verify(self, known_signers: set[str] | None = None) -> ChainReport:
        return self._call(self._with_store(lambda s: verify(s, known_signers)))

    async def _shutdown(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._loop.shutdown_asyncgens()
        await self._loop.shutdown_default_executor()

    def close(self) -> None:
        """Close the pool, stop the loop thread and close the loop (idempotent)."""
        if self._closed:
            return
        try:
            self._call(self._shutdown())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> PostgresSink:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass(slots=True)
class _BufferState:
    entries: list[AuditEntry] = field(default_factory=list)
    last_error: str | None = None
    failing_since: float | None = None


class BufferedSink:
    """Keeps entries, in order, while the inner sink fails; never drops one.

    Every ``write`` first retries what is buffered. When ``max_buffer`` would be exceeded, the
    write raises :class:`StoreBackpressure` and the caller keeps its batch. Integrity errors
    (conflicting or unstorable entries) are raised, not retried into oblivion. Correct
    delivery after an outage relies on the inner sink being idempotent, as PostgresSink is.
    """

    def __init__(self, inner: AuditSink, max_buffer: int = 10_000, chunk: int = 1_000) -> None:
        if max_buffer < 1 or chunk < 1:
            raise StoreError("max_buffer and chunk must be >= 1")
        self._inner = inner
        self._max = max_buffer
        self._chunk = chunk
        self._state = _BufferState()
        self._lock = threading.RLock()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._state.entries)

    def buffered(self) -> list[AuditEntry]:
        """A copy of the entries still waiting for the inner sink, in seq order."""
        with self._lock:
            return list(self._state.entries)

    @property
    def last_error(self) -> str | None:
        """Why the inner sink last failed, or None while it is healthy."""
        return self._state.last_error

    def _failed(self, exc: Exception) -> None:
        st = self._state
        if st.failing_since is None:
            st.failing_since = time.monotonic()
            _log.warning("audit sink unavailable, buffering: %s", exc)
        st.last_error = f"{type(exc).__name__}: {exc}"

    def _recovered(self) -> None:
        st = self._state
        if st.failing_since is not None:
            _log.warning("audit sink recovered after %.1f s", time.monotonic() - st.failing_since)
        st.last_error = st.failing_since = None

    def _drain(self) -> bool:
        """Write the buffer out in chunks; True once it is empty."""
        buf = self._state.entries
        while buf:
            chunk = buf[: self._chunk]
            try:
                self._inner.write(chunk)
            except StoreIntegrityError:
                raise
            except Exception as exc:
                self._failed(exc)
                return False
            del buf[: len(chunk)]
        self._recovered()
        return True

    def write(self, entries: Sequence[AuditEntry]) -> None:
        batch = list(entries)
        if not batch:
            return
        validate_entries(batch)
        with self._lock:
            buf = self._state.entries
            if buf:
                if batch[0].seq != buf[-1].seq + 1 or batch[0].prev_hash != buf[-1].entry_hash:
                    raise InvalidEntry(f"entry {batch[0].seq} does not follow the buffered chain")
                self._drain()
            if not buf:
                try:
                    self._inner.write(batch)
                except StoreIntegrityError:
                    raise
                except Exception as exc:
                    self._failed(exc)
                else:
                    self._recovered()
                    return
            if len(buf) + len(batch) > self._max:
                raise StoreBackpressure(
                    f"audit buffer full ({len(buf)} of {self._max} entries pending, "
                    f"{len(batch)} more offered); last error: {self._state.last_error}"
                )
            buf.extend(batch)

    def flush(self, timeout: float = 10.0, interval: float = 0.2) -> bool:
        """Retry until the buffer is empty (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._drain():
                    return True
            if time.monotonic() + interval > deadline:
                return False
            time.sleep(interval)

    def entries(self) -> Iterator[AuditEntry]:
        """The inner sink's entries followed by any still buffered (after one flush attempt)."""
        with self._lock:
            self._drain()
            pending = list(self._state.entries)
        last = 0
        for e in self._inner.entries():
            last = e.seq
            yield e
        yield from (e for e in pending if e.seq > last)

    def close(self, timeout: float = 10.0) -> bool:
        """Flush, then close the inner sink if it can be; returns whether nothing was left."""
        drained = self.flush(timeout)
        closer = getattr(self._inner, "close", None)
        if callable(closer):
            closer()
        return drained
