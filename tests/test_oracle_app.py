"""The oracle's FastAPI app over a real embedded PostgreSQL, without Serve (httpx ASGI).

Each test gets a fresh database on one module-wide pgserver, runs its whole scenario in one
event loop, and stops the app's background tasks before the loop closes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import numpy as np
import pytest

from medimesh.actors.oracle import OracleConfig, OracleState, build_app
from medimesh.audit import AuditChain, sign_event
from medimesh.bench.oracle import publish_model, quick_finding_hist, train_quick_model
from medimesh.identity import Identity, Member, Roster
from medimesh.model import Model
from medimesh.signed_roster import sign_all
from medimesh.store import Store

if TYPE_CHECKING:
    pass

T = TypeVar("T")
Models = tuple[Model, Model, np.ndarray, np.ndarray]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def models() -> Models:
    a, mean, std = train_quick_model(steps=150)
    b, _, _ = train_quick_model(steps=80)
    return a, b, mean, std


Client = httpx.AsyncClient


@asynccontextmanager
async def oracle(url: str, **kw: Any) -> AsyncIterator[tuple[Client, OracleState]]:
    app = build_app(OracleConfig(url, poll_interval=0.2, load_ontology=False, **kw))
    state: OracleState = app.state.oracle
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://oracle") as client:
            await client.get("/health")
            yield client, state
    finally:
        await state.stop()


async def until(pred: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not await pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def publish(
    url: str, model: Model, mean: np.ndarray, std: np.ndarray, r: int, **kw: Any
) -> str:
    async with await Store.open(url) as store:
        return await publish_model(store, model, mean, std, r, **kw)


async def ready_with(client: Client, want: str) -> None:
    async def ok() -> bool:
        r = await client.get("/ready")
        return r.status_code == 200 and r.json()["model_hash"] == want

    await until(ok)


BODY = {
    "symptoms": ["HP:0001744"],
    "biomarkers": {"chitotriosidase": {"value": 5000, "unit": "nmol/h/mL"}},
    "genes": ["GBA1"],
    "age": 10,
    "sex": "F",
}


def _field(resp: httpx.Response) -> str:
    loc = resp.json()["detail"][0]["loc"]
    return ".".join(str(p) for p in loc[1:])


# ----------------------------------------------------------------------------- diagnose


def test_not_ready_without_a_model(url: str) -> None:
    """Before any model: /health 200, /ready and /diagnose 503 (not 500)."""

    async def scenario() -> None:
        async with oracle(url) as (client, _):
            assert (await client.get("/health")).json() == {"status": "ok"}
            r = await client.get("/ready")
            assert r.status_code == 503 and r.json()["ready"] is False
            assert (await client.post("/diagnose", json=BODY)).status_code == 503

    run(scenario())


def test_diagnose_returns_typed_differential(url: str, models: Models) -> None:
    """A valid request gets every class ranked, the model hash and the disclaimer."""
    a, _, mean, std = models

    async def scenario() -> None:
        h = await publish(url, a, mean, std, 1)
        async with oracle(url) as (client, _):
            await ready_with(client, h)
            r = await client.post("/diagnose", json={**BODY, "symptoms": ["HP:9999999"]})
            assert r.status_code == 200
            d = r.json()
            assert d["model_hash"] == h and d["model_round"] == 1
            assert len(d["differential"]) == 11 and d["unknown_terms"] == ["HP:9999999"]
            assert "clinical judgement" in d["disclaimer"]
            # The contract's fields (issue 14): excluded terms and "tested, nothing found".
            r = await client.post(
                "/diagnose",
                json={"symptoms": ["HP:0001744"], "excluded_symptoms": ["HP:0001250",
                      "HP:9999998"], "sequenced": True, "genes": []},
            )
            assert r.status_code == 200, r.text
            assert r.json()["unknown_terms"] == ["HP:9999998"]

    run(scenario())


def test_diagnose_says_why_flags_ood_and_suggests_tests(url: str, models: Models) -> None:
    """The answer explains for and against, flags an unusual query and ranks next tests.

    Published with the setup round's symptom-count histogram (as the coordinator does), a
    query with one symptom and a lyso-Gb3 of 100,000 ng/mL is flagged for both reasons.
    """
    a, b, mean, std = models

    async def scenario() -> None:
        async with await Store.open(url) as store:
            h = await publish_model(store, a, mean, std, 1, finding_hist=quick_finding_hist())
        async with oracle(url) as (client, _):
            await ready_with(client, h)
            body = {"symptoms": ["HP:0001744"],
                    "biomarkers": {"lyso_gb3": {"value": 100000, "unit": "ng/mL"}}}
            r = await client.post("/diagnose", json=body)
            assert r.status_code == 200, r.text
            d = r.json()
            ood = d["out_of_distribution"]
            assert ood["flag"] is True
            assert {x["kind"] for x in ood["reasons"]} == {"few_findings", "extreme_value"}
            assert ood["checked"] == ["findings", "extreme_value", "rare_input", "unknown_terms"]
            extreme = next(x for x in ood["reasons"] if x["kind"] == "extreme_value")
            assert extreme["feature"] == "lyso_gb3" and "100,000 ng/mL" in extreme["message"]
            top = d["differential"][0]
            assert top["findings"] is not None  # the old field stays
            for f in top["evidence_for"] + top["evidence_against"]:
                assert f["effect"].startswith("makes ") and "vs the average class" in f["effect"]
                assert "e+" not in f["display"] and f["odds"][0] in "×÷"
            assert top["evidence_against"] and top["groups"] and "effect" in top["baseline"]
            lyso = [f for c in d["differential"][:3] for f in c["evidence_for"]
                    + c["evidence_against"] if f["feature"] == "lyso_gb3"]
            assert lyso and lyso[0]["display"] == "100,000 ng/mL (high)"
            assert lyso[0]["label"] == "Lyso-Gb3"
            assert all(c["evidence_for"] == [] and c["baseline"] is None
                       for c in d["differential"][3:])
            # An uncertain record (one sign, a lab measured, no genetic test): tests to order.
            uncertain: dict[str, Any] = {
                "symptoms": ["HP:0001744"], "sequenced": False,
                "biomarkers": {"lyso_gb3": {"value": 1.0, "unit": "ng/mL"}},
            }
            tests = (await client.post("/diagnose", json=uncertain)).json()["next_tests"]
            assert 1 <= len(tests) <= 5
            assert [t["swing"] for t in tests] == sorted((t["swing"] for t in tests), reverse=True)
            assert all(t["feature"] != "lyso_gb3" for t in tests)  # measured: not asked
            for t in tests:
                assert t["kind"] in {"symptom", "biomarker", "genetic_test"} and t["reason"]
                assert t["outcomes"] and all(o["top"] for o in t["outcomes"])
            # A model published without the histogram: the count is not judged, and it says so.
            h2 = await publish(url, b, mean, std, 2)
            await ready_with(client, h2)
            d2 = (await client.post("/diagnose", json={"symptoms": ["HP:0001744"]})).json()
            assert d2["out_of_distribution"] == {
                "flag": False, "reasons": [],
                "checked": ["extreme_value", "rare_input", "unknown_terms"],
            }

    run(scenario())


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"age": -3}, "age"),
        ({"age": 1000}, "age"),
        ({"sex": "X"}, "sex"),
        ({"symptoms": "HP:0001744"}, "symptoms"),
        ({"biomarkers": {"ck": {"value": -1, "unit": "U/L"}}}, "biomarkers.ck.value"),
        ({"biomarkers": {"ck": {"value": 100, "unit": "mg/dL"}}}, "biomarkers.ck.unit"),
        ({"biomarkers": {"zzz": {"value": 1, "unit": "U/L"}}}, "biomarkers.zzz"),
        ({"extra": 1}, "extra"),
        ({"excluded_symptoms": "HP:0001744"}, "excluded_symptoms"),
        ({"excluded_symptoms": [7]}, "excluded_symptoms.0"),
        ({"sequenced": "yes"}, "sequenced"),
        ({"sequenced": 1}, "sequenced"),
        ({"sequenced": False, "genes": ["GLA"]}, "sequenced"),
    ],
)
def test_invalid_input_is_422_naming_the_field(
    url: str, models: Models, body: dict[str, Any], field: str
) -> None:
    """Pydantic bounds and engine checks both give 422 with the field's path."""
    a, _, mean, std = models

    async def scenario() -> None:
        h = await publish(url, a, mean, std, 1)
        async with oracle(url) as (client, _):
            await ready_with(client, h)
            r = await client.post("/diagnose", json=body)
            assert r.status_code == 422, r.text
            assert _field(r) == field

    run(scenario())


