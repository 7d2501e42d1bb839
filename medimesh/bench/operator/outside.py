"""Operator attacks: outside (issue 15); see the package docstring.

Outside callers, not the operator: someone on the network who reaches the oracle's port, and
another OS user on the database's machine. Each scenario starts the real oracle app (the
FastAPI app a Serve replica runs, here on uvicorn or on Ray Serve itself) on a fresh database
of the lab's PostgreSQL, attacks it over HTTP or the socket, and checks that a legitimate
client still gets its answers (``honest_loss`` says what it did not get).

Several client addresses on one machine: Linux routes all of 127.0.0.0/8 to loopback, so the
attacker binds 127.0.0.2 (or 127.0.0.10-17) and the legitimate client 127.0.0.3.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from medimesh.access import AccessPolicy, policy_for
from medimesh.bench.operator import AttackOutcome, Lab, Scenario

__all__ = ["SCENARIOS"]

ATTACKER = "127.0.0.2"
HONEST = "127.0.0.3"


# ------------------------------------------------------------------------------ set-up helpers


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def _seed(url: str, entries: int = 6) -> None:
    """A published model (with its standardization) and a few signed audit entries."""
    from medimesh.audit import AuditChain, sign_event
    from medimesh.bench.oracle import (
        bench_identities,
        publish_model,
        quick_finding_hist,
        train_quick_model,
    )
    from medimesh.store import Store

    actor, writer = bench_identities()  # the members of bench_signed_roster()
    store = await Store.open(url)
    try:
        model, mean, std = train_quick_model(steps=30)
        await publish_model(store, model, mean, std, 1, finding_hist=quick_finding_hist())
        seq, head = await store.head()
        events = [sign_event(actor, "round_opened", i, subject=f"r{i}", body={"i": i})
                  for i in range(entries)]
        await store.append_entries(AuditChain(writer, seq, head).extend(events))
    finally:
        await store.close()


async def _append(url: str, n: int = 1) -> None:
    from medimesh.audit import AuditChain, sign_event
    from medimesh.bench.oracle import bench_identities
    from medimesh.store import Store

    actor, writer = bench_identities()  # the members of bench_signed_roster()
    store = await Store.open(url)
    try:
        seq, head = await store.head()
        events = [sign_event(actor, "round_opened", 100 + i, subject="late", body={})
                  for i in range(n)]
        await store.append_entries(AuditChain(writer, seq, head).extend(events))
    finally:
        await store.close()


@contextlib.contextmanager
def _oracle(url: str, policy: AccessPolicy, host: str = "127.0.0.1") -> Iterator[tuple[str, Any]]:
    """The oracle app on uvicorn in a thread, bound to ``host``; yields (base URL, app)."""
    import uvicorn

    from medimesh.actors.oracle import OracleConfig, build_app

    app = build_app(OracleConfig(url, poll_interval=0.5, load_ontology=False, access=policy))
    port = _free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    headers = {} if policy.token is None else {"Authorization": f"Bearer {policy.token}"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/ready", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the oracle did not become ready")
            time.sleep(0.1)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _client(base: str, source: str, token: str | None = None, **kw: Any) -> httpx.Client:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=base, headers=headers, timeout=10.0,
                        transport=httpx.HTTPTransport(local_address=source), **kw)


def _aclient(base: str, source: str, token: str | None) -> httpx.AsyncClient:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.AsyncClient(base_url=base, headers=headers, timeout=10.0,
                             transport=httpx.AsyncHTTPTransport(local_address=source))


def _guard(app: Any) -> Any:
    """The access middleware instance of a started app (its counters are the evidence)."""
    from medimesh.oracle.middleware import AccessGuard

    stack = app.middleware_stack
    while stack is not None and not isinstance(stack, AccessGuard):
        stack = getattr(stack, "app", None) or getattr(stack, "_app", None)
    return stack


_DIAGNOSE = {"symptoms": ["HP:0001744", "HP:0002240"],
             "biomarkers": {"chitotriosidase": {"value": 5200, "unit": "nmol/h/mL"}}}


# --------------------------------------------------------------------------------- no token


def outside_no_token(lab: Lab) -> AttackOutcome:
    """The oracle bound to 0.0.0.0 (on Ray Serve, as ``medimesh serve --host 0.0.0.0`` does);
    a caller without the token, or with a wrong one, asks for a diagnosis, the audit trail
    and the live feed."""
    from ray import serve

    from medimesh.actors.oracle import deploy
    from medimesh.api_token import resolve_token
    from medimesh.bench.oracle import bench_signed_roster
    from medimesh.client import Client

    url = lab.new_database()
    asyncio.run(_seed(url))
    roster = lab.subdir("rosters") / "roster.json"  # the signers of the seeded trail
    roster.write_text(bench_signed_roster())
    resolved = resolve_token(None, {}, lab.subdir("home") / "api-token")  # generated, 0600
    token_mode = stat.S_IMODE(os.stat(resolved.path or "").st_mode)
    policy = policy_for("0.0.0.0", resolved.token, require_token=False)
    port = _free_port("0.0.0.0")
    probes: dict[str, int] = {}
    honest: dict[str, Any] = {}
    try:
        base = deploy(url, port=port, poll_interval=0.5, host="0.0.0.0", access=policy,
                      roster_path=str(roster))
        # reach it the way an outside caller would: the machine's own address if it has one
        addr = _outward_address()
        outside = f"http://{addr}:{port}" if addr else base
        deadline = time.monotonic() + 60
        with Client(outside, timeout=10.0, token=resolved.token) as ok:
            while not ok.ready().ready:
                if time.monotonic() > deadline:
                    raise RuntimeError("the oracle on Serve did not become ready")
                time.sleep(0.2)
            for label, token in (("none", None), ("wrong", "x" * 43)):
                hdr = {} if token is None else {"Authorization": f"Bearer {token}"}
                with httpx.Client(base_url=outside, headers=hdr, timeout=10.0) as c:
                    probes[f"{label} POST /diagnose"] = c.post("/diagnose", json=_DIAGNOSE
                                                               ).status_code
                    for path in ("/audit", "/audit/verify", "/network", "/ready",
                                 "/openapi.json"):
                        probes[f"{label} GET {path}"] = c.get(path).status_code
                    with c.stream("GET", "/events") as r:
                        probes[f"{label} GET /events"] = r.status_code
            with httpx.Client(base_url=outside, timeout=10.0) as c:
                probes["token in the query string GET /audit"] = c.get(
                    "/audit", params={"token": resolved.token}).status_code
                health = c.get("/health").status_code
                detail = c.get("/audit").json().get("detail", "")
            dx = ok.diagnose(["HP:0001744"], {"chitotriosidase": (5200, "nmol/h/mL")})
            honest = {
                "diagnose_model": dx.model_hash[:12],
                "audit_entries": len(ok.audit().entries),
                "events": len(list(ok.events(max_events=2))),
                "verify_ok": ok.verify_audit().ok,
            }
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]
    refused = all(code == 401 for code in probes.values())
    served = honest.get("events") == 2 and honest.get("verify_ok") is True
    return AttackOutcome(
        attack="outside_no_token", number=0, attempted=True,
        detected=refused and served and health == 200,
        by="oracle (access guard)",
        how="HTTP 401 'missing or wrong API token' on every path but /health",
        honest_loss="nothing" if served else f"the token holder was refused too: {honest}",
        details={"bind": "0.0.0.0", "reached_at": outside, "probes": probes,
                 "health_without_token": health, "detail": detail,
                 "token_source": resolved.source, "token_file_mode": f"{token_mode:o}",
                 "honest": honest},
    )


def _outward_address() -> str | None:
    """This machine's non-loopback IPv4 address, if it has one (no packet is sent)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
        addr = str(s.getsockname()[0])
        if not addr.startswith("127.") and addr != "0.0.0.0":
            return addr
    return None


