"""Real AXL's HTTP API over MediMesh's router: a real router actor, a real HTTP front (uvicorn),
real envelopes. Two peers outside Ray talk through ``AxlTransport`` as they would to an AXL node.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from medimesh.axl import TO_HEADER, AxlError, AxlTransport, Topology
from medimesh.axl_auth import sign_request
from medimesh.bench.operator.hostile import Inbox  # a push peer that keeps what arrives
from medimesh.errors import DecryptionFailed, NotARecipient, NotEnrolled, PeerUnreachable
from medimesh.identity import Identity, Member, Role, Roster
from medimesh.transport import Transport
from medimesh.wire import DOMAIN_OUTER, open_envelope, seal

pytestmark = pytest.mark.ray

R, A, B, C, D, S = (Identity.generate() for _ in range(6))  # S: served alone, on its own front
X = Identity.generate()  # never enrolled
ROSTER = Roster(
    [
        Member("router", "router", R.peer_id),
        Member("alpha", "hospital", A.peer_id),
        Member("beta", "hospital", B.peer_id),
        Member("gamma", "validator", C.peer_id),
        Member("delta", "coordinator", D.peer_id),  # enrolled, never attached: unreachable
        Member("solo", "oracle", S.peer_id),
    ]
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def network(ray_session: None) -> Iterator[dict[str, Any]]:
    """Router actor + Ray peer gamma + one HTTP front serving alpha and beta."""
    import ray
    import uvicorn

    from medimesh.actors.axl_front import build_front_app
    from medimesh.actors.router import Router

    tag = f"axl-test-{time.monotonic_ns()}"
    router: Any = (  # handles are untyped: their methods are resolved at run time
        ray.remote(Router)
        .options(name=f"router@{tag}", namespace="medimesh", num_cpus=0)
        .remote(R.seed, ROSTER.to_json(), None, 0, 64)
    )
    inbox: Any = ray.remote(Inbox).options(num_cpus=0).remote()
    ray.get(router.register.remote(C.peer_id, inbox))
    port = _free_port()
    app = build_front_app(router, [A.peer_id, B.peer_id])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "front did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    with (
        AxlTransport(f"{base}/{A.peer_id}", identity=A) as ta,
        AxlTransport(f"{base}/{B.peer_id}", identity=B) as tb,
    ):
        yield {"router": router, "inbox": inbox, "base": base, "a": ta, "b": tb}
    server.should_exit = True
    thread.join(timeout=10)
    ray.kill(inbox)
    ray.kill(router)


def _stats(net: dict[str, Any]) -> dict[str, Any]:
    import ray

    return dict(ray.get(net["router"].stats.remote()))


def _drain(t: AxlTransport) -> None:
    while t.recv() is not None:
        pass


def test_peers_exchange_signed_sealed_envelopes(network: dict[str, Any]) -> None:
    """alpha -> beta over /send and /recv; the router counted and captured only ciphertext."""
    import ray

    ta, tb = network["a"], network["b"]
    secret = b"delta-w for round 3: " + bytes(range(64))
    env = seal(A, "update", [B.peer_id], 3, secret)
    before = _stats(network)["peers"][A.peer_id]["msgs_out"]
    assert ta.send(env) == 1
    got = tb.recv()
    assert got is not None and got.envelope == env and got.from_peer == A.peer_id
    opened = open_envelope(got.envelope, B)
    assert opened.payload == secret and opened.header.sender == A.peer_id
    assert tb.recv() is None  # 204: the mailbox is empty again
    stats = _stats(network)
    assert stats["peers"][A.peer_id]["msgs_out"] == before + 1
    assert stats["peers"][B.peer_id]["bytes_in"] >= len(env)
    captured = ray.get(network["router"].captured.remote())
    assert env in captured and not any(secret in c for c in captured)  # routed, never readable
    with pytest.raises(NotARecipient):  # nor by a member it was not sealed to
        open_envelope(env, C)


def test_multi_recipient_envelope_is_routed_once_to_axl_and_ray_peers(
    network: dict[str, Any],
) -> None:
    """One post per recipient (AXL), one routing at the router, one copy for each recipient."""
    import ray

    ta, tb = network["a"], network["b"]
    _drain(tb)
    before = _stats(network)["messages_by_type"].get("verdicts", 0)
    env = seal(A, "verdicts", [B.peer_id, C.peer_id], 4, b"batch")
    assert ta.send(env) == 2
    assert _stats(network)["messages_by_type"]["verdicts"] == before + 1
    got = tb.recv()
    assert got is not None and got.envelope == env and tb.recv() is None
    deadline = time.monotonic() + 10
    while env not in ray.get(network["inbox"].received.remote()):
        assert time.monotonic() < deadline, "the Ray peer never got its copy"
        time.sleep(0.05)
    assert ray.get(network["inbox"].received.remote()).count(env) == 1


def test_topology_lists_the_reachable_peers(network: dict[str, Any]) -> None:
    """/topology names the node itself and every other attached member as a peer."""
    topo = network["a"].topology()
    assert isinstance(topo, Topology)
    assert topo.our_public_key == A.peer_id == network["a"].peer_id
    assert set(topo.peers) == {B.peer_id, C.peer_id}
    assert D.peer_id not in topo.peers  # enrolled but never attached
    path = f"/{B.peer_id}/topology"
    raw = httpx.get(network["base"] + path, headers=sign_request(B, "GET", path)).json()
    assert raw["our_public_key"] == B.peer_id
    assert {p["public_key"] for p in raw["peers"]} == {A.peer_id, C.peer_id}
    assert all(p["up"] for p in raw["peers"]) and raw["tree"]


def test_tampered_envelopes_are_refused(network: dict[str, Any]) -> None:
    """A flipped bit never leaves the front; a re-signed forgery is refused by its receiver."""
    ta, tb = network["a"], network["b"]
    _drain(tb)
    env = seal(A, "update", [B.peer_id], 5, b"weights")
    flipped = bytearray(env)
    flipped[-80] ^= 1  # inside the ciphertext: the outer signature no longer verifies
    resp = httpx.post(
        f"{network['base']}/{A.peer_id}/send",
        content=bytes(flipped),
        headers={TO_HEADER: B.peer_id},
    )
    assert resp.status_code == 400 and "signature" in resp.text
    assert tb.recv() is None
    # The sender's own key can re-sign altered ciphertext; the router routes it (it cannot read
    # it), and the receiver's authenticated decryption refuses it.
    unsigned = bytearray(env[:-64])
    unsigned[-10] ^= 1
    forged = bytes(unsigned) + A.sign(DOMAIN_OUTER + bytes(unsigned))
    assert ta.send(forged) == 1
    got = tb.recv()
    assert got is not None and got.envelope == forged
    with pytest.raises(DecryptionFailed):
        open_envelope(got.envelope, B)


def test_unknown_and_unreachable_destinations_are_clear_errors(network: dict[str, Any]) -> None:
    """Not enrolled: 403 -> NotEnrolled. Enrolled but offline: AXL's 502 -> PeerUnreachable."""
    ta = network["a"]
    with pytest.raises(NotEnrolled, match="not enrolled"):
        ta.send(seal(A, "update", [X.peer_id], 1, b""))
    with pytest.raises(PeerUnreachable, match="no route"):
        ta.send(seal(A, "update", [D.peer_id], 1, b""))
    ta.post(seal(A, "update", [D.peer_id], 1, b""))  # fire-and-forget keeps the refusal
    failures = ta.failures()
    assert len(failures) == 1 and failures[0].startswith("PeerUnreachable")
    assert ta.failures() == []


