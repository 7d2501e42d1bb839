"""``medimesh bench oracle``: /diagnose latency, throughput and a hot swap, on real Serve.

Why in-process training: the benchmark measures serving, not federation, so it trains a
pooled model on the rare cohort in well under a second (the same model family and the same
setup-round statistics the federation produces) and publishes it through the store exactly as
the auditor does: ``put_model`` plus a checkpoint carrying the standardization.

Everything runs against real components: an embedded PostgreSQL (pgserver) in a temporary
directory, Ray Serve over HTTP on 127.0.0.1, and httpx clients. Progress goes to stderr; the
result is one dict (printed as JSON by ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medimesh.data import cohort
from medimesh.evidence import EXCLUDED_PREFIX, GENETIC_TESTING_COLUMN
from medimesh.identity import Identity, Member, Roster
from medimesh.model import Model, TrainConfig, model_hash
from medimesh.runs import UNNAMED_RUN

__all__ = [
    "bench_identities",
    "bench_roster",
    "bench_signed_roster",
    "main",
    "publish_model",
    "quick_finding_hist",
    "request_from_row",
    "run_oracle_bench",
    "sample_requests",
    "train_quick_model",
]


def train_quick_model(
    seed: int = 0, hospitals: int = 8, steps: int = 200, l2: float = 1e-3
) -> tuple[Model, np.ndarray, np.ndarray]:
    """A pooled rare-cohort model plus the setup round's (unmasked) mean and std."""
    from medimesh.bench.baselines import fit_centralized
    from medimesh.features import combine_stats, local_stats, log_transform
    from medimesh.sites import SiteDescriptor, dataset_info, load_site

    info = dataset_info("rare")
    params = {"n_hospitals": hospitals, "seed": seed}
    sites = [
        load_site(SiteDescriptor("rare", f"site-{i}", {"cohort": params, "site": i}))
        for i in range(hospitals)
    ]
    k = len(info.class_names)
    parts = [local_stats(log_transform(s.x_train, info.log_mask), s.y_train, k) for s in sites]
    std, prior = combine_stats(parts)
    scale = info.scale_mask
    mean_m, std_m = np.where(scale, std.mean, 0.0), np.where(scale, std.std, 1.0)
    xs = [log_transform(s.x_train, info.log_mask) for s in sites]
    x = np.vstack([np.where(np.isnan(z := (v - mean_m) / std_m), 0.0, z) for v in xs])
    y = np.concatenate([s.y_train for s in sites])
    model = fit_centralized(x, y, k, prior, TrainConfig(l2=l2), steps)
    return model.astype32(), std.mean, std.std


def quick_finding_hist(seed: int = 0, hospitals: int = 8) -> tuple[float, ...] | None:
    """The setup round's symptom-count histogram for :func:`train_quick_model`'s sites."""
    from medimesh.explain import combine_finding_hists
    from medimesh.hospital import HospitalNode
    from medimesh.sites import SiteDescriptor, dataset_info, load_site

    info = dataset_info("rare")
    params = {"n_hospitals": hospitals, "seed": seed}
    nodes = [
        HospitalNode(
            load_site(SiteDescriptor("rare", f"site-{i}", {"cohort": params, "site": i})), info
        )
        for i in range(hospitals)
    ]
    return combine_finding_hists([(n.finding_histogram(), n.n_train) for n in nodes])


@functools.cache
def bench_identities() -> tuple[Identity, Identity]:
    """This process's stand-in coordinator and audit writer (fresh keys, never on disk)."""
    return Identity.generate(), Identity.generate()


def bench_roster() -> Roster:
    """The roster enrolling :func:`publish_model`'s coordinator and writer."""
    coordinator, writer = bench_identities()
    return Roster([Member("bench-coordinator", "coordinator", coordinator.peer_id),
                   Member("bench-auditor", "auditor", writer.peer_id)])


def bench_signed_roster() -> str:
    """:func:`bench_roster` signed by both members: a roster file an oracle's ``roster_path``
    (and ``audit verify --roster``) accepts."""
    from medimesh.signed_roster import sign_all

    return sign_all(bench_roster(), list(bench_identities()))


