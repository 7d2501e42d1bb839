"""Protocol messages and their pickle-free payload codec.

Payload layout: ``u32 len | meta JSON | raw little-endian array bytes``. The meta names every
array with its dtype and shape, so a decoder allocates nothing it was not told about, and a
validator can check shape and dtype before it ever does arithmetic on a value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar, cast

import numpy as np

from medimesh.errors import MalformedPayload

__all__ = [
    "MESSAGE_TYPES",
    "AuditEvents",
    "ChainHead",
    "CrossEvalReport",
    "EvalReport",
    "IsolatedModel",
    "Message",
    "ModelPublished",
    "RoundStart",
    "SecAggAdvert",
    "SecAggAdverts",
    "SecAggCheck",
    "SecAggCheckRequest",
    "SecAggInbox",
    "SecAggMasked",
    "SecAggShares",
    "SecAggUnmask",
    "SecAggUnmaskRequest",
    "SetupRequest",
    "SetupResult",
    "SetupStats",
    "Update",
    "Verdict",
    "Verdicts",
    "VerdictsRequest",
    "decode",
    "decode_arrays",
    "encode_arrays",
]

_DTYPES: dict[str, np.dtype[Any]] = {k: np.dtype(k) for k in ("<f4", "<f8", "<i8")}
_MAX_ARRAYS = 16
_MAX_META = 1 << 20


def encode_arrays(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """Serialize JSON-able meta plus named numeric arrays, without pickle."""
    specs: list[list[Any]] = []
    chunks: list[bytes] = []
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        key = dt.str
        if key not in _DTYPES:
            raise MalformedPayload(f"array {name!r} has unsupported dtype {a.dtype}")
        specs.append([name, key, list(a.shape)])
        chunks.append(a.astype(_DTYPES[key], copy=False).tobytes())
    head = json.dumps({**meta, "arrays": specs}, separators=(",", ":"), sort_keys=True).encode()
    return struct.pack(">I", len(head)) + head + b"".join(chunks)


def decode_arrays(payload: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of :func:`encode_arrays`; every inconsistency raises MalformedPayload."""
    try:
        (hlen,) = struct.unpack_from(">I", payload, 0)
        if hlen > _MAX_META or 4 + hlen > len(payload):
            raise MalformedPayload("payload meta length is out of range")
        meta = json.loads(payload[4 : 4 + hlen])
        if not isinstance(meta, dict):
            raise MalformedPayload("payload meta is not an object")
        specs = meta.pop("arrays")
        if not isinstance(specs, list) or len(specs) > _MAX_ARRAYS:
            raise MalformedPayload("payload array list is invalid")
        arrays: dict[str, np.ndarray] = {}
        offset = 4 + hlen
        for name, dt_key, shape in specs:
            dt = _DTYPES[dt_key]
            if not all(isinstance(s, int) and s >= 0 for s in shape):
                raise MalformedPayload(f"array {name!r} has an invalid shape")
            size = math.prod(shape) * dt.itemsize
            if offset + size > len(payload):
                raise MalformedPayload(f"array {name!r} runs past the end of the payload")
            arrays[str(name)] = np.frombuffer(payload, dt, math.prod(shape), offset).reshape(shape)
            offset += size
        if offset != len(payload):
            raise MalformedPayload("trailing bytes after the last array")
        return meta, arrays
    except MalformedPayload:
        raise
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise MalformedPayload(f"payload does not decode: {exc}") from exc


_SCALARS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
}

M = TypeVar("M", bound="Message")


