"""Pure view functions: SDK results in, HTML (or form values) out.

Why pure: every view can be tested with real oracle answers or plain data, without a browser
or a Gradio server, and none of them can reach past the API (they only see what the SDK
returned). Every string that came from the API is escaped before it is put in markup.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

from medimesh.client import (
    ApiError,
    AuditEntry,
    Candidate,
    Diagnosis,
    Finding,
    ModelInfo,
    Network,
    RateLimited,
    ReadyState,
    RoundInfo,
    SiteBaseline,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    VerifyResult,
    Vocabulary,
)
from medimesh.explain import fmt_number, fmt_odds, fmt_pct
from medimesh.rounds import describe_verdicts
from medimesh.ui.charts import (
    Bar,
    Baseline,
    RoundPoint,
    accuracy_chart,
    duration_chart,
    probability_chart,
    updates_chart,
)
from medimesh.ui.live import FeedRow

__all__ = [
    "GENETIC_CHOICES",
    "MARKER_HEADERS",
    "FormError",
    "audit_table_html",
    "baselines_of",
    "baselines_table_html",
    "diagnosis_html",
    "error_html",
    "error_message",
    "feed_html",
    "form_request",
    "head_html",
    "marker_rows",
    "model_choices",
    "network_summary_html",
    "next_tests_html",
    "ood_html",
    "provenance_html",
    "round_points",
    "rounds_table_html",
    "status_html",
    "symptom_choices",
    "training_html",
    "verify_html",
]

MARKER_HEADERS = ["test", "value", "unit", "reference range"]
GENETIC_CHOICES = ["not said", "done", "not done"]  # → sequenced None / True / False


class FormError(ValueError):
    """The form cannot be turned into a request (said before anything is sent)."""


# ------------------------------------------------------------------------------------ errors


def error_message(exc: BaseException, api_url: str) -> str:
    """One readable sentence for any failure at the API boundary (never a traceback)."""
    if isinstance(exc, FormError):
        return str(exc)
    if isinstance(exc, ValidationFailed):
        where = f" ({exc.field})" if exc.field else ""
        return f"The oracle refused the request{where}: {exc.message}"
    if isinstance(exc, Unauthorized):
        return (f"The oracle at {api_url} wants an API token: start the dashboard with "
                "$MEDIMESH_API_TOKEN set to it")
    if isinstance(exc, RateLimited):
        return f"The oracle is rate limiting this dashboard: {exc.message}"
    if isinstance(exc, Unavailable):
        if exc.status == 0:
            return f"Oracle unreachable at {api_url}: {exc.message}"
        return f"The oracle is not ready yet: {exc.message}"
    if isinstance(exc, ApiError):
        return f"The oracle answered HTTP {exc.status}: {exc.message}"
    return f"Unexpected error ({type(exc).__name__}): {exc}"


def error_html(exc: BaseException, api_url: str) -> str:
    unreachable = isinstance(exc, Unavailable) and exc.status == 0
    return (
        f'<div class="mm-error" data-error="{"unreachable" if unreachable else "api"}">'
        f"{escape(error_message(exc, api_url))}</div>"
    )


def status_html(api_url: str, ready: ReadyState | None, exc: BaseException | None) -> str:
    """The banner on top of every view: connected, not ready, or unreachable."""
    url = escape(api_url)
    if exc is not None and isinstance(exc, Unavailable) and exc.status == 0:
        return (
            '<div class="mm-banner mm-down" data-status="unreachable"><b>Oracle unreachable</b> '
            f"at {url}. The dashboard retries every few seconds; start the API with "
            "<code>medimesh demo</code> or <code>medimesh serve</code>.</div>"
        )
    if exc is not None:
        return (
            '<div class="mm-banner mm-down" data-status="error"><b>Oracle error</b>: '
            f"{escape(error_message(exc, api_url))}</div>"
        )
    if ready is None or not ready.ready:
        problems = "; ".join(ready.problems) if ready is not None else "starting"
        return (
            '<div class="mm-banner mm-wait" data-status="not-ready"><b>Oracle not ready</b> '
            f"at {url}: {escape(problems)}</div>"
        )
    model = escape((ready.model_hash or "")[:12])
    run = escape(ready.run_id or "")
    return (
        f'<div class="mm-banner mm-ok" data-status="connected" data-run="{run}">'
        f"<b>Connected</b> to the oracle at {url} · run <code class=\"mm-run\">{run}</code>"
        f" · serving model <code>{model}</code> from round {ready.model_round}</div>"
    )


# --------------------------------------------------------------------------------- diagnose


def symptom_choices(vocab: Vocabulary) -> list[tuple[str, str]]:
    """(label, value) pairs: the search box matches names and ids alike."""
    return [(f"{t.name} ({t.id})", t.id) for t in sorted(vocab.symptoms, key=lambda t: t.name)]


def _range(r: tuple[float, float] | None, unit: str) -> str:
    return "" if r is None else f"{r[0]:g}–{r[1]:g} {unit}"


def marker_rows(
    vocab: Vocabulary, values: Mapping[str, tuple[float, str]] | None = None
) -> list[list[Any]]:
    """One table row per biomarker: full name, value (blank = not measured), unit, range.

    No internal key column: :func:`form_request` finds the marker by its (unique) name.
    """
    values = values or {}
    rows: list[list[Any]] = []
    for b in vocab.biomarkers:
        value, unit = values.get(b.name, (None, b.unit))
        rows.append([b.label, value, unit, _range(b.reference_range, b.unit)])
    return rows


def _table_rows(table: Any) -> list[list[Any]]:
    """Gradio hands a Dataframe back as a pandas frame, a dict or a list of rows."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        return [list(r) for r in table.values.tolist()]
    if isinstance(table, Mapping):
        return [list(r) for r in table.get("data", [])]
    return [list(r) for r in table]


