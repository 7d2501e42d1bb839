"""Server optimizers: formulas, immutable state, checkpoints, configuration and CLI wiring.

The hand-made vectors use dyadic numbers (τ = 3/4, β1 = 1/2, …) chosen so that every square
root is exact; the expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from medimesh.errors import ConfigError
from medimesh.model import Model
from medimesh.server_opt import (
    SERVER_OPTIMIZERS,
    AdaptiveState,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    MomentumState,
    ServerOpt,
    ServerState,
    checkpoint_fields,
    make_server_optimizer,
    restore_state,
)

# One feature, two classes: weights (1, 2) then bias (2,) — four parameters, flattened in
# that order by medimesh.aggregation.flatten.
BASE_W = np.array([[0.5, -0.5]], np.float32)
BASE_B = np.array([1.0, -1.0], np.float32)


def _base() -> Model:
    return Model(BASE_W.copy(), BASE_B.copy())


def _flat(model: Model) -> np.ndarray:
    return np.concatenate([model.weights.ravel(), model.bias.ravel()])


def _two_steps(
    opt: ServerOpt, d1: list[float], d2: list[float]
) -> tuple[Model, ServerState, Model, ServerState]:
    m1, s1 = opt.step(_base(), np.array(d1), None)
    m2, s2 = opt.step(m1, np.array(d2), s1)
    return m1, s1, m2, s2


def _moved(model: Model) -> np.ndarray:
    """How far the model moved from the base, per parameter."""
    return _flat(model).astype(np.float64) - _flat(_base()).astype(np.float64)


# -- formulas -----------------------------------------------------------------------------------


def test_fedavgm_first_two_steps() -> None:
    """v0 = Δ1, w += lr·v0; v1 = μ·v0 + Δ2, w += lr·v1 (lr 2, μ 1/2)."""
    opt = FedAvgM(lr=2.0, momentum=0.5)
    m1, s1, m2, s2 = _two_steps(opt, [1, -2, 0.5, 0], [1, 1, -1, 4])
    assert isinstance(s1, MomentumState) and isinstance(s2, MomentumState)
    np.testing.assert_array_equal(s1.velocity, [1, -2, 0.5, 0])
    np.testing.assert_array_equal(_moved(m1), [2, -4, 1, 0])
    # v1 = [0.5 + 1, -1 + 1, 0.25 - 1, 0 + 4]
    np.testing.assert_array_equal(s2.velocity, [1.5, 0, -0.75, 4])
    np.testing.assert_array_equal(_moved(m2), [5, -4, -0.5, 8])


def test_fedadam_first_two_steps() -> None:
    """m = β1·m + (1−β1)·Δ; v = β2·v + (1−β2)·Δ² from v₋₁ = τ²; w += η·m/(√v + τ).

    τ = 3/4, β1 = 1/2, β2 = 3/4, η = 1. For |Δ| = 3/4: v = 3/4·9/16 + 1/4·9/16 = 9/16 every
    step, so √v + τ = 3/2. Coordinate 0 (Δ 3/4, 3/4): m0 = 3/8 → +1/4; m1 = 3/16 + 3/8 = 9/16
    → +3/8. Coordinate 1 (−3/4, 3/4): −1/4, then m1 = −3/16 + 3/8 = 3/16 → +1/8. Coordinate 2
    (3/4, −3/4): +1/4 then −1/8. Coordinate 3 (0, 0): m stays 0, v = 27/64 then 81/256.
    """
    opt = FedAdam(lr=1.0, beta1=0.5, beta2=0.75, tau=0.75)
    m1, s1, m2, s2 = _two_steps(opt, [0.75, -0.75, 0.75, 0], [0.75, 0.75, -0.75, 0])
    assert isinstance(s1, AdaptiveState) and isinstance(s2, AdaptiveState)
    np.testing.assert_array_equal(s1.m, [3 / 8, -3 / 8, 3 / 8, 0])
    np.testing.assert_array_equal(s1.v, [9 / 16, 9 / 16, 9 / 16, 27 / 64])
    np.testing.assert_array_equal(_moved(m1), [1 / 4, -1 / 4, 1 / 4, 0])
    np.testing.assert_array_equal(s2.m, [9 / 16, 3 / 16, -3 / 16, 0])
    np.testing.assert_array_equal(s2.v, [9 / 16, 9 / 16, 9 / 16, 81 / 256])
    np.testing.assert_array_equal(_moved(m2), [5 / 8, -1 / 8, 1 / 8, 0])
    assert (s1.t, s2.t) == (1, 2)


def test_fedyogi_first_two_steps() -> None:
    """v = v − (1−β2)·Δ²·sign(v − Δ²): grows, shrinks or (v = Δ²) stays.

    τ = 3/4 (v₋₁ = 9/16), β1 = 1/2, β2 = 1/2, η = 1.
    Coordinate 0 (Δ 3, 2): v0 = 9/16 + 9/2 = 81/16 (grows), m0 = 3/2 → 3/2 / (9/4 + 3/4) = 1/2;
      v1 = 81/16 − 4/2 = 49/16 (shrinks), m1 = 3/4 + 1 = 7/4 → 7/4 / (7/4 + 3/4) = 7/10.
    Coordinate 1 (3/4, 3): v0 = 9/16 (Δ² = v: unchanged), m0 = 3/8 → 3/8 / (3/2) = 1/4;
      v1 = 9/16 + 9/2 = 81/16, m1 = 3/16 + 3/2 = 27/16 → 27/16 / 3 = 9/16.
    Coordinate 2 (−3, −9/4): −1/2, then v1 = 81/16 (Δ² = v), m1 = −3/4 − 9/8 = −15/8 → −5/8.
    Coordinate 3 (0, 0): no move; v0 = 9/16 (0 < v: shrinks by 0).
    """
    opt = FedYogi(lr=1.0, beta1=0.5, beta2=0.5, tau=0.75)
    m1, s1, m2, s2 = _two_steps(opt, [3, 0.75, -3, 0], [2, 3, -2.25, 0])
    assert isinstance(s1, AdaptiveState) and isinstance(s2, AdaptiveState)
    np.testing.assert_array_equal(s1.v, [81 / 16, 9 / 16, 81 / 16, 9 / 16])
    np.testing.assert_array_equal(_moved(m1), [1 / 2, 1 / 4, -1 / 2, 0])
    np.testing.assert_array_equal(s2.m, [7 / 4, 27 / 16, -15 / 8, 0])
    np.testing.assert_array_equal(s2.v, [49 / 16, 81 / 16, 81 / 16, 9 / 16])
    # 1/2 + 7/10 = 6/5 is not a float32; compare at float32 precision.
    np.testing.assert_allclose(_moved(m2), [6 / 5, 13 / 16, -9 / 8, 0], rtol=1e-6)


def test_fedadagrad_first_two_steps() -> None:
    """v = v + Δ² from v₋₁ = τ² (β2 unused). τ = 3/4, β1 = 1/2, η = 1.

    Coordinate 0 (Δ 1, 3): v0 = 9/16 + 1 = 25/16, m0 = 1/2 → 1/2 / (5/4 + 3/4) = 1/4;
      v1 = 25/16 + 9 = 169/16, m1 = 1/4 + 3/2 = 7/4 → 7/4 / (13/4 + 3/4) = 7/16.
    Coordinate 1 (−1, −3): the mirror image. Coordinate 2 (0, 1): no move, then v1 = 25/16,
    m1 = 1/2 → 1/4. Coordinate 3 (0, −1): the mirror image.
    """
    opt = FedAdagrad(lr=1.0, beta1=0.5, beta2=0.99, tau=0.75)
    m1, s1, m2, s2 = _two_steps(opt, [1, -1, 0, 0], [3, -3, 1, -1])
    assert isinstance(s1, AdaptiveState) and isinstance(s2, AdaptiveState)
    np.testing.assert_array_equal(s1.v, [25 / 16, 25 / 16, 9 / 16, 9 / 16])
    np.testing.assert_array_equal(_moved(m1), [1 / 4, -1 / 4, 0, 0])
    np.testing.assert_array_equal(s2.v, [169 / 16, 169 / 16, 25 / 16, 25 / 16])
    np.testing.assert_array_equal(s2.m, [7 / 4, -7 / 4, 1 / 2, -1 / 2])
    np.testing.assert_array_equal(_moved(m2), [11 / 16, -11 / 16, 1 / 4, -1 / 4])


def test_adaptive_steps_follow_the_delta_and_fedavgm_without_momentum_is_fedavg() -> None:
    """Sign convention: every rule moves the model along Δ; FedAvgM(1, 0) adds Δ exactly."""
    d = np.array([0.2, -0.1, 0.05, -0.3])
    for name in SERVER_OPTIMIZERS:
        model, _ = make_server_optimizer(name).step(_base(), d, None)
        assert np.all(np.sign(_moved(model)) == np.sign(d)), name
    plain, _ = FedAvgM(1.0, 0.0).step(_base(), d, None)
    np.testing.assert_allclose(_moved(plain), d, atol=1e-7)


# -- immutability -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_step_mutates_nothing_and_state_is_read_only(name: str) -> None:
    """Inputs (model, aggregate, previous state) are unchanged; state arrays cannot be written."""
    opt = make_server_optimizer(name, lr=0.5, momentum=0.5)
    base, d = _base(), np.array([0.2, -0.1, 0.05, -0.3])
    d_copy = d.copy()
    m1, s1 = opt.step(base, d, None)
    d[:] = 99.0  # the caller reuses its buffer: the state must not follow
    d = d_copy.copy()
    before = {k: np.array(getattr(s1, k)) for k in s1.__slots__ if k != "t"}
    opt.step(m1, d, s1)
    np.testing.assert_array_equal(d, d_copy)
    np.testing.assert_array_equal(base.weights, BASE_W)
    np.testing.assert_array_equal(base.bias, BASE_B)
    for k, arr in before.items():
        value = getattr(s1, k)
        np.testing.assert_array_equal(value, arr)
        assert 99.0 not in value
        with pytest.raises(ValueError):
            value[0] = 1.0
    with pytest.raises(AttributeError):  # frozen: no field can be rebound either
        setattr(s1, s1.__slots__[0], np.zeros(4))


def test_state_built_from_a_buffer_is_a_copy() -> None:
    """A state never aliases the array it was built from."""
    buf = np.ones(4)
    state = MomentumState(buf)
    buf[0] = 7.0
    assert state.velocity[0] == 1.0


# -- checkpoints ------------------------------------------------------------------------------


def _through_store(fields: dict[str, Any]) -> dict[str, Any]:
    """What the auditor and PostgreSQL do to a checkpoint: numpy to JSON and back."""
    from medimesh.actors.auditor import _plain

    loaded: dict[str, Any] = json.loads(json.dumps(_plain(fields), allow_nan=False))
    return loaded


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_checkpoint_round_trip_continues_bit_for_bit(name: str) -> None:
    """Save after two rounds, restore, step: the same model as never having stopped."""
    opt = make_server_optimizer(name, lr=0.1)
    rng = np.random.default_rng(1)
    d1, d2, d3 = (rng.normal(size=4) / 7 for _ in range(3))
    m1, s1 = opt.step(_base(), d1, None)
    m2, s2 = opt.step(m1, d2, s1)
    restored = restore_state(opt, _through_store(checkpoint_fields(opt, s2)))
    assert type(restored) is type(s2)
    for k in s2.__slots__:
        np.testing.assert_array_equal(getattr(restored, k), getattr(s2, k))
    straight, _ = opt.step(m2, d3, s2)
    resumed, _ = opt.step(m2, d3, restored)
    np.testing.assert_array_equal(_flat(straight), _flat(resumed))


def test_restore_reads_legacy_velocity_checkpoints() -> None:
    """Checkpoints from before adaptive optimizers hold FedAvgM's bare velocity."""
    opt = make_server_optimizer("fedavgm")
    restored = restore_state(opt, {"round": 3, "velocity": [0.5, -0.25, 0.0, 1.0]})
    assert isinstance(restored, MomentumState)
    np.testing.assert_array_equal(restored.velocity, [0.5, -0.25, 0.0, 1.0])
    assert restore_state(opt, {"velocity": None}) is None
    # No server step was taken yet: any optimizer may start from such a checkpoint.
    assert restore_state(make_server_optimizer("fedadam"), {"velocity": None}) is None