@dataclass(frozen=True, slots=True)
class Message:
    """Base for protocol messages: scalar fields travel in meta, ndarray fields as raw arrays."""

    TYPE: ClassVar[str] = ""

    def to_payload(self) -> bytes:
        meta: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (
                f.default is not dataclasses.MISSING
                and not isinstance(value, np.ndarray)
                and value == f.default
            ):
                continue  # optional fields at their default stay off the wire (older peers)
            if isinstance(value, np.ndarray):
                arrays[f.name] = value
            elif isinstance(value, tuple):
                meta[f.name] = list(value)
            elif isinstance(value, list):
                meta[f.name] = [v.to_meta() if isinstance(v, Message) else v for v in value]
            else:
                meta[f.name] = value
        return encode_arrays(meta, arrays)

    def to_meta(self) -> dict[str, Any]:
        """Scalar-only messages as a JSON object (for nesting in a batch)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        meta, arrays = decode_arrays(payload)
        return cls._build(meta, arrays)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Self:
        return cls._build(dict(meta), {})

    @classmethod
    def _build(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            kind = str(f.type)
            if kind.startswith("np.ndarray"):
                if f.name not in arrays:
                    if kind != "np.ndarray" and f.default is not dataclasses.MISSING:
                        continue  # optional array (``np.ndarray | None``) from an older peer
                    raise MalformedPayload(f"{cls.TYPE}: missing array {f.name!r}")
                kwargs[f.name] = arrays[f.name]
                continue
            if f.name not in meta:
                if f.default is not dataclasses.MISSING:
                    continue  # optional field from a newer minor version: keep the default
                raise MalformedPayload(f"{cls.TYPE}: missing field {f.name!r}")
            value: Any = meta[f.name]
            if kind in _SCALARS:
                if not isinstance(value, _SCALARS[kind]) or (
                    kind != "bool" and isinstance(value, bool)
                ):
                    raise MalformedPayload(f"{cls.TYPE}: field {f.name!r} must be {kind}")
                if kind == "float":
                    value = float(cast(float, value))
            elif kind.startswith("tuple"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise MalformedPayload(f"{cls.TYPE}: field {f.name!r} must be a string list")
                value = tuple(value)
            elif kind.startswith("dict") and not isinstance(value, dict):
                raise MalformedPayload(f"{cls.TYPE}: field {f.name!r} must be an object")
            elif kind.startswith("list") and not (
                isinstance(value, list) and all(isinstance(v, dict) for v in value)
            ):
                raise MalformedPayload(f"{cls.TYPE}: field {f.name!r} must be an object list")
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class SetupRequest(Message):
    """Coordinator asks every hospital for federated feature statistics (setup round)."""

    TYPE: ClassVar[str] = "setup_request"
    spec_hash: str
    n_features: int
    n_classes: int
    # Cross-site baselines (medimesh.cross_baselines): send the isolated model to the peer
    # hospitals. Optional, off by default: a hospital also needs its own policy to allow it.
    cross_baselines: bool = False


@dataclass(frozen=True, slots=True)
class SetupStats(Message):
    """Aggregates only: counts, sums and sums of squares per feature, and class counts."""

    TYPE: ClassVar[str] = "setup_stats"
    spec_hash: str
    n_examples: int
    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    class_counts: np.ndarray
    # The site's isolated model (own rows, own standardization) scored on its own test split:
    # the reference line the consortium has to beat. Two scalars, no rows.
    isolated_top1: float = float("nan")
    isolated_top3: float = float("nan")
    n_test: int = 0
    # Training rows per bin of recorded symptoms (medimesh.explain.FINDING_BINS): lets the
    # oracle say a query has far fewer findings than any training row. Counts only, coarse
    # bins (docs/privacy.md); None from sites without symptom columns or older peers.
    finding_hist: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class IsolatedModel(Message):
    """Hospital -> its PEER hospitals (never the coordinator): its isolated model and the
    standardization it was trained with, so each peer can score it on its own test patients.

    ``mean``/``std`` are the site's own aggregates (already masked: 0/1 where a feature is not
    scaled); no row travels. Sealed end to end: the router sees only metadata.
    """

    TYPE: ClassVar[str] = "isolated_model"
    spec_hash: str
    weights: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    std: np.ndarray


@dataclass(frozen=True, slots=True)
class CrossEvalReport(Message):
    """Hospital -> coordinator: how one peer's isolated model did on this site's test split.

    Counts only (as :class:`EvalReport`); ``source`` is the peer id of the model's owner.
    """

    TYPE: ClassVar[str] = "cross_eval_report"
    spec_hash: str
    source: str
    n_examples: int
    correct_top1: int
    correct_top3: int


@dataclass(frozen=True, slots=True)
class SetupResult(Message):
    """The consortium-wide standardization every site applies, and committed example counts."""

    TYPE: ClassVar[str] = "setup_result"
    spec_hash: str
    mean: np.ndarray
    std: np.ndarray
    class_prior: np.ndarray


@dataclass(frozen=True, slots=True)
class RoundStart(Message):
    """The global model of round r and how to train on it."""

    TYPE: ClassVar[str] = "round_start"
    round: int
    base_hash: str
    deadline: float
    weights: np.ndarray
    bias: np.ndarray
    epochs: int
    lr: float
    l2: float
    prox_mu: float
    clip_norm: float
    committed: dict[str, int]
    # Differential privacy (docs/privacy.md): "" = off, "central" or "local". Optional
    # fields: omitted from the payload at their defaults, so non-DP rounds are unchanged.
    dp_mode: str = ""
    dp_noise_multiplier: float = 0.0
    # Secure aggregation (docs/privacy.md §4): 0 = off; else the Shamir threshold t and the
    # quantizer range R. Optional too: plaintext rounds are byte for byte what they were.
    secagg_threshold: int = 0
    secagg_clip: float = 0.0


@dataclass(frozen=True, slots=True)
class Update(Message):
    """A hospital's model delta for one round, bound to the base model it started from.

    ``eval`` carries the site's evaluation counts of that base model (the previous round's
    published model) on its held-out split: one envelope per hospital per round, not two.
    """

    TYPE: ClassVar[str] = "update"
    round: int
    base_hash: str
    n_examples: int
    delta_w: np.ndarray
    delta_b: np.ndarray
    eval: dict[str, float]


@dataclass(frozen=True, slots=True)
class Verdict(Message):
    """The validator's signed decision about one update, with reasons and scores."""

    TYPE: ClassVar[str] = "verdict"
    round: int
    update_digest: str
    hospital: str
    accepted: bool
    reasons: tuple[str, ...]
    scores: dict[str, float]


