"""The validator's protocol without Ray: real keys, real sealed envelopes, real hospital code.

ValidatorRole is driven as a node runtime would drive it: envelopes in through ``receive``,
the clock through ``tick``, and its effects read back. The updates are the ones the production
HospitalRole trains and returns (a NaN or over-norm delta is that update with its delta
changed), sealed with the hospitals' own keys to the validator and the coordinator.
"""

from __future__ import annotations

import ast
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medimesh.audit import AuditEntry
from medimesh.identity import Identity, Member, Role, Roster
from medimesh.model import init_model, model_hash
from medimesh.protocol import (
    Message,
    RoundStart,
    SetupRequest,
    SetupResult,
    Update,
    Verdicts,
    VerdictsRequest,
    decode,
)
from medimesh.reputation import Reputation, Standing
from medimesh.roles import Record, Send, SendRaw
from medimesh.roles.hospital import HospitalRole
from medimesh.roles.validator import (
    DEADLINE_GRACE,
    STATE_EVENT,
    CountVerdicts,
    ValidatorEffect,
    ValidatorRole,
)
from medimesh.sites import SiteDescriptor, dataset_info, load_site
from medimesh.validation import REASONS
from medimesh.wire import digest, open_envelope, seal

ROOT = Path(__file__).resolve().parents[1]
N_SITES = 3
COHORT = {"n_hospitals": N_SITES, "seed": 11}
HOSPITALS = tuple(f"h{i}" for i in range(N_SITES))
NAMES: tuple[tuple[str, Role], ...] = (
    ("coordinator", "coordinator"), ("validator", "validator"), ("auditor", "auditor"),
    ("router", "router"), *((h, "hospital") for h in HOSPITALS),
)
IDS = {name: Identity.generate() for name, _ in NAMES}
ROSTER = Roster(Member(name, role, IDS[name].peer_id) for name, role in NAMES)
PID = {name: i.peer_id for name, i in IDS.items()}
INFO = dataset_info("rare", {"cohort": COHORT})
F, K = len(INFO.feature_names), len(INFO.class_names)


@dataclass(frozen=True)
class Trained:
    """One round's RoundStart and the Update each hospital role answered it with."""

    start: RoundStart
    updates: dict[str, Update]


def _from(sender: str, msg: Message, round_: int, *to: str) -> bytes:
    """Seal ``msg`` as the sender's shell does (its own key, to the named peers)."""
    return seal(IDS[sender], msg.TYPE, [PID[t] for t in to], round_, msg.to_payload())


def _update_env(update: Update, sender: str, identity: Identity | None = None) -> bytes:
    """An update sealed to validator and coordinator, as the hospital shell sends it."""
    return seal(identity or IDS[sender], Update.TYPE, [PID["validator"], PID["coordinator"]],
                update.round, update.to_payload())


@pytest.fixture(scope="module")
def trained() -> Trained:
    """Three production hospital roles set up and trained on round 1 (computed once)."""
    roles = [HospitalRole(IDS[h], ROSTER,
                          load_site(SiteDescriptor("rare", h, {"cohort": COHORT, "site": i})),
                          INFO)
             for i, h in enumerate(HOSPITALS)]
    prior = np.full(K, 1.0 / K)
    for h, role in zip(HOSPITALS, roles, strict=True):
        role.receive(_from("coordinator", SetupRequest("spec", F, K), 0, h))
        role.receive(_from("coordinator",
                           SetupResult("spec", np.zeros(F), np.ones(F), prior), 0, h))
    model = init_model(F, K)
    committed = {PID[h]: r.n_train for h, r in zip(HOSPITALS, roles, strict=True)}
    start = RoundStart(1, model_hash(model), time.time() + 600, model.weights, model.bias,
                       1, 0.1, 0.0, 0.0, 0.0, committed)
    updates = {}
    for h, role in zip(HOSPITALS, roles, strict=True):
        (send,) = [e for e in role.receive(_from("coordinator", start, 1, h, "validator"))
                   if isinstance(e, Send)]
        assert isinstance(send.msg, Update) and send.to == (PID["validator"], PID["coordinator"])
        updates[h] = send.msg
    return Trained(start, updates)


def _role(trained: Trained, now: float, deadline_s: float = 10.0,
          **kw: object) -> ValidatorRole:
    """A validator role with round 1 open (the coordinator's RoundStart received)."""
    role = ValidatorRole(IDS["validator"], ROSTER, **kw)  # type: ignore[arg-type]
    start = dataclasses.replace(trained.start, deadline=now + deadline_s)
    assert role.receive(_from("coordinator", start, 1, *HOSPITALS, "validator"), now) == []
    return role