def test_bad_bodies_are_never_500(url: str, models: Models) -> None:
    """Garbage JSON, wrong types, huge bodies: 4xx, never 5xx."""
    a, _, mean, std = models

    async def scenario() -> None:
        h = await publish(url, a, mean, std, 1)
        async with oracle(url) as (client, _):
            await ready_with(client, h)
            cases: list[bytes] = [b"{", b"[]", b"null", b'"x"', b'{"age": "NaN"}',
                                  b'{"biomarkers": []}', b'{"genes": [null]}', b"\xff\xfe"]
            for raw in cases:
                r = await client.post(
                    "/diagnose", content=raw, headers={"content-type": "application/json"}
                )
                assert 400 <= r.status_code < 500, (raw, r.status_code)
            big = json.dumps({"symptoms": ["HP:0000001"] * 20_000}).encode()
            r = await client.post(
                "/diagnose", content=big, headers={"content-type": "application/json"}
            )
            assert r.status_code == 413

    run(scenario())


# Tokens Python's json accepts but JSON has no value for, lone surrogates (valid JSON escapes,
# not Unicode text) and booleans where a number belongs; each with the field the 422 names.
HOSTILE: list[tuple[bytes, str, str]] = [
    (b'{"age": NaN}', "age", "finite"),
    (b'{"age": Infinity}', "age", "finite"),
    (b'{"age": -Infinity}', "age", "finite"),
    (b'{"age": 1e999}', "age", "finite"),  # overflows to inf while parsing
    (b'{"age": true}', "age", "number"),
    (b'{"biomarkers": {"ck": {"value": NaN, "unit": "U/L"}}}', "biomarkers.ck.value", "finite"),
    (b'{"biomarkers": {"ck": {"value": Infinity, "unit": "U/L"}}}', "biomarkers.ck.value",
     "finite"),
    (b'{"biomarkers": {"ck": {"value": -Infinity, "unit": "U/L"}}}', "biomarkers.ck.value",
     "finite"),
    (b'{"biomarkers": {"ck": {"value": false, "unit": "U/L"}}}', "biomarkers.ck.value",
     "number"),
    (b'{"symptoms": ["\\ud800"]}', "symptoms.0", "unicode"),
    (b'{"genes": ["GBA\\udfff"]}', "genes.0", "unicode"),
    (b'{"sex": "\\ud800"}', "sex", "unicode"),
    (b'{"biomarkers": {"ck": {"value": 1, "unit": "\\udc00"}}}', "biomarkers.ck.unit",
     "unicode"),
    (b'{"\\ud800": NaN}', "", "unicode"),  # a key that is not text: the body is refused
    (b'{"symptoms": [NaN, Infinity]}', "symptoms.0", "string"),
]


