"""Outside callers (issue 15): the oracle and the embedded database facing the network.

The scenario tests run ``medimesh.bench.operator.outside`` against the real oracle app
(uvicorn, and Ray Serve for the 0.0.0.0 bind) and the real embedded PostgreSQL, and assert on
the evidence: status codes, the oracle's own counters, psql's refusal as another OS user.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from medimesh.access import (
    AccessPolicy,
    Limit,
    RateLimiter,
    StreamSlots,
    VerifyCache,
    bearer_token,
    is_loopback,
    limit_group,
    policy_for,
    token_matches,
)
from medimesh.api_token import resolve_token
from medimesh.bench.operator import Lab
from medimesh.bench.operator import outside as scenarios
from medimesh.client import Client, RateLimited, Unauthorized
from medimesh.errors import ConfigError, MediMeshError
from medimesh.pg_auth import hba_problems, hba_text, ident_text, mode_problems

# ------------------------------------------------------------------------ the rules (no I/O)


def test_loopback_and_tokens() -> None:
    """Loopback names only loopback; bearer parsing; constant-time comparison says no."""
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.0.0.2") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    assert bearer_token(None) is None
    assert token_matches("s" * 20, "s" * 20)
    assert not token_matches("s" * 20, "s" * 19) and not token_matches("s" * 20, None)


def test_policy_for_a_bind_address() -> None:
    """Beyond loopback a token is required (refused without one); loopback is open unless
    forced; an exposed oracle is rate limited."""
    assert policy_for("127.0.0.1", None, False) == AccessPolicy.local()
    assert not AccessPolicy.local().limits
    with pytest.raises(ValueError, match="needs an API token"):
        policy_for("0.0.0.0", None, False)
    with pytest.raises(ValueError, match="needs an API token"):
        policy_for("127.0.0.1", None, True)
    exposed = policy_for("0.0.0.0", "k" * 32, False)
    assert exposed.token == "k" * 32 and {"diagnose", "verify", "audit", "events"} <= set(
        exposed.limits)
    assert policy_for("127.0.0.1", "k" * 32, True).requires_token
    assert AccessPolicy.from_dict(exposed.to_dict()) == exposed
    with pytest.raises(ValueError):
        AccessPolicy(token="short")


def test_limit_groups() -> None:
    """Expensive endpoints are grouped; cheap reads are not limited."""
    assert limit_group("/diagnose") == limit_group("/diagnose/phenopacket") == "diagnose"
    assert limit_group("/audit/verify") == "verify" and limit_group("/audit") == "audit"
    assert limit_group("/events") == "events"
    assert limit_group("/ready") is None and limit_group("/diagnosex") is None


def test_token_bucket_per_client() -> None:
    """A burst passes, then waits are computed from the rate; clients do not share buckets."""
    lim = RateLimiter(Limit(rate=2.0, burst=3.0), max_clients=2)
    assert [lim.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.take("a", 0.0) == pytest.approx(0.5)
    assert lim.take("b", 0.0) == 0.0
    assert lim.take("a", 1.0) == 0.0  # refilled two tokens in a second
    lim.take("c", 1.0)  # evicts the least recently seen client ("b")
    assert len(lim._buckets) == 2 and "b" not in lim._buckets


def test_stream_slots() -> None:
    """Per-client and global caps; releasing frees a slot."""
    slots = StreamSlots(total=3, per_client=2)
    assert slots.acquire("a") is None and slots.acquire("a") is None
    assert "per-client" in (slots.acquire("a") or "")
    assert slots.acquire("b") is None
    assert "all 3" in (slots.acquire("c") or "")
    slots.release("a")
    assert slots.acquire("c") is None and slots.in_use == 3


def test_verify_cache() -> None:
    """Reused for one head until max_age; a new head recomputes, but not within min_interval."""
    cache = VerifyCache(max_age=30.0, min_interval=2.0)
    assert cache.cached("h1", 0.0) is None
    cache.put("h1", 0.0, {"ok": True})
    assert cache.cached("h1", 10.0) == {"ok": True}
    assert cache.cached("h2", 1.0) == {"ok": True}  # head moved, but too soon
    assert cache.cached("h2", 2.5) is None
    assert cache.cached("h1", 31.0) is None  # same head, too old
    assert cache.computations == 1


def test_token_file(tmp_path: Path) -> None:
    """Generated once into a 0600 file and shown; reused silently; flag and env win; a file
    other users can read is refused."""
    path = tmp_path / "d" / "api-token"
    first = resolve_token(None, {}, path)
    assert first.source == "generated" and first.token in first.notice()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = resolve_token(None, {}, path)
    assert again.token == first.token and again.source == "file"
    assert first.token not in again.notice()
    assert resolve_token(None, {"MEDIMESH_API_TOKEN": "e" * 20}, path).token == "e" * 20
    assert resolve_token("f" * 20, {"MEDIMESH_API_TOKEN": "e" * 20}, path).source == "flag"
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        resolve_token(None, {}, path)


def test_pg_auth_texts() -> None:
    """The written pg_hba has no trust line; the checks flag trust and open modes."""
    rules = [tuple(line.split()[:1]) for line in hba_text().splitlines()
             if line and not line.startswith("#")]
    assert rules and "trust" not in hba_text().split()
    assert "peer" in hba_text() and "scram-sha-256" in hba_text()
    assert ident_text({"root"}).splitlines()[-1].split() == ["medimesh", "root", "all"]
    with pytest.raises(ValueError):
        ident_text({"a b"})
    assert hba_problems([("local", "trust")]) and not hba_problems([("local", "peer")])
    assert mode_problems("d", 0o40777) and not mode_problems("d", 0o40700)


# ------------------------------------------------------------------------------- CLI and SDK


def test_cli_serve_beyond_loopback_gets_a_token(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`medimesh serve --host 0.0.0.0` resolves a token (generated, 0600, printed once);
    loopback stays open; deploy refuses a non-loopback bind without a token."""
    from medimesh import cli
    from medimesh.actors.oracle import deploy

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDIMESH_API_TOKEN", raising=False)
    parser = cli.build_parser()
    local = cli._access(parser.parse_args(["serve"]))
    assert local.token is None
    exposed = cli._access(parser.parse_args(["serve", "--host", "0.0.0.0"]))
    token_file = tmp_path / ".medimesh" / "api-token"
    assert exposed.token == token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    with pytest.raises(MediMeshError, match="16 characters"):
        cli._access(parser.parse_args(["serve", "--api-token", "short"]))
    forced = cli._access(parser.parse_args(["demo", "--require-token"]))
    assert forced.token == exposed.token and forced.limits
    with pytest.raises(ValueError, match="without an API token"):
        deploy("postgresql://nowhere/db", host="0.0.0.0", access=AccessPolicy.local())
    assert isinstance(parser.parse_args(["ui", "--api", "http://x"]), argparse.Namespace)


