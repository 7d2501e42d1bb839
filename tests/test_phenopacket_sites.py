"""A consortium of phenopacket directories trains, evaluates and is queried end to end.

The phenopackets are written by the ``phenopackets`` library itself (``Phenopacket`` objects
built by :func:`medimesh.phenopackets.to_phenopacket`, ``MessageToJson``) from synthetic
rare-cohort patients, with excluded features, unknown terms, OMIM ids, an unmappable disease
and an unreadable file mixed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict, MessageToJson

from medimesh.bench.oracle import publish_model, request_from_row
from medimesh.data import cohort
from medimesh.phenopackets import ASSAY_PREFIX, to_phenopacket

ROOT = Path(__file__).resolve().parents[1]
SITES = ("north", "south", "east")
UNKNOWN = "HP:9999999"  # not an HPO term at all
OMIM = {"Fabry disease": "OMIM:301500", "Wilson disease": "OMIM:277900"}
OTHER_CODE = "MONDO:0000001"  # "disease": mapped to "Other / none of these" below

pytestmark = pytest.mark.ray


def _medimesh(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "medimesh.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False,
    )


def phenopacket_for(
    pid: str, body: dict[str, Any], disease: str, excluded: list[str], unknown: bool
) -> Any:
    """One synthetic patient, plus extra excluded terms and maybe a term HPO does not know."""
    noisy = {**body,
             "symptoms": [*body["symptoms"], *([UNKNOWN] if unknown else [])],
             "excluded_symptoms": list(dict.fromkeys([*body.get("excluded_symptoms", []),
                                                      *excluded]))}
    return to_phenopacket(pid, noisy, disease)


def _codes_for(classes: tuple[str, ...]) -> dict[str, str]:
    panel = cohort.load_panel()["diseases"]
    return {d["short_name"]: d["orpha_id"] for d in panel} | {classes[-1]: OTHER_CODE}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three training sites and one held-out site of phenopacket files, plus the mapping."""
    out = tmp_path_factory.mktemp("phenopackets")
    feats = cohort.features()
    classes = cohort.class_names()
    symptoms = [f.name for f in feats if f.name.startswith("HP:")]
    code = _codes_for(classes)
    rng = np.random.default_rng(7)
    cfg = cohort.CohortConfig(n_hospitals=4, seed=5, min_site_size=80, max_site_size=140)
    written: dict[str, int] = {}
    for i, name in enumerate((*SITES, "heldout")):
        site = cohort.make_site(cfg, i)
        folder = out / name
        folder.mkdir()
        rows = np.vstack([site.x_train, site.x_test])
        ys = np.concatenate([site.y_train, site.y_test])
        for j, (row, y) in enumerate(zip(rows, ys, strict=True)):
            body = request_from_row(row, feats)
            cls = classes[int(y)]
            disease = OMIM[cls] if cls in OMIM and j % 2 else code[cls]
            absent = [t for t in symptoms
                      if t not in body["symptoms"] and t not in body["excluded_symptoms"]]
            excluded = [str(t) for t in rng.choice(absent, size=2, replace=False)]
            pp = phenopacket_for(f"{name}-{j}", body, disease, excluded, unknown=j % 10 == 0)
            (folder / f"{name}-{j:04d}.json").write_text(MessageToJson(pp))
        written[name] = len(ys)
    # One file per site the consortium cannot use: a disease outside the mapping ...
    stray = phenopacket_for("stray", {"symptoms": [symptoms[0]], "biomarkers": {}, "genes": []},
                            "OMIM:999999", [], unknown=False)
    (out / "north" / "stray.json").write_text(MessageToJson(stray))
    # ... and a file that is not a phenopacket.
    (out / "south" / "broken.json").write_text('{"id": "broken", "subject": {"sex": "BOTH"}}')
    mapping = {
        "label_codes": {OMIM["Fabry disease"]: "Fabry disease",
                        OMIM["Wilson disease"]: "Wilson disease",
                        OTHER_CODE: classes[-1]},
        "assay_codes": {f"{ASSAY_PREFIX}{f.name}": f.name for f in feats
                        if f.kind == "lognormal"},
    }
    (out / "codes.json").write_text(json.dumps(mapping))
    return {"dir": out, "written": written, "mapping": mapping}


