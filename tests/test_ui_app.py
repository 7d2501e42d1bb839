"""The dashboard's view functions against real oracles (no browser): fast and exact.

``live_oracle`` serves a pooled model for the diagnosis views; ``run_oracle`` serves a fresh
database holding a small, genuinely signed audit trail of one federated run (enrolment,
setup with isolated baselines, routed updates, verdicts, a quarantine, a late update) so the
network, feed, audit and provenance views see what a real run writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from medimesh.actors.oracle import OracleConfig, build_app
from medimesh.audit import AuditChain, sign_event
from medimesh.bench.oracle import train_quick_model
from medimesh.client import (
    AsyncClient,
    AuditEntry,
    Client,
    Network,
    NetworkEdge,
    NetworkNode,
    RoundInfo,
    SiteBaseline,
    Unavailable,
    ValidationFailed,
)
from medimesh.data import cohort
from medimesh.identity import Identity, Member, Roster
from medimesh.model import model_hash
from medimesh.release import release_hash, spec_digest
from medimesh.runs import UNNAMED_RUN
from medimesh.signed_roster import sign_all
from medimesh.store import Store
from medimesh.ui import views
from medimesh.ui.charts import Bar, Baseline, RoundPoint, accuracy_chart, probability_chart
from medimesh.ui.live import AuditLog, feed_rows
from medimesh.ui.topology import node_views, topology_svg

# ------------------------------------------------------------------------------- fixtures

SPEC = spec_digest([f.name for f in cohort.features()], cohort.class_names())
NAMES = ("router", "auditor", "validator", "coordinator", "hospital-a", "hospital-b",
         "hospital-c")
ROLES = {"router": "router", "auditor": "auditor", "validator": "validator",
         "coordinator": "coordinator"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _seed(url: str, ids: dict[str, Identity]) -> dict[str, Any]:
    """One small run: 2 rounds, hospital-c rejected then quarantined, hospital-b late."""
    model0, mean, std = train_quick_model(steps=20)
    model1, _, _ = train_quick_model(steps=40)
    pid = {n: i.peer_id for n, i in ids.items()}
    d_a, d_b, d_c = ("a" * 64, "b" * 64, "c" * 64)
    baselines = {
        name: {"own_site_top1": own, "own_site_top3": 0.8, "own_site_n": n,
               "all_sites_top1": everywhere, "all_sites_top3": 0.6, "all_sites_n": 70,
               "all_sites_evaluated_by": 2}
        for name, own, n, everywhere in (("hospital-a", 0.61, 40, 0.41),
                                         ("hospital-b", 0.55, 30, 0.37))
    }
    events: list[tuple[str, str, int, str, dict[str, Any]]] = [
        ("coordinator", "setup_started", 0, "spec", {"hospitals": 3}),
        ("coordinator", "setup_completed", 0, "m0", {"hospitals": 3, "baselines": baselines}),
        ("router", "message_routed", 1, "m1", {"type": "update", "from": pid["hospital-a"],
                                               "to": [pid["validator"], pid["coordinator"]],
                                               "delivered": 2, "bytes": 18700, "digest": d_a}),
        ("router", "message_routed", 1, "m2", {"type": "update", "from": pid["hospital-c"],
                                               "to": [pid["validator"], pid["coordinator"]],
                                               "delivered": 2, "bytes": 18700, "digest": d_c}),
        ("validator", "verdict", 1, d_a, {"hospital": pid["hospital-a"], "accepted": True,
                                          "reasons": [], "scores": {}}),
        ("validator", "verdict", 1, d_c, {"hospital": pid["hospital-c"], "accepted": False,
                                          "reasons": ["opposes_others"], "scores": {}}),
        ("validator", "hospital_quarantined", 1, pid["hospital-c"], {"strikes": 2}),
        ("coordinator", "late_update", 1, d_b, {"hospital": pid["hospital-b"]}),
        ("router", "message_routed", 2, "m3", {"type": "round_start",
                                               "from": pid["coordinator"],
                                               "to": [pid["hospital-a"]], "delivered": 1,
                                               "bytes": 19400, "digest": "d" * 64}),
        # What lets the oracle serve model 1 (medimesh.release): the signed release hash.
        ("coordinator", "model_published", 1, model_hash(model1),
         {"run_id": UNNAMED_RUN, "release_hash": release_hash(model1, mean, std, SPEC)}),
    ]
    async with await Store.open(url) as store:
        for n, i in ids.items():
            await store.register_node(Member(n, ROLES.get(n, "hospital"), i.peer_id))  # type: ignore[arg-type]
        h0 = await store.put_model(model0, 0)
        h1 = await store.put_model(model1, 1, parent_hash=h0, updates=[d_a],
                                   verdicts=["e" * 64])
        await store.put_round(1, {"top1": 0.8, "top3": 0.95, "accepted": 1, "rejected": 1,
                                  "reasons": {"opposes_others": 1}, "duration_s": 0.05}, h1,
                              time.time())
        await store.save_checkpoint(1, {"round": 1, "mean": mean.tolist(),
                                        "std": std.tolist()}, h1)
        chain = AuditChain(ids["auditor"], 0)
        signed = [sign_event(ids[a], ev, r, subject, body) for a, ev, r, subject, body in events]
        await store.append_entries(chain.extend(signed))
    return {"h0": h0, "h1": h1, "d_a": d_a, "pid": pid}


@pytest.fixture(scope="module")
def run_oracle(
    pg: Any, serve_app: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, Any]]]:
    """A real oracle (uvicorn) over a fresh database holding one small signed run."""
    name = f"ui_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(pg.get_uri())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    url = str(pg.get_uri(name))
    ids = {n: Identity.generate() for n in NAMES}
    seeded = asyncio.run(_seed(url, ids))
    roster = Roster(Member(n, ROLES.get(n, "hospital"), i.peer_id)  # type: ignore[arg-type]
                    for n, i in ids.items())
    roster_file = tmp_path_factory.mktemp("roster") / "roster.json"
    roster_file.write_text(sign_all(roster, ids.values()))  # /audit/verify's trusted signers
    config = OracleConfig(url, poll_interval=0.5, load_ontology=False,
                          roster_path=str(roster_file))
    with serve_app(build_app(config)) as base:
        yield base, seeded


# ------------------------------------------------------------------------------- diagnose


def test_vocabulary_is_the_models_public_feature_list(live_oracle: str) -> None:
    """/vocabulary: HPO terms with names, biomarkers with units and ranges, genes, classes."""
    with Client(live_oracle) as c:
        v = c.vocabulary()
    ids = {t.id for t in v.symptoms}
    assert len(ids) > 300 and all(re.fullmatch(r"HP:\d{7}", i) for i in ids)
    assert {"HP:0001744", "HP:0002240"} <= ids
    chito = next(b for b in v.biomarkers if b.name == "chitotriosidase")
    assert chito.unit == "nmol/h/mL" and chito.reference_range == (4.0, 120.0)
    assert "µmol/L/h" in chito.units and "GBA1" in v.genes
    assert len(v.classes) == 11 and "Gaucher disease type 1" in v.classes
    assert v.hpo_release and len(v.examples) >= 4
    assert asyncio.run(_async_vocabulary(live_oracle)) == v


async def _async_vocabulary(url: str) -> Any:
    async with AsyncClient(url) as c:
        return await c.vocabulary()


def test_worked_examples_rank_the_disease_they_resemble_first(live_oracle: str) -> None:
    """Each example goes through the form path and the oracle ranks its disease first."""
    with Client(live_oracle) as c:
        v = c.vocabulary()
        checked = 0
        for ex in v.examples:
            req = views.form_request(list(ex.symptoms), views.marker_rows(v, ex.biomarkers),
                                     list(ex.genes), ex.age, ex.sex, v)
            dx = c.diagnose(**req)
            assert not dx.unknown_terms, ex.name
            if ex.resembles is not None:
                assert dx.top.name == ex.resembles, (ex.name, dx.top.name)
                checked += 1
    assert checked >= 4


def test_diagnosis_view_ranks_bars_and_names_the_model(live_oracle: str) -> None:
    """Bars in rank order with falling probabilities, findings per candidate, model + round."""
    with Client(live_oracle) as c:
        v = c.vocabulary()
        ex = v.examples[0]
        dx = c.diagnose(ex.symptoms, ex.biomarkers, ex.genes, ex.age, ex.sex)
    html = views.diagnosis_html(dx)
    probs = [float(p) for p in re.findall(r'data-probability="([0-9.]+)"', html)]
    names = re.findall(r'class="mm-bar" data-rank="\d+" data-name="([^"]+)"', html)
    assert len(probs) == len(v.classes) and probs == sorted(probs, reverse=True)
    assert names[0] == "Gaucher disease type 1" == dx.top.name
    assert f'data-model-hash="{dx.model_hash}"' in html and f"round <b>{dx.model_round}</b>" in html
    assert html.count('class="mm-findings"') == sum(1 for c in dx.differential if c.findings) >= 1
    assert "Chitotriosidase activity" in html and "high" in html


def test_form_mistakes_and_api_refusals_read_as_sentences(live_oracle: str) -> None:
    """A non-number is caught in the form; a wrong unit is the oracle's 422, named."""
    with Client(live_oracle) as c:
        v = c.vocabulary()
        rows = views.marker_rows(v, {"ck": (900.0, "U/L")})
        assert len(rows[0]) == 4 and "ck" not in rows[0]  # no internal key column shown
        ck = "Creatine kinase"
        bad_value = [r if r[0] != ck else [r[0], "lots", r[2], r[3]] for r in rows]
        with pytest.raises(views.FormError, match="Creatine kinase: 'lots' is not a number"):
            views.form_request([], bad_value, [], None, "unknown", v)
        with pytest.raises(views.FormError, match="Age: 'twelve' is not a number"):
            views.form_request([], rows, [], "twelve", "F", v)
        blank = views.form_request([], views.marker_rows(v), [], "", "unknown", v)
        assert blank == {"symptoms": [], "biomarkers": {}, "genes": [], "age": None,
                         "sex": None, "excluded_symptoms": [], "sequenced": None}
        with pytest.raises(views.FormError, match="Marked both observed and absent"):
            views.form_request(["HP:0001744"], rows, [], None, "F", v, ["HP:0001744"])
        with pytest.raises(views.FormError, match="'not done' but variant genes"):
            views.form_request([], rows, ["GLA"], None, "F", v, [], "not done")
        done = views.form_request([], rows, [], None, "F", v, ["HP:0001744"], "done")
        assert done["excluded_symptoms"] == ["HP:0001744"] and done["sequenced"] is True
        assert done["biomarkers"] == {"ck": (900.0, "U/L")}
        bad_unit = [r if r[0] != ck else [r[0], 900, "furlongs", r[3]] for r in rows]
        req = views.form_request([], bad_unit, [], None, "unknown", v)
        with pytest.raises(ValidationFailed) as info:
            c.diagnose(**req)
    msg = views.error_message(info.value, live_oracle)
    assert msg.startswith("The oracle refused the request (biomarkers.ck")
    assert "Traceback" not in msg


