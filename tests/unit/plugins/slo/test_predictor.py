"""Spec: the latency model (plugins/slo/predictor.py) — online recursive least squares with forgetting over
fixed feature vectors, physical priors before data, a per-endpoint residual correction; it converges to
known coefficients on synthetic data and never predicts NaN, a negative or an unbounded latency."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.slo.predictor import (
    MAX_MS,
    TPOT_FEATURES,
    TTFT_FEATURES,
    LatencyModel,
    OnlineLinearModel,
    Priors,
    ResidualCorrection,
    clamp_ms,
    tpot_features,
    ttft_features,
)

# Coefficients of a synthetic pod (ms per feature unit, features as scaled by ttft_features/tpot_features):
# prefill at 4,000 tokens/s (250 ms per 1k tokens, own or pending), 15 ms per queued request, 5 ms per ten
# sequences in the batch, 40 ms at a full KV cache.
TRUE_TTFT = (30.0, 250.0, 250.0, 15.0, 5.0, 40.0)
TRUE_TPOT = (12.0, 1.5, 8.0, 3.0)


def synthetic_ttft(rng: random.Random) -> tuple[float, ...]:
    return ttft_features(rng.uniform(0, 4000), rng.uniform(0, 8000), rng.randint(0, 6), rng.randint(0, 64),
                         rng.random())


def synthetic_tpot(rng: random.Random) -> tuple[float, ...]:
    return tpot_features(rng.randint(0, 64), rng.uniform(0, 8000), rng.random())


def dot(theta, x) -> float:
    return sum(t * v for t, v in zip(theta, x, strict=True))


def ttft_model(**kw) -> OnlineLinearModel:
    return OnlineLinearModel(TTFT_FEATURES, *Priors().ttft(), **kw)


def tpot_model(**kw) -> OnlineLinearModel:
    return OnlineLinearModel(TPOT_FEATURES, *Priors().tpot(), **kw)


def train(model: OnlineLinearModel, theta, features, n: int, noise: float, rng: random.Random) -> None:
    for _ in range(n):
        x = features(rng)
        assert model.update(x, max(0.0, dot(theta, x) + rng.gauss(0.0, noise)))


def relative_errors(model: OnlineLinearModel, theta, features, rng: random.Random, n: int = 500) -> list[float]:
    errors = []
    for _ in range(n):
        x = features(rng)
        actual = dot(theta, x)
        errors.append(abs(model.predict(x) - actual) / actual)
    return errors


# ------------------------------------------------------------------------------------------ convergence


@pytest.mark.parametrize(
    ("make", "theta", "features", "noise", "tolerance"),
    [(ttft_model, TRUE_TTFT, synthetic_ttft, 5.0, 2.5), (tpot_model, TRUE_TPOT, synthetic_tpot, 0.5, 0.2)],
    ids=["ttft", "tpot"],
)
def test_converges_to_known_coefficients_on_synthetic_data(make, theta, features, noise, tolerance):
    # `tolerance` is about four standard deviations of the estimate of the least-determined coefficients
    # (intercept and KV term) for this noise and the default memory of the forgetting factor.
    rng = random.Random(7)
    model = make()
    train(model, theta, features, 3000, noise, rng)
    for name, learned, true in zip(model.names, model.theta, theta, strict=True):
        assert learned == pytest.approx(true, rel=0.02, abs=tolerance), name
    errors = relative_errors(model, theta, features, rng)
    assert statistics.median(errors) < 0.02
    assert sorted(errors)[int(0.9 * len(errors))] < 0.06


def test_learns_most_of_the_way_within_a_hundred_samples():
    rng = random.Random(3)
    model = ttft_model()
    before = statistics.median(relative_errors(model, TRUE_TTFT, synthetic_ttft, random.Random(9)))
    train(model, TRUE_TTFT, synthetic_ttft, 100, 20.0, rng)
    after = statistics.median(relative_errors(model, TRUE_TTFT, synthetic_ttft, random.Random(9)))
    assert before > 0.5  # the 8B/H100 prior is far from a pod prefilling at 4,000 tokens/s
    assert after < 0.1


def test_follows_a_change_of_regime_through_forgetting():
    rng = random.Random(11)
    model = ttft_model(forgetting=0.99)
    train(model, TRUE_TTFT, synthetic_ttft, 1500, 10.0, rng)
    slower = (60.0, 500.0, 500.0, 30.0, 10.0, 80.0)  # the same pod, twice as slow
    train(model, slower, synthetic_ttft, 1500, 10.0, rng)
    assert model.theta[1] == pytest.approx(500.0, rel=0.05)
    assert statistics.median(relative_errors(model, slower, synthetic_ttft, rng)) < 0.03


def test_priors_hold_before_any_data():
    # Documented priors (8B model on one H100): 15,928 prefill tokens/s, 10 ms steps, 0.1 ms per sequence.
    model = LatencyModel()
    idle_1k = ttft_features(1000, 0, 0, 0, 0.0)
    assert model.predict_ttft("pod", idle_1k) == pytest.approx(20.0 + 1e6 / 15928.0)
    assert model.predict_tpot("pod", tpot_features(10, 0, 0.0)) == pytest.approx(10.0 + 1.0)
    # Queued prefill counts like the request's own.
    assert model.predict_ttft("pod", ttft_features(1000, 2000, 0, 0, 0.0)) == \
        pytest.approx(20.0 + 3e6 / 15928.0)


def test_priors_follow_the_physical_figures_given():
    theta, std = Priors(prefill_tokens_per_s=4000.0, step_ms=20.0, decode_ms_per_seq=0.5).ttft()
    assert theta == pytest.approx((40.0, 250.0, 250.0, 20.0, 10.0, 0.0))
    assert all(s > 0 for s in std)


def test_a_direction_the_data_never_excite_keeps_its_prior():
    rng = random.Random(5)
    model = ttft_model()
    prior_queue, prior_kv = model.theta[3], model.theta[5]

    def no_queue_no_kv(r: random.Random) -> tuple[float, ...]:
        return ttft_features(r.uniform(0, 4000), r.uniform(0, 8000), 0, r.randint(0, 64), 0.0)

    train(model, TRUE_TTFT, no_queue_no_kv, 1000, 10.0, rng)
    assert model.theta[3] == pytest.approx(prior_queue, abs=1e-6)
    assert model.theta[5] == pytest.approx(prior_kv, abs=1e-6)
    assert model.theta[1] == pytest.approx(250.0, rel=0.05)


# ------------------------------------------------------------------------------------------ robustness


@pytest.mark.parametrize("y", [math.nan, math.inf, -math.inf, -1.0])
def test_rejects_non_finite_or_negative_observations(y):
    model = ttft_model()
    theta = list(model.theta)
    assert model.update(ttft_features(100, 0, 0, 0, 0.0), y) is False
    assert model.theta == theta
    assert (model.samples, model.rejected) == (0, 1)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_rejects_non_finite_features(bad):
    model = ttft_model()
    assert model.update((1.0, bad, 0.0, 0.0, 0.0, 0.0), 100.0) is False
    assert model.update((1.0, 0.0), 100.0) is False  # wrong length
    assert model.rejected == 2


def test_one_outlier_after_warm_up_is_clipped_and_moves_little():
    rng = random.Random(2)
    model = ttft_model()
    train(model, TRUE_TTFT, synthetic_ttft, 500, 10.0, rng)
    probe = ttft_features(1000, 1000, 1, 10, 0.3)
    before = model.predict(probe)
    assert model.update(probe, 600_000.0)  # a ten-minute stall
    assert model.clipped == 1
    assert model.predict(probe) == pytest.approx(before, rel=0.2)


def test_a_lasting_shift_is_followed_although_innovations_are_clipped():
    rng = random.Random(4)
    model = tpot_model(forgetting=0.99)
    train(model, TRUE_TPOT, synthetic_tpot, 300, 0.5, rng)
    ten_times = tuple(10 * t for t in TRUE_TPOT)
    train(model, ten_times, synthetic_tpot, 300, 5.0, rng)
    assert statistics.median(relative_errors(model, ten_times, synthetic_tpot, rng)) < 0.05


def test_constant_signals_do_not_wind_the_model_up():
    # Covariance-form RLS with forgetting inflates the covariance of directions the data stop exciting
    # until one new sample throws the model far off; here the prior is never forgotten.
    model = ttft_model(forgetting=0.99)
    idle = ttft_features(0, 0, 0, 0, 0.0)
    for _ in range(5_000):
        assert model.update(idle, 20.0)
    assert model.theta[1:] == pytest.approx(model.prior[1:], abs=1e-6)  # nothing excited them
    model.update(ttft_features(2000, 0, 0, 0, 0.0), 520.0)
    assert 0.0 <= model.predict(ttft_features(2000, 0, 0, 0, 0.0)) <= 2000.0
    assert all(math.isfinite(t) for t in model.theta)


def test_coefficients_stay_non_negative_where_the_data_pull_one_below_zero():
    # Data in which more pending prefill *lowers* TPOT (as under a KV-bound overload, when admissions stop):
    # the unconstrained fit follows it and extrapolates to negative latencies; the default model does not.
    rng = random.Random(6)
    theta = (40.0, 2.0, -4.0, 10.0)
    free, kept = tpot_model(nonnegative=False), tpot_model()
    for _ in range(2000):
        x = synthetic_tpot(rng)
        y = max(1.0, dot(theta, x) + rng.gauss(0.0, 1.0))
        free.update(x, y)
        kept.update(x, y)
    assert free.theta[2] < -2.0
    assert all(t >= 0.0 for t in kept.theta)
    far = tpot_features(0, 50_000, 0.0)  # far more pending prefill than ever seen
    assert free.raw(far) < 0.0
    assert kept.raw(far) >= 0.0


floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(floats, min_size=6, max_size=6), floats), max_size=40),
       st.lists(floats, min_size=5, max_size=5))
def test_never_predicts_nan_negative_or_unbounded(updates, probe):
    model = LatencyModel()
    for x, y in updates:
        model.ttft.update(tuple(x), y)
        model.learn_ttft("pod", ttft_features(*x[:5]), y)
    assert all(math.isfinite(t) for t in model.ttft.theta)
    for endpoint in ("pod", "other"):
        v = model.predict_ttft(endpoint, ttft_features(*probe))
        assert 0.0 <= v <= MAX_MS
        w = model.predict_tpot(endpoint, tpot_features(*probe[:3]))
        assert 0.0 <= w <= MAX_MS


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=5, max_size=5))
def test_feature_vectors_are_finite_and_non_negative(values):
    for x in (ttft_features(*values), tpot_features(*values[:3])):
        assert x[0] == 1.0
        assert all(math.isfinite(v) and v >= 0.0 for v in x)
    assert ttft_features(*values)[-1] <= 1.0  # KV utilization is a fraction


@pytest.mark.parametrize(("v", "expected"), [(math.nan, 0.0), (-5.0, 0.0), (0.0, 0.0), (12.5, 12.5),
                                             (math.inf, MAX_MS), (1e300, MAX_MS)])
def test_clamp_ms(v, expected):
    assert clamp_ms(v) == expected


# ------------------------------------------------------------------------------------------ per endpoint


def test_the_residual_correction_learns_a_slower_endpoint():
    rng = random.Random(8)
    model = LatencyModel()
    speed = {"fast": 1.0, "slow": 2.0}
    for _ in range(3000):
        pod = rng.choice(list(speed))
        x = synthetic_ttft(rng)
        model.learn_ttft(pod, x, speed[pod] * dot(TRUE_TTFT, x) * rng.uniform(0.97, 1.03))
    for pod, factor in speed.items():
        errors = []
        for _ in range(300):
            x = synthetic_ttft(rng)
            actual = factor * dot(TRUE_TTFT, x)
            errors.append(abs(model.predict_ttft(pod, x) - actual) / actual)
        assert statistics.median(errors) < 0.12, pod
    assert model.ttft_correction.factor("slow") / model.ttft_correction.factor("fast") == pytest.approx(2.0, rel=0.2)


def test_without_correction_endpoints_share_one_prediction():
    model = LatencyModel(correct=False)
    x = ttft_features(500, 0, 0, 0, 0.0)
    for _ in range(20):
        model.learn_ttft("slow", x, 1000.0)
        model.learn_ttft("fast", x, 100.0)
    assert model.predict_ttft("slow", x) == model.predict_ttft("fast", x)


def test_the_correction_waits_for_a_few_samples_and_is_bounded():
    c = ResidualCorrection(min_samples=5, bound=4.0)
    for _ in range(4):
        c.observe("pod", 10.0, 1000.0)
    assert c.factor("pod") == 1.0
    c.observe("pod", 10.0, 1000.0)
    assert c.factor("pod") == pytest.approx(4.0)
    c.observe("pod", math.nan, 5.0)
    c.observe("pod", 10.0, math.inf)
    assert c.factor("pod") == pytest.approx(4.0)
    c.forget("pod")
    assert c.factor("pod") == 1.0


def test_snapshot_is_rebuilt_after_learning():
    model = LatencyModel()
    first = model.snapshot()
    assert model.snapshot() is first
    model.learn_tpot("pod", tpot_features(1, 0, 0.0), 30.0)
    assert model.snapshot() is not first
    assert model.snapshot().tpot == tuple(model.tpot.theta)
