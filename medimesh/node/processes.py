"""``medimesh demo --sites processes``: every hospital as its own OS process over AXL.

The demo plays every party of deploy/README.md step 12 on one machine, in a folder of its own
(``.medimesh/processes/<id>/``): the operator's four keys and the roster in ``operator/``;
each site's key, roster copy, spec, CSV, ``state/`` and ``node.log`` in ``<site>/``. The demo
holds every key, so it signs the roster for every member at once (``sign_all``): in a real
consortium each site makes its key on its own machine and signs in turn. The consortium runs
in the demo's process (medimesh.node.consortium); each hospital is
``python -m medimesh.cli node hospital …`` started with the site's folder as working
directory, stopped with SIGTERM (then SIGKILL after a timeout), and asked by the kernel to
stop should the demo itself die (Linux ``PR_SET_PDEATHSIG``): nothing is left running.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from medimesh.errors import ConfigError
from medimesh.identity import Role

__all__ = ["OPERATOR_KEYS", "PROCESSES_DIR", "SiteProcess", "SiteProcesses", "write_site_data"]

PROCESSES_DIR = Path(".medimesh") / "processes"
OPERATOR_KEYS: tuple[Role, ...] = ("router", "auditor", "validator", "coordinator")
STOP_TIMEOUT_S = 15.0


def write_site_data(
    dataset: str, out: Path, *, hospitals: int, seed: int, alpha: float, n_diseases: int,
    data_dir: str | None,
) -> tuple[Path, tuple[tuple[str, Path], ...]]:
    """Each site's own CSV plus the consortium's spec.json, written to ``out``: the rare or
    sparse cohort (``hospitals`` sites) or the four heart centres. Returns (spec, sites)."""
    if dataset == "rare":
        from medimesh.data.cohort import CohortConfig
        from medimesh.data.cohort_csv import write_sites

        try:
            config = CohortConfig(n_hospitals=hospitals, seed=seed, alpha=alpha,
                                  n_diseases=n_diseases)
        except ValueError as exc:
            raise ConfigError(f"rare cohort: {exc}") from None
        spec, sites, _ = write_sites(config, out)
        return spec, sites
    if dataset == "sparse":
        from medimesh.data.sparse import SparseConfig, write_consortium

        try:
            files = write_consortium(SparseConfig(n_hospitals=hospitals, seed=seed, alpha=alpha),
                                     out)
        except ValueError as exc:
            raise ConfigError(f"sparse consortium: {exc}") from None
        return files.spec, files.sites
    if dataset == "heart":
        from medimesh.data.heart import HeartDataError, export_csv

        try:
            spec, sites, _ = export_csv(out, Path(data_dir) if data_dir else None)
        except HeartDataError as exc:
            raise ConfigError(str(exc)) from None
        return spec, sites
    raise ConfigError(f"--sites processes writes its own site files: --dataset rare, sparse or "
                      f"heart, not {dataset}")


@dataclass
class SiteProcess:
    """One hospital's folder and, once launched, its process."""

    name: str
    folder: Path
    peer_id: str
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    def describe(self) -> dict[str, Any]:
        p = self.proc
        return {"name": self.name, "peer_id": self.peer_id, "folder": str(self.folder),
                "log": str(self.folder / "node.log"), "state": str(self.folder / "state"),
                "pid": None if p is None else p.pid,
                "exit_code": None if p is None else p.poll()}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the demo dies


class SiteProcesses:
    """The demo's consortium folder and the hospital processes it starts and stops."""

    def __init__(self, root: Path, sites: list[SiteProcess]) -> None:
        self.root = root
        self.sites = sites

    @property
    def operator(self) -> Path:
        return self.root / "operator"

    @property
    def keys(self) -> Path:
        return self.operator / "keys"

    @property
    def roster(self) -> Path:
        return self.operator / "roster.json"

    @property
    def spec(self) -> Path:
        return self.operator / "spec.json"

    @classmethod
    def prepare(
        cls, root: Path, dataset: str, *, hospitals: int, seed: int, alpha: float,
        n_diseases: int = 10, data_dir: str | None = None,
    ) -> SiteProcesses:
        """Keys for every member, the roster signed by all, each site's CSV and the spec."""
        from medimesh.identity import Member, Roster
        from medimesh.keys import load_key, new_key, save_signed_roster
        from medimesh.signed_roster import sign_all

        if root.exists():
            raise ConfigError(f"{root} exists already")
        operator = root / "operator"
        spec, written = write_site_data(dataset, root / "data", hospitals=hospitals, seed=seed,
                                        alpha=alpha, n_diseases=n_diseases, data_dir=data_dir)
        operator.mkdir(parents=True)
        shutil.copy(spec, operator / "spec.json")
        identities = [load_key(new_key(n, operator / "keys").key_file) for n in OPERATOR_KEYS]
        roster = Roster()
        for role, ident in zip(OPERATOR_KEYS, identities, strict=True):
            roster.add(Member(role, role, ident.peer_id))
        sites = []
        for name, csv in written:
            folder = root / name
            ident = load_key(new_key(name, folder / "keys").key_file)
            identities.append(ident)
            roster.add(Member(name, "hospital", ident.peer_id))
            os.replace(csv, folder / csv.name)  # the site's rows live in its folder only
            shutil.copy(spec, folder / "spec.json")
            sites.append(SiteProcess(name, folder, ident.peer_id))
        shutil.rmtree(root / "data")
        save_signed_roster(sign_all(roster, identities), operator / "roster.json")
        for s in sites:
            shutil.copy(operator / "roster.json", s.folder / "roster.json")
        return cls(root, sites)

    def command(self, site: SiteProcess, axl: str) -> list[str]:
        """deploy/README.md step 12's ``node hospital`` command, run in the site's folder."""
        return [sys.executable, "-m", "medimesh.cli", "node", "hospital",
                "--key", f"keys/{site.name}.key", "--roster", "roster.json",
                "--spec", "spec.json", "--site", f"{site.name}.csv", "--state", "state",
                "--axl", axl]

    def launch(self, axl: str) -> None:
        """Start every hospital process against the AXL front at ``axl``."""
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)  # a hospital never joins the consortium's Ray
        for site in self.sites:
            site.log = (site.folder / "node.log").open("ab")
            site.proc = subprocess.Popen(
                self.command(site, axl), cwd=site.folder, env=env, stdin=subprocess.DEVNULL,
                stdout=site.log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def running(self) -> list[SiteProcess]:
        return [s for s in self.sites if s.proc is not None and s.proc.poll() is None]

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
        """SIGTERM every running hospital (each flushes its audit events and exits), then
        SIGKILL whoever is still running after ``timeout_s``; returns the names killed."""
        for s in self.running():
            assert s.proc is not None
            s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        killed = [s.name for s in self.running()]
        for s in self.running():
            assert s.proc is not None
            s.proc.kill()
        for s in self.sites:
            if s.proc is not None:
                s.proc.wait()
            if s.log is not None:
                s.log.close()
                s.log = None
        return killed

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.sites]
