"""Where an oracle reads from and whom it answers: :class:`OracleConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medimesh.access import AccessPolicy

__all__ = ["MAX_BODY_BYTES", "OracleConfig"]

MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class OracleConfig:
    """Where the oracle reads from. ``router`` (an actor handle) overrides ``router_name``.
    ``run_id``: the run to serve; None follows the newest run that has a model."""

    database_url: str
    router_name: str | None = None
    router_namespace: str = "medimesh"
    poll_interval: float = 1.0
    max_body_bytes: int = MAX_BODY_BYTES
    router: Any = None
    load_ontology: bool = True
    run_id: str | None = None
    # Phenopacket queries: the assay → biomarker mapping file's JSON (medimesh.phenopackets);
    # give the one the sites trained with, so a phenopacket is encoded alike at both ends.
    label_codes: dict[str, Any] | None = None
    # /audit/verify's trusted signers: a signed roster file, or a directory of them (issue 15);
    # None: the chain is recomputed but the answer is never ok ("signers not checked").
    roster_path: str | None = None
    # Who may call and how often (medimesh.access); None: AccessPolicy.local(), no token.
    access: AccessPolicy | None = None
