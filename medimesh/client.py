"""The MediMesh SDK: typed access to the oracle's HTTP API (sync :class:`Client`, async
:class:`AsyncClient`, same methods).

Why an SDK: the Gradio UI, notebooks and other services must not care about Ray. They get
frozen dataclasses instead of JSON, one exception hierarchy instead of status codes, and
retries with backoff where retrying is safe (idempotent GETs only — a POST /diagnose is never
sent twice behind the caller's back).

Exceptions: :class:`ApiError` (``status``, ``message``) for any non-2xx answer,
:class:`ValidationFailed` for 422 (``field`` names the offending input), :class:`NotFound` for
404, :class:`Unavailable` when the server cannot be reached after the retries (or answers 503),
:class:`Unauthorized` for 401 (no or a wrong API token), :class:`RateLimited` for 429
(``retry_after`` in seconds).

An oracle that faces the network asks for an API token (docs/security.md): pass ``token=`` or
use :meth:`Client.from_env`, which reads ``$MEDIMESH_API_TOKEN``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from medimesh.access import TOKEN_ENV
from medimesh.errors import MediMeshError

__all__ = [
    "ApiError",
    "AsyncClient",
    "AuditEntry",
    "AuditPage",
    "BiomarkerSpec",
    "Candidate",
    "Client",
    "Diagnosis",
    "Event",
    "EvidenceGroup",
    "ExamplePatient",
    "Finding",
    "ModelInfo",
    "Network",
    "NetworkEdge",
    "NetworkNode",
    "NextTest",
    "NotFound",
    "OodReason",
    "OutOfDistribution",
    "Outcome",
    "RateLimited",
    "ReadyState",
    "RoundInfo",
    "RunInfo",
    "SiteBaseline",
    "SymptomTerm",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "VerifyResult",
    "Vocabulary",
    "parse_sse",
]


# ----------------------------------------------------------------------------------- errors


class ApiError(MediMeshError):
    """The oracle answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class ValidationFailed(ApiError):
    """422: the request was refused; ``field`` is the dotted path of the first bad input."""

    def __init__(self, status: int, message: str, field: str, errors: list[dict[str, Any]]):
        super().__init__(status, message)
        self.field = field
        self.errors = errors


class NotFound(ApiError):
    """404: the model (or path) does not exist."""


class Unavailable(ApiError):
    """The oracle could not be reached after retries, or said 503 (not ready)."""


class Unauthorized(ApiError):
    """401: the oracle asks for an API token and none, or a wrong one, was sent."""


class RateLimited(ApiError):
    """429: too many requests from this address; ``retry_after`` seconds until the next."""

    def __init__(self, status: int, message: str, retry_after: float | None) -> None:
        super().__init__(status, message)
        self.retry_after = retry_after


# ------------------------------------------------------------------------------ result types


@dataclass(frozen=True, slots=True)
class Finding:
    """One input's share of a candidate's log-odds (docs/api.md: ``status``, ``display``…)."""

    feature: str
    label: str
    value: float | bool | str | None
    unit: str
    contribution: float
    flag: str
    status: str = ""
    display: str = ""
    odds: str = ""
    effect: str = ""


@dataclass(frozen=True, slots=True)
class EvidenceGroup:
    """The summed share of all inputs with one status (e.g. every symptom not mentioned)."""

    status: str
    label: str
    count: int
    contribution: float
    odds: str
    effect: str


@dataclass(frozen=True, slots=True)
class Candidate:
    rank: int
    name: str
    probability: float
    findings: tuple[Finding, ...]
    evidence_for: tuple[Finding, ...] = ()
    evidence_against: tuple[Finding, ...] = ()
    groups: tuple[EvidenceGroup, ...] = ()
    baseline: float | None = None
    baseline_effect: str = ""


@dataclass(frozen=True, slots=True)
class OodReason:
    kind: str
    message: str
    feature: str = ""


@dataclass(frozen=True, slots=True)
class OutOfDistribution:
    """Whether the query is unlike the training data, why, and which checks ran."""

    flag: bool = False
    reasons: tuple[OodReason, ...] = ()
    checked: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    answer: str
    top: str
    top_probability: float
    gap_change: float
    probabilities: Mapping[str, float]
    value: float | None = None


