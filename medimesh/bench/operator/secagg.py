"""Operator attacks: secagg (issue 15, attacks 1 and 8); see the package docstring.

Each scenario starts a small real consortium (4 hospitals of the rare-disease cohort, secure
aggregation on, an embedded PostgreSQL audit store), lets the real coordinator run the setup
round, and then puts the operator in the coordinator's seat: :class:`HostileCoordinator` holds
the coordinator's key, takes over its inbox at the real router, and signs and sends whatever
protocol message it likes to the real hospital actors. It runs the coordinator's own
secure-aggregation code (:class:`~medimesh.secagg_round.SecAggRound`) wherever the attack
does not need to deviate from it. ``secagg_lying_client`` is the other way round: a real
coordinator and one hospital that lies (behaviour ``secagg_liar``).

What a scenario reports as caught is what the hospitals (or the coordinator) recorded: a
``secagg_refused`` audit event naming the rule, or ``secagg_sum_out_of_bounds``; the tests
assert on those entries, not on the scenario's verdict.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from medimesh.bench.operator import AttackOutcome, Lab, Scenario
from medimesh.bench.operator.hostile import Inbox, take_coordinator_seat
from medimesh.identity import Identity
from medimesh.protocol import (
    MESSAGE_TYPES,
    Message,
    RoundStart,
    SecAggAdvert,
    SecAggAdverts,
    SecAggCheck,
    SecAggCheckRequest,
    SecAggInbox,
    SecAggMasked,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskRequest,
    Update,
    decode,
)
from medimesh.secagg import _ENTRY, _UNMASK, SecAggClient, SecAggError, _open_signed
from medimesh.secagg_round import SecAggRound, b64d, b64e, round_params
from medimesh.wire import open_envelope, seal

__all__ = ["CLIP", "HOSPITALS", "SCENARIOS", "HostileCoordinator", "Inbox", "consortium"]

HOSPITALS = 4
CLIP = 1.0
WAIT_S = 12.0  # the longest a scenario waits for one phase's answers

# The request each awaited answer is sent for: a hospital that refused that request (a
# ``secagg_refused`` entry naming its type) will not answer it.
_ASKED_WITH: dict[type[Message], str] = {
    SecAggAdvert: RoundStart.TYPE, Update: RoundStart.TYPE, SecAggShares: SecAggAdverts.TYPE,
    SecAggMasked: SecAggInbox.TYPE, SecAggCheck: SecAggCheckRequest.TYPE,
    SecAggUnmask: SecAggUnmaskRequest.TYPE,
}



def consortium(lab: Lab, name: str, behaviours: tuple[tuple[str, str], ...] = ()) -> Any:
    """A started 4-hospital secure consortium (setup round done) with its own database."""
    from medimesh.actors.runtime import Consortium, RunConfig
    from medimesh.model import TrainConfig
    from medimesh.secagg import SecAggConfig

    cfg = RunConfig(
        dataset="rare", hospitals=HOSPITALS, rounds=1, seed=7, aggregator="fedavg",
        validator_scoring=False, train=TrainConfig(epochs=2, clip_norm=CLIP),
        behaviours=behaviours, database_url=lab.new_database(), round_timeout_s=20.0,
        round_retries=0, audit_path=str(lab.subdir(name) / "audit.jsonl"),
        secure_aggregation=SecAggConfig(max_dropout=0.3, clip_norm=CLIP, grace_s=1.0),
    )
    fed = Consortium(cfg)
    try:
        fed.start()
    except BaseException:
        fed.shutdown()
        raise
    return fed


class HostileCoordinator:
    """The operator with the coordinator's key, its seat at the router, and its state."""

    def __init__(self, fed: Any) -> None:

        self.fed = fed
        self.ident: Identity = fed.identities["coordinator"]
        self.router = fed.handles["router"]
        self.inbox: Any = take_coordinator_seat(self.router, self.ident.peer_id)
        self.names = {i.peer_id: n for n, i in fed.identities.items()}
        self.peer = {n: i.peer_id for n, i in fed.identities.items()}
        model = fed.final_model()
        self.weights, self.bias = model["weights"], model["bias"]
        self.base_hash = str(model["model_hash"])
        self.committed = {self.peer[h["name"]]: int(h["n_train"]) for h in fed.hospital_info}
        self.got: list[tuple[str, Message]] = []  # (sender, message) opened with our key
        # How many refusals the trail held before the first request since the last wait: a
        # refusal that comes before the next wait starts still ends that wait.
        self._mark: int | None = None
        self.first_refusal = len(self.refusals())  # earlier attacks' refusals are not this one's

    def hospital(self, i: int) -> str:
        return str(self.peer[f"hospital-{i:02d}"])

    def send(self, msg: Message, to: Iterable[str], round_: int) -> None:
        import ray

        if self._mark is None:
            self._mark = len(self.refusals())
        env = seal(self.ident, msg.TYPE, list(to), round_, msg.to_payload())
        ray.get(self.router.send.remote(env))

    def start(
        self, round_: int, committed: dict[str, int], threshold: int, attempt: float = 0.0
    ) -> RoundStart:
        """A RoundStart as the coordinator would sign it (``attempt`` moves the deadline: a
        retried attempt of the same round has its own SecAgg context)."""
        return RoundStart(
            round_, self.base_hash, time.time() + 60 + attempt, self.weights, self.bias,
            2, 1.0, 1e-3, 0.0, CLIP, committed,
            secagg_threshold=threshold, secagg_clip=CLIP if threshold else 0.0,
        )

    def _pull(self) -> None:
        import ray

        for env in ray.get(self.inbox.take.remote()):
            opened = open_envelope(env, self.ident)
            h = opened.header
            if h.type in MESSAGE_TYPES:
                self.got.append((h.sender, decode(h.type, opened.payload, MESSAGE_TYPES[h.type])))

    def refusals(self, since: int = 0) -> list[Any]:
        """``secagg_refused`` audit entries (all actors flushed first), from the ``since``-th."""
        return [e for e in self.fed.audit_entries() if e.event == "secagg_refused"][since:]

    def wait(
        self, kind: type[Message], senders: Iterable[str], timeout: float = WAIT_S,
        round_: int | None = None,
    ) -> dict[str, Any]:
        """The first ``kind`` message from each sender, until all came, each sender either
        answered or refused (audited) the request sent for it since the last wait (of
        ``round_``, when given), or ``timeout``."""
        want = set(senders)
        deadline = time.monotonic() + timeout
        seen = len(self.refusals()) if self._mark is None else self._mark
        self._mark = None
        asked = _ASKED_WITH.get(kind)
        while True:
            self._pull()
            out: dict[str, Any] = {}
            for sender, msg in self.got:
                if isinstance(msg, kind) and sender in want and sender not in out and (
                    round_ is None or getattr(msg, "round", None) == round_
                ):
                    out[sender] = msg
            refused = {
                e.actor for e in self.refusals(seen)
                if (round_ is None or e.round == round_)
                and (asked is None or e.body.get("type") == asked)
            } if len(out) < len(want) else set()
            if set(out) | refused >= want or time.monotonic() > deadline:
                taken = {id(m) for m in out.values()}  # consumed: a retry waits for new ones
                self.got = [(p, m) for p, m in self.got if id(m) not in taken]
                return out
            time.sleep(0.3)

    # -- one secure round, run as the real coordinator would (the attacks deviate from it) --
    def advertise_and_share(
        self, start: RoundStart, to: list[str]
    ) -> tuple[SecAggRound, dict[str, SecAggMasked]]:
        """Phases 0-2 with the real hospitals ``to``: RoundStart ... masked inputs."""
        r = start.round
        sa = SecAggRound.begin(start)
        self.send(start, to, r)
        for p, m in self.wait(SecAggAdvert, to, round_=r).items():
            sa.add(p, m, "")
        if len(sa.adverts) < sa.params.threshold:
            return sa, {}
        self.send(SecAggAdverts(r, b64e(sa.close_adverts())), list(sa.advertisers), r)
        for p, m in self.wait(SecAggShares, sa.advertisers, round_=r).items():
            sa.add(p, m, "")
        for v, box in sa.close_shares().items():
            self.send(SecAggInbox(r, box), [v], r)
        masked = self.wait(SecAggMasked, sa.u2, round_=r)
        for p, m in masked.items():
            sa.add(p, m, p)
        return sa, masked

    def unmask(self, sa: SecAggRound, survivors: tuple[str, ...]) -> dict[str, bytes]:
        """Consistency check, then unmasking; the answers by peer id."""
        r = sa.params.round
        self.send(SecAggCheckRequest(r, survivors), survivors, r)
        checks = self.wait(SecAggCheck, survivors, timeout=4.0, round_=r)
        signed = {p: m.signature for p, m in checks.items()}
        signers = [p for p in survivors if p in checks] or list(survivors)
        self.send(SecAggUnmaskRequest(r, survivors, signed), signers, r)
        answers = self.wait(SecAggUnmask, signers, round_=r)
        return {p: b64d(m.answer) for p, m in answers.items()}

    def secure_sum(self, start: RoundStart, to: list[str]) -> np.ndarray | None:
        """A whole secure round; the decoded weighted sum (None if the hospitals refused)."""
        sa, masked = self.advertise_and_share(start, to)
        if len(masked) < sa.params.threshold:
            return None
        survivors = sa.close_masked(set(masked))
        answers = self.unmask(sa, survivors)
        if len(answers) < sa.params.threshold:
            return None
        total = sa.server.unmask_sum({sa.params.peers.index(p) + 1: a for p, a in answers.items()})
        return np.asarray(sa.server.decoded_sum(total))


