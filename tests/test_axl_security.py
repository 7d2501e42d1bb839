"""The AXL front made safe to expose: real router + auditor actors, the front served over TLS
(``serve_front``, the router's key in the certificate), real PyNaCl signatures, real HTTP.

A peer without a key cannot drain or read another peer's mailbox, cannot replay a captured
request, cannot send as someone else, cannot join without being on the roster; a wrong TLS
pin is refused; a full mailbox drops its oldest message, counted and audited; a WAN delay is
scheduled per hop without serializing deliveries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from medimesh.axl import TO_HEADER, AxlError, AxlTransport, AxlUnauthorized
from medimesh.axl_auth import PEER_HEADER, TIME_HEADER, sign_request
from medimesh.bench.operator.hostile import Inbox  # a push peer that keeps what arrives
from medimesh.errors import ConfigError, NotEnrolled
from medimesh.identity import Identity, Member, Roster
from medimesh.routing import MAILBOX_LIMIT
from medimesh.tls import TlsPinError, certificate_peer_id, fetch_certificate, pinned_context
from medimesh.wire import open_envelope, seal

pytestmark = pytest.mark.ray

R, AU, A, B, C, D = (Identity.generate() for _ in range(6))  # D: served by the command
X = Identity.generate()  # holds a key, but is not on the roster
ROSTER = Roster(
    [
        Member("router", "router", R.peer_id),
        Member("auditor", "auditor", AU.peer_id),
        Member("alpha", "hospital", A.peer_id),
        Member("beta", "hospital", B.peer_id),
        Member("gamma", "validator", C.peer_id),
        Member("delta", "hospital", D.peer_id),
    ]
)


@pytest.fixture(scope="module")
def net(ray_session: None) -> Iterator[dict[str, Any]]:
    import ray

    from medimesh.actors.auditor import Auditor
    from medimesh.actors.axl_front import serve_front
    from medimesh.actors.router import Router

    rj = ROSTER.to_json()
    tag = f"axl-security-{time.monotonic_ns()}"
    auditor: Any = ray.remote(Auditor).options(num_cpus=0).remote(AU.seed, rj)
    router: Any = (ray.remote(Router)
                   .options(name=f"router@{tag}", namespace="medimesh", num_cpus=0)
                   .remote(R.seed, rj, auditor, 7))
    inbox: Any = ray.remote(Inbox).options(num_cpus=0).remote()
    ray.get(router.register.remote(C.peer_id, inbox))
    front = serve_front(router, [A.peer_id, B.peer_id], host="127.0.0.1", port=0,
                        tls_seed=R.seed, roster=ROSTER)
    parts = urlsplit(front.url)
    assert parts.scheme == "https" and front.pin == R.peer_id
    host, port = str(parts.hostname), int(parts.port or 0)
    raw = httpx.Client(verify=pinned_context(host, port, R.peer_id), timeout=30)
    with (
        AxlTransport(f"{front.url}/{A.peer_id}", identity=A, pin=R.peer_id) as ta,
        AxlTransport(f"{front.url}/{B.peer_id}", identity=B, pin=R.peer_id) as tb,
    ):
        yield {"router": router, "auditor": auditor, "inbox": inbox, "url": front.url,
               "tag": tag,
               "host": host, "port": port, "raw": raw, "a": ta, "b": tb}
    raw.close()
    front.stop()
    for h in (inbox, router, auditor):
        ray.kill(h)


def _drain(t: AxlTransport) -> int:
    n = 0
    while t.recv() is not None:
        n += 1
    return n


def _get(net: dict[str, Any], path: str, headers: dict[str, str] | None = None) -> Any:
    return net["raw"].get(net["url"] + path, headers=headers or {})


# -- TLS -----------------------------------------------------------------------------------


def test_front_speaks_tls13_with_the_routers_roster_key(net: dict[str, Any]) -> None:
    """The certificate's key is the router's peer id; the handshake is TLS 1.3; plain HTTP
    to the TLS port gets no answer from the API."""
    import socket

    assert certificate_peer_id(fetch_certificate(net["host"], net["port"])) == R.peer_id
    ctx = pinned_context(net["host"], net["port"], R.peer_id)
    with (
        socket.create_connection((net["host"], net["port"]), timeout=10) as sock,
        ctx.wrap_socket(sock) as tls,
    ):
        assert tls.version() == "TLSv1.3"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{net['host']}:{net['port']}/{A.peer_id}/topology", timeout=5)


def test_a_wrong_pin_is_refused_naming_both_keys(net: dict[str, Any]) -> None:
    """A client pinning another key never sends a request; https without a pin is refused."""
    with (
        AxlTransport(f"{net['url']}/{A.peer_id}", identity=A, pin=B.peer_id) as wrong,
        pytest.raises(TlsPinError) as err,
    ):
        wrong.topology()
    assert R.peer_id in str(err.value) and B.peer_id in str(err.value)
    with pytest.raises(ConfigError, match="pin"):
        AxlTransport(f"{net['url']}/{A.peer_id}", identity=A)
    # Trusting the web's CAs instead of the pin fails the handshake (self-signed roster key).
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{net['url']}/{A.peer_id}/topology", timeout=5)


# -- proof of key possession ----------------------------------------------------------------


def test_only_the_owner_can_drain_or_read_its_mailbox(net: dict[str, Any]) -> None:
    """Unsigned, signed by another member, or claiming the owner with a wrong signature: 401
    with a JSON reason, and the message stays for its owner."""
    ta, tb = net["a"], net["b"]
    _drain(tb)
    env = seal(A, "update", [B.peer_id], 1, b"for beta only")
    assert ta.send(env) == 1
    for call in ("recv", "topology"):
        path = f"/{B.peer_id}/{call}"
        unsigned = _get(net, path)
        assert unsigned.status_code == 401 and unsigned.json()["error"] == "unauthorized"
        assert "unsigned" in unsigned.json()["reason"]
        assert unsigned.headers["WWW-Authenticate"] == "MediMesh-Ed25519"
        by_alpha = _get(net, path, sign_request(A, "GET", path))  # A's key, B's mailbox
        assert by_alpha.status_code == 401 and "belongs to" in by_alpha.json()["reason"]
        forged = {**sign_request(A, "GET", path), PEER_HEADER: B.peer_id}  # claims to be B
        resp = _get(net, path, forged)
        assert resp.status_code == 401 and resp.json()["reason"] == "bad request signature"
    with pytest.raises(AxlUnauthorized, match="belongs to"):  # the client says why, too
        AxlTransport(f"{net['url']}/{B.peer_id}", identity=A, pin=R.peer_id).recv()
    got = tb.recv()
    assert got is not None and open_envelope(got.envelope, B).payload == b"for beta only"


def test_a_captured_request_cannot_be_replayed(net: dict[str, Any]) -> None:
    """Same headers twice: the second is refused. A stale time, or a signature moved to
    another path, is refused too."""
    _drain(net["b"])
    path = f"/{B.peer_id}/recv"
    captured = sign_request(B, "GET", path)
    assert _get(net, path, captured).status_code == 204
    replay = _get(net, path, captured)
    assert replay.status_code == 401 and "replayed" in replay.json()["reason"]
    stale = sign_request(B, "GET", path, now=time.time() - 120)
    resp = _get(net, path, stale)
    assert resp.status_code == 401 and "outside" in resp.json()["reason"]
    future = {**sign_request(B, "GET", path), TIME_HEADER: f"{time.time() + 3600:.3f}"}
    assert _get(net, path, future).status_code == 401
    moved = sign_request(B, "GET", f"/{B.peer_id}/topology")
    resp = _get(net, path, moved)
    assert resp.status_code == 401 and resp.json()["reason"] == "bad request signature"


def test_nobody_sends_as_another_peer(net: dict[str, Any]) -> None:
    """/send stays open (AXL clients), but only for an envelope the node's own key signed, and
    only from a roster member; the router routed none of the refused ones."""
    import ray

    before = ray.get(net["router"].stats.remote())["messages_by_type"].get("update", 0)
    env_a = seal(A, "update", [B.peer_id], 2, b"x")
    as_beta = net["raw"].post(f"{net['url']}/{B.peer_id}/send", content=env_a,
                              headers={TO_HEADER: B.peer_id})
    assert as_beta.status_code == 403 and "sends only as itself" in as_beta.text
    env_x = seal(X, "update", [B.peer_id], 2, b"x")
    outsider = net["raw"].post(f"{net['url']}/{A.peer_id}/send", content=env_x,
                               headers={TO_HEADER: B.peer_id})
    assert outsider.status_code == 403 and "not in the roster" in outsider.text
    after = ray.get(net["router"].stats.remote())["messages_by_type"].get("update", 0)
    assert after == before


def test_a_peer_not_on_the_roster_cannot_join(net: dict[str, Any]) -> None:
    """No front serves a non-member: refused when the front is built, and at the router when
    there is no roster copy; X's own signed requests find no mailbox."""
    from medimesh.actors.axl_front import RayRouterPort, build_front_app, serve_front
    from medimesh.axl_front import AxlFront

    with pytest.raises(NotEnrolled, match="not in the roster"):
        AxlFront(RayRouterPort(net["router"]), [X.peer_id], roster=ROSTER)
    with pytest.raises(NotEnrolled):
        build_front_app(net["router"], [X.peer_id], roster=ROSTER)
    with pytest.raises(NotEnrolled):
        serve_front(net["router"], [X.peer_id], tls_seed=R.seed, roster=None)
    path = f"/{X.peer_id}/recv"
    assert _get(net, path, sign_request(X, "GET", path)).status_code == 404


