"""AxlTransport against a real Gensyn AXL node, when one is available (else skipped, saying why).

* ``MEDIMESH_AXL_NODE=/path/to/node`` (the Go binary built from github.com/gensyn-ai/axl with
  ``go build -o node ./cmd/node/``): the test starts two nodes on loopback, the second peering
  with the first, each with a key exported by ``medimesh keys axl-pem``, so their AXL peer ids
  are MediMesh peer ids; a sealed envelope goes from one to the other and is opened there.
* ``MEDIMESH_AXL_URL=http://127.0.0.1:9002`` (a node already running) and optionally
  ``MEDIMESH_AXL_KEY=NAME.key`` (the MediMesh key whose PEM that node loaded): the test reads
  its topology and, with the key, sends an envelope to itself.

The same ``AxlTransport`` talks to MediMesh's own front: swapping the emulation for AXL is a
URL (configuration), not code. A real AXL node has no signed-request check of its own; it binds
its API to loopback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medimesh.axl import AxlError, AxlTransport
from medimesh.identity import Identity
from medimesh.keys import load_key, write_axl_pem
from medimesh.wire import open_envelope, seal

NODE = os.environ.get("MEDIMESH_AXL_NODE", "")
URL = os.environ.get("MEDIMESH_AXL_URL", "")
KEY = os.environ.get("MEDIMESH_AXL_KEY", "")
SKIP = ("no real AXL node: set MEDIMESH_AXL_NODE to an AXL node binary (go build -o node "
        "./cmd/node/ in gensyn-ai/axl) or MEDIMESH_AXL_URL to a running node's API")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_topology(t: AxlTransport, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            t.topology()
            return
        except AxlError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _start_node(binary: str, workdir: Path, ident: Identity, api_port: int,
                listen: list[str], peers: list[str]) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    write_axl_pem(ident, workdir / "private.pem")
    config = {"PrivateKeyPath": str(workdir / "private.pem"), "Peers": peers,
              "Listen": listen, "api_port": api_port, "bridge_addr": "127.0.0.1"}
    (workdir / "node-config.json").write_text(json.dumps(config))
    log = (workdir / "node.log").open("wb")
    return subprocess.Popen([binary, "-config", str(workdir / "node-config.json")],
                            cwd=workdir, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[AxlTransport, Identity, AxlTransport, Identity]]:
    if not NODE:
        pytest.skip(SKIP)
    if not Path(NODE).is_file():  # asked for, but misconfigured: a failure, not a skip
        pytest.fail(f"MEDIMESH_AXL_NODE={NODE} is not a file")
    a, b = Identity.generate(), Identity.generate()
    peer_port, api_a, api_b = _free_port(), _free_port(), _free_port()
    # Peers pinned to loopback: a node with no peers would dial public bootstrap nodes.
    procs = [
        _start_node(NODE, tmp_path / "a", a, api_a, [f"tls://127.0.0.1:{peer_port}"], []),
        _start_node(NODE, tmp_path / "b", b, api_b, [], [f"tls://127.0.0.1:{peer_port}"]),
    ]
    ta = AxlTransport(f"http://127.0.0.1:{api_a}", identity=a, timeout=10)
    tb = AxlTransport(f"http://127.0.0.1:{api_b}", identity=b, timeout=10)
    try:
        _wait_topology(ta)
        _wait_topology(tb)
        yield ta, a, tb, b
    finally:
        ta.close()
        tb.close()
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def test_envelope_between_two_real_axl_nodes(
    two_nodes: tuple[AxlTransport, Identity, AxlTransport, Identity],
) -> None:
    """A's node reports A's MediMesh peer id; an envelope sealed to B arrives at B's node."""
    ta, a, tb, b = two_nodes
    assert ta.topology().our_public_key == a.peer_id
    assert tb.topology().our_public_key == b.peer_id
    env = seal(a, "update", [b.peer_id], 1, b"over real AXL")
    deadline = time.monotonic() + 60
    while True:  # the overlay needs a moment to find the route after peering
        try:
            assert ta.send(env) == 1
            break
        except AxlError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    deadline = time.monotonic() + 30
    while (got := tb.recv()) is None:
        assert time.monotonic() < deadline, "the envelope never reached B's node"
        time.sleep(0.2)
    opened = open_envelope(got.envelope, b)
    assert opened.payload == b"over real AXL" and opened.header.sender == a.peer_id


def test_a_running_axl_node() -> None:
    """Topology of a running node; with its MediMesh key, an envelope to itself."""
    if not URL:
        pytest.skip(SKIP)
    with AxlTransport(URL, timeout=10) as t:
        topo = t.topology()
        assert len(topo.our_public_key) == 64
        if not KEY:
            return
        ident = load_key(Path(KEY))
        assert topo.our_public_key == ident.peer_id, "MEDIMESH_AXL_KEY is not the node's key"
        env = seal(ident, "model", [ident.peer_id], 1, b"to myself")
        t.send(env)
        deadline = time.monotonic() + 30
        while (got := t.recv()) is None:
            assert time.monotonic() < deadline, "the node never handed back its own message"
            time.sleep(0.2)
        assert open_envelope(got.envelope, ident).payload == b"to myself"
