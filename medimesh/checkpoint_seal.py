"""Signed coordinator checkpoints: what a restarted coordinator resumes from is what it wrote.

The checkpoint row lives in the database, whose owner may be hostile: resetting the privacy
spend (``dp_rounds``) to 0 in the row would let the next rounds spend the budget again. So the
coordinator signs every checkpoint with its own key (:func:`seal_checkpoint`) and, on resume,
:func:`open_checkpoint` refuses any checkpoint whose seal is missing, made by another key, or
no longer matches the stored round, model hash and state, with :class:`CheckpointRefused`.

A genuine but older checkpoint (the newer rows deleted: a rollback of the spend) is caught by
:func:`check_not_stale`: the coordinator's own signed ``model_published`` entries in the audit
trail must not name a round later than the checkpoint's (a round's checkpoint is handed to the
auditor before that round's entries are).

The signed bytes are a canonical form that survives the trip through PostgreSQL ``jsonb``:
numpy becomes Python, tuples lists, NaN/inf null (as the auditor stores them), every number
a float (jsonb prints 1e20 as an integer) and -0.0 is 0.0. Pure: no I/O, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from nacl.exceptions import BadSignatureError

from medimesh.audit import canonical
from medimesh.errors import ConfigError, MediMeshError
from medimesh.identity import Identity, verify_key

__all__ = [
    "SEAL_KEY",
    "CheckpointRefused",
    "check_not_stale",
    "checkpoint_bytes",
    "open_checkpoint",
    "seal_checkpoint",
]

SEAL_KEY = "seal"
_DOMAIN = b"medimesh/checkpoint/v1\0"


class CheckpointRefused(MediMeshError):
    """A checkpoint is unsigned, signed by another key, or was changed after it was signed."""


def _normal(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _normal(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_normal(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _normal(obj.tolist())
    if isinstance(obj, np.generic):
        return _normal(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int | float):
        value = float(obj)
        return None if not math.isfinite(value) else value + 0.0
    raise ConfigError(f"checkpoint state holds a {type(obj).__name__}, not JSON data")


def checkpoint_bytes(round_: int, model_hash: str | None, state: Mapping[str, Any]) -> bytes:
    """What the seal signs: round, model hash and the state without its seal, canonical."""
    doc = {
        "round": _normal(round_),
        "model_hash": model_hash or "",
        "state": _normal({k: v for k, v in state.items() if k != SEAL_KEY}),
    }
    return _DOMAIN + canonical(doc)


def seal_checkpoint(
    identity: Identity, round_: int, model_hash: str | None, state: Mapping[str, Any]
) -> dict[str, Any]:
    """A copy of ``state`` carrying the signer's seal over round, model hash and state."""
    sig = identity.sign(checkpoint_bytes(round_, model_hash, state)).hex()
    return {**state, SEAL_KEY: {"signer": identity.peer_id, "signature": sig}}


def open_checkpoint(
    signer: str, round_: int, model_hash: str | None, state: Mapping[str, Any]
) -> dict[str, Any]:
    """The state (seal removed) if ``signer`` sealed exactly this; else CheckpointRefused."""
    seal = state.get(SEAL_KEY)
    if not isinstance(seal, Mapping) or not seal.get("signature"):
        raise CheckpointRefused(f"checkpoint of round {round_} is not signed")
    if seal.get("signer") != signer:
        raise CheckpointRefused(
            f"checkpoint of round {round_} is signed by {str(seal.get('signer'))[:12]}…, "
            f"not by this coordinator ({signer[:12]}…)"
        )
    try:
        verify_key(signer).verify(
            checkpoint_bytes(round_, model_hash, state), bytes.fromhex(str(seal["signature"]))
        )
    except (BadSignatureError, ValueError, ConfigError):
        raise CheckpointRefused(
            f"checkpoint of round {round_} was changed after the coordinator signed it "
            "(its round, model hash or state no longer match the signature)"
        ) from None
    return {k: v for k, v in state.items() if k != SEAL_KEY}


def check_not_stale(round_: int, published_rounds: Iterable[int]) -> None:
    """CheckpointRefused if the trail shows this coordinator published a later round than the
    checkpoint's (``published_rounds``: rounds of its own model_published entries, this run)."""
    later = max(published_rounds, default=0)
    if later > round_:
        raise CheckpointRefused(
            f"checkpoint of round {round_} is stale: the audit trail shows this coordinator "
            f"published round {later} (newer checkpoints were removed)"
        )