def test_restore_refuses_another_optimizers_state() -> None:
    """A velocity cannot become Adam moments (nor the reverse): say which to resume with."""
    with pytest.raises(ConfigError, match="fedavgm"):
        restore_state(make_server_optimizer("fedyogi"), {"velocity": [0.1, 0.2, 0.3, 0.4]})
    adam = make_server_optimizer("fedadam")
    _, s = adam.step(_base(), np.ones(4) / 10, None)
    with pytest.raises(ConfigError, match="fedadam"):
        restore_state(make_server_optimizer("fedadagrad"), checkpoint_fields(adam, s))
    unstarted = checkpoint_fields(adam, None)
    assert restore_state(make_server_optimizer("fedadagrad"), unstarted) is None


@pytest.mark.parametrize(
    "body",
    [
        {"m": [0.1, 0.2], "v": [0.1], "t": 1},  # moments of different sizes
        {"m": [0.1], "v": [-0.1], "t": 1},  # negative second moment
        {"m": [0.1], "v": [None], "t": 1},  # NaN became null in JSON
        {"m": [0.1], "v": [0.1], "t": -1},
        {"m": [0.1], "v": [0.1], "t": 1.5},
        {"m": [0.1], "v": [0.1]},
        "not an object",
    ],
)
def test_restore_rejects_damaged_state(body: Any) -> None:
    """A damaged checkpoint is a ConfigError, never a silently wrong optimizer."""
    with pytest.raises(ConfigError):
        restore_state(
            make_server_optimizer("fedadam"), {"server_optimizer": {"name": "fedadam",
                                                                    "state": body}}
        )