def test_unreachable_oracle_is_reported_and_the_app_still_loads() -> None:
    """Nothing listens: the status says 'Oracle unreachable', and GET / still serves the page."""
    from medimesh.ui.app import Dashboard
    from medimesh.ui.app import build_app as build_ui

    dead = f"http://127.0.0.1:{_free_port()}"
    dash = Dashboard(dead)
    live = dash.live()
    assert isinstance(live.error, Unavailable) and live.error.status == 0
    banner = views.status_html(dead, live.ready, live.error)
    assert 'data-status="unreachable"' in banner and "Oracle unreachable" in banner
    assert views.error_message(live.error, dead).startswith(f"Oracle unreachable at {dead}")

    async def page() -> tuple[int, str]:
        app = build_ui(dead, dash)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://ui") as c:
            r = await c.get("/")
            return r.status_code, r.text

    status, text = asyncio.run(page())
    assert status == 200 and "MediMesh" in text


# ------------------------------------------------------------------------ training (pure)


def test_accuracy_chart_draws_every_round_and_each_baseline() -> None:
    """One point per round and series; one dashed line per hospital; labels never overlap."""
    pts = [RoundPoint(r, 0.5 + r / 20, 0.8 + r / 100, 3, r % 2, 0.04) for r in range(1, 8)]
    base = [Baseline("h-a", 0.61), Baseline("h-b", 0.612), Baseline("h-c", 0.4)]
    svg = accuracy_chart(pts, base)
    assert 'data-rounds="7"' in svg and 'data-evaluated="7"' in svg
    assert svg.count('data-series="top1" data-round=') == 7
    assert svg.count('class="mm-baseline"') == 3
    ys = [float(y) for y in re.findall(r'class="mm-baseline".*?<text x="[0-9.]+" y="([0-9.]+)"',
                                       svg)]
    assert len(ys) == 3 and all(b - a >= 11 for a, b in itertools.pairwise(ys))
    assert 'class="mm-baseline"' not in accuracy_chart(pts, [])
    assert 'data-rounds="0"' in accuracy_chart([], base)


