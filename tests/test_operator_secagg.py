"""Issue 15, attacks 1 and 8: a hostile coordinator against secure aggregation, and a liar.

The system tests run the operator-bench scenarios (real Ray actors, the real router, real keys,
an embedded PostgreSQL audit store) and then read the evidence themselves from the scenario's
database: the hospitals' ``secagg_refused`` entries, the coordinator's
``secagg_sum_out_of_bounds``, and the router's ``message_routed`` entries (what actually left
each hospital). The in-process tests pin the policy rules and measure what a liar can move.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medimesh.audit import AuditEntry
from medimesh.bench.operator import AttackOutcome, Lab
from medimesh.bench.operator.secagg import (
    CLIP,
    SCENARIOS,
    consortium,
    fake_peers,
    retry_subtract,
    threshold_zero,
)
from medimesh.identity import Identity, Member, Roster
from medimesh.protocol import (
    Message,
    RoundStart,
    SecAggAdverts,
    SecAggCheckRequest,
    SecAggInbox,
    SecAggUnmaskRequest,
    Update,
)
from medimesh.secagg_lie import lie
from medimesh.secagg_policy import MaskLedger, SecAggPolicy, SecAggRefused, min_threshold
from medimesh.secagg_round import SecAggHospital, SecAggRound, b64e

# ------------------------------------------------------------------ system: the scenarios


def _run(name: str, tmp_path: Path, pg: Any) -> AttackOutcome:
    return SCENARIOS[name](Lab(tmp_path, pg.get_uri()))


@pytest.fixture(scope="module")
def refusing(
    ray_session: None, pg: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """One started secure consortium for the three attacks the hospitals refuse before they
    keep any state — made-up peers, a plaintext round, then the retried round (the only one
    that masks, last in this file). Each attack's evidence is the trail after its own
    ``from_seq``; the bench starts a consortium per attack."""
    fed = consortium(Lab(tmp_path_factory.mktemp("refusing"), pg.get_uri()), "refusing")
    try:
        yield fed
    finally:
        fed.shutdown()


def _entries(out: AttackOutcome, event: str) -> list[AuditEntry]:
    """The scenario's audit trail (after its ``from_seq``), read back from its PostgreSQL."""
    from medimesh.store import Store

    async def read() -> list[AuditEntry]:
        store = await Store.open(out.details["database"])
        try:
            return await store.entries(event=event)
        finally:
            await store.close()

    return [e for e in asyncio.run(read()) if e.seq > out.details["from_seq"]]


def _sent(out: AttackOutcome, hospital: str, type_: str) -> int:
    """How many envelopes of ``type_`` the router carried from ``hospital``."""
    peer = out.details["hospital_ids"][hospital]
    return sum(1 for e in _entries(out, "message_routed")
               if e.body["from"] == peer and e.body["type"] == type_)


def _refusals(out: AttackOutcome, rule: str) -> dict[str, dict[str, Any]]:
    names = {p: n for n, p in out.details["hospital_ids"].items()}
    return {names[e.actor]: e.body for e in _entries(out, "secagg_refused")
            if e.body["rule"] == rule and e.actor in names}


@pytest.mark.ray
def test_made_up_peers_are_refused_before_anything_is_sent(
    ray_session: None, pg: Any, tmp_path: Path, refusing: Any
) -> None:
    """A RoundStart naming two peers that are not on hospital-01's roster (t = 2 of 3) is
    refused and audited with the strangers named; hospital-01 sends no SecAgg message."""
    out = fake_peers(Lab(tmp_path, pg.get_uri()), refusing)
    assert out.attempted and out.detected, out
    refused = _refusals(out, "peers_not_on_roster")
    assert set(refused) == {"hospital-01"}, refused
    body = refused["hospital-01"]
    assert body["threshold"] == 2 and len(body["peers"]) == 3 and len(body["strangers"]) == 2
    assert out.details["hospital_ids"]["hospital-01"] not in body["strangers"]
    for type_ in ("secagg_advert", "secagg_shares", "secagg_masked"):
        assert _sent(out, "hospital-01", type_) == 0
    assert "recovered_update_norm" not in out.details


@pytest.mark.ray
def test_a_plaintext_round_is_refused_when_secure_aggregation_is_required(
    ray_session: None, pg: Any, tmp_path: Path, refusing: Any
) -> None:
    """``secagg_threshold = 0`` in a secure consortium: all four hospitals refuse and audit
    it; no plaintext update leaves any of them."""
    out = threshold_zero(Lab(tmp_path, pg.get_uri()), refusing)
    assert out.attempted and out.detected, out
    refused = _refusals(out, "secagg_required")
    assert set(refused) == {f"hospital-0{i}" for i in range(1, 5)}, refused
    assert all(b["threshold"] == 0 for b in refused.values())
    for name in refused:
        assert _sent(out, name, Update.TYPE) == 0
    assert out.details["plaintext_updates_received"] == 0