def test_a_state_of_the_wrong_kind_or_size_is_refused() -> None:
    """Handing one optimizer another's state (or a state for another model) fails loudly."""
    _, momentum = FedAvgM().step(_base(), np.ones(4), None)
    with pytest.raises(ConfigError):
        FedAdam().step(_base(), np.ones(4), momentum)
    with pytest.raises(ConfigError):
        FedAvgM().step(_base(), np.ones(4), FedAdam().init(4))
    with pytest.raises(ConfigError):
        FedYogi().step(_base(), np.ones(4), FedYogi().init(6))
    with pytest.raises(ConfigError):
        FedAvgM().step(_base(), np.ones(5), None)


# -- configuration ------------------------------------------------------------------------------


def test_factory_defaults_and_names() -> None:
    """Per-rule defaults for η and β1; β2 0.99 and τ 1e-3 for the adaptive ones."""
    assert make_server_optimizer("fedavgm").describe() == {
        "server_optimizer": "fedavgm", "server_lr": 1.0, "server_momentum": 0.8
    }
    adam = make_server_optimizer("fedadam")
    assert isinstance(adam, FedAdam)
    assert (adam.beta1, adam.beta2, adam.tau) == (0.9, 0.99, 1e-3)
    assert isinstance(make_server_optimizer("fedyogi", 0.03, 0.5), FedYogi)
    assert make_server_optimizer("fedadagrad", lr=0.2).lr == 0.2
    for name in SERVER_OPTIMIZERS:  # the classes' own defaults agree with the factory's
        cls = {"fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
               "fedadagrad": FedAdagrad}[name]
        assert cls().lr == make_server_optimizer(name).lr, name


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("adam", {}, "unknown server optimizer 'adam'"),
        ("FedAdam", {}, "unknown server optimizer"),
        ("fedavgm", {"lr": 0.0}, "server lr"),
        ("fedadam", {"lr": -0.1}, "server lr"),
        ("fedadam", {"lr": float("nan")}, "server lr"),
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedyogi", {"momentum": -0.1}, "momentum"),
        ("fedadam", {"beta2": 1.0}, "β2"),
        ("fedadagrad", {"tau": 0.0}, "τ"),
        ("fedyogi", {"tau": float("inf")}, "τ"),
    ],
)
def test_bad_names_and_values_are_config_errors(
    name: str, kwargs: dict[str, float], message: str
) -> None:
    """Each mistake names the setting at fault."""
    with pytest.raises(ConfigError, match=message):
        make_server_optimizer(name, **kwargs)


