"""The oracle: a Ray Serve deployment with a FastAPI ingress over the diagnosis engine.

Why this shape: the API is a plain FastAPI app built by :func:`build_app` (in ``oracle_app``;
routes also in ``oracle_routes`` and ``phenopacket_api``), so it is testable with httpx's ASGI
transport and no Ray; :func:`oracle_deployment` wraps that same app with ``@serve.ingress`` for
production, and :func:`deploy` starts it on Serve. Endpoints are ``async def`` (a thread hop
costs Serve 3-4 ms per request) and the engine runs inline: one prediction is ~0.2 ms.

Hot swap: a background task (:class:`OracleState`, in ``oracle_state``) reacts to the store's
NOTIFY (and polls every ``poll_interval`` seconds as a fallback), builds a new immutable
:class:`DiagnosisEngine` for the latest model and replaces ``OracleState.served`` (engine + run
id) in one assignment. A request reads that reference once, so it is answered entirely by one
model, and no request waits for or fails during a swap.

Only a vouched-for model is served (medimesh.release): its weights and the checkpoint's
mean/std must hash to the release hash a ``model_published`` audit entry signs, signed by a
coordinator on the signed roster(s) the oracle holds (``roster_path``; without one, the store's
enrolled nodes, which its owner can edit: ``/ready`` says ``"roster": "store"``). A newer model
without one is refused: the previous vouched model keeps answering (or
503 before any), ``/ready`` says why under ``refused``, and ``/ready`` and every diagnosis name
the vouching entry (``vouched_by``: seq and entry hash).

Runs (medimesh.runs): an oracle serves one run, the one it was started for (``run_id``, as the
demo does), or, started without one, the newest run that has a model. ``/ready``, ``/diagnose``
and ``/rounds`` say which; ``/runs`` lists them; ``?run=`` picks another run's rounds.

Client mistakes are 4xx, never 500: pydantic bounds and engine validation give 422 naming the
field, an oversized body 413, an unknown model 404; a missing model or database is 503. Numbers
are strict and finite (no ``true`` for 1, no NaN/Infinity, which Python's json parser accepts),
and a 422 echoes its input made encodable, so it cannot itself fail.

The logic lives in :mod:`medimesh.oracle` (request models, response shapes, the vocabulary,
which model may serve, the event stream, the ASGI edge); this module is the Serve shell and
keeps every name other code imports from it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from fastapi import FastAPI

from medimesh.access import AccessPolicy, is_loopback
from medimesh.actors.oracle_app import build_app, configure
from medimesh.actors.oracle_state import OracleState
from medimesh.oracle.config import MAX_BODY_BYTES, OracleConfig
from medimesh.oracle.responses import entry_dict
from medimesh.oracle.serving import Served, engine_from
from medimesh.oracle.vocabulary import vocabulary_doc

__all__ = [
    "APP_NAME",
    "MAX_BODY_BYTES",
    "OracleConfig",
    "OracleState",
    "Served",
    "app_builder",
    "build_app",
    "configure",
    "deploy",
    "entry_dict",
    "oracle_deployment",
    "replica_access",
    "undeploy",
    "vocabulary_doc",
]

_engine_from = engine_from  # the name tests/test_cohort.py imports

# ------------------------------------------------------------------------------------ Serve


@functools.cache
def oracle_deployment() -> Any:
    """The Serve deployment class (built on first use, so importing this module is cheap).

    The ingress is late-bound (``@serve.ingress()`` + ``__serve_build_asgi_app__``): Serve
    freezes a copy of an app passed to ``ingress(app)`` at decoration time, so constructor
    arguments (database URL, router name) could not reach it. Building the app in the replica
    from those arguments gives the same FastAPI app :func:`build_app` returns in tests.
    """
    from ray import serve

    @serve.deployment(
        name="oracle",
        max_ongoing_requests=128,
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
        health_check_period_s=5,
    )
    @serve.ingress()
    class Oracle:
        """One replica: :func:`build_app` with this replica's store and engine."""

        def __init__(
            self,
            database_url: str,
            router_name: str | None = None,
            router_namespace: str = "medimesh",
            poll_interval: float = 1.0,
            run_id: str | None = None,
            label_codes: dict[str, Any] | None = None,
            roster_path: str | None = None,
            access: dict[str, Any] | None = None,
            api_token_file: str | None = None,
        ) -> None:
            self._config = OracleConfig(
                database_url, router_name, router_namespace, poll_interval, run_id=run_id,
                label_codes=label_codes, roster_path=roster_path,
                access=replica_access(access, api_token_file),
            )

        def __serve_build_asgi_app__(self) -> FastAPI:
            return build_app(self._config)

    return Oracle


