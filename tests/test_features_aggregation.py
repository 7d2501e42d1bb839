"""Federated standardization and aggregation rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from medimesh.aggregation import fedavg, flatten, unflatten
from medimesh.errors import ConfigError
from medimesh.features import combine_stats, local_stats, log_transform


def test_federated_standardization_equals_pooled_statistics() -> None:
    """Sums of per-site sums give exactly the pooled mean and std, missing values excluded."""
    rng = np.random.default_rng(0)
    sites = [rng.normal(loc=i, size=(20 + 7 * i, 4)) for i in range(3)]
    sites[1][3, 2] = np.nan
    ys = [rng.integers(0, 3, len(s)) for s in sites]
    std, prior = combine_stats([local_stats(x, y, 3) for x, y in zip(sites, ys, strict=True)])
    pooled = np.vstack(sites)
    assert np.allclose(std.mean, np.nanmean(pooled, axis=0))
    assert np.allclose(std.std, np.nanstd(pooled, axis=0))
    counts = np.bincount(np.concatenate(ys), minlength=3)
    assert np.allclose(prior, (counts + 1) / (counts.sum() + 3))


def test_missing_values_become_the_global_mean() -> None:
    """NaN standardizes to 0 (the global mean); constant columns do not divide by zero."""
    x = np.array([[1.0, 5.0], [np.nan, 5.0], [3.0, 5.0]])
    std, _ = combine_stats([local_stats(x, np.array([0, 1, 0]), 2)])
    z = std.apply(x)
    assert z[1, 0] == 0.0 and np.isfinite(z).all()
    assert np.allclose(z[:, 1], 0.0)


def test_log_transform_treats_non_positive_as_missing() -> None:
    """Log-normal columns are logged; zeros and negatives become NaN; others untouched."""
    x = np.array([[np.e, 0.0], [0.0, 2.0]])
    out = log_transform(x, np.array([True, False]))
    assert out[0, 0] == pytest.approx(1.0) and np.isnan(out[1, 0])
    assert out[0, 1] == 0.0 and out[1, 1] == 2.0
    assert x[1, 0] == 0.0  # input untouched


def test_fedavg_is_the_example_weighted_mean() -> None:
    """FedAvg weights each update by its example count."""
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert np.allclose(fedavg([a, b], [3, 1]), [0.75, 0.25])


def test_aggregation_refuses_bad_input() -> None:
    """Empty input, mismatched shapes or weights raise clear errors."""
    with pytest.raises(ConfigError):
        fedavg([], [])
    with pytest.raises(ConfigError):
        fedavg([np.zeros(2), np.zeros(3)], [1, 1])
    with pytest.raises(ConfigError):
        fedavg([np.zeros(2)], [0])


@given(
    st.lists(
        st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), min_size=1, max_size=6
    ),
    st.randoms(),
)
def test_fedavg_is_permutation_invariant_and_pure(rows: list[list[float]], rnd: object) -> None:
    """Reordering updates does not change the result, and inputs are not mutated."""
    ups = [np.array(r) for r in rows]
    ws = [float(i + 1) for i in range(len(ups))]
    copies = [u.copy() for u in ups]
    first = fedavg(ups, ws)
    order = list(range(len(ups)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    second = fedavg([ups[i] for i in order], [ws[i] for i in order])
    assert np.allclose(first, second)
    assert all(np.array_equal(u, c) for u, c in zip(ups, copies, strict=True))


def test_flatten_round_trips() -> None:
    """Model deltas flatten to one vector and back."""
    w, b = np.arange(6.0).reshape(3, 2), np.array([7.0, 8.0])
    w2, b2 = unflatten(flatten(w, b), 3, 2)
    assert np.array_equal(w, w2) and np.array_equal(b, b2)