# -- the bounded queue ------------------------------------------------------------------------


def test_a_full_mailbox_drops_its_oldest_counted_and_audited(net: dict[str, Any]) -> None:
    """AXL's 100-message queue: 5 more than fit push out the 5 oldest; the router counts them
    for beta and audits each drop as ``mailbox_overflow`` (peer, dropped, limit)."""
    import ray

    ta, tb = net["a"], net["b"]
    _drain(tb)
    router, auditor = net["router"], net["auditor"]
    envs = [seal(A, "update", [B.peer_id], 9, i.to_bytes(2, "big")) for i in range(105)]
    for env in envs:
        assert ta.send(env) == 1
    stats = ray.get(router.stats.remote())
    assert stats["peers"][B.peer_id]["mailbox_dropped"] == 5
    assert stats["mailboxes"]["limit"] == MAILBOX_LIMIT == 100
    assert stats["mailboxes"]["dropped"] == {B.peer_id: 5}
    kept = []
    while (got := tb.recv()) is not None:
        kept.append(got.envelope)
    assert kept == envs[5:]  # the oldest five went, in order; the newest 100 stayed
    ray.get(router.sync_audit.remote())
    entries = ray.get(auditor.entries.remote("mailbox_overflow"))
    assert len(entries) == 5
    assert all(e.subject == B.peer_id and e.actor == R.peer_id for e in entries)
    assert [e.body["dropped_total"] for e in entries] == [1, 2, 3, 4, 5]
    assert all(e.body["peer"] == B.peer_id and e.body["dropped"] == 1
               and e.body["limit"] == 100 for e in entries)
    assert ray.get(auditor.verify.remote())["ok"]