@pytest.mark.ray
def test_a_retried_round_gets_no_second_masked_input(
    ray_session: None, pg: Any, tmp_path: Path, refusing: Any
) -> None:
    """Round 1 is summed once over all four; its retry over the three others is refused by
    each of them (already masked for round 1), so no difference of sums exists."""
    out = retry_subtract(Lab(tmp_path, pg.get_uri()), refusing)
    assert out.attempted and out.detected, out
    assert out.details["first_sum"] and not out.details["second_sum"]
    refused = _refusals(out, "already_masked")
    assert set(refused) == {"hospital-02", "hospital-03", "hospital-04"}, refused
    assert all(b["round"] == 1 for b in refused.values())
    for i in range(1, 5):
        assert _sent(out, f"hospital-0{i}", "secagg_masked") == 1  # one per hospital, ever
    assert _sent(out, "hospital-01", Update.TYPE) == 0


@pytest.mark.ray
def test_two_survivor_lists_get_no_share_at_all(
    ray_session: None, pg: Any, tmp_path: Path
) -> None:
    """The coordinator shows hospital-04 alive to two hospitals and dropped to two others:
    neither list gathers t = 3 signatures, every unmasking request is refused, a second list
    is not signed, and no unmasking answer leaves any hospital."""
    out = _run("secagg_both_shares", tmp_path, pg)
    assert out.attempted and out.detected, out
    assert out.details["masked_inputs"] == 4
    failed = _refusals(out, "consistency_check_failed")
    assert set(failed) == {f"hospital-0{i}" for i in range(1, 5)}, failed
    assert all(len(b["valid_signers"]) == 2 and b["threshold"] == 3 for b in failed.values())
    assert set(_refusals(out, "second_survivor_list")) == {"hospital-01"}
    for i in range(1, 5):
        assert _sent(out, f"hospital-0{i}", "secagg_unmask") == 0
    assert out.details["shares_of_target"] == {"self_mask": [], "mask_key": []}


@pytest.mark.ray
def test_a_lying_hospital_is_named_and_its_step_bounded(
    ray_session: None, pg: Any, tmp_path: Path
) -> None:
    """hospital-02 adds 4·C to one coordinate of its masked input: the coordinator's sum
    check names it (norm above the honest bound) and the published step has norm <= C."""
    out = _run("secagg_lying_client", tmp_path, pg)
    assert out.attempted and out.detected, out
    caught = _entries(out, "secagg_sum_out_of_bounds")
    assert len(caught) == 1 and caught[0].body["norm"] > caught[0].body["bound"] + 2 * CLIP
    published = _entries(out, "model_published")[-1].body["secure_aggregation"]
    assert published["sum_check"]["clamped"] and published["summed"] == 4
    assert published["signed_survivors"] == 4
    assert out.details["step_norm"] <= CLIP * (1 + 1e-4)


# ------------------------------------------------------------------ in process: the rules

IDS = [Identity.generate() for _ in range(4)]
ROSTER = Roster([Member(f"h{i}", "hospital", ident.peer_id) for i, ident in enumerate(IDS)])
COMMITTED = {ident.peer_id: 10 * (i + 1) for i, ident in enumerate(IDS)}
D, K = 5, 3


def _start(threshold: int = 3, committed: dict[str, int] | None = None,
           round_: int = 3) -> RoundStart:
    return RoundStart(round_, "b" * 64, 0.0, np.zeros((D, K), np.float32),
                      np.zeros(K, np.float32), 1, 0.1, 0.0, 0.0, CLIP,
                      committed or COMMITTED, secagg_threshold=threshold,
                      secagg_clip=CLIP if threshold else 0.0)


def test_the_threshold_rule_is_more_than_two_thirds() -> None:
    """t > 2n/3 and t >= 2, for every group size a roster can have."""
    assert [min_threshold(n) for n in range(2, 11)] == [2, 3, 3, 4, 5, 5, 6, 7, 7]
    for n in range(2, 200):
        assert 3 * min_threshold(n) > 2 * n and min_threshold(n) - 1 <= 2 * n / 3


@pytest.mark.parametrize(
    ("start", "rule"),
    [
        (_start(0), "secagg_required"),
        (_start(2, {IDS[0].peer_id: 5, Identity.generate().peer_id: 5,
                    Identity.generate().peer_id: 5}), "peers_not_on_roster"),
        (_start(2, {p: 1 for p in list(COMMITTED)[1:4]}), "not_a_peer"),
        (_start(2, {p: 1 for p in list(COMMITTED)[:2]}), "group_too_small"),
        (_start(2), "threshold_too_low"),
        (_start(5), "threshold_too_high"),
    ],
)
def test_the_policy_refuses_from_its_own_roster(start: RoundStart, rule: str) -> None:
    """Each rule is checked against the hospital's roster copy and its own flag."""
    policy = SecAggPolicy.from_roster(ROSTER, required=True)
    with pytest.raises(SecAggRefused) as err:
        policy.check(start, IDS[0].peer_id)
    assert err.value.rule == rule
    policy.check(_start(3), IDS[0].peer_id)  # the honest round passes
    SecAggPolicy.from_roster(ROSTER, required=False).check(_start(0), IDS[0].peer_id)


