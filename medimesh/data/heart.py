"""UCI Heart Disease (four centers) loader reproducing FLamby's Fed-Heart-Disease split.

The raw files are real patient records (Janosi et al. 1988, doi:10.24432/C52P4X, CC BY 4.0).
They live outside the repository and are read by path, never copied. This module is numpy
only because it runs inside Ray actors, where importing pandas/sklearn per hospital is slow
and pulls heavy dependencies; the stratified split is therefore re-implemented here,
draw-for-draw identical to scikit-learn's ``train_test_split`` so that each center's test
rows are exactly FLamby's and results stay comparable with the published benchmark.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "CENTERS",
    "CLASS_NAMES",
    "COLUMNS",
    "FILES",
    "MD5",
    "PREPROCESSINGS",
    "HeartDataError",
    "HeartSite",
    "default_data_dir",
    "export_csv",
    "feature_names",
    "flamby_split",
    "kept_rows",
    "load_all",
    "load_center",
    "read_raw",
    "shuffle_split",
    "spec_dict",
    "stratified_split",
    "verify_checksum",
]

CENTERS: tuple[str, ...] = ("cleveland", "hungary", "switzerland", "va")
CLASS_NAMES: tuple[str, ...] = ("no disease", "disease")

FILES: dict[str, str] = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}

# Identical to the hashes FLamby's downloader pins: a silently edited file would make our
# numbers incomparable with theirs, so loading refuses anything else by default.
MD5: dict[str, str] = {
    "cleveland": "2d91a8ff69cfd9616aa47b59d6f843db",
    "hungary": "22e96bee155b5973568101c93b3705f6",
    "switzerland": "9a87f7577310b3917730d06ba9349e20",
    "va": "4249d03ca7711e84f4444768c9426170",
}

COLUMNS: tuple[str, ...] = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip

PREPROCESSINGS: tuple[str, ...] = ("flamby", "flamby+missing")

_ENV_VAR: Final = "MEDIMESH_HEART_DIR"
_RELATIVE_DIR: Final = Path("..") / "shared" / "data" / "heart"

# FLamby drops slope, ca, thal (mostly missing outside Cleveland) before dropping '?' rows.
_DROPPED: Final = frozenset({"slope", "ca", "thal"})
_KEPT: Final = tuple(c for c in COLUMNS[:-1] if c not in _DROPPED)
# pandas.get_dummies(columns=[cp, restecg], drop_first=True) over the union of the four
# centers' levels: the remaining columns keep their order, dummies are appended, and the
# lowest level of each is dropped. The levels below are that union (checked in the tests).
_CATEGORICAL: Final[dict[str, tuple[float, ...]]] = {
    "cp": (1.0, 2.0, 3.0, 4.0),
    "restecg": (0.0, 1.0, 2.0),
}
_BINARY: Final = ("sex", "fbs", "exang")
_LABEL_LEVELS: Final = (0.0, 1.0, 2.0, 3.0, 4.0)
# FLamby: ``train_fraction = 0.66`` and ``test_size = 1.0 - train_fraction`` (both passed).
_FLAMBY_TRAIN_FRACTION: Final = 0.66
_FLAMBY_SEED: Final = 43
# FLamby only stratifies when every class has more than this many members.
_FLAMBY_MIN_CLASS: Final = 2

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class HeartDataError(ValueError):
    """Raised for a missing, altered or malformed data file, with the file (and line) named."""


def default_data_dir() -> Path | None:
    """Locate the shared heart data without copying it into the repository.

    ``$MEDIMESH_HEART_DIR`` wins when set (returned even if it does not exist, so a typo
    fails loudly in ``load_center`` instead of silently skipping tests); otherwise
    ``../shared/data/heart`` relative to the working directory, then relative to the
    repository root (the parent of the ``medimesh`` package). ``None`` if none exists.
    """
    env = os.environ.get(_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), repo_root):
        candidate = (base / _RELATIVE_DIR).resolve()
        if candidate.is_dir():
            return candidate
    return None


def _check_center(center: str) -> None:
    if center not in FILES:
        raise HeartDataError(f"unknown center {center!r}; expected one of {CENTERS}")


def _check_preprocessing(preprocessing: str) -> None:
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(
            f"unknown preprocessing {preprocessing!r}; expected one of {PREPROCESSINGS}"
        )


def verify_checksum(path: Path, center: str) -> None:
    """Refuse a file whose MD5 differs from the published one, so results stay comparable."""
    _check_center(center)
    try:
        digest = hashlib.md5(Path(path).read_bytes(), usedforsecurity=False).hexdigest()
    except OSError as exc:
        raise HeartDataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    expected = MD5[center]
    if digest != expected:
        raise HeartDataError(
            f"{path}: MD5 mismatch for center {center!r}: expected {expected}, got {digest}"
        )


def feature_names(preprocessing: str = "flamby") -> tuple[str, ...]:
    """Column names of ``HeartSite.x_*`` in order (FLamby's get_dummies order).

    ``flamby`` gives FLamby's 13 features; ``flamby+missing`` appends ``chol_missing`` so
    the first 13 columns stay aligned with FLamby.
    """
    _check_preprocessing(preprocessing)
    plain = tuple(c for c in _KEPT if c not in _CATEGORICAL)
    dummies = tuple(
        f"{name}_{int(level)}" for name, levels in _CATEGORICAL.items() for level in levels[1:]
    )
    names = plain + dummies
    if preprocessing == "flamby+missing":
        names += ("chol_missing",)
    return names


def read_raw(path: Path) -> FloatArray:
    """Parse one ``processed.*.data`` file into an (n, 14) float64 array, ``?`` -> NaN.

    Strict on purpose: anything but a finite number or ``?`` is an error naming file, line
    and column, because a silently mis-read value would corrupt a federated model.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HeartDataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        bad_line = data[: exc.start].count(b"\n") + 1
        raise HeartDataError(f"{path}, line {bad_line}: non-ASCII byte in data file") from exc
    rows: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # pandas.read_csv skips blank lines too
        fields = line.split(",")
        if len(fields) != len(COLUMNS):
            raise HeartDataError(
                f"{path}, line {lineno}: expected {len(COLUMNS)} comma-separated values, "
                f"found {len(fields)}"
            )
        row: list[float] = []
        for col, (name, raw) in enumerate(zip(COLUMNS, fields, strict=True), start=1):
            field = raw.strip()
            if field == "?":
                row.append(math.nan)
                continue
            try:
                value = float(field)
            except ValueError:
                value = math.nan
                ok = False
            else:
                ok = math.isfinite(value)
            if not ok:
                raise HeartDataError(
                    f"{path}, line {lineno}, column {col} ({name}): "
                    f"expected a number or '?', got {field!r}"
                )
            _check_level(path, lineno, col, name, value)
            row.append(value)
        rows.append(row)
    if not rows:
        raise HeartDataError(f"{path}: no data rows")
    return np.asarray(rows, dtype=np.float64)


def _check_level(path: Path, lineno: int, col: int, name: str, value: float) -> None:
    """Reject codes outside the documented levels: one-hot encoding would silently drop them."""
    if name in _CATEGORICAL:
        allowed: tuple[float, ...] = _CATEGORICAL[name]
    elif name in _BINARY:
        allowed = (0.0, 1.0)
    elif name == "num":
        allowed = _LABEL_LEVELS
    else:
        return
    if value not in allowed:
        raise HeartDataError(
            f"{path}, line {lineno}, column {col} ({name}): value {value:g} not in "
            f"{[int(a) for a in allowed]}"
        )


def kept_rows(raw: FloatArray) -> npt.NDArray[np.bool_]:
    """FLamby's row filter: keep rows with no ``?`` outside slope, ca, thal."""
    used = [COLUMNS.index(c) for c in (*_KEPT, "num")]
    return np.asarray(~np.isnan(raw[:, used]).any(axis=1), dtype=np.bool_)


def _split_sizes(n: int, test_size: float, train_size: float | None) -> tuple[int, int]:
    """sklearn's ``_validate_shuffle_split`` for float fractions: ceil test, floor train."""
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    n_test = math.ceil(test_size * n)
    if train_size is None:
        n_train = n - n_test
    else:
        if not 0.0 < train_size < 1.0 or train_size + test_size > 1.0:
            raise ValueError(f"invalid train_size={train_size} for test_size={test_size}")
        n_train = math.floor(train_size * n)
    if n_train <= 0 or n_test <= 0 or n_train + n_test > n:
        raise ValueError(f"cannot split {n} samples into {n_train} train / {n_test} test")
    return n_train, n_test


def shuffle_split(
    n: int, test_size: float, train_size: float | None = None, random_state: int = 43
) -> tuple[IntArray, IntArray]:
    """Unstratified split, identical to ``train_test_split(np.arange(n), ...)`` in sklearn."""
    n_train, n_test = _split_sizes(n, test_size, train_size)
    rng = np.random.RandomState(random_state)
    perm = rng.permutation(n).astype(np.int64)
    return perm[n_test : n_test + n_train], perm[:n_test]


def _approximate_mode(class_counts: IntArray, n_draws: int, rng: np.random.RandomState) -> IntArray:
    """sklearn's ``_approximate_mode``, kept draw-for-draw so the RNG stream matches."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    result: IntArray = floored.astype(np.int64)
    return result


def stratified_split(
    y: npt.ArrayLike,
    test_size: float,
    train_size: float | None = None,
    random_state: int = 43,
) -> tuple[IntArray, IntArray]:
    """Stratified split returning (train, test) indices exactly as sklearn would.

    Mirrors ``train_test_split(np.arange(len(y)), stratify=y, ...)`` (i.e.
    ``StratifiedShuffleSplit``) with numpy's legacy ``RandomState``, including the order of
    the returned indices, so FLamby's test rows are reproduced without importing sklearn.
    """
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError("y must be one-dimensional")
    n = labels.shape[0]
    n_train, n_test = _split_sizes(n, test_size, train_size)
    classes, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise ValueError("every class needs at least 2 members to stratify")
    if n_train < len(classes) or n_test < len(classes):
        raise ValueError("train and test sets must each hold at least one row per class")
    class_counts = class_counts.astype(np.int64)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(random_state)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        permutation = rng.permutation(int(class_counts[i]))
        members = class_indices[i].take(permutation, mode="clip")
        train.extend(members[: n_i[i]].tolist())
        test.extend(members[n_i[i] : n_i[i] + t_i[i]].tolist())
    return (
        rng.permutation(np.asarray(train, dtype=np.int64)),
        rng.permutation(np.asarray(test, dtype=np.int64)),
    )


def flamby_split(y: npt.ArrayLike) -> tuple[IntArray, IntArray]:
    """FLamby's per-center split: 66/34, seed 43, stratified only if each class has > 2 rows.

    Switzerland keeps a single negative row, so FLamby (and we) fall back to an unstratified
    shuffle there; that is what yields its 30/16 split.
    """
    labels = np.asarray(y)
    test_size = 1.0 - _FLAMBY_TRAIN_FRACTION
    _, counts = np.unique(labels, return_counts=True)
    if len(counts) > 1 and bool((counts > _FLAMBY_MIN_CLASS).all()):
        return stratified_split(labels, test_size, _FLAMBY_TRAIN_FRACTION, _FLAMBY_SEED)
    return shuffle_split(len(labels), test_size, _FLAMBY_TRAIN_FRACTION, _FLAMBY_SEED)


def _features(kept: FloatArray, preprocessing: str) -> FloatArray:
    """Build the feature matrix from FLamby-filtered raw rows (see ``load_center``)."""
    col = {name: kept[:, COLUMNS.index(name)] for name in COLUMNS}
    chol_missing = col["chol"] == 0.0
    with_missing = preprocessing == "flamby+missing"
    if with_missing:
        col["chol"] = np.where(chol_missing, np.nan, col["chol"])
        col["trestbps"] = np.where(col["trestbps"] == 0.0, np.nan, col["trestbps"])
    parts = [col[c] for c in _KEPT if c not in _CATEGORICAL]
    for name, levels in _CATEGORICAL.items():
        parts.extend((col[name] == level).astype(np.float64) for level in levels[1:])
    if with_missing:
        parts.append(chol_missing.astype(np.float64))
    return np.column_stack(parts).astype(np.float64)


@dataclass(frozen=True, eq=False)
class HeartSite:
    """One hospital's FLamby train/test data; rows in original file order.

    ``eq=False``: field-wise equality of numpy arrays is ambiguous, so identity is used.
    """

    center: str
    x_train: FloatArray  # float64 (n, d), NaN = missing
    y_train: IntArray  # int64 0/1 (1 = num > 0)
    x_test: FloatArray
    y_test: IntArray

    def __post_init__(self) -> None:
        if self.x_train.shape[0] != self.y_train.shape[0]:
            raise ValueError("x_train and y_train lengths differ")
        if self.x_test.shape[0] != self.y_test.shape[0]:
            raise ValueError("x_test and y_test lengths differ")
        if self.x_train.ndim != 2 or self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise ValueError("x_train and x_test must be 2-D with the same columns")

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return int(self.x_train.shape[1])


def load_center(
    data_dir: Path, center: str, preprocessing: str = "flamby", verify: bool = True
) -> HeartSite:
    """Load one center with FLamby's Fed-Heart-Disease preprocessing.

    ``flamby``: drop slope/ca/thal, drop rows still holding ``?`` (303/261/46/130 left),
    label ``num > 0``, one-hot cp and restecg without their first level (13 features),
    FLamby's seed-43 66/34 split (199/104, 172/89, 30/16, 85/45). Features are not
    standardised: normalisation statistics are a federated concern.

    ``flamby+missing``: same rows and split (so numbers stay comparable), but ``chol == 0``
    (every Swiss row, 33 kept VA rows: missing coded as zero, not a real cholesterol) becomes
    NaN plus a ``chol_missing`` indicator column, so imputation uses the federated mean
    instead of learning "chol = 0" as a Switzerland marker. The one kept ``trestbps == 0``
    (VA) likewise becomes NaN; it gets no indicator because a column that is 1 in a single
    row of 740 carries no learnable signal.
    """
    _check_center(center)
    _check_preprocessing(preprocessing)
    path = Path(data_dir) / FILES[center]
    if not path.is_file():
        raise HeartDataError(f"{path}: data file for center {center!r} not found")
    if verify:
        verify_checksum(path, center)
    raw = read_raw(path)
    kept = raw[kept_rows(raw)]
    y = (kept[:, COLUMNS.index("num")] > 0).astype(np.int64)
    x = _features(kept, preprocessing)
    train_idx, test_idx = flamby_split(y)
    # FLamby marks rows train/test then selects them in file order; sort to match.
    train_idx = np.sort(train_idx)
    test_idx = np.sort(test_idx)
    return HeartSite(
        center=center,
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
    )


def load_all(
    data_dir: Path, preprocessing: str = "flamby", verify: bool = True
) -> tuple[HeartSite, ...]:
    """All four centers in ``CENTERS`` order (FLamby's center ids 0..3)."""
    return tuple(load_center(data_dir, c, preprocessing, verify) for c in CENTERS)


def spec_dict(preprocessing: str = "flamby+missing") -> dict[str, Any]:
    """The feature spec that reads the centres as CSV (``export_csv``), and that a model
    trained with ``--dataset heart`` is saved with, so ``medimesh evaluate`` scores those files.
    Every column is numeric and standardized (indicators too), exactly as the heart sites are."""
    return {
        "label": "label",
        "classes": list(CLASS_NAMES),
        "features": [{"name": n, "type": "numeric"} for n in feature_names(preprocessing)],
    }


def export_csv(
    out_dir: Path, data_dir: Path | None = None, preprocessing: str = "flamby+missing"
) -> tuple[Path, tuple[tuple[str, Path], ...], tuple[int, ...]]:
    """Write the four centres as CSV sites (``CENTER.csv``: FLamby's train rows, then its test
    rows) plus ``spec.json``, for ``medimesh train --spec … --site CENTER=…``.

    Returns (spec path, (centre, path) per site, rows per site). Missing values (``chol`` and
    ``trestbps`` coded 0) are written as empty cells, which the spec reads as missing. The
    rows are the centre's own; nothing is pooled.
    """
    import csv
    import json

    data_dir = data_dir or default_data_dir()
    if data_dir is None:
        raise HeartDataError("heart data not found: pass --data-dir (../shared/data/heart)")
    names = feature_names(preprocessing)
    # Read and check every centre before writing anything: a missing file leaves no half set.
    centres = [load_center(Path(data_dir), c, preprocessing) for c in CENTERS]
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec_dict(preprocessing), indent=1) + "\n", encoding="utf-8")
    sites: list[tuple[str, Path]] = []
    rows: list[int] = []
    for center, s in zip(CENTERS, centres, strict=True):
        x = np.vstack([s.x_train, s.x_test])
        y = np.concatenate([s.y_train, s.y_test])
        path = out_dir / f"{center}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow([*names, "label"])
            for row, label in zip(x, y, strict=True):
                w.writerow(["" if np.isnan(v) else repr(float(v)) for v in row]
                           + [CLASS_NAMES[int(label)]])
        sites.append((center, path))
        rows.append(len(y))
    return spec_path, tuple(sites), tuple(rows)
