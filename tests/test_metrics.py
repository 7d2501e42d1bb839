"""Application metrics: a real federation's facts, read back from Ray's Prometheus endpoint."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from medimesh.actors.runtime import Consortium, RunConfig, ray_endpoints
from medimesh.actors.telemetry import ROUND_DURATION_BUCKETS, metrics_endpoint

pytestmark = pytest.mark.ray

HOSPITALS, ROUNDS = 4, 3
SCRAPE_TIMEOUT_S = 40.0
# Our own tag keys; Ray adds per-process labels (WorkerId, Component, ...) that we sum over.
TAG_KEYS = frozenset({"k", "verdict", "reason", "type", "le"})

Key = tuple[str, frozenset[tuple[str, str]]]


def key(name: str, **tags: str) -> Key:
    return name, frozenset(tags.items())


def scrape(url: str, run: str) -> dict[Key, float]:
    """One run's samples, summed over the processes that reported them."""
    text = httpx.get(url, timeout=5).text
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("run") != run or not s.name.startswith("ray_medimesh_"):
                continue
            tags = {t: v for t, v in s.labels.items() if t in TAG_KEYS}
            if "le" in tags:  # one spelling for bucket bounds: str(float)
                tags["le"] = str(float(tags["le"]))
            k = key(s.name, **tags)
            out[k] = out.get(k, 0.0) + s.value
    return out


@pytest.fixture(scope="module")
def fed(ray_session: None) -> Iterator[dict[str, Any]]:
    """A small federation, kept alive while its metrics are scraped."""
    consortium = Consortium(RunConfig(hospitals=HOSPITALS, rounds=ROUNDS, seed=1))
    try:
        consortium.start()
        history = consortium.run()
        yield {
            "run": consortium.run_id,
            "history": history,
            "router": consortium.router_stats(),
        }
    finally:
        consortium.shutdown()


def expected_series(history: list[dict[str, Any]], router: dict[str, Any]) -> dict[Key, float]:
    last = history[-1]
    durations = [m["duration_s"] for m in history]
    want = {
        key("ray_medimesh_round"): float(ROUNDS),
        key("ray_medimesh_global_accuracy", k="top1"): last["top1"],
        key("ray_medimesh_global_accuracy", k="top3"): last["top3"],
        key("ray_medimesh_round_duration_seconds_count"): float(ROUNDS),
        # Ray rebuilds histograms from bucket counts, so _sum is approximate; buckets are not.
        key("ray_medimesh_round_duration_seconds_bucket", le="inf"): float(ROUNDS),
        key("ray_medimesh_updates_total", verdict="accepted", reason="none"): float(
            sum(m["accepted"] for m in history)
        ),
        key("ray_medimesh_audit_backlog"): 0.0,  # no database: nothing can wait
    }
    rejected: dict[str, int] = {}
    for m in history:
        for reason, n in m["reasons"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    for reason, n in rejected.items():
        want[key("ray_medimesh_updates_total", verdict="rejected", reason=reason)] = float(n)
    for bound in ROUND_DURATION_BUCKETS:
        want[key("ray_medimesh_round_duration_seconds_bucket", le=str(float(bound)))] = float(
            sum(d <= bound for d in durations)
        )
    for type_, n in router["messages_by_type"].items():
        want[key("ray_medimesh_routed_messages_total", type=type_)] = float(n)
        want[key("ray_medimesh_routed_bytes_total", type=type_)] = float(
            router["bytes_by_type"][type_]
        )
    return want


def mismatches(want: dict[Key, float], got: dict[Key, float]) -> list[str]:
    out = []
    for k, v in want.items():
        if k not in got:
            out.append(f"{k}: missing")
        elif got[k] != pytest.approx(v, rel=1e-6):
            out.append(f"{k}: want {v}, got {got[k]}")
    extra = [k for k in got if k[0] == "ray_medimesh_updates_total" and k not in want]
    if extra:
        out.append(f"verdicts the federation did not report: {extra}")
    return out


def test_endpoint_exports_round_accuracy_verdicts_routing_and_backlog(
    fed: dict[str, Any],
) -> None:
    """Every metric family appears for this run with the values the federation reported."""
    history, router = fed["history"], fed["router"]
    assert [m["round"] for m in history] == list(range(1, ROUNDS + 1))
    assert router["bytes_by_type"].get("update", 0) > 0
    assert router["messages_by_type"]["update"] == HOSPITALS * ROUNDS
    want = expected_series(history, router)
    url = metrics_endpoint()  # the agent's own endpoint: there with the dashboard off too
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:  # workers push to the agent every metrics_report_interval_ms
        got = scrape(url, fed["run"])
        problems = mismatches(want, got)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not problems, "\n".join(problems)
    verdicts = sum(v for k, v in got.items() if k[0] == "ray_medimesh_updates_total")
    assert verdicts == HOSPITALS * ROUNDS  # one verdict per update, counted once
    assert 0 < history[-1]["top1"] <= history[-1]["top3"] <= 1
    assert got[key("ray_medimesh_round_duration_seconds_sum")] > 0


def test_privacy_spent_is_exported_for_dp_runs(ray_session: None) -> None:
    """A differentially private run exports ε spent so far; it equals the last round's ε."""
    from medimesh.privacy import PrivacyConfig

    privacy = PrivacyConfig(epsilon=2.0, delta=1e-3, rounds=2, clip_norm=0.5)
    fed = Consortium(RunConfig(hospitals=3, rounds=2, seed=2, privacy=privacy))
    try:
        fed.start()
        history = fed.run()
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        name = key("ray_medimesh_privacy_epsilon")
        got = scrape(metrics_endpoint(), fed.run_id)
        while got.get(name) != pytest.approx(history[-1]["epsilon"], rel=1e-6) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
            got = scrape(metrics_endpoint(), fed.run_id)
    finally:
        fed.shutdown()
    assert 0 < history[-1]["epsilon"] <= 2.0
    assert got.get(name) == pytest.approx(history[-1]["epsilon"], rel=1e-6), got


def _dashboard_headers() -> dict[str, str]:
    """The session token as Ray's own HTTP clients send it ({} with tokens disabled)."""
    from ray._private.authentication.http_token_authentication import (
        get_auth_headers_if_auth_enabled,
    )

    return dict(get_auth_headers_if_auth_enabled({}))


def test_a_medimesh_metric_reads_through_the_ray_dashboard(fed: dict[str, Any]) -> None:
    """The dashboard's Prometheus service discovery (what Prometheus, and so the dashboard's
    Metrics view, scrapes from) lists the endpoint that serves this run's ray_medimesh_round."""
    dashboard = ray_endpoints()["dashboard"]
    assert dashboard is not None and dashboard.startswith("http://127.0.0.1:")
    headers = _dashboard_headers()
    if headers:  # token auth on (the CLI's choice): the dashboard's API is not open
        assert httpx.get(f"{dashboard}/api/prometheus/sd", timeout=10).status_code == 401
    answer = httpx.get(f"{dashboard}/api/prometheus/sd", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    targets = [t for group in answer.json() for t in group["targets"]]
    here = metrics_endpoint().removeprefix("http://").removesuffix("/metrics")
    assert here in targets, targets
    series = key("ray_medimesh_round")
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        got: dict[Key, float] = {}
        for target in targets:  # all of them, as Prometheus does: no favourite port
            for k, v in scrape(f"http://{target}/metrics", fed["run"]).items():
                got[k] = got.get(k, 0.0) + v
        if got.get(series) == float(ROUNDS) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got.get(series) == float(ROUNDS), got