def _strict_json(raw: bytes) -> Any:
    """Parse as RFC 8259 JSON: strict UTF-8, no NaN/Infinity tokens."""

    def refuse(token: str) -> Any:
        raise ValueError(f"non-JSON token {token}")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


def test_hostile_numbers_and_strings_are_422_never_500(url: str, models: Models) -> None:
    """NaN/±Infinity, lone surrogates and booleans: 422 naming the field, in valid JSON."""
    a, _, mean, std = models

    async def scenario() -> None:
        h = await publish(url, a, mean, std, 1)
        async with oracle(url) as (client, _):
            await ready_with(client, h)
            for raw, field, says in HOSTILE:
                r = await client.post(
                    "/diagnose", content=raw, headers={"content-type": "application/json"}
                )
                assert r.status_code == 422, (raw, r.status_code, r.text)
                error = _strict_json(r.content)["detail"][0]
                assert ".".join(str(p) for p in error["loc"][1:]) == field, (raw, error)
                assert says in error["msg"], (raw, error)
            # The echoed input says what was sent, as text JSON can carry.
            for raw, echoed in ((b'{"age": -Infinity}', "-Infinity"),
                                (b'{"sex": "F\\ud800"}', "F\\ud800")):
                r = await client.post(
                    "/diagnose", content=raw, headers={"content-type": "application/json"}
                )
                assert _strict_json(r.content)["detail"][0]["input"] == echoed

    run(scenario())