# ------------------------------------------------------------------------------- verify flood


def outside_verify_flood(lab: Lab) -> AttackOutcome:
    """An outside caller with a valid token hammers /audit/verify (a full chain recomputation
    each, before); the oracle must reuse one answer and rate limit the caller."""
    url = lab.new_database()
    asyncio.run(_seed(url, entries=40))
    policy = AccessPolicy.exposed("t" * 32)
    codes: list[int] = []
    computed: set[float] = set()
    retry_after: set[str] = set()
    honest: dict[str, Any] = {}
    with _oracle(url, policy) as (base, app):
        state = app.state.oracle

        async def flood() -> None:
            async with _aclient(base, ATTACKER, policy.token) as c:
                async def one() -> None:
                    r = await c.get("/audit/verify")
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        computed.add(r.json()["computed_at"])
                    elif r.status_code == 429:
                        retry_after.add(r.headers.get("retry-after", ""))
                for _ in range(10):  # 10 waves of 20 concurrent requests
                    await asyncio.gather(*(one() for _ in range(20)))

        asyncio.run(flood())
        computations_during_flood = state.verify_cache.computations
        with _client(base, HONEST, policy.token) as ok:
            first = ok.get("/audit/verify")
            dx = ok.post("/diagnose", json=_DIAGNOSE)
            asyncio.run(_append(url))  # the chain head moves: the next answer must say so
            time.sleep(policy.verify_min_interval + 0.1)
            after = ok.get("/audit/verify")
        honest = {"verify": first.status_code, "diagnose": dx.status_code,
                  "verify_after_new_entry": after.status_code,
                  "entries_before": first.json().get("entries") if first.is_success else None,
                  "entries_after": after.json().get("entries") if after.is_success else None,
                  "cached_first": first.json().get("cached") if first.is_success else None}
        total_computations = state.verify_cache.computations
    limited = codes.count(429)
    sees_new = (honest["entries_after"] is not None and honest["entries_before"] is not None
                and honest["entries_after"] == honest["entries_before"] + 1)
    served = honest["verify"] == 200 and honest["diagnose"] == 200 and sees_new
    return AttackOutcome(
        attack="outside_verify_flood", number=0, attempted=True,
        detected=limited > 0 and computations_during_flood == 1 and served,
        by="oracle (verify cache + rate limit)",
        how=f"{computations_during_flood} chain recomputation for {len(codes)} requests; "
            f"HTTP 429 with Retry-After for {limited}",
        honest_loss=("nothing (answers may be reused for up to "
                     f"{policy.verify_max_age:g} s with an unchanged head, stated in "
                     "computed_at / cached)") if served else f"legitimate caller: {honest}",
        details={"requests": len(codes), "ok": codes.count(200), "rate_limited": limited,
                 "retry_after": sorted(retry_after), "distinct_computed_at": len(computed),
                 "computations_during_flood": computations_during_flood,
                 "computations_total": total_computations, "honest": honest,
                 "limit": {"rate": policy.limits["verify"].rate,
                           "burst": policy.limits["verify"].burst}},
    )