@dataclass(frozen=True, slots=True)
class NextTest:
    """A test worth doing next, ranked by how far one answer could move the ranking."""

    kind: str
    feature: str
    label: str
    question: str
    swing: float
    reason: str
    outcomes: tuple[Outcome, ...] = ()


@dataclass(frozen=True, slots=True)
class Diagnosis:
    differential: tuple[Candidate, ...]
    model_hash: str
    model_round: int
    unknown_terms: tuple[str, ...]
    mapped_terms: Mapping[str, tuple[str, ...]]
    imputed: tuple[str, ...]
    disclaimer: str
    out_of_distribution: OutOfDistribution = OutOfDistribution()
    next_tests: tuple[NextTest, ...] = ()
    run_id: str | None = None  # the run whose model answered

    @property
    def top(self) -> Candidate:
        return self.differential[0]


@dataclass(frozen=True, slots=True)
class NetworkNode:
    peer_id: str
    name: str
    role: str
    reachable: bool | None
    msgs_out: int
    bytes_out: int
    msgs_in: int
    bytes_in: int
    dropped: int
    last_seen: float | None
    status: str = "unknown"  # live / slow / restarting / down, as the router sees deliveries
    transport: str = "ray"  # "axl": it polls a mailbox through the AXL front (its own node)
    runs_as: str = ""  # as its launcher described it, e.g. "process pid 4242" (the demo)


@dataclass(frozen=True, slots=True)
class NetworkEdge:
    source: str
    target: str
    messages: int


@dataclass(frozen=True, slots=True)
class Network:
    source: str  # "router" (live counters) or "store" (enrolment only, zero counts)
    nodes: tuple[NetworkNode, ...]
    edges: tuple[NetworkEdge, ...]
    messages_by_type: Mapping[str, int]
    topology: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: float
    actor: str
    event: str
    round: int
    subject: str
    body: Mapping[str, Any]
    signature: str
    prev_hash: str
    entry_hash: str
    writer: str
    writer_signature: str


@dataclass(frozen=True, slots=True)
class AuditPage:
    entries: tuple[AuditEntry, ...]
    next_after_seq: int
    has_more: bool


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int
    head_hash: str
    broken_seq: int | None
    problem: str
    signers_checked: bool
    computed_at: float | None = None  # when the oracle computed it (it reuses answers)
    cached: bool = False  # this answer was computed for an earlier request


@dataclass(frozen=True, slots=True)
class RoundInfo:
    round: int
    metrics: Mapping[str, Any]
    model_hash: str | None
    closed_at: float | None
    run_id: str | None = None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One training run in the store (``GET /runs``)."""

    run_id: str
    started_at: float
    rounds: int
    last_round: int | None
    final_top1: float | None
    final_top3: float | None
    model_hash: str | None
    model_round: int | None
    info: Mapping[str, Any]
    served: bool


@dataclass(frozen=True, slots=True)
class SiteBaseline:
    """One hospital's isolated model (``GET /baselines``): on its own test split, and on all
    sites' test patients (None when the run did not compute cross-site baselines)."""

    site: str
    own_site_top1: float | None
    own_site_top3: float | None
    own_site_n: int | None
    all_sites_top1: float | None
    all_sites_top3: float | None
    all_sites_n: int | None
    all_sites_evaluated_by: int | None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model_hash: str
    round: int
    parent_hash: str | None
    n_features: int
    n_classes: int
    provenance: Mapping[str, Any]
    created_at: float
    active: bool
    round_metrics: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ReadyState:
    ready: bool
    model_hash: str | None
    model_round: int | None
    problems: tuple[str, ...]
    run_id: str | None = None  # the run the oracle serves


@dataclass(frozen=True, slots=True)
class SymptomTerm:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class BiomarkerSpec:
    """A biomarker the model reads: canonical ``unit``, accepted ``units``, reference range."""

    name: str
    label: str
    unit: str
    units: tuple[str, ...]
    reference_range: tuple[float, float] | None