def _refusal_outcome(
    attack: str, hostile: HostileCoordinator, rules: set[str], leaked: bool,
    details: dict[str, Any], loss: str,
) -> AttackOutcome:
    refused = [e for e in hostile.refusals(hostile.first_refusal) if e.body.get("rule") in rules]
    by = sorted({hostile.names.get(e.actor, e.actor[:12]) for e in refused})
    caught = bool(refused) and not leaked
    details = {
        **details,
        "refusals": [{"hospital": hostile.names.get(e.actor, e.actor[:12]),
                      "rule": e.body.get("rule"), "reason": e.body.get("reason")}
                     for e in refused],
    }
    return AttackOutcome(
        attack, 1, True, caught,
        ", ".join(f"hospital {n}" for n in by) if by else "nobody",
        f"secagg_refused ({', '.join(sorted({str(e.body.get('rule')) for e in refused}))})"
        if refused else "no refusal",
        "nothing" if caught else loss, details,
    )


def _with(lab: Lab, name: str, body: Callable[[Any], AttackOutcome],
          behaviours: tuple[tuple[str, str], ...] = (), fed: Any = None) -> AttackOutcome:
    """Run ``body`` on ``fed`` — a started :func:`consortium` the caller shares among attacks
    that leave no state the next one depends on, and stops itself — or on a fresh one. The
    audit trail ends up in the consortium's database, whose URL, the hospitals' public peer ids
    and the last entry before the attack (``from_seq``) the outcome names as its evidence."""
    import dataclasses

    own = fed is None
    if fed is None:
        fed = consortium(lab, name, behaviours)
    try:
        before = fed.audit_entries()
        from_seq = before[-1].seq if before else -1
        outcome = body(fed)
        fed.flush_store()
    finally:
        if own:
            fed.shutdown()
    evidence = {
        "database": fed.cfg.database_url,
        "hospital_ids": {n: i.peer_id for n, i in fed.identities.items()
                         if n.startswith("hospital-")},
        "from_seq": from_seq,
    }
    return dataclasses.replace(outcome, details={**outcome.details, **evidence})