@dataclass(frozen=True, slots=True)
class ModelPublished(Message):
    """A new global model with its hash and the digests of what built it."""

    TYPE: ClassVar[str] = "model_published"
    round: int
    model_hash: str
    parent_hash: str
    weights: np.ndarray
    bias: np.ndarray
    updates: tuple[str, ...]
    verdicts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EvalReport(Message):
    """A hospital's score of a global model on its own held-out split (counts only)."""

    TYPE: ClassVar[str] = "eval_report"
    round: int
    model_hash: str
    n_examples: int
    correct_top1: int
    correct_top3: int
    loss_sum: float


@dataclass(frozen=True, slots=True)
class Verdicts(Message):
    """The validator's signed verdicts for a round, sent as one batch once all are judged.

    Judging a round's updates together is also what cross-update outlier scoring needs.
    """

    TYPE: ClassVar[str] = "verdicts"
    round: int
    items: list[Verdict]

    def __post_init__(self) -> None:
        converted = [v if isinstance(v, Verdict) else Verdict.from_meta(v) for v in self.items]
        object.__setattr__(self, "items", converted)


@dataclass(frozen=True, slots=True)
class VerdictsRequest(Message):
    """The coordinator asks the validator to send round ``round``'s verdict batch again.

    AXL is best effort: when the one batch that decides a round is lost, asking for it again
    costs one small message instead of re-running the round at every hospital.
    """

    TYPE: ClassVar[str] = "verdicts_request"
    round: int


# -- secure aggregation (medimesh.secagg_round): opaque protocol bytes travel as base64 text


@dataclass(frozen=True, slots=True)
class SecAggAdvert(Message):
    """Hospital -> coordinator: its signed key advertisement for this round."""

    TYPE: ClassVar[str] = "secagg_advert"
    round: int
    advert: str


@dataclass(frozen=True, slots=True)
class SecAggAdverts(Message):
    """Coordinator -> advertisers: every advertisement (U1), each still signed by its owner."""

    TYPE: ClassVar[str] = "secagg_adverts"
    round: int
    adverts: str


