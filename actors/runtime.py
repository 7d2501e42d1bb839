"""The composition root: starts Ray, mints identities, creates and wires the named actors.

Everything with a side effect on the cluster lives here; the actor classes stay plain and the
CLI and benchmarks drive a :class:`Consortium`. Actors live in the ``medimesh`` namespace with
role and name in their actor names, so the Ray dashboard's actor view reads like the system.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from medimesh.actors.auditor import Auditor
from medimesh.actors.colluders import Colluders
from medimesh.actors.coordinator import Coordinator, CoordinatorConfig
from medimesh.actors.hospital import Hospital
from medimesh.actors.router import Router
from medimesh.actors.validator import Validator
from medimesh.aggregation import DEFAULT as DEFAULT_AGGREGATOR
from medimesh.errors import ConfigError
from medimesh.identity import Identity, Member, Roster
from medimesh.model import TrainConfig
from medimesh.sites import DatasetInfo, SiteDescriptor, dataset_info

__all__ = ["NAMESPACE", "Consortium", "RunConfig", "ensure_ray", "site_descriptors"]

NAMESPACE = "medimesh"


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything a run needs; defaults are the README's demo."""

    dataset: str = "rare"
    hospitals: int = 8
    rounds: int = 20
    seed: int = 0
    alpha: float = 0.5
    train: TrainConfig = field(default_factory=TrainConfig)
    aggregator: str = DEFAULT_AGGREGATOR
    validator_scoring: bool = True
    behaviours: tuple[tuple[str, str], ...] = ()  # (site name, behaviour) for dishonest sites
    server_momentum: float = 0.8
    min_updates: int | None = None
    round_timeout_s: float = 30.0
    max_update_norm: float = 50.0
    data_dir: str | None = None
    preprocessing: str = "flamby+missing"
    audit_path: str | None = None
    database_url: str | None = None
    capture_envelopes: int = 0
    spec: dict[str, Any] | None = None
    csv_sites: tuple[tuple[str, str], ...] = ()
    test_fraction: float = 0.3
    skip_bad_rows: bool = False
    pace_s: float = 0.0

    def __post_init__(self) -> None:
        if self.hospitals < 1:
            raise ConfigError("--hospitals must be at least 1")
        if self.rounds < 1:
            raise ConfigError("--rounds must be at least 1")
        if self.alpha <= 0:
            raise ConfigError("--alpha must be positive")
        if self.dataset not in ("rare", "heart", "csv"):
            raise ConfigError(f"unknown dataset {self.dataset!r}; expected rare, heart or csv")
        if self.dataset == "csv" and (self.spec is None or not self.csv_sites):
            raise ConfigError("the csv dataset needs --spec and at least one --site NAME=PATH")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError("--test-fraction must be in [0, 1)")
        if self.pace_s < 0:
            raise ConfigError("--pace must be zero or positive seconds")

    @property
    def n_byzantine(self) -> int:
        return sum(1 for _, b in self.behaviours if b != "honest")

    @property
    def quorum(self) -> int:
        return self.min_updates or max(1, math.ceil(self.n_sites / 2))

    @property
    def n_sites(self) -> int:
        if self.dataset == "csv":
            return len(self.csv_sites)
        return 4 if self.dataset == "heart" else self.hospitals


def site_descriptors(cfg: RunConfig) -> list[SiteDescriptor]:
    """One small recipe per hospital: the only thing about data the driver ships."""
    if cfg.dataset == "rare":
        cohort = {"n_hospitals": cfg.hospitals, "seed": cfg.seed, "alpha": cfg.alpha}
        return [
            SiteDescriptor("rare", f"hospital-{i + 1:02d}", {"cohort": cohort, "site": i})
            for i in range(cfg.hospitals)
        ]
    if cfg.dataset == "csv":
        names = [n for n, _ in cfg.csv_sites]
        if len(set(names)) != len(names):
            raise ConfigError("site names must be distinct")
        descs = []
        for name, path in cfg.csv_sites:
            if not Path(path).is_file():
                raise ConfigError(f"site {name}: {path} is not a file")
            params = {
                "path": str(Path(path).resolve()),
                "spec": cfg.spec,
                "test_fraction": cfg.test_fraction,
                "seed": cfg.seed,
                "skip_bad_rows": cfg.skip_bad_rows,
            }
            descs.append(SiteDescriptor("csv", name, params))
        return descs
    from medimesh.data import heart

    data_dir = cfg.data_dir or (str(heart.default_data_dir() or ""))
    if not data_dir or not Path(data_dir).is_dir():
        raise ConfigError(
            "heart data not found: pass --data-dir (default ../shared/data/heart when present)"
        )
    return [
        SiteDescriptor(
            "heart",
            center,
            {"data_dir": str(Path(data_dir).resolve()), "center": center,
             "preprocessing": cfg.preprocessing},
        )
        for center in heart.CENTERS
    ]


def spec_hash(info: DatasetInfo) -> str:
    """Names the agreed data model, so a site with a different schema is refused at setup."""
    doc = "\n".join([*info.feature_names, "--", *info.class_names])
    return hashlib.sha256(doc.encode()).hexdigest()


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Start a local Ray (or reuse the one already up) with clean stdout."""
    if ray.is_initialized():
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        log_to_driver=False,
        namespace=NAMESPACE,
        configure_logging=False,
    )


def _actor(cls: type, name: str) -> Any:
    return ray.remote(cls).options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0)


def _cause(exc: BaseException) -> str:
    """The last line of a remote error (e.g. "site.csv:17: column 'age': …"), not a traceback."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or line.startswith("medimesh."):
            return line.split(": ", 1)[-1] if line.startswith(("medimesh.", "ValueError")) else line
    return lines[-1] if lines else type(exc).__name__


