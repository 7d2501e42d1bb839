"""Runs as first-class things: ids, the store scoped by run, the oracle serving one run.

Found by running ``medimesh demo`` twice in one folder: the second oracle served the first
run's round-10 model and ``/rounds`` mixed both runs (issue 17).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg
import httpx
import numpy as np
import pytest

from medimesh.actors.oracle import OracleConfig, build_app
from medimesh.bench.oracle import publish_model, train_quick_model
from medimesh.model import Model
from medimesh.runs import UNNAMED_RUN, is_run_id, new_run_id
from medimesh.store import MIGRATIONS, Store

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def models() -> tuple[Model, Model, Model, np.ndarray, np.ndarray]:
    a, mean, std = train_quick_model(steps=150)
    b, _, _ = train_quick_model(steps=80)
    c, _, _ = train_quick_model(steps=40)
    return a, b, c, mean, std


def test_run_ids_are_readable_unique_and_validated() -> None:
    """UTC date and minute, then four hex digits; the API refuses anything odd."""
    at = time.mktime((2026, 11, 29, 16, 12, 0, 0, 0, 0)) - time.timezone
    assert new_run_id(at, "ab12") == "20261129-1612-ab12"
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) > 40 and all(is_run_id(i) for i in ids)
    for bad in ("", "-x", "a b", "a/b", "x" * 65, "run\n", "ü"):
        assert not is_run_id(bad), bad


def test_two_runs_in_one_database_are_scoped(url: str, models: Any) -> None:
    """Rounds, models, checkpoints and the run list: each query answers for one run."""
    a, b, c, _, _ = models

    async def scenario() -> None:
        async with await Store.open(url) as store:
            await store.start_run("r1", 100.0, {"dataset": "rare"})
            await store.start_run("r2", 200.0)
            await store.start_run("r1", 999.0)  # idempotent: the first start time stays
            shared = await store.put_model(a, 0, run="r1")
            assert await store.put_model(a, 0, run="r2") == shared  # same weights, both runs
            h1 = await store.put_model(b, 1, parent_hash=shared, run="r1")
            h1b = await store.put_model(c, 2, parent_hash=h1, run="r1")
            h2 = await store.put_model(c, 1, parent_hash=shared, run="r2")
            for r, h, top1 in ((1, h1, 0.5), (2, h1b, 0.75)):
                await store.put_round(r, {"top1": top1}, h, 10.0 + r, run="r1")
            await store.put_round(1, {"top1": 0.25, "top3": 0.5}, h2, 20.0, run="r2")
            await store.save_checkpoint(2, {"mean": [1.0]}, h1b, run="r1")
            await store.save_checkpoint(1, {"mean": [2.0]}, h2, run="r2")

            assert [(r.round, r.run_id) for r in await store.rounds("r1")] == [(1, "r1"),
                                                                                (2, "r1")]
            assert [(r.round, r.model_hash) for r in await store.rounds("r2")] == [(1, h2)]
            assert [r.run_id for r in await store.rounds()] == ["r1", "r1", "r2"]
            assert [m.model_hash for m in await store.models("r2")] == [shared, h2]
            assert [m.model_hash for m in await store.models("r1")] == [shared, h1, h1b]
            # c is stored once, a member of both runs with a different round in each
            assert h1b == h2 and len(await store.models()) == 3
            latest1, latest2 = await store.latest_model("r1"), await store.latest_model("r2")
            assert latest1 is not None and latest1.model_hash == h1b and latest1.round == 2
            assert latest2 is not None and latest2.model_hash == h2 and latest2.round == 1
            assert await store.latest_model("nope") is None
            cp1, cp2 = await store.latest_checkpoint("r1"), await store.latest_checkpoint("r2")
            assert cp1 is not None and cp1.state == {"mean": [1.0]} and cp1.run_id == "r1"
            assert cp2 is not None and cp2.state == {"mean": [2.0]} and cp2.run_id == "r2"
            runs = await store.runs()
            assert [r.run_id for r in runs] == ["r2", "r1"]  # newest first
            r2, r1 = runs
            assert (r1.started_at, r1.rounds, r1.last_round, r1.final_top1) == (100.0, 2, 2, 0.75)
            assert r1.info == {"dataset": "rare"} and r1.model_hash == h1b
            assert (r2.rounds, r2.final_top1, r2.final_top3, r2.model_round) == (1, 0.25, 0.5, 1)
            assert await store.get_run("r3") is None and await store.get_run("bad id") is None
            # A write without a run id lands in the 'unnamed' run, never in another's.
            await store.put_round(7, {"top1": 0.1})
            assert [r.round for r in await store.rounds(UNNAMED_RUN)] == [7]
            assert [r.round for r in await store.rounds("r2")] == [1]

    run(scenario())


def test_migration_gives_older_rows_a_run(url: str, models: Any) -> None:
    """A database written before runs existed migrates: its rows become the 'unnamed' run."""
    a, _, _, _, _ = models

    async def scenario() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                               " applied_at double precision NOT NULL)")
            for version, sql in MIGRATIONS[:2]:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, 0)", version)
            w = np.ascontiguousarray(a.weights, "<f4")
            await conn.execute(
                "INSERT INTO models (model_hash, round, weights, bias, n_features, n_classes,"
                " created_at) VALUES ('h', 3, $1, $2, $3, $4, 5.0)",
                w.tobytes(), np.ascontiguousarray(a.bias, "<f4").tobytes(), w.shape[0],
                w.shape[1],
            )
            await conn.execute("INSERT INTO rounds (round, metrics, model_hash) VALUES"
                               " (3, '{\"top1\": 0.5}', 'h')")
            await conn.execute("INSERT INTO checkpoints (round, state, created_at) VALUES"
                               " (3, '{}', 6.0)")
        finally:
            await conn.close()
        async with await Store.open(url) as store:
            assert await store.schema_versions() == [1, 2, 3]
            [old] = await store.runs()
            assert (old.run_id, old.started_at, old.rounds, old.model_hash) == (
                UNNAMED_RUN, 5.0, 1, "h")
            assert [r.round for r in await store.rounds(UNNAMED_RUN)] == [3]
            cp = await store.latest_checkpoint(UNNAMED_RUN)
            assert cp is not None and cp.round == 3

    run(scenario())


async def _publish(url: str, model: Model, mean: Any, std: Any, r: int, run_id: str) -> str:
    async with await Store.open(url) as store:
        await store.start_run(run_id)
        return await publish_model(store, model, mean, std, r, run=run_id)


async def _until_ready(client: httpx.AsyncClient, model_hash: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = await client.get("/ready")
        if r.status_code == 200 and r.json()["model_hash"] == model_hash:
            return dict(r.json())
        await asyncio.sleep(0.05)
    raise AssertionError(f"oracle never served {model_hash[:12]}: {r.json()}")


def test_oracle_serves_its_run_and_scopes_rounds(url: str, models: Any) -> None:
    """Run 1 reaches round 2, run 2 only round 1: an oracle for run 2 serves run 2's model,
    its /rounds are run 2's, /runs lists both, ?run= reads run 1, unknown runs are 404."""
    a, b, c, mean, std = models

    async def scenario() -> None:
        await _publish(url, a, mean, std, 1, "20261129-1600-aaaa")
        h1 = await _publish(url, b, mean, std, 2, "20261129-1600-aaaa")
        await asyncio.sleep(0.01)
        h2 = await _publish(url, c, mean, std, 1, "20261129-1601-bbbb")
        for served_by, want_run, want in (("20261129-1601-bbbb", "20261129-1601-bbbb", h2),
                                          (None, "20261129-1601-bbbb", h2),  # newest run
                                          ("20261129-1600-aaaa", "20261129-1600-aaaa", h1)):
            app = build_app(OracleConfig(url, poll_interval=0.2, load_ontology=False,
                                         run_id=served_by))
            transport = httpx.ASGITransport(app=app)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://o") as cl:
                    ready = await _until_ready(cl, want)
                    assert ready["run_id"] == want_run
                    dx = (await cl.post("/diagnose", json={"genes": ["GBA1"]})).json()
                    assert (dx["model_hash"], dx["run_id"]) == (want, want_run)
                    rounds = (await cl.get("/rounds")).json()
                    assert {r["run_id"] for r in rounds} == {want_run}
                    assert rounds[-1]["model_hash"] == want
                    other = (await cl.get("/rounds", params={"run": "20261129-1600-aaaa"}))
                    assert [r["round"] for r in other.json()] == [1, 2]
                    runs = (await cl.get("/runs")).json()
                    assert [r["run_id"] for r in runs] == ["20261129-1601-bbbb",
                                                           "20261129-1600-aaaa"]
                    assert [r["served"] for r in runs] == [want_run == runs[0]["run_id"],
                                                           want_run == runs[1]["run_id"]]
                    assert runs[1]["rounds"] == 2 and runs[1]["model_hash"] == h1
                    missing = await cl.get("/rounds", params={"run": "20991231-0000-ffff"})
                    assert missing.status_code == 404
                    assert "no run '20991231-0000-ffff'" in missing.json()["detail"]
                    assert "/runs" in missing.json()["detail"]
                    assert (await cl.get("/baselines", params={"run": "nope"})).status_code \
                        == 404
                    assert (await cl.get("/models", params={"run": "nope"})).status_code == 404
                    assert (await cl.get("/rounds", params={"run": "a b"})).status_code == 422
                    mine = (await cl.get("/models", params={"run": want_run})).json()
                    assert mine[-1]["model_hash"] == want and mine[-1]["active"]
            finally:
                await app.state.oracle.stop()

    run(scenario())


