"""Secure aggregation through the real actors: same model as plaintext FedAvg, the coordinator
sees only masked vectors, a hospital that vanishes after masking is recovered, audit verifies.

Two runs with the same configuration (4 hospitals, 3 rounds, FedAvg, clip C): plaintext, and
secure with ``hospital-04`` as a drill dropout (it sends its masked update, then never answers
the unmasking request). Training is deterministic full-batch descent, so the two runs differ
only by the quantization error of the secure sums.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from medimesh.aggregation import flatten
from medimesh.model import TrainConfig
from medimesh.protocol import SecAggMasked, Update, decode
from medimesh.secagg import Quantizer, SecAggConfig
from medimesh.secagg_round import b64d
from medimesh.wire import inspect, open_envelope

pytestmark = pytest.mark.ray

CLIP = 1.0
HOSPITALS = 4
ROUNDS = 3
CHI2_999_255 = 330.52  # chi2.ppf(0.999, 255), as in tests/test_secagg.py
# The masks here come from fresh keys, so the test is random: judged at chi2.ppf(1 - 1e-9, 255)
# a truly uniform view fails once in a billion runs, not once in a thousand.
CHI2_1E9_255 = 414.55


def _run(secure: bool) -> dict[str, Any]:
    from medimesh.actors.runtime import Consortium, RunConfig

    cfg = RunConfig(
        dataset="rare", hospitals=HOSPITALS, rounds=ROUNDS, seed=5, aggregator="fedavg",
        validator_scoring=False, train=TrainConfig(epochs=2, clip_norm=CLIP),
        behaviours=(("hospital-04", "secagg_dropout"),), capture_envelopes=1000,
        secure_aggregation=SecAggConfig(max_dropout=0.3, clip_norm=CLIP, grace_s=1.0)
        if secure else None,
    )
    fed = Consortium(cfg)
    try:
        fed.start()
        history = fed.run()
        import ray

        out = {
            "history": history,
            "final": fed.final_model(),
            "captured": list(ray.get(fed.handles["router"].captured.remote())),
            "entries": fed.audit_entries(),
            "verify": fed.verify_audit(),
            "coordinator": fed.identities["coordinator"],
            "names": {i.peer_id: n for n, i in fed.identities.items()},
        }
    finally:
        fed.shutdown()
    return out


@pytest.fixture(scope="module")
def runs(ray_session: None) -> Iterator[dict[str, dict[str, Any]]]:
    yield {"plain": _run(secure=False), "secure": _run(secure=True)}


def _opened(run: dict[str, Any], type_: str) -> list[tuple[str, bytes, int]]:
    """(sender name, payload, round) of every captured envelope of ``type_`` to the coordinator,
    opened with the coordinator's own key: exactly what the coordinator can read."""
    out = []
    for env in run["captured"]:
        h = inspect(env)
        if h.type == type_ and run["coordinator"].peer_id in h.recipients:
            opened = open_envelope(env, run["coordinator"])
            out.append((run["names"][h.sender], opened.payload, h.round))
    return out


def test_secure_run_publishes_the_plaintext_fedavg_model(runs: dict[str, Any]) -> None:
    """Every round closes with all four hospitals summed; the final model equals plaintext
    FedAvg's up to quantization error, and so does the accuracy."""
    plain, secure = runs["plain"], runs["secure"]
    assert [m["round"] for m in secure["history"]] == list(range(1, ROUNDS + 1))
    assert all(m["accepted"] == HOSPITALS for m in secure["history"])
    assert all(m["accepted"] == HOSPITALS for m in plain["history"])
    a = flatten(secure["final"]["weights"], secure["final"]["bias"])
    b = flatten(plain["final"]["weights"], plain["final"]["bias"])
    assert not np.array_equal(a, flatten(np.zeros_like(secure["final"]["weights"]),
                                         secure["final"]["bias"]))
    assert float(np.abs(a - b).max()) < 1e-5, float(np.abs(a - b).max())  # measured: 3e-8
    assert abs(secure["history"][-1]["top1"] - plain["history"][-1]["top1"]) <= 0.01
    assert secure["history"][-1]["top1"] > secure["history"][0]["top1"] - 0.01


