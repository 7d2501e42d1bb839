"""Tests for the UCI heart-disease loader (real data, read from ../shared/data/heart)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from medimesh.data.heart import (
    CENTERS,
    COLUMNS,
    FILES,
    MD5,
    HeartDataError,
    HeartSite,
    default_data_dir,
    feature_names,
    flamby_split,
    kept_rows,
    load_all,
    load_center,
    read_raw,
    stratified_split,
    verify_checksum,
)

_DATA_DIR = default_data_dir()
if _DATA_DIR is None:
    pytest.skip(
        "UCI heart data not found at ../shared/data/heart (set MEDIMESH_HEART_DIR)",
        allow_module_level=True,
    )
if not _DATA_DIR.is_dir():
    pytest.fail(f"MEDIMESH_HEART_DIR={_DATA_DIR} is not a directory", pytrace=False)
DATA_DIR: Path = _DATA_DIR

KEPT_ROWS = {"cleveland": 303, "hungary": 261, "switzerland": 46, "va": 130}
SPLITS = {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16), "va": (85, 45)}


def _labels(center: str) -> np.ndarray:
    raw = read_raw(DATA_DIR / FILES[center])
    kept = raw[kept_rows(raw)]
    return (kept[:, COLUMNS.index("num")] > 0).astype(np.int64)


def _sklearn_flamby_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's own call, verbatim in its arguments."""
    levels = np.unique(y)
    stratify = y if len(levels) > 1 and all((y == lev).sum() > 2 for lev in levels) else None
    train, test = train_test_split(
        np.arange(len(y)),
        test_size=1.0 - 0.66,
        train_size=0.66,
        random_state=43,
        shuffle=True,
        stratify=stratify,
    )
    return np.asarray(train), np.asarray(test)


@pytest.fixture(scope="module")
def sites() -> dict[str, HeartSite]:
    """All four centers with FLamby preprocessing."""
    return {s.center: s for s in load_all(DATA_DIR)}


@pytest.fixture(scope="module")
def sites_missing() -> dict[str, HeartSite]:
    """All four centers with the chol-missing variant."""
    return {s.center: s for s in load_all(DATA_DIR, "flamby+missing")}


def _write_copy(tmp_path: Path, center: str, lines: list[str] | None = None) -> Path:
    src = DATA_DIR / FILES[center]
    dst = tmp_path / FILES[center]
    if lines is None:
        shutil.copyfile(src, dst)
    else:
        dst.write_text("".join(lines))
    return dst


def test_checksums_match_readme() -> None:
    """The shared files are the pinned FLamby versions."""
    for center in CENTERS:
        verify_checksum(DATA_DIR / FILES[center], center)
    assert set(MD5) == set(CENTERS) == set(FILES)


@pytest.mark.parametrize("center", CENTERS)
def test_rows_after_filtering(center: str) -> None:
    """FLamby's '?' filter keeps 303/261/46/130 rows."""
    assert len(_labels(center)) == KEPT_ROWS[center]


@pytest.mark.parametrize("center", CENTERS)
def test_split_counts(center: str, sites: dict[str, HeartSite]) -> None:
    """Per-center train/test sizes equal FLamby's 199/104, 172/89, 30/16, 85/45."""
    site = sites[center]
    assert (len(site.y_train), len(site.y_test)) == SPLITS[center]
    assert site.x_train.shape == (SPLITS[center][0], 13)
    assert site.x_test.shape == (SPLITS[center][1], 13)
    assert site.x_train.dtype == np.float64 and site.y_train.dtype == np.int64
    assert set(np.unique(np.concatenate([site.y_train, site.y_test]))) <= {0, 1}


@pytest.mark.parametrize("center", CENTERS)
def test_split_indices_identical_to_sklearn(center: str) -> None:
    """Our numpy split returns sklearn's train_test_split indices, in the same order."""
    y = _labels(center)
    train, test = flamby_split(y)
    ref_train, ref_test = _sklearn_flamby_split(y)
    np.testing.assert_array_equal(train, ref_train)
    np.testing.assert_array_equal(test, ref_test)