# ----------------------------------------------------------------------------- the attacks


def fake_peers(lab: Lab, fed: Any = None) -> AttackOutcome:
    """A RoundStart for one target and two peers the operator made up (t = 2 of 3)."""

    def attack(fed: Any) -> AttackOutcome:
        hc = HostileCoordinator(fed)
        target = hc.hospital(1)
        fakes = [Identity.generate(), Identity.generate()]
        committed = {target: hc.committed[target], **{f.peer_id: 1 for f in fakes}}
        start = hc.start(1, committed, 2)
        params = round_params(start)
        sa = SecAggRound.begin(start)
        clients = {f.peer_id: SecAggClient(params, f) for f in fakes}
        hc.send(start, [target], 1)
        adverts = hc.wait(SecAggAdvert, [target], round_=1)
        recovered: np.ndarray | None = None
        if adverts:  # the target answered: run the protocol with the puppets, which mask 0
            sa.add(target, adverts[target], "")
            for p, c in clients.items():
                sa.add(p, SecAggAdvert(1, b64e(c.advertise())), "")
            blob = sa.close_adverts()
            hc.send(SecAggAdverts(1, b64e(blob)), [target], 1)
            for p, c in clients.items():
                sealed = c.share_keys(blob)
                sa.add(p, SecAggShares(1, {params.peers[v - 1]: b64e(ct)
                                           for v, ct in sealed.items()}), "")
            shares = hc.wait(SecAggShares, [target], round_=1)
            if shares:
                sa.add(target, shares[target], "")
                inboxes = sa.close_shares()
                hc.send(SecAggInbox(1, inboxes[target]), [target], 1)
                masked = hc.wait(SecAggMasked, [target], round_=1)
                if masked:
                    sa.add(target, masked[target], "")
                    puppets = {}
                    for p, c in clients.items():
                        box = {params.peers.index(u) + 1: b64d(ct)
                               for u, ct in inboxes[p].items()}
                        puppets[p] = c.masked_input(np.zeros(params.dim), box)
                    idx = {p: params.peers.index(p) + 1 for p in params.peers}
                    sa.server.collect_masked(
                        {idx[target]: b64d(masked[target].masked),
                         **{idx[p]: m for p, m in puppets.items()}}
                    )
                    alive = sorted(idx.values())
                    answers = {idx[p]: c.unmask(alive) for p, c in clients.items()}
                    total = sa.server.unmask_sum(answers)  # checks b against T's commitment
                    weight = committed[target] / sum(committed.values())
                    recovered = sa.server.decoded_sum(total) / weight
        details: dict[str, Any] = {"target": "hospital-01", "threshold": 2, "peers": 3,
                                   "made_up_peers": 2}
        if recovered is not None:
            details["recovered_update_norm"] = round(float(np.linalg.norm(recovered)), 6)
        return _refusal_outcome(
            "secagg_fake_peers", hc, {"peers_not_on_roster"}, recovered is not None, details,
            "hospital-01's clipped update, recovered exactly (its self-mask seed rebuilt from "
            "the made-up peers' shares matched its signed commitment)",
        )

    return _with(lab, "fake_peers", attack, fed=fed)


