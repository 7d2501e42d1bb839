"""The composition root: starts Ray, mints identities, creates and wires the named actors.

Everything with a side effect on the cluster lives here; the actor classes stay plain and the
CLI and benchmarks drive a :class:`Consortium`. Actors live in the ``medimesh`` namespace with
role and name in their actor names, so the Ray dashboard's actor view reads like the system.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import time
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from medimesh.actors.adversary_hospital import AttackingHospital
from medimesh.actors.auditor import Auditor
from medimesh.actors.base import ActorName
from medimesh.actors.colluders import Colluders
from medimesh.actors.coordinator import Coordinator, CoordinatorConfig
from medimesh.actors.hospital import Hospital
from medimesh.actors.router import Router
from medimesh.actors.validator import Validator
from medimesh.aggregation import DEFAULT as DEFAULT_AGGREGATOR
from medimesh.attacks import COLLUDING, FRAMING, framing_victim
from medimesh.errors import ConfigError, QuorumNotReached
from medimesh.identity import Identity, Member, Roster
from medimesh.model import TrainConfig
from medimesh.policy import PolicyConfig
from medimesh.privacy import PrivacyConfig, check_delta
from medimesh.release import spec_digest
from medimesh.routing import Faults
from medimesh.runs import new_run_id
from medimesh.secagg import SecAggConfig
from medimesh.server_opt import make_server_optimizer
from medimesh.sites import DatasetInfo, SiteDescriptor, dataset_info

__all__ = [
    "DASHBOARD_PORT", "METRICS_PORT", "NAMESPACE", "Consortium", "RunConfig", "check_placement",
    "choose_auth_mode", "ensure_ray", "free_port", "hospital_resource", "ray_endpoints",
    "ray_init_args", "site_descriptors",
]

NAMESPACE = "medimesh"
DASHBOARD_PORT = 8265
"""Ray's own default dashboard port; ``--ray-dashboard-port`` moves it."""
METRICS_PORT = 8266
"""Where our local Ray's metrics agent serves Prometheus text (Ray's default: a random port)."""
LOOPBACK = "127.0.0.1"
_SERVICES = ("router", "auditor", "validator", "coordinator")


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything a run needs; defaults are the README's demo."""

    dataset: str = "rare"
    hospitals: int = 8
    rounds: int = 20
    seed: int = 0
    alpha: float = 0.5
    n_diseases: int = 10  # rare cohort: the ten panel diseases + Orphanet differentials
    train: TrainConfig = field(default_factory=TrainConfig)
    aggregator: str = DEFAULT_AGGREGATOR
    validator_scoring: bool = True
    behaviours: tuple[tuple[str, str], ...] = ()  # (site name, behaviour) for dishonest sites
    # Server optimizer (medimesh.server_opt): fedavgm, fedadam, fedyogi or fedadagrad; lr and
    # momentum (the adaptive rules' β1) None = the rule's default (server_opt.DEFAULT_*).
    server_optimizer: str = "fedavgm"
    server_lr: float | None = None
    server_momentum: float | None = None
    min_updates: int | None = None
    round_timeout_s: float = 30.0
    max_update_norm: float = 50.0
    data_dir: str | None = None
    preprocessing: str = "flamby+missing"
    audit_path: str | None = None
    database_url: str | None = None
    capture_envelopes: int = 0
    spec: dict[str, Any] | None = None
    csv_sites: tuple[tuple[str, str], ...] = ()  # (name, CSV file or phenopacket directory)
    # Phenopacket sites: the label/assay code mapping file's JSON (medimesh.phenopackets), None
    # = the rare panel's built-in ORPHA codes only.
    label_codes: dict[str, Any] | None = None
    test_fraction: float = 0.3
    skip_bad_rows: bool = False
    pace_s: float = 0.0
    # Differential privacy (docs/privacy.md): calibrated once at start, then every DP round
    # sends clipped gradients; the validator's bound becomes the clip norm (central mode) and
    # its statistical scoring is off (a data-dependent selection would break the DP bound).
    privacy: PrivacyConfig | None = None
    keys_dir: str | None = None  # NAME.key files + roster.json (`medimesh keys`, `roster`)
    # How many dishonest hospitals the defence is built to tolerate (f). A deployment declares
    # it; None falls back to the number of sites ``behaviours`` makes dishonest (drills only).
    tolerate: int | None = None
    # "pinned": each hospital actor needs its node's custom resource "hospital:<name>" (a
    # cluster from deploy/cluster.yaml); "any": anywhere (one machine).
    placement: str = "any"
    restarts: int = 3  # Ray restarts a crashed hospital, router or validator this many times
    round_retries: int = 3  # a round without quorum is run again (same base model)
    # Secure aggregation (docs/privacy.md §4): hospitals send masked, clipped, example-weighted
    # deltas; the coordinator unmasks only their sum (FedAvg: no robust rule, no scoring) and
    # the validator keeps its protocol checks. None = plaintext updates.
    secure_aggregation: SecAggConfig | None = None
    # Ray to join (``--ray-address``); None: our own local Ray unless RAY_ADDRESS is set.
    ray_address: str | None = None
    # Cross-site baselines (docs/privacy.md): at setup each hospital's isolated model goes,
    # sealed, to its peer hospitals, which score it on their own test patients and report
    # counts. Off under DP or secure aggregation whatever this says (cross_baselines_active).
    cross_baselines: bool = True
    # Our own local Ray only (ignored when joining one): the Ray dashboard on 127.0.0.1 at
    # this port, and the metrics agent's Prometheus endpoint at ray_metrics_port (None: a free
    # port Ray picks). docs/metrics.md.
    ray_dashboard: bool = False
    ray_dashboard_port: int = DASHBOARD_PORT
    ray_metrics_port: int | None = None
    # Issue 15 (docs/threat-model/audit_trail.md). roster_dir: the run writes its roster, signed
    # by every member, to ROSTER_DIR/<run id>.json, and the auditor also accepts signers from the
    # other signed rosters there (earlier runs on the same chain). witness_dir: each hospital
    # keeps the auditor's signed chain heads in WITNESS_DIR/<site>/heads.jsonl.
    roster_dir: str | None = None
    witness_dir: str | None = None
    # Each hospital's own directory (<state_dir>/<site>): its policy.toml and the policy state
    # that must survive a restart (local-DP spend, last round). None: kept in memory only, and
    # a hospital Ray restarts refuses local-DP releases (medimesh.policy, docs/privacy.md §6).
    state_dir: str | None = None
    # Issue 16 (medimesh.node, deploy/README.md): the roster's hospitals run as their own
    # processes (`medimesh node hospital`) over the AXL front this run serves on axl_listen
    # (HOST:PORT); none is started here. Needs keys_dir (the operator's own keys), roster_file
    # (the roster every member signed) and the spec (dataset "csv", no --site).
    remote_hospitals: tuple[str, ...] = ()
    roster_file: str | None = None
    axl_listen: str = "127.0.0.1:0"
    setup_timeout_s: float = 60.0
    # "axl": the hospital actors get no push from the router; each polls the AXL front this
    # run serves (medimesh.actors.axl_hospital), so rounds cross the AXL HTTP path (the bench).
    hospital_transport: str = "ray"

    def __post_init__(self) -> None:
        if self.hospitals < 1:
            raise ConfigError("--hospitals must be at least 1")
        if self.rounds < 1:
            raise ConfigError("--rounds must be at least 1")
        if self.alpha <= 0:
            raise ConfigError("--alpha must be positive")
        if self.n_diseases != 10:
            from medimesh.data.cohort import MAX_DISEASES, PANEL_SIZE

            if self.dataset != "rare":
                raise ConfigError("--diseases applies to the rare cohort only (--dataset rare)")
            if not PANEL_SIZE <= self.n_diseases <= MAX_DISEASES:
                raise ConfigError(
                    f"--diseases must be between {PANEL_SIZE} (the hand-picked panel) and "
                    f"{MAX_DISEASES}, got {self.n_diseases}"
                )
        if self.dataset not in ("rare", "sparse", "heart", "csv", "phenopackets"):
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; expected rare, sparse, heart, csv or "
                "phenopackets"
            )
        if self.remote_hospitals:
            _check_remote(self)
        if self.hospital_transport not in ("ray", "axl"):
            raise ConfigError(f"hospital transport must be 'ray' or 'axl', not "
                              f"{self.hospital_transport!r}")
        if self.dataset == "csv" and (
            self.spec is None or not (self.csv_sites or self.remote_hospitals)
        ):
            raise ConfigError("the csv dataset needs --spec and at least one --site NAME=PATH")
        if self.dataset == "phenopackets" and not self.csv_sites:
            raise ConfigError("phenopacket sites need at least one --site NAME=DIRECTORY")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError("--test-fraction must be in [0, 1)")
        if self.tolerate is not None and self.tolerate < 0:
            raise ConfigError("--tolerate must be zero or a positive number of hospitals")
        if self.round_timeout_s <= 0:
            raise ConfigError("--round-timeout must be a positive number of seconds")
        if self.placement not in ("any", "pinned"):
            raise ConfigError(f"--placement must be 'any' or 'pinned', not {self.placement!r}")
        if self.restarts < 0 or self.round_retries < 0:
            raise ConfigError("restarts and round retries must be zero or positive")
        if self.pace_s < 0:
            raise ConfigError("--pace must be zero or positive seconds")
        make_server_optimizer(self.server_optimizer, self.server_lr, self.server_momentum)
        if self.privacy is not None and self.server_optimizer != "fedavgm":
            raise ConfigError("differential privacy steps with FedAvgM (its own server lr); "
                              f"--server-optimizer {self.server_optimizer} is not wired for DP")
        if self.secure_aggregation is not None:
            if self.privacy is not None:
                raise ConfigError("secure aggregation with differential privacy is not wired yet")
            if self.n_sites < 2:
                raise ConfigError("secure aggregation needs at least two hospitals")

    @property
    def cross_baselines_active(self) -> bool:
        """Cross-site baselines reveal isolated models to peers: never with DP or SecAgg."""
        return self.cross_baselines and self.privacy is None and self.secure_aggregation is None

    @property
    def n_byzantine(self) -> int:
        return sum(1 for _, b in self.behaviours if b != "honest")

    @property
    def assumed_byzantine(self) -> int:
        """f for the aggregation rule: the declared tolerance, not who actually cheats."""
        return self.n_byzantine if self.tolerate is None else self.tolerate

    @property
    def quorum(self) -> int:
        return self.min_updates or max(1, math.ceil(self.n_sites / 2))

    @property
    def n_sites(self) -> int:
        if self.dataset in ("csv", "phenopackets"):
            return len(self.csv_sites) + len(self.remote_hospitals)
        return 4 if self.dataset == "heart" else self.hospitals


