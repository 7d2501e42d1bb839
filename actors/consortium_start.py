"""Starting a :class:`~medimesh.actors.runtime.Consortium`: enrol every node, create and wire
the named actors (services, adversaries, hospitals), then run the setup round.

Ray wiring only; every choice it carries out (validator bounds, the coordinator's config, who
the router pushes to, the drill's adversaries) comes from :mod:`medimesh.consortium_plan`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from medimesh.actors.adversary_hospital import AttackingHospital
from medimesh.actors.auditor import Auditor
from medimesh.actors.colluders import Colluders
from medimesh.actors.consortium_remote import load_remote_roster, remote_info, start_front
from medimesh.actors.coordinator import Coordinator
from medimesh.actors.hospital import Hospital
from medimesh.actors.ray_env import (
    NAMESPACE,
    check_placement,
    ensure_ray,
    error_cause,
    hospital_resource,
    named_actor,
)
from medimesh.actors.router import Router
from medimesh.actors.validator import Validator
from medimesh.consortium_plan import (
    SERVICES,
    AdversaryPlan,
    adversary_plan,
    coordinator_config,
    pushed_nodes,
    role_actor_name,
    run_info,
    validator_bounds,
)
from medimesh.errors import ConfigError, QuorumNotReached
from medimesh.identity import Identity, Member
from medimesh.policy import PolicyConfig
from medimesh.privacy import check_delta

if TYPE_CHECKING:
    from medimesh.actors.runtime import Consortium

__all__ = ["enrol", "start_consortium", "write_signed_roster"]


def start_consortium(cons: Consortium) -> dict[str, float]:
    """Create and wire all of ``cons``'s actors, then run the setup round. Returns timings (s)."""
    cfg = cons.cfg
    t0 = time.perf_counter()
    ensure_ray(
        address=cfg.ray_address, dashboard=cfg.ray_dashboard,
        dashboard_port=cfg.ray_dashboard_port, metrics_port=cfg.ray_metrics_port,
    )
    t_ray = time.perf_counter()
    for name in SERVICES:
        enrol(cons, name, name)
    for d in cons.descriptors:
        enrol(cons, d.name, "hospital")
    roster_json = cons.roster.to_json()
    if cfg.placement == "pinned":
        check_placement([d.name for d in cons.descriptors])
    services = _start_services(cons, roster_json)
    plan = adversary_plan([d.name for d in cons.descriptors], cfg.behaviours)
    cons.colluders = (
        named_actor(Colluders, cons.actor_name("adversary:colluders")).remote(
            plan.n_colluding,
            victim=next((d for d in cons.descriptors if d.name == plan.victim), None),
        )
        if plan.colluding
        else None
    )
    if cons.over_axl:  # the front first: its mailboxes must exist before setup
        start_front(cons, services["router"],
                    [cons.identities[d.name].peer_id for d in cons.descriptors])
    hospitals = _start_hospitals(cons, roster_json, plan)
    cons.handles = {**services, **hospitals}
    router = services["router"]
    remote = bool(cons.remote_peers)
    ray.get([router.register.remote(cons.identities[n].peer_id, cons.handles[n])
             for n in pushed_nodes(cons.handles, cons.over_axl, remote)])
    if remote:
        start_front(cons, router, list(cons.remote_peers.values()))
    cons.hospital_info = []
    for name, h in hospitals.items():
        try:
            cons.hospital_info.append(ray.get(h.info.remote()))
        except ray.exceptions.RayActorError as exc:
            cons.shutdown()
            cause = error_cause(exc)
            raise ConfigError(f"hospital {name} could not load its data: {cause}") from None
    t_actors = time.perf_counter()
    _setup_round(cons)
    t_setup = time.perf_counter()
    cons.timings = {
        "ray_init_s": t_ray - t0,
        "actors_s": t_actors - t_ray,
        "setup_round_s": t_setup - t_actors,
        "startup_s": t_setup - t0,
    }
    return cons.timings


def enrol(cons: Consortium, name: str, role: Any) -> Identity:
    """Give node ``name`` its identity and roster entry: the operator's key files (with
    ``keys_dir``; remote hospitals: the signed roster) or a fresh key pair."""
    cfg = cons.cfg
    if cfg.keys_dir is not None:  # persistent identities: the operator's key files
        from medimesh.keys import consortium_roster, enrolled_identity

        keys_dir = Path(cfg.keys_dir)
        if not len(cons.roster) and cfg.remote_hospitals:
            cons.roster, cons.remote_peers = load_remote_roster(cfg)
        elif not len(cons.roster):
            cons.roster = consortium_roster(keys_dir, [d.name for d in cons.descriptors])
        cons.identities[name] = enrolled_identity(keys_dir, cons.roster, name, role)
        return cons.identities[name]
    ident = Identity.generate()
    cons.identities[name] = ident
    cons.roster.add(Member(name, role, ident.peer_id))
    return ident


