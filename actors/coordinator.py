"""The coordinator actor: the Ray shell around :class:`~medimesh.roles.coordinator.CoordinatorRole`.

The protocol (setup round, round timing, retries, plaintext and secure closes, DP spend,
evaluation tally, checkpoints and resume) lives in the role. This shell feeds it what the
router delivers, ticks it when something arrived or its deadline passed, and carries out
its effects: sends through the router, audit events, and the auditor's models, rounds and
checkpoints. It never sees a patient row: setup statistics, deltas and evaluation counts
are all the role receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import ray

from medimesh.actors import telemetry
from medimesh.actors.base import Node
from medimesh.checkpoint_seal import CheckpointRefused
from medimesh.errors import QuorumNotReached
from medimesh.roles import Record, Send, SendRaw
from medimesh.roles.coordinator import CoordinatorRole
from medimesh.roles.coordinator_config import STATISTICAL_REASONS, CoordinatorConfig
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
)
from medimesh.rounds import RoundMetrics

__all__ = ["STATISTICAL_REASONS", "Coordinator", "CoordinatorConfig"]

ROUTER_WAIT_S = 60.0  # how long a retry waits for a restarting router


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
        self.role = CoordinatorRole(self.identity, self.roster, config)
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._router_down = False  # a send failed: the router is (re)starting

    @property
    def history(self) -> list[RoundMetrics]:
        return self.role.history

    async def send_async(self, msg: Any, recipients: list[str], round_: int) -> bytes:
        """Seal and send without blocking the event loop. Only here: a coroutine method on the
        shared Node base would make Ray run every hospital and the validator as async actors
        (about twice the CPU per call)."""
        envelope = self.seal(msg, recipients, round_)
        await self.transport.send_async(envelope)
        return envelope

    # -- carrying out the role's effects ----------------------------------------------------
    async def _send(self, e: Send, lossy: bool) -> None:
        """Within a round a router that is restarting loses the message (AXL's 502), and the
        round's deadline and retry cope with it, as with any lost message; in setup and
        resume the error propagates."""
        try:
            env = await self.send_async(e.msg, list(e.to), e.round)
        except ray.exceptions.RayActorError as exc:
            if not lossy:
                raise
            self._router_down = True
            await self._carry(self.role.sent(e.msg.TYPE, 0, time.time(), type(exc).__name__))
            return
        await self._carry(self.role.sent(e.msg.TYPE, len(env), time.time()))

    async def _carry(
        self, effects: Sequence[CoordinatorEffect], lossy: bool = True
    ) -> list[CoordinatorEffect]:
        """Carry out ``effects`` in order; returns the outcomes (SetupDone, Failed, ...)."""
        outcomes: list[CoordinatorEffect] = []
        posted: list[Any] = []
        for e in effects:
            if isinstance(e, Send):
                if e.wait:
                    await self._send(e, lossy)
                else:  # side by side with the next ones; all awaited before this returns
                    posted.append(asyncio.ensure_future(self._send(e, lossy)))
            elif isinstance(e, SendRaw):
                await self.transport.send_async(e.envelope)
            elif isinstance(e, Record):
                self.audit.record(e.event, e.round, e.subject, dict(e.body))
            elif isinstance(e, FlushAudit):
                self.flush_audit()
            elif isinstance(e, PublishModel):
                self._auditor.record_model.remote(
                    e.model_hash, e.round, e.parent_hash, e.weights, e.bias,
                    list(e.updates), list(e.verdicts),
                )
            elif isinstance(e, SaveCheckpoint):
                self._auditor.save_checkpoint.remote(e.round, dict(e.state), e.model_hash)
            elif isinstance(e, RoundClosed):
                metrics = e.metrics.to_dict()
                self._auditor.record_round.remote(e.metrics.round, metrics, e.metrics.model_hash)
                telemetry.record_round(metrics)
                self._progress.set()
            else:
                outcomes.append(e)
        if posted:
            await asyncio.gather(*posted)
        return outcomes

    async def _drive(
        self, effects: Sequence[CoordinatorEffect], lossy: bool = True
    ) -> list[CoordinatorEffect]:
        """Carry out a step's first effects, then tick the role whenever something arrived or
        its deadline passed, until the step is over; returns the step's outcomes."""
        role = self.role
        outcomes = await self._carry(effects, lossy)
        while role.busy:
            self._wake.clear()
            outcomes += await self._carry(role.tick(time.time()), lossy)
            deadline = role.deadline
            if deadline is None or self._wake.is_set():
                continue
            left = deadline - time.time()
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=left)
        return outcomes

    @staticmethod
    def _raise_failure(outcomes: Sequence[CoordinatorEffect]) -> Failed | None:
        """The step's Failed outcome, raised as QuorumNotReached unless it will be retried."""
        failed = next((o for o in outcomes if isinstance(o, Failed)), None)
        if failed is not None and not failed.retry:
            raise QuorumNotReached(failed.reason)
        return failed

    # -- inbound -------------------------------------------------------------------------
    async def deliver(self, envelope: bytes) -> None:
        await self._carry(self.role.receive(envelope, time.time()))
        self._wake.set()
        self.maybe_flush()

    # -- setup round and resume ------------------------------------------------------------
    async def setup(self) -> dict[str, Any]:
        outcomes = await self._drive(self.role.begin_setup(time.time()), lossy=False)
        self._raise_failure(outcomes)
        done = next(o for o in outcomes if isinstance(o, SetupDone))
        return dict(done.summary)

    async def resume(self) -> dict[str, Any]:
        """Continue from the latest checkpoint (after a coordinator crash) instead of setup().

        The model comes from the store by hash; hospitals get the checkpointed standardization
        again (idempotent), so restarted hospitals can rejoin too.
        """
        cp = await self._auditor.latest_checkpoint.remote()
        mine = [] if cp is None else await self._auditor.entries.remote("model_published")
        outcomes = await self._carry(self.role.open_checkpoint(cp, mine), lossy=False)
        refused = next((o for o in outcomes if isinstance(o, Refused)), None)
        if refused is not None:  # stop, loudly and audited: never resume nor restart
            await self.sync_audit()
            raise CheckpointRefused(refused.reason)
        assert cp is not None
        stored = await self._auditor.get_model.remote(cp["model_hash"])
        outcomes = await self._carry(self.role.resume(stored), lossy=False)
        done = next(o for o in outcomes if isinstance(o, Resumed))
        return dict(done.summary)

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
        self.role.check_can_run(rounds)
        ran = 0
        for i in range(rounds):
            stop = self.role.check_budget()
            if stop:
                await self._carry(stop)
                break
            if i and self._cfg.pace_s > 0:
                await asyncio.sleep(self._cfg.pace_s)
            await self._round_with_retries()
            ran += 1
        if ran:
            await self._drive(self.role.begin_final_evaluation(time.time()))
        return self.metrics()

    async def _round_with_retries(self) -> None:
        """One round; the role decides whether a round that missed quorum runs again. Before
        a retry, a router that refused a send (restarting) is given time to come back."""
        while True:
            outcomes = await self._drive(self.role.begin_round(time.time()))
            if self._raise_failure(outcomes) is None:
                return
            if self._router_down:  # restarting: retrying before it is back would be wasted
                self._router_down = False
                await self.transport.wait_ready(ROUTER_WAIT_S)

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
        return self.role.current_model()

    def metrics(self) -> list[dict[str, Any]]:
        return self.role.metrics()