def test_the_ledger_refuses_a_second_mask_for_a_round_or_a_base() -> None:
    ledger = MaskLedger()
    ledger.check(1, "a" * 64, [])
    ledger.record(1, "a" * 64)
    for round_, base in ((1, "c" * 64), (2, "a" * 64)):
        with pytest.raises(SecAggRefused):
            ledger.check(round_, base, [])
    ledger.check(2, "c" * 64, [])


def _wire(msg: Message) -> Message:
    return type(msg).from_payload(msg.to_payload())


def _masked_round(
    updates: dict[str, Update], liar: str | None = None, shift: np.ndarray | None = None
) -> np.ndarray:
    """One secure round in process (policy on, consistency check); returns the mean."""
    start = _start()
    policy = SecAggPolicy.from_roster(ROSTER, required=True)
    sides = {p: SecAggHospital(ident, policy) for p, ident in zip(COMMITTED, IDS, strict=True)}
    coord = SecAggRound.begin(start)
    for p, side in sides.items():
        coord.add(p, _wire(side.start(start, updates[p])), "")
    adverts = SecAggAdverts(3, b64e(coord.close_adverts()))
    for p, side in sides.items():
        coord.add(p, _wire(side.on_adverts(adverts)), "")
    inboxes = coord.close_shares()
    for p, side in sides.items():
        masked = side.on_inbox(SecAggInbox(3, inboxes[p]))
        if p == liar and shift is not None:
            ident = IDS[list(COMMITTED).index(p)]
            masked = lie(masked, ident, coord.params, shift)
        coord.add(p, _wire(masked), "")
    survivors = coord.close_masked(set(sides))
    for p in survivors:
        coord.add(p, _wire(sides[p].on_check_request(SecAggCheckRequest(3, survivors))), "")
    request = SecAggUnmaskRequest(3, survivors, coord.close_check())
    for p in survivors:
        coord.add(p, _wire(sides[p].on_unmask_request(request)), "")
    return coord.aggregate()


def _updates(rng: np.random.Generator) -> dict[str, Update]:
    return {
        p: Update(3, "b" * 64, n, rng.normal(0, 0.3, (D, K)).astype(np.float32),
                  rng.normal(0, 0.3, K).astype(np.float32), {})
        for p, n in COMMITTED.items()
    }


def test_what_one_liar_can_move_is_bounded_by_the_sum_check() -> None:
    """Measured: an honest site moves the mean by at most C·n_i/N; a liar, at most 2C — the
    diameter of the ball the sum check clamps to, not √d·R and not unbounded."""
    rng = np.random.default_rng(0)
    updates = _updates(rng)
    honest = _masked_round(updates)
    liar = IDS[0].peer_id
    n_all = sum(COMMITTED.values())
    honest_reach = CLIP * COMMITTED[liar] / n_all
    moved = []
    for target in (np.eye(D * K + K)[0] * 50.0, -honest * 40.0, rng.normal(0, 9, D * K + K)):
        lied = _masked_round(updates, liar, target * COMMITTED[liar] / n_all)
        moved.append(float(np.linalg.norm(lied - honest)))
        assert float(np.linalg.norm(lied)) <= CLIP * (1 + 1e-6)
    assert max(moved) <= 2 * CLIP + 1e-6
    assert max(moved) > 4 * honest_reach  # a liar still outweighs an honest site


def test_a_second_unmask_request_is_refused_and_names_both_kinds() -> None:
    """After answering one list, a request for a different list is refused as ``both_shares``
    with the peers whose other share it would reveal."""
    rng = np.random.default_rng(1)
    updates = _updates(rng)
    start = _start()
    sides = {p: SecAggHospital(ident) for p, ident in zip(COMMITTED, IDS, strict=True)}
    coord = SecAggRound.begin(start)
    for p, side in sides.items():
        coord.add(p, _wire(side.start(start, updates[p])), "")
    adverts = SecAggAdverts(3, b64e(coord.close_adverts()))
    for p, side in sides.items():
        coord.add(p, _wire(side.on_adverts(adverts)), "")
    inboxes = coord.close_shares()
    for p, side in sides.items():
        coord.add(p, _wire(side.on_inbox(SecAggInbox(3, inboxes[p]))), "")
    survivors = coord.close_masked(set(sides))
    for p in survivors:
        coord.add(p, _wire(sides[p].on_check_request(SecAggCheckRequest(3, survivors))), "")
    request = SecAggUnmaskRequest(3, survivors, coord.close_check())
    first = IDS[0].peer_id
    sides[first].on_unmask_request(request)
    fewer = tuple(p for p in survivors if p != IDS[3].peer_id)
    with pytest.raises(SecAggRefused) as err:
        sides[first].on_unmask_request(dataclasses.replace(request, survivors=fewer))
    assert err.value.rule == "both_shares"
    assert err.value.details["both_kinds_for"] == [IDS[3].peer_id]