# ------------------------------------------------------------------------------- events flood


def outside_events_flood(lab: Lab) -> AttackOutcome:
    """Outside callers open live feeds (/events) until the oracle runs out: from one address
    (the per-address cap stops it), then from eight (the global cap does)."""
    url = lab.new_database()
    asyncio.run(_seed(url))
    policy = AccessPolicy.exposed("e" * 32)
    out: dict[str, Any] = {}
    with _oracle(url, policy) as (base, app):
        guard = _guard(app)

        async def attack() -> None:
            async with contextlib.AsyncExitStack() as stack:
                one = await stack.enter_async_context(_aclient(base, ATTACKER, policy.token))
                codes = [await _open(stack, one) for _ in range(policy.max_streams_per_client + 2)]
                out["one_address"] = codes
                honest = await stack.enter_async_context(_aclient(base, HONEST, policy.token))
                out["honest_while_one_address_floods"] = await _first_event(honest)
                # a distributed flood: enough addresses to hold every slot
                spread: list[int] = []
                n_addr = policy.max_streams // policy.max_streams_per_client
                for i in range(n_addr):
                    c = await stack.enter_async_context(
                        _aclient(base, f"127.0.0.{10 + i}", policy.token))
                    for _ in range(policy.max_streams_per_client):
                        spread.append(await _open(stack, c))
                out["spread"] = {"200": spread.count(200), "503": spread.count(503),
                                 "429": spread.count(429)}
                out["open_streams"] = guard.streams.in_use if guard is not None else None
                late = await honest.get("/events", params={"max_events": 1})
                out["honest_while_all_slots_held"] = late.status_code
                out["cap_detail"] = late.json().get("detail") if late.status_code == 503 else ""
            # the attackers hung up: the slots come back
            for _ in range(50):
                if guard is None or guard.streams.in_use == 0:
                    break
                await asyncio.sleep(0.1)
            async with _aclient(base, HONEST, policy.token) as honest:
                out["honest_after_flood"] = await _first_event(honest)

        asyncio.run(attack())
    codes = out["one_address"]
    cap = policy.max_streams_per_client
    per_client_held = codes[:cap] == [200] * cap
    per_client_refused = all(c in (503, 429) for c in codes[cap:])
    caught = (per_client_held and per_client_refused
              and out["honest_while_one_address_floods"] == 200
              and out["honest_while_all_slots_held"] == 503
              and out["honest_after_flood"] == 200)
    return AttackOutcome(
        attack="outside_events_flood", number=0, attempted=True, detected=caught,
        by="oracle (live-feed caps)",
        how=f"HTTP 503 beyond {policy.max_streams_per_client} streams per address and "
            f"{policy.max_streams} in all",
        honest_loss=("while attackers on "
                     f"{policy.max_streams // policy.max_streams_per_client} or more addresses "
                     "hold every slot, a legitimate client's new /events stream gets 503 "
                     "(its polling /audit and /diagnose still work); nothing while one "
                     "address floods"),
        details={**out, "max_streams": policy.max_streams,
                 "max_streams_per_client": policy.max_streams_per_client},
    )


