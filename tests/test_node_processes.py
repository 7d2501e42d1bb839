"""Issue 16, end to end: a consortium and three hospitals as separate OS processes over AXL.

The commands are read from deploy/README.md, step 12, and run as written there (the site's
folder or ``ops/`` as working directory, ``$SITE``, ``$AXL``, ``$AXL_LISTEN`` set in the
environment). Key and roster commands run in this process through the CLI's own parser (a
Python start per command would cost more than the training); ``node consortium``,
``node hospital`` and ``audit verify`` run as their own processes: the consortium on its own
Ray (never this session's), each hospital with no Ray at all. One hospital is killed with
SIGKILL mid-run and started again with the same key and state: the run closes a round on
quorum meanwhile, and an update the restarted process sent is accepted later, which the test
reads from the audit trail (the router's signed routing entries and the coordinator's
``model_published``), not from any log text.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from string import Template
from typing import IO, Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "deploy" / "README.md"
SITES = ("cleveland", "hungary", "va")


def _blocks() -> list[tuple[str, list[str]]]:
    """Step 12's ``sh`` blocks: (who runs it, from the first comment line; its commands)."""
    section = README.read_text().split("\n## 12.", 1)[1]
    out = []
    for body in re.findall(r"```sh\n(.*?)```", section, re.S):
        lines = [ln.strip() for ln in body.strip().splitlines()]
        assert lines[0].startswith("# "), f"block without a '# who' line: {lines[0]}"
        out.append((lines[0][2:], [ln for ln in lines[1:] if ln.startswith("medimesh ")]))
    return out


def _argv(line: str, env: dict[str, str]) -> list[str]:
    return shlex.split(Template(line).substitute(env))[1:]  # without the leading "medimesh"


def _in_process(line: str, cwd: Path, env: dict[str, str]) -> None:
    """A key or roster command, through the CLI's parser and command function."""
    from medimesh.cli import build_parser

    args = build_parser().parse_args(_argv(line, env))
    old = Path.cwd()
    os.chdir(cwd)
    try:
        assert args.func(args) == 0, line
    finally:
        os.chdir(old)