def test_chunked_oversized_body_is_413(url: str) -> None:
    """A body without Content-Length is still cut off at the limit."""

    async def scenario() -> None:
        async with oracle(url, max_body_bytes=1024) as (client, _):

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(10):
                    yield b" " * 512

            r = await client.post("/diagnose", content=chunks())
            assert r.status_code == 413

    run(scenario())


# --------------------------------------------------------------------- models and rounds


def test_a_larger_panel_model_is_served_with_its_own_vocabulary(url: str) -> None:
    """A model trained with ``--diseases 13`` is vouched for under its own feature spec and
    served; /vocabulary then lists its 14 classes and its extra terms, not the ten-disease
    panel's (which it lists before any model)."""
    from medimesh.data import cohort
    from medimesh.model import init_model

    n = 13
    feats, classes = cohort.features(n), cohort.class_names(n)
    model = init_model(len(feats), len(classes))
    mean, std = np.zeros(len(feats)), np.ones(len(feats))
    terms = {f.name for f in feats if f.name.startswith("HP:")}
    extra = terms - {f.name for f in cohort.features()}

    async def scenario() -> None:
        async with oracle(url) as (client, _):
            before = (await client.get("/vocabulary")).json()
            assert before["classes"] == list(cohort.class_names())
            h = await publish(url, model, mean, std, 1, n_diseases=n)
            await ready_with(client, h)
            v = (await client.get("/vocabulary")).json()
            assert v["classes"] == list(classes) and len(classes) == n + 1
            assert extra and {t["id"] for t in v["symptoms"]} == terms
            assert len(v["examples"]) == len(before["examples"])
            r = await client.post("/diagnose", json={"symptoms": sorted(extra)[:1]})
            assert r.status_code == 200, r.text
            assert len(r.json()["differential"]) == n + 1 and not r.json()["unknown_terms"]

    run(scenario())


def test_models_and_model_by_hash(url: str, models: Models) -> None:
    """/models lists metadata; /models/{hash} has provenance; unknown 404, malformed 422."""
    a, _, mean, std = models

    async def scenario() -> None:
        h = await publish(url, a, mean, std, 1)
        async with oracle(url) as (client, _):
            await ready_with(client, h)
            listed = (await client.get("/models")).json()
            assert [m["model_hash"] for m in listed] == [h] and listed[0]["active"]
            one = (await client.get(f"/models/{h}")).json()
            assert one["provenance"] == {"updates": [], "verdicts": []}
            assert one["round_metrics"] == {"source": "bench"}
            assert (await client.get("/models/" + "0" * 64)).status_code == 404
            assert (await client.get("/models/not-a-hash")).status_code == 422
            rounds = (await client.get("/rounds")).json()
            assert rounds[0]["round"] == 1 and rounds[0]["model_hash"] == h

    run(scenario())


# ------------------------------------------------------------------------------- audit


async def _audit(url: str, n: int, writer: Identity, actor: Identity, start: int = 0) -> None:
    async with await Store.open(url) as store:
        seq, head = await store.head()
        chain = AuditChain(writer, seq, head)
        events = [
            sign_event(actor, "round.opened" if i % 2 else "update.accepted", i // 5,
                       subject=f"s{i}", body={"i": i})
            for i in range(start, start + n)
        ]
        await store.append_entries(chain.extend(events))