@dataclass(frozen=True, slots=True)
class ExamplePatient:
    """A worked example; ``biomarkers`` maps name to (value, unit), ready for ``diagnose``."""

    name: str
    description: str
    resembles: str | None
    symptoms: tuple[str, ...]
    biomarkers: Mapping[str, tuple[float, str]]
    genes: tuple[str, ...]
    age: float | None
    sex: str | None


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """What the oracle's model understands: the inputs of a diagnosis form."""

    symptoms: tuple[SymptomTerm, ...]
    biomarkers: tuple[BiomarkerSpec, ...]
    genes: tuple[str, ...]
    classes: tuple[str, ...]
    examples: tuple[ExamplePatient, ...]
    hpo_release: str
    attribution: str


@dataclass(frozen=True, slots=True)
class Event:
    """One Server-Sent Event; ``entry`` is the parsed audit entry for ``event: audit``."""

    id: str | None
    event: str
    data: str

    @property
    def entry(self) -> AuditEntry:
        return _entry(json.loads(self.data))


# ----------------------------------------------------------------------------------- parsing


def _finding(d: Mapping[str, Any]) -> Finding:
    return Finding(
        d["feature"], d["label"], d.get("value"), d.get("unit", ""), float(d["contribution"]),
        d.get("flag", ""), d.get("status", ""), d.get("display", ""), d.get("odds", ""),
        d.get("effect", ""),
    )


def _candidate(c: Mapping[str, Any]) -> Candidate:
    base = c.get("baseline") or {}
    return Candidate(
        int(c["rank"]), c["name"], float(c["probability"]),
        tuple(_finding(f) for f in c.get("findings", [])),
        tuple(_finding(f) for f in c.get("evidence_for", [])),
        tuple(_finding(f) for f in c.get("evidence_against", [])),
        tuple(
            EvidenceGroup(g["status"], g["label"], int(g["count"]), float(g["contribution"]),
                          g.get("odds", ""), g.get("effect", ""))
            for g in c.get("groups", [])
        ),
        None if "contribution" not in base else float(base["contribution"]),
        str(base.get("effect", "")),
    )


def _ood(d: Mapping[str, Any] | None) -> OutOfDistribution:
    if not d:
        return OutOfDistribution()
    return OutOfDistribution(
        bool(d.get("flag", False)),
        tuple(OodReason(r["kind"], r["message"], r.get("feature", ""))
              for r in d.get("reasons", [])),
        tuple(d.get("checked", [])),
    )


def _next_test(t: Mapping[str, Any]) -> NextTest:
    return NextTest(
        t["kind"], t["feature"], t["label"], t["question"], float(t["swing"]), t["reason"],
        tuple(
            Outcome(o["answer"], o["top"], float(o["top_probability"]), float(o["gap_change"]),
                    {k: float(v) for k, v in o.get("probabilities", {}).items()},
                    None if o.get("value") is None else float(o["value"]))
            for o in t.get("outcomes", [])
        ),
    )


def _diagnosis(d: Mapping[str, Any]) -> Diagnosis:
    return Diagnosis(
        differential=tuple(_candidate(c) for c in d["differential"]),
        model_hash=d["model_hash"],
        model_round=int(d["model_round"]),
        unknown_terms=tuple(d.get("unknown_terms", [])),
        mapped_terms={k: tuple(v) for k, v in d.get("mapped_terms", {}).items()},
        imputed=tuple(d.get("imputed", [])),
        disclaimer=d.get("disclaimer", ""),
        out_of_distribution=_ood(d.get("out_of_distribution")),
        next_tests=tuple(_next_test(t) for t in d.get("next_tests", [])),
        run_id=d.get("run_id"),
    )


def _runs_as(n: Mapping[str, Any]) -> str:
    what = str(n.get("runs_as", ""))
    return f"{what} pid {n['pid']}" if what and n.get("pid") is not None else what


def _network(d: Mapping[str, Any]) -> Network:
    nodes = tuple(
        NetworkNode(
            n["peer_id"], n.get("name", "?"), n.get("role", "?"), n.get("reachable"),
            int(n.get("msgs_out", 0)), int(n.get("bytes_out", 0)), int(n.get("msgs_in", 0)),
            int(n.get("bytes_in", 0)), int(n.get("dropped", 0)), n.get("last_seen"),
            str(n.get("status", "unknown")), str(n.get("transport", "ray")), _runs_as(n),
        )
        for n in d.get("nodes", [])
    )
    edges = tuple(
        NetworkEdge(e["from"], e["to"], int(e.get("messages", 0))) for e in d.get("edges", [])
    )
    return Network(
        d.get("source", "?"), nodes, edges, dict(d.get("messages_by_type", {})),
        dict(d.get("topology", {})),
    )