class Consortium:
    """A running federation on Ray: router, auditor, validator, coordinator, hospitals."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.descriptors = site_descriptors(cfg)
        first = self.descriptors[0]
        self.info = dataset_info(first.kind, first.params)
        self.identities: dict[str, Identity] = {}
        self.roster = Roster()
        self.handles: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.setup_summary: dict[str, Any] = {}
        self._seen_round = 0
        # Actor names read like the architecture in the Ray dashboard ("hospital:hospital-03@…");
        # the run id keeps two federations in one Ray instance from colliding.
        self.run_id = secrets.token_hex(3)
        self.restarts = 0

    def _name(self, name: str) -> str:
        return f"{name}@{self.run_id}"

    def _enrol(self, name: str, role: Any) -> Identity:
        ident = Identity.generate()
        self.identities[name] = ident
        self.roster.add(Member(name, role, ident.peer_id))
        return ident

    def start(self) -> dict[str, float]:
        """Create and wire all actors, then run the setup round. Returns timings (s)."""
        t0 = time.perf_counter()
        ensure_ray()
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
        auditor = _actor(Auditor, self._name("auditor")).remote(
            seed["auditor"].seed, roster_json, self.cfg.audit_path, self.cfg.database_url
        )
        router = _actor(Router, self._name("router")).remote(
            seed["router"].seed, roster_json, auditor, self.cfg.seed, self.cfg.capture_envelopes
        )
        validator = _actor(Validator, self._name("validator")).remote(
            seed["validator"].seed,
            roster_json,
            router,
            auditor,
            self.cfg.max_update_norm,
            self.cfg.validator_scoring,
        )
        coord_cfg = CoordinatorConfig(
            n_features=len(self.info.feature_names),
            n_classes=len(self.info.class_names),
            spec_hash=spec_hash(self.info),
            train=self.cfg.train,
            aggregator=self.cfg.aggregator,
            n_byzantine=self.cfg.n_byzantine,
            server_momentum=self.cfg.server_momentum,
            min_updates=self.cfg.quorum,
            round_timeout_s=self.cfg.round_timeout_s,
            pace_s=self.cfg.pace_s,
        )
        self._coord_args = (seed["coordinator"].seed, roster_json, router, auditor, coord_cfg)
        coordinator = _actor(Coordinator, self._name("coordinator")).remote(*self._coord_args)
        behaviour = dict(self.cfg.behaviours)
        unknown = set(behaviour) - {d.name for d in self.descriptors}
        if unknown:
            raise ConfigError(f"behaviours name unknown sites: {sorted(unknown)}")
        colluding = [n for n, b in behaviour.items() if b in ("alie", "ipm")]
        colluders = (
            _actor(Colluders, self._name("adversary:colluders")).remote(len(colluding))
            if colluding
            else None
        )
        hospitals = {
            d.name: _actor(Hospital, self._name(f"hospital:{d.name}")).remote(
                seed[d.name].seed,
                roster_json,
                router,
                auditor,
                d,
                behaviour.get(d.name, "honest"),
                colluders if d.name in colluding else None,
                self.cfg.n_byzantine,
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
            if n not in ("router", "auditor")
        ]
        ray.get(regs)
        self.hospital_info = []
        for name, h in hospitals.items():
            try:
                self.hospital_info.append(ray.get(h.info.remote()))
            except ray.exceptions.RayActorError as exc:
                self.shutdown()
                cause = _cause(exc)
                raise ConfigError(f"hospital {name} could not load its data: {cause}") from None
        t_actors = time.perf_counter()
        self.setup_summary = ray.get(coordinator.setup.remote())
        t_setup = time.perf_counter()
        self.timings = {
            "ray_init_s": t_ray - t0,
            "actors_s": t_actors - t_ray,
            "setup_round_s": t_setup - t_actors,
            "startup_s": t_setup - t0,
        }
        return self.timings

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
        coordinator = _actor(Coordinator, name).remote(*self._coord_args)
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
        return bool(ray.get(self.handles["auditor"].flush.remote(timeout_s)))

    def final_model(self) -> dict[str, Any]:
        return dict(ray.get(self.handles["coordinator"].current_model.remote()))

    def router_stats(self) -> dict[str, Any]:
        return dict(ray.get(self.handles["router"].stats.remote()))

    def flush_audit(self) -> None:
        """Push every actor's buffered audit events to the auditor, then wait for it."""
        names = [n for n in self.handles if n != "auditor"]
        ray.get([self.handles[n].sync_audit.remote() for n in names])

    def audit_entries(self) -> list[Any]:
        self.flush_audit()
        return list(ray.get(self.handles["auditor"].entries.remote()))

    def verify_audit(self) -> dict[str, Any]:
        self.flush_audit()
        return dict(ray.get(self.handles["auditor"].verify.remote()))

    def shutdown(self) -> None:
        extra = [self._colluders] if getattr(self, "_colluders", None) is not None else []
        for h in [*self.handles.values(), *extra]:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(h)
        self.handles = {}