def _start_services(cons: Consortium, roster_json: str) -> dict[str, Any]:
    """The auditor, router, validator and coordinator actors (pinned to this node with
    ``--placement pinned``), by role."""
    cfg, seed = cons.cfg, cons.identities
    pin = cfg.placement == "pinned"
    directory = {  # who the router (re)finds by actor name, e.g. after a restart
        cons.identities[n].peer_id: cons.actor_name(role_actor_name(n))
        for n in pushed_nodes(cons.identities, cons.over_axl, bool(cons.remote_peers))
    }
    earlier = write_signed_roster(cons)
    auditor = named_actor(Auditor, cons.actor_name("auditor"), here=pin).remote(
        seed["auditor"].seed, roster_json, cfg.audit_path, cfg.database_url,
        run_id=cons.run_id, run_info=run_info(cfg),
        router=cons.actor_ref("router") if cfg.witness_dir else None,
        signer_rosters=earlier,
    )
    router = named_actor(Router, cons.actor_name("router"), cfg.restarts, here=pin).remote(
        seed["router"].seed, roster_json, cons.actor_ref("auditor"), cfg.seed,
        cfg.capture_envelopes, directory, NAMESPACE,
    )
    validator = named_actor(
        Validator, cons.actor_name("validator"), cfg.restarts, here=pin
    ).remote(
        seed["validator"].seed,
        roster_json,
        cons.actor_ref("router"),
        cons.actor_ref("auditor"),
        *validator_bounds(cfg, cons.privacy),
        cfg.assumed_byzantine,
    )
    coord_cfg = coordinator_config(cfg, cons.info, cons.privacy, cons.run_id)
    cons.coordinator_args = (seed["coordinator"].seed, roster_json, router, auditor, coord_cfg)
    coordinator = named_actor(Coordinator, cons.actor_name("coordinator"), here=pin).remote(
        *cons.coordinator_args
    )
    return {"auditor": auditor, "router": router, "validator": validator,
            "coordinator": coordinator}


def _start_hospitals(cons: Consortium, roster_json: str, plan: AdversaryPlan) -> dict[str, Any]:
    """One hospital actor per local site: honest, attacking (drills) or the class
    ``hospital_classes`` names; polling the AXL front with ``hospital_transport="axl"``."""
    cfg = cons.cfg
    axl: dict[str, Any] = {}
    honest: type = Hospital
    if cons.over_axl:
        from medimesh.actors.axl_hospital import AxlHospital

        honest = AxlHospital
        axl = {"axl_url": cons.front.url, "axl_pin": cons.front.pin}
    return {
        d.name: named_actor(
            cons.hospital_classes.get(d.name, AttackingHospital if d.name in plan.behaviour
                                      else honest),
            cons.actor_name(f"hospital:{d.name}"),
            cfg.restarts,
            {hospital_resource(d.name): 1} if cfg.placement == "pinned" else None,
        ).remote(
            cons.identities[d.name].seed,
            roster_json,
            cons.actor_ref("router"),
            cons.actor_ref("auditor"),
            d,
            plan.hospital(d.name),
            cons.actor_ref("adversary:colluders") if d.name in plan.colluding else None,
            cfg.n_byzantine,
            cross_baselines=cfg.cross_baselines_active,
            secure_aggregation=cfg.secure_aggregation is not None,
            witness_dir=cons.witness_path(d.name),
            policy=PolicyConfig.from_run(cons.privacy),
            state_dir=(
                None if cfg.state_dir is None else str(Path(cfg.state_dir).resolve() / d.name)
            ),
            **axl,
        )
        for d in cons.descriptors
    }


def _setup_round(cons: Consortium) -> None:
    """Run the setup round; remote hospitals' counts come from the coordinator's checkpoint,
    and a silent one (or, under DP, too few patients for δ) stops the run."""
    try:
        cons.setup_summary = ray.get(cons.handles["coordinator"].setup.remote())
    except ray.exceptions.RayTaskError as exc:
        if not (cons.remote_peers and isinstance(exc.cause, QuorumNotReached)):
            raise
        cons.setup_summary = {}  # nobody answered: name them all
        remote_info(cons, wait_s=0)
    if cons.remote_peers:
        cons.hospital_info = remote_info(cons)
    if cons.privacy is not None:  # δ must be below 1/N for the N patients it protects
        try:
            check_delta(cons.privacy.delta, int(cons.setup_summary["n_train"]))
        except ConfigError:
            cons.shutdown()
            raise


def write_signed_roster(cons: Consortium) -> list[str]:
    """Write this run's roster signed by every member (the runtime holds every key here;
    remote hospitals: the roster they all signed) to ``roster_dir``; return the other signed
    rosters there that verify (earlier runs)."""
    path = cons.signed_roster_path
    if path is None:
        return []
    from medimesh.signed_roster import UnverifiedRoster, sign_all, verify_signed_roster

    path.parent.mkdir(parents=True, exist_ok=True)
    earlier = []
    for other in sorted(path.parent.glob("*.json")):
        text = other.read_text()
        try:
            verify_signed_roster(text)
        except (UnverifiedRoster, ConfigError):
            continue  # not a signed roster: its members are not trusted signers
        earlier.append(text)
    if cons.cfg.roster_file is not None and cons.remote_peers:  # already signed by all
        path.write_text(Path(cons.cfg.roster_file).read_text())
    else:
        path.write_text(sign_all(cons.roster, cons.identities.values()) + "\n")
    return earlier
