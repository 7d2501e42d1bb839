"""The coordinator actor: setup round, round timing, aggregation and model publication.

It is a recipient of every update (to aggregate) and of the validator's verdicts (to know
which to use). It never sees a patient row: setup statistics, deltas and evaluation counts
are all it receives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import structlog

from medimesh.actors import telemetry
from medimesh.actors.base import Node
from medimesh.aggregation import DEFAULT as DEFAULT_AGGREGATOR
from medimesh.aggregation import coordinate_median, flatten, make_aggregator, rule_for_round
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
from medimesh.model import Model, TrainConfig, model_hash
from medimesh.privacy import PrivacyAccountant, PrivacyConfig, dp_aggregate
from medimesh.protocol import (
    MESSAGE_TYPES,
    CrossEvalReport,
    EvalReport,
    ModelPublished,
    RoundStart,
    SecAggAdverts,
    SecAggCheckRequest,
    SecAggInbox,
    SecAggMasked,
    SecAggUnmaskRequest,
    SetupRequest,
    SetupResult,
    SetupStats,
    Update,
    Verdicts,
    VerdictsRequest,
    decode,
)
from medimesh.release import release_hash
from medimesh.rounds import (
    EvalTally,
    RoundMetrics,
    RoundState,
    close_round,
    initial_model,
)
from medimesh.runs import UNNAMED_RUN
from medimesh.secagg import SecAggConfig, SecAggError
from medimesh.secagg_round import INBOUND as SECAGG_INBOUND
from medimesh.secagg_round import SecAggRound, b64e
from medimesh.server_opt import (
    DEFAULT_BETA2,
    DEFAULT_TAU,
    FedAvgM,
    ServerOpt,
    ServerState,
    checkpoint_fields,
    make_server_optimizer,
    restore_state,
)
from medimesh.setup_checks import Refusal, screen_setup
from medimesh.wire import open_envelope

__all__ = ["STATISTICAL_REASONS", "Coordinator", "CoordinatorConfig"]

# Verdict reasons from the validator's cross-update scoring (not protocol refusals).
STATISTICAL_REASONS = frozenset(
    {"norm_outlier", "free_rider", "near_duplicate", "opposes_others", "quarantined"}
)

log = structlog.get_logger("medimesh.coordinator")
VERDICT_GRACE_S = 2.0
CROSS_BASELINES_WAIT_S = 10.0  # how long setup waits for peers' cross-site scores
ROUTER_WAIT_S = 60.0  # how long a retry waits for a restarting router


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    n_features: int
    n_classes: int
    spec_hash: str
    train: TrainConfig = field(default_factory=TrainConfig)
    aggregator: str = DEFAULT_AGGREGATOR
    n_byzantine: int = 0
    # Server optimizer (medimesh.server_opt): lr and momentum (β1) None = the rule's default.
    server_optimizer: str = "fedavgm"
    server_lr: float | None = None
    server_momentum: float | None = None
    server_beta2: float = DEFAULT_BETA2
    server_tau: float = DEFAULT_TAU
    min_updates: int = 1
    round_timeout_s: float = 30.0
    eval_timeout_s: float = 10.0
    setup_timeout_s: float = 60.0
    pace_s: float = 0.0  # pause between rounds so people can watch a demo train
    privacy: PrivacyConfig | None = None  # DP-FedAvg (docs/privacy.md); None = no DP
    round_retries: int = 3  # runs of a round that missed quorum (lost messages, restarts)
    retry_window_s: float = 30.0  # ...and keep retrying for at least this long
    # Secure aggregation (docs/privacy.md §4): the coordinator is the SecAgg server and learns
    # only the weighted sum of the deltas; None = plaintext updates.
    secure_aggregation: SecAggConfig | None = None
    run_id: str = UNNAMED_RUN  # the run this coordinator drives (medimesh.runs)
    # Ask hospitals for cross-site baselines at setup (medimesh.cross_baselines); the runtime
    # turns it off under DP and secure aggregation.
    cross_baselines: bool = False
    # The consortium's cap on one site's rows (training + test), on top of the relative rule
    # of medimesh.setup_checks; None = the relative rule only.
    max_site_examples: int | None = None

    def __post_init__(self) -> None:
        make_aggregator(self.aggregator, self.n_byzantine)  # unknown names fail here, early
        self.server()  # ...and so do unknown server optimizers and bad values
        if self.min_updates < 1:
            raise ConfigError("min_updates must be at least 1")

    def server(self) -> ServerOpt:
        """The server optimizer this run steps with. DP keeps FedAvgM with its own lr and
        momentum (docs/privacy.md): the step sizes tuned for noisy clipped gradients differ."""
        if self.privacy is not None:
            if self.server_optimizer != "fedavgm":
                raise ConfigError(
                    "differential privacy steps with FedAvgM (its own server lr and momentum); "
                    f"server optimizer {self.server_optimizer!r} is not wired for DP"
                )
            return FedAvgM(self.privacy.server_lr, self.privacy.server_momentum)
        return make_server_optimizer(
            self.server_optimizer, self.server_lr, self.server_momentum,
            self.server_beta2, self.server_tau,
        )


class Coordinator(Node):
    def __init__(
        self,
        seed: bytes,
        roster_json: str,
        router: Any,
        auditor: Any,
        config: CoordinatorConfig,
    ) -> None:
        super().__init__(seed, roster_json, router, auditor)
        self._cfg = config
        self._hospitals = [m.peer_id for m in self.roster.with_role("hospital")]
        self._names = {m.peer_id: m.name for m in self.roster.with_role("hospital")}
        self._rule_info: dict[str, Any] = {}  # which rule closed the last round, and why
        self._validator = self.roster.with_role("validator")[0].peer_id
        self._setup: dict[str, SetupStats] = {}
        self._cross = CrossBaselines(
            tuple(self._hospitals), config.spec_hash,
            config.cross_baselines and config.privacy is None
            and config.secure_aggregation is None,
        )
        self._committed: dict[str, int] = {}  # training rows, validated at setup
        self._test_sizes: dict[str, int] | None = None  # test rows, validated at setup
        self._model: Model | None = None
        self._model_hash = ""
        self._server_opt = config.server()
        self._server_state: ServerState | None = None  # None until the first server step
        self._standardizer: Standardizer | None = None
        self._prior: np.ndarray = np.zeros(0)
        self._finding_hist: tuple[float, ...] | None = None
        self._round = 0
        self._state: RoundState | None = None
        self._tallies: dict[str, EvalTally] = {}
        self._answered_last: set[str] = set(self._hospitals)  # sent an update last round
        self._pending: dict[int, dict[str, Any]] = {}
        self._eval_bytes: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._sa: SecAggRound | None = None  # the secure round in flight, if any
        self._router_down = False  # a send failed: the router is (re)starting
        self.history: list[RoundMetrics] = []
        self._accountant = (
            PrivacyAccountant(config.privacy) if config.privacy is not None else None
        )
        self._refused: str | None = None  # why resume refused the checkpoint: stopped for good

    async def send_async(self, msg: Any, recipients: list[str], round_: int) -> bytes:
        """Seal and send without blocking the event loop. Only here: a coroutine method on the
        shared Node base would make Ray run every hospital and the validator as async actors
        (about twice the CPU per call)."""
        envelope = self.seal(msg, recipients, round_)
        await self.transport.send_async(envelope)
        return envelope

    # -- inbound -------------------------------------------------------------------------
    async def deliver(self, envelope: bytes) -> None:
        try:
            opened = open_envelope(envelope, self.identity)
        except EnvelopeError as exc:
            self.audit.record("envelope_refused", -1, "", {"reason": type(exc).__name__})
            return
        h = opened.header
        try:
            if h.type == SetupStats.TYPE and h.sender in self._hospitals:
                self._setup[h.sender] = decode(h.type, opened.payload, SetupStats)
                self._cross.add_own(h.sender, self._setup[h.sender])
            elif h.type == CrossEvalReport.TYPE and h.sender in self._hospitals:
                report = decode(h.type, opened.payload, CrossEvalReport)
                if not self._cross.add_report(h.sender, report):
                    self.audit.record("cross_eval_refused", 0, h.message_id,
                                      {"hospital": h.sender, "source": report.source})
            elif h.type == Update.TYPE:
                self._on_update(opened.digest, h.sender, opened.payload, len(envelope))
            elif h.type == Verdicts.TYPE and h.sender == self._validator:
                self._on_verdicts(opened.digest, opened.payload, len(envelope))
            elif h.type == EvalReport.TYPE:
                self._on_eval(h.sender, decode(h.type, opened.payload, EvalReport), len(envelope))
            elif h.type in SECAGG_INBOUND and h.sender in self._hospitals:
                self._on_secagg(h.type, h.sender, opened.digest, opened.payload, len(envelope))
            else:
                self.audit.record("unexpected_message", h.round, h.message_id, {"type": h.type})
        except MediMeshError as exc:
            self.audit.record("message_failed", h.round, h.message_id, {"error": str(exc)})
        self._wake.set()
        self.maybe_flush()

    def _on_update(self, dig: str, sender: str, payload: bytes, size: int) -> None:
        state = self._state
        if state is None:
            return
        state.bytes_in += size
        try:
            update = decode(Update.TYPE, payload, Update)
        except MediMeshError:
            return  # the validator judges malformed payloads; nothing to aggregate here
        if sender not in self._committed:  # refused at setup (or never answered it)
            self.audit.record("update_refused", update.round, dig,
                              {"hospital": sender, "reason": "not_admitted_at_setup"})
            return
        # FedAvg weighs by the count validated at setup, never by what the update claims.
        update = dataclasses.replace(update, n_examples=self._committed[sender])
        if not state.add_update(dig, sender, update):
            self.audit.record("late_update", update.round, dig, {"hospital": sender})
            return
        tally = self._tallies.get(update.base_hash)
        if tally is not None and update.round == state.round:
            self._eval_refused(sender, update.base_hash, tally.add_from_update(sender, update))

    def _on_secagg(self, type_: str, sender: str, dig: str, payload: bytes, size: int) -> None:
        """A hospital's secure-aggregation message: kept only in its phase of the open round."""
        msg = decode(type_, payload, MESSAGE_TYPES[type_])
        sa, state = self._sa, self._state
        if state is not None:
            state.bytes_in += size
        if sa is None or not sa.add(sender, msg, dig):
            self.audit.record("late_secagg", getattr(msg, "round", -1), dig, {"type": type_})
            return
        if isinstance(msg, SecAggMasked):  # the base model's evaluation rides along, in clear
            tally = self._tallies.get(msg.base_hash)
            if tally is not None:
                refusal = tally.add_counts(sender, msg.round, msg.base_hash, msg.eval)
                self._eval_refused(sender, msg.base_hash, refusal)

    def _on_eval(self, sender: str, report: EvalReport, size: int) -> None:
        tally = self._tallies.get(report.model_hash)
        if tally is None:
            self.audit.record("late_evaluation", report.round, report.model_hash, {})
            return
        self._eval_refused(sender, report.model_hash, tally.add(sender, report))
        self._eval_bytes[report.model_hash] = self._eval_bytes.get(report.model_hash, 0) + size

    def _eval_refused(self, sender: str, model: str, refusal: Refusal | None) -> None:
        """Audit an evaluation report left out of the published accuracy, and why."""
        if refusal is not None:
            self.audit.record(
                "evaluation_refused", self._round, model,
                {"hospital": sender, "name": self._names.get(sender, sender[:12]),
                 **refusal.to_dict()},
            )

    def _on_verdicts(self, vdig: str, payload: bytes, size: int) -> None:
        batch = decode(Verdicts.TYPE, payload, Verdicts)
        state = self._state
        if state is not None:
            state.bytes_in += size
        for verdict in batch.items:
            if state is None or not state.add_verdict(verdict, vdig):
                self.audit.record(
                    "late_verdict",
                    verdict.round,
                    verdict.update_digest,
                    {"hospital": verdict.hospital},
                )

    async def _wait(self, done: Any, deadline: float) -> bool:
        while not done():
            left = deadline - time.time()
            if left <= 0:
                return False
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=left)
            except TimeoutError:
                return bool(done())
        return True

    # -- setup round ----------------------------------------------------------------------
    async def setup(self) -> dict[str, Any]:
        self._stopped_by_refusal()
        cfg = self._cfg
        req = SetupRequest(cfg.spec_hash, cfg.n_features, cfg.n_classes, self._cross.enabled)
        self._setup.clear()
        self.audit.record(
            "setup_started", 0, cfg.spec_hash,
            {"hospitals": len(self._hospitals), "run_id": cfg.run_id,
             "cross_baselines": self._cross.enabled},
        )
        await self.send_async(req, self._hospitals, 0)
        deadline = time.time() + cfg.setup_timeout_s
        await self._wait(lambda: len(self._setup) == len(self._hospitals), deadline)
        if not self._setup:
            raise QuorumNotReached("no hospital answered the setup round")
        # Only statistics that real rows could produce count (medimesh.setup_checks); a site
        # refused here is left out of the run, by name, and the others go on.
        screen = screen_setup(self._setup, self._hospitals, cfg.n_features, cfg.n_classes,
                              cfg.max_site_examples)
        for pid, refusal in screen.refused.items():
            self.audit.record("setup_refused", 0, pid,
                              {"hospital": pid, "name": self._names[pid], **refusal.to_dict()})
        if not screen.accepted:
            self.flush_audit()
            raise QuorumNotReached("no hospital's setup statistics passed the checks")
        admitted = {h: self._setup[h] for h in screen.accepted}  # roster order
        parts = [  # roster order, so the global statistics do not depend on arrival order
            LocalStats(s.n_examples, s.count, s.total, s.total_sq, s.class_counts)
            for s in admitted.values()
        ]
        standardizer, prior = combine_stats(parts)
        self._standardizer = standardizer
        self._committed = {pid: int(s.n_examples) for pid, s in admitted.items()}
        self._test_sizes = {pid: int(s.n_test) for pid, s in admitted.items()}
        self._finding_hist = combine_finding_hists(
            [(s.finding_hist, s.n_examples) for s in admitted.values()]
        )
        result = SetupResult(cfg.spec_hash, standardizer.mean, standardizer.std, prior)
        await self.send_async(result, list(admitted), 0)
        self._prior = prior
        self._model, self._model_hash = initial_model(cfg.n_features, cfg.n_classes, prior)
        self._auditor.record_model.remote(
            self._model_hash, 0, "", self._model.weights, self._model.bias, [], []
        )
        self._checkpoint()
        answered = list(admitted)
        await self._wait(  # peers' scores of each isolated model, counts only
            lambda: self._cross.complete(answered),
            min(deadline, time.time() + CROSS_BASELINES_WAIT_S),
        )
        summary = {
            "run_id": cfg.run_id,
            "hospitals": len(admitted),
            "n_train": int(sum(self._committed.values())),
            "refused": {self._names[p]: r.to_dict() for p, r in screen.refused.items()},
            "initial_model": self._model_hash,
            "cross_baselines": self._cross.enabled,
            # Each site's isolated model: own_site_* on its own test split, all_sites_* on
            # every site's test patients, like the federated model (None, never NaN).
            "baselines": self._cross.summary(
                {pid: self.roster.get(pid).name for pid in self._hospitals}
            ),
        }
        self.audit.record("setup_completed", 0, self._model_hash, summary)
        self.flush_audit()
        return summary

    def _checkpoint(self) -> None:
        """Persist what a restarted coordinator needs to continue at the next round."""
        assert self._standardizer is not None
        # Arrays travel as arrays (cheap for Ray); the auditor makes them JSON for the store,
        # off the coordinator's critical path.
        state = {
            "run_id": self._cfg.run_id,
            "round": self._round,
            "committed": self._committed,
            **({} if self._test_sizes is None else {"test_sizes": self._test_sizes}),
            "mean": self._standardizer.mean,
            "std": self._standardizer.std,
            "prior": np.asarray(self._prior),
            # Published with the model for the oracle's out-of-distribution check.
            **({} if self._finding_hist is None else {"finding_hist": list(self._finding_hist)}),
            **checkpoint_fields(self._server_opt, self._server_state),
            "pending": {str(k): v for k, v in self._pending.items()},
        }
        if self._accountant is not None:
            state["dp_rounds"] = self._accountant.rounds
        # Signed, so a resume refuses a row the database owner edited (medimesh.checkpoint_seal).
        state = seal_checkpoint(self.identity, self._round, self._model_hash, state)
        self._auditor.save_checkpoint.remote(self._round, state, self._model_hash)

    async def resume(self) -> dict[str, Any]:
        """Continue from the latest checkpoint (after a coordinator crash) instead of setup().

        The model comes from the store by hash; hospitals get the checkpointed standardization
        again (idempotent), so restarted hospitals can rejoin too.
        """
        cp = await self._auditor.latest_checkpoint.remote()
        if cp is None:
            raise ConfigError("no checkpoint to resume from: run setup() first")
        try:
            st = open_checkpoint(self.peer_id, int(cp["round"]), cp["model_hash"], cp["state"])
            mine = await self._auditor.entries.remote("model_published")
            check_not_stale(int(cp["round"]), [
                e.round for e in mine
                if e.actor == self.peer_id and e.body.get("run_id") == self._cfg.run_id
            ])
        except CheckpointRefused as exc:  # stop, loudly and audited: never resume nor restart
            self._refused = str(exc)
            self.audit.record("checkpoint_refused", int(cp["round"]), cp["model_hash"] or "",
                              {"error": str(exc), "run_id": self._cfg.run_id})
            await self.sync_audit()
            raise
        stored = await self._auditor.get_model.remote(cp["model_hash"])
        if stored is None:
            raise ConfigError(f"checkpointed model {cp['model_hash'][:12]}… is not in the store")
        if st.get("run_id", self._cfg.run_id) != self._cfg.run_id:
            raise ConfigError(
                f"checkpoint belongs to run {st.get('run_id')}, not {self._cfg.run_id}"
            )
        self._round = int(cp["round"])
        self._committed = {k: int(v) for k, v in st["committed"].items()}
        sizes = st.get("test_sizes")  # absent in checkpoints from before the setup checks
        self._test_sizes = None if sizes is None else {k: int(v) for k, v in sizes.items()}
        self._standardizer = Standardizer(np.array(st["mean"]), np.array(st["std"]))
        self._prior = np.array(st["prior"])
        hist = st.get("finding_hist")
        self._finding_hist = None if hist is None else tuple(float(v) for v in hist)
        self._server_state = restore_state(self._server_opt, st)
        self._pending = {int(k): v for k, v in st["pending"].items()}
        if self._accountant is not None:  # the budget already spent survives a restart
            self._accountant.rounds = int(st.get("dp_rounds", 0))
        model = Model(np.asarray(stored["weights"]), np.asarray(stored["bias"]))
        if model_hash(model) != cp["model_hash"]:
            raise ConfigError("stored model does not match its checkpointed hash")
        self._model, self._model_hash = model, cp["model_hash"]
        self.history = []
        result = SetupResult(
            self._cfg.spec_hash, self._standardizer.mean, self._standardizer.std, self._prior
        )
        await self.send_async(result, list(self._committed), self._round)
        summary = {"resumed_at_round": self._round, "model_hash": self._model_hash,
                   "run_id": self._cfg.run_id}
        self.audit.record("coordinator_resumed", self._round, self._model_hash, summary)
        self.flush_audit()
        return summary

    def _stopped_by_refusal(self) -> None:
        """After a refused checkpoint this run neither continues nor starts over (which would
        spend its privacy budget again): the operator must look at the audit trail."""
        if self._refused is not None:
            raise CheckpointRefused(f"coordinator stopped: {self._refused}")

    async def sync_audit(self) -> int:  # type: ignore[override]
        """Async twin of Node.sync_audit: an async actor must not block its event loop."""
        self._reclaim()
        events = self.audit.drain()
        if events and self._auditor is not None:
            try:
                await self._auditor.append.remote(events)
            except BaseException:
                self.audit.restore(events)  # kept for the next flush, never dropped
                raise
        return len(events)

    # -- federated rounds ------------------------------------------------------------------
    async def run(self, rounds: int) -> list[dict[str, Any]]:
        """Run ``rounds`` rounds back to back, then a final evaluation; returns the history.

        Each RoundStart carries the previous round's published model, and hospitals evaluate
        it before training on it: one broadcast serves both, so evaluation of model r rides on
        round r+1 and a round costs three message hops, not five.
        """
        self._stopped_by_refusal()
        if self._model is None:
            raise ConfigError("run setup() before the first round")
        if rounds < 1:
            raise ConfigError("rounds must be at least 1")
        ran = 0
        for i in range(rounds):
            if self._budget_exhausted():
                break
            if i and self._cfg.pace_s > 0:
                await asyncio.sleep(self._cfg.pace_s)
            await self._round_with_retries()
            ran += 1
        if ran:
            await self._final_evaluation()
        return self.metrics()

    def _budget_exhausted(self) -> bool:
        """True (and audited) if one more DP round would push ε past the budget."""
        acc = self._accountant
        if acc is None or acc.can_spend():
            return False
        p = acc.config
        self.audit.record(
            "privacy_budget_exhausted",
            self._round,
            self._model_hash,
            {"epsilon_spent": acc.epsilon, "epsilon_next": acc.next_epsilon(),
             "epsilon_budget": p.epsilon, "delta": p.delta, "dp_rounds": acc.rounds},
        )
        self.flush_audit()
        return True

    async def _round_with_retries(self) -> None:
        """One round; if it misses quorum (messages lost, a validator or router restarting),
        run it again from the same base model: at least ``round_retries`` more times, and for
        at least ``retry_window_s`` (a restart on a loaded machine can outlast a few short
        rounds)."""
        attempt, first_failure = 0, 0.0
        while True:
            try:
                await self._one_round(attempt)
                return
            except QuorumNotReached:
                now = time.monotonic()
                first_failure = first_failure or now
                spent = attempt >= self._cfg.round_retries and (
                    now - first_failure >= self._cfg.retry_window_s
                )
                if spent or self._budget_exhausted():
                    raise
                self._round -= 1  # the same round number, from the same base model
                attempt += 1
                if self._router_down:  # restarting: retrying before it is back would be wasted
                    self._router_down = False
                    await self.transport.wait_ready(ROUTER_WAIT_S)

    async def _send_lossy(self, msg: Any, recipients: list[str], r: int) -> bytes:
        """Send within a round: a router that is restarting loses the message (AXL's 502), and
        the round's deadline and retry cope with it, as with any lost message."""
        try:
            return await self.send_async(msg, recipients, r)
        except ray.exceptions.RayActorError as exc:
            self.audit.record("send_failed", r, msg.TYPE, {"error": type(exc).__name__})
            self._router_down = True
            return b""

    async def _resync(self, hospitals: list[str], r: int) -> None:
        """Send the setup result again to hospitals that missed the last round: a restarted
        hospital actor lost it with its process (idempotent for the others)."""
        if not hospitals or self._standardizer is None or self._prior is None:
            return
        result = SetupResult(
            self._cfg.spec_hash, self._standardizer.mean, self._standardizer.std, self._prior
        )
        await self._send_lossy(result, hospitals, r)
        self.audit.record("setup_resent", r, self._model_hash or "", {"hospitals": hospitals})

    async def _one_round(self, attempt: int = 0) -> None:
        assert self._model is not None
        cfg, t0 = self._cfg, time.perf_counter()
        self._round += 1
        r = self._round
        live = [h for h in self._hospitals if h in self._committed]
        await self._resync([h for h in live if h not in self._answered_last], r)
        deadline = time.time() + cfg.round_timeout_s
        state = RoundState(
            r, self._model, self._model_hash, frozenset(live), deadline, cfg.min_updates,
            order=tuple(live),
        )
        self._state = state
        tally = self._tallies.setdefault(
            self._model_hash, EvalTally(self._model_hash, frozenset(live), self._test_sizes)
        )
        t = cfg.train
        dp = self._accountant.config if self._accountant is not None else None
        sa = cfg.secure_aggregation
        clip = t.clip_norm if dp is None else dp.clip_norm
        secure: dict[str, Any] = {}
        if sa is not None:
            clip = sa.clip_norm
            secure = {"secagg_threshold": sa.threshold(len(live)), "secagg_clip": clip}
        start = RoundStart(
            r,
            self._model_hash,
            deadline,
            self._model.weights,
            self._model.bias,
            t.epochs,
            t.lr,
            t.l2,
            t.prox_mu,
            clip,
            self._committed,
            "" if dp is None else dp.mode,
            0.0 if dp is None else dp.z,
            **secure,
        )
        self.audit.record(
            "round_started", r, self._model_hash, {"hospitals": len(live), "attempt": attempt}
        )
        if dp is not None and dp.mode == "local":
            # Local DP: every broadcast makes each hospital release a noisy update, so each
            # attempt (a retried round included) is spent now, published or not.
            self._spend_privacy(r, self._model_hash)
        if sa is not None:
            try:  # open before the broadcast: the first advertisements may come back at once
                self._sa = SecAggRound.begin(start)
            except SecAggError as exc:
                raise ConfigError(f"secure aggregation cannot run: {exc}") from None
        marks = {"prepare": time.perf_counter()}
        env = await self._send_lossy(start, [self._validator, *live], r)
        bytes_routed = len(env)
        marks["broadcast"] = time.perf_counter()
        if self._sa is not None:
            parent = self._model_hash
            (model, self._server_state, upd_digests, verdict_digests), sent = (
                await self._secure_close(state, attempt, marks)
            )
            bytes_routed += sent
        else:
            parent, (model, self._server_state, upd_digests, verdict_digests) = (
                await self._plain_close(state, tally, attempt, deadline, marks)
            )
        new_hash = model_hash(model)
        self._model, self._model_hash = model, new_hash
        published: dict[str, Any] = {
            "parent": parent, "updates": upd_digests, "verdicts": verdict_digests,
            "run_id": cfg.run_id, **self._release(model),
        }
        if self._sa is not None:
            published["secure_aggregation"] = self._sa_summary(self._sa)
            self._sa = None
        self.audit.record("model_published", r, new_hash, published)
        self._auditor.record_model.remote(
            new_hash, r, parent, model.weights, model.bias, upd_digests, verdict_digests
        )
        marks["aggregate"] = time.perf_counter()
        self._after_publish(state, r, t0, parent, new_hash, upd_digests, bytes_routed, marks)

    def _release(self, model: Model) -> dict[str, str]:
        """What model_published signs beyond the weights: the hash of the model as the oracle
        serves it (weights, standardization, spec; medimesh.release)."""
        std = self._standardizer
        assert std is not None
        spec = self._cfg.spec_hash
        return {"release_hash": release_hash(model, std.mean, std.std, spec), "spec_hash": spec}

    async def _plain_close(
        self, state: RoundState, tally: EvalTally, attempt: int, deadline: float,
        marks: dict[str, float],
    ) -> tuple[str, tuple[Model, ServerState, list[str], list[str]]]:
        """Plaintext round: wait for updates, verdicts and evaluations, then aggregate."""
        cfg, r = self._cfg, state.round
        await self._wait(lambda: state.complete() and tally.complete(), deadline)
        if state.updates and not state.verdicts:
            # The one message that decides the round is missing: lost on the way (AXL is best
            # effort) or still being flushed on a loaded machine. Ask again, wait a grace.
            await self._send_lossy(VerdictsRequest(r), [self._validator], r)
            self.audit.record("verdicts_requested", r, self._model_hash, {})
            grace = min(VERDICT_GRACE_S, cfg.round_timeout_s / 2)
            await self._wait(lambda: bool(state.verdicts), time.time() + grace)
        marks["updates_verdicts_evals"] = time.perf_counter()
        self._answered_last = {sender for sender, _ in state.updates.values()}
        self._finish_evaluation(r - 1)
        parent = self._model_hash
        try:
            return parent, self._close(state)
        except QuorumNotReached as exc:
            self._round_failed(state, parent, attempt, exc)
            raise

    async def _phase(
        self, count: Callable[[], int], want: int, need: int, deadline: float, grace: bool = True
    ) -> None:
        """Wait for all ``want`` answers until ``deadline``; once ``need`` (the threshold) are
        in, only ``grace_s`` more: one slow or vanished hospital must not stall the round."""
        sa = self._cfg.secure_aggregation
        assert sa is not None
        await self._wait(lambda: count() >= (min(want, need) if grace else want), deadline)
        if count() < want and grace:
            await self._wait(lambda: count() >= want, min(deadline, time.time() + sa.grace_s))

    async def _secure_close(
        self, state: RoundState, attempt: int, marks: dict[str, float]
    ) -> tuple[tuple[Model, ServerState, list[str], list[str]], int]:
        """Secure round: the SecAgg phases (consistency check included) through the router, then
        one server step.

        Returns the close result and the bytes this side sent. Only masked vectors and public
        counts are ever held here; too few hospitals in any phase is a QuorumNotReached (the
        round is retried with fresh keys), never a wrong sum.
        """
        sa, cfg = self._sa, self._cfg
        sac = cfg.secure_aggregation
        assert sa is not None and sac is not None
        r, parent, t = state.round, self._model_hash, sa.params.threshold
        sent = 0

        async def send(msg: Any, to: list[str]) -> None:
            nonlocal sent
            sent += len(await self._send_lossy(msg, to, r))

        try:
            # Phase 0 (train, then advertise): everyone, until the round's deadline.
            await self._phase(lambda: len(sa.adverts), len(sa.params.peers), t,
                              state.deadline, grace=False)
            blob = sa.close_adverts()
            await send(SecAggAdverts(r, b64e(blob)), list(sa.advertisers))
            marks["advertise"] = time.perf_counter()
            phase_end = time.time() + sac.phase_timeout_s
            await self._phase(lambda: len(sa.shares), len(sa.advertisers), t, phase_end)
            inboxes = sa.close_shares()
            await asyncio.gather(*(send(SecAggInbox(r, box), [v]) for v, box in inboxes.items()))
            marks["share_keys"] = time.perf_counter()
            phase_end = time.time() + sac.phase_timeout_s
            await self._phase(lambda: len(sa.masked), len(sa.u2), t, phase_end)
            self._answered_last = set(sa.masked)
            self._finish_evaluation(r - 1)
            await self._await_verdicts(state, {d for d, _ in sa.masked.values()})
            accepted = set()
            for peer, (dig, _) in sa.masked.items():
                verdict = state.verdicts.get(dig)
                if verdict is not None and verdict[0].accepted and verdict[0].hospital == peer:
                    accepted.add(peer)
            survivors = sa.close_masked(accepted)
            # Consistency check (Bonawitz et al.): survivors sign U3 before revealing shares.
            await send(SecAggCheckRequest(r, survivors), list(survivors))
            marks["masked_input"] = time.perf_counter()
            phase_end = time.time() + sac.phase_timeout_s
            await self._phase(lambda: len(sa.checks), len(survivors), t, phase_end)
            signed = sa.close_check()
            await send(SecAggUnmaskRequest(r, survivors, signed), list(sa.signers))
            marks["consistency"] = time.perf_counter()
            phase_end = time.time() + sac.phase_timeout_s
            await self._phase(lambda: len(sa.answers), len(sa.signers), t, phase_end)
            state.closed = True
            if len(survivors) < state.min_updates:
                raise QuorumNotReached(
                    f"round {r}: {len(survivors)} masked update(s), {state.min_updates} required"
                )
            agg = sa.aggregate()
            if sa.sum_check is not None and sa.sum_check.clamped:
                self.audit.record("secagg_sum_out_of_bounds", r, parent, sa.sum_check.to_dict())
            marks["unmask"] = time.perf_counter()
        except (SecAggError, QuorumNotReached) as exc:
            self._sa = None
            state.closed = True
            failure = exc if isinstance(exc, QuorumNotReached) else QuorumNotReached(
                f"round {r}: secure aggregation failed: {exc}"
            )
            self._round_failed(state, parent, attempt, failure)
            raise failure from None
        model, server_state = self._server_opt.step(state.base, agg, self._server_state)
        upd = [sa.masked[p][0] for p in survivors]
        verdicts = [state.verdicts[d][1] for d in upd]
        return (model, server_state, upd, verdicts), sent

    async def _await_verdicts(self, state: RoundState, digests: set[str]) -> None:
        """The validator's verdicts on the masked updates; asked for again once if missing."""
        sac = self._cfg.secure_aggregation
        assert sac is not None
        r = state.round
        if not await self._wait(lambda: digests <= set(state.verdicts), time.time() + sac.grace_s):
            await self._send_lossy(VerdictsRequest(r), [self._validator], r)
            self.audit.record("verdicts_requested", r, self._model_hash, {})
            await self._wait(lambda: digests <= set(state.verdicts), time.time() + VERDICT_GRACE_S)

    @staticmethod
    def _sa_summary(sa: SecAggRound) -> dict[str, Any]:
        """What the audit trail records of a secure round: who, how many, never values."""
        return {
            "threshold": sa.params.threshold,
            "peers": len(sa.params.peers),
            "advertised": len(sa.advertisers),
            "shared_keys": len(sa.u2),
            "masked": len(sa.masked),
            "summed": len(sa.survivors),
            "answered_unmask": len(sa.answers),
            "dropped_after_masking": len(sa.survivors) - len(sa.answers),
            "quantizer_bits": sa.params.quantizer.bits,
            "clip": sa.params.quantizer.clip,
            "signed_survivors": len(sa.signers),
            "sum_check": None if sa.sum_check is None else sa.sum_check.to_dict(),
        }

    def _round_failed(
        self, state: RoundState, parent: str, attempt: int, exc: QuorumNotReached
    ) -> None:
        self.audit.record(
            "round_failed", state.round, parent,
            {"error": str(exc), "attempt": attempt,
             "updates": len(state.updates), "verdicts": len(state.verdicts)},
        )
        self.flush_audit()

    def _after_publish(
        self, state: RoundState, r: int, t0: float, parent: str, new_hash: str,
        upd_digests: list[str], bytes_routed: int, marks: dict[str, float],
    ) -> None:
        """Privacy accounting, the round's pending metrics and the checkpoint."""
        reasons = state.rejection_reasons()
        excluded, flagged = state.explain(self._names)
        privacy: dict[str, float] = {}
        if self._accountant is not None:
            if self._accountant.config.mode == "central":
                self._spend_privacy(r, new_hash)
            privacy = {"epsilon": self._accountant.epsilon, "delta": self._accountant.config.delta}
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
            "duration_s": time.perf_counter() - t0,
            "bytes_routed": bytes_routed + state.bytes_in + self._eval_bytes.pop(parent, 0),
            "phases_ms": _phases(t0, marks),
            **privacy,
        }
        self._checkpoint()
        self.flush_audit()

    def _close(
        self, state: RoundState
    ) -> tuple[Model, ServerState, list[str], list[str]]:
        """Aggregate with the configured rule; if too few updates survived for it (e.g. Krum
        needs n > 2f + 2), fall back to the coordinate median and say so in the audit trail."""
        cfg = self._cfg
        if self._accountant is not None:
            return self._close_dp(state, self._accountant.config)
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
            self.audit.record(
                "aggregation_fallback", state.round, cfg.aggregator, {"reason": str(exc)}
            )
            return close_round(state, coordinate_median, server, self._server_state)

    def _spend_privacy(self, r: int, subject: str) -> None:
        """Count one DP release and audit ε so far."""
        assert self._accountant is not None
        eps = self._accountant.spend()
        p = self._accountant.config
        self.audit.record(
            "privacy_spent",
            r,
            subject,
            {"epsilon": eps, "delta": p.delta, "epsilon_budget": p.epsilon, "mode": p.mode,
             "noise_multiplier": p.z, "clip_norm": p.clip_norm,
             "dp_rounds": self._accountant.rounds, "accountant": p.accountant},
        )

    def _close_dp(
        self, state: RoundState, dp: PrivacyConfig
    ) -> tuple[Model, ServerState, list[str], list[str]]:
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
        counts = [self._committed.get(sender, u.n_examples) for _, sender, u, _ in acc]
        agg = dp_aggregate(vecs, counts, dp, state.base, self._cfg.train.l2)
        model, v = self._server_opt.step(state.base, agg, self._server_state)  # FedAvgM (DP lr)
        return model, v, [d for d, _, _, _ in acc], [v_ for _, _, _, v_ in acc]

    def _finish_evaluation(self, r: int) -> None:
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
        self._auditor.record_round.remote(r, metrics.to_dict(), metrics.model_hash)
        self.audit.record("round_closed", r, metrics.model_hash, metrics.to_dict())
        telemetry.record_round(metrics.to_dict())
        self._progress.set()

    async def _final_evaluation(self) -> None:
        """Evaluate the last model (no next round will carry it)."""
        assert self._model is not None
        live = [h for h in self._hospitals if h in self._committed]
        tally = self._tallies.setdefault(
            self._model_hash, EvalTally(self._model_hash, frozenset(live), self._test_sizes)
        )
        pub = ModelPublished(
            self._round, self._model_hash, self._pending[self._round]["parent_hash"],
            self._model.weights, self._model.bias, (), (),
        )
        env = await self._send_lossy(pub, live, self._round)
        self._pending[self._round]["bytes_routed"] += len(env)
        await self._wait(tally.complete, time.time() + self._cfg.eval_timeout_s)
        self._pending[self._round]["bytes_routed"] += self._eval_bytes.pop(self._model_hash, 0)
        self._finish_evaluation(self._round)
        self._checkpoint()
        self.flush_audit()

    async def wait_metrics(self, after: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Block until metrics of a round later than ``after`` exist (for live progress)."""
        deadline = time.time() + timeout_s
        while not any(m.round > after for m in self.history) and time.time() < deadline:
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), timeout=deadline - time.time())
            except TimeoutError:
                break
        return [m.to_dict() for m in self.history if m.round > after]

    # -- queries -------------------------------------------------------------------------
    def current_model(self) -> dict[str, Any]:
        if self._model is None:
            raise ConfigError("no model yet: run setup() first")
        std = self._standardizer
        return {
            "run_id": self._cfg.run_id,
            "round": self._round,
            "model_hash": self._model_hash,
            "weights": np.array(self._model.weights),
            "bias": np.array(self._model.bias),
            "mean": None if std is None else np.array(std.mean),
            "std": None if std is None else np.array(std.std),
        }

    def metrics(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.history]


def _phases(t0: float, marks: dict[str, float]) -> dict[str, float]:
    """Milliseconds spent in each phase of a round, in order."""
    out, prev = {}, t0
    for name, t in marks.items():
        out[name] = round((t - prev) * 1000.0, 3)
        prev = t
    return out