@pytest.mark.parametrize("center", CENTERS)
def test_site_rows_are_the_split_rows(center: str, sites: dict[str, HeartSite]) -> None:
    """HeartSite holds exactly sklearn's test rows, in file order as FLamby selects them."""
    y = _labels(center)
    _, ref_test = _sklearn_flamby_split(y)
    np.testing.assert_array_equal(sites[center].y_test, y[np.sort(ref_test)])
    raw = read_raw(DATA_DIR / FILES[center])
    kept = raw[kept_rows(raw)]
    age = kept[np.sort(ref_test), COLUMNS.index("age")]
    np.testing.assert_array_equal(sites[center].x_test[:, 0], age)


def test_switzerland_falls_back_to_unstratified() -> None:
    """Switzerland has one negative kept row, so FLamby cannot stratify it."""
    y = _labels("switzerland")
    assert int((y == 0).sum()) == 1
    with pytest.raises(ValueError):
        stratified_split(y, 0.34)


@pytest.mark.parametrize("seed", range(6))
def test_stratified_split_matches_sklearn_random(seed: int) -> None:
    """Random multi-class labels (ties in remainders included) split like sklearn."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.integers(0, 2 + seed % 3, size=n)
    y[:6] = np.arange(6) % (2 + seed % 3)  # at least two members per class
    for test_size, train_size in ((0.34, None), (1.0 - 0.66, 0.66), (0.25, 0.5)):
        ref_train, ref_test = train_test_split(
            np.arange(n),
            test_size=test_size,
            train_size=train_size,
            random_state=43,
            stratify=y,
        )
        train, test = stratified_split(y, test_size, train_size, random_state=43)
        np.testing.assert_array_equal(train, ref_train)
        np.testing.assert_array_equal(test, ref_test)


def test_feature_names() -> None:
    """FLamby gives 13 features in get_dummies order; the variant appends chol_missing."""
    names = feature_names()
    assert names == (
        "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
        "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
    )  # fmt: skip
    assert feature_names("flamby+missing") == (*names, "chol_missing")
    with pytest.raises(ValueError):
        feature_names("nope")


def test_dummy_levels_are_union_of_centers() -> None:
    """cp and restecg levels over the four kept sets are {1..4} and {0..2}."""
    kept = [read_raw(DATA_DIR / FILES[c]) for c in CENTERS]
    rows = np.vstack([r[kept_rows(r)] for r in kept])
    assert set(np.unique(rows[:, COLUMNS.index("cp")])) == {1.0, 2.0, 3.0, 4.0}
    assert set(np.unique(rows[:, COLUMNS.index("restecg")])) == {0.0, 1.0, 2.0}


def test_one_hot_consistent(sites: dict[str, HeartSite]) -> None:
    """Each row has at most one cp and one restecg dummy set, values 0/1."""
    cp = slice(8, 11)
    ecg = slice(11, 13)
    for site in sites.values():
        x = np.vstack([site.x_train, site.x_test])
        assert set(np.unique(x[:, 8:13])) <= {0.0, 1.0}
        assert (x[:, cp].sum(axis=1) <= 1).all()
        assert (x[:, ecg].sum(axis=1) <= 1).all()
        assert not np.isnan(x).any()


def test_label_balance_matches_readme(sites: dict[str, HeartSite]) -> None:
    """Label skew: Switzerland almost all positive (45/46 kept), VA ~78%, Cleveland ~46%."""
    rate = {c: float(np.concatenate([s.y_train, s.y_test]).mean()) for c, s in sites.items()}
    assert rate["switzerland"] == pytest.approx(45 / 46)
    assert rate["switzerland"] > 0.93
    assert rate["va"] == pytest.approx(101 / 130)
    assert rate["cleveland"] == pytest.approx(139 / 303)
    assert rate["hungary"] == pytest.approx(98 / 261)


def test_checksum_mismatch_refused(tmp_path: Path) -> None:
    """A one-byte change is refused, naming the file and both hashes."""
    dst = _write_copy(tmp_path, "va")
    data = bytearray(dst.read_bytes())
    data[0] = ord("7") if data[0] != ord("7") else ord("8")
    dst.write_bytes(bytes(data))
    with pytest.raises(HeartDataError) as info:
        load_center(tmp_path, "va")
    msg = str(info.value)
    assert FILES["va"] in msg and MD5["va"] in msg and "mismatch" in msg


def test_missing_file_named(tmp_path: Path) -> None:
    """An absent file gives a HeartDataError naming it."""
    with pytest.raises(HeartDataError, match=r"processed\.cleveland\.data"):
        load_center(tmp_path, "cleveland")


def test_malformed_line_names_line_and_column(tmp_path: Path) -> None:
    """A non-numeric value reports file, line and column."""
    lines = (DATA_DIR / FILES["hungary"]).read_text().splitlines(keepends=True)
    fields = lines[4].rstrip("\n").split(",")
    fields[3] = "12x"
    lines[4] = ",".join(fields) + "\n"
    _write_copy(tmp_path, "hungary", lines)
    with pytest.raises(HeartDataError) as info:
        load_center(tmp_path, "hungary", verify=False)
    msg = str(info.value)
    assert FILES["hungary"] in msg and "line 5" in msg and "column 4 (trestbps)" in msg


def test_wrong_field_count_names_line(tmp_path: Path) -> None:
    """A truncated line reports its line number and the field count."""
    lines = (DATA_DIR / FILES["va"]).read_text().splitlines(keepends=True)
    lines[9] = ",".join(lines[9].split(",")[:10]) + "\n"
    _write_copy(tmp_path, "va", lines)
    with pytest.raises(HeartDataError, match=r"line 10: expected 14 .* found 10"):
        load_center(tmp_path, "va", verify=False)


def test_out_of_range_category_refused(tmp_path: Path) -> None:
    """An unknown chest-pain code would be silently dropped by one-hot, so it is an error."""
    lines = (DATA_DIR / FILES["cleveland"]).read_text().splitlines(keepends=True)
    fields = lines[0].split(",")
    fields[2] = "5.0"
    lines[0] = ",".join(fields)
    _write_copy(tmp_path, "cleveland", lines)
    with pytest.raises(HeartDataError, match=r"line 1, column 3 \(cp\)"):
        load_center(tmp_path, "cleveland", verify=False)


def test_unknown_center_and_preprocessing() -> None:
    """Bad arguments fail with ValueError, not a KeyError traceback."""
    with pytest.raises(HeartDataError, match="unknown center"):
        load_center(DATA_DIR, "hungarian")
    with pytest.raises(ValueError, match="unknown preprocessing"):
        load_center(DATA_DIR, "va", preprocessing="raw")


def test_chol_missing_variant(
    sites: dict[str, HeartSite], sites_missing: dict[str, HeartSite]
) -> None:
    """chol == 0 becomes NaN with an indicator; rows, split and other columns unchanged."""
    chol = feature_names().index("chol")
    trestbps = feature_names().index("trestbps")
    expected_missing = {"cleveland": 0, "hungary": 0, "switzerland": 46, "va": 33}
    for center in CENTERS:
        a, b = sites[center], sites_missing[center]
        np.testing.assert_array_equal(a.y_train, b.y_train)
        np.testing.assert_array_equal(a.y_test, b.y_test)
        for xa, xb in ((a.x_train, b.x_train), (a.x_test, b.x_test)):
            assert xb.shape[1] == 14
            zero = xa[:, chol] == 0
            np.testing.assert_array_equal(np.isnan(xb[:, chol]), zero)
            np.testing.assert_array_equal(xb[:, -1], zero.astype(np.float64))
            other = [i for i in range(13) if i not in (chol, trestbps)]
            np.testing.assert_array_equal(xa[:, other], xb[:, other])
            np.testing.assert_array_equal(np.isnan(xb[:, trestbps]), xa[:, trestbps] == 0)
        n_missing = int(b.x_train[:, -1].sum() + b.x_test[:, -1].sum())
        assert n_missing == expected_missing[center]
    va = sites_missing["va"]
    assert int(np.isnan(np.vstack([va.x_train, va.x_test])[:, trestbps]).sum()) == 1


def test_default_data_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """MEDIMESH_HEART_DIR takes precedence over the relative lookup."""
    monkeypatch.setenv("MEDIMESH_HEART_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("MEDIMESH_HEART_DIR")
    found = default_data_dir()
    assert found is None or (found / FILES["cleveland"]).is_file()
