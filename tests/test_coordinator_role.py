"""The coordinator's protocol without Ray: real keys, real sealed envelopes, real hospital code.

CoordinatorRole is driven here as a node runtime would drive it: envelopes in through
``receive``, the clock through ``tick``, and its effects read back (nothing is mocked: the
hospitals are the production HospitalNode, the envelopes are sealed with their own keys).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from medimesh.errors import ConfigError
from medimesh.hospital import HospitalNode
from medimesh.identity import Identity, Member, Roster
from medimesh.model import Model, TrainConfig, model_hash
from medimesh.protocol import (
    Message,
    RoundStart,
    SecAggAdverts,
    SecAggCheckRequest,
    SecAggInbox,
    SecAggUnmaskRequest,
    SetupRequest,
    SetupResult,
    SetupStats,
    Verdict,
    Verdicts,
)
from medimesh.roles import Record, Send
from medimesh.roles.coordinator import CoordinatorRole
from medimesh.roles.coordinator_config import CoordinatorConfig
from medimesh.roles.coordinator_effects import (
    CoordinatorEffect,
    Failed,
    PublishModel,
    RoundClosed,
    SaveCheckpoint,
    SetupDone,
)
from medimesh.secagg import SecAggConfig
from medimesh.secagg_round import SecAggHospital
from medimesh.sites import SiteDescriptor, dataset_info, load_site
from medimesh.wire import digest, seal

T0 = 1_000_000.0
N_SITES = 3
COHORT = {"n_hospitals": N_SITES, "seed": 11}


@dataclass
class Consortium:
    coord: Identity
    validator: Identity
    hospitals: list[Identity]
    nodes: list[HospitalNode]
    stats: list[SetupStats]
    roster: Roster


@pytest.fixture(scope="module")
def nodes() -> list[HospitalNode]:
    """Three real hospitals (synthetic rare-disease sites; their rows never leave them)."""
    return [
        HospitalNode(load_site(SiteDescriptor("rare", f"h{i}", {"cohort": COHORT, "site": i})),
                     dataset_info("rare", {"cohort": COHORT}))
        for i in range(N_SITES)
    ]


@pytest.fixture(scope="module")
def stats(nodes: list[HospitalNode]) -> list[SetupStats]:
    """Each hospital's answer to the setup request (computed once: it trains a baseline)."""
    info = dataset_info("rare", {"cohort": COHORT})
    req = SetupRequest("spec", len(info.feature_names), len(info.class_names), False)
    return [node.on_setup_request(req) for node in nodes]


@pytest.fixture
def fed(nodes: list[HospitalNode], stats: list[SetupStats]) -> Consortium:
    coord, validator = Identity.generate(), Identity.generate()
    hospitals = [Identity.generate() for _ in nodes]
    roster = Roster([
        Member("coordinator", "coordinator", coord.peer_id),
        Member("validator", "validator", validator.peer_id),
        *(Member(f"h{i}", "hospital", h.peer_id) for i, h in enumerate(hospitals)),
    ])
    return Consortium(coord, validator, hospitals, nodes, stats, roster)


def _config(nodes: Sequence[HospitalNode], **kw: object) -> CoordinatorConfig:
    info = dataset_info("rare", {"cohort": COHORT})
    base: dict[str, object] = {
        "n_features": len(info.feature_names), "n_classes": len(info.class_names),
        "spec_hash": "spec", "train": TrainConfig(epochs=1), "round_timeout_s": 30.0,
        "round_retries": 1, "retry_window_s": 0.0,
    }
    return CoordinatorConfig(**{**base, **kw})  # type: ignore[arg-type]