def _records(effects: list[ValidatorEffect], event: str) -> list[Record]:
    return [e for e in effects if isinstance(e, Record) and e.event == event]


def _batch(effects: list[ValidatorEffect]) -> tuple[bytes, Verdicts]:
    """The one signed batch among the effects, opened by the coordinator (so: authentic)."""
    (raw,) = [e for e in effects if isinstance(e, SendRaw)]
    opened = open_envelope(raw.envelope, IDS["coordinator"])
    assert opened.header.sender == PID["validator"]
    assert opened.header.recipients == (PID["coordinator"],)
    return raw.envelope, decode(opened.header.type, opened.payload, Verdicts)


def test_good_updates_get_a_signed_accept_batch_to_the_coordinator(trained: Trained) -> None:
    """Once every committed hospital is judged, one signed batch of accepts goes out, audited;
    a VerdictsRequest gets the same bytes again."""
    now = time.time()
    role = _role(trained, now)
    envs = {h: _update_env(trained.updates[h], h) for h in HOSPITALS}
    assert role.receive(envs["h0"], now) == [] and role.receive(envs["h1"], now) == []
    effects = role.receive(envs["h2"], now)
    env, batch = _batch(effects)
    assert batch.round == 1 and len(batch.items) == N_SITES
    assert {v.hospital for v in batch.items} == {PID[h] for h in HOSPITALS}
    assert all(v.accepted and v.reasons == () for v in batch.items)
    assert {v.update_digest for v in batch.items} == {digest(e) for e in envs.values()}
    assert all(v.scores["norm"] > 0 for v in batch.items)
    verdicts = _records(effects, "verdict")
    assert len(verdicts) == N_SITES and all(r.body["accepted"] for r in verdicts)
    (sent,) = _records(effects, "verdicts_sent")
    assert sent.subject == digest(env) and sent.body == {"count": N_SITES}
    assert _records(effects, STATE_EVENT)[0].body["round"] == 1  # the checkpoint
    (count,) = [e for e in effects if isinstance(e, CountVerdicts)]
    assert count.verdicts == ((True, ()),) * N_SITES
    assert role.deadline is None and role.stats()["accepted"] == N_SITES

    again = role.receive(_from("coordinator", VerdictsRequest(1), 1, "validator"), now)
    assert [e.envelope for e in again if isinstance(e, SendRaw)] == [env]
    assert _records(again, "verdicts_resent")[0].subject == digest(env)
    # a request for another round has nothing to resend
    assert role.receive(_from("coordinator", VerdictsRequest(2), 2, "validator"), now) == []


def test_protocol_refusals_are_audited_at_once_and_sent_with_their_reasons(
    trained: Trained,
) -> None:
    """A replayed envelope, a NaN delta, an over-norm delta and a sender outside the roster
    are each refused with its reason code, audited when judged, and in the round's batch."""
    now = time.time()
    role = _role(trained, now)
    good = _update_env(trained.updates["h0"], "h0")
    nan = dataclasses.replace(trained.updates["h1"],
                              delta_w=np.full((F, K), np.nan, np.float32))
    big = dataclasses.replace(trained.updates["h2"], delta_w=trained.updates["h2"].delta_w
                              + np.float32(100.0))
    stranger = Identity.generate()
    cases = [
        (_update_env(trained.updates["h1"], "h1", stranger), stranger.peer_id, "not_enrolled"),
        (good, PID["h0"], None),
        (good, PID["h0"], "replay"),
        (_update_env(nan, "h1"), PID["h1"], "non_finite"),
    ]
    for env, hospital, reason in cases:
        effects = role.receive(env, now)
        assert not [e for e in effects if isinstance(e, SendRaw)]  # h2 is still awaited
        if reason is None:
            assert effects == []  # accepted updates are audited once scored, with the batch
            continue
        (rec,) = _records(effects, "verdict")
        assert rec.body["hospital"] == hospital and rec.body["accepted"] is False
        assert rec.body["reasons"][0] == reason and reason in REASONS
        assert rec.subject == digest(env) and rec.round == 1
    effects = role.receive(_update_env(big, "h2"), now)  # the last committed hospital
    (rec,) = _records(effects, "verdict")[:1]
    assert rec.body["reasons"] == ["norm_exceeded"] and rec.body["scores"]["norm"] > 50.0
    _, batch = _batch(effects)
    reasons = [(v.hospital, v.accepted, v.reasons[:1]) for v in batch.items]
    assert reasons == [
        (stranger.peer_id, False, ("not_enrolled",)),
        (PID["h0"], True, ()),
        (PID["h0"], False, ("replay",)),
        (PID["h1"], False, ("non_finite",)),
        (PID["h2"], False, ("norm_exceeded",)),
    ]
    assert role.stats() == {"accepted": 1, "rejected": 4, "quarantined": [], "tolerate": 0}


