"""The oracle on real Ray Serve over HTTP, driven through the SDK (one end-to-end test)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from medimesh.bench.oracle import bench_signed_roster, publish_model, train_quick_model
from medimesh.client import Client, ValidationFailed
from medimesh.store import Store, embedded_server

pytestmark = pytest.mark.ray


def test_oracle_on_serve_end_to_end(ray_session: None, tmp_path: Path) -> None:
    """Deploy, diagnose, 422 via SDK, hot-swap to a new model, SSE resume, then shut down."""
    from ray import serve

    from medimesh.actors.oracle import deploy

    try:
        server = embedded_server(tmp_path / "pg")
    except Exception as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            pytest.fail(f"embedded PostgreSQL did not start: {exc!r}")
        pytest.skip(f"embedded PostgreSQL did not start: {exc!r}")
    url = str(server.get_uri())
    a, mean, std = train_quick_model(steps=120)
    b, _, _ = train_quick_model(steps=60)
    roster_file = tmp_path / "roster.json"  # /audit/verify's signers, the models' voucher
    roster_file.write_text(bench_signed_roster())

    async def put(model_round: int) -> str:
        async with await Store.open(url) as store:  # also its signed model_published entry
            return await publish_model(store, a if model_round == 1 else b, mean, std,
                                       model_round)

    try:
        ha = asyncio.run(put(1))
        base = deploy(url, port=8765, poll_interval=0.5, roster_path=str(roster_file))
        with Client(base, timeout=10.0) as client:
            deadline = time.monotonic() + 60
            while not client.ready().ready:
                assert time.monotonic() < deadline, client.ready()
                time.sleep(0.2)
            d = client.diagnose(["HP:0001744"], {"chitotriosidase": (6000, "nmol/h/mL")},
                                ["GBA1"], age=10, sex="F")
            assert d.model_hash == ha and len(d.differential) == 11
            with pytest.raises(ValidationFailed) as info:
                client.diagnose(biomarkers={"ck": (10, "mg/dL")})
            assert info.value.field == "biomarkers.ck.unit"
            assert client.model(ha).active

            hb = asyncio.run(put(2))
            deadline = time.monotonic() + 30
            while client.diagnose(["HP:0001744"]).model_hash != hb:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            events = list(client.events(last_event_id=1, max_events=1))
            assert events[0].id == "2" and events[0].entry.subject == hb
            assert client.verify_audit().ok
            assert client.network().source == "store"
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        server.cleanup()