def test_front_enforces_the_axl_contract(network: dict[str, Any]) -> None:
    """Missing or bad destination: 400; spoofed sender: 403; unknown node: 404; 204 when empty."""
    base = network["base"]
    env = seal(A, "update", [B.peer_id], 1, b"")
    assert httpx.post(f"{base}/{A.peer_id}/send", content=env).status_code == 400
    bad = httpx.post(f"{base}/{A.peer_id}/send", content=env, headers={TO_HEADER: "zz"})
    assert bad.status_code == 400 and "Invalid destination" in bad.text
    spoof = httpx.post(f"{base}/{B.peer_id}/send", content=env, headers={TO_HEADER: B.peer_id})
    assert spoof.status_code == 403 and "sends only as itself" in spoof.text
    stray = httpx.post(f"{base}/{A.peer_id}/send", content=env, headers={TO_HEADER: C.peer_id})
    assert stray.status_code == 400 and "not a recipient" in stray.text
    assert httpx.get(f"{base}/{X.peer_id}/recv",
                     headers=sign_request(X, "GET", f"/{X.peer_id}/recv")).status_code == 404
    assert httpx.get(f"{base}/recv").status_code == 404  # two nodes here: no root alias
    huge = httpx.post(f"{base}/{A.peer_id}/send", content=b"\0" * (16 * 1024 * 1024 + 1),
                      headers={TO_HEADER: B.peer_id})
    assert huge.status_code == 413
    with pytest.raises(AxlError, match="cannot reach"):
        AxlTransport("http://127.0.0.1:9", timeout=1).topology()