def _check_remote(cfg: RunConfig) -> None:
    """Remote hospitals: the operator holds its own keys and a signed roster, nothing else."""
    if cfg.keys_dir is None or cfg.roster_file is None:
        raise ConfigError("remote hospitals need --keys (the operator's key files) and --roster "
                          "(the roster every member signed)")
    if cfg.dataset != "csv" or cfg.spec is None or cfg.csv_sites:
        raise ConfigError("remote hospitals need the consortium's --spec and no local --site")
    if cfg.behaviours or cfg.placement != "any":
        raise ConfigError("remote hospitals run their own code: no behaviours, no placement")
    if cfg.setup_timeout_s <= 0:
        raise ConfigError("--setup-timeout must be a positive number of seconds")


def site_descriptors(cfg: RunConfig) -> list[SiteDescriptor]:
    """One small recipe per hospital: the only thing about data the driver ships."""
    if cfg.dataset == "rare":
        cohort: dict[str, Any] = {"n_hospitals": cfg.hospitals, "seed": cfg.seed,
                                  "alpha": cfg.alpha}
        if cfg.n_diseases != 10:  # default descriptors stay as they were
            cohort["n_diseases"] = cfg.n_diseases
        return [
            SiteDescriptor("rare", f"hospital-{i + 1:02d}", {"cohort": cohort, "site": i})
            for i in range(cfg.hospitals)
        ]
    if cfg.dataset == "sparse":
        from medimesh.data.sparse import SparseConfig, site_name

        # Validated here, so a bad recipe fails in the driver, not in six actors at once.
        try:
            recipe = SparseConfig(n_hospitals=cfg.hospitals, seed=cfg.seed, alpha=cfg.alpha)
        except ValueError as exc:
            raise ConfigError(f"sparse consortium: {exc}") from None
        params = recipe.to_params()
        return [
            SiteDescriptor("sparse", site_name(i), {"cohort": params, "site": i})
            for i in range(cfg.hospitals)
        ]
    if cfg.dataset == "csv":
        names = [n for n, _ in cfg.csv_sites]
        if len(set(names)) != len(names):
            raise ConfigError("site names must be distinct")
        descs = []
        for name, path in cfg.csv_sites:
            if Path(path).is_dir():  # a directory of phenopackets read into the spec's columns
                descs.append(_phenopacket_descriptor(cfg, name, path))
                continue
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
    if cfg.dataset == "phenopackets":
        return _phenopacket_descriptors(cfg)
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


