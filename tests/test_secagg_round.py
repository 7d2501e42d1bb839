"""The secure round's message layer without Ray: hospitals and coordinator sides exchange real
protocol messages (through the payload codec), the validator judges real sealed envelopes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medimesh.aggregation import fedavg, flatten
from medimesh.identity import Identity, Member, Roster
from medimesh.protocol import Message, RoundStart, SecAggMasked, Update
from medimesh.secagg import SecAggError
from medimesh.secagg_round import SecAggHospital, SecAggRound, b64d, b64e, round_params
from medimesh.validation import REASONS, RoundContext, UpdateValidator
from medimesh.wire import seal

D, K, N = 5, 3, 4
IDS = [Identity.generate() for _ in range(N)]
VAL, COORD = Identity.generate(), Identity.generate()
ROSTER = Roster(
    [Member("validator", "validator", VAL.peer_id), Member("coordinator", "coordinator",
                                                              COORD.peer_id)]
    + [Member(f"h{i}", "hospital", ident.peer_id) for i, ident in enumerate(IDS)]
)
COMMITTED = {ident.peer_id: 10 * (i + 1) for i, ident in enumerate(IDS)}
CLIP = 1.0


def _start(round_: int = 3) -> RoundStart:
    return RoundStart(round_, "b" * 64, 0.0, np.zeros((D, K), np.float32),
                      np.zeros(K, np.float32), 1, 0.1, 0.0, 0.0, CLIP, COMMITTED,
                      secagg_threshold=3, secagg_clip=CLIP)


def _update(i: int, rng: np.random.Generator) -> Update:
    return Update(3, "b" * 64, COMMITTED[IDS[i].peer_id],
                  rng.normal(0, 0.2, (D, K)).astype(np.float32),
                  rng.normal(0, 0.2, K).astype(np.float32),
                  {"n_examples": 5, "correct_top1": 1, "correct_top3": 2, "loss_sum": 1.0})


def _wire(msg: Message) -> Message:
    """Every message crosses the codec, as it would between actors."""
    return type(msg).from_payload(msg.to_payload())


def _unmask_request(
    coord: SecAggRound, sides: dict[str, SecAggHospital], survivors: tuple[str, ...]
) -> Message:
    """The consistency check: every survivor signs U3; the request carries the signatures."""
    from medimesh.protocol import SecAggCheckRequest, SecAggUnmaskRequest

    for p in survivors:
        assert coord.add(p, _wire(sides[p].on_check_request(SecAggCheckRequest(3, survivors))), "")
    return _wire(SecAggUnmaskRequest(3, survivors, coord.close_check()))


def test_a_round_of_messages_yields_fedavg_with_one_silent_survivor() -> None:
    """Four hospitals mask; one never answers unmasking; the coordinator's aggregate is the
    example-weighted mean of the four clipped deltas, within the quantization bound."""
    rng = np.random.default_rng(0)
    start = _start()
    back = RoundStart.from_payload(start.to_payload())  # the optional fields survive the codec
    assert (back.secagg_threshold, back.secagg_clip) == (3, CLIP)
    updates = {IDS[i].peer_id: _update(i, rng) for i in range(N)}
    sides = {p: SecAggHospital(ident) for p, ident in zip(COMMITTED, IDS, strict=True)}
    coord = SecAggRound.begin(start)
    for p, side in sides.items():
        assert coord.add(p, _wire(side.start(start, updates[p])), "")
    from medimesh.protocol import SecAggAdverts, SecAggInbox, SecAggUnmaskRequest

    adverts = SecAggAdverts(3, b64e(coord.close_adverts()))
    for p, side in sides.items():
        assert coord.add(p, _wire(side.on_adverts(adverts)), "")
    inboxes = coord.close_shares()
    for p, side in sides.items():
        assert coord.add(p, _wire(side.on_inbox(SecAggInbox(3, inboxes[p]))), f"d-{p}")
    survivors = coord.close_masked(set(sides))
    silent = IDS[1].peer_id
    request = _unmask_request(coord, sides, survivors)
    assert isinstance(request, SecAggUnmaskRequest)
    for p in survivors:
        answer = sides[p].on_unmask_request(request)
        if p != silent:
            assert coord.add(p, _wire(answer), "")
    agg = coord.aggregate()
    vecs = [flatten(u.delta_w, u.delta_b) for u in updates.values()]
    clipped = [v * min(1.0, CLIP / float(np.linalg.norm(v))) for v in vecs]
    exact = fedavg(clipped, [float(u.n_examples) for u in updates.values()])
    # All four are summed (n_in = N), so the rescale is 1 and the stated bound applies as is.
    assert float(np.abs(agg - exact).max()) <= coord.params.quantizer.error_bound(N) + 1e-12
    assert set(coord.held()) == set(sides)  # only masked vectors are held per hospital


def test_messages_out_of_phase_or_from_strangers_are_not_kept() -> None:
    """An unmasking answer before its phase, or an advert for another round, is refused."""
    start = _start()
    coord = SecAggRound.begin(start)
    side = SecAggHospital(IDS[0])
    advert = side.start(start, _update(0, np.random.default_rng(1)))
    from medimesh.protocol import SecAggAdvert, SecAggUnmask

    assert not coord.add(IDS[0].peer_id, SecAggUnmask(3, b64e(b"x")), "")
    assert not coord.add(IDS[0].peer_id, SecAggAdvert(4, advert.advert), "")
    assert not coord.add(VAL.peer_id, advert, "")
    with pytest.raises(SecAggError):  # signed by hospital 0, claimed by hospital 1
        coord.add(IDS[1].peer_id, advert, "")
    retry = SecAggRound.begin(dataclasses.replace(start, deadline=start.deadline + 30))
    with pytest.raises(SecAggError):  # the same round's earlier attempt: another context
        retry.add(IDS[0].peer_id, advert, "")
    assert coord.add(IDS[0].peer_id, advert, "")


def _masked_env(sender: Identity, msg: Message, type_: str = "secagg_masked") -> bytes:
    return seal(sender, type_, [VAL.peer_id, COORD.peer_id], 3, msg.to_payload())


def _masked_for(i: int) -> SecAggMasked:
    """A real masked vector of hospital i (the others' shares do not matter to the validator)."""
    start = _start()
    sides = [SecAggHospital(ident) for ident in IDS]
    coord = SecAggRound.begin(start)
    rng = np.random.default_rng(i)
    for ident, side in zip(IDS, sides, strict=True):
        coord.add(ident.peer_id, side.start(start, _update(0, rng)), "")
    from medimesh.protocol import SecAggAdverts, SecAggInbox

    adverts = SecAggAdverts(3, b64e(coord.close_adverts()))
    for ident, side in zip(IDS, sides, strict=True):
        coord.add(ident.peer_id, side.on_adverts(adverts), "")
    inbox = coord.close_shares()
    return sides[i].on_inbox(SecAggInbox(3, inbox[IDS[i].peer_id]))


def _validator() -> UpdateValidator:
    v = UpdateValidator(VAL, ROSTER)
    v.begin_round(RoundContext(3, "b" * 64, D, K, committed=COMMITTED,
                               secagg=round_params(_start())))
    return v


def test_validator_accepts_a_signed_masked_update_and_refuses_a_tampered_one() -> None:
    """The inner SecAgg signature and length are checked without unmasking anything."""
    good = _masked_for(2)
    d = _validator().check(_masked_env(IDS[2], good))
    assert d.accepted and d.update is None and "norm" not in d.scores
    raw = bytearray(b64d(good.masked))
    raw[20] ^= 1
    bad = SecAggMasked(3, good.base_hash, good.n_examples, b64e(bytes(raw)), good.eval)
    d = _validator().check(_masked_env(IDS[2], bad))
    assert not d.accepted and d.reasons == ("bad_masked_input",) and "bad_masked_input" in REASONS
    # Someone else's masked vector, re-sent under another hospital's envelope.
    d = _validator().check(_masked_env(IDS[3], good))
    assert not d.accepted and d.reasons == ("bad_masked_input",)


def test_validator_refuses_a_plaintext_update_in_a_secure_round() -> None:
    """A hospital that would leak its delta in clear is refused (and the coordinator ignores it)."""
    upd = _update(0, np.random.default_rng(2))
    env = seal(IDS[0], "update", [VAL.peer_id, COORD.peer_id], 3, upd.to_payload())
    d = _validator().check(env)
    assert not d.accepted and d.reasons == ("wrong_type",)


def test_round_params_refuse_a_threshold_at_or_below_half() -> None:
    """t <= n/2 in a RoundStart is refused by every side that derives the parameters."""
    weak = dataclasses.replace(_start(), secagg_threshold=2)
    with pytest.raises(SecAggError):
        round_params(weak)


def test_a_refused_masked_update_is_left_out_and_the_mean_rescaled() -> None:
    """A masked vector the validator refused is treated as a dropout before masking: its
    pairwise masks are rebuilt, and the mean is over the other three hospitals' examples."""
    from medimesh.protocol import SecAggAdverts, SecAggInbox, SecAggUnmaskRequest

    rng = np.random.default_rng(3)
    start = _start()
    updates = {IDS[i].peer_id: _update(i, rng) for i in range(N)}
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
    refused = IDS[0].peer_id
    survivors = coord.close_masked(set(sides) - {refused})
    assert refused not in survivors
    request = _unmask_request(coord, sides, survivors)
    assert isinstance(request, SecAggUnmaskRequest)
    for p in survivors:
        coord.add(p, _wire(sides[p].on_unmask_request(request)), "")
    agg = coord.aggregate()
    kept = [updates[p] for p in survivors]
    vecs = [flatten(u.delta_w, u.delta_b) for u in kept]
    clipped = [v * min(1.0, CLIP / float(np.linalg.norm(v))) for v in vecs]
    exact = fedavg(clipped, [float(u.n_examples) for u in kept])
    rescale = sum(COMMITTED.values()) / sum(COMMITTED[p] for p in survivors)
    bound = coord.params.quantizer.error_bound(3) * rescale
    assert float(np.abs(agg - exact).max()) <= bound + 1e-7