def test_audit_paging_filters_and_verify(url: str, tmp_path: Path) -> None:
    """/audit pages by seq with has_more; filters by event and round; /audit/verify is ok with
    a signed roster, and never ok without one (signers not checked)."""
    writer, actor = Identity.generate(), Identity.generate()
    roster = Roster([Member("auditor", "auditor", writer.peer_id),
                     Member("coordinator", "coordinator", actor.peer_id)])
    roster_file = tmp_path / "roster.json"
    roster_file.write_text(sign_all(roster, [writer, actor]))

    async def scenario() -> None:
        await _audit(url, 25, writer, actor)
        async with oracle(url) as (client, _):
            v = (await client.get("/audit/verify")).json()
            assert not v["ok"] and v["chain_ok"] and not v["signers_checked"]
            assert "signers not checked" in v["problem"]
        async with oracle(url, roster_path=str(roster_file)) as (client, _):
            seen, after = [], 0
            while True:
                page = (await client.get("/audit", params={"after_seq": after, "limit": 10})).json()
                seen += [e["seq"] for e in page["entries"]]
                after = page["next_after_seq"]
                if not page["has_more"]:
                    break
            assert seen == list(range(1, 26))
            ev = (await client.get("/audit", params={"event": "round.opened"})).json()
            assert {e["event"] for e in ev["entries"]} == {"round.opened"}
            rd = (await client.get("/audit", params={"round": 2})).json()
            assert {e["round"] for e in rd["entries"]} == {2}
            assert (await client.get("/audit", params={"limit": 501})).status_code == 422
            assert (await client.get("/audit", params={"after_seq": -1})).status_code == 422
            v = (await client.get("/audit/verify")).json()
            assert v["ok"] and v["entries"] == 25 and v["signers_checked"]

    run(scenario())


def test_events_resume_with_last_event_id(url: str) -> None:
    """SSE: ids are seqs; Last-Event-ID resumes after it; live entries arrive via NOTIFY."""
    writer, actor = Identity.generate(), Identity.generate()

    async def scenario() -> None:
        await _audit(url, 5, writer, actor)
        async with oracle(url) as (client, _):
            r = await client.get("/events", params={"max_events": 3})
            assert r.headers["content-type"].startswith("text/event-stream")
            ids = [ln[4:] for ln in r.text.splitlines() if ln.startswith("id: ")]
            assert ids == ["1", "2", "3"]
            r = await client.get(
                "/events", params={"max_events": 2}, headers={"Last-Event-ID": "3"}
            )
            ids = [ln[4:] for ln in r.text.splitlines() if ln.startswith("id: ")]
            assert ids == ["4", "5"]
            data = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: ")]
            assert data[0]["seq"] == 4 and data[0]["event"]
            # A live entry: the stream waits for NOTIFY, then delivers seq 6.
            waiter = asyncio.create_task(
                client.get("/events", params={"max_events": 1}, headers={"Last-Event-ID": "5"})
            )
            await asyncio.sleep(0.3)
            assert not waiter.done()
            await _audit(url, 1, writer, actor, start=5)
            r = await asyncio.wait_for(waiter, 10)
            assert "id: 6" in r.text
            bad = await client.get("/events", headers={"Last-Event-ID": "abc"})
            assert bad.status_code == 422

    run(scenario())


def test_network_from_store_nodes(url: str) -> None:
    """Without a router: enrolled nodes, zero counts, a star topology rooted at the router."""
    router, h1 = Identity.generate(), Identity.generate()

    async def scenario() -> None:
        async with await Store.open(url) as store:
            await store.register_node(Member("router", "router", router.peer_id))
            await store.register_node(Member("hospital-a", "hospital", h1.peer_id))
        async with oracle(url) as (client, _):
            await until(lambda: _has_store(client))
            n = (await client.get("/network")).json()
            assert n["source"] == "store" and n["edges"] == []
            assert {x["name"] for x in n["nodes"]} == {"router", "hospital-a"}
            assert all(x["msgs_out"] == 0 for x in n["nodes"])
            assert n["topology"]["our_public_key"] == router.peer_id
            assert n["topology"]["peers"] == [h1.peer_id]

    run(scenario())


