"""The validator's checks: each refusal carries its specific reason."""

from __future__ import annotations

import time

import numpy as np
import pytest

from medimesh.identity import Identity, Member, Roster
from medimesh.protocol import Update
from medimesh.validation import REASONS, RoundContext, UpdateValidator
from medimesh.wire import seal

D, K = 6, 3
VAL, COORD, HOSP, OTHER, OUTSIDER = (Identity.generate() for _ in range(5))
ROSTER = Roster(
    [
        Member("validator", "validator", VAL.peer_id),
        Member("coordinator", "coordinator", COORD.peer_id),
        Member("h1", "hospital", HOSP.peer_id),
        Member("h2", "hospital", OTHER.peer_id),
    ]
)
BASE = "b" * 64


def _ctx(round_: int = 2, **kw: object) -> RoundContext:
    return RoundContext(round_, BASE, D, K, committed={HOSP.peer_id: 100}, **kw)  # type: ignore[arg-type]


def _update(**kw: object) -> Update:
    fields: dict[str, object] = {
        "round": 2,
        "base_hash": BASE,
        "n_examples": 50,
        "delta_w": np.full((D, K), 0.1, dtype=np.float32),
        "delta_b": np.zeros(K, dtype=np.float32),
        "eval": {},
    }
    fields.update(kw)
    return Update(**fields)  # type: ignore[arg-type]


def _env(update: Update, sender: Identity = HOSP, round_: int | None = None) -> bytes:
    r = update.round if round_ is None else round_
    return seal(sender, "update", [VAL.peer_id, COORD.peer_id], r, update.to_payload())


def _validator(round_: int = 2, **kw: object) -> UpdateValidator:
    v = UpdateValidator(VAL, ROSTER)
    v.begin_round(_ctx(round_, **kw))
    return v


def test_honest_update_is_accepted_with_scores() -> None:
    """A well-formed update for the open round passes every check."""
    d = _validator().check(_env(_update()))
    assert d.accepted and d.reasons == () and d.scores["norm"] > 0


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (_update(base_hash="c" * 64), "wrong_base"),
        (_update(delta_w=np.zeros((D + 1, K), np.float32)), "wrong_shape"),
        (_update(delta_w=np.zeros((D, K), np.float64)), "wrong_dtype"),
        (_update(delta_w=np.full((D, K), np.nan, np.float32)), "non_finite"),
        (_update(delta_b=np.array([np.inf, 0, 0], np.float32)), "non_finite"),
        (_update(delta_w=np.full((D, K), 100.0, np.float32)), "norm_exceeded"),
        (_update(n_examples=0), "bad_example_count"),
        (_update(n_examples=10_000), "bad_example_count"),
    ],
)
def test_bad_updates_are_rejected_with_their_reason(update: Update, reason: str) -> None:
    """Numeric and binding checks each name what failed."""
    d = _validator().check(_env(update))
    assert not d.accepted and d.reasons[0] == reason and reason in REASONS


def test_replay_is_rejected() -> None:
    """The same signed envelope twice: the second copy is a replay."""
    v = _validator()
    env = _env(_update())
    assert v.check(env).accepted
    assert v.check(env).reasons == ("replay",)


def test_replay_of_an_earlier_round_is_rejected_as_replay() -> None:
    """An update captured in round 2 and replayed in round 3 is caught by its message id."""
    v = _validator()
    env = _env(_update())
    assert v.check(env).accepted
    v.begin_round(_ctx(3))
    assert v.check(env).reasons == ("replay",)


def test_stale_and_future_rounds_are_rejected() -> None:
    """A fresh update for a closed round is stale; for a later round, future."""
    v = _validator(round_=3)
    assert v.check(_env(_update(round=2))).reasons == ("stale_round",)
    assert v.check(_env(_update(round=4))).reasons == ("future_round",)


def test_second_update_from_the_same_hospital_is_a_duplicate() -> None:
    """One update per hospital per round."""
    v = _validator()
    assert v.check(_env(_update())).accepted
    assert v.check(_env(_update())).reasons == ("duplicate",)


def test_unenrolled_and_wrong_role_senders_are_rejected() -> None:
    """An outsider's key and a coordinator posing as a hospital are both refused."""
    v = _validator()
    assert v.check(_env(_update(), OUTSIDER)).reasons == ("not_enrolled",)
    assert v.check(_env(_update(), COORD)).reasons == ("not_hospital",)


def test_tampered_and_forged_envelopes_are_rejected() -> None:
    """Ciphertext tampered in flight, or a forged signature, fail as bad envelopes."""
    v = _validator()
    env = bytearray(_env(_update()))
    env[-100] ^= 0xFF
    d = v.check(bytes(env))
    assert not d.accepted and d.reasons[0] == "bad_envelope"


def test_clock_skew_and_no_round() -> None:
    """Updates far from now, or with no round open, are refused."""
    v = _validator()
    assert v.check(_env(_update()), now=time.time() + 3600).reasons == ("clock_skew",)
    fresh = UpdateValidator(VAL, ROSTER)
    assert fresh.check(_env(_update())).reasons == ("no_round",)


def test_other_message_types_are_rejected() -> None:
    """A hospital sending something that is not an update gets wrong_type."""
    v = _validator()
    env = seal(HOSP, "eval_report", [VAL.peer_id], 2, b"{}")
    assert v.check(env).reasons == ("wrong_type",)


def test_oversized_envelope_is_rejected() -> None:
    """An envelope over the configured size bound is refused before decryption."""
    v = _validator(max_bytes=512)
    assert v.check(_env(_update())).reasons == ("too_large",)
