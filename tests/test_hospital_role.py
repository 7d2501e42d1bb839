"""The hospital role, sans-IO: real envelopes sealed by a real coordinator key, no Ray.

Also: the production hospital (role and Ray shell) names no attack; the attacks live in the
wrapper (medimesh.roles.adversarial), which changes only what the role returns.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

from medimesh.errors import ConfigError
from medimesh.identity import Identity, Member, Role, Roster
from medimesh.model import init_model, model_hash
from medimesh.policy import PolicyConfig
from medimesh.protocol import (
    EvalReport,
    Message,
    ModelPublished,
    RoundStart,
    SetupRequest,
    SetupResult,
    SetupStats,
    Update,
)
from medimesh.roles import Effect, Record, Send, SendRaw
from medimesh.roles.adversarial import AdversarialHospitalRole
from medimesh.roles.hospital import HospitalRole
from medimesh.sites import DatasetInfo, LocalData, SiteDescriptor, dataset_info, load_site
from medimesh.wire import open_envelope, seal

ROOT = Path(__file__).resolve().parents[1]
NAMES: tuple[tuple[str, Role], ...] = (
    ("coordinator", "coordinator"), ("validator", "validator"), ("auditor", "auditor"),
    ("router", "router"), ("h0", "hospital"), ("h1", "hospital"),
)
IDS = {name: Identity.generate() for name, _ in NAMES}
ROSTER = Roster(Member(name, role, IDS[name].peer_id) for name, role in NAMES)
SITE = SiteDescriptor("rare", "h0", {"cohort": {"n_hospitals": 2, "seed": 4}, "site": 0})
INFO: DatasetInfo = dataset_info(SITE.kind, SITE.params)
F, K = len(INFO.feature_names), len(INFO.class_names)
DATA: LocalData = load_site(SITE)
ME = IDS["h0"]


def _from(sender: str, msg: Message, round_: int, to: str = "h0") -> bytes:
    return seal(IDS[sender], msg.TYPE, [IDS[to].peer_id], round_, msg.to_payload())


def _role(**kwargs: object) -> HospitalRole:
    return HospitalRole(ME, ROSTER, DATA, INFO, **kwargs)  # type: ignore[arg-type]


def _start(round_: int, model_seed: int = 0) -> RoundStart:
    model = init_model(F, K)
    w = model.weights + np.float32(0.01 * model_seed)
    base = model_hash(type(model)(w, model.bias))
    return RoundStart(round_, base, 0.0, w, model.bias, 1, 0.1, 0.0, 0.0, 0.0,
                      {ME.peer_id: DATA.y_train.size})


def _published(round_: int, shift: float) -> ModelPublished:
    model = init_model(F, K)
    moved = type(model)(model.weights + np.float32(shift), model.bias)
    return ModelPublished(round_, model_hash(moved), "", moved.weights, moved.bias, (), ())


def _set_up(role: HospitalRole) -> list[Effect]:
    effects = role.receive(_from("coordinator", SetupRequest("spec", F, K), 0))
    prior = np.full(K, 1.0 / K)
    role.receive(_from("coordinator", SetupResult("spec", np.zeros(F), np.ones(F), prior), 0))
    return effects


def _sends(effects: list[Effect]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def _records(effects: list[Effect], event: str) -> list[Record]:
    return [e for e in effects if isinstance(e, Record) and e.event == event]


def test_setup_round_and_model_answer_the_coordinator_only_with_counts_and_deltas() -> None:
    role = _role()
    coordinator, validator = IDS["coordinator"].peer_id, IDS["validator"].peer_id
    setup = _sends(_set_up(role))
    assert isinstance(setup[0].msg, SetupStats) and setup[0].to == (coordinator,)
    assert setup[0].msg.n_examples == DATA.y_train.size and setup[0].wait
    # cross baselines were not asked for: nothing to the peers
    assert len(setup) == 1

    (update,) = _sends(role.receive(_from("coordinator", _start(1), 1)))
    assert isinstance(update.msg, Update) and update.round == 1
    assert update.to == (validator, coordinator)
    assert update.msg.delta_w.shape == (F, K) and np.abs(update.msg.delta_w).sum() > 0
    assert role.rounds_trained == 1

    (report,) = _sends(role.receive(_from("coordinator", _published(1, 0.02), 1)))
    assert isinstance(report.msg, EvalReport) and report.to == (coordinator,)
    assert report.msg.n_examples == DATA.y_test.size
    info = role.info()
    assert info["rounds_trained"] == 1 and info["n_train"] == DATA.y_train.size
    assert info["peer_id"] == ME.peer_id and role.peer_id == ME.peer_id


def test_a_sender_outside_the_roster_is_refused_and_recorded() -> None:
    role = _role()
    stranger = Identity.generate()
    envelope = seal(stranger, SetupRequest.TYPE, [ME.peer_id], 0,
                    SetupRequest("spec", F, K).to_payload())
    effects = role.receive(envelope)
    assert _sends(effects) == []
    (refused,) = _records(effects, "unexpected_sender")
    assert refused.body == {"type": SetupRequest.TYPE}
    # an enrolled peer that is not the coordinator may not start a round either
    effects = role.receive(_from("h1", _start(1), 1))
    assert _sends(effects) == [] and _records(effects, "unexpected_sender")
    # and bytes that are no envelope for us are refused before anything is read
    other = _from("coordinator", SetupRequest("spec", F, K), 0, to="h1")
    assert _records(role.receive(other), "envelope_refused")
    assert role.rounds_trained == 0


def test_a_policy_refusal_is_recorded_and_nothing_is_sent() -> None:
    role = _role(policy=PolicyConfig(evals_per_round=1))
    _set_up(role)
    role.receive(_from("coordinator", _start(1), 1))
    assert _sends(role.receive(_from("coordinator", _published(1, 0.02), 1)))
    effects = role.receive(_from("coordinator", _published(1, 0.05), 1))  # a second new model
    assert _sends(effects) == []
    (refused,) = _records(effects, "policy_refused")
    assert refused.body["rule"] == "eval_per_round" and refused.body["type"] == "model_published"


def test_a_retried_round_gets_the_same_update_bytes_even_after_a_restart(tmp_path: Path) -> None:
    role = _role(state_dir=tmp_path)
    _set_up(role)
    (first,) = _sends(role.receive(_from("coordinator", _start(1), 1)))
    again = role.receive(_from("coordinator", _start(1), 1))
    (second,) = _sends(again)
    assert second.msg.to_payload() == first.msg.to_payload()
    assert _records(again, "round_repeated")
    # the state was kept before the answer: a restarted role answers the retry the same way
    assert (tmp_path / "policy_state.json").exists()
    restarted = _role(state_dir=tmp_path, restarted=True)
    _set_up(restarted)
    (third,) = _sends(restarted.receive(_from("coordinator", _start(1), 1)))
    assert third.msg.to_payload() == first.msg.to_payload()
    # the same round on another base is refused
    effects = restarted.receive(_from("coordinator", _start(1, model_seed=1), 1))
    assert _sends(effects) == [] and _records(effects, "policy_refused")[0].body["rule"] == (
        "round_rebased"
    )


def test_the_wrapper_changes_the_update_and_replaces_its_envelope() -> None:
    honest = _role()
    flipped = AdversarialHospitalRole(ME, ROSTER, DATA, INFO, behaviour="sign_flip")
    forged = AdversarialHospitalRole(ME, ROSTER, DATA, INFO, behaviour="forged_signature")
    out = {}
    for name, role in (("honest", honest), ("flip", flipped), ("forged", forged)):
        _set_up(role)
        out[name] = role.receive(_from("coordinator", _start(1), 1)) + role.receive(
            _from("coordinator", _start(2, model_seed=1), 2)
        )
    h, f = _sends(out["honest"])[0].msg, _sends(out["flip"])[0].msg
    assert isinstance(h, Update) and isinstance(f, Update)
    assert not np.allclose(h.delta_w, f.delta_w)
    raw = [e for e in out["forged"] if isinstance(e, SendRaw)]
    assert len(raw) == 2 and not _sends(out["forged"])
    coordinator = IDS["coordinator"]
    assert open_envelope(raw[0].envelope, coordinator).header.type == Update.TYPE  # round 1
    with pytest.raises(Exception, match="signature"):
        open_envelope(raw[1].envelope, coordinator)  # round 2: the forged one
    with pytest.raises(ConfigError, match="unknown behaviour"):
        AdversarialHospitalRole(ME, ROSTER, DATA, INFO, behaviour="nonsense")


def test_the_production_hospital_refuses_any_behaviour_but_honest() -> None:
    from medimesh.actors.hospital import Hospital

    with pytest.raises(ConfigError, match="production hospital is honest"):
        Hospital(ME.seed, ROSTER.to_json(), None, None, SITE, "scaling")


FORBIDDEN = re.compile(
    r"\b(ATTACKS|PROTOCOL_ATTACKS|COLLUDING|FRAMING|DRILLS|secagg_liar|secagg_dropout|"
    r"colluders|label_flip|attack_update|flip_labels|protocol_envelope|misbehave|LIAR_SHIFT|"
    r"medimesh\.attacks|medimesh\.adversary|medimesh\.secagg_lie|medimesh\.setup_lies)\b"
)
FORBIDDEN_MODULES = {"medimesh.attacks", "medimesh.adversary", "medimesh.secagg_lie",
                     "medimesh.setup_lies", "medimesh.actors.colluders",
                     "medimesh.roles.adversarial"}


def attack_names(source: str) -> list[str]:
    """Attack names in a module's text (comments and docstrings included) and its imports."""
    found = [m.group(0) for m in FORBIDDEN.finditer(source)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in FORBIDDEN_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in FORBIDDEN_MODULES]
    return found


@pytest.mark.parametrize("path", ["actors/hospital.py", "medimesh/roles/hospital.py"])
def test_the_production_hospital_names_no_attack(path: str) -> None:
    assert attack_names("from medimesh.adversary import x\nPROTOCOL_ATTACKS = 1\n") == [
        "medimesh.adversary", "PROTOCOL_ATTACKS", "medimesh.adversary",
    ]  # the check can fail
    assert attack_names((ROOT / path).read_text(encoding="utf-8")) == []