def threshold_zero(lab: Lab, fed: Any = None) -> AttackOutcome:
    """A plaintext RoundStart (``secagg_threshold = 0``) in a secure consortium."""

    def attack(fed: Any) -> AttackOutcome:
        hc = HostileCoordinator(fed)
        hospitals = [hc.hospital(i) for i in range(1, HOSPITALS + 1)]
        hc.send(hc.start(1, dict(hc.committed), 0), hospitals, 1)
        updates = hc.wait(Update, hospitals, round_=1)
        details = {"hospitals": HOSPITALS, "plaintext_updates_received": len(updates)}
        return _refusal_outcome(
            "secagg_threshold_zero", hc, {"secagg_required"}, bool(updates), details,
            f"{len(updates)} plaintext update(s) readable by the coordinator",
        )

    return _with(lab, "threshold_zero", attack, fed=fed)


def retry_subtract(lab: Lab, fed: Any = None) -> AttackOutcome:
    """Round 1 twice: all four hospitals, then the three others; subtract the sums."""

    def attack(fed: Any) -> AttackOutcome:
        hc = HostileCoordinator(fed)
        hospitals = [hc.hospital(i) for i in range(1, HOSPITALS + 1)]
        target, others = hospitals[0], hospitals[1:]
        first = hc.secure_sum(hc.start(1, dict(hc.committed), 3), hospitals)
        second_committed = {p: hc.committed[p] for p in others}
        second = hc.secure_sum(hc.start(1, second_committed, 3, attempt=5.0), others)
        details: dict[str, Any] = {"target": "hospital-01", "first_attempt_summed": HOSPITALS,
                                   "second_attempt_peers": len(others),
                                   "first_sum": first is not None,
                                   "second_sum": second is not None}
        leaked = first is not None and second is not None
        if leaked:
            assert first is not None and second is not None
            n1, n2 = sum(hc.committed.values()), sum(second_committed.values())
            update = (first * n1 - second * n2) / hc.committed[target]
            details["recovered_update_norm"] = round(float(np.linalg.norm(update)), 6)
            # The proof that it is exact: ask for the plaintext too (attack threshold_zero).
            hc.send(hc.start(1, dict(hc.committed), 0, attempt=9.0), [target], 1)
            plain = hc.wait(Update, [target], round_=1)
            if plain:
                u = plain[target]
                dw, db = u.delta_w.astype(np.float64), u.delta_b.astype(np.float64)
                clear = np.concatenate([dw.ravel(), db.ravel()])
                clear *= min(1.0, CLIP / float(np.linalg.norm(clear)))
                details["max_error_vs_plaintext"] = float(np.abs(update - clear).max())
        return _refusal_outcome(
            "secagg_retry_subtract", hc, {"already_masked"}, leaked, details,
            "hospital-01's clipped update, as the difference of two secure sums",
        )

    return _with(lab, "retry_subtract", attack, fed=fed)


def _share_kinds(answers: dict[str, bytes], sa: SecAggRound, owner: str) -> dict[str, list[str]]:
    """Which hospitals revealed which kind of share of ``owner`` (read from the answers)."""
    p = sa.params
    owner_idx = p.peers.index(owner) + 1
    kinds: dict[str, list[str]] = {"self_mask": [], "mask_key": []}
    for sender, answer in answers.items():
        try:
            _, body = _open_signed(answer, _UNMASK, p, p.peers.index(sender) + 1)
        except (SecAggError, struct.error):
            continue
        for off in range(0, len(body) - _ENTRY.size + 1, _ENTRY.size):
            u, kind, _ = _ENTRY.unpack_from(body, off)
            if u == owner_idx:
                kinds["self_mask" if kind == 0 else "mask_key"].append(sender)
    return kinds


