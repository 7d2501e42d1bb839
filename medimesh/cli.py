"""The ``medimesh`` command: demo, benchmarks.

Human progress goes to stderr; ``--json`` prints exactly one JSON object on stdout.
Errors a user can fix print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medimesh.errors import MediMeshError
from medimesh.logs import configure

__all__ = ["main"]

_STDOUT: Any = None


def emit(text: str) -> None:
    """Write the command's result to the real stdout (everything else goes to stderr)."""
    out = _STDOUT or sys.stdout
    out.write(text + "\n")
    out.flush()


def _guard_stdout() -> None:
    """Point fd 1 at stderr for the whole run, keeping a private handle on the real stdout.

    Ray's driver prints raylet warnings with print(); --json output must stay one clean object.
    """
    global _STDOUT
    if _STDOUT is not None:
        return
    sys.stdout.flush()
    _STDOUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _site(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a CSV file or a directory of "
                                         f"phenopackets), got {text!r}")
    return name, path


def _csv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default=None, help="feature spec JSON (docs/feature-spec.md)")
    p.add_argument("--site", type=_site, action="append", default=[], metavar="NAME=PATH",
                   help="one hospital and its own CSV file, or its own directory of GA4GH "
                        "phenopackets (rare panel; docs/phenopackets.md); repeat per site")
    p.add_argument("--label-codes", default=None, metavar="FILE",
                   help="phenopacket sites: disease-id → class (and assay → biomarker) mapping "
                        "JSON (default: the panel's ORPHA ids)")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="held-out fraction of each CSV site (0: train on every row)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip and count rows that fail the spec instead of stopping")


def _run_args(p: argparse.ArgumentParser, hospitals: int = 8, rounds: int = 20) -> None:
    p.add_argument("--dataset", choices=["rare", "sparse", "heart", "csv"], default="rare")
    p.add_argument("--hospitals", type=_positive_int, default=hospitals,
                   help="number of hospitals (rare cohort; heart always has 4)")
    p.add_argument("--rounds", type=_positive_int, default=rounds)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=None,
                   help="Dirichlet concentration of the hospitals' disease mix "
                        "(default: rare 0.5, sparse 0.3)")
    p.add_argument("--diseases", type=int, default=10, metavar="N",
                   help="rare cohort: N diseases, the ten hand-picked ones plus N-10 Orphanet "
                        "differentials from the bundled HPO annotations (10..100; "
                        "docs/cohort.md)")
    p.add_argument("--data-dir", default=None, help="heart data folder")
    p.add_argument("--local-steps", type=_positive_int, default=None)
    p.add_argument("--l2", type=float, default=None)
    p.add_argument("--prox-mu", type=float, default=None)
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join this Ray cluster (default: start our own local Ray, unless "
                        "RAY_ADDRESS is set)")
    p.add_argument("--tolerate", type=int, default=None, metavar="F",
                   help="dishonest hospitals the robust aggregation is built to tolerate")
    p.add_argument("--round-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long a round waits for lost or slow hospitals (default 30; "
                        "bench chaos: 3)")
    p.add_argument("--placement", choices=["any", "pinned"], default="any",
                   help="pinned: each hospital only on the node advertising hospital:<name>")
    p.add_argument("--keys-dir", default=None,
                   help="identities and roster.json from `medimesh keys`/`roster` (default: "
                        "fresh keys for this run)")
    p.add_argument("--no-cross-baselines", action="store_true",
                   help="do not score each hospital's isolated model on its peers' test "
                        "patients (it is sealed to peer hospitals at setup; always off with "
                        "DP or secure aggregation; docs/privacy.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    _csv_args(p)


def _momentum(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _server_args(p: argparse.ArgumentParser) -> None:
    """Aggregation rule and server optimizer (demo, train, bench accuracy)."""
    from medimesh.aggregation import AGGREGATORS
    from medimesh.aggregation import DEFAULT as DEFAULT_AGGREGATOR
    from medimesh.server_opt import DEFAULT_LR, DEFAULT_MOMENTUM, SERVER_OPTIMIZERS

    def per_rule(defaults: dict[str, float]) -> str:
        names: dict[float, list[str]] = {}
        for name, value in defaults.items():
            names.setdefault(value, []).append(name)
        return ", ".join(f"{v:g} for {'/'.join(n)}" for v, n in names.items())

    p.add_argument("--aggregator", choices=sorted(AGGREGATORS), default=DEFAULT_AGGREGATOR,
                   help=f"how the accepted updates are combined (default: {DEFAULT_AGGREGATOR})")
    p.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, default="fedavgm",
                   help="server step on the aggregate: FedAvgM or the adaptive FedAdam, FedYogi, "
                        "FedAdagrad of Reddi et al. 2021 (default: fedavgm)")
    p.add_argument("--server-lr", type=_positive_float, default=None, metavar="ETA",
                   help=f"server step size (default: {per_rule(DEFAULT_LR)})")
    p.add_argument("--server-momentum", type=_momentum, default=None, metavar="BETA1",
                   help="FedAvgM momentum, or β1 of the adaptive optimizers (default: "
                        f"{per_rule(DEFAULT_MOMENTUM)})")


def _server_config(args: argparse.Namespace) -> dict[str, Any]:
    """RunConfig fields from _server_args, for the commands that have them."""
    if not hasattr(args, "server_optimizer"):
        return {}
    return {
        "aggregator": args.aggregator,
        "server_optimizer": args.server_optimizer,
        "server_lr": args.server_lr,
        "server_momentum": args.server_momentum,
    }


def _server_summary(cfg: Any) -> dict[str, Any]:
    """The aggregation rule and the server optimizer with its effective parameters."""
    from medimesh.server_opt import make_server_optimizer

    opt = make_server_optimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum)
    return {"aggregator": cfg.aggregator, **opt.describe()}


def _config(args: argparse.Namespace) -> Any:
    from medimesh.actors.runtime import RunConfig
    from medimesh.model import TrainConfig
    from medimesh.recipes import recipe

    server = _server_config(args)
    plan = recipe(args.dataset)
    base = plan.train
    if plan.server_momentum is not None and server.get("server_momentum") is None and (
        server.get("server_optimizer") in (None, "fedavgm")
    ):
        server["server_momentum"] = plan.server_momentum
    train = TrainConfig(
        epochs=args.local_steps or base.epochs,
        lr=base.lr,
        l2=base.l2 if args.l2 is None else args.l2,
        prox_mu=base.prox_mu if args.prox_mu is None else args.prox_mu,
    )
    spec = None
    if args.spec is not None:
        from medimesh.spec import load_spec

        spec = load_spec(Path(args.spec)).to_dict()
    return RunConfig(
        spec=spec,
        csv_sites=tuple(args.site),
        label_codes=_label_codes(getattr(args, "label_codes", None)),
        test_fraction=args.test_fraction,
        skip_bad_rows=args.skip_bad_rows,
        dataset=args.dataset,
        hospitals=args.hospitals,
        rounds=args.rounds,
        seed=args.seed,
        alpha=_alpha(args),
        n_diseases=args.diseases,
        train=train,
        data_dir=args.data_dir,
        audit_path=getattr(args, "audit_file", None),
        database_url=_database_url(getattr(args, "database_url", "none")),
        roster_dir=_trail_dir(args, "rosters"),
        witness_dir=_trail_dir(args, "witness"),
        pace_s=_pace(args),
        tolerate=args.tolerate,
        ray_address=args.ray_address,
        placement=args.placement,
        keys_dir=args.keys_dir,
        cross_baselines=not getattr(args, "no_cross_baselines", False),
        **_ray_ports(args),
        **({} if args.round_timeout is None else {"round_timeout_s": args.round_timeout}),
        **server,
    )