async def _open(stack: contextlib.AsyncExitStack, client: httpx.AsyncClient) -> int:
    """Open one /events stream and keep it open until ``stack`` closes; its status."""
    resp = await stack.enter_async_context(client.stream("GET", "/events"))
    return resp.status_code


async def _first_event(client: httpx.AsyncClient) -> int:
    async with client.stream("GET", "/events", params={"max_events": 1}) as r:
        if r.status_code == 200:
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    break
        return r.status_code


# --------------------------------------------------------------------------------- PG socket


def outside_pg_socket(lab: Lab) -> AttackOutcome:
    """Another local OS user (``nobody``) connects to the embedded PostgreSQL's socket, and a
    caller connects over TCP without a password. Checked on the lab's server and on one whose
    data path is too long for a socket name (pgserver then puts the socket in a runtime
    directory it makes world-writable)."""
    from medimesh.pg_auth import hba_problems, mode_problems
    from medimesh.store import embedded_server

    details: dict[str, Any] = {}
    problems: list[str] = []
    details["lab_server"] = _inspect(lab.admin_url)
    long_dir = lab.subdir("d" * 90) / "pg"  # > 107 bytes for the socket name
    server = embedded_server(long_dir)
    uri = str(server.get_uri())
    try:
        details["long_path_server"] = _inspect(uri)
        for name in ("lab_server", "long_path_server"):
            d = details[name]
            problems += [f"{name}: {p}" for p in hba_problems(d["hba"])]
            problems += [f"{name}: {p}" for p in mode_problems("socket directory",
                                                                d["socket_dir_mode"])]
            problems += [f"{name}: {p}" for p in mode_problems("socket", d["socket_mode"])]
            if d["other_user"] is not None and d["other_user"]["connected"]:
                problems.append(f"{name}: OS user nobody connected: {d['other_user']}")
        # defence in depth: even with the directory opened by mistake, peer auth refuses
        sock_dir = Path(details["long_path_server"]["socket_dir"])
        old = stat.S_IMODE(sock_dir.stat().st_mode)
        sock = sock_dir / f".s.PGSQL.{details['long_path_server']['port']}"
        old_sock = stat.S_IMODE(sock.stat().st_mode)
        sock_dir.chmod(0o777)
        sock.chmod(0o777)
        try:
            opened = _as_other_user(sock_dir, details["long_path_server"]["port"])
        finally:
            sock_dir.chmod(old)
            sock.chmod(old_sock)
        details["other_user_with_directory_opened"] = opened
        if opened is not None and opened["connected"]:
            problems.append(f"socket opened by mistake: nobody connected: {opened}")
    finally:
        pgdata, user = Path(server.pgdata), server.system_user
        sock_dir = Path(details.get("long_path_server", {}).get("socket_dir", pgdata))
        server.cleanup()  # stopped the way pgserver stops it
    details["tcp_without_password"] = _tcp_attempt(pgdata, user, sock_dir)
    if details["tcp_without_password"]["connected"]:
        problems.append(f"TCP without a password: {details['tcp_without_password']}")
    return AttackOutcome(
        attack="outside_pg_socket", number=0, attempted=True, detected=not problems,
        by="PostgreSQL (pg_hba peer/scram, socket 0700)",
        how=("socket directory and socket 0700; OS user nobody refused ('Permission denied', "
             "and 'Peer authentication failed' with the directory opened); TCP without a "
             "password refused (scram-sha-256)"),
        honest_loss="nothing",
        details={**details, "problems": problems,
                 "as_root": os.geteuid() == 0},
    )


