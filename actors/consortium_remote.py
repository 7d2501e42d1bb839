"""A consortium's AXL side: the front that serves the AXL API over the router, and the
hospitals that run as their own processes elsewhere (``medimesh node hospital``).

Ray wiring only: what the signed roster must enrol and who was silent at setup are decided in
:mod:`medimesh.consortium_plan`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from medimesh.consortium_plan import remote_members, remote_setup, silent_at_setup
from medimesh.identity import Roster
from medimesh.run_config import RunConfig

if TYPE_CHECKING:
    from medimesh.actors.runtime import Consortium

__all__ = ["load_remote_roster", "remote_info", "start_front"]


def load_remote_roster(cfg: RunConfig) -> tuple[Roster, dict[str, str]]:
    """The signed roster (every member signed it) and its hospitals' peer ids by name; it
    must enrol exactly the run's remote hospitals."""
    from medimesh.node.hospital import load_verified_roster

    assert cfg.roster_file is not None
    roster = load_verified_roster(Path(cfg.roster_file))
    return roster, remote_members(roster, cfg.remote_hospitals)


def start_front(cons: Consortium, router: Any, peers: list[str]) -> None:
    """Serve the AXL API for ``peers`` (each gets a mailbox at the router), TLS on the
    router's key; tell ``cons.on_front`` its URL and pin."""
    from medimesh.node.front import parse_listen
    from medimesh.node.front import start_front as serve

    host, port = parse_listen(cons.cfg.axl_listen)
    cons.front = serve(router, peers, host=host, port=port,
                       tls_seed=cons.identities["router"].seed, roster=cons.roster)
    if cons.on_front is not None:
        cons.on_front(cons.front)


def remote_info(cons: Consortium, wait_s: float = 10.0) -> list[dict[str, Any]]:
    """Counts the remote hospitals reported at setup (from the coordinator's signed
    checkpoint); a hospital that did not answer is an error naming it (after shutdown)."""
    auditor = cons.handles["auditor"]
    deadline = time.monotonic() + wait_s
    cp = ray.get(auditor.latest_checkpoint.remote())
    while cp is None and time.monotonic() < deadline:  # the checkpoint is fire-and-forget
        time.sleep(0.1)
        cp = ray.get(auditor.latest_checkpoint.remote())
    state = cp["state"] if cp is not None else {}
    refused = set(cons.setup_summary.get("refused", {}))
    info, silent = remote_setup(state, refused, cons.remote_peers)
    if silent:
        url = cons.front.url if cons.front is not None else "?"
        cons.shutdown()
        raise silent_at_setup(silent, cons.cfg.setup_timeout_s, url)
    return info