def test_reference_lines_are_isolated_models_on_all_sites_patients() -> None:
    """Lines sit at the all-sites score (the global line's patients); the own-site score is
    in the tooltip and the table. Without all-sites scores: no line, a note says why."""
    def site(name: str, everywhere: float | None, own: float | None) -> SiteBaseline:
        return SiteBaseline(name, own, None, 40, everywhere, None, None if everywhere is None
                            else 120, None)

    got = views.baselines_of([site("h-b", 0.35, 0.9), site("h-a", 0.4, 0.7)])
    assert got == [Baseline("h-a", 0.4, 0.7), Baseline("h-b", 0.35, 0.9)]
    pts = [RoundPoint(1, 0.8, 0.9, 2, 0, 0.1)]
    svg = accuracy_chart(pts, got)
    assert svg.count('data-series="isolated-all-sites"') == 3  # two lines and the legend
    assert 'data-top1="0.4000" data-own-top1="0.7000"' in svg
    assert "0.400 on all sites' test patients; 0.700 on its own test patients" in svg
    assert "one hospital alone (top-1)" in svg and "top-1 (federated model)" in svg
    off = [site("h-a", None, 0.7)]
    assert views.baselines_of(off) == []
    table = views.baselines_table_html(off)
    assert "--no-cross-baselines" in table and "0.700" in table
    assert 'data-series="isolated-all-sites"' not in accuracy_chart(pts, [])
    assert views.baselines_table_html([]) == ""


