"""The operator's side of a consortium whose hospitals are remote: one RunConfig recipe.

``medimesh node consortium`` and ``medimesh demo --sites processes`` both run coordinator,
validator and auditor on this Ray with the roster's hospitals as their own processes over the
AXL front; both build their run configuration here (the demo starts from its own options:
aggregator, server optimizer, pace, rounds).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medimesh.errors import ConfigError

if TYPE_CHECKING:
    from medimesh.actors.runtime import RunConfig

__all__ = ["remote_config"]


def remote_config(
    *, keys: Path, roster: Path, spec: Path, axl_listen: str, base: RunConfig | None = None,
    **overrides: Any,
) -> RunConfig:
    """A run whose hospitals are exactly the verified ``roster``'s, remote over AXL.

    ``keys``: the operator's key files (router, auditor, validator, coordinator); ``spec``: the
    consortium's feature spec. ``base``: a run configuration to start from (its data fields
    are replaced); ``overrides``: any other RunConfig field."""
    from medimesh.actors.runtime import RunConfig
    from medimesh.node.hospital import load_verified_roster
    from medimesh.spec import load_spec

    names = tuple(m.name for m in load_verified_roster(roster).with_role("hospital"))
    if not names:
        raise ConfigError(f"{roster} enrols no hospital")
    fields: dict[str, Any] = {
        "dataset": "csv", "spec": load_spec(spec).to_dict(), "remote_hospitals": names,
        "keys_dir": str(keys), "roster_file": str(roster), "axl_listen": axl_listen,
        **overrides,
    }
    if base is None:
        return RunConfig(**fields)
    # The in-Ray data fields do not apply: the sites' data is in their own CSVs.
    return replace(base, csv_sites=(), n_diseases=10, label_codes=None, **fields)
