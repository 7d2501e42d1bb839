"""``medimesh node hospital``: one hospital as its own OS process, speaking only through AXL.

The process holds its own key, its verified roster copy, the consortium's spec and its own CSV;
it never starts or joins a Ray cluster. It polls its AXL node's ``/recv``, hands each envelope
to the hospital, sends what the hospital sends through ``/send`` and its signed audit events to
the auditor (:class:`~medimesh.node.outbox.AuditOutbox`).

What survives ``kill -9`` lives in ``--state DIR``:

* ``policy_state.json``: the hospital policy's state (local-DP spend, last round; medimesh.policy);
* ``witness/heads.jsonl``: the audit writer's signed chain heads it witnessed (medimesh.witness);
* ``setup_result.env``: the coordinator's last SetupResult, as the sealed envelope it arrived in
  (only this key opens it; its contents are consortium-wide statistics). The coordinator sends
  the SetupResult once, and again only to a hospital that missed a whole round (its ``_resync``):
  a process restarted between two rounds would otherwise get a RoundStart it cannot train for.
  Replaying the stored envelope at start makes it ready before its first round.

Messages that arrived while the process was down wait in its mailbox at the front. The node
drains what is queued before handing it over and skips every RoundStart that a newer one in the
same drain supersedes (audited as ``round_skipped``): training for rounds already closed would
only send stale updates, and the coordinator would count them as this site's answer.

SIGTERM or SIGINT: stop polling, flush the audit outbox, exit 0.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from medimesh.axl import AxlTransport, roster_pin
from medimesh.errors import ConfigError, EnvelopeError, MediMeshError
from medimesh.identity import Identity, Roster
from medimesh.node.outbox import AuditOutbox
from medimesh.roles import Effect, Record, Send, SendRaw
from medimesh.sites import SiteDescriptor
from medimesh.transport import Transport
from medimesh.wire import Header, inspect

__all__ = ["HospitalAdapter", "HospitalNodeConfig", "NodeState", "forbid_ray",
           "load_verified_roster", "run_hospital_node", "superseded"]

log = structlog.get_logger("medimesh.node")

SETUP_FILE = "setup_result.env"
IDLE_S = 0.05
DRAIN = 100  # AXL's queue size: at most this many envelopes per drain
FLUSH_AT_EXIT_S = 10.0


def forbid_ray() -> None:
    """This process must never start a Ray of its own by accident: a Ray API touched outside an
    actor (e.g. ``ray.get_runtime_context()``) would otherwise ``ray.init()`` a local cluster."""
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    import ray._private.auto_init_hook as hook

    hook.enable_auto_connect = False
    # Nothing the node runs calls Ray (the role is sans-IO); if a library ever did, it must not
    # start a cluster, nor print Ray's deprecation notices to a site's IT team.
    warnings.filterwarnings("ignore", module="ray.runtime_context")


def load_verified_roster(path: Path) -> Roster:
    """This site's own roster copy, only if every member signed it (medimesh.signed_roster)."""
    from medimesh.signed_roster import verify_signed_roster

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read roster {path}: {exc.strerror}") from None
    try:
        return verify_signed_roster(text)
    except ConfigError as exc:
        raise ConfigError(
            f"{path}: {exc} (a node joins only with a roster copy every member signed)"
        ) from None


def superseded(headers: Sequence[Header | None]) -> dict[int, int]:
    """Index of each RoundStart in one drain that a later-round RoundStart in the same drain
    supersedes -> that newer round (what the node skips). Pure."""
    from medimesh.protocol import RoundStart

    starts = [(i, h.round) for i, h in enumerate(headers)
              if h is not None and h.type == RoundStart.TYPE]
    newest = max((r for _, r in starts), default=0)
    return {i: newest for i, r in starts if r < newest}


