"""``medimesh bench operator``: every attack an operator (coordinator, database, its admin) can try.

Each scenario performs one attack against the real system — real Ray actors, real PostgreSQL,
real keys — and reports what happened: attempted, detected or refused, by whom, how (the named
refusal or detection) and what the honest parties lost. The tests in ``tests/test_operator_*.py``
run the same scenarios and assert on their outcome, so the bench and the tests cannot drift.

A scenario module (``medimesh/bench/operator/<area>.py``) exposes ``SCENARIOS``: a mapping from
an attack name to a function taking a :class:`Lab`. Ray must already be initialised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["AREAS", "AttackOutcome", "Lab", "Scenario", "run_operator", "scenarios"]


@dataclasses.dataclass(frozen=True)
class AttackOutcome:
    """What one attack did. ``detected`` means refused or detected, with a name for it."""

    attack: str  # e.g. "secagg_fake_peers"
    number: int  # the attack's number in issue 15 (1-8); 0 for outside callers
    attempted: bool  # the attack was carried out against the running system
    detected: bool  # it ended in a refusal or a named detection
    by: str  # who caught it: "hospital St-Mary", "audit verify --witness", "oracle"
    how: str  # the named refusal or detection (audit event kind, error, exit code)
    honest_loss: str  # what honest parties lost: "nothing", or what exactly
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "details": dict(self.details)}


@dataclasses.dataclass
class Lab:
    """Where a scenario runs: its own directory and a way to get fresh, empty databases."""

    workdir: Path
    admin_url: str  # a PostgreSQL server the scenario may create databases on

    def new_database(self) -> str:
        """A fresh, empty database on the lab's server (its URL)."""
        return self._create("")

    def copy_database(self, url: str, wait_s: float = 30.0) -> str:
        """A new database on the lab's server that starts as an exact copy of ``url``'s
        (PostgreSQL's ``CREATE DATABASE … TEMPLATE``): several scenarios tamper, each with its
        own copy, with what one finished run left. Nobody may be connected to ``url`` (a
        stopped consortium's auditor may take a moment to hang up: retried for ``wait_s``)."""
        from urllib.parse import urlsplit

        return self._create(urlsplit(url).path.lstrip("/"), wait_s)

    def _create(self, template: str, wait_s: float = 0.0) -> str:
        import asyncpg

        name = f"op_{uuid.uuid4().hex[:12]}"
        sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")

        async def create() -> None:
            conn = await asyncpg.connect(self.admin_url)
            try:
                deadline = time.monotonic() + wait_s
                while True:
                    try:
                        await conn.execute(sql)
                        return
                    except asyncpg.ObjectInUseError:  # the template still has a session
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
            finally:
                await conn.close()

        asyncio.run(create())
        # Replace the URL's path only: pgserver's URL carries a socket path in ?host=/….
        from urllib.parse import urlsplit, urlunsplit

        return urlunsplit(urlsplit(self.admin_url)._replace(path=f"/{name}"))

    def subdir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


Scenario = Callable[[Lab], AttackOutcome]

# One module per area of issue 15; each defines SCENARIOS.
AREAS = ("secagg", "hospital_policy", "audit_trail", "models", "setup_reports", "outside")


def scenarios() -> dict[str, Scenario]:
    """All scenarios, by attack name, in area order."""
    found: dict[str, Scenario] = {}
    for area in AREAS:
        module = importlib.import_module(f"medimesh.bench.operator.{area}")
        for name, fn in module.SCENARIOS.items():
            if name in found:
                raise ValueError(f"attack {name!r} defined twice")
            found[name] = fn
    return found


def run_operator(
    only: list[str] | None = None, say: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run every scenario (or ``only`` these) on a throwaway embedded PostgreSQL and local Ray."""
    import ray

    from medimesh.store import embedded_server

    table = scenarios()
    wanted = only if only else list(table)
    unknown = sorted(set(wanted) - set(table))
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; known: {sorted(table)}")
    started_ray = False
    if not ray.is_initialized():
        import os

        from medimesh.actors.runtime import choose_auth_mode

        choose_auth_mode(os.environ)  # as the CLI does: tokens on, without Ray's notice
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 namespace="medimesh-bench-operator", configure_logging=False)
        started_ray = True
    outcomes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medimesh-operator-") as tmp:
        server = embedded_server(Path(tmp) / "pg")
        try:
            for name in wanted:
                lab = Lab(Path(tmp) / name, server.get_uri())
                lab.workdir.mkdir(parents=True)
                t0 = time.perf_counter()
                outcome = table[name](lab).to_dict()
                outcome["seconds"] = round(time.perf_counter() - t0, 2)
                outcomes.append(outcome)
                if say is not None:
                    verdict = "caught" if outcome["detected"] else "NOT CAUGHT"
                    say(f"{name}: {verdict} by {outcome['by']} ({outcome['how']})")
        finally:
            server.cleanup()
            if started_ray:
                ray.shutdown()
    caught = sum(1 for o in outcomes if o["attempted"] and o["detected"])
    return {
        "attacks": outcomes,
        "attempted": sum(1 for o in outcomes if o["attempted"]),
        "caught": caught,
        "all_caught": bool(outcomes) and caught == len(outcomes),
    }
