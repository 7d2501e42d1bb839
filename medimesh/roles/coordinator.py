"""The coordinator's protocol as a sans-IO state machine: envelopes and the clock in, effects out.

:class:`CoordinatorRole` runs the setup round, each federated round (plaintext or secure
aggregation, medimesh.roles.coordinator_secure), retries, DP spending, the evaluation tally,
checkpoints and resume. It never sends, sleeps or reads a clock: its shell (the Ray actor
``medimesh.actors.coordinator``, or a node process) drives it so:

* ``receive(envelope, now)`` for every envelope that arrives (opened and authenticated here);
* ``begin_setup(now)`` / ``begin_round(now)`` / ``begin_final_evaluation(now)`` to start a
  step, then ``tick(now)`` after anything arrived and whenever ``deadline`` passes, until
  ``busy`` is False. ``tick`` moves the protocol on: a phase whose messages are all in, or
  whose deadline passed, closes (or fails) and the next one begins;
* ``sent(type, nbytes, now, error)`` after each :class:`~medimesh.roles.Send` it carried out.

Every method returns the effects to carry out, in order: Send and Record
(medimesh.roles) and the coordinator's own (medimesh.roles.coordinator_effects). The outcome
of a step is an effect too: :class:`SetupDone`, :class:`Failed` (a missed quorum, maybe
retried), :class:`Resumed` or :class:`Refused`. The role never sees a patient row: setup
statistics, deltas (masked under secure aggregation) and evaluation counts are all it gets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from medimesh.aggregation import coordinate_median, flatten, rule_for_round
from medimesh.checkpoint_seal import (
    CheckpointRefused,
    check_not_stale,
    open_checkpoint,
    seal_checkpoint,
)
from medimesh.cross_baselines import CrossBaselines
from medimesh.errors import ConfigError, EnvelopeError, MediMeshError, QuorumNotReached
from medimesh.explain import combine_finding_hists
from medimesh.features import LocalStats, Standardizer, combine_stats
from medimesh.identity import Identity, Roster
from medimesh.model import Model, model_hash
from medimesh.privacy import PrivacyAccountant, PrivacyConfig, dp_aggregate
from medimesh.protocol import (
    MESSAGE_TYPES,
    CrossEvalReport,
    EvalReport,
    ModelPublished,
    RoundStart,
    SecAggMasked,
    SetupRequest,
    SetupResult,
    SetupStats,
    Update,
    Verdicts,
    VerdictsRequest,
    decode,
)
from medimesh.release import release_hash
from medimesh.roles import Record, Send
from medimesh.roles.coordinator_config import (
    CROSS_BASELINES_WAIT_S,
    STATISTICAL_REASONS,
    VERDICT_GRACE_S,
    CoordinatorConfig,
)
from medimesh.roles.coordinator_effects import (
    CoordinatorEffect,
    Failed,
    FlushAudit,
    PublishModel,
    Refused,
    Resumed,
    RoundClosed,
    SaveCheckpoint,
    SetupDone,
    Wait,
)
from medimesh.roles.coordinator_secure import SECURE_SENDS, SecureClose
from medimesh.rounds import EvalTally, RoundMetrics, RoundState, close_round, initial_model
from medimesh.secagg import SecAggError
from medimesh.secagg_round import INBOUND as SECAGG_INBOUND
from medimesh.secagg_round import SecAggRound
from medimesh.server_opt import ServerState, checkpoint_fields, restore_state
from medimesh.setup_checks import Refusal, screen_setup
from medimesh.wire import open_envelope

__all__ = ["CloseResult", "CoordinatorRole"]

CloseResult = tuple[Model, ServerState, list[str], list[str]]
"""(new model, server optimizer state, update digests, verdict digests) of a closed round."""


class CoordinatorRole:
    """One coordinator's protocol state (see the module docstring for how to drive it)."""

    def __init__(self, identity: Identity, roster: Roster, config: CoordinatorConfig) -> None:
        self.identity = identity
        self.cfg = config
        self.roster = roster
        self.hospitals = [m.peer_id for m in roster.with_role("hospital")]
        self.names = {m.peer_id: m.name for m in roster.with_role("hospital")}
        self.validator = roster.with_role("validator")[0].peer_id
        self._rule_info: dict[str, Any] = {}  # which rule closed the last round, and why
        self._setup: dict[str, SetupStats] = {}
        self._cross = CrossBaselines(
            tuple(self.hospitals), config.spec_hash,
            config.cross_baselines and config.privacy is None
            and config.secure_aggregation is None,
        )
        self.committed: dict[str, int] = {}  # training rows, validated at setup
        self._test_sizes: dict[str, int] | None = None  # test rows, validated at setup
        self.model: Model | None = None
        self.model_hash = ""
        self._server_opt = config.server()
        self._server_state: ServerState | None = None  # None until the first server step
        self.standardizer: Standardizer | None = None
        self._prior: np.ndarray = np.zeros(0)
        self._finding_hist: tuple[float, ...] | None = None
        self.round = 0
        self.state: RoundState | None = None
        self._tallies: dict[str, EvalTally] = {}
        self._answered_last: set[str] = set(self.hospitals)  # sent an update last round
        self._pending: dict[int, dict[str, Any]] = {}
        self._eval_bytes: dict[str, int] = {}
        self.secure: SecureClose | None = None  # the secure round in flight, if any
        self.history: list[RoundMetrics] = []
        self.accountant = (
            PrivacyAccountant(config.privacy) if config.privacy is not None else None
        )
        self._refused: str | None = None  # why resume refused the checkpoint: stopped for good
        self._opened: dict[str, Any] | None = None  # the checkpoint being resumed from
        self._wait: Wait | None = None
        self._out: list[CoordinatorEffect] = []
        # The round in flight: start time, phase marks, bytes sent, attempt bookkeeping.
        self._t0 = 0.0
        self.marks: dict[str, float] = {}
        self._bytes_sent = 0
        self.attempt = 0
        self._first_failure = 0.0
        self._retrying = False
        self._setup_deadline = 0.0

    # -- driving ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while a step is in flight: keep calling ``tick`` (by ``deadline`` at the latest)."""
        return self._wait is not None

    @property
    def done(self) -> bool:
        """True when no step is in flight: the last step's outcome is among its effects."""
        return self._wait is None

    @property
    def phase(self) -> str:
        """What the role waits for now ("idle" when no step is in flight)."""
        return "idle" if self._wait is None else self._wait.phase

    @property
    def deadline(self) -> float | None:
        """When ``tick`` must be called next even if nothing arrives (None when idle)."""
        return None if self._wait is None else self._wait.deadline

    def tick(self, now: float) -> list[CoordinatorEffect]:
        """Close every phase that is complete or whose deadline passed, and begin the next."""
        while (w := self._wait) is not None:
            if w.enough is not None and w.enough():
                w.deadline, w.enough = min(w.deadline, now + w.grace_s), None
            if not (w.done() or now >= w.deadline):
                break
            self._wait = None
            w.then(now)
        return self._take()

    def wait(self, wait: Wait) -> None:
        """Begin waiting (used by the phases of medimesh.roles.coordinator_secure)."""
        self._wait = wait

    def emit(self, effect: CoordinatorEffect) -> None:
        self._out.append(effect)

    def record(self, event: str, round_: int, subject: str, body: Mapping[str, Any]) -> None:
        self._out.append(Record(event, round_, subject, dict(body)))

    def _take(self) -> list[CoordinatorEffect]:
        out, self._out = self._out, []
        return out

    def sent(
        self, msg_type: str, nbytes: int, now: float, error: str | None = None
    ) -> list[CoordinatorEffect]:
        """The shell carried out a Send of ``msg_type`` (``nbytes`` sealed bytes), or the
        transport refused it (``error``: lost, as on AXL's 502; deadlines and retries cope)."""
        if error is not None:
            self.record("send_failed", self.round, msg_type, {"error": error})
            nbytes = 0
        if msg_type == RoundStart.TYPE:
            self._bytes_sent += nbytes
            self.marks["broadcast"] = now
        elif msg_type in SECURE_SENDS:
            self._bytes_sent += nbytes
        elif msg_type == ModelPublished.TYPE and self.round in self._pending:
            self._pending[self.round]["bytes_routed"] += nbytes
        return self._take()

    # -- inbound -------------------------------------------------------------------------
    def receive(self, envelope: bytes, now: float) -> list[CoordinatorEffect]:
        """Open, authenticate and take in one envelope; ``tick`` then moves the protocol on."""
        del now  # arrival time does not matter: a round's deadline is checked by ``tick``
        try:
            opened = open_envelope(envelope, self.identity)
        except EnvelopeError as exc:
            self.record("envelope_refused", -1, "", {"reason": type(exc).__name__})
            return self._take()
        h, size = opened.header, len(envelope)
        try:
            if h.type == SetupStats.TYPE and h.sender in self.hospitals:
                self._setup[h.sender] = decode(h.type, opened.payload, SetupStats)
                self._cross.add_own(h.sender, self._setup[h.sender])
            elif h.type == CrossEvalReport.TYPE and h.sender in self.hospitals:
                report = decode(h.type, opened.payload, CrossEvalReport)
                if not self._cross.add_report(h.sender, report):
                    self.record("cross_eval_refused", 0, h.message_id,
                                {"hospital": h.sender, "source": report.source})
            elif h.type == Update.TYPE:
                self._on_update(opened.digest, h.sender, opened.payload, size)
            elif h.type == Verdicts.TYPE and h.sender == self.validator:
                self._on_verdicts(opened.digest, opened.payload, size)
            elif h.type == EvalReport.TYPE:
                self._on_eval(h.sender, decode(h.type, opened.payload, EvalReport), size)
            elif h.type in SECAGG_INBOUND and h.sender in self.hospitals:
                self._on_secagg(h.type, h.sender, opened.digest, opened.payload, size)
            else:
                self.record("unexpected_message", h.round, h.message_id, {"type": h.type})
        except MediMeshError as exc:
            self.record("message_failed", h.round, h.message_id, {"error": str(exc)})
        return self._take()

    def _on_update(self, dig: str, sender: str, payload: bytes, size: int) -> None:
        state = self.state
        if state is None:
            return
        state.bytes_in += size
        try:
            update = decode(Update.TYPE, payload, Update)
        except MediMeshError:
            return  # the validator judges malformed payloads; nothing to aggregate here
        if sender not in self.committed:  # refused at setup, never answered it, not enrolled
            self.record("update_refused", update.round, dig,
                        {"hospital": sender, "reason": "not_admitted_at_setup"})
            return
        # FedAvg weighs by the count validated at setup, never by what the update claims.
        update = dataclasses.replace(update, n_examples=self.committed[sender])
        if not state.add_update(dig, sender, update):
            self.record("late_update", update.round, dig, {"hospital": sender})
            return
        tally = self._tallies.get(update.base_hash)
        if tally is not None and update.round == state.round:
            self._eval_refused(sender, update.base_hash, tally.add_from_update(sender, update))

    def _on_secagg(self, type_: str, sender: str, dig: str, payload: bytes, size: int) -> None:
        """A hospital's secure-aggregation message: kept only in its phase of the open round."""
        msg = decode(type_, payload, MESSAGE_TYPES[type_])
        sc, state = self.secure, self.state
        if state is not None:
            state.bytes_in += size
        if sc is None or not sc.sa.add(sender, msg, dig):
            self.record("late_secagg", getattr(msg, "round", -1), dig, {"type": type_})
            return
        if isinstance(msg, SecAggMasked):  # the base model's evaluation rides along, in clear
            tally = self._tallies.get(msg.base_hash)
            if tally is not None:
                refusal = tally.add_counts(sender, msg.round, msg.base_hash, msg.eval)
                self._eval_refused(sender, msg.base_hash, refusal)

    def _on_eval(self, sender: str, report: EvalReport, size: int) -> None:
        tally = self._tallies.get(report.model_hash)
        if tally is None:
            self.record("late_evaluation", report.round, report.model_hash, {})
            return
        self._eval_refused(sender, report.model_hash, tally.add(sender, report))
        self._eval_bytes[report.model_hash] = self._eval_bytes.get(report.model_hash, 0) + size

    def _eval_refused(self, sender: str, model: str, refusal: Refusal | None) -> None:
        """Audit an evaluation report left out of the published accuracy, and why."""
        if refusal is not None:
            self.record(
                "evaluation_refused", self.round, model,
                {"hospital": sender, "name": self.names.get(sender, sender[:12]),
                 **refusal.to_dict()},
            )

    def _on_verdicts(self, vdig: str, payload: bytes, size: int) -> None:
        batch = decode(Verdicts.TYPE, payload, Verdicts)
        state = self.state
        if state is not None:
            state.bytes_in += size
        for verdict in batch.items:
            if state is None or not state.add_verdict(verdict, vdig):
                self.record("late_verdict", verdict.round, verdict.update_digest,
                            {"hospital": verdict.hospital})

    # -- setup round ----------------------------------------------------------------------
    def check_not_stopped(self) -> None:
        """After a refused checkpoint this run neither continues nor starts over (which would
        spend its privacy budget again): the operator must look at the audit trail."""
        if self._refused is not None:
            raise CheckpointRefused(f"coordinator stopped: {self._refused}")

    def begin_setup(self, now: float) -> list[CoordinatorEffect]:
        """Ask every hospital for its feature statistics; ends in SetupDone or Failed."""
        self.check_not_stopped()
        cfg = self.cfg
        req = SetupRequest(cfg.spec_hash, cfg.n_features, cfg.n_classes, self._cross.enabled)
        self._setup.clear()
        self.record(
            "setup_started", 0, cfg.spec_hash,
            {"hospitals": len(self.hospitals), "run_id": cfg.run_id,
             "cross_baselines": self._cross.enabled},
        )
        self.emit(Send(req, tuple(self.hospitals), 0, wait=True))
        self._setup_deadline = now + cfg.setup_timeout_s
        self.wait(Wait("setup", lambda: len(self._setup) == len(self.hospitals),
                       self._setup_deadline, self._setup_collected))
        return self._take()

    def _setup_collected(self, now: float) -> None:
        cfg = self.cfg
        if not self._setup:
            self.emit(Failed("no hospital answered the setup round"))
            return
        # Only statistics that real rows could produce count (medimesh.setup_checks); a site
        # refused here is left out of the run, by name, and the others go on.
        screen = screen_setup(self._setup, self.hospitals, cfg.n_features, cfg.n_classes,
                              cfg.max_site_examples)
        for pid, refusal in screen.refused.items():
            self.record("setup_refused", 0, pid,
                        {"hospital": pid, "name": self.names[pid], **refusal.to_dict()})
        if not screen.accepted:
            self.emit(FlushAudit())
            self.emit(Failed("no hospital's setup statistics passed the checks"))
            return
        admitted = {h: self._setup[h] for h in screen.accepted}  # roster order
        parts = [  # roster order, so the global statistics do not depend on arrival order
            LocalStats(s.n_examples, s.count, s.total, s.total_sq, s.class_counts)
            for s in admitted.values()
        ]
        standardizer, prior = combine_stats(parts)
        self.standardizer = standardizer
        self.committed = {pid: int(s.n_examples) for pid, s in admitted.items()}
        self._test_sizes = {pid: int(s.n_test) for pid, s in admitted.items()}
        self._finding_hist = combine_finding_hists(
            [(s.finding_hist, s.n_examples) for s in admitted.values()]
        )
        result = SetupResult(cfg.spec_hash, standardizer.mean, standardizer.std, prior)
        self.emit(Send(result, tuple(admitted), 0, wait=True))
        self._prior = prior
        self.model, self.model_hash = initial_model(cfg.n_features, cfg.n_classes, prior)
        self.emit(PublishModel(self.model_hash, 0, "", self.model.weights, self.model.bias,
                               (), ()))
        self._checkpoint()
        answered = list(admitted)
        summary = {
            "run_id": cfg.run_id,
            "hospitals": len(admitted),
            "n_train": int(sum(self.committed.values())),
            "refused": {self.names[p]: r.to_dict() for p, r in screen.refused.items()},
            "initial_model": self.model_hash,
            "cross_baselines": self._cross.enabled,
        }

        def done(now: float) -> None:
            # Each site's isolated model: own_site_* on its own test split, all_sites_* on
            # every site's test patients, like the federated model (None, never NaN).
            full = {**summary, "baselines": self._cross.summary(
                {pid: self.roster.get(pid).name for pid in self.hospitals}
            )}
            self.record("setup_completed", 0, self.model_hash, full)
            self.emit(FlushAudit())
            self.emit(SetupDone(full))

        self.wait(Wait(  # peers' scores of each isolated model, counts only
            "cross_baselines", lambda: self._cross.complete(answered),
            min(self._setup_deadline, now + CROSS_BASELINES_WAIT_S), done,
        ))

    def _setup_result(self) -> SetupResult:
        assert self.standardizer is not None
        std = self.standardizer
        return SetupResult(self.cfg.spec_hash, std.mean, std.std, self._prior)

    # -- checkpoint and resume ------------------------------------------------------------
    def _checkpoint(self) -> None:
        """Persist what a restarted coordinator needs to continue at the next round."""
        assert self.standardizer is not None
        # Arrays travel as arrays (cheap for Ray); the auditor makes them JSON for the store,
        # off the coordinator's critical path.
        state = {
            "run_id": self.cfg.run_id,
            "round": self.round,
            "committed": self.committed,
            **({} if self._test_sizes is None else {"test_sizes": self._test_sizes}),
            "mean": self.standardizer.mean,
            "std": self.standardizer.std,
            "prior": np.asarray(self._prior),
            # Published with the model for the oracle's out-of-distribution check.
            **({} if self._finding_hist is None else {"finding_hist": list(self._finding_hist)}),
            **checkpoint_fields(self._server_opt, self._server_state),
            "pending": {str(k): v for k, v in self._pending.items()},
        }
        if self.accountant is not None:
            state["dp_rounds"] = self.accountant.rounds
        # Signed, so a resume refuses a row the database owner edited (medimesh.checkpoint_seal).
        state = seal_checkpoint(self.identity, self.round, self.model_hash, state)
        self.emit(SaveCheckpoint(self.round, state, self.model_hash))

    def open_checkpoint(
        self, cp: Mapping[str, Any] | None, published: Iterable[Any]
    ) -> list[CoordinatorEffect]:
        """First step of a resume: check the latest checkpoint ``cp`` (the auditor's
        ``latest_checkpoint``) against this coordinator's key and its ``model_published``
        entries (``published``: audit entries). Returns [Record, Refused] if it is refused:
        then the coordinator stops for good. ConfigError if there is none."""
        if cp is None:
            raise ConfigError("no checkpoint to resume from: run setup() first")
        run = self.cfg.run_id
        try:
            st = open_checkpoint(self.identity.peer_id, int(cp["round"]), cp["model_hash"],
                                 cp["state"])
            check_not_stale(int(cp["round"]), [
                e.round for e in published
                if e.actor == self.identity.peer_id and e.body.get("run_id") == run
            ])
        except CheckpointRefused as exc:  # stop, loudly and audited: never resume nor restart
            self._refused = str(exc)
            self.record("checkpoint_refused", int(cp["round"]), cp["model_hash"] or "",
                        {"error": str(exc), "run_id": run})
            self.emit(Refused(str(exc)))
            return self._take()
        self._opened = {"round": int(cp["round"]), "model_hash": cp["model_hash"], "state": st}
        return self._take()

    def resume(self, stored: Mapping[str, Any] | None) -> list[CoordinatorEffect]:
        """Second step: continue from the opened checkpoint with its model ``stored`` (the
        auditor's ``get_model``). Hospitals get the checkpointed standardization again
        (idempotent), so restarted hospitals can rejoin too. Ends in Resumed."""
        cp = self._opened
        if cp is None:
            raise ConfigError("open_checkpoint() first")
        st = cp["state"]
        if stored is None:
            raise ConfigError(f"checkpointed model {cp['model_hash'][:12]}… is not in the store")
        if st.get("run_id", self.cfg.run_id) != self.cfg.run_id:
            raise ConfigError(
                f"checkpoint belongs to run {st.get('run_id')}, not {self.cfg.run_id}"
            )
        self.round = int(cp["round"])
        self.committed = {k: int(v) for k, v in st["committed"].items()}
        sizes = st.get("test_sizes")  # absent in checkpoints from before the setup checks
        self._test_sizes = None if sizes is None else {k: int(v) for k, v in sizes.items()}
        self.standardizer = Standardizer(np.array(st["mean"]), np.array(st["std"]))
        self._prior = np.array(st["prior"])
        hist = st.get("finding_hist")
        self._finding_hist = None if hist is None else tuple(float(v) for v in hist)
        self._server_state = restore_state(self._server_opt, st)
        self._pending = {int(k): v for k, v in st["pending"].items()}
        if self.accountant is not None:  # the budget already spent survives a restart
            self.accountant.rounds = int(st.get("dp_rounds", 0))
        model = Model(np.asarray(stored["weights"]), np.asarray(stored["bias"]))
        if model_hash(model) != cp["model_hash"]:
            raise ConfigError("stored model does not match its checkpointed hash")
        self.model, self.model_hash = model, cp["model_hash"]
        self.history = []
        self.emit(Send(self._setup_result(), tuple(self.committed), self.round, wait=True))
        summary = {"resumed_at_round": self.round, "model_hash": self.model_hash,
                   "run_id": self.cfg.run_id}
        self.record("coordinator_resumed", self.round, self.model_hash, summary)
        self.emit(FlushAudit())
        self.emit(Resumed(summary))
        return self._take()

    # -- federated rounds ------------------------------------------------------------------
    def check_can_run(self, rounds: int) -> None:
        self.check_not_stopped()
        if self.model is None:
            raise ConfigError("run setup() before the first round")
        if rounds < 1:
            raise ConfigError("rounds must be at least 1")

    def check_budget(self) -> list[CoordinatorEffect]:
        """Before a round: empty if one more may run; else the audit of a DP budget that one
        more round would overspend (the run stops there)."""
        self._budget_exhausted()
        return self._take()

    def _budget_exhausted(self) -> bool:
        """True (and audited) if one more DP round would push ε past the budget."""
        acc = self.accountant
        if acc is None or acc.can_spend():
            return False
        p = acc.config
        self.record(
            "privacy_budget_exhausted", self.round, self.model_hash,
            {"epsilon_spent": acc.epsilon, "epsilon_next": acc.next_epsilon(),
             "epsilon_budget": p.epsilon, "delta": p.delta, "dp_rounds": acc.rounds},
        )
        self.emit(FlushAudit())
        return True

    def begin_round(self, now: float) -> list[CoordinatorEffect]:
        """Broadcast the next round's start (or the same round again after a Failed with
        ``retry``). Each RoundStart carries the previous round's published model, and
        hospitals evaluate it before training on it: evaluation of model r rides on round
        r+1. Ends with the model published (and, if the round missed quorum, Failed)."""
        assert self.model is not None
        if not self._retrying:
            self.attempt, self._first_failure = 0, 0.0
        self._retrying = False
        cfg, self._t0 = self.cfg, now
        self.round += 1
        r = self.round
        live = [h for h in self.hospitals if h in self.committed]
        self._resync([h for h in live if h not in self._answered_last], r)
        deadline = now + cfg.round_timeout_s
        state = RoundState(r, self.model, self.model_hash, frozenset(live), deadline,
                           cfg.min_updates, order=tuple(live))
        self.state = state
        tally = self._tallies.setdefault(
            self.model_hash, EvalTally(self.model_hash, frozenset(live), self._test_sizes)
        )
        t = cfg.train
        dp = self.accountant.config if self.accountant is not None else None
        sa = cfg.secure_aggregation
        clip = t.clip_norm if dp is None else dp.clip_norm
        secure: dict[str, Any] = {}
        if sa is not None:
            clip = sa.clip_norm
            secure = {"secagg_threshold": sa.threshold(len(live)), "secagg_clip": clip}
        start = RoundStart(
            r, self.model_hash, deadline, self.model.weights, self.model.bias, t.epochs, t.lr,
            t.l2, t.prox_mu, clip, self.committed, "" if dp is None else dp.mode,
            0.0 if dp is None else dp.z, **secure,
        )
        self.record("round_started", r, self.model_hash,
                    {"hospitals": len(live), "attempt": self.attempt})
        if dp is not None and dp.mode == "local":
            # Local DP: every broadcast makes each hospital release a noisy update, so each
            # attempt (a retried round included) is spent now, published or not.
            self._spend_privacy(r, self.model_hash)
        self.secure = None
        if sa is not None:
            try:  # open before the broadcast: the first advertisements may come back at once
                self.secure = SecureClose(self, SecAggRound.begin(start), sa)
            except SecAggError as exc:
                raise ConfigError(f"secure aggregation cannot run: {exc}") from None
        self.marks, self._bytes_sent = {"prepare": now}, 0
        self.emit(Send(start, (self.validator, *live), r, wait=True))
        if self.secure is not None:
            self.secure.begin(state)
        else:
            self.wait(Wait("updates", lambda: state.complete() and tally.complete(), deadline,
                           self._collected))
        return self._take()

    def _resync(self, hospitals: list[str], r: int) -> None:
        """Send the setup result again to hospitals that missed the last round: a restarted
        hospital lost it with its process (idempotent for the others)."""
        if not hospitals or self.standardizer is None:
            return
        self.emit(Send(self._setup_result(), tuple(hospitals), r, wait=True))
        self.record("setup_resent", r, self.model_hash or "", {"hospitals": hospitals})

    def request_verdicts(self, r: int) -> None:
        """Ask the validator again for the round's verdicts (lost, or still being flushed)."""
        self.emit(Send(VerdictsRequest(r), (self.validator,), r, wait=True))
        self.record("verdicts_requested", r, self.model_hash, {})

    def _collected(self, now: float) -> None:
        """Plaintext round: updates, verdicts and evaluations are in (or the deadline passed)."""
        state = self.state
        assert state is not None
        if state.updates and not state.verdicts:
            # The one message that decides the round is missing: lost on the way (AXL is best
            # effort) or still being flushed on a loaded machine. Ask again, wait a grace.
            self.request_verdicts(state.round)
            grace = min(VERDICT_GRACE_S, self.cfg.round_timeout_s / 2)
            self.wait(Wait("verdicts", lambda: bool(state.verdicts), now + grace,
                           self._plain_close))
        else:
            self._plain_close(now)

    def _plain_close(self, now: float) -> None:
        state = self.state
        assert state is not None
        self.marks["updates_verdicts_evals"] = now
        self._answered_last = {sender for sender, _ in state.updates.values()}
        self.finish_evaluation(state.round - 1)
        parent = self.model_hash
        try:
            result = self._close(state)
        except QuorumNotReached as exc:
            self.round_failed(now, exc)
            return
        self.publish(now, parent, result)

    def masked_in(self, peers: Iterable[str]) -> None:
        """Secure round: the masked inputs are in; their senders answered this round."""
        self._answered_last = set(peers)
        assert self.state is not None
        self.finish_evaluation(self.state.round - 1)

    def round_failed(self, now: float, exc: QuorumNotReached) -> None:
        """Audit a round that missed quorum; retry it from the same base model at least
        ``round_retries`` more times and for at least ``retry_window_s`` (a restart on a
        loaded machine can outlast a few short rounds), unless the DP budget is spent."""
        state = self.state
        assert state is not None
        self.secure = None
        self.record(
            "round_failed", state.round, state.base_hash,
            {"error": str(exc), "attempt": self.attempt,
             "updates": len(state.updates), "verdicts": len(state.verdicts)},
        )
        self.emit(FlushAudit())
        self._first_failure = self._first_failure or now
        spent = self.attempt >= self.cfg.round_retries and (
            now - self._first_failure >= self.cfg.retry_window_s
        )
        if spent or self._budget_exhausted():
            self.emit(Failed(str(exc)))
            return
        self.round -= 1  # the same round number, from the same base model
        self.attempt += 1
        self._retrying = True
        self.emit(Failed(str(exc), retry=True))

    def _close(self, state: RoundState) -> CloseResult:
        """Aggregate with the configured rule; if too few updates survived for it (e.g. Krum
        needs n > 2f + 2), fall back to the coordinate median and say so in the audit trail."""
        cfg = self.cfg
        if self.accountant is not None:
            return self._close_dp(state, self.accountant.config)
        server = self._server_opt
        n = len(state.accepted())
        # Hospitals the validator already excluded on statistics count against f.
        caught = len({
            v.hospital for v, _ in state.verdicts.values()
            if not v.accepted and v.reasons and v.reasons[0] in STATISTICAL_REASONS
        })
        try:
            rule, self._rule_info = rule_for_round(cfg.aggregator, cfg.n_byzantine, caught, n)
            return close_round(state, rule, server, self._server_state)
        except ConfigError as exc:
            state.closed = False
            self._rule_info = {"rule": "median", "fallback_from": cfg.aggregator}
            self.record("aggregation_fallback", state.round, cfg.aggregator, {"reason": str(exc)})
            return close_round(state, coordinate_median, server, self._server_state)

    def _close_dp(self, state: RoundState, dp: PrivacyConfig) -> CloseResult:
        """DP-FedAvg: the example-weighted sum of clipped gradients, noised once (central).

        No robust rule and no statistical scoring here: a data-dependent choice of which
        updates count would break the sensitivity bound (docs/privacy.md).
        """
        acc = state.accepted()
        state.closed = True
        if len(acc) < state.min_updates:
            raise QuorumNotReached(
                f"round {state.round}: {len(acc)} accepted update(s), {state.min_updates} required"
            )
        # Counts are the ones committed at setup (public), never what an update claims.
        vecs = [flatten(u.delta_w, u.delta_b) for _, _, u, _ in acc]
        counts = [self.committed.get(sender, u.n_examples) for _, sender, u, _ in acc]
        agg = dp_aggregate(vecs, counts, dp, state.base, self.cfg.train.l2)
        model, v = self._server_opt.step(state.base, agg, self._server_state)  # FedAvgM (DP lr)
        return model, v, [d for d, _, _, _ in acc], [v_ for _, _, _, v_ in acc]

    def server_step(self, base: Model, agg: np.ndarray) -> tuple[Model, ServerState]:
        """One server optimizer step from ``base`` by the aggregate ``agg`` (secure rounds)."""
        return self._server_opt.step(base, agg, self._server_state)

    def _spend_privacy(self, r: int, subject: str) -> None:
        """Count one DP release and audit ε so far."""
        assert self.accountant is not None
        eps = self.accountant.spend()
        p = self.accountant.config
        self.record(
            "privacy_spent", r, subject,
            {"epsilon": eps, "delta": p.delta, "epsilon_budget": p.epsilon, "mode": p.mode,
             "noise_multiplier": p.z, "clip_norm": p.clip_norm,
             "dp_rounds": self.accountant.rounds, "accountant": p.accountant},
        )

    def publish(self, now: float, parent: str, result: CloseResult,
                extra: Mapping[str, Any] | None = None) -> None:
        """Publish the round's model (signed provenance), account privacy, keep the round's
        metrics until its model is evaluated, and checkpoint."""
        state = self.state
        assert state is not None and self.standardizer is not None
        model, self._server_state, upd_digests, verdict_digests = result
        r, new_hash = state.round, model_hash(model)
        self.model, self.model_hash = model, new_hash
        std, spec = self.standardizer, self.cfg.spec_hash
        published: dict[str, Any] = {
            "parent": parent, "updates": upd_digests, "verdicts": verdict_digests,
            "run_id": self.cfg.run_id,
            # What model_published signs beyond the weights: the hash of the model as the
            # oracle serves it (weights, standardization, spec; medimesh.release).
            "release_hash": release_hash(model, std.mean, std.std, spec), "spec_hash": spec,
            **(extra or {}),
        }
        self.secure = None
        self.record("model_published", r, new_hash, published)
        self.emit(PublishModel(new_hash, r, parent, model.weights, model.bias,
                               tuple(upd_digests), tuple(verdict_digests)))
        self.marks["aggregate"] = now
        reasons = state.rejection_reasons()
        excluded, flagged = state.explain(self.names)
        privacy: dict[str, float] = {}
        if self.accountant is not None:
            if self.accountant.config.mode == "central":
                self._spend_privacy(r, new_hash)
            privacy = {"epsilon": self.accountant.epsilon, "delta": self.accountant.config.delta}
        self._pending[r] = {
            "round": r,
            "model_hash": new_hash,
            "parent_hash": parent,
            "accepted": len(upd_digests),
            "rejected": sum(reasons.values()),
            "reasons": dict(reasons),
            "excluded": excluded,
            "flagged": flagged,
            "aggregation": dict(self._rule_info),
            "late": len(state.late),
            "duration_s": now - self._t0,
            "bytes_routed": self._bytes_sent + state.bytes_in + self._eval_bytes.pop(parent, 0),
            "phases_ms": _phases(self._t0, self.marks),
            **privacy,
        }
        self._checkpoint()
        self.emit(FlushAudit())

    def finish_evaluation(self, r: int) -> None:
        """Merge the evaluation of round r's model into its metrics and publish them."""
        pending = self._pending.pop(r, None)
        if pending is None:
            return
        tally = self._tallies.pop(pending["model_hash"], None)
        ev = tally.summary() if tally is not None else {}
        metrics = RoundMetrics(
            top1=float(ev.get("top1", float("nan"))),
            top3=float(ev.get("top3", float("nan"))),
            loss=float(ev.get("loss", float("nan"))),
            n_eval=int(ev.get("n_eval", 0)),
            evaluated_by=len(tally.reports) if tally is not None else 0,
            **pending,
        )
        self.history.append(metrics)
        self.emit(RoundClosed(metrics))
        self.record("round_closed", r, metrics.model_hash, metrics.to_dict())

    def begin_final_evaluation(self, now: float) -> list[CoordinatorEffect]:
        """Send the last model to be evaluated (no next round will carry it)."""
        assert self.model is not None
        live = [h for h in self.hospitals if h in self.committed]
        tally = self._tallies.setdefault(
            self.model_hash, EvalTally(self.model_hash, frozenset(live), self._test_sizes)
        )
        pub = ModelPublished(
            self.round, self.model_hash, self._pending[self.round]["parent_hash"],
            self.model.weights, self.model.bias, (), (),
        )
        self.emit(Send(pub, tuple(live), self.round, wait=True))

        def done(now: float) -> None:
            self._pending[self.round]["bytes_routed"] += self._eval_bytes.pop(self.model_hash, 0)
            self.finish_evaluation(self.round)
            self._checkpoint()
            self.emit(FlushAudit())

        self.wait(Wait("final_evaluation", tally.complete, now + self.cfg.eval_timeout_s, done))
        return self._take()

    # -- queries -------------------------------------------------------------------------
    def current_model(self) -> dict[str, Any]:
        if self.model is None:
            raise ConfigError("no model yet: run setup() first")
        std = self.standardizer
        return {
            "run_id": self.cfg.run_id,
            "round": self.round,
            "model_hash": self.model_hash,
            "weights": np.array(self.model.weights),
            "bias": np.array(self.model.bias),
            "mean": None if std is None else np.array(std.mean),
            "std": None if std is None else np.array(std.std),
        }

    def metrics(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.history]


def _phases(t0: float, marks: Mapping[str, float]) -> dict[str, float]:
    """Milliseconds spent in each phase of a round, in order."""
    out, prev = {}, t0
    for name, t in marks.items():
        out[name] = round((t - prev) * 1000.0, 3)
        prev = t
    return out