def test_oracle_started_for_a_run_waits_for_its_model(url: str, models: Any) -> None:
    """Started for a run with no model yet, the oracle is not ready (it never falls back to
    another run's model), then serves the run's first model as soon as it is stored."""
    a, b, _, mean, std = models

    async def scenario() -> None:
        await _publish(url, a, mean, std, 5, "20261129-1500-0000")  # an older run
        app = build_app(OracleConfig(url, poll_interval=0.2, load_ontology=False,
                                     run_id="20261129-1700-1111"))
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://o") as cl:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:  # until the watcher has looked once
                    r = await cl.get("/ready")
                    if "has no model yet" in " ".join(r.json()["problems"]):
                        break
                    await asyncio.sleep(0.05)
                assert r.status_code == 503 and r.json()["run_id"] == "20261129-1700-1111"
                assert "run 20261129-1700-1111 has no model yet" in r.json()["problems"][0]
                await asyncio.sleep(0.5)  # a few more polls: still nothing from the older run
                assert (await cl.get("/ready")).json()["model_hash"] is None
                assert (await cl.get("/rounds")).status_code == 404  # the run is not stored
                h = await _publish(url, b, mean, std, 0, "20261129-1700-1111")
                await _until_ready(cl, h)
                assert (await cl.get("/rounds")).json()[0]["run_id"] == "20261129-1700-1111"
        finally:
            await app.state.oracle.stop()

    run(scenario())


