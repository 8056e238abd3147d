"""The latency predictor's model, pure: no I/O, no clock, no plugin machinery.

TTFT and TPOT are each a linear function of a few live signals of the endpoint and of the request, with
coefficients learned online by exponentially weighted least squares (kept >= 0), starting from
physical priors:

    TTFT ≈ a0 + a1·U/1k + a2·P/1k + a3·Q + a4·B/10 + a5·K
    TPOT ≈ b0 + b1·B/10 + b2·P/1k + b3·K

    U  uncached prompt tokens of this request on this endpoint (prompt estimate − prefix-cache match)
    P  prefill tokens pending on the endpoint: the uncached tokens of the streamed requests this EPP sent
       there that have not produced their first token yet (kept by the EPP itself, so fresh between scrapes)
    Q  requests waiting ahead: max(the endpoint's waiting queue as scraped, the number of those pending
       requests of this EPP)
    B  its decoding batch: max(running requests as scraped, this EPP's requests in flight there past their
       first token)
    K  its KV-cache utilization in [0, 1] (scraped)

Why these: a continuous-batching engine with chunked prefill computes the prefill work queued ahead of a
request, then the request's own uncached tokens, in steps whose time grows with the batch of decoding
sequences; so TTFT is about (P + U)/prefill-throughput plus a per-step cost that grows with B, and TPOT is
the step time, which grows with B and with the prefill chunks sharing the steps (P). When the KV cache is
full the engine admits a waiting request only as others finish, and TTFT grows with the requests waiting
ahead (Q) rather than with their tokens; K tells that regime apart. Q and K also carry what the EPP cannot
see itself (other routers' traffic, preemption). The features are scaled to be of order one so that the
fit stays well conditioned, and every coefficient is kept >= 0 (see OnlineLinearModel).

One model per kind is shared by every endpoint (pods of a pool run the same model on the same hardware,
so pooling their samples learns the physics many times faster), and each endpoint has a multiplicative
residual correction: an exponentially weighted mean of log(actual / shared prediction), applied after a
few samples and bounded to [1/4, 4], which absorbs a slower or faster pod.

Robustness: non-finite or non-positive observations are rejected; the innovation is clipped to a few
times its running mean absolute size (after a warm-up), so one stall does not tear the coefficients; the
prior is never forgotten, so nothing winds up while the signals stay constant (e.g. on an idle pool); a
non-finite update is discarded. Predictions are finite, >= 0 and at most MAX_MS.

Measured on a benchmark trace (2 sim pods, chat, 4 to 32 requests/s, replayed through this model in
arrival order): median |predicted − actual| / actual about 18% for TTFT and 26% for TPOT. Other feature
sets tried on the same trace (own and pending tokens summed; the EPP's recent prefill inflow per endpoint;
separate models for a full and a free KV cache) did not do better by more than a point or two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from operator import mul

MAX_MS = 3_600_000.0  # an hour: the largest prediction returned
_FLOOR_MS = 1.0  # ratios and clip scales never divide by less than this

TTFT_FEATURES = ("intercept", "uncached_ktokens", "pending_prefill_ktokens", "waiting_queue", "batch_10",
                 "kv_cache_usage")
TPOT_FEATURES = ("intercept", "batch_10", "pending_prefill_ktokens", "kv_cache_usage")


def _finite(v: float) -> float:
    """v when finite, else 0 (a NaN/inf metric must not poison a prediction)."""
    return v if -math.inf < v < math.inf else 0.0


def ttft_features(uncached_tokens: float, pending_prefill_tokens: float, waiting_queue: float, batch: float,
                  kv_cache_usage: float) -> tuple[float, ...]:
    """The TTFT feature vector, in the order of TTFT_FEATURES. Negative or non-finite inputs count as 0."""
    return (1.0, max(0.0, _finite(uncached_tokens)) / 1000.0, max(0.0, _finite(pending_prefill_tokens)) / 1000.0,
            max(0.0, _finite(waiting_queue)), max(0.0, _finite(batch)) / 10.0,
            min(1.0, max(0.0, _finite(kv_cache_usage))))


def tpot_features(batch: float, pending_prefill_tokens: float, kv_cache_usage: float) -> tuple[float, ...]:
    """The TPOT feature vector, in the order of TPOT_FEATURES."""
    return (1.0, max(0.0, _finite(batch)) / 10.0, max(0.0, _finite(pending_prefill_tokens)) / 1000.0,
            min(1.0, max(0.0, _finite(kv_cache_usage))))


def clamp_ms(v: float) -> float:
    """A prediction made safe: NaN and negatives become 0, anything above MAX_MS becomes MAX_MS."""
    if not v > 0.0:  # also NaN
        return 0.0
    return v if v < MAX_MS else MAX_MS


class OnlineLinearModel:
    """y ≈ θ·x, θ >= 0, by exponentially weighted least squares, updated with every observation.

    The model keeps the exponentially weighted normal equations A = Σ λ^k x_k x_kᵀ and b = Σ λ^k x_k y_k (λ
    is the forgetting factor: a sample k updates old counts λ^k, a memory of about 1/(1−λ) samples, which
    follows a changing load regime) and after each observation solves

        min_θ  Σ λ^k (y_k − θ·x_k)² + Σ_i (θ_i − θ0_i)² / σ0_i²    subject to θ >= 0

    by a few sweeps of projected coordinate descent started from the previous θ (the solution moves little
    between two observations). The second term is the prior θ0 with deviations σ0: before any data θ = θ0, a
    direction the data never excite keeps its prior value, and the data outweigh it after a few samples. The
    prior is never forgotten, so A stays positive definite however long the signals stay constant (no
    wind-up, unlike a covariance-form RLS with forgetting).

    Every coefficient is kept >= 0 (`nonnegative`): every feature is a load that can only add latency, and
    across load regimes the signals are so correlated (under overload, pending prefill, queue, batch and KV
    use rise together) that an unconstrained fit trades large coefficients of opposite signs, which
    extrapolate to negative latencies. (Projecting a covariance-form RLS onto θ >= 0 instead diverges.)

    The innovation is clipped to `clip` times its running mean absolute size after `warmup` samples, so one
    stall does not tear the coefficients, while a lasting shift grows the running mean and is followed
    within a dozen samples. (Weighting samples by 1/prediction, to fit relative rather than absolute error,
    was tried on benchmark traces: no better, and slower to follow a shift up.)
    """

    __slots__ = ("names", "theta", "prior", "prior_std", "A", "b", "lam", "clip", "warmup", "sweeps",
                 "err_scale", "samples", "rejected", "clipped", "nonnegative", "_a0", "_a0t0")

    def __init__(self, names: Sequence[str], prior: Sequence[float], prior_std: Sequence[float],
                 forgetting: float = 0.998, clip: float = 8.0, warmup: int = 20, sweeps: int = 3,
                 nonnegative: bool = True) -> None:
        n = len(names)
        if len(prior) != n or len(prior_std) != n:
            raise ValueError(f"{n} features need {n} prior values and {n} prior deviations")
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"the forgetting factor must be in (0, 1], got {forgetting}")
        if any(not (0.0 < s < math.inf) for s in prior_std) or any(not math.isfinite(p) for p in prior):
            raise ValueError("prior values must be finite and prior deviations positive and finite")
        if nonnegative and any(p < 0 for p in prior):
            raise ValueError("a nonnegative model needs a prior >= 0")
        self.names = tuple(names)
        self.prior = tuple(float(p) for p in prior)
        self.prior_std = tuple(float(s) for s in prior_std)
        self._a0 = tuple(1.0 / (s * s) for s in self.prior_std)
        self._a0t0 = tuple(a * t for a, t in zip(self._a0, self.prior, strict=True))
        self.lam = float(forgetting)
        self.clip = float(clip)
        self.warmup = int(warmup)
        self.sweeps = int(sweeps)
        self.nonnegative = nonnegative
        self.samples = 0
        self.rejected = 0
        self.clipped = 0
        self.reset()

    def reset(self) -> None:
        """Back to the prior (the sample counters are kept)."""
        n = len(self.prior)
        self.theta = list(self.prior)
        self.A = [[0.0] * n for _ in range(n)]
        self.b = [0.0] * n
        self.err_scale = 0.0

    def raw(self, x: Sequence[float]) -> float:
        """θ·x, unclamped (x must have one value per feature)."""
        return sum(map(mul, self.theta, x))

    def predict(self, x: Sequence[float]) -> float:
        """θ·x clamped to [0, MAX_MS]."""
        return clamp_ms(self.raw(x))

    def update(self, x: Sequence[float], y: float) -> bool:
        """Learn one observation. Returns False (and changes nothing) for a non-finite or negative `y`, a
        non-finite feature or a wrong number of them, or an update that would not stay finite."""
        n = len(self.theta)
        if len(x) != n or not (0.0 <= y < math.inf) or not all(-math.inf < v < math.inf for v in x):
            self.rejected += 1
            return False
        predicted = self.raw(x)
        err = y - predicted
        abs_err = abs(err)
        clipped = False
        scale = self.err_scale
        if self.samples >= self.warmup:
            limit = self.clip * max(scale, _FLOOR_MS)
            if abs_err > limit:
                y = predicted + math.copysign(limit, err)
                clipped = True
            scale += 0.1 * (min(abs_err, limit) - scale)
        else:
            scale += (abs_err - scale) / (self.samples + 1)
        lam = self.lam
        A = [[lam * a + xi * xj for a, xj in zip(row, x, strict=True)] for row, xi in zip(self.A, x, strict=True)]
        b = [lam * bi + xi * y for bi, xi in zip(self.b, x, strict=True)]
        theta = self._solve(A, b, list(self.theta))
        if not (all(-math.inf < t < math.inf for t in theta) and all(-math.inf < v < math.inf for v in b)
                and all(-math.inf < v < math.inf for row in A for v in row)):
            self.rejected += 1
            return False
        self.A, self.b, self.theta, self.err_scale = A, b, theta, scale
        self.samples += 1
        self.clipped += clipped
        return True

    def _solve(self, A: list[list[float]], b: list[float], theta: list[float]) -> list[float]:
        """Projected coordinate descent on (A + diag(a0)) θ = b + a0·θ0, θ >= 0, from `theta`."""
        n = len(theta)
        a0, a0t0 = self._a0, self._a0t0
        nonneg = self.nonnegative
        for _ in range(self.sweeps):
            for i in range(n):
                row = A[i]
                r = b[i] + a0t0[i] - sum(map(mul, row, theta)) + row[i] * theta[i]
                v = r / (row[i] + a0[i])
                theta[i] = v if v > 0.0 or not nonneg else 0.0
        return theta


@dataclass(slots=True)
class _Residual:
    log_ratio: float = 0.0
    samples: int = 0


class ResidualCorrection:
    """Per-endpoint multiplicative correction of a shared model: factor = exp(EWMA of log(actual /
    predicted)), bounded to [1/bound, bound], used once an endpoint has `min_samples` samples."""

    __slots__ = ("alpha", "min_samples", "log_bound", "_by_endpoint")

    def __init__(self, alpha: float = 0.1, min_samples: int = 5, bound: float = 4.0) -> None:
        self.alpha = alpha
        self.min_samples = min_samples
        self.log_bound = math.log(bound)
        self._by_endpoint: dict[str, _Residual] = {}

    def factor(self, endpoint: str) -> float:
        r = self._by_endpoint.get(endpoint)
        if r is None or r.samples < self.min_samples:
            return 1.0
        return math.exp(r.log_ratio)

    def observe(self, endpoint: str, predicted_ms: float, actual_ms: float) -> None:
        if not (0.0 <= predicted_ms < math.inf and 0.0 < actual_ms < math.inf):
            return
        ratio = math.log(max(actual_ms, _FLOOR_MS) / max(predicted_ms, _FLOOR_MS))
        r = self._by_endpoint.get(endpoint)
        if r is None:
            r = self._by_endpoint[endpoint] = _Residual()
        a = max(self.alpha, 1.0 / (r.samples + 1))  # a plain mean over the first samples
        r.log_ratio = max(-self.log_bound, min(self.log_bound, r.log_ratio + a * (ratio - r.log_ratio)))
        r.samples += 1

    def forget(self, endpoint: str) -> None:
        self._by_endpoint.pop(endpoint, None)

    def factors(self) -> dict[str, float]:
        return {name: self.factor(name) for name in self._by_endpoint}


@dataclass(frozen=True)
class Priors:
    """The physical figures the priors come from (defaults: an 8B model on one H100, the figures the sim
    model server and llm-d use): prefill throughput for uncached tokens, the time of one engine step with
    one sequence, and what each further decoding sequence adds to a step."""

    prefill_tokens_per_s: float = 15928.0
    step_ms: float = 10.0
    decode_ms_per_seq: float = 0.1

    def ttft(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(prior θ, prior deviations) of the TTFT model. A thousand uncached tokens, own or queued ahead,
        cost 1e6/throughput ms; a queued request at least one more step; ten more sequences in the batch
        ten times decode_ms_per_seq per step over about two steps; the KV term starts at 0."""
        per_k = 1e6 / self.prefill_tokens_per_s
        theta = (2 * self.step_ms, per_k, per_k, self.step_ms, 20 * self.decode_ms_per_seq, 0.0)
        std = (max(50.0, 2 * self.step_ms), max(100.0, 2 * per_k), max(100.0, 2 * per_k), 100.0, 20.0, 200.0)
        return theta, std

    def tpot(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(prior θ, prior deviations) of the TPOT model: one step plus ten times decode_ms_per_seq per ten
        sequences; the prefill-interference and KV terms start at 0."""
        theta = (self.step_ms, 10 * self.decode_ms_per_seq, 0.0, 0.0)
        std = (max(20.0, 2 * self.step_ms), 10.0, 20.0, 50.0)
        return theta, std


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The coefficients and per-endpoint factors of a LatencyModel at one moment, for the hot path (see
    LatencyModel.snapshot): plain tuples and dicts, read without method calls."""

    ttft: tuple[float, ...]
    tpot: tuple[float, ...]
    ttft_factors: dict[str, float]
    tpot_factors: dict[str, float]


class LatencyModel:
    """The TTFT and TPOT models with their per-endpoint corrections."""

    __slots__ = ("ttft", "tpot", "ttft_correction", "tpot_correction", "correct", "_snapshot")

    def __init__(self, priors: Priors = Priors(), forgetting: float = 0.998, correct: bool = True) -> None:
        t_theta, t_std = priors.ttft()
        p_theta, p_std = priors.tpot()
        self.ttft = OnlineLinearModel(TTFT_FEATURES, t_theta, t_std, forgetting)
        self.tpot = OnlineLinearModel(TPOT_FEATURES, p_theta, p_std, forgetting)
        self.ttft_correction = ResidualCorrection()
        self.tpot_correction = ResidualCorrection()
        self.correct = correct
        self._snapshot: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        """The current coefficients and correction factors (factors only for endpoints whose factor is not
        1); rebuilt after each learning step, shared until the next. A prediction from it equals
        predict_ttft / predict_tpot: clamp_ms(θ·x × factor)."""
        snap = self._snapshot
        if snap is None:
            if self.correct:
                tf = {k: v for k, v in self.ttft_correction.factors().items() if v != 1.0}
                pf = {k: v for k, v in self.tpot_correction.factors().items() if v != 1.0}
            else:
                tf, pf = {}, {}
            snap = self._snapshot = Snapshot(tuple(self.ttft.theta), tuple(self.tpot.theta), tf, pf)
        return snap

    def predict_ttft(self, endpoint: str, x: Sequence[float]) -> float:
        v = self.ttft.raw(x)
        if self.correct:
            v *= self.ttft_correction.factor(endpoint)
        return clamp_ms(v)

    def predict_tpot(self, endpoint: str, x: Sequence[float]) -> float:
        v = self.tpot.raw(x)
        if self.correct:
            v *= self.tpot_correction.factor(endpoint)
        return clamp_ms(v)

    def learn_ttft(self, endpoint: str, x: Sequence[float], actual_ms: float) -> bool:
        if not (0.0 < actual_ms < math.inf):
            self.ttft.rejected += 1
            return False
        self._snapshot = None
        self.ttft_correction.observe(endpoint, self.ttft.predict(x), actual_ms)
        return self.ttft.update(x, actual_ms)

    def learn_tpot(self, endpoint: str, x: Sequence[float], actual_ms: float) -> bool:
        if not (0.0 < actual_ms < math.inf):
            self.tpot.rejected += 1
            return False
        self._snapshot = None
        self.tpot_correction.observe(endpoint, self.tpot.predict(x), actual_ms)
        return self.tpot.update(x, actual_ms)

    def forget(self, endpoint: str) -> None:
        self._snapshot = None
        self.ttft_correction.forget(endpoint)
        self.tpot_correction.forget(endpoint)