def test_coordinator_config_builds_the_optimizer_and_keeps_dp_on_fedavgm() -> None:
    """CoordinatorConfig validates early; DP keeps FedAvgM with its own lr and momentum."""
    from medimesh.actors.coordinator import CoordinatorConfig
    from medimesh.privacy import PrivacyConfig

    cfg = CoordinatorConfig(3, 2, "s", server_optimizer="fedyogi", server_lr=0.03)
    opt = cfg.server()
    assert isinstance(opt, FedYogi) and opt.lr == 0.03 and opt.beta1 == 0.9
    assert CoordinatorConfig(3, 2, "s").server() == FedAvgM(1.0, 0.8)
    with pytest.raises(ConfigError, match="unknown server optimizer"):
        CoordinatorConfig(3, 2, "s", server_optimizer="sgd")
    dp = PrivacyConfig(epsilon=1.0, delta=1e-3, rounds=5, server_lr=0.5, server_momentum=0.1)
    assert CoordinatorConfig(3, 2, "s", privacy=dp).server() == FedAvgM(0.5, 0.1)
    with pytest.raises(ConfigError, match="differential privacy"):
        CoordinatorConfig(3, 2, "s", privacy=dp, server_optimizer="fedadam")


# -- command line -------------------------------------------------------------------------------