@pytest.mark.ray
def test_the_oracle_for_a_second_run_on_one_store_serves_that_run(
    ray_session: None, url: str, serve_app: Any
) -> None:
    """`make demo` twice in one folder, on real actors: the first run trains 3 rounds, the
    second 2; the oracle started for the second serves its final model and its rounds."""
    from medimesh.actors.runtime import Consortium, RunConfig

    runs = []
    for seed, rounds in ((1, 3), (2, 2)):
        fed = Consortium(RunConfig(hospitals=3, rounds=rounds, seed=seed, database_url=url))
        try:
            fed.start()
            history = fed.run()
            final = fed.final_model()
            assert fed.flush_store()
        finally:
            fed.shutdown()
        assert final["run_id"] == fed.run_id
        runs.append((fed.run_id, final["model_hash"], [m["round"] for m in history]))
    (id1, h1, r1), (id2, h2, r2) = runs
    assert id1 != id2 and h1 != h2 and (r1, r2) == ([1, 2, 3], [1, 2])
    config = OracleConfig(url, poll_interval=0.2, load_ontology=False, run_id=id2)
    with serve_app(build_app(config)) as base:
        ready = httpx.get(f"{base}/ready").json()
        assert (ready["run_id"], ready["model_hash"], ready["model_round"]) == (id2, h2, 2)
        dx = httpx.post(f"{base}/diagnose", json={"genes": ["GBA1"]}).json()
        assert (dx["model_hash"], dx["run_id"]) == (h2, id2)
        rounds = httpx.get(f"{base}/rounds").json()
        assert [(r["round"], r["run_id"]) for r in rounds] == [(1, id2), (2, id2)]
        assert rounds[-1]["model_hash"] == h2
        first = httpx.get(f"{base}/rounds", params={"run": id1}).json()
        assert [r["round"] for r in first] == [1, 2, 3] and first[-1]["model_hash"] == h1
        listed = {r["run_id"]: r for r in httpx.get(f"{base}/runs").json()}
        assert listed[id2]["served"] and not listed[id1]["served"]
        assert (listed[id1]["rounds"], listed[id2]["rounds"]) == (3, 2)
        assert listed[id2]["model_hash"] == h2 and listed[id2]["info"]["hospitals"] == 3
        assert listed[id2]["final_top1"] == rounds[-1]["metrics"]["top1"]
        baselines = httpx.get(f"{base}/baselines").json()
        assert baselines["run_id"] == id2 and baselines["cross_baselines"] is True
        assert len(baselines["sites"]) == 3
        n_eval = rounds[-1]["metrics"]["n_eval"]
        assert all(s["all_sites_n"] == n_eval for s in baselines["sites"])  # same patients
    # Started without a run id, an oracle follows the newest run: the second one.
    with serve_app(build_app(OracleConfig(url, poll_interval=0.2, load_ontology=False))) as b:
        ready = httpx.get(f"{b}/ready").json()
        assert (ready["run_id"], ready["model_hash"]) == (id2, h2)


