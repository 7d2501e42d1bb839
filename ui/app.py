"""The MediMesh dashboard: one Gradio Blocks app over the oracle's HTTP API.

Why this shape: the UI talks to the oracle only through the SDK (:class:`medimesh.Client`),
never to Ray, so it runs wherever the API is reachable (``medimesh ui --api URL``) or as a
thread next to the demo. Gradio is mounted on a FastAPI app with ``gr.mount_gradio_app`` and
served by uvicorn (Ray Serve's ``GradioServer`` failed here, see DESIGN.md). Views update on
a timer, so training rounds and routed messages appear without reloading. The page loads
even when the oracle is down and says so; every API error becomes a sentence in the page.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI

from medimesh.client import (
    Client,
    ModelInfo,
    Network,
    ReadyState,
    RoundInfo,
    SiteBaseline,
    Vocabulary,
)
from medimesh.errors import MediMeshError
from medimesh.ui import views
from medimesh.ui.charts import empty_chart
from medimesh.ui.live import AuditLog, feed_rows
from medimesh.ui.topology import node_views, topology_svg

__all__ = ["MAX_EXAMPLES", "TICK_S", "Dashboard", "UiServer", "build_app", "build_blocks"]

TICK_S = 2.0
MAX_EXAMPLES = 6
_NOTE = '<p class="mm-note">{}</p>'

CSS = """
.mm-banner { padding: 8px 12px; border-radius: 6px; margin-bottom: 4px; }
.mm-ok { background: #ecfdf5; border: 1px solid #10b981; color: #065f46; }
.mm-wait { background: #fffbeb; border: 1px solid #f59e0b; color: #92400e; }
.mm-down { background: #fef2f2; border: 1px solid #ef4444; color: #991b1b; }
.mm-error { background: #fef2f2; border: 1px solid #ef4444; color: #991b1b; padding: 8px 12px;
            border-radius: 6px; }
.mm-ok-box { background: #ecfdf5; border: 1px solid #10b981; color: #065f46; padding: 8px 12px;
             border-radius: 6px; }
.mm-note { color: #6b7280; font-size: 13px; margin: 4px 0; }
.mm-disclaimer { color: #6b7280; font-size: 12px; font-style: italic; }
.mm-table { border-collapse: collapse; font-size: 12px; width: 100%; }
.mm-table th, .mm-table td, .mm-findings td, .mm-findings th {
    border-bottom: 1px solid #e5e7eb; padding: 3px 6px; text-align: left; }
.mm-num { text-align: right !important; font-variant-numeric: tabular-nums; }
.mm-body { font-family: ui-monospace, monospace; font-size: 11px; word-break: break-all; }
.mm-findings { margin: 6px 0; font-size: 13px; }
.mm-findings table { border-collapse: collapse; width: 100%; font-size: 12px; }
.mm-model { margin: 4px 0 8px; }
.mm-ood { background: #fffbeb; border: 1px solid #f59e0b; color: #92400e; padding: 6px 10px;
          border-radius: 6px; margin: 4px 0; font-size: 13px; }
.mm-ood ul { margin: 4px 0 0 18px; }
.mm-ood-ok { color: #065f46; font-size: 12px; margin: 4px 0; }
.mm-ev-head { font-weight: 600; margin: 8px 0 2px; font-size: 13px; }
"""


@dataclass(slots=True)
class Live:
    """One refresh of the live views; ``error`` set when the oracle could not be asked."""

    ready: ReadyState | None = None
    error: Exception | None = None
    rounds: list[RoundInfo] = field(default_factory=list)
    baselines: list[SiteBaseline] = field(default_factory=list)
    network: Network | None = None


class Dashboard:
    """Server-side state shared by every browser tab: the SDK client and the caches.

    Retries are short (one) so an unreachable oracle is reported within a second, not after
    the SDK's default backoff; the timer retries anyway.
    """

    def __init__(
        self, api_url: str, client: Client | None = None, token: str | None = None
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.client = client or Client(self.api_url, timeout=5.0, retries=1, backoff=0.2,
                                       token=token)
        self.audit = AuditLog()
        self.names: dict[str, str] = {}
        self._vocab: Vocabulary | None = None

    def vocabulary(self) -> Vocabulary:
        """The model's input vocabulary, fetched once (it is fixed for a running oracle)."""
        if self._vocab is None:
            self._vocab = self.client.vocabulary()
        return self._vocab

    def live(self) -> Live:
        """Readiness, rounds, network and new audit entries; stops at the first failure."""
        out = Live()
        try:
            out.ready = self.client.ready()
            run = out.ready.run_id  # one run everywhere: the one the oracle serves
            self.audit.run_id = run
            out.rounds = self.client.rounds(run)
            out.baselines = self.client.baselines(run)
            out.network = self.client.network()
            self.names.update({n.peer_id: n.name for n in out.network.nodes})
            self.audit.refresh(self.client)
        except Exception as exc:  # shown in the banner; the next tick retries
            out.error = exc
        return out

    # -- views built from the caches

    def training(
        self, rounds: list[RoundInfo], sites: list[SiteBaseline] | None = None
    ) -> tuple[str, str, str, str]:
        """Charts and tables of the served run; ``sites``: its isolated-model baselines."""
        points = views.round_points(rounds)
        acc, upd, dur = views.training_html(points, views.baselines_of(sites or []))
        return acc, upd, dur, views.rounds_table_html(rounds) + views.baselines_table_html(
            sites or []
        )

    def network_views(self, network: Network) -> tuple[str, str, str]:
        quarantined: set[str] = set()  # the newest of quarantine / re-admission wins
        for e in self.audit.of("hospital_quarantined", "hospital_readmitted"):
            (quarantined.add if e.event == "hospital_quarantined" else quarantined.discard)(
                e.subject
            )
        current = max((e.round for e in self.audit.current_run()), default=0)
        late = {str(e.body.get("hospital", "")) for e in self.audit.of("late_update")
                if e.round >= current - 2}  # late in one of the last three rounds
        nodes = node_views(network, quarantined, late)
        feed = feed_rows(self.audit.of("message_routed", "message_refused", "verdict"),
                         self.names)
        return topology_svg(nodes), views.network_summary_html(network), views.feed_html(feed)

    def provenance(
        self, model_hash: str | None, models: list[ModelInfo], rounds: list[RoundInfo]
    ) -> str:
        """A model's lineage and the updates (and hospitals) behind it, from cached data."""
        if not model_hash:
            return _NOTE.format("Pick a published model.")
        model = next((m for m in models if m.model_hash == model_hash), None)
        if model is None:
            return _NOTE.format(f"Model {model_hash[:12]}… is not in the store.")
        metrics = next((r.metrics for r in rounds if r.model_hash == model_hash), None)
        verdicts = {e.subject: e for e in self.audit.entries if e.event == "verdict"}
        return views.provenance_html(
            dataclasses.replace(model, round_metrics=metrics), models, verdicts, self.names
        )

    def head(self) -> str:
        return views.head_html(len(self.audit.entries), self.audit.head_hash)

    def error(self, exc: BaseException) -> str:
        return views.error_html(exc, self.api_url)


def _guard(dash: Dashboard, fn: Callable[..., str]) -> Callable[..., str]:
    """Run a button's handler; any failure becomes a readable message in its output."""

    def run(*args: Any) -> str:
        try:
            return fn(*args)
        except Exception as exc:  # the UI boundary: show a sentence, never a traceback
            return dash.error(exc)

    return run


def build_blocks(dash: Dashboard) -> gr.Blocks:
    """The four views (Diagnose, Training, Network, Audit) under one status banner."""
    with gr.Blocks(title="MediMesh", analytics_enabled=False) as blocks:
        session = gr.State({"vocab": False, "models": -1, "seen": False, "pinned": False})
        status = gr.HTML(views.status_html(dash.api_url, None, None), elem_id="mm-status")
        gr.Markdown(
            "## MediMesh — federated rare-disease diagnosis\n"
            "Hospitals train one model together; patient records never leave them. "
            "This dashboard only shows what the oracle's API returns."
        )
        with gr.Tabs(elem_id="mm-tabs"):
            with gr.Tab("Diagnose", id="diagnose", elem_id="tab-diagnose"), gr.Row():
                with gr.Column(scale=5):
                    gr.Markdown("**Worked examples** (one click fills the form)")
                    with gr.Row():
                        examples = [
                            gr.Button(f"example {i + 1}", visible=False, size="sm",
                                      elem_id=f"mm-example-{i}")
                            for i in range(MAX_EXAMPLES)
                        ]
                    symptoms = gr.Dropdown(
                        choices=[], value=[], multiselect=True, filterable=True,
                        label="Observed findings (HPO terms) — type to search by name or id",
                        elem_id="mm-symptoms",
                    )
                    excluded = gr.Dropdown(
                        choices=[], value=[], multiselect=True, filterable=True,
                        label="Checked and ABSENT (excluded) — a finding in neither list "
                              "is 'not mentioned', which is not the same as absent",
                        elem_id="mm-excluded",
                    )
                    markers = gr.Dataframe(
                        headers=views.MARKER_HEADERS,
                        datatype=["str", "number", "str", "str"],
                        static_columns=[0, 3], interactive=True, type="array",
                        column_widths=["46%", "14%", "18%", "22%"], max_height=360,
                        wrap=True,
                        label="Biomarkers (leave blank if not measured; units may be "
                              "changed to an accepted alternative)",
                        elem_id="mm-markers",
                    )
                    with gr.Row():
                        genetic = gr.Radio(
                            views.GENETIC_CHOICES, value="not said",
                            label="Genetic testing done?", elem_id="mm-genetic", scale=2,
                        )
                        genes = gr.Dropdown(
                            choices=[], value=[], multiselect=True, allow_custom_value=True,
                            label="Variant genes ((likely) pathogenic findings)",
                            elem_id="mm-genes", scale=3,
                        )
                    with gr.Row():
                        age = gr.Textbox(label="Age at symptom onset (years)",
                                         placeholder="unknown", elem_id="mm-age")
                        sex = gr.Radio(["unknown", "F", "M"], value="unknown", label="Sex",
                                       elem_id="mm-sex")
                    with gr.Row():
                        diagnose = gr.Button("Diagnose", variant="primary",
                                             elem_id="mm-diagnose")
                        clear = gr.Button("Clear", elem_id="mm-clear")
                    attribution = gr.Markdown("", elem_id="mm-attribution")
                with gr.Column(scale=6):
                    result = gr.HTML(
                        _NOTE.format("Load a worked example or fill in the form, then "
                                     "press Diagnose."),
                        elem_id="mm-result",
                    )
            with gr.Tab("Training", id="training", elem_id="tab-training"):
                accuracy = gr.HTML(empty_chart("accuracy", "loading…"), elem_id="mm-accuracy")
                with gr.Row():
                    updates = gr.HTML(elem_id="mm-updates")
                    duration = gr.HTML(elem_id="mm-duration")
                rounds_table = gr.HTML(elem_id="mm-rounds")
            with gr.Tab("Network", id="network", elem_id="tab-network"):
                with gr.Row():
                    with gr.Column(scale=3):
                        topology = gr.HTML(elem_id="mm-topology")
                    with gr.Column(scale=2):
                        net_summary = gr.HTML(elem_id="mm-net-summary")
                gr.Markdown("**Live message feed** — metadata only; the router cannot read "
                            "payloads and neither can this page.")
                feed = gr.HTML(elem_id="mm-feed")
            with gr.Tab("Audit", id="audit", elem_id="tab-audit"):
                head = gr.HTML(elem_id="mm-head")
                with gr.Row():
                    verify = gr.Button("Verify chain", variant="primary", elem_id="mm-verify")
                    verify_out = gr.HTML(elem_id="mm-verify-result")
                with gr.Row():
                    query = gr.Textbox(label="Search entries (all words must match)",
                                       elem_id="mm-audit-query", scale=3)
                    event = gr.Dropdown(choices=[""], value="", label="Event",
                                        allow_custom_value=True, elem_id="mm-audit-event",
                                        scale=2)
                    round_ = gr.Textbox(label="Round", placeholder="any", elem_id="mm-audit-round",
                                        scale=1)
                    search = gr.Button("Search", elem_id="mm-audit-search", scale=1)
                audit_table = gr.HTML(elem_id="mm-audit-table")
                gr.Markdown("**Model provenance**")
                model = gr.Dropdown(choices=[], label="Published model", elem_id="mm-model")
                provenance = gr.HTML(elem_id="mm-provenance")
        timer = gr.Timer(TICK_S)

        live_outputs = [status, accuracy, updates, duration, rounds_table, topology, net_summary,
                        feed, head]
        vocab_outputs = [symptoms, excluded, genes, markers, attribution, *examples]

        def refresh(state: dict[str, Any], chosen: str | None) -> list[Any]:
            state = dict(state)
            live = dash.live()
            banner = views.status_html(dash.api_url, live.ready, live.error)
            data: list[Any]
            if live.error is not None or live.network is None:
                down = dash.error(live.error) if live.error else ""
                data = (
                    [gr.skip()] * 8 if state["seen"]
                    else [empty_chart("accuracy", "no data: the oracle is not answering"),
                          "", "", down, "", "", down, ""]
                )
            else:
                try:
                    data = [*dash.training(live.rounds, live.baselines),
                            *dash.network_views(live.network),
                            dash.head()]
                    state["seen"] = True
                except Exception as exc:  # an answer we cannot draw: say so, keep the last
                    banner = views.status_html(dash.api_url, live.ready, exc)
                    data = [gr.skip()] * 8
            vocab_updates: list[Any] = [gr.skip()] * len(vocab_outputs)
            if not state["vocab"] and live.error is None:
                try:
                    vocab_updates = _vocab_updates(dash.vocabulary())
                    state["vocab"] = True
                except Exception:  # shown by the banner; retried on the next tick
                    pass
            model_update: Any = gr.skip()
            prov: Any = gr.skip()
            if live.error is None:
                try:
                    models = dash.client.models(live.ready.run_id if live.ready else None)
                    if len(models) != state["models"]:
                        state["models"] = len(models)
                        choices = views.model_choices(models)
                        # Follow the newest model until the user picks one.
                        keep = chosen if state["pinned"] and chosen in dict(choices).values() \
                            else None
                        chosen = keep or (choices[0][1] if choices else None)
                        model_update = gr.update(choices=choices, value=chosen)
                    # Verdicts reach the audit trail after the model: re-render as they arrive.
                    prov = dash.provenance(chosen, models, live.rounds)
                except Exception:
                    pass
            return [banner, *data, *vocab_updates, model_update, prov, state]

        tick_outputs = [*live_outputs, *vocab_outputs, model, provenance, session]
        blocks.load(refresh, [session, model], tick_outputs, show_progress="hidden")
        timer.tick(refresh, [session, model], tick_outputs, show_progress="hidden")

        def load_example(i: int) -> Callable[[], list[Any]]:
            def load() -> list[Any]:
                try:
                    ex = dash.vocabulary().examples[i]
                except Exception as exc:
                    return [gr.skip()] * 7 + [dash.error(exc)]
                return [
                    list(ex.symptoms),
                    views.marker_rows(dash.vocabulary(), ex.biomarkers),
                    list(ex.genes),
                    "" if ex.age is None else f"{ex.age:g}",
                    ex.sex or "unknown",
                    [],
                    "done" if ex.genes else "not said",
                    _NOTE.format(f"Loaded “{ex.name}”. Press Diagnose."),
                ]

            return load

        form = [symptoms, markers, genes, age, sex, excluded, genetic]
        for i, button in enumerate(examples):
            button.click(load_example(i), None, [*form, result])

        def run_diagnosis(
            s: list[str] | None, m: Any, g: list[str] | None, a: str | None, x: str | None,
            e: list[str] | None, gt: str | None,
        ) -> str:
            request = views.form_request(s, m, g, a, x, dash.vocabulary(), e, gt)
            return views.diagnosis_html(dash.client.diagnose(**request))

        diagnose.click(_guard(dash, run_diagnosis), form, result)

        def clear_form() -> list[Any]:
            try:
                rows = views.marker_rows(dash.vocabulary())
            except Exception:
                rows = []
            return [[], rows, [], "", "unknown", [], "not said", _NOTE.format("Form cleared.")]

        clear.click(clear_form, None, [*form, result])

        def run_verify() -> str:
            return views.verify_html(dash.client.verify_audit())

        verify.click(_guard(dash, run_verify), None, verify_out)

        def run_search(q: str, ev: str | None, rnd: str | None) -> list[Any]:
            try:
                number = int(rnd) if rnd and rnd.strip() else None
            except ValueError:
                return [dash.error(views.FormError("Round must be a whole number")), gr.skip()]
            try:
                dash.audit.refresh(dash.client)
            except Exception as exc:
                return [dash.error(exc), gr.skip()]
            entries = dash.audit.entries
            table = views.audit_table_html(entries, dash.names, q or "", ev or None, number)
            events = ["", *sorted({e.event for e in entries})]
            return [table, gr.update(choices=events, value=ev or "")]

        for trigger in (search.click, query.submit):
            trigger(run_search, [query, event, round_], [audit_table, event])

        def show_provenance(model_hash: str | None) -> str:
            run = dash.audit.run_id
            return dash.provenance(model_hash, dash.client.models(run), dash.client.rounds(run))

        model.input(_guard(dash, show_provenance), model, provenance)

        def pin(state: dict[str, Any]) -> dict[str, Any]:
            return {**state, "pinned": True}

        model.input(pin, session, session)
    blocks_: gr.Blocks = blocks
    return blocks_


def _vocab_updates(vocab: Vocabulary) -> list[Any]:
    shown = vocab.examples[:MAX_EXAMPLES]
    buttons = [gr.update(value=ex.name, visible=True) for ex in shown]
    buttons += [gr.update(visible=False)] * (MAX_EXAMPLES - len(shown))
    choices = views.symptom_choices(vocab)
    return [
        gr.update(choices=choices),
        gr.update(choices=choices),
        gr.update(choices=list(vocab.genes)),
        views.marker_rows(vocab),
        f"<small>HPO release {vocab.hpo_release}. {vocab.attribution}</small>",
        *buttons,
    ]


def build_app(api_url: str, dash: Dashboard | None = None, token: str | None = None) -> FastAPI:
    """A FastAPI app serving the dashboard at ``/`` (plus ``/healthz`` for probes); ``token``:
    the oracle's API token, kept server-side (the browser never sees it)."""
    dash = dash or Dashboard(api_url, token=token)
    app = FastAPI(title="MediMesh dashboard", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "api": dash.api_url}

    mounted: FastAPI = gr.mount_gradio_app(
        app, build_blocks(dash), path="/", css=CSS, footer_links=[]
    )
    return mounted


class UiServer:
    """The dashboard on uvicorn in a daemon thread (the demo's driver process hosts it)."""

    def __init__(
        self, api_url: str, host: str = "127.0.0.1", port: int = 7860, token: str | None = None
    ) -> None:
        self.api_url = api_url
        self.host, self.port = host, port
        # Open browser tabs hold streaming connections: do not wait for them on shutdown.
        config = uvicorn.Config(build_app(api_url, token=token), host=host, port=port,
                                log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="medimesh-ui",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; raises MediMeshError if the port cannot be bound."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise MediMeshError(f"the UI could not start on {self.host}:{self.port} "
                                    "(port in use?)")
            time.sleep(0.05)

    def stop(self) -> None:
        # Open tabs' event streams are cut on purpose after the grace period; uvicorn would
        # log each cancellation as an ASGI error with a traceback.
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
