"""A run's configuration and the data recipes it ships: pure, no Ray.

:class:`RunConfig` is everything a run needs (validated when built); :func:`site_descriptors`
turns it into one small :class:`~medimesh.sites.SiteDescriptor` per hospital, the only thing
about data the driver ships; :func:`spec_hash` names the agreed data model.
``medimesh.actors.runtime`` re-exports these under their old import path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medimesh.aggregation import DEFAULT as DEFAULT_AGGREGATOR
from medimesh.errors import ConfigError
from medimesh.model import TrainConfig
from medimesh.privacy import PrivacyConfig
from medimesh.release import spec_digest
from medimesh.secagg import SecAggConfig
from medimesh.server_opt import make_server_optimizer
from medimesh.sites import DatasetInfo, SiteDescriptor

__all__ = ["DASHBOARD_PORT", "METRICS_PORT", "RunConfig", "site_descriptors", "spec_hash"]

DASHBOARD_PORT = 8265
"""Ray's own default dashboard port; ``--ray-dashboard-port`` moves it."""
METRICS_PORT = 8266
"""Where our local Ray's metrics agent serves Prometheus text (Ray's default: a random port)."""


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