def _spawn(line: str, cwd: Path, env: dict[str, str], log: IO[str]) -> subprocess.Popen[str]:
    full = {**os.environ, **env}
    full.pop("RAY_ADDRESS", None)  # never the pytest session's Ray
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    return subprocess.Popen(
        [sys.executable, "-m", "medimesh.cli", *_argv(line, env)], cwd=cwd, env=full,
        stdout=subprocess.PIPE, stderr=log, text=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _find(blocks: list[tuple[str, list[str]]], who: str, prefix: str) -> list[str]:
    return [c for w, cmds in blocks if w == who for c in cmds if c.startswith(prefix)]


@pytest.fixture
def work() -> Iterator[Path]:
    """A folder others may traverse: as root, pgserver runs PostgreSQL as its own system user,
    which cannot enter pytest's 0700 temporary tree."""
    path = Path(tempfile.mkdtemp(prefix="medimesh-node-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_three_hospital_processes_train_over_axl_and_survive_kill_9(work: Path) -> None:
    from medimesh.data import heart

    if heart.default_data_dir() is None:
        pytest.skip("../shared/data/heart is not present")
    tmp_path = work
    blocks = _blocks()
    ops = tmp_path / "ops"
    ops.mkdir()
    data = tmp_path / "data"
    _in_process(f"medimesh data heart --out {data}", tmp_path, {})
    port = _free_port()
    listen = {"AXL_LISTEN": f"127.0.0.1:{port}"}
    site_env = {s: {"SITE": s, "AXL": f"https://127.0.0.1:{port}"} for s in SITES}
    dirs = {s: tmp_path / s for s in SITES}

    # -- keys, roster, signatures: every command of the walkthrough, in its order ----------
    for s in SITES:
        dirs[s].mkdir()
        shutil.copy(data / f"{s}.csv", dirs[s] / f"{s}.csv")
        for d in (dirs[s], ops):
            shutil.copy(data / "spec.json", d / "spec.json")
        for line in _find(blocks, "site", "medimesh keys new"):
            _in_process(line, dirs[s], site_env[s])
        shutil.copy(dirs[s] / "keys" / f"{s}.pub", ops / f"{s}.pub")  # "send the .pub"
    for line in _find(blocks, "operator", "medimesh keys new"):
        _in_process(line, ops, {})
    for line in _find(blocks, "operator", "medimesh roster add"):
        _in_process(line, ops, {})
    for s in SITES:
        for line in _find(blocks, "operator, for each site", "medimesh roster add"):
            _in_process(line, ops, site_env[s])
    for line in _find(blocks, "operator", "medimesh roster sign"):
        _in_process(line, ops, {})
    for s in SITES:  # the file goes to each site in turn, and back
        shutil.copy(ops / "roster.json", dirs[s] / "roster.json")
        for line in _find(blocks, "site, in turn", "medimesh roster sign"):
            _in_process(line, dirs[s], site_env[s])
        shutil.copy(dirs[s] / "roster.json", ops / "roster.json")
    for s in SITES:
        shutil.copy(ops / "roster.json", dirs[s] / "roster.json")
        for line in _find(blocks, "site", "medimesh roster verify"):
            _in_process(line, dirs[s], site_env[s])

    # -- the processes ----------------------------------------------------------------------
    (consortium_cmd,) = _find(blocks, "operator", "medimesh node consortium")
    (hospital_cmd,) = _find(blocks, "site", "medimesh node hospital")
    (verify_cmd,) = _find(blocks, "operator", "medimesh audit verify")
    logs = {n: (tmp_path / f"{n}.log").open("w") for n in ("consortium", *SITES, "restart")}
    procs: dict[str, subprocess.Popen[str]] = {}
    lines: list[dict[str, Any]] = []
    try:
        consortium = _spawn(consortium_cmd + " --json", ops, listen, logs["consortium"])
        procs["consortium"] = consortium
        for s in SITES:
            procs[s] = _spawn(hospital_cmd, dirs[s], site_env[s], logs[s])

        def read() -> None:
            assert consortium.stdout is not None
            for raw in consortium.stdout:
                lines.append(json.loads(raw))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        def wait_for(pred: Any, what: str, timeout: float) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                hit = next((m for m in lines if pred(m)), None)
                if hit is not None:
                    return hit
                if consortium.poll() is not None:
                    break
                time.sleep(0.1)
            raise AssertionError(f"no {what}; consortium log:\n"
                                 + (tmp_path / "consortium.log").read_text()[-3000:])

        front = wait_for(lambda m: "axl" in m, "AXL front", 120)
        assert front["axl"] == site_env[SITES[0]]["AXL"]
        # The front's TLS key is the router's, the key every site's signed roster copy pins.
        from medimesh.keys import load_key

        assert front["axl_pin"] == load_key(ops / "keys" / "router.key").peer_id
        victim = SITES[-1]
        # Mid-run: once the victim holds the setup result (rounds take ~0.1 s each here, so
        # waiting for a round line would leave too few rounds for the restart to show).
        setup = dirs[victim] / "state" / "setup_result.env"
        deadline = time.monotonic() + 120
        while not setup.exists() and time.monotonic() < deadline and consortium.poll() is None:
            time.sleep(0.05)
        assert setup.exists(), (tmp_path / "consortium.log").read_text()[-3000:]
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(timeout=10)
        # The run goes on without it: a round closes on quorum (2 of 3).
        quorum = wait_for(lambda m: m.get("accepted") == 2, "round closed on quorum", 60)
        restarted_at = time.time()
        procs[victim] = _spawn(hospital_cmd, dirs[victim], site_env[victim], logs["restart"])
        consortium.wait(timeout=120)
        reader.join(timeout=10)
        assert consortium.returncode == 0, (tmp_path / "consortium.log").read_text()[-3000:]
        summary = lines[-1]
        assert summary["rounds"] == 5 and summary["audit"]["ok"]
        assert min(summary["accepted_per_round"]) >= 2
        # SIGTERM: each node flushes its audit events and exits 0.
        for s in SITES:
            procs[s].send_signal(signal.SIGTERM)
        for s in SITES:
            assert procs[s].wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for fh in logs.values():
            fh.close()

    # -- the trail ----------------------------------------------------------------------------
    verify = subprocess.run([sys.executable, "-m", "medimesh.cli", *_argv(verify_cmd, {})],
                            cwd=ops, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "medimesh.cli", "audit", "show", "--json", "--limit", "0"],
        cwd=ops, capture_output=True, text=True, timeout=120,
    )
    entries = [json.loads(ln) for ln in shown.stdout.splitlines() if ln.strip()]
    roster = json.loads((ops / "roster.json").read_text())
    peer = {m["name"]: m["peer_id"] for m in roster["members"]}
    accepted = {d: e["round"] for e in entries if e["event"] == "model_published"
                for d in e["body"]["updates"]}
    routed = [e for e in entries if e["event"] == "message_routed"
              and e["body"]["type"] == "update" and e["body"]["from"] == peer[victim]]
    rejoined = [accepted[e["body"]["digest"]] for e in routed
                if e["at"] > restarted_at and e["body"]["digest"] in accepted]
    assert rejoined and min(rejoined) > quorum["round"], (quorum, routed)
    # Every hospital's own signed events reached the chain over the wire, none refused.
    started = [e["actor"] for e in entries if e["event"] == "node_started"]
    assert sorted(started) == sorted([peer[s] for s in SITES] + [peer[victim]])  # + restart
    restart = [e for e in entries if e["event"] == "node_started" and e["actor"] == peer[victim]]
    assert restart[-1]["body"]["setup_restored"]  # from its --state, before any round
    assert not [e for e in entries if e["event"] == "audit_events_refused"]