# -- WAN delay ------------------------------------------------------------------------------


def test_wan_delay_is_scheduled_per_hop_without_serializing(net: dict[str, Any]) -> None:
    """0.2 s per hop: both hops of one envelope (an AXL mailbox and a Ray actor) are due 0.2 s
    after routing, at the same time (a sleeping router would make the second wait 0.4 s); a
    second envelope is routed while the first is still in flight; nothing arrives early."""
    import ray

    ta, tb = net["a"], net["b"]
    router = net["router"]
    _drain(tb)
    ray.get(router.set_faults.remote(delay_s=0.2))
    try:
        first = seal(A, "verdicts", [B.peer_id, C.peer_id], 3, b"one")
        second = seal(A, "verdicts", [B.peer_id], 3, b"two")
        assert ta.send(first) == 2 and ta.send(second) == 1
        deadline = time.monotonic() + 20
        while True:
            hops = [h for h in ray.get(router.hops.remote())
                    if h["message_id"] in (_mid(first), _mid(second))]
            if len(hops) == 3 and all(h["delivered_at"] is not None for h in hops):
                break
            assert time.monotonic() < deadline, f"delayed hops never delivered: {hops}"
            time.sleep(0.05)
    finally:
        ray.get(router.set_faults.remote())
    h1, h2 = [h for h in hops if h["message_id"] == _mid(first)]
    (h3,) = [h for h in hops if h["message_id"] == _mid(second)]
    for h in (h1, h2, h3):
        assert h["due_at"] - h["routed_at"] == pytest.approx(0.2)
        assert h["delivered_at"] >= h["due_at"]  # applied, never early
    assert h1["due_at"] == h2["due_at"] and {h1["to"], h2["to"]} == {B.peer_id, C.peer_id}
    assert h3["routed_at"] < h1["due_at"]  # the router took the second while the first waited
    got = [tb.recv(), tb.recv()]
    assert [g.envelope for g in got if g is not None] == [first, second]
    assert first in ray.get(net["inbox"].received.remote())