def test_cli_flags_reach_run_config(capsys: pytest.CaptureFixture[str]) -> None:
    """--aggregator/--server-* on demo, train and bench accuracy end up in RunConfig."""
    from medimesh.aggregation import AGGREGATORS
    from medimesh.cli import _config, build_parser

    p = build_parser()
    flags = ["--aggregator", "median", "--server-optimizer", "fedadam", "--server-lr", "0.03",
             "--server-momentum", "0.5"]
    for argv in (["demo", *flags], ["bench", "accuracy", *flags],
                 ["train", "--site", "a=a.csv", *flags]):
        cfg = _config(p.parse_args(argv))
        assert (cfg.aggregator, cfg.server_optimizer, cfg.server_lr, cfg.server_momentum) == (
            "median", "fedadam", 0.03, 0.5
        ), argv
    default = _config(p.parse_args(["demo"]))
    assert (default.server_optimizer, default.server_lr, default.server_momentum) == (
        "fedavgm", None, None
    )
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "accuracy", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "{fedavgm,fedadam,fedyogi,fedadagrad}" in help_text
    assert "(default: 1 for fedavgm, 0.01 for fedadam/fedyogi, 0.1 for fedadagrad)" in help_text
    for rule in AGGREGATORS:  # choices come from the aggregation module, not a copy
        assert _config(p.parse_args(["demo", "--aggregator", rule])).aggregator == rule


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--server-optimizer", "adam"],
        ["demo", "--server-lr", "0"],
        ["demo", "--server-momentum", "1"],
        ["demo", "--aggregator", "mean"],
    ],
)
def test_cli_rejects_bad_server_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """argparse refuses them with a usage message (exit 2), before anything starts."""
    from medimesh.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "argument" in capsys.readouterr().err