def _blank(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def form_request(
    symptoms: Sequence[str] | None,
    markers: Any,
    genes: Sequence[str] | None,
    age: str | float | None,
    sex: str | None,
    vocab: Vocabulary,
    excluded: Sequence[str] | None = None,
    genetic: str | None = None,
) -> dict[str, Any]:
    """The form's values as ``Client.diagnose`` keyword arguments; FormError if unreadable.

    ``excluded``: findings checked and ABSENT; ``genetic``: one of :data:`GENETIC_CHOICES`.
    """
    by_label = {b.label: b for b in vocab.biomarkers}
    biomarkers: dict[str, tuple[float, str]] = {}
    for i, row in enumerate(_table_rows(markers)):
        if len(row) < 2 or _blank(row[1]):
            continue
        spec = by_label.get(str(row[0]).strip())
        if spec is None and i < len(vocab.biomarkers):  # renamed cell: fall back to the row
            spec = vocab.biomarkers[i]
        if spec is None:
            raise FormError(f"{row[0]}: not a biomarker the model knows")
        try:
            value = float(str(row[1]).replace(",", "."))
        except ValueError:
            raise FormError(f"{spec.label}: {row[1]!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise FormError(f"{spec.label}: the value must be a number ≥ 0")
        unit = str(row[2]).strip() if len(row) > 2 and not _blank(row[2]) else spec.unit
        biomarkers[spec.name] = (value, unit)
    years: float | None = None
    if not _blank(age):
        try:
            years = float(str(age).replace(",", "."))
        except ValueError:
            raise FormError(f"Age: {age!r} is not a number of years") from None
        if not (math.isfinite(years) and 0 <= years <= 130):
            raise FormError("Age must be between 0 and 130 years")
    observed = list(symptoms or [])
    absent = list(excluded or [])
    both = sorted(set(observed) & set(absent))
    if both:
        names = {t.id: t.name for t in vocab.symptoms}
        raise FormError("Marked both observed and absent: "
                        + ", ".join(f"{names.get(t, t)} ({t})" for t in both))
    gene_list = [g.strip() for g in (genes or []) if g and g.strip()]
    sequenced = {"done": True, "not done": False}.get(genetic or "not said")
    if sequenced is False and gene_list:
        raise FormError("Genetic testing is marked 'not done' but variant genes are listed")
    return {
        "symptoms": observed,
        "biomarkers": biomarkers,
        "genes": gene_list,
        "age": years,
        "sex": sex if sex in ("F", "M") else None,
        "excluded_symptoms": absent,
        "sequenced": sequenced,
    }


def _evidence_rows(findings: Sequence[Finding], side: str) -> str:
    return "".join(
        f"<tr data-evidence='{side}' data-feature='{escape(f.feature)}' "
        f"data-status='{escape(f.status)}'><td>{escape(f.label)}</td>"
        f"<td>{escape(f.display or _value(f.value, f.unit))}</td><td>{escape(f.effect)}</td>"
        f"<td class='mm-num'>{escape(f.odds)}</td></tr>"
        for f in findings
    )


def _candidate_html(c: Candidate) -> str:
    """For / against tables and the per-kind totals of one explained candidate."""
    head = "<tr><th>finding</th><th>value</th><th>what it does</th><th>odds</th></tr>"
    pro = _evidence_rows(c.evidence_for, "for")
    con = _evidence_rows(c.evidence_against, "against")
    groups = "".join(
        f"<tr data-group='{escape(g.status)}'><td>{escape(g.label)} ({g.count})</td>"
        f"<td>{escape(g.effect)}</td><td class='mm-num'>{escape(g.odds)}</td></tr>"
        for g in c.groups
    )
    return (
        f'<details open class="mm-findings" data-rank="{c.rank}"><summary>{c.rank}. '
        f"{escape(c.name)} — {fmt_pct(c.probability)}: findings that support it and what "
        "argues against it</summary>"
        + (f'<p class="mm-note">Starting point: {escape(c.baseline_effect)}.</p>'
           if c.baseline_effect else "")
        + '<p class="mm-ev-head">Evidence for</p>'
        + (f"<table data-table='evidence-for'>{head}{pro}</table>" if pro
           else '<p class="mm-note">Nothing in this record raises its odds.</p>')
        + '<p class="mm-ev-head">Argues against</p>'
        + (f"<table data-table='evidence-against'>{head}{con}</table>" if con
           else '<p class="mm-note">Nothing in this record lowers its odds.</p>')
        + ("<p class='mm-ev-head'>All inputs, by kind</p><table data-table='groups'>"
           f"<tr><th>inputs</th><th>together they…</th><th>odds</th></tr>{groups}</table>"
           if groups else "")
        + "</details>"
    )


def _legacy_candidate_html(c: Candidate) -> str:
    """An older oracle without evidence lists: its supporting findings only."""
    rows = "".join(
        f"<tr data-evidence='for'><td>{escape(f.label)}</td>"
        f"<td>{escape(_value(f.value, f.unit))}</td><td>{escape(f.flag)}</td>"
        f"<td class='mm-num'>{fmt_odds(f.contribution)}</td></tr>"
        for f in c.findings
    )
    return (
        f'<details open class="mm-findings" data-rank="{c.rank}"><summary>{c.rank}. '
        f"{escape(c.name)} — {fmt_pct(c.probability)}: findings that support it</summary>"
        "<table><tr><th>finding</th><th>value</th><th>flag</th><th>odds</th></tr>"
        f"{rows}</table></details>"
    )


def _value(v: float | bool | str | None, unit: str) -> str:
    if v is None:
        return "not given"
    if isinstance(v, bool):
        return "present" if v else "absent"
    if isinstance(v, float):
        return f"{fmt_number(v)} {unit}".strip()
    return f"{v} {unit}".strip()


def ood_html(dx: Diagnosis) -> str:
    """The out-of-distribution flag: a warning with its reasons, or a quiet line."""
    ood = dx.out_of_distribution
    if not ood.flag:
        checked = ", ".join(c.replace("_", " ") for c in ood.checked) or "nothing"
        return (f'<div class="mm-ood-ok" data-ood="false">Within the training data '
                f"(checked: {escape(checked)}).</div>")
    items = "".join(
        f"<li data-ood-kind='{escape(r.kind)}'>{escape(r.message)}</li>" for r in ood.reasons
    )
    return (
        '<div class="mm-ood" data-ood="true"><b>Outside what the model was trained on</b>'
        f"<ul>{items}</ul></div>"
    )


def next_tests_html(dx: Diagnosis) -> str:
    """What to ask or order next, ranked by how far one answer could move the ranking."""
    if not dx.next_tests:
        return ('<p class="mm-note" data-next-tests="0">No single further test would move the '
                "gap between the first two candidates by a point.</p>")
    rows = "".join(
        f"<tr data-next-test='{escape(t.feature)}' data-kind='{escape(t.kind)}'>"
        f"<td>{i}</td><td>{escape(t.question)}</td><td>{escape(t.reason)}</td>"
        f"<td class='mm-num'>{t.swing * 100:.0f} pts</td></tr>"
        for i, t in enumerate(dx.next_tests, start=1)
    )
    return (
        '<p class="mm-ev-head">Suggested next tests</p>'
        f'<table class="mm-table" data-table="next-tests" data-next-tests="{len(dx.next_tests)}">'
        "<tr><th>#</th><th>test</th><th>what the answer could do</th>"
        "<th title='largest change of the gap between the first two candidates'>swing</th></tr>"
        f"{rows}</table>"
        '<p class="mm-note">Swing: the largest change, over the possible answers, of the gap '
        "between the first two candidates' probabilities (in percentage points). Assumed lab "
        "values come from the training distribution the model holds (mean ± SD on its log "
        "scale).</p>"
    )


def diagnosis_html(dx: Diagnosis) -> str:
    """Ranked bar chart, OOD flag, next tests, evidence for and against, and which model."""
    chart = probability_chart([Bar(c.name, c.probability) for c in dx.differential])
    parts = [
        f'<div class="mm-dx" data-model-hash="{escape(dx.model_hash)}" '
        f'data-model-round="{dx.model_round}" data-top="{escape(dx.top.name)}">',
        '<div class="mm-model">Answered by model '
        f"<code>{escape(dx.model_hash[:16])}…</code> from round <b>{dx.model_round}</b></div>",
        ood_html(dx),
        chart,
        next_tests_html(dx),
    ]
    for c in dx.differential:
        if c.baseline is not None:
            parts.append(_candidate_html(c))
        elif c.findings:
            parts.append(_legacy_candidate_html(c))
    explained = sum(1 for c in dx.differential if c.baseline is not None or c.findings)
    notes = []
    if explained < len(dx.differential):
        notes.append(f"The oracle explains its top {explained} candidates; the others are "
                     "ranked by probability only. Odds are against the average class; each "
                     "share is exact for this linear model, measured from the average "
                     "training patient.")
    if dx.unknown_terms:
        notes.append("Not in the model's vocabulary (ignored): " + ", ".join(dx.unknown_terms))
    for term, hits in dx.mapped_terms.items():
        notes.append(f"{term} counted as {', '.join(hits)}")
    if dx.imputed:
        notes.append(f"{len(dx.imputed)} biomarkers not measured (the model is told they are "
                     "missing; no value is assumed for them)")
    parts += [f'<p class="mm-note">{escape(n)}</p>' for n in notes]
    parts.append(f'<p class="mm-disclaimer">{escape(dx.disclaimer)}</p></div>')
    return "".join(parts)


# --------------------------------------------------------------------------------- training


def _float(x: Any) -> float | None:
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def round_points(rounds: Iterable[RoundInfo]) -> list[RoundPoint]:
    """Closed rounds (round ≥ 1) in order; missing metrics stay None."""
    out = []
    for r in sorted(rounds, key=lambda r: r.round):
        if r.round < 1:
            continue
        m = r.metrics
        out.append(
            RoundPoint(
                r.round, _float(m.get("top1")), _float(m.get("top3")),
                int(m.get("accepted", 0) or 0), int(m.get("rejected", 0) or 0),
                _float(m.get("duration_s")),
            )
        )
    return out


def baselines_of(sites: Iterable[SiteBaseline]) -> list[Baseline]:
    """The reference lines: each hospital's isolated model on all sites' test patients (the
    patients the global line is scored on), own-site top-1 for the tooltip.

    A run without cross-site baselines (DP, secure aggregation, --no-cross-baselines, or an
    older coordinator) draws no line: own-site scores on a narrower set of patients are not
    comparable with the global line; :func:`baselines_table_html` lists them instead.
    """
    out = []
    for b in sites:
        top1 = _float(b.all_sites_top1)
        if top1 is not None:
            out.append(Baseline(b.site, top1, _float(b.own_site_top1)))
    return sorted(out, key=lambda b: b.name)


def baselines_table_html(sites: Sequence[SiteBaseline]) -> str:
    """Each hospital's isolated model: top-1 on all sites' test patients and on its own."""
    if not sites:
        return ""
    rows = []
    for b in sorted(sites, key=lambda b: b.site):
        everywhere = _float(b.all_sites_top1)
        rows.append(
            f"<tr data-site='{escape(b.site)}'><td>{escape(b.site)}</td>"
            f"<td class='mm-num'>{_pct(everywhere)}</td>"
            f"<td class='mm-num'>{'—' if b.all_sites_n is None else b.all_sites_n}</td>"
            f"<td class='mm-num'>{_pct(_float(b.own_site_top1))}</td>"
            f"<td class='mm-num'>{'—' if b.own_site_n is None else b.own_site_n}</td></tr>"
        )
    note = "" if any(_float(b.all_sites_top1) is not None for b in sites) else (
        '<p class="mm-note">This run did not score isolated models on other sites\' patients '
        "(off under DP, secure aggregation or <code>--no-cross-baselines</code>), so the chart "
        "draws no reference lines: own-site scores are not comparable with it.</p>"
    )
    return (
        note + '<table class="mm-table" data-table="baselines"><tr><th>each hospital alone'
        "</th><th>top-1, all sites' test patients</th><th>patients</th>"
        "<th>top-1, its own test patients</th><th>patients</th></tr>" + "".join(rows)
        + "</table>"
    )


def training_html(
    points: Sequence[RoundPoint], baselines: Sequence[Baseline]
) -> tuple[str, str, str]:
    """Accuracy chart, updates chart and duration chart."""
    return accuracy_chart(points, baselines), updates_chart(points), duration_chart(points)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def rounds_table_html(rounds: Sequence[RoundInfo], limit: int = 25) -> str:
    """Newest rounds first: accuracy, verdict counts, rejection reasons, time, model."""
    if not rounds:
        return '<p class="mm-note">No closed rounds yet.</p>'
    # Differentially private runs carry ε spent so far (and δ) in every round's metrics.
    dp = any(_float(r.metrics.get("epsilon")) is not None for r in rounds)
    rows = []
    for r in sorted(rounds, key=lambda r: -r.round)[:limit]:
        m = r.metrics
        why = describe_verdicts(m)  # who was rejected or flagged, why, score vs threshold
        if not why:
            reasons = m.get("reasons") or {}
            why = ", ".join(f"{k}×{v}" for k, v in reasons.items()) \
                if isinstance(reasons, Mapping) else ""
        dur = _float(m.get("duration_s"))
        rows.append(
            f"<tr data-round='{r.round}'><td>{r.round}</td><td>{_pct(_float(m.get('top1')))}</td>"
            f"<td>{_pct(_float(m.get('top3')))}</td><td>{int(m.get('accepted', 0) or 0)}</td>"
            f"<td>{int(m.get('rejected', 0) or 0)}</td><td>{escape(why)}</td>"
            f"<td class='mm-num'>{'—' if dur is None else f'{dur * 1000:.0f}'}</td>"
            + (_eps_cell(m) if dp else "")
            + f"<td><code>{escape((r.model_hash or '')[:12])}</code></td></tr>"
        )
    return (
        '<table class="mm-table" data-table="rounds"><tr><th>round</th><th>top-1</th>'
        "<th>top-3</th><th>accepted</th><th>rejected</th><th>who and why</th><th>ms</th>"
        + ("<th>ε spent (δ)</th>" if dp else "")
        + "<th>model</th></tr>" + "".join(rows) + "</table>"
    )


def _eps_cell(m: Mapping[str, Any]) -> str:
    eps, delta = _float(m.get("epsilon")), _float(m.get("delta"))
    text = "—" if eps is None else f"{eps:.3f}" + ("" if delta is None else f" ({delta:g})")
    return f"<td class='mm-num' data-epsilon>{text}</td>"


# ---------------------------------------------------------------------------------- network


def _size(n: int) -> str:
    return f"{n} B" if n < 1000 else f"{n / 1000:.1f} kB" if n < 1e6 else f"{n / 1e6:.2f} MB"


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _to(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 2 else f"{names[0]}, … ({len(names)} peers)"


def feed_html(rows: Sequence[FeedRow]) -> str:
    """Time, from, to, type, size, verdict: what the router saw, never what it carried."""
    if not rows:
        return '<p class="mm-note" data-feed-rows="0">No messages routed yet.</p>'
    body = "".join(
        f"<tr data-seq='{r.seq}' data-type='{escape(r.type)}'><td>{_clock(r.at)}</td>"
        f"<td>{escape(r.sender)}</td><td title='{escape(', '.join(r.recipients))}'>"
        f"{escape(_to(r.recipients))}</td><td>{escape(r.type)}</td>"
        f"<td class='mm-num'>{_size(r.size)}</td><td class='mm-verdict'>{escape(r.verdict)}</td>"
        "</tr>"
        for r in rows
    )
    return (
        f'<table class="mm-table" data-table="feed" data-feed-rows="{len(rows)}"><tr>'
        "<th>time</th><th>from</th><th>to</th><th>type</th><th>size</th><th>verdict</th></tr>"
        f"{body}</table>"
    )


def network_summary_html(network: Network) -> str:
    """Messages per type and the data source (live router counters or enrolment only)."""
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td class='mm-num'>{v}</td></tr>"
        for k, v in sorted(network.messages_by_type.items())
    )
    source = (
        "live router counters" if network.source == "router"
        else "enrolment records only (router not reachable)"
    )
    return (
        f'<p class="mm-note">Source: {escape(source)} · {len(network.nodes)} nodes</p>'
        '<table class="mm-table"><tr><th>message type</th><th>routed</th></tr>'
        f"{rows}</table>"
    )


# ------------------------------------------------------------------------------------ audit


def head_html(count: int, head: str) -> str:
    return (
        f'<div class="mm-head" data-entries="{count}" data-head="{escape(head)}">'
        f"<b>{count}</b> audit entries · chain head <code>{escape(head[:24]) or '—'}…</code>"
        "</div>"
    )


def _matches(e: AuditEntry, names: Mapping[str, str], needle: str) -> bool:
    if not needle:
        return True
    hay = " ".join(
        (names.get(e.actor, e.actor), e.event, e.subject, str(e.round),
         json.dumps(e.body, sort_keys=True, default=str))
    ).lower()
    return all(word in hay for word in needle.lower().split())


def audit_table_html(
    entries: Sequence[AuditEntry],
    names: Mapping[str, str],
    query: str = "",
    event: str | None = None,
    round_: int | None = None,
    limit: int = 100,
) -> str:
    """Entries matching every word of ``query`` (and the event/round filters), newest first."""
    hits = [
        e for e in entries
        if (not event or e.event == event) and (round_ is None or e.round == round_)
        and _matches(e, names, query)
    ]
    rows = "".join(
        f"<tr data-seq='{e.seq}'><td>{e.seq}</td><td>{_clock(e.at)}</td>"
        f"<td>{escape(names.get(e.actor, e.actor[:10] + '…'))}</td><td>{escape(e.event)}</td>"
        f"<td>{e.round}</td><td><code>{escape(e.subject[:16])}</code></td>"
        f"<td class='mm-body'>{escape(_short(e.body))}</td>"
        f"<td><code>{escape(e.entry_hash[:12])}</code></td></tr>"
        for e in reversed(hits[-limit:])
    )
    return (
        f'<p class="mm-note" data-matches="{len(hits)}">{len(hits)} of {len(entries)} entries '
        f"match{'' if len(hits) <= limit else f'; newest {limit} shown'}.</p>"
        '<table class="mm-table" data-table="audit"><tr><th>seq</th><th>time</th><th>actor</th>'
        "<th>event</th><th>round</th><th>subject</th><th>details</th><th>entry hash</th></tr>"
        f"{rows}</table>"
    )


def _short(body: Mapping[str, Any], n: int = 140) -> str:
    text = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return text if len(text) <= n else text[: n - 1] + "…"


def verify_html(res: VerifyResult) -> str:
    """The Verify button's answer, in words."""
    if res.ok:
        signers = "signatures checked against the roster" if res.signers_checked \
            else "signatures checked"
        return (
            f'<div class="mm-ok-box" data-verify="ok">✔ Chain verifies: {res.entries} entries, '
            f"{signers}; head <code>{escape(res.head_hash[:24])}…</code></div>"
        )
    return (
        f'<div class="mm-error" data-verify="broken">✘ Chain broken at entry '
        f"{res.broken_seq}: {escape(res.problem)} ({res.entries} entries checked)</div>"
    )


def model_choices(models: Sequence[ModelInfo]) -> list[tuple[str, str]]:
    return [
        (f"round {m.round} · {m.model_hash[:12]}{' (serving)' if m.active else ''}", m.model_hash)
        for m in sorted(models, key=lambda m: (-m.round, -m.created_at))
    ]


def provenance_html(
    model: ModelInfo,
    models: Sequence[ModelInfo],
    verdicts: Mapping[str, AuditEntry],
    names: Mapping[str, str],
) -> str:
    """Hash, parent chain back to the initial model, and the updates that made it."""
    by_hash = {m.model_hash: m for m in models}
    chain: list[str] = []
    seen: set[str] = set()
    cur: ModelInfo | None = model
    while cur is not None and cur.model_hash not in seen and len(chain) < 50:
        seen.add(cur.model_hash)
        chain.append(f"r{cur.round} <code>{escape(cur.model_hash[:10])}</code>")
        cur = by_hash.get(cur.parent_hash or "")
    updates = [str(d) for d in model.provenance.get("updates", []) or []]
    rows = []
    for d in updates:
        v = verdicts.get(d)
        who = names.get(str(v.body.get("hospital", "")), "?") if v is not None else "?"
        rows.append(f"<tr><td><code>{escape(d[:16])}</code></td><td>{escape(who)}</td></tr>")
    vdigests = [str(d) for d in model.provenance.get("verdicts", []) or []]
    m = model.round_metrics or {}
    acc = _float(m.get("top1"))
    return (
        f'<div class="mm-prov" data-model="{escape(model.model_hash)}" '
        f'data-updates="{len(updates)}"><p>Model <code>{escape(model.model_hash)}</code>, '
        f"round {model.round}{' — serving now' if model.active else ''}; "
        f"{model.n_features} features × {model.n_classes} classes"
        f"{'' if acc is None else f'; top-1 {acc:.3f}'}.</p>"
        f"<p>Lineage: {' ← '.join(chain)}</p>"
        f"<p>{len(updates)} accepted update(s), approved in {len(set(vdigests))} signed "
        "verdict batch(es):</p>"
        '<table class="mm-table"><tr><th>update digest</th><th>hospital</th></tr>'
        + "".join(rows) + "</table></div>"
    )