def test_the_batch_is_flushed_on_tick_before_the_round_deadline(trained: Trained) -> None:
    """A hospital that never answers does not hold the batch: tick sends it shortly before
    the round's deadline; what arrives after that goes out at once in a batch of its own."""
    now = time.time()
    role = _role(trained, now, deadline_s=10.0)
    assert role.receive(_update_env(trained.updates["h0"], "h0"), now) == []
    flush_at = role.deadline
    assert flush_at is not None and flush_at == pytest.approx(now + 10.0 * (1 - DEADLINE_GRACE))
    assert role.tick(flush_at - 0.5) == []
    assert role.stats()["accepted"] == 0  # not scored yet: the batch still waits
    effects = role.tick(flush_at)
    _, batch = _batch(effects)
    assert [(v.hospital, v.accepted) for v in batch.items] == [(PID["h0"], True)]
    assert role.deadline is None and role.tick(flush_at + 5) == []
    late = role.receive(_update_env(trained.updates["h1"], "h1"), flush_at + 1)
    _, second = _batch(late)
    assert [(v.hospital, v.accepted) for v in second.items] == [(PID["h1"], True)]
    # a second batch for a round already judged changes no standing (no new checkpoint)
    assert _records(late, STATE_EVENT) == []


def test_only_the_coordinator_starts_a_round_and_a_bad_envelope_is_refused(
    trained: Trained,
) -> None:
    """A RoundStart from a hospital is judged as traffic and refused; so are unreadable bytes."""
    now = time.time()
    role = ValidatorRole(IDS["validator"], ROSTER)
    forged = _from("h0", trained.start, 1, "validator")
    (rec,) = _records(role.receive(forged, now), "verdict")
    assert rec.body["reasons"] == ["wrong_type"] and role.round == -1 and role.deadline is None
    (bad,) = _records(role.receive(b"not an envelope", now), "envelope_refused")
    assert bad.round == -1


def _entry(seq: int, actor: str, body: dict[str, object]) -> AuditEntry:
    return AuditEntry(seq, 0.0, actor, STATE_EVENT, 1, "", body, "", "", "", "", "")


def test_restored_standing_counts_only_this_validators_own_newest_state(
    trained: Trained,
) -> None:
    """After a restart the role takes back its own checkpoint of this run (not another
    signer's, not an earlier run's), and a quarantined hospital stays out with f = 1."""
    bad = Reputation(1, {PID["h2"]: Standing(strikes=2.0, quarantined=True)}).to_dict()
    clean = Reputation(1, {}).to_dict()
    now = time.time()
    role = _role(trained, now, tolerate=1)
    effects = role.restore([
        _entry(3, PID["validator"], clean),   # before this run's setup_started (seq 5)
        _entry(7, PID["validator"], bad),     # this run, own key: the one that counts
        _entry(9, PID["coordinator"], clean),  # another signer
    ], since_seq=5)
    (rec,) = _records(effects, "validator_restored")
    assert rec.body == {"from_seq": 7, "quarantined": [PID["h2"]]}
    assert role.stats()["quarantined"] == [PID["h2"]]
    assert role.restore([_entry(3, PID["validator"], clean)], since_seq=5) == []

    role = _role(trained, now, tolerate=1)  # the restarted role judges round 1 again
    role.restore([_entry(7, PID["validator"], {**bad, "round": 0})], since_seq=5)
    effects = []
    for h in HOSPITALS:
        effects += role.receive(_update_env(trained.updates[h], h), now)
    _, batch = _batch(effects)
    judged = {v.hospital: v for v in batch.items}
    assert not judged[PID["h2"]].accepted and "quarantined.threshold" in judged[PID["h2"]].scores
    assert judged[PID["h0"]].accepted and judged[PID["h1"]].accepted


def test_the_ray_shell_holds_no_protocol_logic() -> None:
    """actors/validator.py only carries effects out: it imports no checker or policy, and
    stays a thin shell."""
    path = ROOT / "actors" / "validator.py"
    source = path.read_text()
    imported = {n.module for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.ImportFrom) and n.module}
    assert imported.isdisjoint({"medimesh.validation", "medimesh.reputation", "medimesh.wire",
                                "medimesh.protocol", "medimesh.scoring"})
    assert len(source.splitlines()) <= 120