def _ray_dashboard_args(p: argparse.ArgumentParser, default_on: bool) -> None:
    """The Ray dashboard and metrics ports of the local Ray we start (not a joined cluster)."""
    from medimesh.actors.runtime import DASHBOARD_PORT, METRICS_PORT

    if default_on:
        p.add_argument("--no-ray-dashboard", dest="ray_dashboard", action="store_false",
                       help="start Ray without its dashboard")
    else:
        p.add_argument("--ray-dashboard", action="store_true",
                       help="also start the Ray dashboard (actors, logs, metrics)")
    p.set_defaults(ray_dashboard=default_on)
    p.add_argument("--ray-dashboard-port", type=int, default=DASHBOARD_PORT, metavar="PORT",
                   help="Ray dashboard port on 127.0.0.1 (default %(default)s; taken: the next "
                        "free one)")
    p.add_argument("--ray-metrics-port", type=int, default=METRICS_PORT, metavar="PORT",
                   help="Prometheus endpoint of Ray's metrics agent, ray_medimesh_* included "
                        "(default %(default)s; taken: the next free one)")


def _ray_ports(args: argparse.Namespace) -> dict[str, Any]:
    """RunConfig's Ray dashboard fields; a taken port moves to the next free one, said once."""
    if not hasattr(args, "ray_metrics_port") or args.ray_address or os.environ.get("RAY_ADDRESS"):
        return {}  # a joined cluster has its own dashboard and ports
    from medimesh.actors.runtime import free_port

    def pick(what: str, flag: str, wanted: int, avoid: tuple[int, ...] = ()) -> int:
        got = free_port(wanted, avoid=avoid)
        if got != wanted:
            print(f"medimesh: {what} port {wanted} is in use; using {got} ({flag} PORT to "
                  "choose)", file=sys.stderr, flush=True)
        return got

    out: dict[str, Any] = {"ray_dashboard": bool(args.ray_dashboard)}
    taken: tuple[int, ...] = ()
    if args.ray_dashboard:
        out["ray_dashboard_port"] = pick("Ray dashboard", "--ray-dashboard-port",
                                         args.ray_dashboard_port)
        taken = (out["ray_dashboard_port"],)
    out["ray_metrics_port"] = pick("Ray metrics", "--ray-metrics-port", args.ray_metrics_port,
                                   taken)
    return out


def _ray_banner() -> str:
    """Where to watch the running Ray: its dashboard (if any) and the metrics endpoint."""
    from medimesh.actors.runtime import ray_endpoints

    urls = ray_endpoints()
    lines = []
    if urls["dashboard"]:
        token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        lines.append(f"ray dashboard: {urls['dashboard']}  (actors, logs, metrics"
                     + ("; its token: `ray get-auth-token`" if token else "") + ")")
    lines.append(f"ray metrics: {urls['metrics']}  (ray_medimesh_*: docs/metrics.md)")
    return "\n".join(lines)


def _label_codes(path: str | None) -> dict[str, Any] | None:
    """The --label-codes file's JSON, or None (checked again, fully, where it is used)."""
    if path is None:
        return None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise MediMeshError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise MediMeshError(f"{path}: expected a JSON object")
    return doc


def _site_kind(args: argparse.Namespace) -> str:
    """train: 'csv' with --spec (CSV files and phenopacket directories may mix), else
    'phenopackets' (rare panel) when every --site is a directory of phenopackets."""
    dirs = [Path(p).is_dir() for _, p in args.site]
    if args.spec is not None or not any(dirs):
        return "csv"
    if not all(dirs):
        raise MediMeshError("--site: CSV files need --spec; without it every site must be a "
                            "directory of phenopackets (rare panel)")
    return "phenopackets"


DEMO_PACE_S = 2.0
"""Rounds take ~50 ms: unpaced, training is over before anyone opens the dashboard."""


def _pace(args: argparse.Namespace) -> float:
    """The demo paces rounds while it serves the dashboard (people watch), never otherwise."""
    pace = getattr(args, "pace", None)
    if pace is not None:
        return float(pace)
    if getattr(args, "func", None) is not cmd_demo:
        return 0.0
    serving = not (args.no_serve or args.json) and args.database_url != "none"
    return DEMO_PACE_S if serving else 0.0


def _alpha(args: argparse.Namespace) -> float:
    """Each synthetic cohort's own default skew: rare 0.5, sparse 0.3 (docs/cohort.md)."""
    if args.alpha is not None:
        return float(args.alpha)
    return 0.3 if args.dataset == "sparse" else 0.5


def _database_url(choice: str | None) -> str | None:
    """'none' → in memory; 'embedded' → the pgserver in .medimesh/pg; else the URL given."""
    if choice in (None, "none"):
        return None
    if choice == "embedded":
        from medimesh.store import database_url

        return database_url()
    return choice


STATE_DIR = Path(".medimesh")
"""Where a run on a database keeps its signed rosters and the hospitals' witness logs."""


def _trail_dir(args: argparse.Namespace, name: str) -> str | None:
    """With a database: the signed roster goes to .medimesh/rosters/<run>.json and each hospital
    witnesses chain heads in .medimesh/witness/<site>/ (docs/threat-model/audit_trail.md)."""
    if _database_url(getattr(args, "database_url", "none")) is None:
        return None
    return str(STATE_DIR.resolve() / name)