def _sends(effects: Sequence[CoordinatorEffect]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def _events(effects: Sequence[CoordinatorEffect]) -> list[Record]:
    return [e for e in effects if isinstance(e, Record)]


def _named(effects: Sequence[CoordinatorEffect], event: str) -> list[Record]:
    return [e for e in _events(effects) if e.event == event]


def _sealed(sender: Identity, msg: Message, to: Identity, round_: int) -> bytes:
    return seal(sender, msg.TYPE, [to.peer_id], round_, msg.to_payload())


def _only(effects: Sequence[CoordinatorEffect], kind: type[Message]) -> Message:
    msgs = [s.msg for s in _sends(effects) if isinstance(s.msg, kind)]
    assert len(msgs) == 1, effects
    return msgs[0]


def _set_up(fed: Consortium, role: CoordinatorRole) -> None:
    """The setup round, with each hospital's real statistics, sealed with its own key."""
    effects = role.begin_setup(T0)
    req = _only(effects, SetupRequest)
    assert isinstance(req, SetupRequest) and req.spec_hash == "spec"
    for ident, answer in zip(fed.hospitals, fed.stats, strict=True):
        assert not _events(role.receive(_sealed(ident, answer, fed.coord, 0), T0))
    effects = role.tick(T0 + 1)
    result = _only(effects, SetupResult)
    assert isinstance(result, SetupResult)
    for node in fed.nodes:
        node.on_setup_result(result)
    assert any(isinstance(e, PublishModel) and e.round == 0 for e in effects)
    assert any(isinstance(e, SaveCheckpoint) for e in effects)
    assert any(isinstance(e, SetupDone) for e in effects) and role.phase == "idle" and role.done


def _updates(fed: Consortium, start: RoundStart, which: Sequence[int]) -> Iterator[bytes]:
    for i in which:
        update = fed.nodes[i].on_round_start(start, fed.coord.peer_id)
        yield _sealed(fed.hospitals[i], update, fed.coord, start.round)


def _verdicts(fed: Consortium, round_: int, envelopes: Sequence[bytes],
              senders: Sequence[int]) -> bytes:
    items = [
        Verdict(round_, digest(env), fed.hospitals[i].peer_id, True, (), {})
        for env, i in zip(envelopes, senders, strict=True)
    ]
    return _sealed(fed.validator, Verdicts(round_, items), fed.coord, round_)


def _start(fed: Consortium, role: CoordinatorRole, now: float) -> RoundStart:
    start = _only(role.begin_round(now), RoundStart)
    assert isinstance(start, RoundStart)
    return start


def test_a_round_closes_as_soon_as_every_hospital_is_answered(fed: Consortium) -> None:
    """All updates and the verdicts in: the next tick publishes, well before the deadline."""
    role = CoordinatorRole(fed.coord, fed.roster, _config(fed.nodes, min_updates=3))
    _set_up(fed, role)
    start = _start(fed, role, T0 + 2)
    assert role.phase == "updates" and role.deadline == T0 + 2 + 30.0
    envs = list(_updates(fed, start, range(N_SITES)))
    for env in envs:
        assert not _events(role.receive(env, T0 + 3))
    assert role.tick(T0 + 3) == [] and role.busy  # updates in, verdicts not yet
    role.receive(_verdicts(fed, 1, envs, range(N_SITES)), T0 + 4)
    effects = role.tick(T0 + 4)
    published = _named(effects, "model_published")
    assert len(published) == 1 and role.phase == "idle"
    assert published[0].body["updates"] == [digest(e) for e in envs]
    pub = next(e for e in effects if isinstance(e, PublishModel))
    assert pub.round == 1 and pub.model_hash == role.model_hash == published[0].subject
    assert not any(isinstance(e, Failed) for e in effects)


def test_a_round_closes_on_quorum_at_its_deadline(fed: Consortium) -> None:
    """Two of three answered, quorum two: nothing before the deadline, a model at it."""
    role = CoordinatorRole(fed.coord, fed.roster, _config(fed.nodes, min_updates=2))
    _set_up(fed, role)
    start = _start(fed, role, T0 + 2)
    envs = list(_updates(fed, start, [0, 1]))
    for env in envs:
        role.receive(env, T0 + 3)
    role.receive(_verdicts(fed, 1, envs, [0, 1]), T0 + 3)
    assert role.tick(T0 + 10) == [] and role.busy  # the third hospital may still answer
    assert role.deadline == T0 + 2 + 30.0
    effects = role.tick(T0 + 2 + 30.0)
    assert len(_named(effects, "model_published")) == 1 and role.phase == "idle"
    # Round 1's metrics are final once round 2 carried its model's evaluation.
    start2 = _start(fed, role, T0 + 33)
    assert start2.round == 2 and start2.base_hash == role.model_hash
    envs2 = list(_updates(fed, start2, range(N_SITES)))
    for env in envs2:
        role.receive(env, T0 + 40)
    role.receive(_verdicts(fed, 2, envs2, range(N_SITES)), T0 + 40)
    closed = [e for e in role.tick(T0 + 40) if isinstance(e, RoundClosed)]
    assert [c.metrics.round for c in closed] == [1]
    assert closed[0].metrics.accepted == 2 and closed[0].metrics.evaluated_by == N_SITES


def test_too_few_updates_at_the_deadline_fail_the_round_and_it_is_retried(
    fed: Consortium,
) -> None:
    """One update, quorum two: the deadline tick audits round_failed and asks for a retry of
    the same round from the same base; once the retries are spent, it fails for good."""
    role = CoordinatorRole(fed.coord, fed.roster, _config(fed.nodes, min_updates=2))
    _set_up(fed, role)
    base = role.model_hash
    start = _start(fed, role, T0 + 2)
    envs = list(_updates(fed, start, [0]))
    role.receive(envs[0], T0 + 3)
    role.receive(_verdicts(fed, 1, envs, [0]), T0 + 3)
    effects = role.tick(T0 + 2 + 30.0)
    failed = [e for e in effects if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].retry and "1 accepted update(s), 2 required" in (
        failed[0].reason
    )
    assert _named(effects, "round_failed")[0].body["attempt"] == 0
    assert not _named(effects, "model_published") and role.model_hash == base
    retry = role.begin_round(T0 + 40)
    again = _only(retry, RoundStart)
    assert isinstance(again, RoundStart) and again.round == 1 and again.base_hash == base
    assert _named(retry, "round_started")[0].body["attempt"] == 1
    effects = role.tick(T0 + 40 + 30.0)  # nobody answers the retry
    failed = [e for e in effects if isinstance(e, Failed)]
    assert len(failed) == 1 and not failed[0].retry  # round_retries=1 spent


def test_an_update_after_the_close_is_reported_late(fed: Consortium) -> None:
    """The third hospital's update arrives after its round closed: audited as late, unused."""
    role = CoordinatorRole(fed.coord, fed.roster, _config(fed.nodes, min_updates=2))
    _set_up(fed, role)
    start = _start(fed, role, T0 + 2)
    envs = list(_updates(fed, start, range(N_SITES)))
    role.receive(envs[0], T0 + 3)
    role.receive(envs[1], T0 + 3)
    role.receive(_verdicts(fed, 1, envs[:2], [0, 1]), T0 + 3)
    published = _named(role.tick(T0 + 32), "model_published")
    assert len(published) == 1
    late = _named(role.receive(envs[2], T0 + 33), "late_update")
    assert len(late) == 1 and late[0].subject == digest(envs[2])
    assert late[0].body == {"hospital": fed.hospitals[2].peer_id}
    assert published[0].body["updates"] == [digest(e) for e in envs[:2]]


def test_an_update_from_outside_the_roster_is_refused(fed: Consortium) -> None:
    """A stranger's well-formed, correctly sealed update is refused, audited, and not counted."""
    role = CoordinatorRole(fed.coord, fed.roster, _config(fed.nodes, min_updates=1))
    _set_up(fed, role)
    start = _start(fed, role, T0 + 2)
    stranger = Identity.generate()
    honest = next(_updates(fed, start, [0]))
    forged = fed.nodes[1].on_round_start(start, fed.coord.peer_id)
    env = _sealed(stranger, forged, fed.coord, 1)
    refused = _named(role.receive(env, T0 + 3), "update_refused")
    assert len(refused) == 1
    assert refused[0].body == {"hospital": stranger.peer_id, "reason": "not_admitted_at_setup"}
    assert role.state is not None and digest(env) not in role.state.updates
    # Even a verdict accepting it (a lying validator) cannot make it count.
    role.receive(honest, T0 + 3)
    items = [Verdict(1, digest(honest), fed.hospitals[0].peer_id, True, (), {}),
             Verdict(1, digest(env), stranger.peer_id, True, (), {})]
    role.receive(_sealed(fed.validator, Verdicts(1, items), fed.coord, 1), T0 + 3)
    published = _named(role.tick(T0 + 32), "model_published")
    assert published[0].body["updates"] == [digest(honest)]


def test_a_tampered_envelope_is_refused_before_it_is_read(fed: Consortium) -> None:
    """One flipped byte: envelope_refused, nothing taken in."""
    role = CoordinatorRole(fed.coord, fed.roster, _config(fed.nodes))
    _set_up(fed, role)
    start = _start(fed, role, T0 + 2)
    env = bytearray(next(_updates(fed, start, [0])))
    env[-5] ^= 1
    refused = _named(role.receive(bytes(env), T0 + 3), "envelope_refused")
    assert len(refused) == 1 and role.state is not None and not role.state.updates


def test_setup_without_answers_fails_and_a_round_needs_setup(fed: Consortium) -> None:
    """No statistics by the setup deadline: Failed; and no round runs before a setup."""
    role = CoordinatorRole(fed.coord, fed.roster, _config(fed.nodes, setup_timeout_s=5.0))
    with pytest.raises(ConfigError):
        role.check_can_run(1)
    role.begin_setup(T0)
    assert role.tick(T0 + 4) == [] and role.phase == "setup"
    effects = role.tick(T0 + 5)
    assert [e for e in effects if isinstance(e, Failed)] == [
        Failed("no hospital answered the setup round")
    ]
    assert role.phase == "idle"


def test_the_published_model_is_the_aggregate_of_the_accepted_updates(fed: Consortium) -> None:
    """The model named in model_published hashes to what PublishModel carries."""
    role = CoordinatorRole(fed.coord, fed.roster, _config(fed.nodes, min_updates=3))
    _set_up(fed, role)
    start = _start(fed, role, T0 + 2)
    envs = list(_updates(fed, start, range(N_SITES)))
    for env in envs:
        role.receive(env, T0 + 3)
    role.receive(_verdicts(fed, 1, envs, range(N_SITES)), T0 + 3)
    pub = next(e for e in role.tick(T0 + 3) if isinstance(e, PublishModel))
    assert model_hash(Model(pub.weights, pub.bias)) == pub.model_hash
    assert not np.array_equal(pub.weights, start.weights)
    assert set(pub.updates) == {digest(e) for e in envs}


def _secure_step(
    fed: Consortium, role: CoordinatorRole, effects: Sequence[CoordinatorEffect], now: float,
    answer: Callable[[int, Message], Message | None],
) -> tuple[list[CoordinatorEffect], list[tuple[int, bytes]]]:
    """Each hospital answers what the coordinator sent it (sealed with its own key)."""
    envs = []
    for send in _sends(effects):
        for peer in send.to:
            i = [h.peer_id for h in fed.hospitals].index(peer)
            reply = answer(i, send.msg)
            if reply is not None:
                envs.append((i, _sealed(fed.hospitals[i], reply, fed.coord, send.round)))
    for _, env in envs:
        assert not _named(role.receive(env, now), "late_secagg")
    return role.tick(now), envs


def test_a_secure_round_runs_its_phases_and_publishes_the_unmasked_sum(
    fed: Consortium,
) -> None:
    """Advertise, share keys, masked input, verdicts, consistency check, unmask: the role
    holds only masked vectors and publishes one model with the round's SecAgg summary."""
    role = CoordinatorRole(fed.coord, fed.roster,
                           _config(fed.nodes, min_updates=2, secure_aggregation=SecAggConfig()))
    _set_up(fed, role)
    clients = [SecAggHospital(h) for h in fed.hospitals]
    begun = role.begin_round(T0 + 2)
    start = _only(begun, RoundStart)
    assert isinstance(start, RoundStart) and start.secagg_threshold == N_SITES
    assert role.phase == "advertise"
    t = T0 + 3
    for i, c in enumerate(clients):
        advert = c.start(start, fed.nodes[i].on_round_start(start, fed.coord.peer_id))
        role.receive(_sealed(fed.hospitals[i], advert, fed.coord, 1), t)
    effects = role.tick(t)
    assert role.phase == "share_keys"

    def answer(i: int, msg: Message) -> Message | None:
        c = clients[i]
        if isinstance(msg, SecAggAdverts):
            return c.on_adverts(msg)
        if isinstance(msg, SecAggInbox):
            return c.on_inbox(msg)
        if isinstance(msg, SecAggCheckRequest):
            return c.on_check_request(msg)
        if isinstance(msg, SecAggUnmaskRequest):
            return c.on_unmask_request(msg)
        return None

    effects, _ = _secure_step(fed, role, effects, t, answer)
    assert role.phase == "masked_input" and all(not s.wait for s in _sends(effects))
    effects, masked = _secure_step(fed, role, effects, t, answer)
    assert role.phase == "verdicts" and effects == []
    assert role.secure is not None
    held = role.secure.sa.held()
    assert set(held) == {h.peer_id for h in fed.hospitals}  # masked vectors, nothing else
    role.receive(_verdicts(fed, 1, [e for _, e in masked], [i for i, _ in masked]), t)
    effects = role.tick(t)
    assert role.phase == "consistency", effects
    effects, _ = _secure_step(fed, role, effects, t, answer)
    assert role.phase == "unmask"
    effects, _ = _secure_step(fed, role, effects, t, answer)
    published = _named(effects, "model_published")
    assert len(published) == 1 and role.phase == "idle"
    summary = published[0].body["secure_aggregation"]
    assert summary["summed"] == N_SITES and summary["answered_unmask"] == N_SITES
    assert sorted(published[0].body["updates"]) == sorted(digest(e) for _, e in masked)
    pub = next(e for e in effects if isinstance(e, PublishModel))
    assert not np.array_equal(pub.weights, start.weights)


def test_a_secure_round_below_the_threshold_fails_and_is_retried(fed: Consortium) -> None:
    """Two advertisements of three needed by the round's deadline: Failed(retry)."""
    role = CoordinatorRole(fed.coord, fed.roster,
                           _config(fed.nodes, min_updates=2, secure_aggregation=SecAggConfig()))
    _set_up(fed, role)
    start = _start(fed, role, T0 + 2)
    for i in range(2):
        c = SecAggHospital(fed.hospitals[i])
        advert = c.start(start, fed.nodes[i].on_round_start(start, fed.coord.peer_id))
        role.receive(_sealed(fed.hospitals[i], advert, fed.coord, 1), T0 + 3)
    assert role.tick(T0 + 3) == [] and role.phase == "advertise"
    effects = role.tick(T0 + 2 + 30.0)
    failed = [e for e in effects if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].retry and "secure aggregation failed" in failed[0].reason
    assert _named(effects, "round_failed") and role.secure is None and role.phase == "idle"
