"""What a served model is, and which signed audit entry vouches for it.

A diagnosis depends on more than the weights: the oracle standardizes a patient's raw values
with the setup round's global mean and standard deviation before the model sees them, and
the columns mean what the feature spec says. So the name the coordinator signs when it
publishes a model — the **release hash** — covers all of it: the weights and bias (through
:func:`medimesh.model.model_hash`), the mean and std, and the feature spec hash. One function,
:func:`release_hash`, computes it for the coordinator (when it publishes), for the oracle (when
it loads a model to serve) and for ``medimesh audit provenance``.

:func:`find_voucher` is the oracle's rule: a model may answer patients only if a
``model_published`` audit entry names its model hash and its release hash, for the run the
oracle serves, signed by a coordinator on the roster the oracle holds, with an entry hash that
recomputes and a writer signature from a roster member. Anything else raises
:class:`UnvouchedModel` naming what did not match. Pure: no I/O, no Ray.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medimesh.audit import AuditEntry, _entry_problem
from medimesh.errors import MediMeshError
from medimesh.identity import Member
from medimesh.model import Model, model_hash

__all__ = [
    "PUBLISHED_EVENT",
    "UnvouchedModel",
    "Voucher",
    "find_voucher",
    "release_hash",
    "roster_keys",
    "spec_digest",
]

PUBLISHED_EVENT = "model_published"
_DOMAIN = b"medimesh/release/v1\0"


class UnvouchedModel(MediMeshError):
    """No verified, signed ``model_published`` entry vouches for this model as it would serve."""


def spec_digest(feature_names: Sequence[str], class_names: Sequence[str]) -> str:
    """The feature spec hash: names the agreed columns and classes, in order."""
    doc = "\n".join([*feature_names, "--", *class_names])
    return hashlib.sha256(doc.encode()).hexdigest()


def _vector(h: Any, values: np.ndarray) -> None:
    v = np.ascontiguousarray(np.asarray(values, dtype=np.float64).ravel(), dtype="<f8")
    h.update(np.array([v.size], dtype="<i8").tobytes())
    h.update(v.tobytes())


def release_hash(model: Model, mean: Any, std: Any, spec_hash: str = "") -> str:
    """SHA-256 over the model hash, the standardization (float64 LE) and the spec hash.

    Change any weight, any mean or std, or the spec, and the name changes.
    """
    h = hashlib.sha256(_DOMAIN)
    h.update(bytes.fromhex(model_hash(model)))
    _vector(h, np.asarray(mean))
    _vector(h, np.asarray(std))
    h.update(spec_hash.encode())
    return h.hexdigest()


def roster_keys(members: Iterable[Member]) -> tuple[set[str], set[str]]:
    """(coordinators, every signer) among ``members``: a roster, or the nodes a store enrolled
    (several runs' members, names repeated)."""
    members = list(members)
    return {m.peer_id for m in members if m.role == "coordinator"}, {m.peer_id for m in members}


@dataclass(frozen=True, slots=True)
class Voucher:
    """The audit entry that vouches for a served model (what /ready and /diagnose name)."""

    seq: int
    entry_hash: str
    model_hash: str
    release_hash: str
    round: int
    run_id: str
    coordinator: str  # peer id of the signing coordinator

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": PUBLISHED_EVENT,
            "seq": self.seq,
            "entry_hash": self.entry_hash,
            "model_hash": self.model_hash,
            "release_hash": self.release_hash,
            "round": self.round,
            "run_id": self.run_id,
            "coordinator": self.coordinator,
        }


def _problem(
    e: AuditEntry, model: str, release: str, run_id: str | None,
    coordinators: set[str], signers: set[str],
) -> str:
    """Why this entry does not vouch for (model, release) in ``run_id``; "" when it does."""
    if e.event != PUBLISHED_EVENT or e.subject != model:
        return f"entry {e.seq} is not a model_published entry for {model[:12]}…"
    if e.actor not in coordinators:
        return f"entry {e.seq} is signed by {e.actor[:12]}…, not a coordinator on the roster"
    # The entry alone (its own prev_hash/seq): both signatures, signers, entry hash.
    broken = _entry_problem(e, e.seq, e.prev_hash, signers | coordinators)
    if broken:
        return f"entry {e.seq} does not verify: {broken}"
    body_run = e.body.get("run_id")
    if run_id is not None and body_run != run_id:
        return f"entry {e.seq} publishes it for run {body_run}, not {run_id}"
    signed = e.body.get("release_hash")
    if not signed:
        return f"entry {e.seq} carries no release hash (weights and standardization unsigned)"
    if signed != release:
        return (
            f"entry {e.seq} signs release {str(signed)[:12]}…, but the stored weights and "
            f"standardization hash to {release[:12]}… (changed after publication)"
        )
    return ""


def find_voucher(
    entries: Iterable[AuditEntry],
    *,
    model: Model,
    mean: Any,
    std: Any,
    spec_hash: str,
    run_id: str | None,
    coordinators: set[str],
    signers: set[str],
) -> Voucher:
    """The newest entry that vouches for this model as it would be served, or UnvouchedModel.

    ``coordinators``: peer ids allowed to publish (the roster's coordinators); ``signers``:
    every roster member (the audit writer among them).
    """
    digest = model_hash(model)
    release = release_hash(model, mean, std, spec_hash)
    problems: list[str] = []
    for e in sorted(entries, key=lambda x: x.seq, reverse=True):
        if e.event != PUBLISHED_EVENT or e.subject != digest:
            continue
        problem = _problem(e, digest, release, run_id, coordinators, signers)
        if not problem:
            return Voucher(e.seq, e.entry_hash, digest, release, e.round,
                           str(e.body.get("run_id", "")), e.actor)
        problems.append(problem)
    if not coordinators:
        raise UnvouchedModel("no coordinator on the roster: nothing can vouch for a model")
    if not problems:
        raise UnvouchedModel(
            f"no model_published audit entry names model {digest[:12]}… (nobody published it)"
        )
    raise UnvouchedModel(f"model {digest[:12]}…: " + "; ".join(problems))
