"""The oracle's pure logic (medimesh.oracle), without a server: the vocabulary of a model's
own feature spec, the spec a stored model is read with, refusal bookkeeping, the event
stream's resume point and bookkeeping, and the 422 shapes."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from medimesh.audit import AuditEntry
from medimesh.data import cohort
from medimesh.oracle.requests import engine_422, json_safe
from medimesh.oracle.serving import RefusalLog, cohort_spec
from medimesh.oracle.streams import audit_stream, resume_after
from medimesh.oracle.vocabulary import VocabularyOut, vocabulary_doc

N_LARGER = 13  # the ten panel diseases + three Orphanet differentials (as tests/test_cohort.py)


def test_vocabulary_of_a_larger_panel_lists_its_own_classes_and_terms() -> None:
    """A ``--diseases 13`` spec gives its 14 classes and every one of its symptom columns;
    labs, genes and the worked examples are the panel's, which it also has."""
    feats, classes = cohort.features(N_LARGER), cohort.class_names(N_LARGER)
    panel, larger = vocabulary_doc(), vocabulary_doc(feats, classes)
    VocabularyOut.model_validate(larger)
    assert larger["classes"] == list(classes) != panel["classes"]
    ids = [t["id"] for t in larger["symptoms"]]
    assert ids == [f.name for f in feats if f.name.startswith("HP:")]
    assert set(ids) > {t["id"] for t in panel["symptoms"]}
    assert larger["biomarkers"] == panel["biomarkers"] and larger["genes"] == panel["genes"]
    assert larger["examples"] == panel["examples"]
    assert vocabulary_doc(cohort.features(), cohort.class_names()) == panel


def test_a_spec_without_an_examples_features_leaves_that_example_out() -> None:
    """A spec that cannot read a worked example drops it instead of failing /vocabulary."""
    feats = tuple(f for f in cohort.features() if f.name != "gene:GBA1")
    doc = vocabulary_doc(feats, cohort.class_names())
    assert "GBA1" not in doc["genes"]
    assert all("GBA1" not in ex["genes"] for ex in doc["examples"])
    assert 0 < len(doc["examples"]) < len(vocabulary_doc()["examples"])


def test_a_stored_model_is_read_with_the_spec_of_its_class_count() -> None:
    """N + 1 classes (N > 10) mean the --diseases N panel; eleven (or fewer), the panel."""
    assert cohort_spec(cohort.N_CLASSES) == (cohort.features(), cohort.class_names())
    assert cohort_spec(N_LARGER + 1) == (
        cohort.features(N_LARGER), cohort.class_names(N_LARGER)
    )


def test_a_refusal_is_logged_once_after_it_lasted() -> None:
    """Logged when the same refusal has lasted log_after s, once; a new reason starts over."""
    log = RefusalLog(log_after=5.0)
    assert not log.refuse("m", 2, "run", "unsigned", now=100.0)
    assert log.current == {"model_hash": "m", "round": 2, "run_id": "run", "reason": "unsigned"}
    assert not log.refuse("m", 2, "run", "unsigned", now=104.9)
    assert log.refuse("m", 2, "run", "unsigned", now=105.0)
    assert not log.refuse("m", 2, "run", "unsigned", now=200.0)
    assert not log.refuse("m", 2, "run", "other reason", now=201.0)
    assert log.refuse("m", 2, "run", "other reason", now=206.0)
    log.clear()
    assert log.current is None


def test_the_stream_resumes_after_last_event_id_else_after_seq() -> None:
    """Last-Event-ID wins over after_seq; a header that is not a number is refused (None)."""
    assert resume_after(None, None) == 0
    assert resume_after(None, 7) == 7
    assert resume_after(" 12 ", 7) == 12
    assert resume_after("x1", 7) is None
    assert resume_after("-1", None) is None


def _entry(seq: int) -> AuditEntry:
    return AuditEntry(seq, 0.0, "a" * 64, "round_closed", 1, "", {"n": seq}, "", "", "", "", "")


def test_the_stream_sends_each_entry_once_in_order_then_keeps_alive() -> None:
    """Pages after the resume point, ids are sequence numbers, max_events ends the stream;
    while idle a keepalive comment, and a gone client ends it."""
    trail = [_entry(s) for s in range(1, 8)]
    asked: list[tuple[int, int]] = []

    async def fetch(after: int, limit: int) -> Sequence[AuditEntry]:
        asked.append((after, limit))
        return [e for e in trail if e.seq > after][:limit]

    async def collect(start: int, max_events: int | None, gone_after: int) -> list[bytes]:
        checks = 0

        async def disconnected() -> bool:
            nonlocal checks
            checks += 1
            return checks > gone_after

        return [f async for f in audit_stream(fetch, asyncio.Event, disconnected, start,
                                              max_events, keepalive_s=0.01)]

    frames = asyncio.run(collect(2, 3, gone_after=0))
    assert frames[0] == b"retry: 2000\n\n"
    assert [f.split(b"\n")[0] for f in frames[1:]] == [b"id: 3", b"id: 4", b"id: 5"]
    assert asked == [(2, 3)]
    asked.clear()
    frames = asyncio.run(collect(5, None, gone_after=1))
    assert [f.split(b"\n")[0] for f in frames[1:]] == [b"id: 6", b"id: 7", b": keepalive"]
    assert asked == [(5, 500), (7, 500), (7, 500)]


def test_422_bodies_are_shaped_like_pydantic_errors_and_always_encodable() -> None:
    """The engine's field path becomes the loc; the phenopacket reader's names the body;
    echoed NaN, infinities and lone surrogates become strings JSON can hold."""
    assert engine_422("biomarkers.ck.unit", "unknown unit") == {"detail": [
        {"loc": ["body", "biomarkers", "ck", "unit"], "msg": "unknown unit",
         "type": "value_error"}]}
    assert engine_422(None, "not a phenopacket")["detail"][0]["loc"] == ["body"]
    assert json_safe({"a": [math.nan, math.inf, -math.inf], "\ud800": "x\udcff"}) == {
        "a": ["NaN", "Infinity", "-Infinity"], "\\ud800": "x\\udcff"}