class NodeState:
    """The node's own directory (``--state``): what a restart with the same key needs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    @property
    def witness_dir(self) -> Path:
        return self.path / "witness"

    def setup_envelope(self) -> bytes | None:
        f = self.path / SETUP_FILE
        return f.read_bytes() if f.is_file() else None

    def save_setup_envelope(self, envelope: bytes) -> None:
        tmp = self.path / (SETUP_FILE + ".tmp")
        tmp.write_bytes(envelope)
        os.replace(tmp, self.path / SETUP_FILE)


class HospitalAdapter:
    """The node's shell over the sans-IO :class:`~medimesh.roles.hospital.HospitalRole` (the
    same role the Ray ``Hospital`` actor drives): envelopes in, its Send / SendRaw effects to
    the node's AXL transport, its Record effects signed into the audit outbox."""

    def __init__(
        self, identity: Identity, roster: Roster, descriptor: SiteDescriptor,
        transport: Transport, outbox: AuditOutbox, *, state: NodeState,
        policy_toml: str | None = None,
    ) -> None:
        from medimesh.audit import AuditRecorder
        from medimesh.policy import PolicyConfig
        from medimesh.roles.hospital import HospitalRole
        from medimesh.sites import dataset_info, load_site
        from medimesh.witness_log import WitnessLog

        policy = PolicyConfig()
        if policy_toml is not None:
            policy = policy.with_toml(policy_toml)
        data = load_site(descriptor)  # this site's own CSV, inside this process only
        self.role = HospitalRole(
            identity, roster, data, dataset_info(descriptor.kind, descriptor.params),
            policy=policy, state_dir=state.path,
            restarted=state.setup_envelope() is not None,  # it has run before on this state
            witness=WitnessLog(str(state.witness_dir), roster),
        )
        self._identity = identity
        self._transport = transport
        self._outbox = outbox
        self._audit = AuditRecorder(identity)
        self.coordinator = self.role.coordinator

    def receive(self, envelope: bytes) -> None:
        for error in self._transport.failures():
            self._audit.record("send_failed", -1, "", {"error": error})
        self.carry_out(self.role.receive(envelope))
        self._flush()

    def carry_out(self, effects: Sequence[Effect]) -> None:
        """Do what the role decided, in order; a refused send is audited, not fatal."""
        from medimesh.wire import seal

        for effect in effects:
            if isinstance(effect, Record):
                self._audit.record(effect.event, effect.round, effect.subject, dict(effect.body))
                continue
            if isinstance(effect, SendRaw):
                envelope = effect.envelope
            else:
                envelope = seal(self._identity, effect.msg.TYPE, list(effect.to), effect.round,
                                effect.msg.to_payload())
            try:
                if isinstance(effect, Send) and effect.wait:
                    self._transport.send(envelope)
                else:
                    self._transport.post(envelope)
            except MediMeshError as exc:  # AXL's 502, or the front refused it
                self._audit.record("send_failed", effect.round if isinstance(effect, Send)
                                   else -1, "", {"error": f"{type(exc).__name__}: {exc}"})

    def record(self, event: str, round_: int, subject: str, body: dict[str, Any]) -> None:
        """An event of the node's own (signed with the site's key, like the role's)."""
        self._audit.record(event, round_, subject, body)
        self._flush()

    def _flush(self) -> None:
        events = self._audit.drain()
        if events:
            self._outbox.add(events)

    def info(self) -> dict[str, Any]:
        return self.role.info()

    @property
    def rounds_trained(self) -> int:
        return self.role.rounds_trained


@dataclass(frozen=True, slots=True)
class HospitalNodeConfig:
    key: Path
    roster: Path
    spec: Path
    site: Path
    axl: str
    state: Path
    axl_pin: str | None = None
    policy: Path | None = None
    seed: int = 0
    test_fraction: float = 0.3


def _descriptor(cfg: HospitalNodeConfig, name: str) -> SiteDescriptor:
    """This site's CSV under the consortium's spec: the same recipe a Ray run would ship."""
    from medimesh.spec import load_spec

    if not cfg.site.is_file():
        raise ConfigError(f"--site {cfg.site} is not a file")
    spec = load_spec(cfg.spec).to_dict()  # SpecError names the bad field
    params = {"path": str(cfg.site.resolve()), "spec": spec, "test_fraction": cfg.test_fraction,
              "seed": cfg.seed, "skip_bad_rows": False}
    return SiteDescriptor("csv", name, params)


def _header(envelope: bytes) -> Header | None:
    try:
        return inspect(envelope)
    except EnvelopeError:
        return None  # the hospital audits it when it fails to open it


