"""Operator attacks: hospital_policy (issue 15, attack 7); see the package docstring.

A hostile operator holds the coordinator's key and the router. After an honest setup round it
takes the coordinator's place at the router (its own inbox actor registered under the
coordinator's peer id) and sends whatever it likes, signed with the coordinator's key, to the
real hospital actors: less noise or a larger clip in local DP mode, replayed and re-based
RoundStarts, releases past the budget, and many models to score. Each hospital checks every
request against its own policy (``medimesh.policy``) and refuses with a ``policy_refused``
audit entry; the scenario reports what came back to the operator.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from medimesh.bench.operator import AttackOutcome, Lab, Scenario
from medimesh.bench.operator.hostile import Inbox, take_coordinator_seat

__all__ = ["SCENARIOS", "HostileCoordinator", "Inbox"]

NUMBER = 7  # issue 15, attack 7: push local DP (and evaluations) past what a hospital agreed to
HOSPITALS = 3
WAIT_S = 60.0  # generous: a loaded 2-core machine; every wait returns once satisfied



class HostileCoordinator:
    """Signs with the coordinator's key, sends through the real router, reads its own inbox."""

    def __init__(self, fed: Any) -> None:

        self.fed = fed
        self.identity = fed.identities["coordinator"]
        self.router = fed.handles["router"]
        self.hospitals = {d.name: fed.identities[d.name].peer_id for d in fed.descriptors}
        self.names = {pid: n for n, pid in self.hospitals.items()}
        # The operator owns the router: the coordinator's peer id now delivers to its inbox.
        self.inbox: Any = take_coordinator_seat(self.router, self.identity.peer_id)
        self.received: list[tuple[str, str, int, Any]] = []  # (hospital, type, round, message)

    def send(self, msg: Any, round_: int, to: list[str] | None = None) -> bytes:
        import ray

        from medimesh.wire import seal

        recipients = to if to is not None else list(self.hospitals.values())
        env = seal(self.identity, msg.TYPE, recipients, round_, msg.to_payload())
        ray.get(self.router.send.remote(env))
        return env

    def replay(self, envelope: bytes) -> None:
        import ray

        ray.get(self.router.send.remote(envelope))

    def collect(self) -> list[tuple[str, str, int, Any]]:
        """Open everything that arrived for the coordinator since the last call."""
        import ray

        from medimesh.protocol import EvalReport, SecAggAdvert, Update, decode
        from medimesh.wire import open_envelope

        kinds = {Update.TYPE: Update, EvalReport.TYPE: EvalReport, SecAggAdvert.TYPE: None}
        fresh = []
        for env in ray.get(self.inbox.take.remote()):
            opened = open_envelope(env, self.identity)
            h = opened.header
            cls = kinds.get(h.type)
            msg = decode(h.type, opened.payload, cls) if cls is not None else None
            fresh.append((self.names.get(h.sender, h.sender), h.type, h.round, msg))
        self.received += fresh
        return fresh

    def round_start(
        self, round_: int, *, z: float, clip: float, mode: str = "local",
        weights: np.ndarray | None = None, bias: np.ndarray | None = None,
    ) -> Any:
        """A RoundStart on the current global model (or on ``weights``/``bias``)."""
        from medimesh.model import Model, model_hash
        from medimesh.protocol import RoundStart

        model = self.fed.final_model()
        w = model["weights"] if weights is None else weights
        b = model["bias"] if bias is None else bias
        committed = {str(i["peer_id"]): int(i["n_train"]) for i in self.fed.hospital_info}
        t = self.fed.cfg.train
        return RoundStart(
            round_, model_hash(Model(w, b)), time.time() + 30.0, w, b, t.epochs, t.lr, t.l2,
            t.prox_mu, clip, committed, mode, z,
        )


