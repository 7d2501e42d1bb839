"""Operator attacks: models (issue 15, attacks 3 and 4); see the package docstring.

3. Serve a model nobody trained: the database owner writes a new ``models`` row, edits the
   weights of the served one, or edits the standardization (mean/std) the oracle joins it with.
   The oracle serves only a model whose weights and standardization hash to the release hash a
   ``model_published`` entry signs, signed by the roster's coordinator (medimesh.release).
4. Reset the privacy budget: the database owner sets the spend in the checkpoint row the
   coordinator resumes from back to 0. The coordinator signed the checkpoint; on resume it
   refuses the edited row, audits ``checkpoint_refused`` and stops (medimesh.checkpoint_seal).

Each scenario trains a small real federation (Ray actors, PostgreSQL, real keys), then acts
as the database owner with plain SQL, as the owner would. The two attack-3 scenarios only need
what a finished run left in the database: they also take a :class:`Trained` run and tamper
with their own copy of its database (the tests train once for both).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medimesh.bench.operator import AttackOutcome, Lab, Scenario

__all__ = ["SCENARIOS", "Trained", "probe_oracle", "trained"]

_GENES = {"genes": ["GBA1"]}


def _federation(
    url: str, seed: int, roster_dir: Path, rounds: int = 2, privacy: Any = None
) -> dict[str, Any]:
    """Train ``rounds`` rounds on 3 hospitals into ``url``; the consortium is left running.
    Its roster, signed by every member, is written to ``roster_dir`` (what an oracle holds)."""
    from medimesh.actors.runtime import Consortium, RunConfig

    fed = Consortium(RunConfig(hospitals=3, rounds=rounds, seed=seed, database_url=url,
                               round_timeout_s=20.0, cross_baselines=False, privacy=privacy,
                               roster_dir=str(roster_dir)))
    fed.start()
    fed.run()
    if not fed.flush_store():
        raise RuntimeError("the auditor did not flush to the database")
    return {"fed": fed, "final": fed.final_model()["model_hash"], "run_id": fed.run_id,
            "roster": str(fed.signed_roster_path)}


@dataclasses.dataclass(frozen=True)
class Trained:
    """What a finished, stopped run left: its database, newest model, run id, signed roster."""

    url: str
    final: str
    run_id: str
    roster: str


def trained(lab: Lab, seed: int) -> Trained:
    """Train a 3-hospital, 2-round run on a fresh database of the lab, then stop it."""
    url = lab.new_database()
    ctx = None
    try:
        ctx = _federation(url, seed=seed, roster_dir=lab.subdir("rosters"))
        return Trained(url, ctx["final"], ctx["run_id"], ctx["roster"])
    finally:
        _shutdown(ctx)


def _own_run(lab: Lab, run: Trained | None, seed: int) -> Trained:
    """``run`` with its database copied into the lab (the caller's run, shared), or a run of
    the scenario's own."""
    if run is None:
        return trained(lab, seed)
    return dataclasses.replace(run, url=lab.copy_database(run.url))


async def _sql(url: str, sql: str, *args: Any) -> Any:
    """The database owner at work: one statement, as any superuser could run it."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def probe_oracle(
    url: str, roster_path: str, run_id: str, until: Callable[[dict[str, Any]], bool],
    timeout_s: float = 20.0,
) -> dict[str, Any]:
    """Start a fresh oracle app (real FastAPI app, real store) for ``run_id`` with the roster,
    poll /ready until ``until(body)`` or the timeout, then ask /diagnose once.

    Returns the last /ready (status, body) and the /diagnose (status, body).
    """
    import httpx

    from medimesh.actors.oracle import OracleConfig, build_app

    async def go() -> dict[str, Any]:
        app = build_app(OracleConfig(url, poll_interval=0.2, load_ontology=False,
                                     run_id=run_id, roster_path=roster_path))
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://oracle") as cl:
                deadline = time.monotonic() + timeout_s
                while True:
                    r = await cl.get("/ready")
                    body = r.json()
                    if until(body) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                dx = await cl.post("/diagnose", json=_GENES)
                return {"ready_status": r.status_code, "ready": body,
                        "diagnose_status": dx.status_code, "diagnose": dx.json()}
        finally:
            await app.state.oracle.stop()

    return asyncio.run(go())


def _published(url: str, model_hash: str) -> list[dict[str, Any]]:
    rows = asyncio.run(_sql(
        url, "SELECT seq, entry_hash FROM audit_entries WHERE event = 'model_published'"
        " AND subject = $1 ORDER BY seq", model_hash))
    return [{"seq": int(r["seq"]), "entry_hash": str(r["entry_hash"])} for r in rows]


def _vouched(body: dict[str, Any]) -> dict[str, Any] | None:
    v = body.get("vouched_by")
    return v if isinstance(v, dict) else None


def _reason(exc: BaseException) -> str:
    """The error an actor raised (a RayTaskError wraps it with a traceback)."""
    cause = getattr(exc, "cause", None)
    err = cause if isinstance(cause, BaseException) else exc
    return f"{type(err).__name__}: {err}"


def _shutdown(ctx: dict[str, Any] | None) -> None:
    if ctx is not None:
        ctx["fed"].shutdown()


# ------------------------------------------------------------------------- attack 3: weights


async def _swap_while_serving(
    url: str, roster: str, run_id: str, final: str
) -> tuple[dict[str, Any], dict[str, Any], str, np.ndarray]:
    """(a) With an oracle serving ``final``: insert a new models row a round ahead (the
    honest model with two classes swapped, "a model nobody trained") into the run."""
    import httpx

    from medimesh.actors.oracle import OracleConfig, build_app
    from medimesh.model import Model, model_hash

    app = build_app(OracleConfig(url, poll_interval=0.2, load_ontology=False, run_id=run_id,
                                 roster_path=roster))
    transport = httpx.ASGITransport(app=app)

    async def wait(cl: httpx.AsyncClient, until: Callable[[dict[str, Any]], bool]) -> Any:
        deadline = time.monotonic() + 20
        while True:
            r = await cl.get("/ready")
            if until(r.json()) or time.monotonic() > deadline:
                return r
            await asyncio.sleep(0.1)

    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://oracle") as cl:
            r = await wait(cl, lambda b: b.get("model_hash") == final)
            dx = await cl.post("/diagnose", json=_GENES)
            before = {"ready_status": r.status_code, "ready": r.json(),
                      "diagnose_status": dx.status_code, "diagnose": dx.json()}
            row = (await _sql(url, "SELECT weights, bias, n_features, n_classes, m.round FROM"
                                   " models m WHERE model_hash = $1", final))[0]
            shape = (int(row["n_features"]), int(row["n_classes"]))
            w = np.frombuffer(bytes(row["weights"]), dtype="<f4").reshape(shape).copy()
            b = np.frombuffer(bytes(row["bias"]), dtype="<f4").copy()
            w[:, [0, 1]], b[[0, 1]] = w[:, [1, 0]], b[[1, 0]]
            forged = model_hash(Model(w, b))
            now, r_next = time.time(), int(row["round"]) + 1
            await _sql(url, "INSERT INTO models (model_hash, round, parent_hash, weights, bias,"
                            " n_features, n_classes, created_at) VALUES"
                            " ($1, $2, $3, $4, $5, $6, $7, $8)",
                       forged, r_next, final, w.astype("<f4").tobytes(),
                       b.astype("<f4").tobytes(), shape[0], shape[1], now)
            await _sql(url, "INSERT INTO run_models (run_id, model_hash, round, created_at)"
                            " VALUES ($1, $2, $3, $4)", run_id, forged, r_next, now)
            r = await wait(cl, lambda b: b.get("refused") is not None)
            dx = await cl.post("/diagnose", json=_GENES)
            after = {"ready_status": r.status_code, "ready": r.json(),
                     "diagnose_status": dx.status_code, "diagnose": dx.json()}
            return before, after, forged, w
    finally:
        await app.state.oracle.stop()


def model_swapped_weights(lab: Lab, run: Trained | None = None) -> AttackOutcome:
    """The owner stores a model nobody trained as the run's newest while the oracle serves,
    then edits the served model's weights in place; the running oracle must keep its vouched
    model, and one started on the edited row must refuse it."""
    own = _own_run(lab, run, seed=11)
    url, final, run_id, roster = own.url, own.final, own.run_id, own.roster
    published = _published(url, final)
    before, new_row, forged_hash, w = asyncio.run(
        _swap_while_serving(url, roster, run_id, final))
    # (b) Edit the weights of the served model in place (its name kept), drop (a)'s row:
    # a freshly started oracle must not serve them.
    asyncio.run(_sql(url, "DELETE FROM run_models WHERE model_hash = $1", forged_hash))
    asyncio.run(_sql(url, "UPDATE models SET weights = $1 WHERE model_hash = $2",
                     w.astype("<f4").tobytes(), final))
    edited = probe_oracle(url, roster, run_id, lambda b: b.get("refused") is not None)
    roster_file = Path(roster)  # the signed roster, for `audit provenance --roster`
    served_honest = (
        before["diagnose"].get("model_hash") == final
        and new_row["diagnose_status"] == 200
        and new_row["diagnose"].get("model_hash") == final
        and (new_row["ready"].get("refused") or {}).get("model_hash") == forged_hash
    )
    refused_edit = (
        edited["ready_status"] == 503 and edited["diagnose_status"] == 503
        and edited["ready"].get("refused") is not None
    )
    vouch = _vouched(new_row["diagnose"])
    names_entry = vouch is not None and {"seq": vouch["seq"],
                                         "entry_hash": vouch["entry_hash"]} in published
    detected = served_honest and refused_edit and names_entry
    return AttackOutcome(
        attack="model_swapped_weights",
        number=3,
        attempted=True,
        detected=detected,
        by="oracle",
        how=("refused: no model_published entry signed by the roster's coordinator names the "
             "forged model (kept serving the vouched one; /ready 'refused'); edited weights "
             "in place: /ready and /diagnose 503"),
        honest_loss=("nothing for (a); for (b) an oracle (re)started on the edited row answers "
                     "503 until the row is restored (availability, never a wrong answer)"),
        details={
            "final_model": final, "forged_model": forged_hash,
            "database_url": url, "roster_file": str(roster_file),
            "published_entries": published,
            "before": {"model_hash": before["ready"].get("model_hash"),
                       "vouched_by": _vouched(before["ready"])},
            "after_new_row": {"ready_status": new_row["ready_status"],
                              "served": new_row["diagnose"].get("model_hash"),
                              "vouched_by": vouch, "refused": new_row["ready"].get("refused")},
            "after_edit": {"ready_status": edited["ready_status"],
                           "diagnose_status": edited["diagnose_status"],
                           "refused": edited["ready"].get("refused"),
                           "diagnose_detail": edited["diagnose"].get("detail")},
        },
    )


# ------------------------------------------------------------------- attack 3: mean and std


def model_swapped_standardization(lab: Lab, run: Trained | None = None) -> AttackOutcome:
    """The owner edits only mean/std in the run's newest checkpoint (weights untouched): the
    same weights on shifted inputs give other answers; an oracle must refuse to load them."""
    own = _own_run(lab, run, seed=12)
    url, final, run_id, roster = own.url, own.final, own.run_id, own.roster
    before = probe_oracle(url, roster, run_id, lambda b: b.get("model_hash") == final)
    cp = asyncio.run(_sql(url, "SELECT id, state FROM checkpoints WHERE run_id = $1"
                               " ORDER BY id DESC LIMIT 1", run_id))[0]
    state = json.loads(cp["state"])
    state["mean"] = [float(v) * 1.5 + 1.0 for v in state["mean"]]
    state["std"] = [float(v) * 0.5 for v in state["std"]]
    asyncio.run(_sql(url, "UPDATE checkpoints SET state = $1::jsonb WHERE id = $2",
                     json.dumps(state), cp["id"]))
    after = probe_oracle(url, roster, run_id, lambda b: b.get("refused") is not None)
    refused = after["ready"].get("refused") or {}
    detected = (
        before["ready_status"] == 200 and _vouched(before["ready"]) is not None
        and after["ready_status"] == 503 and after["diagnose_status"] == 503
        and refused.get("model_hash") == final
        and "changed after publication" in str(refused.get("reason", ""))
    )
    return AttackOutcome(
        attack="model_swapped_standardization",
        number=3,
        attempted=True,
        detected=detected,
        by="oracle",
        how=("refused: the weights with the edited mean/std do not hash to the release hash "
             "the model_published entry signs; /ready and /diagnose 503 naming the reason"),
        honest_loss=("an oracle (re)started on the edited checkpoint answers 503 until the row "
                     "is restored (availability, never a wrong answer)"),
        details={
            "final_model": final,
            "before": {"ready_status": before["ready_status"],
                       "vouched_by": _vouched(before["ready"])},
            "after": {"ready_status": after["ready_status"],
                      "diagnose_status": after["diagnose_status"], "refused": refused,
                      "diagnose_detail": after["diagnose"].get("detail")},
        },
    )


# ------------------------------------------------------------------- attack 4: privacy spend


def _resume_after_edit(lab: Lab, seed: int, rollback: bool) -> dict[str, Any]:
    """DP run of 2 rounds (budget planned for 3); the owner either sets ``dp_rounds`` to 0 in
    the newest checkpoint row or deletes the newest rows (back to a genuine older checkpoint
    with less spent); then the supervisor restarts the coordinator and asks for one round."""
    from medimesh.privacy import PrivacyConfig

    url = lab.new_database()
    ctx = None
    error, resumed, run_error = "", None, ""
    try:
        ctx = _federation(url, seed=seed, roster_dir=lab.subdir("rosters"),
                          privacy=PrivacyConfig(epsilon=1.0, delta=1e-3, rounds=3))
        fed, run_id = ctx["fed"], ctx["run_id"]
        rows = asyncio.run(_sql(url, "SELECT id, round, state->'dp_rounds' AS spent FROM"
                                     " checkpoints WHERE run_id = $1 ORDER BY id DESC", run_id))
        newest = rows[0]
        if rollback:  # back to the first checkpoint that spent less (the setup round's: 0)
            older = next(r for r in rows if r["spent"] != newest["spent"])
            asyncio.run(_sql(url, "DELETE FROM checkpoints WHERE run_id = $1 AND id > $2",
                             run_id, older["id"]))
            target = older
        else:
            asyncio.run(_sql(url, "UPDATE checkpoints SET state = jsonb_set(state,"
                                  " '{dp_rounds}', '0') WHERE id = $1", newest["id"]))
            target = newest
        try:
            resumed = fed.restart_coordinator()
        except Exception as exc:  # the refusal, as the supervisor sees it
            error = _reason(exc)
        try:  # a resumed coordinator would train again on a fresh budget
            fed.run(rounds=1)
        except Exception as exc:
            run_error = _reason(exc)
        fed.flush_audit()
        refused = [e for e in fed.audit_entries() if e.event == "checkpoint_refused"]
    finally:
        _shutdown(ctx)

    def spent(row: Any) -> Any:
        return json.loads(row["spent"]) if row["spent"] is not None else None

    return {
        "detected": (resumed is None and "CheckpointRefused" in error
                     and "CheckpointRefused" in run_error and len(refused) == 1),
        "details": {
            "newest_checkpoint_round": int(newest["round"]),
            "dp_rounds_before_edit": spent(newest),
            "resumed_from_round": int(target["round"]),
            "dp_rounds_offered": spent(target) if rollback else 0,  # what resume would read
            "resume_error": error[:400], "run_after_refusal": run_error[:400],
            "resumed": resumed,
            "audit": [{"seq": e.seq, "event": e.event, "round": e.round,
                       "error": e.body.get("error")} for e in refused],
        },
    }


_STOPS = ("the run stops: training does not continue until an operator restores the newest "
          "signed checkpoint (availability; no privacy budget re-spent)")


def checkpoint_budget_reset(lab: Lab) -> AttackOutcome:
    """``dp_rounds`` set to 0 in the checkpoint row the coordinator resumes from."""
    got = _resume_after_edit(lab, seed=13, rollback=False)
    return AttackOutcome(
        attack="checkpoint_budget_reset",
        number=4,
        attempted=True,
        detected=got["detected"],
        by="coordinator (on resume)",
        how=("CheckpointRefused: the checkpoint's seal (coordinator signature over round, model "
             "hash and state) no longer verifies; audit event checkpoint_refused; the "
             "coordinator stops (no resume, no fresh setup)"),
        honest_loss=_STOPS,
        details=got["details"],
    )


def checkpoint_rollback(lab: Lab) -> AttackOutcome:
    """The newest checkpoint rows deleted: the coordinator would resume a genuine, older
    checkpoint that spent less of the budget."""
    got = _resume_after_edit(lab, seed=14, rollback=True)
    return AttackOutcome(
        attack="checkpoint_rollback",
        number=4,
        attempted=True,
        detected=got["detected"],
        by="coordinator (on resume)",
        how=("CheckpointRefused (stale): the coordinator's own signed model_published entries "
             "in the audit trail name a later round than the checkpoint; audit event "
             "checkpoint_refused; the coordinator stops"),
        honest_loss=_STOPS,
        details=got["details"],
    )


SCENARIOS: dict[str, Scenario] = {
    "model_swapped_weights": model_swapped_weights,
    "model_swapped_standardization": model_swapped_standardization,
    "checkpoint_budget_reset": checkpoint_budget_reset,
    "checkpoint_rollback": checkpoint_rollback,
}