def test_find_router_by_name(network: dict[str, Any]) -> None:
    """The front's command finds the run's router by actor name, or says it is missing."""
    import ray

    from medimesh.actors.axl_front import find_router
    from medimesh.errors import ConfigError

    name = ray.get(network["router"].whoami.remote())
    handle = find_router(next(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("router@axl-test-")
    ))
    assert ray.get(handle.whoami.remote()) == name == R.peer_id
    with pytest.raises(ConfigError, match="no actor 'router@nope'"):
        find_router("router@nope")


def test_single_node_front_serves_the_root_api_and_detaches_on_stop(
    network: dict[str, Any],
) -> None:
    """A one-peer front answers at / like an AXL node; stopping it makes the peer unreachable."""
    import ray
    from starlette.testclient import TestClient

    from medimesh.actors.axl_front import build_front_app

    router = network["router"]
    app = build_front_app(router, [S.peer_id])
    with TestClient(app) as client:
        topo = client.get("/topology", headers=sign_request(S, "GET", "/topology"))
        assert topo.json()["our_public_key"] == S.peer_id
        assert S.peer_id in ray.get(router.topology.remote())["peers"]
        assert network["a"].send(seal(A, "model", [S.peer_id], 2, b"m")) == 1
        resp = client.get("/recv", headers=sign_request(S, "GET", "/recv"))
        assert resp.status_code == 200 and resp.headers["X-From-Peer-Id"] == A.peer_id
        assert client.get("/recv", headers=sign_request(S, "GET", "/recv")).status_code == 204
    assert S.peer_id not in ray.get(router.topology.remote())["peers"]
    with pytest.raises(PeerUnreachable):
        network["a"].send(seal(A, "model", [S.peer_id], 2, b"m"))


