"""The SDK against httpx.MockTransport: typed parsing, errors, retries, SSE."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from medimesh.client import (
    ApiError,
    AsyncClient,
    Client,
    Diagnosis,
    NotFound,
    Unavailable,
    ValidationFailed,
    parse_sse,
)

H = "ab" * 32
DIAG: dict[str, Any] = {
    "differential": [
        {"rank": 1, "name": "Gaucher", "probability": 0.9, "findings": [
            {"feature": "gene:GBA1", "label": "GBA1", "value": True, "unit": "",
             "contribution": 2.5, "flag": ""}]},
        {"rank": 2, "name": "Other", "probability": 0.1, "findings": []},
    ],
    "model_hash": H,
    "model_round": 4,
    "unknown_terms": ["HP:9"],
    "mapped_terms": {},
    "imputed": ["ck"],
    "disclaimer": "supports, not replaces",
}
ENTRY = {"seq": 7, "at": 1.0, "actor": "a", "event": "round.opened", "round": 1,
         "subject": "s", "body": {"x": 1}, "signature": "00", "prev_hash": "11",
         "entry_hash": "22", "writer": "w", "writer_signature": "33"}


def client_for(handler: Any, **kw: Any) -> Client:
    return Client("http://oracle", transport=httpx.MockTransport(handler), backoff=0.0, **kw)


def test_diagnose_parses_typed_result() -> None:
    """POST /diagnose body and typed Diagnosis/Candidate/Finding."""
    seen: list[dict[str, Any]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        return httpx.Response(200, json=DIAG)

    with client_for(handler) as c:
        d = c.diagnose(["HP:1"], {"ck": (900, "U/L")}, ["GBA1"], age=3, sex="F")
    assert isinstance(d, Diagnosis) and d.top.name == "Gaucher"
    assert d.top.findings[0].contribution == 2.5 and d.model_round == 4
    assert seen[0] == {"symptoms": ["HP:1"], "biomarkers": {"ck": {"value": 900, "unit": "U/L"}},
                       "genes": ["GBA1"], "age": 3, "sex": "F"}


def test_diagnose_sends_excluded_symptoms_and_sequenced() -> None:
    """Issue 14's fields go into the body; left at their defaults they are not sent."""
    seen: list[dict[str, Any]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        return httpx.Response(200, json=DIAG)

    with client_for(handler) as c:
        c.diagnose(["HP:1"], excluded_symptoms=["HP:2"], sequenced=True)
        c.diagnose(["HP:1"], sequenced=False)
        c.diagnose(["HP:1"])
    assert seen[0]["excluded_symptoms"] == ["HP:2"] and seen[0]["sequenced"] is True
    assert seen[1]["sequenced"] is False and "excluded_symptoms" not in seen[1]
    assert "sequenced" not in seen[2] and "excluded_symptoms" not in seen[2]


def test_422_raises_validation_failed_with_field() -> None:
    """FastAPI's 422 detail becomes ValidationFailed(field=dotted path)."""
    detail = [{"loc": ["body", "biomarkers", "ck", "unit"], "msg": "bad unit",
               "type": "value_error"}]

    def handler(_req: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": detail})

    with client_for(handler) as c, pytest.raises(ValidationFailed) as info:
        c.diagnose(["HP:1"])
    assert info.value.field == "biomarkers.ck.unit" and info.value.status == 422
    assert "bad unit" in info.value.message


def test_404_is_not_found() -> None:
    """Unknown model → NotFound (an ApiError)."""

    def handler(_req: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "no model"})

    with client_for(handler) as c, pytest.raises(NotFound) as info:
        c.model("0" * 64)
    assert isinstance(info.value, ApiError) and info.value.message == "no model"


def test_get_is_retried_on_connection_errors_then_succeeds() -> None:
    """Idempotent GETs retry on transport errors and 503."""
    calls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ConnectError("refused", request=req)
        if calls["n"] == 2:
            return httpx.Response(503, json={"detail": "starting"})
        return httpx.Response(200, json=[{"round": 1, "metrics": {"top1": 0.9},
                                          "model_hash": H, "closed_at": 2.0}])

    with client_for(handler, retries=3) as c:
        rounds = c.rounds()
    assert calls["n"] == 3 and rounds[0].metrics["top1"] == 0.9


def test_get_gives_up_with_unavailable() -> None:
    """After retries, a connection error is Unavailable."""
    calls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        raise httpx.ConnectError("refused", request=req)

    with client_for(handler, retries=2) as c, pytest.raises(Unavailable):
        c.models()
    assert calls["n"] == 3


def test_post_is_never_retried() -> None:
    """A failed POST /diagnose is reported at once, not re-sent."""
    calls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        raise httpx.ConnectError("refused", request=req)

    with client_for(handler, retries=5) as c, pytest.raises(Unavailable):
        c.diagnose(["HP:1"])
    assert calls["n"] == 1


def test_audit_network_verify_models_ready() -> None:
    """Every GET endpoint parses into its dataclass; query params are passed through."""
    params: list[dict[str, str]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        path = req.url.path
        if path == "/audit":
            params.append(dict(req.url.params))
            return httpx.Response(200, json={"entries": [ENTRY], "next_after_seq": 7,
                                             "has_more": True})
        if path == "/audit/verify":
            return httpx.Response(200, json={"ok": True, "entries": 7, "head_hash": "22",
                                             "broken_seq": None, "problem": "",
                                             "signers_checked": True})
        if path == "/network":
            return httpx.Response(200, json={
                "source": "router",
                "nodes": [{"peer_id": H, "name": "h", "role": "hospital", "reachable": True,
                           "msgs_out": 2, "bytes_out": 9, "msgs_in": 1, "bytes_in": 3,
                           "dropped": 0, "last_seen": 1.0}],
                "edges": [{"from": H, "to": "cd" * 32, "messages": 2}],
                "messages_by_type": {"update": 2}, "topology": {"peers": [H]}})
        if path == "/models":
            return httpx.Response(200, json=[{"model_hash": H, "round": 1, "parent_hash": None,
                                              "n_features": 3, "n_classes": 2,
                                              "provenance": {}, "created_at": 1.0,
                                              "active": True}])
        if path == "/ready":
            return httpx.Response(503, json={"ready": False, "model_hash": None,
                                             "model_round": None, "problems": ["no model"]})
        if path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(404, json={"detail": "nope"})

    with client_for(handler) as c:
        page = c.audit(after_seq=3, limit=10, event="round.opened", round=1)
        assert page.entries[0].seq == 7 and page.has_more and page.next_after_seq == 7
        assert params[0] == {"after_seq": "3", "limit": "10", "event": "round.opened",
                             "round": "1"}
        assert c.verify_audit().ok
        net = c.network()
        assert net.nodes[0].msgs_out == 2 and net.edges[0].target == "cd" * 32
        assert c.models()[0].active
        r = c.ready()
        assert not r.ready and r.problems == ("no model",)
        assert c.health()


def test_sse_parsing_handles_comments_ids_and_multiline() -> None:
    """parse_sse follows the SSE rules: comments skipped, multi-line data joined, ids kept."""
    text = "retry: 2000\n\n: keepalive\n\nid: 1\nevent: audit\ndata: {\"a\":\ndata: 1}\n\n" \
           "data: no id\n\n"
    events = list(parse_sse(text.splitlines(keepends=True)))
    assert [(e.id, e.event) for e in events] == [("1", "audit"), ("1", "message")]
    assert json.loads(events[0].data) == {"a": 1}


def test_events_stream_sends_last_event_id() -> None:
    """events() sends Last-Event-ID and yields typed audit entries."""
    headers: list[str | None] = []

    def handler(req: httpx.Request) -> httpx.Response:
        headers.append(req.headers.get("last-event-id"))
        body = f"id: 7\nevent: audit\ndata: {json.dumps(ENTRY)}\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    with client_for(handler) as c:
        events = list(c.events(last_event_id=6))
    assert headers == ["6"] and events[0].entry.seq == 7


def test_async_client_same_api() -> None:
    """AsyncClient: diagnose, retried GET, streamed events."""
    calls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/diagnose":
            return httpx.Response(200, json=DIAG)
        if req.url.path == "/events":
            return httpx.Response(200, text=f"id: 7\nevent: audit\ndata: {json.dumps(ENTRY)}\n\n")
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ReadTimeout("slow", request=req)
        return httpx.Response(200, json={"status": "ok"})

    async def scenario() -> None:
        async with AsyncClient("http://oracle", transport=httpx.MockTransport(handler),
                               backoff=0.0) as c:
            d = await c.diagnose(["HP:1"])
            assert d.model_hash == H
            assert await c.health()
            got = [e async for e in c.events()]
            assert got[0].entry.event == "round.opened"

    asyncio.run(scenario())
    assert calls["n"] == 2


def test_runs_rounds_and_baselines_of_one_run() -> None:
    """runs(), rounds(run=), baselines(run=), models(run=): the run travels as ?run=, unknown
    runs raise NotFound, ready() and diagnose() name the served run (sync and async)."""
    run_id = "20261129-1612-ab12"
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(str(req.url))
        run = req.url.params.get("run")
        if run == "nope":
            return httpx.Response(404, json={"detail": "no run 'nope' in this store"})
        path = req.url.path
        if path == "/runs":
            return httpx.Response(200, json=[{
                "run_id": run_id, "started_at": 1.5, "rounds": 3, "last_round": 3,
                "final_top1": 0.9, "final_top3": 1.0, "model_hash": H, "model_round": 3,
                "info": {"hospitals": 4}, "served": True}])
        if path == "/rounds":
            return httpx.Response(200, json=[{"round": 1, "metrics": {"top1": 0.5},
                                              "model_hash": H, "closed_at": 2.0,
                                              "run_id": run or run_id}])
        if path == "/baselines":
            return httpx.Response(200, json={"run_id": run_id, "cross_baselines": True, "sites": [
                {"site": "h1", "own_site_top1": 0.9, "own_site_top3": 1.0, "own_site_n": 10,
                 "all_sites_top1": 0.4, "all_sites_top3": 0.6, "all_sites_n": 40,
                 "all_sites_evaluated_by": 4}]})
        if path == "/models":
            return httpx.Response(200, json=[])
        if path == "/ready":
            return httpx.Response(200, json={"ready": True, "model_hash": H, "model_round": 3,
                                             "run_id": run_id, "problems": []})
        return httpx.Response(200, json={**DIAG, "run_id": run_id})

    with client_for(handler) as c:
        [r] = c.runs()
        assert (r.run_id, r.rounds, r.final_top1, r.served) == (run_id, 3, 0.9, True)
        assert c.rounds()[0].run_id == run_id
        assert c.rounds(run="20261129-1600-0000")[0].run_id == "20261129-1600-0000"
        [b] = c.baselines(run=run_id)
        assert (b.site, b.all_sites_top1, b.own_site_top1, b.all_sites_n) == ("h1", 0.4, 0.9, 40)
        assert c.models(run=run_id) == []
        assert c.ready().run_id == run_id and c.diagnose(["HP:1"]).run_id == run_id
        with pytest.raises(NotFound):
            c.rounds(run="nope")
    assert "http://oracle/rounds?run=20261129-1600-0000" in seen
    assert f"http://oracle/baselines?run={run_id}" in seen and "http://oracle/rounds" in seen

    async def scenario() -> None:
        async with AsyncClient("http://oracle", transport=httpx.MockTransport(handler),
                               backoff=0.0) as ac:
            assert (await ac.runs())[0].run_id == run_id
            assert (await ac.rounds(run="x1"))[0].run_id == "x1"
            assert (await ac.baselines())[0].all_sites_evaluated_by == 4
            assert await ac.models(run=run_id) == []
            assert (await ac.ready()).run_id == run_id

    asyncio.run(scenario())