@dataclass(frozen=True, slots=True)
class SecAggShares(Message):
    """Hospital -> coordinator: Shamir shares sealed to each recipient (peer id -> box)."""

    TYPE: ClassVar[str] = "secagg_shares"
    round: int
    shares: dict[str, str]


@dataclass(frozen=True, slots=True)
class SecAggInbox(Message):
    """Coordinator -> one hospital: the sealed shares addressed to it (sender peer id -> box)."""

    TYPE: ClassVar[str] = "secagg_inbox"
    round: int
    shares: dict[str, str]


@dataclass(frozen=True, slots=True)
class SecAggMasked(Message):
    """Hospital -> validator and coordinator: the masked, quantized, example-weighted delta.

    ``n_examples`` is the count committed at setup (public); ``eval`` the site's counts on the
    base model, as in :class:`Update`. Nothing here reveals the delta itself.
    """

    TYPE: ClassVar[str] = "secagg_masked"
    round: int
    base_hash: str
    n_examples: int
    masked: str
    eval: dict[str, float]


@dataclass(frozen=True, slots=True)
class SecAggCheckRequest(Message):
    """Coordinator -> survivors: who sent an accepted masked vector (U3), to be signed.

    The consistency check of Bonawitz et al.'s actively secure variant: each survivor signs
    the list once, and reveals shares only for a list that at least t of them signed.
    """

    TYPE: ClassVar[str] = "secagg_check_request"
    round: int
    survivors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SecAggCheck(Message):
    """Hospital -> coordinator: its signature over the round's survivor list (U3)."""

    TYPE: ClassVar[str] = "secagg_check"
    round: int
    signature: str


@dataclass(frozen=True, slots=True)
class SecAggUnmaskRequest(Message):
    """Coordinator -> signers: the survivors (U3), by peer id, and the signatures over it.

    ``signatures``: peer id -> base64 signature of the survivor list (the consistency check);
    a hospital answers only if at least t of them are valid and it signed the same list.
    """

    TYPE: ClassVar[str] = "secagg_unmask_request"
    round: int
    survivors: tuple[str, ...]
    signatures: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SecAggUnmask(Message):
    """Hospital -> coordinator: its signed unmasking answer (shares, never both per peer)."""

    TYPE: ClassVar[str] = "secagg_unmask"
    round: int
    answer: str


@dataclass(frozen=True, slots=True)
class ChainHead(Message):
    """The audit writer's signed chain head (medimesh.witness), sent to every hospital each
    round; ``signature`` is the writer's over the head itself, so a hospital can keep it and
    anyone can check it later without the envelope."""

    TYPE: ClassVar[str] = "chain_head"
    length: int
    head_hash: str
    at: float
    signature: str


@dataclass(frozen=True, slots=True)
class AuditEvents(Message):
    """A node outside Ray hands its signed audit events to the auditor (medimesh.audit_ingest).

    ``events``: each an :class:`~medimesh.audit.AuditEvent` as a JSON object, signed by the
    envelope's sender; the auditor refuses the batch if any event names another actor.
    """

    TYPE: ClassVar[str] = "audit_events"
    events: list[dict[str, Any]]


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        SetupRequest,
        SetupStats,
        SetupResult,
        IsolatedModel,
        CrossEvalReport,
        RoundStart,
        Update,
        Verdicts,
        VerdictsRequest,
        ModelPublished,
        EvalReport,
        SecAggAdvert,
        SecAggAdverts,
        SecAggShares,
        SecAggInbox,
        SecAggMasked,
        SecAggCheckRequest,
        SecAggCheck,
        SecAggUnmaskRequest,
        SecAggUnmask,
        ChainHead,
        AuditEvents,
    )
}


def decode(type_: str, payload: bytes, expected: type[M]) -> M:
    """Decode a payload whose header claims ``type_`` into the ``expected`` message class."""
    if type_ != expected.TYPE:
        raise MalformedPayload(f"expected a {expected.TYPE} message, got {type_!r}")
    return expected.from_payload(payload)