async def publish_model(
    store: Any,
    model: Model,
    mean: np.ndarray,
    std: np.ndarray,
    round_: int,
    parent_hash: str | None = None,
    finding_hist: Sequence[float] | None = None,
    run: str = UNNAMED_RUN,
    n_diseases: int = cohort.PANEL_SIZE,
) -> str:
    """Store a model as the coordinator/auditor would: model row, round row, checkpoint,
    all under ``run`` (default: the run of rows written without a federation), and the signed
    ``model_published`` audit entry (release hash over weights and mean/std) an oracle requires,
    by :func:`bench_roster`'s members, enrolled in the store; the checkpoint carries the setup
    round's symptom-count histogram when given; ``n_diseases``: the panel (``--diseases N``)
    whose feature spec the release hash covers."""
    from medimesh.audit import AuditChain, sign_event
    from medimesh.release import release_hash, spec_digest

    coordinator, writer = bench_identities()
    for member in bench_roster():
        await store.register_node(member)
    spec = spec_digest([f.name for f in cohort.features(n_diseases)],
                       cohort.class_names(n_diseases))
    body = {"parent": parent_hash or "", "updates": [], "verdicts": [], "run_id": run,
            "release_hash": release_hash(model, mean, std, spec), "spec_hash": spec}
    seq, head = await store.head()  # the entry first: an oracle never sees an unvouched row
    event = sign_event(coordinator, "model_published", round_, model_hash(model), body)
    await store.append_entries(AuditChain(writer, seq, head).extend([event]))
    digest: str = await store.put_model(model, round_, parent_hash=parent_hash, run=run)
    await store.put_round(round_, {"source": "bench"}, digest, time.time(), run=run)
    state: dict[str, Any] = {
        "round": round_, "mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist()
    }
    if finding_hist is not None:
        state["finding_hist"] = [float(v) for v in finding_hist]
    await store.save_checkpoint(round_, state, digest, run=run)
    return digest


def request_from_row(row: np.ndarray, features: Sequence[cohort.FeatureInfo]) -> dict[str, Any]:
    """A /diagnose body describing one synthetic patient (NaN = not measured)."""
    body: dict[str, Any] = {"symptoms": [], "excluded_symptoms": [], "biomarkers": {},
                            "genes": []}
    for v, f in zip(row, features, strict=True):
        if math.isnan(v):
            continue
        if f.name.startswith("HP:") and v > 0:
            body["symptoms"].append(f.name)
        elif f.name.startswith(EXCLUDED_PREFIX) and v > 0:
            body["excluded_symptoms"].append(f.name.removeprefix(EXCLUDED_PREFIX))
        elif f.name == GENETIC_TESTING_COLUMN:
            body["sequenced"] = bool(v > 0)
        elif f.name.startswith("gene:") and v > 0:
            body["genes"].append(f.name[5:])
        elif f.kind == "lognormal":
            body["biomarkers"][f.name] = {"value": float(v), "unit": f.unit}
        elif f.name == "age_onset_years":
            body["age"] = round(float(v), 2)
        elif f.name == "sex_male":
            body["sex"] = "M" if v > 0 else "F"
    return body


