"""A hospital's own policy: what it will answer, whatever the coordinator asks (issue 15).

The coordinator, router and database may be hostile. A :class:`HospitalPolicy` is held by the
hospital itself and built from what the hospital holds — its roster copy, its own
``policy.toml`` and the run configuration it was started with — never from a coordinator
message. It checks every request before any patient row is touched:

- **round freshness**: per coordinator key, rounds strictly increase. A RoundStart for the
  round last trained *with the same base model* (a legitimate retry after a timeout, or a
  replayed envelope) is answered with the **same** update, byte for byte, never a fresh one; a
  different base for an already-trained round, or an older round, is refused.
- **differential privacy** (when the hospital's policy has a DP mode): the mode asked must be
  the hospital's (or stronger: local for central), the clip norm at most its own, and in local
  mode the noise multiplier at least its own and one more release within its own ε budget,
  counted by its own :class:`medimesh.privacy.PrivacyAccountant`.
- **evaluation budget**: at most ``evals_per_round`` evaluations of published models it has not
  scored before per round it trained (the final model is one), and at most ``max_evaluations``
  in total if set; the same model hash again returns the cached counts, not a fresh count. The
  base model of a fresh round it is about to train on is scored as part of that round (one per
  round, which round freshness already bounds) and does not use the window: a hospital that
  missed rounds (a partition, a restart) sees a base it never scored, and counting that against
  the window would lock it out of training for good.

Sans-IO: no Ray, no files. A refusal raises :class:`PolicyRefused` (the caller audits it as
``policy_refused`` and sends nothing); other notable decisions come out of :meth:`drain_events`;
the state that must survive a restart is :meth:`HospitalPolicy.state_json` and is given back to
the constructor (``medimesh.policy_store`` keeps it in the hospital's own state directory).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from typing import Any

from medimesh.errors import ConfigError, MediMeshError
from medimesh.identity import Roster
from medimesh.privacy import PrivacyAccountant, PrivacyConfig
from medimesh.protocol import EvalReport, RoundStart, Update, decode

__all__ = [
    "NOISE_SLACK",
    "STATE_VERSION",
    "HospitalPolicy",
    "PolicyConfig",
    "PolicyRefused",
]

STATE_VERSION = 1
NOISE_SLACK = 1e-9  # relative float tolerance when comparing the asked z and C to our own
_DP_STRENGTH = {"": 0, "central": 1, "local": 2}


class PolicyRefused(MediMeshError):
    """The hospital's own policy refuses a request; nothing is sent in answer."""

    def __init__(self, rule: str, asked: Any, limit: Any, round_: int = -1) -> None:
        super().__init__(f"policy refuses ({rule}): asked {asked!r}, limit {limit!r}")
        self.rule = rule
        self.asked = asked
        self.limit = limit
        self.round = round_

    def to_audit(self) -> dict[str, Any]:
        """The ``policy_refused`` audit body: the rule, the asked value and the limit."""
        return {"rule": self.rule, "asked": self.asked, "limit": self.limit}


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The limits a hospital holds itself.

    ``privacy`` None: the hospital trains as asked without DP limits (it still checks rounds
    and evaluations). Otherwise its mode, clip norm, noise multiplier and ε budget bound what
    it releases. ``max_evaluations`` None: no total cap (the per-round cap still holds).
    """

    privacy: PrivacyConfig | None = None
    evals_per_round: int = 1
    max_evaluations: int | None = None

    def __post_init__(self) -> None:
        if self.evals_per_round < 0:
            raise ConfigError("evals_per_round must be zero or positive")
        if self.max_evaluations is not None and self.max_evaluations < 0:
            raise ConfigError("max_evaluations must be zero or positive")

    @classmethod
    def from_run(cls, privacy: PrivacyConfig | None) -> PolicyConfig:
        """Defaults derived from the run configuration the hospital was started with."""
        return cls(privacy=None if privacy is None else privacy.calibrated())

    def with_toml(self, text: str) -> PolicyConfig:
        """This policy overridden by a ``policy.toml`` (stdlib tomllib); unknown keys are
        refused so a typo cannot silently weaken a limit.

        ```toml
        [dp]                      # omit to keep the run's DP settings
        mode = "local"            # "central" or "local"; "" = no DP limits
        noise_multiplier = 8.14   # the least noise (z) this hospital adds
        clip_norm = 0.5           # the largest clip norm C it uses
        epsilon = 1.0             # its own budget
        delta = 1e-4
        rounds = 10               # only to calibrate z when noise_multiplier is absent
        accountant = "pld"
        [evaluation]
        per_round = 1             # new models scored per trained round
        total = 40                # in all (absent: no total cap)
        ```
        """
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"policy.toml: {exc}") from None
        unknown = set(doc) - {"dp", "evaluation"}
        if unknown:
            raise ConfigError(f"policy.toml: unknown section(s) {sorted(unknown)}")
        privacy = self.privacy
        dp = doc.get("dp")
        if dp is not None:
            keys = {"mode", "noise_multiplier", "clip_norm", "epsilon", "delta", "rounds",
                    "accountant"}
            if not isinstance(dp, dict) or set(dp) - keys:
                raise ConfigError(f"policy.toml [dp]: allowed keys are {sorted(keys)}")
            if dp.get("mode", "x") == "":
                privacy = None
            else:
                base = privacy or PrivacyConfig(mode="local")
                fields = {k: v for k, v in dp.items()}
                if "noise_multiplier" not in fields and {"epsilon", "rounds"} & set(fields):
                    fields["noise_multiplier"] = None  # recalibrate for the new budget
                try:
                    privacy = dataclasses.replace(base, **fields).calibrated()
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"policy.toml [dp]: {exc}") from None
        ev = doc.get("evaluation", {})
        if not isinstance(ev, dict) or set(ev) - {"per_round", "total"}:
            raise ConfigError("policy.toml [evaluation]: allowed keys are per_round, total")
        return PolicyConfig(
            privacy,
            int(ev.get("per_round", self.evals_per_round)),
            int(ev["total"]) if "total" in ev else self.max_evaluations,
        )

    def describe(self) -> dict[str, Any]:
        """What the hospital holds, for its audit entry at start (no patient data)."""
        p = self.privacy
        return {
            "dp_mode": "" if p is None else p.mode,
            "noise_multiplier": None if p is None else p.z,
            "clip_norm": None if p is None else p.clip_norm,
            "epsilon_budget": None if p is None else p.epsilon,
            "delta": None if p is None else p.delta,
            "evals_per_round": self.evals_per_round,
            "max_evaluations": self.max_evaluations,
        }


@dataclass
class _Freshness:
    last_round: int = 0
    base: str = ""
    update: str = ""  # the payload of the update answered for (last_round, base), base64


class HospitalPolicy:
    """One hospital's policy state machine (see the module docstring).

    ``state`` is what :meth:`state_json` returned before a restart. ``state_lost`` says the
    process was restarted and that state could not be found: in local DP mode the hospital
    then refuses every release (its spend is unknown), which is the safe choice.
    """

    def __init__(
        self,
        roster: Roster,
        config: PolicyConfig,
        n_train: int,
        state: str | None = None,
        *,
        state_lost: bool = False,
    ) -> None:
        self.config = config
        self._coordinators = {m.peer_id for m in roster.with_role("coordinator")}
        self._n_train = n_train
        self._rounds: dict[str, _Freshness] = {}
        self._evals: dict[str, list[float]] = {}  # model hash -> n, top1, top3, loss_sum
        self._window = 0  # new-model evaluations since the last round trained
        self._dp_rounds = 0
        self._state_lost = state_lost
        self._events: list[tuple[str, int, str, dict[str, Any]]] = []
        if state is not None:
            self._restore(state)
            self._state_lost = False
        p = config.privacy
        self._accountant = (
            PrivacyAccountant(p, self._dp_rounds) if p is not None and p.mode == "local" else None
        )

    # -- state -----------------------------------------------------------------------------
    @property
    def dp_rounds(self) -> int:
        """Local-DP releases this hospital has made (its own count)."""
        return self._dp_rounds

    @property
    def epsilon_spent(self) -> float:
        return 0.0 if self._accountant is None else self._accountant.epsilon

    @property
    def evaluations(self) -> int:
        return len(self._evals)

    def summary(self) -> dict[str, Any]:
        """Counts only (for ``info()``): rounds per coordinator key, releases, evaluations."""
        return {
            "last_round": {k: v.last_round for k, v in self._rounds.items()},
            "dp_rounds": self._dp_rounds,
            "epsilon_spent": self.epsilon_spent,
            "evaluations": len(self._evals),
            "state_lost": self._state_lost,
        }

    def last_round(self, coordinator: str) -> int:
        fresh = self._rounds.get(coordinator)
        return 0 if fresh is None else fresh.last_round

    def state_json(self) -> str:
        """Everything that must survive a restart: rounds per coordinator key (with the update
        answered for the last one), DP releases made, evaluations answered (counts only)."""
        return json.dumps({
            "version": STATE_VERSION,
            "rounds": {k: dataclasses.asdict(v) for k, v in self._rounds.items()},
            "dp_rounds": self._dp_rounds,
            "evals": self._evals,
            "window": self._window,
        }, sort_keys=True)

    def _restore(self, text: str) -> None:
        try:
            doc = json.loads(text)
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"state version {doc.get('version')!r}")
            self._rounds = {k: _Freshness(**v) for k, v in doc["rounds"].items()}
            self._dp_rounds = int(doc["dp_rounds"])
            self._evals = {k: [float(x) for x in v] for k, v in doc["evals"].items()}
            self._window = int(doc["window"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"hospital policy state is unreadable: {exc}") from None

    def drain_events(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        """Audit events (kind, round, subject, body) for decisions that were not refusals."""
        out, self._events = self._events, []
        return out

    # -- rounds ----------------------------------------------------------------------------
    def admit_round(self, msg: RoundStart, coordinator: str) -> Update | None:
        """Check a RoundStart before anything is computed.

        Returns the update already sent for this (round, base) — to be sent again as it is —
        or None if a fresh round may be trained (then call :meth:`record_round`). Raises
        :class:`PolicyRefused` otherwise. Nothing is recorded here.
        """
        r = msg.round
        if coordinator not in self._coordinators:
            raise PolicyRefused("not_coordinator", coordinator, sorted(self._coordinators), r)
        fresh = self._rounds.get(coordinator, _Freshness())
        if r == fresh.last_round and r > 0:
            if msg.base_hash != fresh.base:
                raise PolicyRefused("round_rebased", msg.base_hash, fresh.base, r)
            if fresh.update:
                self._events.append(("round_repeated", r, msg.base_hash,
                                     {"answer": "same update as before"}))
                return decode(Update.TYPE, base64.b64decode(fresh.update), Update)
            raise PolicyRefused("round_not_fresh", r, f"> {fresh.last_round}", r)
        if r <= fresh.last_round:
            raise PolicyRefused("round_not_fresh", r, f"> {fresh.last_round}", r)
        self._check_dp(msg)
        return None

    def _check_dp(self, msg: RoundStart) -> None:
        p, r = self.config.privacy, msg.round
        if p is None:
            return
        asked_mode = msg.dp_mode
        if _DP_STRENGTH.get(asked_mode, -1) < _DP_STRENGTH[p.mode]:
            raise PolicyRefused("dp_mode", asked_mode, p.mode, r)
        if not msg.clip_norm > 0 or msg.clip_norm > p.clip_norm * (1 + NOISE_SLACK):
            raise PolicyRefused("dp_clip_norm", msg.clip_norm, p.clip_norm, r)
        if asked_mode != "local" or self._accountant is None:
            return  # central: the coordinator adds the noise and keeps the budget
        if not math.isfinite(msg.dp_noise_multiplier) or (
            msg.dp_noise_multiplier < p.z * (1 - NOISE_SLACK)
        ):
            raise PolicyRefused("dp_noise_multiplier", msg.dp_noise_multiplier, p.z, r)
        if self._state_lost:
            raise PolicyRefused("dp_state_lost", "release after a restart",
                                "spend unknown: no saved state", r)
        if self._n_train and p.delta >= 1.0 / self._n_train:
            raise PolicyRefused("dp_delta", p.delta, f"< 1/{self._n_train}", r)
        if not self._accountant.can_spend():
            raise PolicyRefused(
                "dp_budget", round(self._accountant.next_epsilon(), 6), p.epsilon, r
            )

    def record_round(self, msg: RoundStart, coordinator: str, update: Update) -> None:
        """A fresh round was trained and ``update`` is about to be sent: remember it (and spend
        one local-DP release). Persist :meth:`state_json` before sending."""
        self._rounds[coordinator] = _Freshness(
            msg.round, msg.base_hash, base64.b64encode(update.to_payload()).decode()
        )
        self._window = 0
        if self._accountant is not None and msg.dp_mode == "local":
            eps = self._accountant.spend()
            self._dp_rounds = self._accountant.rounds
            p = self._accountant.config
            self._events.append(("hospital_privacy_spent", msg.round, msg.base_hash, {
                "epsilon": eps, "epsilon_budget": p.epsilon, "delta": p.delta,
                "dp_rounds": self._dp_rounds, "noise_multiplier": msg.dp_noise_multiplier,
                "clip_norm": msg.clip_norm,
            }))

    # -- evaluations -----------------------------------------------------------------------
    def admit_evaluation(
        self, model_hash: str, round_: int = -1, *, round_base: bool = False
    ) -> EvalReport | None:
        """The cached counts if this model was scored before, None if a fresh evaluation is
        allowed (then call :meth:`record_evaluation`); raises :class:`PolicyRefused` when the
        evaluation budget is spent. ``round_base``: the base model of a fresh round just
        admitted (outside the per-round window; the total cap still holds)."""
        cached = self._evals.get(model_hash)
        if cached is not None:
            n, top1, top3, loss = cached
            return EvalReport(round_, model_hash, int(n), int(top1), int(top3), loss)
        if not round_base and self._window >= self.config.evals_per_round:
            raise PolicyRefused("eval_per_round", self._window + 1,
                                self.config.evals_per_round, round_)
        cap = self.config.max_evaluations
        if cap is not None and len(self._evals) >= cap:
            raise PolicyRefused("eval_total", len(self._evals) + 1, cap, round_)
        return None

    def record_evaluation(self, report: EvalReport, *, round_base: bool = False) -> None:
        self._evals[report.model_hash] = [
            float(report.n_examples), float(report.correct_top1), float(report.correct_top3),
            float(report.loss_sum),
        ]
        if not round_base:
            self._window += 1