async def _has_store(client: Client) -> bool:
    return (await client.get("/rounds")).status_code == 200


def test_network_from_router_handle(url: str) -> None:
    """With a router handle: its stats and topology shape the answer."""

    class _Ref:
        def __init__(self, value: Any) -> None:
            self._value = value

        def __await__(self) -> Any:
            async def get() -> Any:
                return self._value

            return get().__await__()

    class _Method:
        def __init__(self, value: Any) -> None:
            self._value = value

        def remote(self) -> _Ref:
            return _Ref(self._value)

    class FakeRouter:
        stats = _Method(
            {
                "peers": {"b" * 64: {"name": "h", "role": "hospital", "reachable": True,
                                     "msgs_out": 3, "bytes_out": 300, "msgs_in": 2,
                                     "bytes_in": 20, "dropped": 0, "last_seen": 1.0}},
                "edges": [{"from": "b" * 64, "to": "c" * 64, "messages": 3}],
                "messages_by_type": {"update": 3},
            }
        )
        topology = _Method({"our_ipv6": "", "our_public_key": "a" * 64, "peers": ["b" * 64],
                            "tree": [{"public_key": "b" * 64, "parent": "a" * 64,
                                      "sequence": 0}]})

    async def scenario() -> None:
        async with oracle(url, router=FakeRouter()) as (client, _):
            n = (await client.get("/network")).json()
            assert n["source"] == "router"
            assert n["edges"][0]["messages"] == 3 and n["messages_by_type"] == {"update": 3}
            assert [x["role"] for x in n["nodes"]] == ["router", "hospital"]

    run(scenario())


# ----------------------------------------------------------------------------- hot swap


def test_hot_swap_under_load_never_fails_or_mixes(url: str, models: Models) -> None:
    """Publishing a new model mid-load: every request 200, only the two hashes, B wins."""
    a, b, mean, std = models

    async def scenario() -> None:
        ha = await publish(url, a, mean, std, 1)
        async with oracle(url) as (client, state):
            await ready_with(client, ha)
            results: list[tuple[int, str]] = []
            stop = asyncio.Event()

            async def worker() -> None:
                while not stop.is_set():
                    r = await client.post("/diagnose", json=BODY)
                    results.append((r.status_code, r.json().get("model_hash", "")))
                    await asyncio.sleep(0)  # the in-process transport never yields by itself

            tasks = [asyncio.create_task(worker()) for _ in range(8)]
            await asyncio.sleep(0.3)
            hb = await publish(url, b, mean, std, 2)
            await until(lambda: _serving(state, hb))
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)
            assert results and all(s == 200 for s, _ in results)
            hashes = [h for _, h in results]
            assert set(hashes) == {ha, hb}
            assert hashes[-1] == hb and state.swaps == 2
            # Probabilities in an answer come from the model it names (no mixing).
            r = (await client.post("/diagnose", json=BODY)).json()
            assert r["model_hash"] == hb

    run(scenario())


async def _serving(state: OracleState, h: str) -> bool:
    return state.engine is not None and state.engine.model_hash == h


def test_openapi_documents_endpoints(url: str) -> None:
    """/openapi.json lists every endpoint; /docs is served."""

    async def scenario() -> None:
        async with oracle(url) as (client, _):
            spec = (await client.get("/openapi.json")).json()
            for path in ("/diagnose", "/network", "/audit", "/audit/verify", "/rounds",
                         "/models", "/models/{model_hash}", "/events", "/health", "/ready",
                         "/runs", "/baselines"):
                assert path in spec["paths"]
            assert (await client.get("/docs")).status_code == 200

    run(scenario())