def test_probability_chart_escapes_names() -> None:
    """Text from the API is escaped before it becomes markup."""
    svg = probability_chart([Bar("<script>x</script>", 0.9)])
    assert "<script>" not in svg and "&lt;script&gt;" in svg


# ---------------------------------------------------------------- network, feed, audit


def _net(edges: list[NetworkEdge], **reach: bool | None) -> Network:
    now = time.time()
    nodes = [
        NetworkNode("r", "router", "router", True, 0, 0, 0, 0, 0, None),
        NetworkNode("v", "validator", "validator", True, 5, 500, 5, 500, 0, now),
        NetworkNode("a", "hospital-a", "hospital", reach.get("a", True), 3, 300, 3, 300, 0, now),
        NetworkNode("b", "hospital-b", "hospital", reach.get("b", True), 3, 300, 3, 300, 0,
                    now - 60),
        NetworkNode("c", "hospital-c", "hospital", reach.get("c", True), 3, 300, 3, 300, 0, now),
    ]
    return Network("router", tuple(nodes), tuple(edges), {"update": 6}, {})


def test_node_status_rules() -> None:
    """quarantined > down > slow (late or silent) > live; edge weights from message counts."""
    net = _net([NetworkEdge("a", "v", 7), NetworkEdge("v", "a", 2)], c=False)
    status = {n.name: n.status for n in node_views(net, quarantined={"a"})}
    assert status == {"router": "live", "validator": "live", "hospital-a": "quarantined",
                      "hospital-b": "slow", "hospital-c": "down"}
    assert node_views(net, late={"v"})[1].status == "slow"
    views_ = node_views(net)
    assert [v.name for v in views_][:2] == ["router", "validator"]
    svg = topology_svg(views_)
    assert 'data-nodes="5"' in svg and 'data-peer="hospital-a" data-messages="9"' in svg
    assert 'data-name="hospital-c" data-role="hospital" data-status="down"' in svg
    # The router's own view of deliveries: a dead actor is down, a restarting one slow.
    dead = dataclasses.replace(net.nodes[4], reachable=True, status="down")
    restarting = dataclasses.replace(net.nodes[2], status="restarting")
    net2 = dataclasses.replace(net, nodes=(*net.nodes[:2], restarting, net.nodes[3], dead))
    status2 = {n.name: n.status for n in node_views(net2)}
    assert status2["hospital-c"] == "down" and status2["hospital-a"] == "slow"