def _entry(d: Mapping[str, Any]) -> AuditEntry:
    return AuditEntry(
        int(d["seq"]), float(d["at"]), d["actor"], d["event"], int(d["round"]), d["subject"],
        d.get("body", {}), d["signature"], d["prev_hash"], d["entry_hash"], d["writer"],
        d["writer_signature"],
    )


def _round(d: Mapping[str, Any]) -> RoundInfo:
    return RoundInfo(d["round"], d["metrics"], d.get("model_hash"), d.get("closed_at"),
                     d.get("run_id"))


def _run_info(d: Mapping[str, Any]) -> RunInfo:
    return RunInfo(
        d["run_id"], float(d["started_at"]), int(d["rounds"]), d.get("last_round"),
        d.get("final_top1"), d.get("final_top3"), d.get("model_hash"), d.get("model_round"),
        d.get("info", {}), bool(d.get("served", False)),
    )


def _baselines(d: Mapping[str, Any]) -> list[SiteBaseline]:
    return [
        SiteBaseline(
            str(b["site"]), b.get("own_site_top1"), b.get("own_site_top3"), b.get("own_site_n"),
            b.get("all_sites_top1"), b.get("all_sites_top3"), b.get("all_sites_n"),
            b.get("all_sites_evaluated_by"),
        )
        for b in d.get("sites", [])
    ]


def _run_params(run: str | None) -> dict[str, Any] | None:
    return None if run is None else {"run": run}


def _model(d: Mapping[str, Any]) -> ModelInfo:
    return ModelInfo(
        d["model_hash"], int(d["round"]), d.get("parent_hash"), int(d["n_features"]),
        int(d["n_classes"]), d.get("provenance", {}), float(d["created_at"]),
        bool(d.get("active", False)), d.get("round_metrics"),
    )


def _vocabulary(d: Mapping[str, Any]) -> Vocabulary:
    def rng(r: Any) -> tuple[float, float] | None:
        return None if r is None else (float(r[0]), float(r[1]))

    return Vocabulary(
        symptoms=tuple(SymptomTerm(t["id"], t["name"]) for t in d["symptoms"]),
        biomarkers=tuple(
            BiomarkerSpec(b["name"], b["label"], b["unit"], tuple(b.get("units", [b["unit"]])),
                          rng(b.get("reference_range")))
            for b in d["biomarkers"]
        ),
        genes=tuple(d["genes"]),
        classes=tuple(d["classes"]),
        examples=tuple(
            ExamplePatient(
                e["name"], e.get("description", ""), e.get("resembles"), tuple(e["symptoms"]),
                {k: (float(m["value"]), str(m["unit"])) for k, m in e["biomarkers"].items()},
                tuple(e["genes"]), e.get("age"), e.get("sex"),
            )
            for e in d.get("examples", [])
        ),
        hpo_release=d.get("hpo_release", ""),
        attribution=d.get("attribution", ""),
    )


def _error(resp: httpx.Response) -> ApiError:
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    detail = doc.get("detail") if isinstance(doc, dict) else None
    status = resp.status_code
    if status == 422 and isinstance(detail, list) and detail:
        first = detail[0] if isinstance(detail[0], dict) else {}
        loc = [str(p) for p in first.get("loc", [])]
        field = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path", "header")
                         else loc)
        return ValidationFailed(status, str(first.get("msg", "invalid request")), field, detail)
    message = detail if isinstance(detail, str) else (resp.text[:500] or resp.reason_phrase)
    if status == 404:
        return NotFound(status, message)
    if status == 503:
        return Unavailable(status, message)
    if status == 401:
        return Unauthorized(status, message)
    if status == 429:
        try:
            retry: float | None = float(resp.headers.get("retry-after", ""))
        except ValueError:
            retry = None
        return RateLimited(status, message, retry)
    return ApiError(status, message)


def _auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def _verify_result(d: Mapping[str, Any]) -> VerifyResult:
    return VerifyResult(d["ok"], d["entries"], d["head_hash"], d.get("broken_seq"),
                        d.get("problem", ""), bool(d.get("signers_checked", False)),
                        d.get("computed_at"), bool(d.get("cached", False)))


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        raise _error(resp)
    return resp.json()