def _inspect(uri: str) -> dict[str, Any]:
    """What an attacker on this machine faces: pg_hba rules, socket modes, a foreign login."""
    import asyncpg

    async def rules() -> tuple[list[tuple[str, str]], str, str]:
        conn = await asyncpg.connect(uri)
        try:
            hba = [(str(r["type"]), str(r["auth_method"]))
                   for r in await conn.fetch("SELECT type, auth_method FROM pg_hba_file_rules")]
            return (hba, str(await conn.fetchval("SHOW unix_socket_directories")),
                    str(await conn.fetchval("SHOW port")))
        finally:
            await conn.close()

    hba, _dirs, port = asyncio.run(rules())
    sock_dir = Path(uri.rpartition("host=")[2].partition("&")[0])
    sock = sock_dir / f".s.PGSQL.{port}"
    return {
        "hba": hba,
        "socket_dir": str(sock_dir),
        "port": int(port),
        "socket_dir_mode": sock_dir.stat().st_mode,
        "socket_dir_mode_octal": f"{stat.S_IMODE(sock_dir.stat().st_mode):o}",
        "socket_mode": sock.stat().st_mode,
        "socket_mode_octal": f"{stat.S_IMODE(sock.stat().st_mode):o}",
        "other_user": _as_other_user(sock_dir, int(port)),
    }


def _psql() -> Path:
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql"


def _as_other_user(sock_dir: Path, port: int) -> dict[str, Any] | None:
    """psql as OS user ``nobody`` on the socket; None when we cannot switch users (not root)."""
    if os.geteuid() != 0:
        return None
    r = subprocess.run(
        [str(_psql()), f"host={sock_dir} port={port} user=postgres dbname=postgres",
         "-tAc", "SELECT current_user"],
        user="nobody", capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "5"},
    )
    return {"connected": r.returncode == 0, "returncode": r.returncode,
            "said": (r.stdout.strip() or r.stderr.strip())[:300]}


def _tcp_attempt(pgdata: Path, user: str | None, sock_dir: Path) -> dict[str, Any]:
    """Start the (stopped) server listening on 127.0.0.1 too, as an operator might, and log
    in over TCP without a password; then stop it."""
    import asyncpg
    from pgserver import _commands

    pg_ctl = _commands.pg_ctl  # type: ignore[attr-defined]  # set at import by pgserver
    port = _free_port()
    pg_ctl(["-w", "-o", "-h 127.0.0.1", "-o", f"-p {port}", "-o", f"-k {sock_dir}",
            "-l", str(pgdata / "log"), "start"], pgdata=pgdata, user=user, timeout=30)

    async def attempt() -> dict[str, Any]:
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres",
                                         database="postgres", timeout=10)
        except Exception as exc:
            return {"connected": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        try:
            return {"connected": True, "as": await conn.fetchval("SELECT current_user")}
        finally:
            await conn.close()

    try:
        return {"port": port, **asyncio.run(attempt())}
    finally:
        pg_ctl(["-w", "stop"], pgdata=pgdata, user=user)


SCENARIOS: dict[str, Scenario] = {
    "outside_no_token": outside_no_token,
    "outside_verify_flood": outside_verify_flood,
    "outside_events_flood": outside_events_flood,
    "outside_pg_socket": outside_pg_socket,
}