def both_shares(lab: Lab) -> AttackOutcome:
    """Two survivor lists: hospital-04 alive for some (self-mask share), dropped for others
    (mask-key share) — both kinds of one hospital's shares from honest hospitals."""

    def attack(fed: Any) -> AttackOutcome:
        hc = HostileCoordinator(fed)
        a, b, c, t = (hc.hospital(i) for i in range(1, HOSPITALS + 1))
        start = hc.start(1, dict(hc.committed), 3)
        sa, masked = hc.advertise_and_share(start, [a, b, c, t])
        details: dict[str, Any] = {"target": "hospital-04", "threshold": 3,
                                   "masked_inputs": len(masked)}
        answers: dict[str, bytes] = {}
        if len(masked) == HOSPITALS:
            sa.close_masked(set(masked))
            full, dropped = tuple(sorted([a, b, c, t])), tuple(sorted([a, b, c]))
            lists = {a: full, t: full, b: dropped, c: dropped}
            for p, lst in lists.items():
                hc.send(SecAggCheckRequest(1, lst), [p], 1)
            checks = hc.wait(SecAggCheck, lists, timeout=4.0, round_=1)
            # ... and the other list to one hospital that already signed: a second signature?
            hc.send(SecAggCheckRequest(1, dropped), [a], 1)
            for p, lst in lists.items():
                sigs = {q: m.signature for q, m in checks.items() if lists[q] == lst}
                hc.send(SecAggUnmaskRequest(1, lst, sigs), [p], 1)
            got = hc.wait(SecAggUnmask, lists, round_=1)
            answers = {p: b64d(m.answer) for p, m in got.items()}
            details["signatures_collected"] = len(checks)
        kinds = _share_kinds(answers, sa, t) if answers else {"self_mask": [], "mask_key": []}
        details["shares_of_target"] = {k: [hc.names[p] for p in v] for k, v in kinds.items()}
        leaked = bool(kinds["self_mask"]) and bool(kinds["mask_key"])
        return _refusal_outcome(
            "secagg_both_shares", hc,
            {"consistency_check_failed", "second_survivor_list", "survivors_not_signed"},
            leaked, details,
            f"honest hospitals revealed {len(kinds['self_mask'])} self-mask share(s) and "
            f"{len(kinds['mask_key'])} mask-key share(s) of hospital-04 (t = 3)",
        )

    return _with(lab, "both_shares", attack)


def lying_client(lab: Lab) -> AttackOutcome:
    """Attack 8: hospital-02 adds 4·C to the first coordinate of its masked input."""
    from medimesh.secagg_lie import LIAR_SHIFT

    def attack(fed: Any) -> AttackOutcome:
        before = fed.final_model()
        history = fed.run(rounds=1)
        after = fed.final_model()
        step = np.concatenate([(after["weights"] - before["weights"]).ravel(),
                               (after["bias"] - before["bias"]).ravel()])
        entries = fed.audit_entries()
        caught = [e for e in entries if e.event == "secagg_sum_out_of_bounds"]
        published = [e.body.get("secure_aggregation", {}) for e in entries
                     if e.event == "model_published"]
        check = published[-1].get("sum_check") if published else None
        details = {
            "liar": "hospital-02", "shift": LIAR_SHIFT * CLIP, "clip": CLIP,
            "rounds": len(history), "summed": history[-1]["accepted"] if history else 0,
            "sum_check": check, "step_norm": round(float(np.linalg.norm(step)), 6),
            "step_first_coordinate": round(float(step[0]), 6),
        }
        return AttackOutcome(
            "secagg_lying_client", 8, True, bool(caught),
            "coordinator" if caught else "nobody",
            "secagg_sum_out_of_bounds (sum projected onto the honest norm ball)" if caught
            else "no detection",
            "the liar still steers this round's step inside the ball of radius C "
            "(at most 2C from the honest mean; docs/privacy.md)" if caught
            else f"the first coordinate moved by {details['step_first_coordinate']}",
            details,
        )

    return _with(lab, "lying_client", attack, (("hospital-02", "secagg_liar"),))


SCENARIOS: dict[str, Scenario] = {
    "secagg_fake_peers": fake_peers,
    "secagg_threshold_zero": threshold_zero,
    "secagg_retry_subtract": retry_subtract,
    "secagg_both_shares": both_shares,
    "secagg_lying_client": lying_client,
}