def _phenopacket_descriptors(cfg: RunConfig) -> list[SiteDescriptor]:
    """Rare-panel consortium of phenopacket directories: one descriptor per directory."""
    names = [n for n, _ in cfg.csv_sites]
    if len(set(names)) != len(names):
        raise ConfigError("site names must be distinct")
    return [_phenopacket_descriptor(cfg, name, path) for name, path in cfg.csv_sites]


def _phenopacket_descriptor(cfg: RunConfig, name: str, path: str) -> SiteDescriptor:
    """A directory of phenopackets: its path, the code mapping and the spec (if any), no rows."""
    from medimesh.phenopackets import (
        PhenopacketError,
        load_label_codes,
        panel_label_codes,
        spec_label_codes,
    )

    if not Path(path).is_dir():
        raise ConfigError(f"site {name}: {path} is not a directory of phenopackets")
    try:
        base = panel_label_codes()
        if cfg.spec is not None:
            from medimesh.spec import SpecError, load_spec

            try:
                base = spec_label_codes(load_spec(cfg.spec).classes)
            except SpecError as exc:
                raise ConfigError(str(exc)) from None
        labels = load_label_codes(cfg.label_codes, base)
        if cfg.spec is not None:  # a wrong spec_columns mapping fails here, not in an actor
            from medimesh.phenopackets import spec_encoder

            spec_encoder(load_spec(cfg.spec), labels)
        codes = labels.to_dict()
    except PhenopacketError as exc:
        raise ConfigError(str(exc)) from None
    params = {
        "path": str(Path(path).resolve()),
        "codes": codes,
        "spec": cfg.spec,
        "test_fraction": cfg.test_fraction,
        "seed": cfg.seed,
    }
    return SiteDescriptor("phenopackets", name, params)