def _progress(total: int) -> Callable[[dict[str, Any]], None]:
    def show(m: dict[str, Any]) -> None:
        acc = "   n/a" if math.isnan(m["top1"]) else f"{m['top1']:.3f}"
        top3 = "   n/a" if math.isnan(m["top3"]) else f"{m['top3']:.3f}"
        from medimesh.rounds import describe_verdicts

        why = describe_verdicts(m)
        print(
            f"round {m['round']:>3}/{total}  top1 {acc}  top3 {top3}  "
            f"accepted {m['accepted']}/{m['accepted'] + m['rejected']}  "
            f"{m['duration_s'] * 1000:7.1f} ms  model {m['model_hash'][:12]}"
            + (f"\n    {why}" if why else ""),
            file=sys.stderr,
            flush=True,
        )

    return show


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the federation, then (unless --no-serve/--json) the oracle and the UI, then train.

    The oracle and UI come up before training so people watch the rounds arrive.
    """
    from medimesh.actors.runtime import Consortium

    cfg = _config(args)
    sites = _site_processes(args) if args.sites == "processes" else None
    if sites is not None:
        from medimesh.node.consortium import remote_config

        cfg = remote_config(keys=sites.keys, roster=sites.roster, spec=sites.spec,
                            axl_listen="127.0.0.1:0", base=cfg)
    serving = not (args.no_serve or args.json) and cfg.database_url is not None
    server = _server_summary(cfg)
    dataset = cfg.dataset if sites is None else f"{args.dataset} (each site its own process)"
    print(
        f"MediMesh demo: {cfg.n_sites} hospitals, {cfg.rounds} rounds, dataset {dataset}, "
        f"aggregator {cfg.aggregator}, server {server['server_optimizer']} "
        f"(lr {server['server_lr']:g}, momentum {server['server_momentum']:g}); "
        "starting Ray…",
        file=sys.stderr,
        flush=True,
    )
    fed = Consortium(cfg)
    if sites is not None:
        fed.on_front = lambda front: _launch_sites(sites, fed, front)
    # Stopped last of all but the federation: a hospital process flushes its audit events
    # through the AXL front on its way out.
    stops: list[Callable[[], None]] = [] if sites is None else [lambda: _stop_sites(sites)]
    try:
        timings = fed.start()
        print(
            f"run {fed.run_id} started in {timings['startup_s']:.1f} s; setup round: "
            f"{fed.setup_summary['n_train']} training patients across "
            f"{fed.setup_summary['hospitals']} hospitals, pooled nowhere",
            file=sys.stderr,
            flush=True,
        )
        if args.drop or args.delay or args.partition:
            fed.set_faults(args.drop, args.delay, [g.split(",") for g in args.partition],
                           jitter_s=args.jitter)
            print(f"fault drill: drop {args.drop:.0%}, delay {args.delay} s, partitions "
                  f"{args.partition or 'none'}", file=sys.stderr, flush=True)
        if serving:
            assert cfg.database_url is not None
            _start_services(cfg.database_url, args, fed.router_name(), stops, _ray_banner(),
                            fed.run_id, cfg.roster_dir)
        elif not args.json:
            print(_ray_banner(), file=sys.stderr, flush=True)
        history = fed.run(None if args.json else _progress(cfg.rounds))
        final = fed.final_model()
        stats = fed.router_stats()
        network = None
        if sites is not None:
            import ray

            from medimesh.oracle.responses import network_from_router

            topo = ray.get(fed.handles["router"].topology.remote())
            network = network_from_router(stats, topo)  # what /network answers now
            if not serving:  # their node_stopped events reach the trail before it is verified
                _stop_sites(sites)
        audit = fed.verify_audit()
        fed.flush_store()
        result = {
            "run_id": fed.run_id,
            "dataset": cfg.dataset if sites is None else args.dataset,
            "sites": args.sites,
            "hospitals": cfg.n_sites,
            "server": server,
            "rounds": history,
            "final_model_hash": final["model_hash"],
            "final_top1": history[-1]["top1"],
            "final_top3": history[-1]["top3"],
            "startup_s": timings,
            "router": {
                "messages_by_type": stats["messages_by_type"],
                "bytes_by_type": stats["bytes_by_type"],
                "rejected": stats["rejected"],
            },
            "audit": audit,
        }
        if sites is not None:
            result["processes"] = {"folder": str(sites.root), "sites": sites.describe(),
                                   "network": network}
        if args.json:
            emit(json.dumps(result))
        else:
            print(
                f"\nrun {fed.run_id}: final model {final['model_hash'][:16]}…  "
                f"top1 {history[-1]['top1']:.3f}  "
                f"top3 {history[-1]['top3']:.3f}\n"
                f"router: {sum(stats['messages_by_type'].values())} envelopes routed "
                f"{dict(stats['messages_by_type'])}\n"
                f"audit trail: {audit['entries']} entries, chain "
                f"{'verifies' if audit['ok'] else 'BROKEN: ' + audit['problem']}",
                file=sys.stderr,
            )
        if not serving:
            if not (args.no_serve or args.json):
                print("(no database: nothing to serve; use --database-url)", file=sys.stderr)
            return 0
        print("training done; still serving. Press Ctrl-C to stop", file=sys.stderr, flush=True)
        _wait_for_ctrl_c()
    finally:
        shut_down(stops, fed)
    return 0


def _site_processes(args: argparse.Namespace) -> Any:
    """The demo's folder for ``--sites processes``: keys, signed roster, site CSVs, spec."""
    from medimesh.node.processes import PROCESSES_DIR, SiteProcesses
    from medimesh.runs import new_run_id

    root = (PROCESSES_DIR / new_run_id()).resolve()
    sites = SiteProcesses.prepare(root, args.dataset, hospitals=args.hospitals, seed=args.seed,
                                  alpha=_alpha(args), n_diseases=args.diseases,
                                  data_dir=args.data_dir)
    print(f"sites as processes: {root} holds a key per member (the demo holds them all and "
          f"signed the roster for each), the roster and each site's CSV", file=sys.stderr,
          flush=True)
    return sites


def _launch_sites(sites: Any, fed: Any, front: Any) -> None:
    """Start one ``medimesh node hospital`` process per site against the AXL front; label
    each on the router, so /network and the dashboard show it as a process over AXL."""
    import ray

    sites.launch(front.url)
    router = fed.handles["router"]
    ray.get([router.describe.remote(s.peer_id, {"runs_as": "process", "pid": s.proc.pid})
             for s in sites.sites])
    for s in sites.sites:
        print(f"hospital process {s.name}: pid {s.proc.pid}, log {s.folder / 'node.log'}",
              file=sys.stderr, flush=True)
    print(f"AXL front {front.url} (pin {front.pin[:16]}…); waiting for setup",
          file=sys.stderr, flush=True)


def _stop_sites(sites: Any) -> None:
    if not sites.running():
        return
    killed = sites.stop()
    codes = {s.name: s.proc.returncode for s in sites.sites if s.proc is not None}
    print(f"hospital processes stopped: exit codes {codes}"
          + (f"; killed after the timeout: {killed}" if killed else ""), file=sys.stderr,
          flush=True)


def _access(args: argparse.Namespace) -> Any:
    """The oracle's access policy for ``--host``/``--api-token``/``--require-token``; prints
    where the token comes from (the token itself only when it was just generated)."""
    from medimesh.access import is_loopback, policy_for
    from medimesh.api_token import resolve_token

    needed = args.require_token or args.api_token is not None or not is_loopback(args.host)
    token = resolve_token(args.api_token, os.environ) if needed else None
    if token is not None:
        print(token.notice(), file=sys.stderr, flush=True)
    try:
        return policy_for(args.host, None if token is None else token.token, args.require_token)
    except ValueError as exc:  # e.g. a token shorter than 16 characters
        raise MediMeshError(str(exc)) from None


