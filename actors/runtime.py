"""The composition root: starts Ray, mints identities, creates and wires the named actors.

Everything with a side effect on the cluster lives here; the actor classes stay plain and the
CLI and benchmarks drive a :class:`Consortium`. Actors live in the ``medimesh`` namespace with
role and name in their actor names, so the Ray dashboard's actor view reads like the system.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from medimesh.actors.adversary_hospital import AttackingHospital
from medimesh.actors.auditor import Auditor
from medimesh.actors.base import ActorName
from medimesh.actors.colluders import Colluders
from medimesh.actors.coordinator import Coordinator, CoordinatorConfig
from medimesh.actors.hospital import Hospital
from medimesh.actors.ray_env import (
    LOOPBACK,
    NAMESPACE,
    check_placement,
    choose_auth_mode,
    ensure_ray,
    error_cause,
    free_port,
    hospital_resource,
    named_actor,
    ray_endpoints,
    ray_init_args,
)
from medimesh.actors.router import Router
from medimesh.actors.validator import Validator
from medimesh.attacks import COLLUDING, FRAMING, framing_victim
from medimesh.errors import ConfigError, QuorumNotReached
from medimesh.identity import Identity, Member, Roster
from medimesh.policy import PolicyConfig
from medimesh.privacy import PrivacyConfig, check_delta
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

_SERVICES = ("router", "auditor", "validator", "coordinator")


class Consortium:
    """A running federation on Ray: router, auditor, validator, coordinator, hospitals."""

    def __init__(self, cfg: RunConfig, hospital_classes: Mapping[str, type] | None = None) -> None:
        """``hospital_classes``: site name -> actor class instead of :class:`Hospital` (the
        operator bench's dishonest hospitals, medimesh.actors.liars); runs never set it."""
        self.cfg = cfg
        self._hospital_classes = dict(hospital_classes or {})
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

    def _validator_bounds(self) -> tuple[float, bool]:
        """(max update norm, statistical scoring on?) for the validator."""
        dp = self.privacy
        if dp is None:
            return self.cfg.max_update_norm, self.cfg.validator_scoring
        # Central DP updates are mean clipped gradients: norm <= C is checkable exactly.
        bound = dp.clip_norm * (1 + 1e-4) if dp.mode == "central" else self.cfg.max_update_norm
        return bound, False

    def _name(self, name: str) -> str:
        return f"{name}@{self.run_id}"

    def _by_name(self, name: str) -> ActorName:
        """One of this run's actors, for a restartable actor's constructor (see ActorName)."""
        return ActorName(self._name(name), NAMESPACE)

    def _enrol(self, name: str, role: Any) -> Identity:
        if self.cfg.keys_dir is not None:  # persistent identities: the operator's key files
            from medimesh.keys import consortium_roster, enrolled_identity

            keys_dir = Path(self.cfg.keys_dir)
            if not len(self.roster) and self.cfg.remote_hospitals:
                self.roster = self._remote_roster()
            elif not len(self.roster):
                self.roster = consortium_roster(keys_dir, [d.name for d in self.descriptors])
            self.identities[name] = enrolled_identity(keys_dir, self.roster, name, role)
            return self.identities[name]
        ident = Identity.generate()
        self.identities[name] = ident
        self.roster.add(Member(name, role, ident.peer_id))
        return ident

    @property
    def _over_axl(self) -> bool:
        """Hospital actors reached through the AXL front (mailboxes), never pushed to."""
        return self.cfg.hospital_transport == "axl"

    def _remote_roster(self) -> Roster:
        """The signed roster (every member signed it), enrolling exactly the remote hospitals."""
        from medimesh.node.hospital import load_verified_roster

        assert self.cfg.roster_file is not None
        roster = load_verified_roster(Path(self.cfg.roster_file))
        names = {m.name: m.peer_id for m in roster.with_role("hospital")}
        if set(names) != set(self.cfg.remote_hospitals):
            raise ConfigError(f"the roster enrols hospitals {sorted(names)}, this run expects "
                              f"{sorted(self.cfg.remote_hospitals)}")
        self.remote_peers = {n: names[n] for n in self.cfg.remote_hospitals}
        return roster

    def start(self) -> dict[str, float]:
        """Create and wire all actors, then run the setup round. Returns timings (s)."""
        t0 = time.perf_counter()
        ensure_ray(
            address=self.cfg.ray_address, dashboard=self.cfg.ray_dashboard,
            dashboard_port=self.cfg.ray_dashboard_port, metrics_port=self.cfg.ray_metrics_port,
        )
        t_ray = time.perf_counter()
        for name, role in (
            ("router", "router"),
            ("auditor", "auditor"),
            ("validator", "validator"),
            ("coordinator", "coordinator"),
        ):
            self._enrol(name, role)
        for d in self.descriptors:
            self._enrol(d.name, "hospital")
        roster_json = self.roster.to_json()
        seed = self.identities
        if self.cfg.placement == "pinned":
            check_placement([d.name for d in self.descriptors])
        directory = {
            self.identities[n].peer_id: self._name(
                n if n in ("validator", "coordinator") else f"hospital:{n}"
            )
            for n in self.identities
            if n not in ("router", "auditor") and (not self._over_axl or n in _SERVICES)
        }
        if self.remote_peers:  # remote nodes send their audit events through the router
            directory[self.identities["auditor"].peer_id] = self._name("auditor")
        pin = self.cfg.placement == "pinned"
        earlier = self._write_signed_roster()
        auditor = named_actor(Auditor, self._name("auditor"), here=pin).remote(
            seed["auditor"].seed, roster_json, self.cfg.audit_path, self.cfg.database_url,
            run_id=self.run_id, run_info=self._run_info(),
            router=self._by_name("router") if self.cfg.witness_dir else None,
            signer_rosters=earlier,
        )
        router = named_actor(Router, self._name("router"), self.cfg.restarts, here=pin).remote(
            seed["router"].seed, roster_json, self._by_name("auditor"), self.cfg.seed,
            self.cfg.capture_envelopes,
            directory, NAMESPACE,
        )
        validator = named_actor(
            Validator, self._name("validator"), self.cfg.restarts, here=pin
        ).remote(
            seed["validator"].seed,
            roster_json,
            self._by_name("router"),
            self._by_name("auditor"),
            *self._validator_bounds(),
            self.cfg.assumed_byzantine,
        )
        coord_cfg = CoordinatorConfig(
            n_features=len(self.info.feature_names),
            n_classes=len(self.info.class_names),
            spec_hash=spec_hash(self.info),
            train=self.cfg.train,
            aggregator=self.cfg.aggregator,
            n_byzantine=self.cfg.assumed_byzantine,
            server_optimizer=self.cfg.server_optimizer,
            server_lr=self.cfg.server_lr,
            server_momentum=self.cfg.server_momentum,
            min_updates=self.cfg.quorum,
            round_timeout_s=self.cfg.round_timeout_s,
            setup_timeout_s=self.cfg.setup_timeout_s,
            pace_s=self.cfg.pace_s,
            round_retries=self.cfg.round_retries,
            privacy=self.privacy,
            secure_aggregation=self.cfg.secure_aggregation,
            run_id=self.run_id,
            cross_baselines=self.cfg.cross_baselines_active,
        )
        self._coord_args = (seed["coordinator"].seed, roster_json, router, auditor, coord_cfg)
        coordinator = named_actor(Coordinator, self._name("coordinator"), here=pin).remote(
            *self._coord_args
        )
        behaviour = dict(self.cfg.behaviours)
        unknown = set(behaviour) - {d.name for d in self.descriptors}
        if unknown:
            raise ConfigError(f"behaviours name unknown sites: {sorted(unknown)}")
        colluding = [n for n, b in behaviour.items() if b in COLLUDING | FRAMING]
        # Framing attacks target the first honest site (medimesh.attacks.framing_victim).
        victim = framing_victim([d.name for d in self.descriptors], behaviour)
        colluders = (
            named_actor(Colluders, self._name("adversary:colluders")).remote(
                len([n for n in colluding if behaviour[n] in COLLUDING]),
                victim=next((d for d in self.descriptors if d.name == victim), None),
            )
            if colluding
            else None
        )
        axl: dict[str, Any] = {}
        if self._over_axl:  # the front first: its mailboxes must exist before setup
            from medimesh.actors.axl_hospital import AxlHospital

            self._start_front(router, [self.identities[d.name].peer_id
                                       for d in self.descriptors])
            axl = {"axl_url": self.front.url, "axl_pin": self.front.pin}
        hospital_class = AxlHospital if self._over_axl else Hospital
        hospitals = {
            d.name: named_actor(
                self._hospital_classes.get(d.name, AttackingHospital if d.name in behaviour
                                           else hospital_class),
                self._name(f"hospital:{d.name}"),
                self.cfg.restarts,
                {hospital_resource(d.name): 1} if self.cfg.placement == "pinned" else None,
            ).remote(
                seed[d.name].seed,
                roster_json,
                self._by_name("router"),
                self._by_name("auditor"),
                d,
                behaviour.get(d.name, "honest"),
                self._by_name("adversary:colluders") if d.name in colluding else None,
                self.cfg.n_byzantine,
                cross_baselines=self.cfg.cross_baselines_active,
                secure_aggregation=self.cfg.secure_aggregation is not None,
                witness_dir=self.witness_path(d.name),
                policy=PolicyConfig.from_run(self.privacy),
                state_dir=(
                    None if self.cfg.state_dir is None
                    else str(Path(self.cfg.state_dir).resolve() / d.name)
                ),
                **axl,
            )
            for d in self.descriptors
        }
        self._colluders = colluders
        self.handles = {
            "auditor": auditor,
            "router": router,
            "validator": validator,
            "coordinator": coordinator,
            **hospitals,
        }
        regs = [
            router.register.remote(self.identities[n].peer_id, h)
            for n, h in self.handles.items()
            if n not in ("router", "auditor") and (not self._over_axl or n in _SERVICES)
        ]
        if self.remote_peers:
            regs.append(router.register.remote(self.identities["auditor"].peer_id, auditor))
        ray.get(regs)
        if self.remote_peers:
            self._start_front(router, list(self.remote_peers.values()))
        self.hospital_info = []
        for name, h in hospitals.items():
            try:
                self.hospital_info.append(ray.get(h.info.remote()))
            except ray.exceptions.RayActorError as exc:
                self.shutdown()
                cause = error_cause(exc)
                raise ConfigError(f"hospital {name} could not load its data: {cause}") from None
        t_actors = time.perf_counter()
        try:
            self.setup_summary = ray.get(coordinator.setup.remote())
        except ray.exceptions.RayTaskError as exc:
            if not (self.remote_peers and isinstance(exc.cause, QuorumNotReached)):
                raise
            self.setup_summary = {}  # nobody answered: name them all
            self._remote_info(wait_s=0)
        if self.remote_peers:
            self.hospital_info = self._remote_info()
        if self.privacy is not None:  # δ must be below 1/N for the N patients it protects
            try:
                check_delta(self.privacy.delta, int(self.setup_summary["n_train"]))
            except ConfigError:
                self.shutdown()
                raise
        t_setup = time.perf_counter()
        self.timings = {
            "ray_init_s": t_ray - t0,
            "actors_s": t_actors - t_ray,
            "setup_round_s": t_setup - t_actors,
            "startup_s": t_setup - t0,
        }
        return self.timings

    def _start_front(self, router: Any, peers: list[str]) -> None:
        """Serve the AXL API for ``peers`` (each gets a mailbox at the router)."""
        from medimesh.node.front import parse_listen, start_front

        host, port = parse_listen(self.cfg.axl_listen)
        self.front = start_front(router, peers, host=host, port=port,
                                 tls_seed=self.identities["router"].seed, roster=self.roster)
        if self.on_front is not None:
            self.on_front(self.front)

    def _remote_info(self, wait_s: float = 10.0) -> list[dict[str, Any]]:
        """Counts the remote hospitals reported at setup (from the coordinator's signed
        checkpoint); a hospital that did not answer is an error naming it."""
        deadline = time.monotonic() + wait_s
        cp = ray.get(self.handles["auditor"].latest_checkpoint.remote())
        while cp is None and time.monotonic() < deadline:  # the checkpoint is fire-and-forget
            time.sleep(0.1)
            cp = ray.get(self.handles["auditor"].latest_checkpoint.remote())
        state = cp["state"] if cp is not None else {}
        committed = {str(k): int(v) for k, v in state.get("committed", {}).items()}
        tests = {str(k): int(v) for k, v in state.get("test_sizes", {}).items()}
        refused = set(self.setup_summary.get("refused", {}))
        silent = [n for n, p in self.remote_peers.items()
                  if p not in committed and n not in refused]
        if silent:
            url = self.front.url if self.front is not None else "?"
            self.shutdown()
            raise ConfigError(
                f"setup: no answer within {self.cfg.setup_timeout_s:g} s from "
                f"{', '.join(silent)} (is `medimesh node hospital --axl {url}` running there?)"
            )
        return [{"name": n, "peer_id": p, "n_train": committed.get(p, 0),
                 "n_test": tests.get(p, 0), "remote": True}
                for n, p in self.remote_peers.items()]

    @property
    def signed_roster_path(self) -> Path | None:
        """Where this run's signed roster is (with ``roster_dir``)."""
        return Path(self.cfg.roster_dir) / f"{self.run_id}.json" if self.cfg.roster_dir else None

    def witness_path(self, site: str) -> str | None:
        """A hospital's witness directory (with ``witness_dir``)."""
        return str(Path(self.cfg.witness_dir) / site) if self.cfg.witness_dir else None

    def _write_signed_roster(self) -> list[str]:
        """Write this run's roster signed by every member (the runtime holds every key here);
        return the other signed rosters in ``roster_dir`` that verify (earlier runs)."""
        path = self.signed_roster_path
        if path is None:
            return []
        from medimesh.signed_roster import UnverifiedRoster, sign_all, verify_signed_roster

        path.parent.mkdir(parents=True, exist_ok=True)
        earlier = []
        for other in sorted(path.parent.glob("*.json")):
            text = other.read_text()
            try:
                verify_signed_roster(text)
            except (UnverifiedRoster, ConfigError):
                continue  # not a signed roster: its members are not trusted signers
            earlier.append(text)
        if self.cfg.roster_file is not None and self.remote_peers:  # already signed by all
            path.write_text(Path(self.cfg.roster_file).read_text())
        else:
            path.write_text(sign_all(self.roster, self.identities.values()) + "\n")
        return earlier

    def _run_info(self) -> dict[str, Any]:
        """What the store keeps about this run beside its id (shown by ``/runs``)."""
        return {"dataset": self.cfg.dataset, "hospitals": self.cfg.n_sites,
                "rounds_planned": self.cfg.rounds, "seed": self.cfg.seed,
                "aggregator": self.cfg.aggregator,
                "cross_baselines": self.cfg.cross_baselines_active}

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
        name = self._name(f"coordinator-r{self.restarts}")
        coordinator = named_actor(
            Coordinator, name, here=self.cfg.placement == "pinned"
        ).remote(*self._coord_args)
        ray.get(self.handles["router"].register.remote(
            self.identities["coordinator"].peer_id, coordinator
        ))
        self.handles["coordinator"] = coordinator
        self._seen_round = 0
        return dict(ray.get(coordinator.resume.remote()))

    def router_name(self) -> str:
        """The router's actor name (the oracle reads /network from it)."""
        return self._name("router")

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
                if n in _SERVICES:
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
        if name not in self.handles or name in _SERVICES:
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
        extra = [self._colluders] if getattr(self, "_colluders", None) is not None else []
        if self.front is not None:
            self.front.stop()
            self.front = None
        for h in [*self.handles.values(), *extra]:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(h)
        self.handles = {}