def spec_hash(info: DatasetInfo) -> str:
    """Names the agreed data model, so a site with a different schema is refused at setup."""
    return spec_digest(info.feature_names, info.class_names)


def ray_init_args(
    address: str | None, environ: Mapping[str, str], num_cpus: int | None = None,
    dashboard: bool = False, dashboard_port: int = DASHBOARD_PORT,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """``ray.init`` arguments: our own local Ray unless an address is given explicitly
    (``--ray-address`` or ``RAY_ADDRESS``). Plain ``ray.init()`` would join whatever cluster
    another job started on this machine ("Connecting to latest cluster")."""
    target = address or environ.get("RAY_ADDRESS") or "local"
    args: dict[str, Any] = {"address": target, "log_to_driver": False, "namespace": NAMESPACE,
                            "configure_logging": False}
    if target == "local":  # resources, dashboard and ports are chosen only when we start Ray
        args |= {"num_cpus": num_cpus, "include_dashboard": dashboard}
        if dashboard:
            args |= {"dashboard_host": LOOPBACK, "dashboard_port": dashboard_port}
        if metrics_port is not None:
            args["_metrics_export_port"] = metrics_port
    return args


def ensure_ray(
    num_cpus: int | None = None, dashboard: bool = False, address: str | None = None,
    dashboard_port: int = DASHBOARD_PORT, metrics_port: int | None = None,
) -> None:
    """Start our own local Ray (or join ``address``), with clean stdout; reuse one already up
    in this process."""
    if ray.is_initialized():
        return
    args = ray_init_args(address, os.environ, num_cpus, dashboard, dashboard_port, metrics_port)
    if args["address"] == "local":
        choose_auth_mode(os.environ)
    ray.init(**args)


def choose_auth_mode(environ: MutableMapping[str, str]) -> str:
    """Token authentication for the Ray we start, unless ``RAY_AUTH_MODE`` already says.

    Ray turns tokens on by default for a new local cluster and logs a line asking whoever
    runs it to choose; the choice is ours: the dashboard and the job API run code and show
    the actors, so they want a token (``ray get-auth-token`` prints it; the dashboard asks for
    it once). ``RAY_AUTH_MODE=disabled`` still opts out, and Ray's child processes inherit it.
    """
    mode = environ.get("RAY_AUTH_MODE")
    if mode is None:
        environ["RAY_AUTH_MODE"] = mode = "token"
        if environ is os.environ:  # this process read its Ray config at import: read it again
            from ray._raylet import Config  # type: ignore[attr-defined]  # as Ray does itself

            Config.initialize("")
    return mode


def free_port(port: int, avoid: Collection[int] = (), tries: int = 50) -> int:
    """``port`` if nothing listens on it, else the next free one above it (or any free one).

    Tried on all interfaces: a port some process holds on any address is not free for Ray's
    metrics agent either.
    """
    for candidate in [*range(port, min(port + tries, 65536)), 0]:
        if candidate in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise ConfigError("no free port")  # pragma: no cover - port 0 always binds


def ray_endpoints() -> dict[str, str | None]:
    """URLs of the running Ray's dashboard (None without one) and of this node's metrics.

    The dashboard's ``/api/prometheus/sd`` lists every node's metrics endpoint (Prometheus
    HTTP service discovery); ``metrics`` is this node's (docs/metrics.md).
    """
    from ray._private.worker import get_dashboard_url  # what ray.init's context reports

    from medimesh.actors.telemetry import metrics_endpoint

    url = str(get_dashboard_url() or "")  # type: ignore[no-untyped-call]  # "host:port"
    return {
        "dashboard": (url if "://" in url else f"http://{url}") if url else None,
        "metrics": metrics_endpoint(),
    }


def _actor(
    cls: type, name: str, restarts: int = 0, resources: dict[str, float] | None = None,
    here: bool = False,
) -> Any:
    """Actor options; ``here`` pins it to this driver's node (the head, on a cluster), so
    losing a hospital's node never takes the router, validator or coordinator with it."""
    extra: dict[str, Any] = {}
    if here:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        extra["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    return ray.remote(cls).options(
        name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=restarts,
        resources=resources or {}, **extra,
    )


def hospital_resource(site: str) -> str:
    """The custom resource a hospital's node advertises (deploy/cluster.yaml)."""
    return f"hospital:{site}"


def check_placement(sites: list[str]) -> None:
    """Refuse to start a pinned hospital whose node is missing, instead of placing it elsewhere
    (its data lives only on its own node)."""
    have: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    missing = [s for s in sites if have.get(hospital_resource(s), 0) < 1]
    if missing:
        raise ConfigError(
            "no node advertises " + ", ".join(repr(hospital_resource(s)) for s in missing)
            + "; refusing to place those hospitals elsewhere (start their nodes, or use "
            "--placement any on one machine)"
        )


def _cause(exc: BaseException) -> str:
    """The last line of a remote error (e.g. "site.csv:17: column 'age': …"), not a traceback."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or line.startswith("medimesh."):
            return line.split(": ", 1)[-1] if line.startswith(("medimesh.", "ValueError")) else line
    return lines[-1] if lines else type(exc).__name__


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
        auditor = _actor(Auditor, self._name("auditor"), here=pin).remote(
            seed["auditor"].seed, roster_json, self.cfg.audit_path, self.cfg.database_url,
            run_id=self.run_id, run_info=self._run_info(),
            router=self._by_name("router") if self.cfg.witness_dir else None,
            signer_rosters=earlier,
        )
        router = _actor(Router, self._name("router"), self.cfg.restarts, here=pin).remote(
            seed["router"].seed, roster_json, self._by_name("auditor"), self.cfg.seed,
            self.cfg.capture_envelopes,
            directory, NAMESPACE,
        )
        validator = _actor(
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
        coordinator = _actor(Coordinator, self._name("coordinator"), here=pin).remote(
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
            _actor(Colluders, self._name("adversary:colluders")).remote(
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
            d.name: _actor(
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
                cause = _cause(exc)
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
        coordinator = _actor(
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