def _access_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="oracle bind address (default %(default)s); any other address (e.g. "
                        "0.0.0.0) requires an API token (docs/security.md)")
    p.add_argument("--api-token", default=None, metavar="TOKEN",
                   help="require this token (prefer $MEDIMESH_API_TOKEN: a flag shows in ps)")
    p.add_argument("--require-token", action="store_true",
                   help="require a token on loopback too ($MEDIMESH_API_TOKEN, else "
                        ".medimesh/api-token, generated on first use)")


def _start_services(
    database_url: str, args: argparse.Namespace, router_name: str,
    stops: list[Callable[[], None]], ray_banner: str = "", run_id: str | None = None,
    roster_path: str | None = None,
) -> None:
    """Deploy the oracle on Ray Serve (serving ``run_id``, models vouched for by the coordinator
    of the signed rosters at ``roster_path``) and start the UI (a thread here); print both URLs."""
    from medimesh.actors.oracle import deploy

    access = _access(args)
    stops.append(_stop_serve)
    url = deploy(database_url, router_name=router_name, port=args.port, run_id=run_id,
                 roster_path=roster_path, host=args.host, access=access)
    from medimesh.access import is_loopback
    from medimesh.ui.app import UiServer

    if access.requires_token and not is_loopback(args.ui_host):
        print(f"warning: the dashboard on {args.ui_host} has no login and holds the API token",
              file=sys.stderr, flush=True)
    ui = UiServer(url, host=args.ui_host, port=args.ui_port, token=access.token)
    stops.append(ui.stop)
    ui.start()
    print(
        f"\noracle: {url}  (API docs {url}/docs; serving run {run_id or 'newest'})\n"
        f"ui: {ui.url}\n"
        + (ray_banner + "\n" if ray_banner else "")
        + "training starts now: watch the rounds arrive in the UI. Ctrl-C to stop\n",
        file=sys.stderr,
        flush=True,
    )


def _stop_serve() -> None:
    from medimesh.actors.oracle import undeploy

    undeploy()


def shut_down(stops: Sequence[Callable[[], object]], fed: Any) -> None:
    """Stop the services (newest first), then the federation; one failing stop does not keep
    the others running."""
    for stop in reversed(stops):
        try:
            stop()
        except Exception as exc:  # keep shutting the rest down
            print(f"medimesh: shutdown: {type(exc).__name__}: {exc}", file=sys.stderr)
    fed.shutdown()


def _wait_for_ctrl_c() -> None:
    """Block until Ctrl-C or SIGTERM (a service manager's stop), then return to clean up."""
    import signal

    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the dashboard for an oracle somewhere else; it never talks to Ray."""
    from medimesh.access import TOKEN_ENV
    from medimesh.ui.app import UiServer

    ui = UiServer(args.api, host=args.host, port=args.port,
                  token=os.environ.get(TOKEN_ENV) or None)
    ui.start()
    print(f"ui: {ui.url}  (oracle {args.api})\npress Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        _wait_for_ctrl_c()
    finally:
        ui.stop()
    return 0


def _serve_forever(
    database_url: str, port: int, router_name: str | None, run_id: str | None = None,
    label_codes: dict[str, Any] | None = None, host: str = "127.0.0.1", access: Any = None,
    roster: str | None = None,
) -> None:
    """Deploy the oracle on Ray Serve and block until Ctrl-C."""
    from medimesh.actors.oracle import deploy

    rosters = STATE_DIR.resolve() / "rosters"  # the signed rosters runs here wrote
    url = deploy(database_url, router_name=router_name, port=port, run_id=run_id,
                 label_codes=label_codes,
                 roster_path=roster or (str(rosters) if rosters.is_dir() else None),
                 host=host, access=access)
    print(
        f"\noracle: {url}  (API docs {url}/docs; try {url}/runs, {url}/rounds)\n"
        f"serving run {run_id or 'newest (follows new runs)'}\n"
        "press Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        _stop_serve()


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the oracle on an existing store (models, rounds and audit of earlier runs)."""
    from medimesh.actors.runtime import ensure_ray

    url = _database_url(args.database_url)
    if url is None:
        raise MediMeshError("serve needs a database: --database-url URL or 'embedded'")
    codes = _label_codes(args.label_codes)
    if codes is not None:
        from medimesh.phenopackets import PhenopacketError, load_label_codes

        try:
            load_label_codes(codes)
        except PhenopacketError as exc:
            raise MediMeshError(str(exc)) from None
    access = _access(args)
    roster = args.roster
    if roster is not None:  # the signed roster(s) whose coordinator must vouch for a model
        from medimesh.audit_cli import read_signed_rosters

        rosters = read_signed_rosters([Path(roster)])  # refuses a copy that does not verify
        if not any(r.with_role("coordinator") for r in rosters):
            raise MediMeshError(f"roster {roster} enrols no coordinator: nothing to serve")
    ensure_ray()
    _serve_forever(url, args.port, None, args.run, codes, args.host, access, roster)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Federated training on CSV sites; writes the model (weights, spec, scaling, provenance)."""
    from medimesh.actors.runtime import Consortium
    from medimesh.modelfile import save_model

    synthetic_rare = args.dataset == "rare" and not args.site and args.spec is None
    # sparse, heart and (no --site, no --spec) the synthetic rare cohort: the hospitals build
    # their own rows; otherwise every site is a CSV file or a directory of phenopackets.
    if args.dataset not in ("sparse", "heart") and not synthetic_rare:
        args.dataset = _site_kind(args)
    cfg = _config(args)
    t0 = time.perf_counter()
    fed = Consortium(cfg)
    try:
        fed.start()
        print(
            f"{cfg.n_sites} hospitals, {fed.setup_summary['n_train']} training rows; "
            f"{cfg.rounds} rounds",
            file=sys.stderr,
            flush=True,
        )
        if cfg.ray_dashboard:
            print(_ray_banner(), file=sys.stderr, flush=True)
        history = fed.run(None if args.json else _progress(cfg.rounds))
        final = fed.final_model()
        audit = fed.verify_audit()
    finally:
        fed.shutdown()
    out = Path(args.out) if args.out else Path(".medimesh/models") / final["model_hash"][:12]
    path = save_model(
        out,
        final,
        fed.info.class_names,
        fed.info.feature_names,
        fed.info.log_mask,
        fed.info.scale_mask,
        _saved_spec(cfg.dataset, fed.descriptors[0].params, cfg.spec),
        history,
    )
    result = {
        "run_id": fed.run_id,
        "model_dir": str(out),
        "model_hash": final["model_hash"],
        "server": _server_summary(cfg),
        "rounds": history,
        "sites": fed.hospital_info,
        "audit": audit,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    if args.json:
        emit(json.dumps(result))
    else:
        print(f"model {final['model_hash'][:16]}… written to {path}", file=sys.stderr)
        for site in fed.hospital_info:
            if "phenopackets" in site:
                r = site["phenopackets"]
                print(f"  {site['name']}: {r['used']}/{r['files_read']} phenopackets used, "
                      f"skipped {r['skipped'] or 'none'}, {r['unknown_terms']} unknown term(s)"
                      + (f", unreadable: {', '.join(r['malformed_files'])}"
                         if r["malformed_files"] else ""),
                      file=sys.stderr)
            elif site["skipped_rows"] or site["unknown_codes"]:
                print(
                    f"  {site['name']}: {site['skipped_rows']} row(s) skipped, "
                    f"{site['unknown_codes']} unknown code(s) ignored",
                    file=sys.stderr,
                )
    return 0


def _saved_spec(
    dataset: str, params: dict[str, Any], spec: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The spec saved with a trained model: the one that reads `medimesh data sparse|heart`
    CSVs for those datasets (so `evaluate` scores them), else the spec trained with."""
    if dataset == "sparse":
        from medimesh.data import sparse

        return sparse.spec_dict(sparse.SparseConfig(**params["cohort"]))
    if dataset == "heart":
        from medimesh.data import heart

        return heart.spec_dict(params.get("preprocessing", "flamby+missing"))
    return spec