def _wait_for(check: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


def _refusals(fed: Any, after_seq: int = -1) -> list[Any]:
    return [e for e in fed.audit_entries() if e.event == "policy_refused" and e.seq > after_seq]


def _last_seq(fed: Any) -> int:
    entries = fed.audit_entries()
    return entries[-1].seq if entries else -1


def _wait_refusals(fed: Any, after: int, n: int) -> list[Any]:
    found: list[Any] = []

    def enough() -> bool:
        found[:] = _refusals(fed, after)
        return len(found) >= n

    _wait_for(enough)
    return found


def _rules(entries: list[Any]) -> dict[str, int]:
    return dict(Counter(str(e.body.get("rule")) for e in entries))


@contextlib.contextmanager
def _consortium(lab: Lab, privacy: Any, seed: int) -> Iterator[Any]:
    """A small real consortium (3 hospitals, PostgreSQL audit, own state directories) after
    its honest setup round."""
    from medimesh.actors.runtime import Consortium, RunConfig
    from medimesh.model import TrainConfig

    cfg = RunConfig(
        dataset="rare", hospitals=HOSPITALS, rounds=3, seed=seed, train=TrainConfig(epochs=2),
        privacy=privacy, round_timeout_s=5.0, database_url=lab.new_database(),
        **_state(lab),
    )
    fed = Consortium(cfg)
    try:
        fed.start()
        yield fed
    finally:
        fed.shutdown()


def _state(lab: Lab) -> dict[str, Any]:
    """Each hospital's own state directory (policy.toml, policy state)."""
    return {"state_dir": str(lab.subdir("hospital-state"))}


def _local_dp(epsilon: float = 1.0, rounds: int = 3) -> Any:
    from medimesh.privacy import PrivacyConfig

    return PrivacyConfig(epsilon=epsilon, delta=1e-4, rounds=rounds, mode="local",
                         clip_norm=0.5)


def _updates(hostile: HostileCoordinator) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = defaultdict(list)
    for name, type_, _, msg in hostile.received:
        if type_ == "update":
            out[name].append(msg)
    return out


def _wait_updates(hostile: HostileCoordinator, total: int) -> dict[str, list[Any]]:
    _wait_for(lambda: bool(hostile.collect() or True) and
              sum(len(v) for v in _updates(hostile).values()) >= total)
    return _updates(hostile)


def _delta_bytes(update: Any) -> bytes:
    return bytes(np.asarray(update.delta_w).tobytes() + np.asarray(update.delta_b).tobytes())


# ------------------------------------------------------------------------------ scenarios


def dp_weaker_noise(lab: Lab) -> AttackOutcome:
    """Local DP: the coordinator asks for a tenth of the noise, a 10x clip, central mode and no
    DP at all; then, as a control, for exactly the agreed parameters."""
    with _consortium(lab, _local_dp(), seed=11) as fed:
        z, clip = fed.privacy.z, fed.privacy.clip_norm
        hostile = HostileCoordinator(fed)
        mark = _last_seq(fed)
        asks = [
            ("less noise", {"z": z / 10, "clip": clip}),
            ("larger clip", {"z": z, "clip": clip * 10}),
            ("central mode", {"z": z, "clip": clip, "mode": "central"}),
            ("no DP", {"z": 0.0, "clip": clip, "mode": ""}),
        ]
        for _, kw in asks:
            hostile.send(hostile.round_start(1, **kw), 1)
        refused = _wait_refusals(fed, mark, len(asks) * HOSPITALS)
        hostile.collect()
        leaked = {n: list(us) for n, us in _updates(hostile).items()}
        # Control: the agreed parameters are answered by every hospital.
        hostile.send(hostile.round_start(1, z=z, clip=clip), 1)
        honest = _wait_updates(hostile, HOSPITALS + sum(len(v) for v in leaked.values()))
    answered = sorted(n for n, v in honest.items() if len(v) > len(leaked.get(n, [])))
    detected = not leaked and len(refused) >= len(asks) * HOSPITALS
    return AttackOutcome(
        "dp_weaker_noise", NUMBER, attempted=True, detected=detected,
        by="hospitals " + ", ".join(sorted(hostile.hospitals)),
        how="policy_refused (" + ", ".join(sorted(_rules(refused))) + ")",
        honest_loss="nothing" if len(answered) == HOSPITALS else
        f"only {answered} answered the agreed round",
        details={"asked": [a for a, _ in asks], "noise_multiplier": z, "clip_norm": clip,
                 "refusals": _rules(refused), "updates_leaked": sum(map(len, leaked.values())),
                 "answered_agreed_round": answered},
    )


def dp_replayed_round(lab: Lab) -> AttackOutcome:
    """Local DP: round 1 once, then the same envelope replayed, a re-sent round 1 (a 'retry'),
    round 1 on another base model and round 0: only one release per hospital may result."""
    with _consortium(lab, _local_dp(), seed=12) as fed:
        z, clip = fed.privacy.z, fed.privacy.clip_norm
        hostile = HostileCoordinator(fed)
        first = hostile.send(hostile.round_start(1, z=z, clip=clip), 1)
        _wait_updates(hostile, HOSPITALS)
        mark = _last_seq(fed)
        for _ in range(2):
            hostile.replay(first)  # the same bytes again
        hostile.send(hostile.round_start(1, z=z, clip=clip), 1)  # re-sent: a new envelope
        _wait_updates(hostile, 4 * HOSPITALS)
        model = fed.final_model()
        other = np.asarray(model["weights"]) + np.float32(0.01)
        hostile.send(hostile.round_start(1, z=z, clip=clip, weights=other), 1)
        hostile.send(hostile.round_start(0, z=z, clip=clip), 0)
        refused = _wait_refusals(fed, mark, 2 * HOSPITALS)
        repeated = [e for e in fed.audit_entries()
                    if e.event == "round_repeated" and e.seq > mark]
        spent = {n: fed.handles[n].info.remote() for n in hostile.hospitals}
        import ray

        own = {n: ray.get(ref).get("policy", {}).get("dp_rounds") for n, ref in spent.items()}
        updates = _updates(hostile)
    distinct = {n: len({_delta_bytes(u) for u in us}) for n, us in updates.items()}
    detected = (
        all(d == 1 for d in distinct.values()) and len(distinct) == HOSPITALS
        and len(refused) >= 2 * HOSPITALS
    )
    return AttackOutcome(
        "dp_replayed_round", NUMBER, attempted=True, detected=detected,
        by="hospitals " + ", ".join(sorted(hostile.hospitals)),
        how="same update re-sent (round_repeated); policy_refused ("
        + ", ".join(sorted(_rules(refused))) + ")",
        honest_loss="nothing",
        details={"updates_per_hospital": {n: len(us) for n, us in updates.items()},
                 "distinct_releases_per_hospital": distinct,
                 "round_repeated_entries": len(repeated), "refusals": _rules(refused),
                 "hospital_dp_rounds": own},
    )


def dp_budget_exhausted(lab: Lab) -> AttackOutcome:
    """Local DP planned for 2 rounds: the coordinator asks for a third; then a hospital is
    crashed (Ray restarts it) and asked again — its spend comes back from its own disk."""
    import ray

    with _consortium(lab, _local_dp(epsilon=1.0, rounds=2), seed=13) as fed:
        z, clip = fed.privacy.z, fed.privacy.clip_norm
        hostile = HostileCoordinator(fed)
        for r in (1, 2):
            hostile.send(hostile.round_start(r, z=z, clip=clip), r)
            _wait_updates(hostile, r * HOSPITALS)
        mark = _last_seq(fed)
        hostile.send(hostile.round_start(3, z=z, clip=clip), 3)
        refused = _wait_refusals(fed, mark, HOSPITALS)
        victim = sorted(hostile.hospitals)[0]
        fed.kill_hospital(victim, restart=True)
        info: dict[str, Any] = {}

        def back() -> bool:
            try:
                info.update(ray.get(fed.handles[victim].info.remote(), timeout=5))
                return True
            except Exception:
                return False

        def restored() -> bool:
            return back() and any(e.event == "hospital_policy_restored"
                                  for e in fed.audit_entries() if e.seq > mark)

        _wait_for(restored, 60.0)
        mark2 = _last_seq(fed)
        hostile.send(hostile.round_start(3, z=z, clip=clip), 3,
                     to=[hostile.hospitals[victim]])
        after_restart = _wait_refusals(fed, mark2, 1)
        hostile.collect()
        updates = _updates(hostile)
        eps = fed.privacy.epsilon_at(2)
    releases = {n: len(us) for n, us in updates.items()}
    detected = (
        len(refused) >= HOSPITALS and all(v == 2 for v in releases.values())
        and bool(after_restart) and after_restart[0].body.get("rule") == "dp_budget"
    )
    return AttackOutcome(
        "dp_budget_exhausted", NUMBER, attempted=True, detected=detected,
        by="hospitals " + ", ".join(sorted(hostile.hospitals)),
        how="policy_refused (" + ", ".join(sorted(_rules(refused + after_restart))) + ")",
        honest_loss="nothing",
        details={"releases_per_hospital": releases, "epsilon_after_2": eps,
                 "epsilon_budget": 1.0, "refusals": _rules(refused),
                 "restarted": victim, "restarted_policy": info.get("policy", {}),
                 "after_restart": _rules(after_restart)},
    )


def eval_counting_oracle(lab: Lab) -> AttackOutcome:
    """No DP: the coordinator sends 8 different models to score (an exact counting oracle on
    the test patients), then the first one again."""
    from medimesh.model import Model, model_hash
    from medimesh.protocol import ModelPublished

    n_models = 8
    with _consortium(lab, None, seed=14) as fed:
        hostile = HostileCoordinator(fed)
        base = fed.final_model()
        rng = np.random.default_rng(0)
        mark = _last_seq(fed)
        models = []
        for _ in range(n_models):
            w = (np.asarray(base["weights"]) + rng.normal(0, 0.5, base["weights"].shape))
            b = np.asarray(base["bias"])
            w, b = w.astype(np.float32), b.astype(np.float32)
            pub = ModelPublished(1, model_hash(Model(w, b)), base["model_hash"], w, b, (), ())
            models.append(pub)
            hostile.send(pub, 1)
        refused = _wait_refusals(fed, mark, (n_models - 1) * HOSPITALS)
        hostile.send(models[0], 1)  # the same model again
        _wait_for(lambda: bool(hostile.collect() or True) and sum(
            1 for r in hostile.received if r[1] == "eval_report") >= 2 * HOSPITALS, 10.0)
        reports: dict[str, list[Any]] = defaultdict(list)
        for name, type_, _, msg in hostile.received:
            if type_ == "eval_report":
                reports[name].append(msg)
    scored = {n: len({r.model_hash for r in rs}) for n, rs in reports.items()}
    same_again = all(
        len(rs) >= 2 and rs[-1].model_hash == rs[0].model_hash
        and rs[-1].correct_top1 == rs[0].correct_top1 for rs in reports.values()
    )
    detected = (
        len(refused) >= (n_models - 1) * HOSPITALS and all(v <= 1 for v in scored.values())
    )
    return AttackOutcome(
        "eval_counting_oracle", NUMBER, attempted=True, detected=detected,
        by="hospitals " + ", ".join(sorted(hostile.hospitals)),
        how="policy_refused (" + ", ".join(sorted(_rules(refused))) + ")",
        honest_loss="nothing",
        details={"models_sent": n_models, "distinct_models_scored": scored,
                 "reports_per_hospital": {n: len(rs) for n, rs in reports.items()},
                 "cached_answer_for_repeat": same_again, "refusals": _rules(refused)},
    )


SCENARIOS: dict[str, Scenario] = {
    "dp_weaker_noise": dp_weaker_noise,
    "dp_replayed_round": dp_replayed_round,
    "dp_budget_exhausted": dp_budget_exhausted,
    "eval_counting_oracle": eval_counting_oracle,
}
