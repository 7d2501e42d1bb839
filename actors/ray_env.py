"""Ray's environment for a run: starting or joining Ray, its ports and auth, actor options,
placement on a cluster's nodes.

Side effects on Ray only; no protocol logic. ``medimesh.actors.runtime`` re-exports these
under their old import path.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection, Mapping, MutableMapping
from typing import Any

import ray

from medimesh.errors import ConfigError
from medimesh.run_config import DASHBOARD_PORT, METRICS_PORT

__all__ = [
    "DASHBOARD_PORT", "LOOPBACK", "METRICS_PORT", "NAMESPACE", "check_placement",
    "choose_auth_mode", "ensure_ray", "error_cause", "free_port", "hospital_resource",
    "named_actor", "ray_endpoints", "ray_init_args",
]

NAMESPACE = "medimesh"
LOOPBACK = "127.0.0.1"


def ray_init_args(
    address: str | None, environ: Mapping[str, str], num_cpus: int | None = None,
    dashboard: bool = False, dashboard_port: int = DASHBOARD_PORT,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """``ray.init`` arguments: our own local Ray unless an address is given explicitly
    (``--ray-address`` or ``RAY_ADDRESS``). Plain ``ray.init()`` would join whatever cluster
    another job started on this machine ("Connecting to latest cluster")."""
    target = address or environ.get("RAY_ADDRESS") or "local"
    args: dict[str, Any] = {"address": target, "log_to_driver": False, "namespace": NAMESPACE,
                            "configure_logging": False}
    if target == "local":  # resources, dashboard and ports are chosen only when we start Ray
        args |= {"num_cpus": num_cpus, "include_dashboard": dashboard}
        if dashboard:
            args |= {"dashboard_host": LOOPBACK, "dashboard_port": dashboard_port}
        if metrics_port is not None:
            args["_metrics_export_port"] = metrics_port
    return args


def ensure_ray(
    num_cpus: int | None = None, dashboard: bool = False, address: str | None = None,
    dashboard_port: int = DASHBOARD_PORT, metrics_port: int | None = None,
) -> None:
    """Start our own local Ray (or join ``address``), with clean stdout; reuse one already up
    in this process."""
    if ray.is_initialized():
        return
    args = ray_init_args(address, os.environ, num_cpus, dashboard, dashboard_port, metrics_port)
    if args["address"] == "local":
        choose_auth_mode(os.environ)
    ray.init(**args)


def choose_auth_mode(environ: MutableMapping[str, str]) -> str:
    """Token authentication for the Ray we start, unless ``RAY_AUTH_MODE`` already says.

    Ray turns tokens on by default for a new local cluster and logs a line asking whoever
    runs it to choose; the choice is ours: the dashboard and the job API run code and show
    the actors, so they want a token (``ray get-auth-token`` prints it; the dashboard asks for
    it once). ``RAY_AUTH_MODE=disabled`` still opts out, and Ray's child processes inherit it.
    """
    mode = environ.get("RAY_AUTH_MODE")
    if mode is None:
        environ["RAY_AUTH_MODE"] = mode = "token"
        if environ is os.environ:  # this process read its Ray config at import: read it again
            from ray._raylet import Config  # type: ignore[attr-defined]  # as Ray does itself

            Config.initialize("")
    return mode


def free_port(port: int, avoid: Collection[int] = (), tries: int = 50) -> int:
    """``port`` if nothing listens on it, else the next free one above it (or any free one).

    Tried on all interfaces: a port some process holds on any address is not free for Ray's
    metrics agent either.
    """
    for candidate in [*range(port, min(port + tries, 65536)), 0]:
        if candidate in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise ConfigError("no free port")  # pragma: no cover - port 0 always binds


def ray_endpoints() -> dict[str, str | None]:
    """URLs of the running Ray's dashboard (None without one) and of this node's metrics.

    The dashboard's ``/api/prometheus/sd`` lists every node's metrics endpoint (Prometheus
    HTTP service discovery); ``metrics`` is this node's (docs/metrics.md).
    """
    from ray._private.worker import get_dashboard_url  # what ray.init's context reports

    from medimesh.actors.telemetry import metrics_endpoint

    url = str(get_dashboard_url() or "")  # type: ignore[no-untyped-call]  # "host:port"
    return {
        "dashboard": (url if "://" in url else f"http://{url}") if url else None,
        "metrics": metrics_endpoint(),
    }


def named_actor(
    cls: type, name: str, restarts: int = 0, resources: dict[str, float] | None = None,
    here: bool = False,
) -> Any:
    """Actor options; ``here`` pins it to this driver's node (the head, on a cluster), so
    losing a hospital's node never takes the router, validator or coordinator with it."""
    extra: dict[str, Any] = {}
    if here:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        extra["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    return ray.remote(cls).options(
        name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=restarts,
        resources=resources or {}, **extra,
    )


def hospital_resource(site: str) -> str:
    """The custom resource a hospital's node advertises (deploy/cluster.yaml)."""
    return f"hospital:{site}"


def check_placement(sites: list[str]) -> None:
    """Refuse to start a pinned hospital whose node is missing, instead of placing it elsewhere
    (its data lives only on its own node)."""
    have: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    missing = [s for s in sites if have.get(hospital_resource(s), 0) < 1]
    if missing:
        raise ConfigError(
            "no node advertises " + ", ".join(repr(hospital_resource(s)) for s in missing)
            + "; refusing to place those hospitals elsewhere (start their nodes, or use "
            "--placement any on one machine)"
        )


def error_cause(exc: BaseException) -> str:
    """The last line of a remote error (e.g. "site.csv:17: column 'age': …"), not a traceback."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or line.startswith("medimesh."):
            return line.split(": ", 1)[-1] if line.startswith(("medimesh.", "ValueError")) else line
    return lines[-1] if lines else type(exc).__name__