def sample_requests(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` request bodies from test-split patients of a fresh cohort (varied inputs)."""
    feats = cohort.features()
    site = cohort.make_site(cohort.CohortConfig(n_hospitals=4, seed=seed), 0)
    rows = np.vstack([site.x_test, site.x_train])
    return [request_from_row(rows[i % len(rows)], feats) for i in range(n)]


def _pct(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p90": round(float(np.percentile(a, 90)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "max": round(float(a.max()), 2),
        "mean": round(float(a.mean()), 2),
    }


def _log(msg: str) -> None:
    print(f"[bench oracle] {msg}", file=sys.stderr, flush=True)


async def _load(
    base: str, bodies: list[dict[str, Any]], concurrency: int, duration_s: float
) -> dict[str, Any]:
    """``concurrency`` clients posting back to back for ``duration_s``; per-response hashes."""
    import httpx

    stop = time.perf_counter() + duration_s
    hashes: list[str] = []
    errors: list[str] = []
    lat: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30.0, limits=limits) as client:

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = await client.post("/diagnose", json=bodies[i % len(bodies)])
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)
                    continue
                lat.append((time.perf_counter() - t) * 1000.0)
                if r.status_code == 200:
                    hashes.append(r.json()["model_hash"])
                else:
                    errors.append(str(r.status_code))
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    n = len(hashes) + len(errors)
    return {
        "requests": n,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "requests_per_s": round(n / wall, 1),
        "latency_ms": _pct(lat) if lat else {},
        "hashes": hashes,
    }


def _wait_ready(base: str, want_hash: str, timeout: float) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            r = httpx.get(f"{base}/ready", timeout=5.0)
            if r.status_code == 200 and r.json().get("model_hash") == want_hash:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"oracle not ready with model {want_hash[:12]}… after {timeout} s")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point fd 1 at stderr: Ray's C++ core prints some messages to stdout, and ``--json``
    promises a clean stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_oracle_bench(
    n_sequential: int = 300,
    concurrency: int = 16,
    duration_s: float = 10.0,
    swap_duration_s: float = 8.0,
    port: int = 8123,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Start pgserver + Ray Serve, publish a model, measure, hot-swap under load, tear down.

    Anything Ray writes to stdout meanwhile goes to stderr instead.
    """
    with _stdout_to_stderr():
        return _run(n_sequential, concurrency, duration_s, swap_duration_s, port, data_dir)


def _run(
    n_sequential: int,
    concurrency: int,
    duration_s: float,
    swap_duration_s: float,
    port: int,
    data_dir: str | None,
) -> dict[str, Any]:
    """The benchmark proper; defaults live on :func:`run_oracle_bench` only."""
    import httpx
    import ray

    from medimesh.actors.oracle import deploy, undeploy
    from medimesh.store import Store, embedded_server

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medimesh-oracle-") as tmp:
        server = embedded_server(Path(data_dir or tmp) / "pg")
        started_ray = False
        try:
            url = str(server.get_uri())
            model_a, mean, std = train_quick_model(steps=200)
            model_b, _, _ = train_quick_model(steps=120)

            async def put(model: Model, round_: int, parent: str | None) -> str:
                async with await Store.open(url) as store:
                    return await publish_model(store, model, mean, std, round_, parent)

            hash_a = asyncio.run(put(model_a, 1, None))
            if not ray.is_initialized():
                ray.init(
                    num_cpus=2, include_dashboard=False, log_to_driver=False,
                    configure_logging=False, namespace="medimesh",
                )
                started_ray = True
            t0 = time.perf_counter()
            roster_file = Path(tmp) / "roster.json"
            roster_file.write_text(bench_signed_roster())
            base = deploy(url, port=port, poll_interval=0.5, roster_path=str(roster_file))
            ready_s = _wait_ready(base, hash_a, 60.0) + (time.perf_counter() - t0)
            _log(f"oracle ready at {base} in {ready_s:.1f} s")

            bodies = sample_requests(max(n_sequential, 64))
            seq_ms: list[float] = []
            seq_errors = 0
            with httpx.Client(base_url=base, timeout=30.0) as client:
                for b in bodies[:20]:  # warm-up: connections, numpy, first-call paths
                    client.post("/diagnose", json=b)
                for b in bodies[:n_sequential]:
                    t = time.perf_counter()
                    r = client.post("/diagnose", json=b)
                    seq_ms.append((time.perf_counter() - t) * 1000.0)
                    seq_errors += r.status_code != 200
            _log(f"sequential p50 {np.percentile(seq_ms, 50):.1f} ms")

            conc = asyncio.run(_load(base, bodies, concurrency, duration_s))
            conc.pop("hashes")
            _log(f"{concurrency} clients: {conc['requests_per_s']} req/s, {conc['errors']} errors")

            async def swap_under_load() -> tuple[dict[str, Any], str, float]:
                load = asyncio.create_task(_load(base, bodies, concurrency, swap_duration_s))
                await asyncio.sleep(swap_duration_s / 3)
                t_pub = time.perf_counter()
                h = await put(model_b, 2, hash_a)
                return await load, h, t_pub

            swap, hash_b, t_pub = asyncio.run(swap_under_load())
            hashes = swap.pop("hashes")
            seen = set(hashes)
            switch = next((i for i, h in enumerate(hashes) if h == hash_b), None)
            back = switch is not None and any(h == hash_a for h in hashes[switch + 1 :])
            _log(f"hot swap: {swap['errors']} errors, models seen {len(seen)}")
        finally:
            with_serve = ray.is_initialized()
            if with_serve:
                undeploy()  # not serve.shutdown(): see medimesh.actors.oracle.undeploy
            if started_ray:
                ray.shutdown()
            server.cleanup()

    p50, p99 = float(np.percentile(seq_ms, 50)), float(np.percentile(seq_ms, 99))
    return {
        "benchmark": "oracle",
        "transport": "Ray Serve HTTP (FastAPI ingress), 1 replica, 127.0.0.1",
        "ready_s": round(ready_s, 2),
        "sequential": {"requests": n_sequential, "errors": seq_errors, "latency_ms": _pct(seq_ms)},
        "concurrent": {"clients": concurrency, "duration_s": duration_s, **conc},
        "hot_swap": {
            "clients": concurrency,
            "duration_s": swap_duration_s,
            **swap,
            "models": {"before": hash_a, "after": hash_b},
            "only_known_models": seen <= {hash_a, hash_b},
            "swap_observed": hash_b in seen,
            "responses_after_swap_with_old_model": bool(back),
            "published_after_s": round(swap_duration_s / 3, 2),
            "published_at_perf_s": round(t_pub - t_start, 2),
        },
        "targets": {
            "p50_le_15ms": p50 <= 15.0,
            "p99_le_40ms": p99 <= 40.0,
            "throughput_ge_150rps": conc["requests_per_s"] >= 150.0,
            "zero_errors_concurrent": conc["errors"] == 0,
            "zero_errors_hot_swap": swap["errors"] == 0 and seen <= {hash_a, hash_b},
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medimesh.bench.oracle [--json]`` until the CLI wires ``bench oracle``."""
    p = argparse.ArgumentParser(prog="medimesh bench oracle", description=__doc__)
    p.add_argument("--json", action="store_true", help="one line of JSON on stdout")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args(argv)
    if args.requests < 10 or args.concurrency < 1 or args.duration <= 0:
        p.error("--requests >= 10, --concurrency >= 1 and --duration > 0 are required")
    result = run_oracle_bench(args.requests, args.concurrency, args.duration, port=args.port)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