def test_a_hospital_outside_ray_trains_in_a_federation_over_axl(ray_session: None) -> None:
    """The unchanged Hospital class, run in this process on AxlTransport, joins a Ray federation.

    One hospital is a Ray actor, the other a plain object polling an HTTP front; the
    coordinator and validator cannot tell them apart, and both updates are accepted.
    """
    import ray
    import uvicorn

    from medimesh.actors.auditor import Auditor
    from medimesh.actors.axl_front import build_front_app
    from medimesh.actors.coordinator import Coordinator, CoordinatorConfig
    from medimesh.actors.hospital import Hospital
    from medimesh.actors.router import Router
    from medimesh.actors.runtime import RunConfig, site_descriptors, spec_hash
    from medimesh.actors.validator import Validator
    from medimesh.sites import dataset_info

    sites = site_descriptors(RunConfig(hospitals=2, seed=3))
    info = dataset_info(sites[0].kind, sites[0].params)
    ids = {n: Identity.generate() for n in ("router", "auditor", "validator", "coordinator")}
    ids |= {d.name: Identity.generate() for d in sites}
    roles: dict[str, Role] = {"router": "router", "auditor": "auditor",
                              "validator": "validator", "coordinator": "coordinator"}
    roster = Roster(Member(n, roles.get(n, "hospital"), i.peer_id) for n, i in ids.items())
    rj = roster.to_json()

    def actor(cls: type, *args: Any) -> Any:
        return ray.remote(cls).options(num_cpus=0).remote(*args)

    auditor = actor(Auditor, ids["auditor"].seed, rj)
    router = actor(Router, ids["router"].seed, rj, auditor)
    validator = actor(Validator, ids["validator"].seed, rj, router, auditor)
    cfg = CoordinatorConfig(n_features=len(info.feature_names), n_classes=len(info.class_names),
                            spec_hash=spec_hash(info), round_timeout_s=20.0)
    coordinator = actor(Coordinator, ids["coordinator"].seed, rj, router, auditor, cfg)
    in_ray = actor(Hospital, ids[sites[0].name].seed, rj, router, auditor, sites[0])
    ray.get([router.register.remote(ids[n].peer_id, h) for n, h in
             (("validator", validator), ("coordinator", coordinator), (sites[0].name, in_ray))])

    outside = Hospital(ids[sites[1].name].seed, rj, None, None, sites[1])  # plain, no Ray
    port = _free_port()
    app = build_front_app(router, [outside.peer_id])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    stop = threading.Event()
    with AxlTransport(f"http://127.0.0.1:{port}", identity=outside.identity) as transport:
        seam: Transport = transport  # statically: AxlTransport is a Transport
        # Node annotates its transport as RouterTransport; the hospital only uses the seam.
        outside.transport = seam  # type: ignore[assignment]
        listener = threading.Thread(target=transport.listen, args=(outside.deliver, stop))
        listener.start()
        try:
            setup = ray.get(coordinator.setup.remote(), timeout=60)
            history = ray.get(coordinator.run.remote(2), timeout=120)
        finally:
            stop.set()
            listener.join(timeout=10)
            server.should_exit = True
    assert setup["hospitals"] == 2
    assert [m["accepted"] for m in history] == [2, 2]
    assert outside.rounds_trained == 2 and outside.transport.failures() == []
    stats = ray.get(router.stats.remote())["peers"][outside.peer_id]
    assert stats["msgs_out"] >= 3 and stats["msgs_in"] >= 3  # setup + 2 updates; and back
    for h in (in_ray, coordinator, validator, router, auditor):
        ray.kill(h)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "at least one peer"),
        (["--peer-id", "00"], "64 hex"),
        (["--pub", "none.pub"], "no public key file"),
        (["--peer-id", A.peer_id, "--tls-key", "none.key"], "no key file"),
        (["--peer-id", A.peer_id, "--allow-unsigned", "--host", "0.0.0.0"],
         "--allow-unsigned only"),
    ],
)
def test_front_command_refuses_bad_peers_before_touching_ray(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """`python -m medimesh.actors.axl_front` checks its peers first: one line, exit 2."""
    out = subprocess.run(
        [sys.executable, "-m", "medimesh.actors.axl_front", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_a_dead_router_is_503_not_a_stack_trace(ray_session: None) -> None:
    """When the router actor dies, the front answers 503 and keeps serving."""
    import ray
    from starlette.testclient import TestClient

    from medimesh.actors.axl_front import build_front_app
    from medimesh.actors.router import Router

    router: Any = ray.remote(Router).options(num_cpus=0).remote(R.seed, ROSTER.to_json())

    def recv(client: TestClient) -> Any:
        return client.get("/recv", headers=sign_request(S, "GET", "/recv"))

    with TestClient(build_front_app(router, [S.peer_id])) as client:
        assert recv(client).status_code == 204
        ray.kill(router)
        # ray.kill is asynchronous: calls may still reach the actor for a moment (slow CI).
        deadline = time.monotonic() + 20
        resp = recv(client)
        while resp.status_code == 204 and time.monotonic() < deadline:
            time.sleep(0.2)
            resp = recv(client)
        for _ in range(2):
            assert resp.status_code == 503 and "router is unavailable" in resp.text
            resp = recv(client)


def test_a_long_polled_recv_is_answered_when_a_message_arrives(network: dict[str, Any]) -> None:
    """``X-MediMesh-Wait``: the front holds beta's /recv until alpha's envelope is routed, then
    answers with it; an empty mailbox is held for the wait and then answered 204."""
    ta, tb = network["a"], network["b"]
    _drain(tb)
    env = seal(A, "update", [B.peer_id], 7, b"held for beta")
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(tb.recv(wait_s=4.0)))
    waiter.start()
    time.sleep(0.5)  # beta's request is waiting at the front now
    assert waiter.is_alive(), "an empty mailbox answered at once instead of holding the request"
    assert ta.send(env) == 1
    waiter.join(timeout=10)
    assert got and got[0] is not None and got[0].envelope == env
    asked = time.monotonic()
    assert tb.recv(wait_s=0.6) is None  # nothing came: 204 once the wait is over
    assert time.monotonic() - asked >= 0.5


def test_listen_delivers_through_the_long_poll(network: dict[str, Any]) -> None:
    """A node's receive loop gets every envelope sent to it, in order, and stops on request."""
    ta, tb = network["a"], network["b"]
    _drain(tb)
    seen: list[bytes] = []
    stop = threading.Event()
    loop = threading.Thread(target=tb.listen, args=(seen.append, stop), daemon=True)
    loop.start()
    envs = [seal(A, "update", [B.peer_id], r, b"r%d" % r) for r in range(1, 6)]
    for env in envs:
        ta.send(env)
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while len(seen) < len(envs) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    loop.join(timeout=5)
    assert seen == envs and not loop.is_alive()


def test_a_client_gone_mid_wait_loses_no_message(network: dict[str, Any]) -> None:
    """A node that hangs up while its /recv is held (killed, timed out) must not have the next
    message popped for the dead connection: it waits in the mailbox for its next request."""
    ta, tb = network["a"], network["b"]
    _drain(tb)
    impatient = AxlTransport(f"{network['base']}/{B.peer_id}", identity=B, timeout=0.5)
    with impatient, pytest.raises(AxlError):
        impatient.recv(wait_s=4.0)  # the client gives up after 0.5 s; the front held it
    time.sleep(0.3)  # the front has seen the disconnect
    env = seal(A, "update", [B.peer_id], 9, b"not for a dead socket")
    assert ta.send(env) == 1
    got = tb.recv(wait_s=2.0)
    assert got is not None and got.envelope == env