def cmd_data(args: argparse.Namespace) -> int:
    """Write the sparse HPO consortium as one CSV per site plus spec.json; print `train`."""
    import shlex

    from medimesh.data.sparse import SparseConfig, write_consortium
    from medimesh.recipes import recipe as dataset_recipe

    try:
        recipe = SparseConfig(n_hospitals=args.hospitals, seed=args.seed, alpha=args.alpha)
    except ValueError as exc:
        raise MediMeshError(f"sparse consortium: {exc}") from None
    out = Path(args.out)
    files = write_consortium(recipe, out)
    command = ["medimesh", "train", "--spec", str(files.spec)]
    for name, path in files.sites:
        command += ["--site", f"{name}={path}"]
    # Same seed and test fraction: `train` then splits every site as `bench accuracy` does.
    command += ["--seed", str(recipe.seed), "--test-fraction", str(recipe.test_fraction),
                "--rounds", "30", "--local-steps", str(dataset_recipe("sparse").train.epochs)]
    line = shlex.join(command)
    print(
        f"wrote {files.spec} and {len(files.sites)} site files to {out} "
        f"({sum(files.rows)} patients, rows per site {list(files.rows)}); train with:",
        file=sys.stderr,
    )
    if args.json:
        emit(json.dumps({
            "spec": str(files.spec),
            "sites": [{"name": n, "path": str(p), "rows": r}
                      for (n, p), r in zip(files.sites, files.rows, strict=True)],
            "config": recipe.to_params(),
            "train_command": line,
        }))
    else:
        emit(line)
    return 0


def cmd_data_phenopackets(args: argparse.Namespace) -> int:
    """Write the synthetic rare cohort as one directory of phenopackets per site; print `train`."""
    import shlex

    from medimesh.data.cohort import CohortConfig
    from medimesh.phenopackets import write_cohort

    try:
        config = CohortConfig(n_hospitals=args.hospitals, seed=args.seed)
    except ValueError as exc:
        raise MediMeshError(f"rare cohort: {exc}") from None
    codes, sites = write_cohort(Path(args.out), config)
    command = ["medimesh", "train", "--label-codes", str(codes)]
    for name, path, _ in sites:
        command += ["--site", f"{name}={path}"]
    line = shlex.join(command)
    print(f"wrote {sum(n for _, _, n in sites)} phenopackets in {len(sites)} site folders and "
          f"{codes} to {args.out}; train with:", file=sys.stderr)
    if args.json:
        emit(json.dumps({"label_codes": str(codes), "train_command": line,
                         "sites": [{"name": n, "path": str(p), "files": k}
                                   for n, p, k in sites]}))
    else:
        emit(line)
    return 0