def _drain(transport: AxlTransport) -> list[bytes]:
    """Everything queued for this node (up to DRAIN envelopes), oldest first."""
    out: list[bytes] = []
    while len(out) < DRAIN:
        msg = transport.recv()
        if msg is None:
            break
        out.append(msg.envelope)
    return out


def _install_stop(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def run_hospital_node(cfg: HospitalNodeConfig, stop: threading.Event | None = None) -> int:
    """Run until ``stop`` is set (SIGTERM / SIGINT); returns the exit code (0)."""
    forbid_ray()
    from medimesh.keys import load_key
    from medimesh.node.front import connect
    from medimesh.protocol import SetupResult

    identity = load_key(cfg.key)
    roster = load_verified_roster(cfg.roster)
    if identity.peer_id not in roster:
        raise ConfigError(f"{cfg.key} (peer {identity.peer_id[:12]}…) is not on {cfg.roster}")
    me = roster.get(identity.peer_id)
    if me.role != "hospital":
        raise ConfigError(f"the roster enrols {me.name} as {me.role}, not as a hospital")
    pin = cfg.axl_pin or roster_pin(roster)  # the front's TLS key: the roster's router
    auditor = roster.with_role("auditor")[0].peer_id
    policy_toml = None
    if cfg.policy is not None:
        try:
            policy_toml = cfg.policy.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read policy {cfg.policy}: {exc.strerror}") from None
    state = NodeState(cfg.state)
    stop = stop or threading.Event()
    _install_stop(stop)
    transport = connect(cfg.axl, identity, pin)
    outbox = AuditOutbox(identity, auditor)
    node = HospitalAdapter(identity, roster, _descriptor(cfg, me.name), transport, outbox,
                           state=state, policy_toml=policy_toml)
    info = node.info()
    log.info("hospital node up", name=me.name, peer=identity.peer_id[:12], axl=cfg.axl,
             n_train=info["n_train"], n_test=info["n_test"], state=str(cfg.state))
    saved = state.setup_envelope()
    if saved is not None:
        node.receive(saved)  # ready to train before the first RoundStart (see module doc)
        log.info("setup restored from state", name=me.name)
    # On the trail, signed by this site: each (re)start of its process, counts only.
    node.record("node_started", -1, identity.peer_id,
                {"n_train": info["n_train"], "n_test": info["n_test"],
                 "setup_restored": saved is not None})
    trained, down_since = node.rounds_trained, 0.0
    try:
        while not stop.is_set():
            try:
                batch = _drain(transport)
            except MediMeshError as exc:  # the front is not up (yet) or restarting
                if not down_since:
                    down_since = time.monotonic()
                    log.warning("AXL node unreachable; retrying", error=str(exc)[:200])
                stop.wait(1.0)
                continue
            if down_since:
                log.info("AXL node reachable", after_s=round(time.monotonic() - down_since, 1))
                down_since = 0.0
            if not batch:
                stop.wait(IDLE_S)
            headers = [_header(env) for env in batch]
            skip = superseded(headers)
            for i, (envelope, header) in enumerate(zip(batch, headers, strict=True)):
                if i in skip:
                    assert header is not None
                    node.record("round_skipped", header.round, header.message_id,
                                {"superseded_by": skip[i]})
                    continue
                node.receive(envelope)
                if (header is not None and header.type == SetupResult.TYPE
                        and header.sender == node.coordinator):
                    state.save_setup_envelope(envelope)
            if outbox.due():
                outbox.flush(transport.send)
            if node.rounds_trained != trained:
                trained = node.rounds_trained
                log.info("round trained", name=me.name, rounds_trained=trained,
                         audit_pending=outbox.pending())
    finally:
        node.record("node_stopped", -1, identity.peer_id,
                    {"rounds_trained": node.rounds_trained})
        deadline = time.monotonic() + FLUSH_AT_EXIT_S
        while outbox.pending() and time.monotonic() < deadline:
            if not outbox.flush(transport.send):
                time.sleep(0.5)
        if outbox.pending():
            log.warning("audit events not delivered at exit", events=outbox.pending(),
                        error=outbox.last_error)
        transport.close()
    log.info("hospital node stopped", name=me.name, rounds_trained=node.rounds_trained)
    return 0