def test_feed_joins_verdicts_by_digest_and_shows_metadata_only() -> None:
    """An update row carries its verdict; rows show time/from/to/type/size/verdict only."""
    def e(seq: int, event: str, subject: str, body: dict[str, Any]) -> AuditEntry:
        return AuditEntry(seq, 1_800_000_000.0 + seq, "x", event, 1, subject, body, "", "", "",
                          "", "")

    entries = [
        e(1, "message_routed", "m", {"type": "update", "from": "a", "to": ["v"], "bytes": 2048,
                                      "digest": "d1"}),
        e(2, "message_routed", "m", {"type": "update", "from": "c", "to": ["v"], "bytes": 2048,
                                      "digest": "d2"}),
        e(3, "verdict", "d1", {"hospital": "a", "accepted": True, "reasons": []}),
        e(4, "verdict", "d2", {"hospital": "c", "accepted": False, "reasons": ["norm_outlier"]}),
        e(5, "message_routed", "m", {"type": "round_start", "from": "v", "to": ["a", "b", "c"],
                                      "bytes": 100, "digest": "d3"}),
        e(6, "message_refused", "d4", {"reason": "NotEnrolled"}),
    ]
    rows = feed_rows(entries, {"a": "hospital-a", "c": "hospital-c", "v": "validator"})
    assert [(r.seq, r.verdict) for r in rows] == [
        (6, "refused (NotEnrolled)"), (5, ""), (2, "rejected (norm_outlier)"), (1, "accepted")
    ]
    html = views.feed_html(rows)
    assert 'data-feed-rows="4"' in html and "hospital-a" in html and "2.0 kB" in html
    assert "d1" not in html and "digest" not in html


def test_dashboard_views_over_a_real_run(run_oracle: tuple[str, dict[str, Any]]) -> None:
    """Live refresh, training, network, feed, audit search, verify and provenance."""
    from medimesh.ui.app import Dashboard

    url, seeded = run_oracle
    dash = Dashboard(url)
    live = dash.live()
    assert live.error is None and live.ready is not None and live.ready.ready
    assert live.network is not None and live.network.source == "store"
    acc, upd, _dur, table = dash.training(live.rounds, live.baselines)
    assert 'data-rounds="1"' in acc and acc.count('class="mm-baseline"') == 2
    assert 'data-name="hospital-a" data-top1="0.4100" data-own-top1="0.6100"' in acc
    assert live.ready.run_id == "unnamed" and 'data-run="unnamed"' in views.status_html(
        url, live.ready, None)
    assert 'data-accepted="1" data-rejected="1"' in upd and "opposes_others×1" in table
    topo, _summary, feed = dash.network_views(live.network)
    assert 'data-name="hospital-c" data-role="hospital" data-status="quarantined"' in topo
    assert 'data-feed-rows="3"' in feed and "rejected (opposes_others)" in feed
    assert "accepted" in feed and "hospital-a" in feed
    assert f'data-entries="10" data-head="{dash.audit.head_hash}"' in dash.head()

    with Client(url) as c:
        verdict = views.verify_html(c.verify_audit())
        models = c.models()
        model = c.model(seeded["h1"])
    assert 'data-verify="ok"' in verdict and "10 entries" in verdict
    found = views.audit_table_html(dash.audit.entries, dash.names, "quarantined")
    assert 'data-matches="1"' in found and "hospital_quarantined" in found
    assert 'data-matches="2"' in views.audit_table_html(dash.audit.entries, dash.names, "",
                                                        "verdict")
    verdicts = {e.subject: e for e in dash.audit.entries if e.event == "verdict"}
    direct = views.provenance_html(model, models, verdicts, dash.names)
    prov = dash.provenance(seeded["h1"], models, live.rounds)
    assert prov == direct  # cached path == fetching the model's detail
    assert f'data-model="{seeded["h1"]}"' in prov and 'data-updates="1"' in prov
    assert "hospital-a" in prov and f"r0 <code>{seeded['h0'][:10]}" in prov
    assert "top-1 0.800" in prov and "1 signed verdict batch" in prov