def replica_access(
    access: dict[str, Any] | None, api_token_file: str | None
) -> AccessPolicy | None:
    """A replica's policy: the one ``deploy`` passed, else (serve.yaml) a token from
    ``$MEDIMESH_API_TOKEN`` or ``api_token_file`` on the replica's node (created 0600 there
    if missing, medimesh.api_token); None: loopback defaults."""
    if access is not None:
        return AccessPolicy.from_dict(access)
    if not api_token_file:
        return None
    import os
    from pathlib import Path as _Path

    from medimesh.api_token import resolve_token

    token = resolve_token(None, os.environ, _Path(api_token_file).expanduser())
    return AccessPolicy.exposed(token.token)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry point (``import_path: medimesh.actors.oracle:app_builder``)."""
    return oracle_deployment().bind(
        args["database_url"],
        args.get("router_name"),
        args.get("router_namespace", "medimesh"),
        float(args.get("poll_interval", 1.0)),
        args.get("run_id"),
        args.get("label_codes"),
        args.get("roster_path"),
        args.get("access"),
        args.get("api_token_file"),
    )


def deploy(
    database_url: str,
    router_name: str | None = None,
    port: int = 8000,
    *,
    router_namespace: str = "medimesh",
    poll_interval: float = 1.0,
    num_replicas: int = 1,
    run_id: str | None = None,
    label_codes: dict[str, Any] | None = None,
    roster_path: str | None = None,
    host: str = "127.0.0.1",
    access: AccessPolicy | None = None,
) -> str:
    """Start Serve on ``host``:``port`` with the oracle at ``/``; returns the base URL.
    ``run_id``: the run to serve (None: the newest run with a model). ``roster_path``: the
    signed roster(s) ``/audit/verify`` takes its signers from. ``access``: the token,
    rate limits and stream cap (None: AccessPolicy.local()); a ``host`` beyond loopback
    without a token is refused (medimesh.access.policy_for picks one).

    Needs a running Ray (``ray.init``); Serve's controller and proxy start on first call.
    """
    from ray import serve

    # Serve's driver-side INFO lines are chatter for a MediMesh user, and one misleads: every
    # serve.run after serve.start logs "New http_options ... will not be applied" although
    # serve.start already applied them (Ray 2.60 serve.run always calls serve_start). The
    # callers print the oracle's URL themselves; Serve's warnings and errors still show.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if not is_loopback(host) and (access is None or not access.requires_token):
        raise ValueError(f"refusing to serve the oracle on {host} without an API token")
    serve.start(http_options={"host": host, "port": port})
    dep = oracle_deployment().options(num_replicas=num_replicas)
    serve.run(
        dep.bind(database_url, router_name, router_namespace, poll_interval, run_id, label_codes,
                 roster_path, None if access is None else access.to_dict()),
        name=APP_NAME,
        route_prefix="/",
    )
    reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"


APP_NAME = "medimesh-oracle"
"""The oracle's Serve application name."""


def undeploy() -> None:
    """Remove the oracle's Serve application; Serve itself stays up (and stops with Ray).

    Not ``serve.shutdown()``: in Ray 2.60 the controller kills itself while the shutdown call
    is still waiting on it, and because the controller's tasks are retried forever Ray logs
    ``Task ServeController.graceful_shutdown failed … will be retried`` on every stop. On a
    shared cluster (``--ray-address``) shutting Serve down would also take other applications
    with it. A local Ray we started ends with the process, Serve's actors with it.
    """
    from ray import serve

    serve.delete(APP_NAME)
