"""Every protocol attack is refused where we say, with the reason we say."""

from __future__ import annotations

import numpy as np
import pytest

from medimesh.adversary import EXPECTED_REASON, PROTOCOL_ATTACKS, AttackContext
from medimesh.errors import MediMeshError
from medimesh.identity import Identity, Member, Roster
from medimesh.protocol import Update
from medimesh.routing import RoutingTable
from medimesh.validation import RoundContext, UpdateValidator
from medimesh.wire import seal

D, K = 8, 3
ROUTER, VAL, COORD, BAD, VICTIM = (Identity.generate() for _ in range(5))
ROSTER = Roster(
    [
        Member("router", "router", ROUTER.peer_id),
        Member("validator", "validator", VAL.peer_id),
        Member("coordinator", "coordinator", COORD.peer_id),
        Member("bad", "hospital", BAD.peer_id),
        Member("victim", "hospital", VICTIM.peer_id),
    ]
)
BASE = "a" * 64


def _honest(round_: int) -> Update:
    return Update(round_, BASE, 40, np.full((D, K), 0.01, np.float32),
                  np.zeros(K, np.float32), {})


def _outcome(name: str) -> tuple[str, str]:
    """Route the attack envelope and, if the router passes it, let the validator judge it."""
    recipients = [VAL.peer_id, COORD.peer_id]
    previous = seal(BAD, Update.TYPE, recipients, 1, _honest(1).to_payload())
    validator = UpdateValidator(VAL, ROSTER)
    validator.begin_round(RoundContext(1, BASE, D, K, committed={BAD.peer_id: 40}))
    assert validator.check(previous).accepted  # round 1: the honest update the attacker saved
    validator.begin_round(RoundContext(2, BASE, D, K, committed={BAD.peer_id: 40}))
    table = RoutingTable(ROSTER, ROUTER.peer_id)
    for m in ROSTER:
        table.attach(m.peer_id)
    ctx = AttackContext(BAD, recipients, 2, previous, VICTIM.peer_id, 40)
    env = PROTOCOL_ATTACKS[name](ctx, _honest(2))
    try:
        table.route(env)
    except MediMeshError as exc:
        return "message_refused", type(exc).__name__
    decision = validator.check(env)
    assert not decision.accepted
    return "verdict", decision.reasons[0]


@pytest.mark.parametrize("name", sorted(PROTOCOL_ATTACKS))
def test_each_protocol_attack_is_refused_with_its_reason(name: str) -> None:
    """Router or validator refuses it, naming the documented reason."""
    assert _outcome(name) == EXPECTED_REASON[name]


def test_the_catalogue_is_complete() -> None:
    """The issue's eleven protocol attacks are all implemented and mapped."""
    assert set(PROTOCOL_ATTACKS) == set(EXPECTED_REASON) == {
        "replay", "closed_round", "wrong_base", "forged_signature", "unenrolled_key",
        "impersonation", "tampered_ciphertext", "wrong_shape", "non_finite", "oversized",
        "inflated_count",
    }