def test_the_coordinator_only_ever_reads_masked_vectors(runs: dict[str, Any]) -> None:
    """No plaintext update reaches the coordinator; what it can open of a hospital's input is
    uniform (chi-square on its bytes), while the same hospital's plaintext delta, quantized
    the same way, fails the test by orders of magnitude."""
    secure, plain = runs["secure"], runs["plain"]
    to_coord = {
        inspect(e).type for e in secure["captured"]
        if secure["coordinator"].peer_id in inspect(e).recipients
    }
    assert Update.TYPE not in to_coord and SecAggMasked.TYPE in to_coord, to_coord
    masked = _opened(secure, SecAggMasked.TYPE)
    assert len(masked) == HOSPITALS * ROUNDS
    words = []
    for _, payload, _ in masked:
        blob = b64d(decode(SecAggMasked.TYPE, payload, SecAggMasked).masked)
        words.append(np.frombuffer(blob[10:-64], dtype="<u4"))
    view = np.concatenate(words)
    assert _byte_chi2(view) < CHI2_1E9_255
    # The contrast: hospital-01's round-2 update of the plaintext run, quantized.
    upd = next(
        decode(Update.TYPE, p, Update) for n, p, r in _opened(plain, Update.TYPE)
        if n == "hospital-01" and r == 2
    )
    clear = Quantizer(CLIP, HOSPITALS).encode(flatten(upd.delta_w, upd.delta_b))
    assert _byte_chi2(clear) > 100 * CHI2_999_255


def test_a_dropout_after_masking_is_recovered_every_round(runs: dict[str, Any]) -> None:
    """hospital-04 never answers unmasking; its self-mask is rebuilt from the others' shares
    (t = 3 of 4) and its update is in every published sum."""
    entries = runs["secure"]["entries"]
    published = [e.body["secure_aggregation"] for e in entries if e.event == "model_published"]
    assert len(published) == ROUNDS
    for sa in published:
        assert sa["threshold"] == 3 and sa["summed"] == HOSPITALS, sa
        assert sa["answered_unmask"] == HOSPITALS - 1 and sa["dropped_after_masking"] == 1, sa
    drills = [e for e in entries if e.event == "secagg_dropout_drill"]
    assert len(drills) == ROUNDS


def test_validator_keeps_protocol_checks_and_the_audit_chain_verifies(
    runs: dict[str, Any],
) -> None:
    """Masked updates get protocol verdicts (signed, for the open round, right size, counts);
    provenance names their envelopes; the hash chain verifies."""
    secure = runs["secure"]
    verdicts = [e.body for e in secure["entries"] if e.event == "verdict"]
    assert len(verdicts) == HOSPITALS * ROUNDS
    assert all(v["accepted"] and "norm" not in v["scores"] for v in verdicts), verdicts
    digests = {e.subject for e in secure["entries"] if e.event == "verdict"}
    for e in secure["entries"]:
        if e.event == "model_published":
            assert set(e.body["updates"]) <= digests and len(e.body["updates"]) == HOSPITALS
    assert secure["verify"]["ok"], secure["verify"]
    assert runs["plain"]["verify"]["ok"]


def _byte_chi2(words: np.ndarray) -> float:
    counts = np.bincount(words.astype("<u4").view(np.uint8), minlength=256).astype(float)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_isolated_models_go_only_to_peer_hospitals_and_never_with_secagg(
    runs: dict[str, Any],
) -> None:
    """Plaintext run: each hospital seals its isolated model to its peers, never to the
    coordinator or validator; secure run: no isolated model is sent at all."""
    plain, secure = runs["plain"], runs["secure"]
    hospitals = {pid for pid, n in plain["names"].items() if n.startswith("hospital-")}
    sent = [inspect(e) for e in plain["captured"] if inspect(e).type == "isolated_model"]
    assert len(sent) == HOSPITALS
    for h in sent:
        assert set(h.recipients) == hospitals - {h.sender}, h
    assert not [e for e in secure["captured"] if inspect(e).type in ("isolated_model",
                                                                     "cross_eval_report")]
    (setup,) = [e for e in secure["entries"] if e.event == "setup_completed"]
    assert setup.body["cross_baselines"] is False