def test_audit_log_pages_incrementally(run_oracle: tuple[str, dict[str, Any]]) -> None:
    """Keyset paging: small pages still fetch everything once, then only what is new."""
    url, _ = run_oracle
    log = AuditLog(page=2)
    with Client(url) as c:
        assert log.refresh(c) == 10
        assert log.refresh(c) == 0
    assert [e.seq for e in log.entries] == list(range(1, 11))
    assert len(log.of("verdict")) == 2


def test_rounds_table_shows_privacy_spent_only_for_dp_runs() -> None:
    """ε (and δ) per round appear as a column when the run is differentially private."""
    plain = [RoundInfo(1, {"top1": 0.8, "accepted": 4}, "ab" * 32, None)]
    assert "ε spent" not in views.rounds_table_html(plain)
    dp = [
        RoundInfo(r, {"top1": 0.8, "accepted": 4, "epsilon": eps, "delta": 1e-3}, "cd" * 32, None)
        for r, eps in ((1, 0.253), (2, 0.384))
    ]
    html = views.rounds_table_html(dp)
    assert "ε spent (δ)" in html
    assert re.findall(r"data-epsilon>([^<]+)<", html) == ["0.384 (0.001)", "0.253 (0.001)"]


def test_rounds_table_names_who_was_rejected_or_flagged_and_why() -> None:
    """Each exclusion and each flag on a kept update: hospital, reason, score vs threshold."""
    m = {"top1": 0.8, "accepted": 3, "rejected": 1, "reasons": {"opposes_others": 1},
         "excluded": [{"hospital": "va", "reason": "opposes_others", "score": -0.61,
                       "threshold": -0.3}],
         "flagged": [{"hospital": "switzerland", "reason": "norm_outlier", "score": 6.4,
                      "threshold": 6.0}]}
    html = views.rounds_table_html([RoundInfo(2, m, "ab" * 32, None)])
    assert "<th>who and why</th>" in html
    assert "rejected: va opposes_others -0.61 &lt; -0.3" in html
    assert "flagged, kept: switzerland norm_outlier 6.4 &gt; 6" in html
    # Older rows without names still show the reason counts.
    old = views.rounds_table_html([RoundInfo(1, {"rejected": 1, "reasons": {"x": 1}}, "", None)])
    assert "x×1" in old


def test_diagnosis_view_shows_ood_next_tests_and_what_argues_against(live_oracle: str) -> None:
    """One observed finding, one marked absent, no genetic test: the flag with its reasons,
    the next tests, and for/against rows in plain words (odds, no 'logit', no exponents)."""
    with Client(live_oracle) as c:
        v = c.vocabulary()
        rows = views.marker_rows(v)
        req = views.form_request(["HP:0001744"], rows, [], None, "unknown", v,
                                 ["HP:0001250"], "not done")
        dx = c.diagnose(**req)
        extreme = c.diagnose(symptoms=["HP:0001744"],
                             biomarkers={"lyso_gb3": (100000.0, "ng/mL")})
    html = views.diagnosis_html(dx)
    assert 'data-ood="true"' in html and "data-ood-kind='few_findings'" in html
    assert html.count("<tr data-group='excluded'><td>symptoms marked absent (1)</td>") == 3
    assert 'data-table="next-tests"' in html and dx.next_tests
    assert all(f"data-next-test='{t.feature}'" in html for t in dx.next_tests)
    assert "data-evidence='against'" in html and "Argues against" in html
    assert "logit" not in html and "e+0" not in html
    assert re.search(r"makes [^<]+ (more|less) likely \(odds [×÷]", html)
    excluded = [f for c in dx.differential[:3] for f in (*c.evidence_for, *c.evidence_against)
                if f.feature == "HP:0001250"]
    assert all(f.status == "excluded" and f.display == "absent (excluded)" for f in excluded)
    html2 = views.diagnosis_html(extreme)
    assert "data-ood-kind='extreme_value'" in html2 and "Lyso-Gb3 = 100,000 ng/mL" in html2