@pytest.fixture(scope="module")
def trained(consortium: dict[str, Any], ray_session: None) -> dict[str, Any]:
    """`medimesh train --site NAME=DIR …` on the session's real Ray, a short run."""
    from medimesh.cli import build_parser

    d = consortium["dir"]
    sites = [a for s in SITES for a in ("--site", f"{s}={d / s}")]
    args = build_parser().parse_args([
        "train", *sites, "--label-codes", str(d / "codes.json"), "--rounds", "5",
        "--out", str(d / "model"), "--json",
    ])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return dict(json.loads(out.getvalue()))


def _evaluate_in_process(*argv: str) -> dict[str, Any]:
    """`medimesh evaluate … --json` in this process (no Ray needed); its JSON answer."""
    from medimesh.cli import build_parser

    args = build_parser().parse_args(["evaluate", *argv, "--json"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return dict(json.loads(out.getvalue()))


def test_train_reads_each_directory_inside_its_hospital_and_reports_counts(
    consortium: dict[str, Any], trained: dict[str, Any]
) -> None:
    """Every file is accounted for: used, or skipped with a reason; the bad file is named."""
    by_name = {s["name"]: s["phenopackets"] for s in trained["sites"]}
    assert set(by_name) == set(SITES)
    written = consortium["written"]
    north, south, east = by_name["north"], by_name["south"], by_name["east"]
    assert north["files_read"] == written["north"] + 1
    assert north["skipped"] == {"unmappable disease": 1}
    assert south["skipped"] == {"malformed": 1} and south["malformed_files"] == ["broken.json"]
    assert east["skipped"] == {} and east["used"] == written["east"]
    for r in by_name.values():
        assert r["unknown_terms"] >= 1
    used = sum(r["used"] for r in by_name.values())
    assert used == sum(s["n_train"] + s["n_test"] for s in trained["sites"])
    assert trained["rounds"][-1]["top3"] > 0.6, trained["rounds"][-1]


def test_evaluate_scores_a_directory_of_phenopackets(
    consortium: dict[str, Any], trained: dict[str, Any]
) -> None:
    """`evaluate --phenopackets` on a held-out site: top-1/top-3 and the skip counts."""
    d = consortium["dir"]
    out = _medimesh("evaluate", "--model", str(d / "model"), "--phenopackets", str(d / "heldout"),
                    "--label-codes", str(d / "codes.json"), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["model_hash"] == trained["model_hash"]
    assert result["n"] == consortium["written"]["heldout"] == result["report"]["used"]
    assert result["top3"] > 0.6 and result["top3"] >= result["top1"] > 3 / 11, result
    missing = _medimesh("evaluate", "--model", str(d / "model"), "--phenopackets",
                        str(d / "south"), "--json")  # no mapping: OMIM ids are unmappable
    assert missing.returncode == 0, missing.stderr[-2000:]
    report = json.loads(missing.stdout)["report"]
    assert report["skipped"]["unmappable disease"] > 0 and report["skipped"]["malformed"] == 1


def test_the_live_oracle_diagnoses_a_phenopacket(
    consortium: dict[str, Any], trained: dict[str, Any], url: str,
    serve_app: Callable[[Any], AbstractContextManager[str]],
) -> None:
    """POST /diagnose/phenopacket (SDK and raw JSON) answers as the saved model does."""
    from medimesh.actors.oracle import OracleConfig, build_app
    from medimesh.client import Client, ValidationFailed
    from medimesh.diagnosis import DiagnosisEngine
    from medimesh.hpo import HpoAncestors
    from medimesh.modelfile import load_model
    from medimesh.phenopackets import convert, load_label_codes, read_phenopacket
    from medimesh.store import Store

    d = consortium["dir"]
    saved = load_model(d / "model")

    async def publish() -> None:
        async with await Store.open(url) as store:
            await publish_model(store, saved.model, saved.mean, saved.std, 1)

    asyncio.run(publish())
    files = sorted((d / "heldout").glob("*.json"))
    packet = read_phenopacket(files[0])  # has the unknown term (j == 0)
    local = DiagnosisEngine(saved, cohort.features(), HpoAncestors.load()).diagnose(
        convert(packet, load_label_codes(consortium["mapping"])).request
    )
    app = build_app(OracleConfig(url, poll_interval=0.5, label_codes=consortium["mapping"]))
    with serve_app(app) as base, Client(base, timeout=10.0) as client:
        assert client.ready().ready
        answer = client.diagnose_phenopacket(packet)
        assert answer.model_hash == saved.model_hash
        assert UNKNOWN in answer.unknown_terms
        assert [c.name for c in answer.differential] == [c.name for c in local.differential]
        np.testing.assert_allclose([c.probability for c in answer.differential],
                                   [c.probability for c in local.differential], rtol=1e-6)
        doc = MessageToDict(packet)
        raw = httpx.post(f"{base}/diagnose/phenopacket", json={**doc, "notAPhenopacketField": 1})
        assert raw.status_code == 200, raw.text  # fields MediMesh does not read are ignored
        assert raw.json()["phenopacket"]["id"] == packet.id
        assert [(c["name"], c["probability"]) for c in raw.json()["differential"]] == [
            (c.name, c.probability) for c in answer.differential
        ]
        with pytest.raises(ValidationFailed) as bad:
            client.diagnose_phenopacket({"subject": {"sex": "BOTH"}})
        assert bad.value.field == "subject.sex"
        # `evaluate --api`: the served model scores the held-out directory as the saved one does
        served, local_eval = (
            _evaluate_in_process(*how, "--phenopackets", str(d / "heldout"),
                                 "--label-codes", str(d / "codes.json"))
            for how in (("--api", base), ("--model", str(d / "model")))
        )
        assert served["model_hash"] == saved.model_hash
        assert served["report"] == local_eval["report"]
        for key in ("n", "top1", "top3", "per_class_recall"):
            assert served[key] == pytest.approx(local_eval[key]), key


def test_a_csv_spec_consortium_mixes_csv_sites_and_phenopacket_directories(
    consortium: dict[str, Any], ray_session: None
) -> None:
    """With --spec, phenopacket directories land in the spec's columns next to a CSV site."""
    from medimesh.actors.runtime import Consortium, RunConfig
    from medimesh.data.cohort import load_panel
    from medimesh.model import TrainConfig

    d = consortium["dir"]
    feats = cohort.features()
    classes = list(cohort.class_names())
    terms = [f.name for f in feats if f.name.startswith("HP:")]
    genes = [f.name[5:] for f in feats if f.name.startswith("gene:")]
    spec = {
        "label": "diagnosis",
        "classes": classes,
        "features": [
            {"name": "hpo", "type": "codes", "vocabulary": terms, "excluded_column": "absent"},
            {"name": "genes", "type": "codes", "vocabulary": genes},
            {"name": "onset", "type": "numeric", "unit": "years"},
            {"name": "sex", "type": "categorical", "levels": ["F", "M"]},
        ],
    }
    mapping = {
        "label_codes": {**{dd["orpha_id"]: dd["short_name"] for dd in load_panel()["diseases"]},
                        **consortium["mapping"]["label_codes"]},
        "spec_columns": {"symptoms": "hpo", "genes": "genes", "age": "onset", "sex": "sex"},
    }
    site = cohort.make_site(cohort.CohortConfig(n_hospitals=4, seed=5, min_site_size=80,
                                                max_site_size=140), 2)
    lines = ["diagnosis,hpo,absent,genes,onset,sex"]
    for row, y in zip(np.vstack([site.x_train, site.x_test]),
                      np.concatenate([site.y_train, site.y_test]), strict=True):
        b = request_from_row(row, feats)
        age = f"{min(b['age'], 90.0)!r}" if "age" in b else ""
        lines.append(",".join([classes[int(y)], "|".join(b["symptoms"]),
                               "|".join(b["excluded_symptoms"]), "|".join(b["genes"]), age,
                               b.get("sex", "")]))
    (d / "east.csv").write_text("\n".join(lines) + "\n")
    cfg = RunConfig(dataset="csv", spec=spec, label_codes=mapping, rounds=3,
                    csv_sites=(("north", str(d / "north")), ("south", str(d / "south")),
                               ("east", str(d / "east.csv"))),
                    train=TrainConfig(epochs=10))
    fed = Consortium(cfg)
    try:
        fed.start()
        history = fed.run()
        info = {s["name"]: s for s in fed.hospital_info}
    finally:
        fed.shutdown()
    assert info["north"]["phenopackets"]["skipped"] == {"unmappable disease": 1}
    assert info["south"]["phenopackets"]["malformed_files"] == ["broken.json"]
    assert "phenopackets" not in info["east"] and info["east"]["skipped_rows"] == 0
    assert fed.info.feature_names[:len(terms)] == tuple(terms)
    assert history[-1]["top3"] > 0.6, history[-1]