def _mid(envelope: bytes) -> str:
    from medimesh.wire import inspect

    return inspect(envelope).message_id


def test_jitter_is_set_through_the_router_and_reported(net: dict[str, Any]) -> None:
    """``set_faults(jitter_s=)`` reaches the router's table and its stats; a bad value is
    refused before anything changes."""
    import ray

    router = net["router"]
    ray.get(router.set_faults.remote(delay_s=0.05, jitter_s=0.02))
    try:
        faults = ray.get(router.stats.remote())["faults"]
        assert faults == {"drop": 0.0, "delay_s": 0.05, "jitter_s": 0.02}
        with pytest.raises(ray.exceptions.RayTaskError, match="jitter"):
            ray.get(router.set_faults.remote(jitter_s=-1.0))
    finally:
        ray.get(router.set_faults.remote())


def test_pinned_context_refuses_a_non_ed25519_certificate() -> None:
    """A front presenting an ordinary (ECDSA) certificate cannot satisfy a roster pin."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-medimesh")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(TlsPinError, match="not the Ed25519"):
        certificate_peer_id(pem)


def test_front_command_serves_tls_with_the_router_key(
    net: dict[str, Any], tmp_path: Path
) -> None:
    """`python -m medimesh.actors.axl_front --tls-key router.key --roster roster.json` in its
    own process, attached to this Ray: it prints the pin, and a client pinning the roster's
    router (roster_pin) reads its topology with a signed request; unsigned is 401."""
    import os
    import socket
    import subprocess
    import sys

    import ray

    from medimesh.axl import roster_pin

    R.save(tmp_path / "router.key")
    (tmp_path / "roster.json").write_text(ROSTER.to_json())
    (tmp_path / "delta.pub").write_text(D.peer_id + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"] == f"router@{net['tag']}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "medimesh.actors.axl_front",
         "--address", ray.get_runtime_context().gcs_address, "--router", name,
         "--pub", str(tmp_path / "delta.pub"), "--roster", str(tmp_path / "roster.json"),
         "--tls-key", str(tmp_path / "router.key"), "--port", str(port)],
        stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"clients pin {R.peer_id}" in line, line
        pin = roster_pin(ROSTER)
        url = f"https://127.0.0.1:{port}"
        with AxlTransport(url, identity=D, pin=pin, timeout=10) as td:
            deadline = time.monotonic() + 60
            while True:
                try:
                    topo = td.topology()
                    break
                except (AxlError, TlsPinError):
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.3)
            assert topo.our_public_key == D.peer_id and A.peer_id in topo.peers
        raw = httpx.Client(verify=pinned_context("127.0.0.1", port, pin), timeout=10)
        assert raw.get(f"{url}/topology").status_code == 401
        raw.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