class _SseParser:
    """Incremental Server-Sent Events parser (WHATWG rules: comments, multi-line data, id)."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self._kind = ""
        self._data: list[str] = []

    def feed(self, raw: str) -> Event | None:
        line = raw.rstrip("\r\n")
        if not line:
            out = None
            if self._data:
                out = Event(self.last_id, self._kind or "message", "\n".join(self._data))
            self._kind, self._data = "", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._kind = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Server-Sent Events from text lines, yielded as each blank line completes one."""
    parser = _SseParser()
    for line in lines:
        ev = parser.feed(line)
        if ev is not None:
            yield ev


def _diagnose_body(
    symptoms: Iterable[str],
    biomarkers: Mapping[str, Any] | None,
    genes: Iterable[str],
    age: float | None,
    sex: str | None,
    excluded_symptoms: Iterable[str] = (),
    sequenced: bool | None = None,
) -> dict[str, Any]:
    markers: dict[str, Any] = {}
    for name, m in (biomarkers or {}).items():
        if isinstance(m, Mapping):
            markers[name] = {"value": m["value"], "unit": m["unit"]}
        else:  # (value, unit) pair
            value, unit = m
            markers[name] = {"value": value, "unit": unit}
    body: dict[str, Any] = {"symptoms": list(symptoms), "biomarkers": markers,
                            "genes": list(genes)}
    excluded = list(excluded_symptoms)
    if excluded:
        body["excluded_symptoms"] = excluded
    if sequenced is not None:
        body["sequenced"] = sequenced
    if age is not None:
        body["age"] = age
    if sex is not None:
        body["sex"] = sex
    return body


def _phenopacket_body(phenopacket: Any) -> dict[str, Any]:
    """A phenopacket's protobuf JSON form from a parsed object, JSON text or a message."""
    if isinstance(phenopacket, str | bytes):
        doc = json.loads(phenopacket)
    elif isinstance(phenopacket, Mapping):
        doc = dict(phenopacket)
    elif hasattr(phenopacket, "DESCRIPTOR"):  # a phenopackets.Phenopacket message
        from google.protobuf.json_format import MessageToDict

        doc = MessageToDict(phenopacket)
    else:
        raise TypeError("expected a phenopacket as a dict, JSON text or a Phenopacket message")
    return dict(doc)


def _audit_params(
    after_seq: int, limit: int, event: str | None, round_: int | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"after_seq": after_seq, "limit": limit}
    if event is not None:
        params["event"] = event
    if round_ is not None:
        params["round"] = round_
    return params


_RETRY_STATUS = frozenset({502, 503, 504})


def _delay(attempt: int, backoff: float) -> float:
    return float(backoff * (2**attempt))


# ------------------------------------------------------------------------------------ Client


