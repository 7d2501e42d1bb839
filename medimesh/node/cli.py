"""``medimesh node hospital`` and ``medimesh node consortium`` (deploy/README.md walks both).

Registered on the ``medimesh`` parser by ``medimesh.cli``; results go to the real stdout via
``medimesh.cli.emit`` (one JSON line per round and a summary with ``--json``), progress and
logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_node_commands", "cmd_node_consortium", "cmd_node_hospital"]


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _info_logs(verbose: bool) -> None:
    """A node is a service: its progress (INFO) is shown, not only warnings."""
    import structlog

    level = logging.DEBUG if verbose else logging.INFO
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))


def add_node_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    node = sub.add_parser("node", help="run one node of a cross-institution federation over AXL")
    nsub = node.add_subparsers(dest="node_command", required=True)

    h = nsub.add_parser("hospital", help="this site as its own process (no Ray), over AXL")
    h.add_argument("--key", type=Path, required=True, help="this site's NAME.key (`keys new`)")
    h.add_argument("--roster", type=Path, required=True,
                   help="this site's copy of the roster, signed by every member")
    h.add_argument("--spec", type=Path, required=True, help="the consortium's feature spec")
    h.add_argument("--site", type=Path, required=True, help="this site's CSV (read only here)")
    h.add_argument("--policy", type=Path, default=None,
                   help="this site's policy.toml (docs/privacy.md §6)")
    h.add_argument("--state", type=Path, default=Path(".medimesh") / "node",
                   help="this site's state directory, kept across restarts (default "
                        "%(default)s)")
    h.add_argument("--axl", required=True, metavar="URL", help="the AXL node API to speak to")
    h.add_argument("--axl-pin", default=None, metavar="PEER_ID",
                   help="router peer id the AXL front must prove (default: the roster's)")
    h.add_argument("--seed", type=int, default=0, help="seed of this site's train/test split")
    h.add_argument("--test-fraction", type=float, default=0.3)
    h.add_argument("-v", "--verbose", action="store_true")
    h.set_defaults(func=cmd_node_hospital)

    c = nsub.add_parser("consortium", help="coordinator, validator, auditor on this Ray; the "
                                           "roster's hospitals are remote (AXL)")
    c.add_argument("--keys", type=Path, required=True, metavar="DIR",
                   help="the operator's key files: router, auditor, validator, coordinator")
    c.add_argument("--roster", type=Path, required=True, help="the roster every member signed")
    c.add_argument("--spec", type=Path, required=True, help="the consortium's feature spec")
    c.add_argument("--axl-listen", default="127.0.0.1:9002", metavar="HOST:PORT",
                   help="where the AXL front for the hospitals listens (default %(default)s)")
    c.add_argument("--rounds", type=int, default=20)
    c.add_argument("--min-updates", type=int, default=None,
                   help="quorum per round (default: half the hospitals, rounded up)")
    c.add_argument("--round-timeout", type=_positive, default=30.0, metavar="SECONDS")
    c.add_argument("--setup-timeout", type=_positive, default=120.0, metavar="SECONDS",
                   help="how long setup waits for every hospital (default %(default)s)")
    c.add_argument("--database-url", default="embedded",
                   help="PostgreSQL for the audit trail: a URL, 'embedded' (default: "
                        ".medimesh/pg) or 'none' (in memory)")
    c.add_argument("--serve", action="store_true",
                   help="also serve the oracle and the dashboard, and keep serving after "
                        "training (needs a database)")
    c.add_argument("--port", type=int, default=8000, help="oracle HTTP port (--serve)")
    c.add_argument("--ui-host", default="127.0.0.1")
    c.add_argument("--ui-port", type=int, default=7860)
    from medimesh.cli import _access_args

    _access_args(c)
    c.add_argument("--json", action="store_true", help="one JSON line per round on stdout")
    c.add_argument("-v", "--verbose", action="store_true")
    c.set_defaults(func=cmd_node_consortium)


def cmd_node_hospital(args: argparse.Namespace) -> int:
    from medimesh.node.hospital import HospitalNodeConfig, forbid_ray, run_hospital_node

    forbid_ray()
    _info_logs(args.verbose)
    cfg = HospitalNodeConfig(
        key=args.key, roster=args.roster, spec=args.spec, site=args.site, axl=args.axl,
        state=args.state, axl_pin=args.axl_pin, policy=args.policy, seed=args.seed,
        test_fraction=args.test_fraction,
    )
    return run_hospital_node(cfg)


def _round_line(m: dict[str, Any]) -> dict[str, Any]:
    def num(x: Any) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    return {"round": m["round"], "accepted": m["accepted"], "rejected": m["rejected"],
            "top1": num(m.get("top1")), "duration_ms": round(m["duration_s"] * 1000, 1),
            "model_hash": m["model_hash"]}


def cmd_node_consortium(args: argparse.Namespace) -> int:
    """Start coordinator, validator and auditor with the AXL front, wait for every hospital at
    setup, train ``--rounds``; print the AXL URL and pin, then one line per round."""
    from medimesh.actors.runtime import Consortium
    from medimesh.cli import (
        _database_url,
        _progress,
        _start_services,
        _wait_for_ctrl_c,
        emit,
        shut_down,
    )
    from medimesh.errors import ConfigError
    from medimesh.node.consortium import remote_config
    from medimesh.recipes import recipe

    _info_logs(args.verbose)
    database_url = _database_url(args.database_url)
    if args.serve and database_url is None:
        raise ConfigError("--serve needs a database (--database-url)")
    state = Path(".medimesh").resolve()
    cfg = remote_config(
        keys=args.keys, roster=args.roster, spec=args.spec, axl_listen=args.axl_listen,
        rounds=args.rounds, min_updates=args.min_updates, round_timeout_s=args.round_timeout,
        setup_timeout_s=args.setup_timeout, database_url=database_url,
        train=recipe("csv").train,
        roster_dir=str(state / "rosters") if database_url else None,
        witness_dir=str(state / "witness") if database_url else None,
    )
    names = cfg.remote_hospitals
    fed = Consortium(cfg)

    def announce(front: Any) -> None:
        doc = {"axl": front.url, "axl_pin": front.pin, "hospitals": list(names),
               "run_id": fed.run_id}
        if args.json:
            emit(json.dumps(doc))
        print(f"AXL front for {len(names)} hospitals: {front.url}  (pin {front.pin})\n"
              f"each site: medimesh node hospital … --axl {front.url}; waiting up to "
              f"{args.setup_timeout:g} s for setup", file=sys.stderr, flush=True)

    fed.on_front = announce
    stops: list[Any] = []
    try:
        timings = fed.start()
        print(f"run {fed.run_id}: setup done in {timings['setup_round_s']:.1f} s, "
              f"{fed.setup_summary['n_train']} training patients across "
              f"{fed.setup_summary['hospitals']} remote hospitals", file=sys.stderr, flush=True)
        if args.serve:
            assert database_url is not None
            _start_services(database_url, args, fed.router_name(), stops, "", fed.run_id,
                            cfg.roster_dir)
        show = _progress(cfg.rounds)

        def on_round(m: dict[str, Any]) -> None:
            show(m)
            if args.json:
                emit(json.dumps(_round_line(m)))

        history = fed.run(on_round)
        audit = fed.verify_audit()
        fed.flush_store()
        summary = {"run_id": fed.run_id, "rounds": len(history),
                   "accepted_per_round": [m["accepted"] for m in history],
                   "sites": fed.hospital_info, "audit": {"entries": audit["entries"],
                                                         "ok": audit["ok"]}}
        if args.json:
            emit(json.dumps(summary))
        print(f"run {fed.run_id}: {len(history)} rounds; audit trail {audit['entries']} "
              f"entries, {'verifies' if audit['ok'] else 'BROKEN'}", file=sys.stderr,
              flush=True)
        if args.serve:
            print("training done; still serving. Ctrl-C to stop", file=sys.stderr, flush=True)
            _wait_for_ctrl_c()
    finally:
        shut_down(stops, fed)
    return 0 if audit["ok"] else 1