def test_two_demo_commands_on_one_store_each_report_and_keep_their_run(
    url: str, serve_app: Any, tmp_path: Any
) -> None:
    """The CLI itself, twice on one database (`make demo` twice in one folder): each prints its
    run id; the second run's oracle serves the second's final model and only its rounds."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray
    out = []
    for seed, rounds in ((1, 2), (2, 1)):
        proc = subprocess.run(
            [sys.executable, "-m", "medimesh.cli", "demo", "--hospitals", "2", "--rounds",
             str(rounds), "--seed", str(seed), "--database-url", url, "--json"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout)
        assert f"run {result['run_id']} started in" in proc.stderr
        out.append(result)
    first, second = out
    assert is_run_id(second["run_id"]) and first["run_id"] != second["run_id"]
    config = OracleConfig(url, poll_interval=0.2, load_ontology=False, run_id=second["run_id"])
    with serve_app(build_app(config)) as base:
        ready = httpx.get(f"{base}/ready").json()
        assert (ready["run_id"], ready["model_hash"]) == (second["run_id"],
                                                         second["final_model_hash"])
        rounds = httpx.get(f"{base}/rounds").json()
        assert [r["model_hash"] for r in rounds] == [m["model_hash"] for m in second["rounds"]]
        assert len(httpx.get(f"{base}/runs").json()) == 2
