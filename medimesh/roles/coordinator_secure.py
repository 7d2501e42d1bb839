"""The secure-aggregation close of a round: the coordinator as SecAgg server, phase by phase.

Phases (Bonawitz et al., with the consistency check): advertise keys → share keys → masked
input (plus the validator's verdicts on the masked updates) → consistency check (survivors
sign U3) → unmask → one server step. Each phase waits, through the coordinator role's
:class:`~medimesh.roles.coordinator.Wait`, for every hospital it expects until its deadline;
once the threshold is in, only ``grace_s`` more. Too few hospitals in any phase fails the
round (QuorumNotReached; it is retried with fresh keys), never a wrong sum. Only masked
vectors and public counts are ever held here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from medimesh.errors import QuorumNotReached
from medimesh.protocol import (
    SecAggAdverts,
    SecAggCheckRequest,
    SecAggInbox,
    SecAggUnmaskRequest,
)
from medimesh.roles import Send
from medimesh.roles.coordinator_config import VERDICT_GRACE_S
from medimesh.roles.coordinator_effects import Wait
from medimesh.rounds import RoundState
from medimesh.secagg import SecAggConfig, SecAggError
from medimesh.secagg_round import SecAggRound, b64e

if TYPE_CHECKING:
    from medimesh.roles.coordinator import CoordinatorRole

__all__ = ["SECURE_SENDS", "SecureClose", "secure_summary"]

SECURE_SENDS = frozenset(
    {SecAggAdverts.TYPE, SecAggInbox.TYPE, SecAggCheckRequest.TYPE, SecAggUnmaskRequest.TYPE}
)
"""What the coordinator sends in a secure round (counted in the round's bytes routed)."""


def secure_summary(sa: SecAggRound) -> dict[str, Any]:
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


class SecureClose:
    """The secure phases of one round, driven by ``role.tick``; ends in ``role.publish`` or
    ``role.round_failed``."""

    def __init__(self, role: CoordinatorRole, sa: SecAggRound, config: SecAggConfig) -> None:
        self.role = role
        self.sa = sa
        self.cfg = config
        self._state: RoundState | None = None
        self._digests: set[str] = set()

    @property
    def state(self) -> RoundState:
        assert self._state is not None
        return self._state

    def begin(self, state: RoundState) -> None:
        """Phase 0 (train, then advertise): everyone, until the round's deadline."""
        self._state = state
        sa = self.sa
        self._phase("advertise", lambda: len(sa.adverts), len(sa.params.peers), state.deadline,
                    self._adverts_in, grace=False)

    def _phase(
        self, name: str, count: Callable[[], int], want: int, deadline: float,
        then: Callable[[float], None], grace: bool = True,
    ) -> None:
        """Wait for all ``want`` answers until ``deadline``; once the threshold is in, only
        ``grace_s`` more: one slow or vanished hospital must not stall the round."""
        need = min(want, self.sa.params.threshold)
        self.role.wait(Wait(
            name, lambda: count() >= want, deadline, self._guarded(then),
            enough=(lambda: count() >= need) if grace else None, grace_s=self.cfg.grace_s,
        ))

    def _guarded(self, step: Callable[[float], None]) -> Callable[[float], None]:
        def run(now: float) -> None:
            try:
                step(now)
            except (SecAggError, QuorumNotReached) as exc:
                self.state.closed = True
                failure = exc if isinstance(exc, QuorumNotReached) else QuorumNotReached(
                    f"round {self.state.round}: secure aggregation failed: {exc}"
                )
                self.role.round_failed(now, failure)

        return run

    def _send(self, msg: Any, to: tuple[str, ...], wait: bool = True) -> None:
        self.role.emit(Send(msg, to, self.state.round, wait=wait))

    def _next_deadline(self, now: float) -> float:
        return now + self.cfg.phase_timeout_s

    def _adverts_in(self, now: float) -> None:
        sa, r = self.sa, self.state.round
        blob = sa.close_adverts()
        self._send(SecAggAdverts(r, b64e(blob)), sa.advertisers)
        self.role.marks["advertise"] = now
        self._phase("share_keys", lambda: len(sa.shares), len(sa.advertisers),
                    self._next_deadline(now), self._shares_in)

    def _shares_in(self, now: float) -> None:
        sa, r = self.sa, self.state.round
        for v, box in sa.close_shares().items():  # one inbox each, sent side by side
            self._send(SecAggInbox(r, box), (v,), wait=False)
        self.role.marks["share_keys"] = now
        self._phase("masked_input", lambda: len(sa.masked), len(sa.u2),
                    self._next_deadline(now), self._masked_in)

    def _masked_in(self, now: float) -> None:
        self.role.masked_in(self.sa.masked)
        self._digests = {d for d, _ in self.sa.masked.values()}
        self.role.wait(Wait("verdicts", self._judged, now + self.cfg.grace_s,
                            self._guarded(self._verdicts_or_ask)))

    def _judged(self) -> bool:
        return self._digests <= set(self.state.verdicts)

    def _verdicts_or_ask(self, now: float) -> None:
        """The validator's verdicts on the masked updates; asked for again once if missing."""
        if self._judged():
            self._verdicts_in(now)
            return
        self.role.request_verdicts(self.state.round)
        self.role.wait(Wait("verdicts_again", self._judged, now + VERDICT_GRACE_S,
                            self._guarded(self._verdicts_in)))

    def _verdicts_in(self, now: float) -> None:
        sa, state = self.sa, self.state
        accepted = set()
        for peer, (dig, _) in sa.masked.items():
            verdict = state.verdicts.get(dig)
            if verdict is not None and verdict[0].accepted and verdict[0].hospital == peer:
                accepted.add(peer)
        survivors = sa.close_masked(accepted)
        # Consistency check (Bonawitz et al.): survivors sign U3 before revealing shares.
        self._send(SecAggCheckRequest(state.round, survivors), survivors)
        self.role.marks["masked_input"] = now
        self._phase("consistency", lambda: len(sa.checks), len(survivors),
                    self._next_deadline(now), self._checks_in)

    def _checks_in(self, now: float) -> None:
        sa, r = self.sa, self.state.round
        signed = sa.close_check()
        self._send(SecAggUnmaskRequest(r, sa.survivors, signed), sa.signers)
        self.role.marks["consistency"] = now
        self._phase("unmask", lambda: len(sa.answers), len(sa.signers),
                    self._next_deadline(now), self._answers_in)

    def _answers_in(self, now: float) -> None:
        sa, state, role = self.sa, self.state, self.role
        state.closed = True
        if len(sa.survivors) < state.min_updates:
            raise QuorumNotReached(
                f"round {state.round}: {len(sa.survivors)} masked update(s), "
                f"{state.min_updates} required"
            )
        agg = sa.aggregate()
        if sa.sum_check is not None and sa.sum_check.clamped:
            role.record("secagg_sum_out_of_bounds", state.round, state.base_hash,
                        sa.sum_check.to_dict())
        role.marks["unmask"] = now
        model, server_state = role.server_step(state.base, agg)
        upd = [sa.masked[p][0] for p in sa.survivors]
        verdicts = [state.verdicts[d][1] for d in upd]
        role.publish(now, state.base_hash, (model, server_state, upd, verdicts),
                     {"secure_aggregation": secure_summary(sa)})