def test_serve_yaml_oracle_asks_for_a_token(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/serve.yaml binds 0.0.0.0: its api_token_file gives the replica a token (the
    environment wins), and the policy deploy() passes is kept as is."""
    import yaml

    from medimesh.actors.oracle import replica_access

    doc = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve.yaml").read_text())
    assert doc["http_options"]["host"] == "0.0.0.0"
    assert doc["applications"][0]["args"]["api_token_file"]
    monkeypatch.delenv("MEDIMESH_API_TOKEN", raising=False)
    f = tmp_path / "tok"
    policy = replica_access(None, str(f))
    assert policy is not None and policy.token == f.read_text().strip()
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and policy.limits
    monkeypatch.setenv("MEDIMESH_API_TOKEN", "v" * 24)
    assert (replica_access(None, str(f)) or AccessPolicy()).token == "v" * 24
    assert replica_access(None, None) is None
    kept = AccessPolicy.exposed("w" * 24)
    assert replica_access(kept.to_dict(), str(f)) == kept


def test_client_sends_the_token_and_names_refusals() -> None:
    """The SDK sends Authorization: Bearer; 401 is Unauthorized, 429 RateLimited(retry_after)."""
    seen: list[str | None] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.headers.get("authorization"))
        if req.url.path == "/audit/verify":
            return httpx.Response(429, json={"detail": "rate limit"},
                                  headers={"Retry-After": "3"})
        return httpx.Response(401, json={"detail": "missing or wrong API token"})

    c = Client("http://o", transport=httpx.MockTransport(handler), token="t" * 20, retries=0)
    with pytest.raises(Unauthorized):
        c.network()
    with pytest.raises(RateLimited) as info:
        c.verify_audit()
    assert info.value.retry_after == 3.0
    assert seen == [f"Bearer {'t' * 20}"] * 2


# ------------------------------------------------------------------------ the attacks (real)


def test_outside_no_token(ray_session: None, pg: Any, tmp_path: Path) -> None:
    """On 0.0.0.0 (Ray Serve), no token or a wrong one: 401 on /diagnose, /audit, /events and
    the rest; /health answers; the token holder gets diagnoses, the trail and the feed."""
    out = scenarios.outside_no_token(Lab(tmp_path, pg.get_uri()))
    d = out.details
    for who in ("none", "wrong"):
        for probe in ("POST /diagnose", "GET /audit", "GET /events", "GET /audit/verify"):
            assert d["probes"][f"{who} {probe}"] == 401, (who, probe)
    assert set(d["probes"].values()) == {401}
    assert "API token" in d["detail"] and d["health_without_token"] == 200
    assert d["bind"] == "0.0.0.0" and d["token_file_mode"] == "600"
    assert d["honest"]["events"] == 2 and d["honest"]["verify_ok"]
    assert out.attempted and out.detected and out.honest_loss == "nothing"


def test_outside_verify_flood(pg: Any, tmp_path: Path) -> None:
    """200 verify requests: one chain computation, 429s with Retry-After for the flooder, a
    second address still answered, and a new entry shows up in the next computation."""
    out = scenarios.outside_verify_flood(Lab(tmp_path, pg.get_uri()))
    d = out.details
    assert d["computations_during_flood"] == 1 and d["distinct_computed_at"] == 1
    # the burst, plus what the bucket refills while the flood runs (0.5/s)
    assert d["rate_limited"] > 0 and d["ok"] < d["requests"] // 4
    assert d["retry_after"] and all(int(s) >= 1 for s in d["retry_after"])
    h = d["honest"]
    assert h["verify"] == 200 and h["diagnose"] == 200
    assert h["entries_after"] == h["entries_before"] + 1
    assert out.detected


def test_outside_events_flood(pg: Any, tmp_path: Path) -> None:
    """One address gets 8 streams then 503; another still streams; 8 addresses fill all 64
    slots and a new stream gets 503; after they hang up a stream opens again."""
    out = scenarios.outside_events_flood(Lab(tmp_path, pg.get_uri()))
    d = out.details
    cap = d["max_streams_per_client"]
    assert d["one_address"][:cap] == [200] * cap
    assert set(d["one_address"][cap:]) <= {503, 429} and 503 in d["one_address"][cap:]
    assert d["honest_while_one_address_floods"] == 200
    assert d["open_streams"] == d["max_streams"]
    assert d["honest_while_all_slots_held"] == 503 and "live-feed" in d["cap_detail"]
    assert d["honest_after_flood"] == 200
    assert out.detected and "503" in out.honest_loss


def test_outside_pg_socket(pg: Any, tmp_path: Path) -> None:
    """Another OS user cannot reach the socket (and peer auth refuses it when the directory is
    opened); the server holds no trust rule; TCP without a password is refused."""
    out = scenarios.outside_pg_socket(Lab(tmp_path, pg.get_uri()))
    d = out.details
    for name in ("lab_server", "long_path_server"):
        s = d[name]
        assert s["socket_dir_mode_octal"] == "700" and s["socket_mode_octal"] == "700"
        assert s["hba"] and all(method != "trust" for _, method in s["hba"])
        if os.geteuid() == 0:
            assert not s["other_user"]["connected"]
            assert "Permission denied" in s["other_user"]["said"]
    # the long data path really put the socket in pgserver's runtime directory (made 0777)
    assert "python_PostgresServer" in d["long_path_server"]["socket_dir"]
    if os.geteuid() == 0:
        opened = d["other_user_with_directory_opened"]
        assert not opened["connected"] and "Peer authentication failed" in opened["said"]
    tcp = d["tcp_without_password"]
    assert not tcp["connected"] and "password authentication failed" in tcp["error"]
    assert out.detected and not d["problems"]


def test_dashboard_passes_the_token(pg: Any, tmp_path: Path) -> None:
    """The dashboard's SDK client carries the token: without it the banner names the token."""
    from medimesh.ui import views
    from medimesh.ui.app import Dashboard

    url = Lab(tmp_path, pg.get_uri()).new_database()
    asyncio.run(scenarios._seed(url))
    policy = AccessPolicy.exposed("u" * 32)
    with scenarios._oracle(url, policy) as (base, _app):
        good = Dashboard(base, token=policy.token).live()
        assert good.error is None and good.ready is not None and good.ready.ready
        bad = Dashboard(base).live()
        assert isinstance(bad.error, Unauthorized)
        assert "API token" in views.error_message(bad.error, base)
