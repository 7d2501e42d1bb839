"""The decisions behind starting a consortium, apart from the Ray wiring that carries them out.

Which bound the validator enforces, what the coordinator is configured with, which nodes the
router pushes to (and which poll the AXL front instead), who plays the adversary with whom,
and — for remote hospitals — who stayed silent at setup. Pure: the composition root
(``medimesh.actors.runtime`` and ``medimesh.actors.consortium_start``) asks, then wires.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medimesh.attacks import COLLUDING, FRAMING, framing_victim
from medimesh.errors import ConfigError
from medimesh.identity import Roster
from medimesh.privacy import PrivacyConfig
from medimesh.roles.coordinator_config import CoordinatorConfig
from medimesh.run_config import RunConfig, spec_hash
from medimesh.sites import DatasetInfo

__all__ = [
    "SERVICES",
    "AdversaryPlan",
    "adversary_plan",
    "coordinator_config",
    "pushed_nodes",
    "remote_members",
    "remote_setup",
    "role_actor_name",
    "run_info",
    "silent_at_setup",
    "validator_bounds",
]

SERVICES = ("router", "auditor", "validator", "coordinator")
"""The consortium's own services (every other node is a hospital)."""


def validator_bounds(cfg: RunConfig, privacy: PrivacyConfig | None) -> tuple[float, bool]:
    """(max update norm, statistical scoring on?) for the validator; ``privacy`` calibrated."""
    if privacy is None:
        return cfg.max_update_norm, cfg.validator_scoring
    # Central DP updates are mean clipped gradients: norm <= C is checkable exactly.
    bound = privacy.clip_norm * (1 + 1e-4) if privacy.mode == "central" else cfg.max_update_norm
    return bound, False


def coordinator_config(
    cfg: RunConfig, info: DatasetInfo, privacy: PrivacyConfig | None, run_id: str
) -> CoordinatorConfig:
    """The coordinator's configuration for this run (``privacy`` calibrated)."""
    return CoordinatorConfig(
        n_features=len(info.feature_names),
        n_classes=len(info.class_names),
        spec_hash=spec_hash(info),
        train=cfg.train,
        aggregator=cfg.aggregator,
        n_byzantine=cfg.assumed_byzantine,
        server_optimizer=cfg.server_optimizer,
        server_lr=cfg.server_lr,
        server_momentum=cfg.server_momentum,
        min_updates=cfg.quorum,
        round_timeout_s=cfg.round_timeout_s,
        setup_timeout_s=cfg.setup_timeout_s,
        pace_s=cfg.pace_s,
        round_retries=cfg.round_retries,
        privacy=privacy,
        secure_aggregation=cfg.secure_aggregation,
        run_id=run_id,
        cross_baselines=cfg.cross_baselines_active,
    )


def run_info(cfg: RunConfig) -> dict[str, Any]:
    """What the store keeps about a run beside its id (shown by ``/runs``)."""
    return {"dataset": cfg.dataset, "hospitals": cfg.n_sites,
            "rounds_planned": cfg.rounds, "seed": cfg.seed,
            "aggregator": cfg.aggregator,
            "cross_baselines": cfg.cross_baselines_active}


def role_actor_name(node: str) -> str:
    """A node's actor name before the run suffix: a service by its role, else a hospital."""
    return node if node in SERVICES else f"hospital:{node}"


def pushed_nodes(nodes: Iterable[str], over_axl: bool, remote: bool) -> list[str]:
    """The nodes the router delivers to by pushing to their actor, in ``nodes`` order.

    Never the router itself; the auditor only when remote hospitals send it their audit
    events through the router; hospital actors not at all when they poll the AXL front.
    """
    return [
        n for n in nodes
        if (n == "auditor" and remote)
        or (n not in ("router", "auditor") and (not over_axl or n in SERVICES))
    ]


@dataclass(frozen=True, slots=True)
class AdversaryPlan:
    """Who misbehaves how in a drill, and who shares the attackers' side channel."""

    behaviour: dict[str, str]  # site -> behaviour, for the dishonest sites named in the config
    colluding: tuple[str, ...]  # sites given the colluders' side channel
    n_colluding: int  # how many of them run a colluding attack (not framing alone)
    victim: str | None  # the honest site a framing attack targets

    def hospital(self, site: str) -> str:
        """A site's behaviour ("honest" unless the config names it)."""
        return self.behaviour.get(site, "honest")


def adversary_plan(sites: Sequence[str], behaviours: Iterable[tuple[str, str]]) -> AdversaryPlan:
    """The drill's adversaries; a behaviour naming a site not in ``sites`` is a config error."""
    behaviour = dict(behaviours)
    unknown = set(behaviour) - set(sites)
    if unknown:
        raise ConfigError(f"behaviours name unknown sites: {sorted(unknown)}")
    colluding = tuple(n for n, b in behaviour.items() if b in COLLUDING | FRAMING)
    return AdversaryPlan(
        behaviour=behaviour,
        colluding=colluding,
        n_colluding=sum(1 for n in colluding if behaviour[n] in COLLUDING),
        # Framing attacks target the first honest site (medimesh.attacks.framing_victim).
        victim=framing_victim(list(sites), behaviour),
    )


def remote_members(roster: Roster, expected: Sequence[str]) -> dict[str, str]:
    """Remote hospital name -> peer id, from a roster that must enrol exactly ``expected``."""
    names = {m.name: m.peer_id for m in roster.with_role("hospital")}
    if set(names) != set(expected):
        raise ConfigError(f"the roster enrols hospitals {sorted(names)}, this run expects "
                          f"{sorted(expected)}")
    return {n: names[n] for n in expected}


def remote_setup(
    state: Mapping[str, Any], refused: Collection[str], remote_peers: Mapping[str, str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """What remote hospitals reported at setup, from the coordinator's checkpoint ``state``:
    (one counts record per hospital, the hospitals that neither committed nor were refused)."""
    committed = {str(k): int(v) for k, v in state.get("committed", {}).items()}
    tests = {str(k): int(v) for k, v in state.get("test_sizes", {}).items()}
    silent = [n for n, p in remote_peers.items() if p not in committed and n not in refused]
    info = [{"name": n, "peer_id": p, "n_train": committed.get(p, 0),
             "n_test": tests.get(p, 0), "remote": True}
            for n, p in remote_peers.items()]
    return info, silent


def silent_at_setup(silent: Sequence[str], setup_timeout_s: float, front_url: str) -> ConfigError:
    """The error naming the remote hospitals that did not answer at setup."""
    return ConfigError(
        f"setup: no answer within {setup_timeout_s:g} s from "
        f"{', '.join(silent)} (is `medimesh node hospital --axl {front_url}` running there?)"
    )