def cmd_data_heart(args: argparse.Namespace) -> int:
    """Write the four heart centres as CSV sites plus spec.json; print the `train` command."""
    import shlex

    from medimesh.data.heart import HeartDataError, export_csv

    out = Path(args.out)
    try:
        spec, sites, rows = export_csv(out, Path(args.data_dir) if args.data_dir else None)
    except HeartDataError as exc:
        raise MediMeshError(str(exc)) from None
    command = ["medimesh", "train", "--spec", str(spec)]
    for name, path in sites:
        command += ["--site", f"{name}={path}"]
    line = shlex.join(command)
    print(f"wrote {spec} and {len(sites)} centre files to {out} (rows {list(rows)}); "
          "train with:", file=sys.stderr)
    if args.json:
        emit(json.dumps({"spec": str(spec), "train_command": line,
                         "sites": [{"name": n, "path": str(p), "rows": r}
                                   for (n, p), r in zip(sites, rows, strict=True)]}))
    else:
        emit(line)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a saved model on a table or a directory of phenopackets (external validation)."""
    from medimesh.metrics import scores
    from medimesh.modelfile import load_model
    from medimesh.spec import encode_csv, load_spec

    if (args.csv is None) == (args.phenopackets is None):
        raise MediMeshError("evaluate needs exactly one of --csv FILE or --phenopackets DIR")
    if (args.model is None) == (args.api is None) or (args.api and args.csv):
        raise MediMeshError("evaluate needs --model DIR (or, with --phenopackets, --api URL)")
    if args.phenopackets is not None:
        return _evaluate_phenopackets(args)
    saved = load_model(Path(args.model))
    if saved.spec is None:
        raise MediMeshError(f"{args.model}: the model has no feature spec to read a CSV with")
    spec = load_spec(saved.spec)
    site = encode_csv(Path(args.csv), spec, skip_bad_rows=args.skip_bad_rows)
    proba = saved.predict_proba(site.x)
    report = scores(proba, site.y)
    result = {
        "model_hash": saved.model_hash,
        "csv": str(args.csv),
        **report,
        "classes": list(saved.classes),
        "skipped_rows": len(site.skipped),
        "unknown_codes": sum(site.unknown_codes.values()),
    }
    if args.json:
        emit(json.dumps(result))
    else:
        print(
            f"n {report['n']}  top1 {report['top1']:.3f}  top3 {report['top3']:.3f}  "
            f"balanced accuracy {report['balanced_accuracy']:.3f}  "
            f"macro-F1 {report['macro_f1']:.3f}",
            file=sys.stderr,
        )
        recalls = report["per_class_recall"]
        assert isinstance(recalls, list)
        for name, r in zip(saved.classes, recalls, strict=True):
            print(f"  recall {name}: {'n/a' if r is None else f'{r:.3f}'}", file=sys.stderr)
    return 0


def _evaluate_phenopackets(args: argparse.Namespace) -> int:
    """Score a saved model on a directory of phenopackets; files skipped are counted."""
    from medimesh.data import cohort
    from medimesh.diagnosis import DiagnosisEngine
    from medimesh.hpo import HpoAncestors
    from medimesh.modelfile import load_model
    from medimesh.phenopackets import (
        PhenopacketError,
        encode_directory,
        load_label_codes,
        panel_label_codes,
        rare_panel_size,
        spec_encoder,
        spec_label_codes,
    )
    from medimesh.spec import load_spec

    if args.api is not None:
        return _evaluate_served(args)
    saved = load_model(Path(args.model))
    n_diseases = rare_panel_size(saved.classes)  # --diseases N: N + 1 classes
    feats = cohort.features(n_diseases or cohort.PANEL_SIZE)
    try:
        if saved.spec is not None:  # a CSV-spec model: the spec's own encoders
            spec = load_spec(saved.spec)
            codes = load_label_codes(_label_codes(args.label_codes),
                                     spec_label_codes(spec.classes))
            encoder, width = spec_encoder(spec, codes), len(spec.column_names())
        elif n_diseases is not None and saved.feature_names == tuple(f.name for f in feats):
            codes = load_label_codes(_label_codes(args.label_codes), panel_label_codes(n_diseases))
            encoder = DiagnosisEngine(saved, feats, HpoAncestors.load()).encode
            width = len(feats)
        else:
            raise MediMeshError(f"{args.model}: neither a rare-panel model nor one with a "
                                "feature spec; cannot read phenopackets for it")
        enc = encode_directory(Path(args.phenopackets), codes, encoder, width)
    except PhenopacketError as exc:
        raise MediMeshError(str(exc)) from None
    report = enc.report.to_dict()
    if len(enc.y) == 0:
        raise MediMeshError(f"{args.phenopackets}: no usable phenopackets ({report['files_read']} "
                            f"read, skipped {report['skipped']})")
    proba = saved.predict_proba(enc.x)
    return _phenopacket_scores(args, saved.model_hash, proba, enc.y, saved.classes, report)


def _evaluate_served(args: argparse.Namespace) -> int:
    """Score the oracle at ``--api`` on a directory: each file is read and converted here (for
    its label) and its request answered by ``POST /diagnose``; its probabilities are scored."""
    import numpy as np

    from medimesh.client import Client, ValidationFailed
    from medimesh.data import cohort
    from medimesh.diagnosis import ValidationError
    from medimesh.phenopackets import (
        PhenopacketError,
        encode_directory,
        load_label_codes,
        panel_label_codes,
        rare_panel_size,
    )

    hashes: set[str] = set()
    with Client.from_env(args.api) as client:
        # The served model's classes (a larger panel with --diseases N), else the default.
        classes = client.vocabulary().classes or cohort.class_names()
        n_diseases = rare_panel_size(classes)
        if n_diseases is None:
            raise MediMeshError(f"{args.api}: the served model is not a rare-panel model; "
                                "cannot read phenopackets for it")
        index = {c: i for i, c in enumerate(classes)}

        def answer(req: Any) -> tuple[Any, list[str], dict[str, Any]]:
            try:
                d = client.diagnose(
                    req.symptoms, {k: (m.value, m.unit) for k, m in req.biomarkers.items()},
                    req.genes, req.age, req.sex, req.excluded_symptoms, req.sequenced,
                )
            except ValidationFailed as exc:
                raise ValidationError(exc.field, str(exc)) from None
            hashes.add(d.model_hash)
            row = np.zeros(len(classes))
            for c in d.differential:
                if c.name not in index:
                    raise MediMeshError(f"{args.api}: the model answers class {c.name!r}, "
                                        "which its /vocabulary does not list")
                row[index[c.name]] = c.probability
            return row, list(d.unknown_terms), {}

        try:
            codes = load_label_codes(_label_codes(args.label_codes),
                                     panel_label_codes(n_diseases))
            enc = encode_directory(Path(args.phenopackets), codes, answer, len(classes))
        except PhenopacketError as exc:
            raise MediMeshError(str(exc)) from None
    report = enc.report.to_dict()
    if len(enc.y) == 0:
        raise MediMeshError(f"{args.phenopackets}: no usable phenopackets ({report['files_read']} "
                            f"read, skipped {report['skipped']})")
    return _phenopacket_scores(args, ",".join(sorted(hashes)), enc.x, enc.y, classes, report)


def _phenopacket_scores(
    args: argparse.Namespace, model_hash: str, proba: Any, y: Any, classes: Sequence[str],
    report: dict[str, Any],
) -> int:
    from medimesh.metrics import scores

    result = {
        "model_hash": model_hash,
        "phenopackets": str(args.phenopackets),
        **scores(proba, y),
        "classes": list(classes),
        "report": report,
    }
    if args.json:
        emit(json.dumps(result))
    else:
        print(f"n {result['n']}  top1 {result['top1']:.3f}  top3 {result['top3']:.3f}  "
              f"({report['used']}/{report['files_read']} phenopackets used, skipped "
              f"{report['skipped'] or 'none'}, {report['unknown_terms']} unknown term(s))",
              file=sys.stderr)
        for name in report["malformed_files"]:
            print(f"  unreadable: {name}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = _config(args) if args.bench not in ("audit", "oracle", "clean", "operator") else None
    progress = (
        None if args.json or cfg is None or args.bench in ("byzantine", "chaos", "privacy")
        else _progress(cfg.rounds)
    )
    t0 = time.perf_counter()
    if args.bench == "accuracy":
        from medimesh.bench.accuracy import run_accuracy

        result = run_accuracy(cfg, progress)
        result["server"] = _server_summary(cfg)
    elif args.bench == "byzantine":
        from medimesh.bench.byzantine import RULES, STATISTICAL, names_from, run_byzantine

        def say(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        result = run_byzantine(  # progress on stderr, JSON on stdout
            cfg, args.malicious, say, seeds=args.seeds,
            attacks=names_from(args.attacks, STATISTICAL, "attack"),
            rules=names_from(args.rules, RULES, "rule"),
        )
    elif args.bench == "clean":
        from medimesh.bench.byzantine import names_from
        from medimesh.bench.clean import SUITES, run_clean

        def line(text: str) -> None:
            print(text, file=sys.stderr, flush=True)

        suites = names_from(args.suites, SUITES, "suite")
        result = run_clean(suites, args.seeds, args.tolerate, line)
    elif args.bench == "oracle":
        from medimesh.bench.oracle import run_oracle_bench

        result = run_oracle_bench(args.requests, args.concurrency, args.duration, port=args.port)
    elif args.bench == "audit":
        from medimesh.bench.audit import run_audit_bench

        result = run_audit_bench(n_append=args.append, n_verify=args.verify)
    elif args.bench == "chaos":
        import dataclasses

        from medimesh.bench.chaos import run_chaos

        def tell(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        assert cfg is not None
        cfg = dataclasses.replace(cfg, round_timeout_s=args.round_timeout or 3.0)
        result = run_chaos(cfg, args.drop, args.kill_every, tell)
    elif args.bench == "privacy":
        from medimesh.bench.privacy import run_privacy

        def note(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        modes: Any = ("central", "local") if args.mode == "both" else (args.mode,)
        # Step sizes that worked per dataset (docs/privacy.md): heart's 30-parameter model
        # wants small clipped steps, the 11-class rare model larger ones.
        heart = args.dataset == "heart"
        clip = args.clip_norm if args.clip_norm is not None else (0.5 if heart else 1.0)
        lr = args.server_lr if args.server_lr is not None else (0.5 if heart else 8.0)
        # δ must stay below 1/N (privacy.check_delta): the rare cohort has ~1,250 patients.
        delta = args.delta if args.delta is not None else (1e-3 if heart else 1e-4)
        result = run_privacy(
            cfg, args.epsilon, delta, args.dp_rounds, clip, modes,
            args.repeats, args.secagg_hospitals, note, server_lr=lr,
        )
    elif args.bench == "codes":
        from medimesh.bench.codes import run_codes

        result = run_codes(cfg, progress)
    elif args.bench == "operator":
        from medimesh.bench.operator import run_operator

        def told(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        result = run_operator(args.attacks, told)
    else:
        from medimesh.bench.rounds import run_rounds

        result = run_rounds(cfg, progress, transport=args.transport, delay_s=args.delay,
                            jitter_s=args.jitter)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    emit(json.dumps(result, indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medimesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a federated model on a local Ray instance")
    _run_args(demo)
    _server_args(demo)
    demo.add_argument("--drop", type=_probability, default=0.0,
                      help="fault drill: fraction of envelopes the router drops")
    demo.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                      help="fault drill: delay every delivery by this long (a WAN hop)")
    demo.add_argument("--jitter", type=float, default=0.0, metavar="SECONDS",
                      help="with --delay: each hop's delay is uniform in delay ± jitter "
                           "(order per sender-recipient pair kept)")
    demo.add_argument("--partition", action="append", default=[], metavar="A,B,…",
                      help="fault drill: node names that can only talk among themselves "
                           "(repeat for several groups)")
    _ray_dashboard_args(demo, default_on=True)
    demo.add_argument("--no-serve", action="store_true",
                      help="exit after training instead of serving the oracle")
    demo.add_argument("--audit-file", default=None,
                      help="also keep the audit trail as a JSONL file (no database)")
    demo.add_argument("--database-url", default="embedded",
                      help="PostgreSQL for the audit trail: a URL, 'embedded' (default: an "
                           "embedded server in .medimesh/pg) or 'none' (in memory)")
    demo.add_argument("--port", type=int, default=8000, help="oracle HTTP port")
    _access_args(demo)
    demo.add_argument("--ui-host", default="127.0.0.1", help="dashboard host")
    demo.add_argument("--ui-port", type=int, default=7860, help="dashboard HTTP port")
    demo.add_argument("--sites", choices=["ray", "processes"], default="ray",
                      help="ray: every hospital an actor on this Ray (default); processes: "
                           "each its own OS process (`medimesh node hospital`) over AXL, with "
                           "its own key, data and state in .medimesh/processes/<id>/")
    demo.add_argument("--pace", type=float, default=None, metavar="SECONDS",
                      help="pause between rounds, so people can watch them arrive (default: "
                           f"{DEMO_PACE_S:g} s while serving the dashboard, 0 with --no-serve "
                           "or --json; --pace 0 trains at full speed)")
    demo.set_defaults(func=cmd_demo)
    ui_p = sub.add_parser("ui", help="serve the Gradio dashboard for a running oracle")
    ui_p.add_argument("--api", required=True, metavar="URL",
                      help="the oracle's base URL (its token, if any: $MEDIMESH_API_TOKEN)")
    ui_p.add_argument("--host", default="127.0.0.1")
    ui_p.add_argument("--port", type=int, default=7860)
    ui_p.add_argument("-v", "--verbose", action="store_true")
    ui_p.set_defaults(func=cmd_ui)
    serve_p = sub.add_parser("serve", help="serve the oracle (Ray Serve) on an existing store")
    serve_p.add_argument("--database-url", default="embedded")
    serve_p.add_argument("--port", type=int, default=8000)
    _access_args(serve_p)
    serve_p.add_argument("--run", default=None, metavar="RUN_ID",
                         help="serve this run's model (default: the newest run with a model; "
                              "GET /runs lists them)")
    serve_p.add_argument("--label-codes", default=None, metavar="FILE",
                         help="assay → biomarker mapping for phenopacket queries (the file the "
                              "phenopacket sites trained with; docs/phenopackets.md)")
    serve_p.add_argument("--roster", default=None, metavar="FILE",
                         help="roster.json (`medimesh roster`): serve only models whose "
                              "model_published audit entry its coordinator signed (default: "
                              "the nodes enrolled in the database, which its owner can edit)")
    serve_p.add_argument("-v", "--verbose", action="store_true")
    serve_p.set_defaults(func=cmd_serve)
    train = sub.add_parser("train", help="federated training on CSV sites, saves the model")
    _run_args(train)
    _server_args(train)
    train.add_argument("--out", default=None, help="model directory (default .medimesh/models/…)")
    _ray_dashboard_args(train, default_on=False)
    train.set_defaults(func=cmd_train)
    ev = sub.add_parser("evaluate",
                        help="score a saved model on a CSV table or a directory of phenopackets")
    ev.add_argument("--model", default=None, help="directory written by train")
    ev.add_argument("--api", default=None, metavar="URL",
                    help="with --phenopackets: score the model a running oracle serves instead")
    ev.add_argument("--csv", default=None, metavar="FILE")
    ev.add_argument("--phenopackets", default=None, metavar="DIR",
                    help="a directory of GA4GH phenopackets (rare-panel models)")
    ev.add_argument("--label-codes", default=None, metavar="FILE",
                    help="with --phenopackets: disease-id → class mapping (docs/phenopackets.md)")
    ev.add_argument("--skip-bad-rows", action="store_true")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("-v", "--verbose", action="store_true")
    ev.set_defaults(func=cmd_evaluate)
    data = sub.add_parser("data", help="write a synthetic dataset to disk (CSV sites + spec)")
    dsub = data.add_subparsers(dest="data", required=True)
    dsp = dsub.add_parser("sparse", help="the sparse HPO consortium (docs/cohort.md)")
    dsp.add_argument("--out", required=True, metavar="DIR", help="folder for spec.json + CSVs")
    dsp.add_argument("--hospitals", type=_positive_int, default=6)
    dsp.add_argument("--seed", type=int, default=0)
    dsp.add_argument("--alpha", type=_positive_float, default=0.3,
                     help="Dirichlet concentration splitting each disease over the sites")
    dsp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    dsp.add_argument("-v", "--verbose", action="store_true")
    dsp.set_defaults(func=cmd_data)
    dpp = dsub.add_parser("phenopackets",
                          help="the rare cohort as GA4GH phenopackets (docs/phenopackets.md)")
    dpp.add_argument("--out", required=True, metavar="DIR",
                     help="folder for one phenopacket folder per site + codes.json")
    dpp.add_argument("--hospitals", type=_positive_int, default=4)
    dpp.add_argument("--seed", type=int, default=0)
    dpp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    dpp.add_argument("-v", "--verbose", action="store_true")
    dpp.set_defaults(func=cmd_data_phenopackets)
    dhe = dsub.add_parser("heart", help="the four UCI heart centres as CSV sites (docs/heart.md)")
    dhe.add_argument("--out", required=True, metavar="DIR", help="folder for spec.json + CSVs")
    dhe.add_argument("--data-dir", default=None, help="heart data folder (default ../shared/…)")
    dhe.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    dhe.add_argument("-v", "--verbose", action="store_true")
    dhe.set_defaults(func=cmd_data_heart)
    from medimesh.audit_cli import add_audit_commands

    add_audit_commands(sub)
    from medimesh.keys_cli import add_keys_commands

    add_keys_commands(sub)
    from medimesh.node.cli import add_node_commands

    add_node_commands(sub)
    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bsub = bench.add_subparsers(dest="bench", required=True)
    acc = bsub.add_parser("accuracy", help="federated vs pooled vs isolated")
    _run_args(acc)
    _server_args(acc)
    acc.set_defaults(func=cmd_bench)
    clean = bsub.add_parser(
        "clean", help="honest consortia over many seeds: nobody excluded, federated vs pooled"
    )
    clean.add_argument("--seeds", type=_positive_int, default=10, metavar="K")
    clean.add_argument("--suites", default=None, metavar="S,…",
                       help="heart, heart-csv, rare-8, rare-10, sparse (default: all)")
    clean.add_argument("--tolerate", type=int, default=0, metavar="F",
                       help="declared dishonest hospitals (default 0, as users get)")
    clean.add_argument("--json", action="store_true")
    clean.add_argument("-v", "--verbose", action="store_true")
    clean.set_defaults(func=cmd_bench)
    byz = bsub.add_parser("byzantine", help="attacks against the default defence (or every rule)")
    _run_args(byz, hospitals=10, rounds=20)
    byz.add_argument("--malicious", type=int, default=3,
                     help="dishonest hospitals (the last ones) = the declared tolerance f")
    byz.add_argument("--seeds", type=_positive_int, default=1, metavar="K",
                     help="runs per attack, with seeds 0..K-1 (mean and min reported)")
    byz.add_argument("--attacks", default=None, metavar="A,B,…",
                     help="statistical attacks to run (default: all)")
    byz.add_argument("--rules", default="default", metavar="R,…|all",
                     help="'default' (validator + default rule; the default), named rules, or "
                          "'all' for the full rule matrix (slow)")
    byz.set_defaults(func=cmd_bench)
    oracle = bsub.add_parser("oracle", help="/diagnose latency, throughput and hot swap")
    oracle.add_argument("--requests", type=_positive_int, default=300)
    oracle.add_argument("--concurrency", type=_positive_int, default=16)
    oracle.add_argument("--duration", type=float, default=10.0)
    oracle.add_argument("--port", type=int, default=8123)
    oracle.add_argument("--json", action="store_true")
    oracle.add_argument("-v", "--verbose", action="store_true")
    oracle.set_defaults(func=cmd_bench)
    audit = bsub.add_parser("audit", help="audit appends/s and verification speed on PostgreSQL")
    audit.add_argument("--append", type=_positive_int, default=20_000)
    audit.add_argument("--verify", type=_positive_int, default=100_000)
    audit.add_argument("--json", action="store_true")
    audit.add_argument("-v", "--verbose", action="store_true")
    audit.set_defaults(func=cmd_bench)
    chaos = bsub.add_parser("chaos", help="message drops + hospital crashes vs a clean run")
    _run_args(chaos, hospitals=8, rounds=30)
    chaos.add_argument("--drop", type=_probability, default=0.05,
                       help="fraction of envelopes the router drops (after setup)")
    chaos.add_argument("--kill-every", type=_positive_int, default=5, metavar="ROUNDS",
                       help="kill one hospital actor every this many rounds (Ray restarts it)")
    chaos.set_defaults(func=cmd_bench)
    codes = bsub.add_parser("codes", help="train + evaluate on CSV sites with ~400 HPO codes")
    _run_args(codes, rounds=20)
    codes.set_defaults(func=cmd_bench)
    priv = bsub.add_parser("privacy", help="accuracy against epsilon; secure-aggregation cost")
    _run_args(priv, rounds=20)
    priv.set_defaults(dataset="heart")
    priv.add_argument("--epsilon", type=_positive_float, nargs="+",
                      default=[0.1, 0.3, 1.0, 3.0, 10.0], help="privacy budgets to sweep")
    priv.add_argument("--delta", type=_positive_float, default=None,
                      help="δ, below 1/N (default: heart 1e-3, else 1e-4)")
    priv.add_argument("--dp-rounds", type=_positive_int, default=10,
                      help="DP rounds the noise is calibrated for (--rounds: the no-DP reference)")
    priv.add_argument("--clip-norm", type=_positive_float, default=None,
                      help="per-patient gradient clip norm C (default: heart 0.5, else 1.0)")
    priv.add_argument("--server-lr", type=_positive_float, default=None,
                      help="server step on the noisy mean gradient (default: heart 0.5, else 8)")
    priv.add_argument("--mode", choices=["central", "local", "both"], default="both")
    priv.add_argument("--repeats", type=_positive_int, default=3,
                      help="runs per budget (the DP noise differs each run)")
    priv.add_argument("--secagg-hospitals", type=_positive_int, default=10)
    priv.set_defaults(func=cmd_bench)
    op = bsub.add_parser("operator", help="every operator attack against the real system")
    op.add_argument("--attacks", nargs="+", default=None, metavar="NAME",
                    help="run only these attacks (default: all)")
    op.add_argument("--json", action="store_true")
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(func=cmd_bench)
    rounds = bsub.add_parser("rounds", help="startup and per-round wall time")
    _run_args(rounds, hospitals=10, rounds=30)
    _ray_dashboard_args(rounds, default_on=False)  # what the dashboard adds to startup
    rounds.add_argument("--transport", choices=["ray", "axl"], default="ray",
                        help="axl: also run the hospitals over the AXL front's HTTP API and "
                             "report both paths (medimesh.bench.rounds)")
    rounds.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                        help="router delay on every delivery, pushed or into a mailbox "
                             "(a WAN hop)")
    rounds.add_argument("--jitter", type=float, default=0.0, metavar="SECONDS",
                        help="with --delay: each hop's delay is uniform in delay ± jitter")
    rounds.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.verbose)
    _guard_stdout()
    try:
        return int(args.func(args))
    except MediMeshError as exc:
        print(f"medimesh: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A file named on the command line that is missing or unreadable (a spec, a CSV):
        # the loaders let OSError through, and the user fixes it. Not one that names no file
        # (a socket, a broken pipe): that keeps its traceback.
        if exc.filename is None:
            raise
        names = ", ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        print(f"medimesh: error: {names}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medimesh: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: subcommand modules import
    # medimesh.cli and must share its stdout guard (else `python -m` sends their output astray).
    from medimesh.cli import main as _main

    raise SystemExit(_main())