class Client:
    """Synchronous SDK. ``transport`` (e.g. ``httpx.MockTransport``) replaces the network.
    ``token``: the oracle's API token, sent as ``Authorization: Bearer`` on every request."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 10.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
        backoff: float = 0.1,
        token: str | None = None,
    ) -> None:
        self.retries = max(retries, 0)
        self.backoff = backoff
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport,
                                  headers=_auth(token))

    @classmethod
    def from_env(cls, base_url: str, **kwargs: Any) -> Client:
        """A client with ``$MEDIMESH_API_TOKEN`` as its token (none when unset or empty)."""
        return cls(base_url, token=os.environ.get(TOKEN_ENV) or None, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET with retries on connection errors and 502/503/504 (GETs are idempotent)."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(_delay(attempt - 1, self.backoff))
            try:
                resp = self._http.get(path, params=params)
            except httpx.TransportError as exc:
                last = exc
                continue
            if resp.status_code in _RETRY_STATUS and attempt < self.retries:
                last = _error(resp)
                continue
            return _check(resp)
        if isinstance(last, ApiError):
            raise last
        raise Unavailable(0, f"{path}: {type(last).__name__}: {last}")

    def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        """POST once: never retried, so a request is never applied twice."""
        try:
            resp = self._http.post(path, json=body)
        except httpx.TransportError as exc:
            raise Unavailable(0, f"{path}: {type(exc).__name__}: {exc}") from exc
        return _check(resp)

    def diagnose(
        self,
        symptoms: Iterable[str] = (),
        biomarkers: Mapping[str, Any] | None = None,
        genes: Iterable[str] = (),
        age: float | None = None,
        sex: str | None = None,
        excluded_symptoms: Iterable[str] = (),
        sequenced: bool | None = None,
    ) -> Diagnosis:
        """Ranked differential; biomarkers as ``{name: {"value", "unit"}}`` or ``(value, unit)``.

        ``symptoms`` are observed, ``excluded_symptoms`` checked and absent (any other term is
        unknown); a biomarker left out was not measured; ``sequenced`` says whether genetic
        testing was done (``None``: iff ``genes`` is non-empty).
        """
        body = _diagnose_body(symptoms, biomarkers, genes, age, sex, excluded_symptoms,
                              sequenced)
        return _diagnosis(self._post("/diagnose", body))

    def diagnose_phenopacket(self, phenopacket: Any) -> Diagnosis:
        """Ranked differential for a GA4GH phenopacket (dict, JSON text or protobuf message)."""
        return _diagnosis(self._post("/diagnose/phenopacket", _phenopacket_body(phenopacket)))

    def network(self) -> Network:
        return _network(self._get("/network"))

    def audit(
        self, after_seq: int = 0, limit: int = 100, event: str | None = None,
        round: int | None = None,
    ) -> AuditPage:
        d = self._get("/audit", _audit_params(after_seq, limit, event, round))
        return AuditPage(tuple(_entry(e) for e in d["entries"]), int(d["next_after_seq"]),
                         bool(d["has_more"]))

    def verify_audit(self) -> VerifyResult:
        return _verify_result(self._get("/audit/verify"))

    def rounds(self, run: str | None = None) -> list[RoundInfo]:
        """One run's closed rounds (default: the run the oracle serves); NotFound if unknown."""
        return [_round(r) for r in self._get("/rounds", _run_params(run))]

    def runs(self) -> list[RunInfo]:
        """Every run in the store, newest first; ``served`` marks the oracle's."""
        return [_run_info(r) for r in self._get("/runs")]

    def baselines(self, run: str | None = None) -> list[SiteBaseline]:
        """Each hospital's isolated model: own test split vs all sites' test patients."""
        return _baselines(self._get("/baselines", _run_params(run)))

    def models(self, run: str | None = None) -> list[ModelInfo]:
        """Every stored model, or only ``run``'s."""
        return [_model(m) for m in self._get("/models", _run_params(run))]

    def model(self, model_hash: str) -> ModelInfo:
        return _model(self._get(f"/models/{model_hash}"))

    def events(
        self, last_event_id: int | str | None = None, max_events: int | None = None
    ) -> Iterator[Event]:
        """The live audit feed; iterate it (it blocks for new events). Not retried."""
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        params = {} if max_events is None else {"max_events": max_events}
        try:
            with self._http.stream("GET", "/events", headers=headers, params=params,
                                   timeout=httpx.Timeout(10.0, read=None)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _error(resp)
                yield from parse_sse(resp.iter_lines())
        except httpx.TransportError as exc:
            raise Unavailable(0, f"/events: {type(exc).__name__}: {exc}") from exc

    def vocabulary(self) -> Vocabulary:
        """Symptom terms, biomarkers (units, reference ranges), genes, classes, examples."""
        return _vocabulary(self._get("/vocabulary"))

    def health(self) -> bool:
        return bool(self._get("/health").get("status") == "ok")

    def ready(self) -> ReadyState:
        """Readiness without raising on 503 (not ready is an answer here, not an error)."""
        try:
            resp = self._http.get("/ready")
        except httpx.TransportError as exc:
            raise Unavailable(0, f"/ready: {type(exc).__name__}: {exc}") from exc
        return _ready(resp)


def _ready(resp: httpx.Response) -> ReadyState:
    if resp.status_code not in (200, 503):
        raise _error(resp)
    try:
        d = resp.json()
    except ValueError:
        raise _error(resp) from None
    return ReadyState(bool(d.get("ready")), d.get("model_hash"), d.get("model_round"),
                      tuple(d.get("problems", [])), d.get("run_id"))


# ------------------------------------------------------------------------------- AsyncClient


class AsyncClient:
    """Asynchronous SDK with the same methods as :class:`Client` (``await`` them)."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 10.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: float = 0.1,
        token: str | None = None,
    ) -> None:
        self.retries = max(retries, 0)
        self.backoff = backoff
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport,
                                       headers=_auth(token))

    @classmethod
    def from_env(cls, base_url: str, **kwargs: Any) -> AsyncClient:
        """A client with ``$MEDIMESH_API_TOKEN`` as its token (none when unset or empty)."""
        return cls(base_url, token=os.environ.get(TOKEN_ENV) or None, **kwargs)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(_delay(attempt - 1, self.backoff))
            try:
                resp = await self._http.get(path, params=params)
            except httpx.TransportError as exc:
                last = exc
                continue
            if resp.status_code in _RETRY_STATUS and attempt < self.retries:
                last = _error(resp)
                continue
            return _check(resp)
        if isinstance(last, ApiError):
            raise last
        raise Unavailable(0, f"{path}: {type(last).__name__}: {last}")

    async def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        try:
            resp = await self._http.post(path, json=body)
        except httpx.TransportError as exc:
            raise Unavailable(0, f"{path}: {type(exc).__name__}: {exc}") from exc
        return _check(resp)

    async def diagnose(
        self,
        symptoms: Iterable[str] = (),
        biomarkers: Mapping[str, Any] | None = None,
        genes: Iterable[str] = (),
        age: float | None = None,
        sex: str | None = None,
        excluded_symptoms: Iterable[str] = (),
        sequenced: bool | None = None,
    ) -> Diagnosis:
        body = _diagnose_body(symptoms, biomarkers, genes, age, sex, excluded_symptoms,
                              sequenced)
        return _diagnosis(await self._post("/diagnose", body))

    async def diagnose_phenopacket(self, phenopacket: Any) -> Diagnosis:
        """Ranked differential for a GA4GH phenopacket (dict, JSON text or protobuf message)."""
        return _diagnosis(
            await self._post("/diagnose/phenopacket", _phenopacket_body(phenopacket))
        )

    async def network(self) -> Network:
        return _network(await self._get("/network"))

    async def audit(
        self, after_seq: int = 0, limit: int = 100, event: str | None = None,
        round: int | None = None,
    ) -> AuditPage:
        d = await self._get("/audit", _audit_params(after_seq, limit, event, round))
        return AuditPage(tuple(_entry(e) for e in d["entries"]), int(d["next_after_seq"]),
                         bool(d["has_more"]))

    async def verify_audit(self) -> VerifyResult:
        return _verify_result(await self._get("/audit/verify"))

    async def rounds(self, run: str | None = None) -> list[RoundInfo]:
        return [_round(r) for r in await self._get("/rounds", _run_params(run))]

    async def runs(self) -> list[RunInfo]:
        return [_run_info(r) for r in await self._get("/runs")]

    async def baselines(self, run: str | None = None) -> list[SiteBaseline]:
        return _baselines(await self._get("/baselines", _run_params(run)))

    async def models(self, run: str | None = None) -> list[ModelInfo]:
        return [_model(m) for m in await self._get("/models", _run_params(run))]

    async def model(self, model_hash: str) -> ModelInfo:
        return _model(await self._get(f"/models/{model_hash}"))

    async def events(
        self, last_event_id: int | str | None = None, max_events: int | None = None
    ) -> AsyncIterator[Event]:
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        params = {} if max_events is None else {"max_events": max_events}
        try:
            async with self._http.stream("GET", "/events", headers=headers, params=params,
                                         timeout=httpx.Timeout(10.0, read=None)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _error(resp)
                parser = _SseParser()
                async for line in resp.aiter_lines():
                    ev = parser.feed(line)
                    if ev is not None:
                        yield ev
        except httpx.TransportError as exc:
            raise Unavailable(0, f"/events: {type(exc).__name__}: {exc}") from exc

    async def vocabulary(self) -> Vocabulary:
        return _vocabulary(await self._get("/vocabulary"))

    async def health(self) -> bool:
        return bool((await self._get("/health")).get("status") == "ok")

    async def ready(self) -> ReadyState:
        try:
            resp = await self._http.get("/ready")
        except httpx.TransportError as exc:
            raise Unavailable(0, f"/ready: {type(exc).__name__}: {exc}") from exc
        return _ready(resp)

