"""The composition root: starts Ray, mints identities, creates and wires the named actors.

Everything with a side effect on the cluster lives here and in the modules it drives
(``ray_env``: Ray itself; ``consortium_start``: creating and wiring the actors;
``consortium_remote``: the AXL front and remote hospitals); what to wire is decided in
:mod:`medimesh.run_config` and :mod:`medimesh.consortium_plan`. The actor classes stay plain
and the CLI and benchmarks drive a :class:`Consortium`. Actors live in the ``medimesh``
namespace with role and name in their actor names, so the Ray dashboard's actor view reads like
the system.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from medimesh.actors.base import ActorName
from medimesh.actors.consortium_start import start_consortium
from medimesh.actors.coordinator import Coordinator
from medimesh.actors.ray_env import (
    LOOPBACK,
    NAMESPACE,
    check_placement,
    choose_auth_mode,
    ensure_ray,
    free_port,
    hospital_resource,
    named_actor,
    ray_endpoints,
    ray_init_args,
)
from medimesh.consortium_plan import SERVICES
from medimesh.errors import ConfigError
from medimesh.identity import Identity, Roster
from medimesh.privacy import PrivacyConfig
from medimesh.routing import Faults
from medimesh.run_config import (
    DASHBOARD_PORT,
    METRICS_PORT,
    RunConfig,
    site_descriptors,
    spec_hash,
)
from medimesh.runs import new_run_id
from medimesh.sites import SiteDescriptor, dataset_info

__all__ = [
    "DASHBOARD_PORT", "LOOPBACK", "METRICS_PORT", "NAMESPACE", "Consortium", "RunConfig",
    "check_placement", "choose_auth_mode", "ensure_ray", "free_port", "hospital_resource",
    "ray_endpoints", "ray_init_args", "site_descriptors", "spec_hash",
]


class Consortium:
    """A running federation on Ray: router, auditor, validator, coordinator, hospitals."""

    def __init__(self, cfg: RunConfig, hospital_classes: Mapping[str, type] | None = None) -> None:
        """``hospital_classes``: site name -> actor class instead of :class:`Hospital` (the
        operator bench's dishonest hospitals, medimesh.actors.liars); runs never set it."""
        self.cfg = cfg
        self.hospital_classes = dict(hospital_classes or {})
        self.descriptors = site_descriptors(cfg)
        first = self.descriptors[0] if self.descriptors else SiteDescriptor(
            "csv", "", {"spec": cfg.spec}  # remote hospitals only: the spec alone
        )
        self.info = dataset_info(first.kind, first.params)
        self.remote_peers: dict[str, str] = {}  # remote hospital name -> peer id
        self.front: Any = None  # the AXL front serving them (medimesh.node.front)
        self.on_front: Callable[[Any], None] | None = None  # told the front's URL and pin
        self.identities: dict[str, Identity] = {}
        self.roster = Roster()
        self.handles: dict[str, Any] = {}
        self.colluders: Any = None  # the drill's attackers' side channel (an actor), if any
        self.coordinator_args: tuple[Any, ...] = ()  # what a restarted coordinator is given
        self.hospital_info: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.setup_summary: dict[str, Any] = {}
        self._seen_round = 0
        # Actor names read like the architecture in the Ray dashboard ("hospital:hospital-03@…");
        # the run id keeps two federations in one Ray instance from colliding, and names
        # everything this run stores (medimesh.runs).
        self.run_id = new_run_id()
        self.restarts = 0

    @functools.cached_property
    def privacy(self) -> PrivacyConfig | None:
        """The run's DP config with its noise multiplier calibrated (once, in the driver)."""
        return None if self.cfg.privacy is None else self.cfg.privacy.calibrated()

    def actor_name(self, name: str) -> str:
        """This run's Ray actor name for ``name`` (e.g. ``"hospital:hospital-03"``)."""
        return f"{name}@{self.run_id}"

    def actor_ref(self, name: str) -> ActorName:
        """One of this run's actors, for a restartable actor's constructor (see ActorName)."""
        return ActorName(self.actor_name(name), NAMESPACE)

    @property
    def over_axl(self) -> bool:
        """Hospital actors reached through the AXL front (mailboxes), never pushed to."""
        return self.cfg.hospital_transport == "axl"

    def start(self) -> dict[str, float]:
        """Create and wire all actors, then run the setup round. Returns timings (s)."""
        return start_consortium(self)

    @property
    def signed_roster_path(self) -> Path | None:
        """Where this run's signed roster is (with ``roster_dir``)."""
        return Path(self.cfg.roster_dir) / f"{self.run_id}.json" if self.cfg.roster_dir else None

    def witness_path(self, site: str) -> str | None:
        """A hospital's witness directory (with ``witness_dir``)."""
        return str(Path(self.cfg.witness_dir) / site) if self.cfg.witness_dir else None

    def run(
        self, on_round: Callable[[dict[str, Any]], None] | None = None, rounds: int | None = None
    ) -> list[dict[str, Any]]:
        """Train for ``rounds`` (default: the config's), calling ``on_round`` as each closes."""
        coordinator = self.handles["coordinator"]
        done = coordinator.run.remote(rounds or self.cfg.rounds)
        seen = start = self._seen_round
        while True:
            ready, _ = ray.wait([done], timeout=0)
            fresh = ray.get(coordinator.wait_metrics.remote(seen, 1.0))
            for m in fresh:
                seen = m["round"]
                if on_round is not None:
                    on_round(m)
            if ready and not fresh:
                break
        history = list(ray.get(done))  # re-raises a failed round's error
        self._seen_round = seen
        return [m for m in history if m["round"] > start]

    def restart_coordinator(self) -> dict[str, Any]:
        """Kill the coordinator and start a new one on the same key, resuming from checkpoint.

        What a crashed coordinator's supervisor does: the round in flight (if any) is lost, the
        new coordinator continues after the last closed round, and the audit chain goes on.
        """
        ray.kill(self.handles["coordinator"], no_restart=True)
        self.restarts += 1
        name = self.actor_name(f"coordinator-r{self.restarts}")
        coordinator = named_actor(
            Coordinator, name, here=self.cfg.placement == "pinned"
        ).remote(*self.coordinator_args)
        ray.get(self.handles["router"].register.remote(
            self.identities["coordinator"].peer_id, coordinator
        ))
        self.handles["coordinator"] = coordinator
        self._seen_round = 0
        return dict(ray.get(coordinator.resume.remote()))

    def router_name(self) -> str:
        """The router's actor name (the oracle reads /network from it)."""
        return self.actor_name("router")

    def flush_store(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything the auditor buffered is in the database."""
        self.flush_audit()
        done = bool(ray.get(self.handles["auditor"].flush.remote(timeout_s)))
        if self.cfg.witness_dir:
            ray.get(self.handles["auditor"].witness_head.remote())
        return done

    def final_model(self) -> dict[str, Any]:
        return dict(ray.get(self.handles["coordinator"].current_model.remote()))

    def router_stats(self) -> dict[str, Any]:
        return dict(ray.get(self.handles["router"].stats.remote()))

    def flush_audit(self) -> None:
        """Push every actor's buffered audit events to the auditor, then wait for it.

        A hospital that is down (or restarting) cannot flush; what it had not yet handed to
        the auditor died with it, but the chain itself has no gap (the auditor numbers it).
        """
        names = [n for n in self.handles if n != "auditor"]
        refs = {n: self.handles[n].sync_audit.remote() for n in names}
        for n, ref in refs.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                if n in SERVICES:
                    raise

    def set_faults(
        self, drop: float = 0.0, delay_s: float = 0.0, partitions: Sequence[Sequence[str]] = (),
        jitter_s: float = 0.0,
    ) -> None:
        """Fault drills on the router: drop probability, per-hop delay ± jitter (a WAN),
        partitions by node name (e.g. [["hospital-01", "coordinator"], ["hospital-02"]])."""
        groups = []
        for group in partitions:
            unknown = [n for n in group if n not in self.identities]
            if unknown:
                raise ConfigError(f"partition names unknown nodes: {unknown}")
            groups.append([self.identities[n].peer_id for n in group])
        Faults(drop, delay_s, jitter_s=jitter_s)  # validates before anything is sent
        ray.get(self.handles["router"].set_faults.remote(drop, delay_s, groups, jitter_s))

    def kill_hospital(self, name: str, restart: bool = True) -> None:
        """Crash a hospital's actor (a drill): Ray restarts it unless ``restart`` is False."""
        if name not in self.handles or name in SERVICES:
            raise ConfigError(f"no hospital named {name!r}")
        ray.kill(self.handles[name], no_restart=not restart)

    def node_status(self) -> dict[str, str]:
        """Node name -> live / slow / restarting / down, as the router sees deliveries."""
        peers = self.router_stats()["peers"]
        by_id = {i.peer_id: n for n, i in self.identities.items()}
        return {by_id.get(pid, pid): str(p.get("status", "?")) for pid, p in peers.items()}

    def audit_entries(self) -> list[Any]:
        self.flush_audit()
        return list(ray.get(self.handles["auditor"].entries.remote()))

    def verify_audit(self) -> dict[str, Any]:
        self.flush_audit()
        return dict(ray.get(self.handles["auditor"].verify.remote()))

    def shutdown(self) -> None:
        extra = [self.colluders] if self.colluders is not None else []
        if self.front is not None:
            self.front.stop()
            self.front = None
        for h in [*self.handles.values(), *extra]:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(h)
        self.handles = {}
