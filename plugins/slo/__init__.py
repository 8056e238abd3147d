"""SLA-aware routing: per-request latency objectives, a latency predictor learned online inside the EPP, and
the plugins that route and admit by it.

Modules:
  objectives.py          `slo-objectives-producer`: reads a request's TTFT/TPOT objectives (headers, or
                         per-objective defaults) into `request.scratch[OBJECTIVES_KEY]`; 400 when malformed
  predictor.py           pure: the online linear models (exponentially weighted least squares, coefficients >= 0), the
                         feature vectors, the per-endpoint residual correction
  latency_predictor.py   `predicted-latency-producer`: predicts each candidate's TTFT and TPOT, learns from
                         the responses, exports predicted-vs-actual and SLO-attainment metrics
  slo_headroom_filter.py `slo-headroom-filter`: keeps the endpoints predicted to meet the objectives
  latency_scorer.py      `latency-scorer`: prefers lower predicted latency (or, optionally, packing)
  slo_admitter.py        `slo-admitter`: 429 for sheddable requests no endpoint can serve within objective

What passes between them, per request:
  request.scratch[OBJECTIVES_KEY]     an `Objectives` (None or absent: the request has no objective)
  endpoint.attributes[predictor name] a `LatencyPrediction` for every candidate endpoint
"""

from __future__ import annotations

from dataclasses import dataclass

from epp.datastore.endpoint import Endpoint

# The data keys producers declare in `produces` and readers in `consumes`.
SLO_OBJECTIVES = "SLOObjectives"
PREDICTED_LATENCY = "PredictedLatency"

# `request.scratch` key of the request's Objectives (written by the objectives producer).
OBJECTIVES_KEY = "slo.objectives"

# Type names (and default instance names) of the two producers.
OBJECTIVES_PRODUCER_TYPE = "slo-objectives-producer"
PREDICTOR_TYPE = "predicted-latency-producer"


@dataclass(frozen=True, slots=True)
class Objectives:
    """A request's latency objectives in milliseconds: time to first token and time per output token.
    None means no objective of that kind; at least one of the two is set."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None


@dataclass(slots=True)
class LatencyPrediction:
    """What the predictor expects of one endpoint for one request: TTFT and TPOT in milliseconds (finite,
    >= 0), and the uncached prompt tokens the TTFT prediction assumed. Readers treat it as read-only (it
    is not frozen only because a frozen dataclass costs a microsecond more to build, per endpoint)."""

    ttft_ms: float
    tpot_ms: float
    uncached_tokens: int = 0


def meets(prediction: LatencyPrediction | None, objectives: Objectives, buffer: float = 1.0) -> bool:
    """Whether `prediction`, inflated by `buffer` (>= 1 asks for a margin), is within every objective set.
    No prediction never meets."""
    if prediction is None:
        return False
    if objectives.ttft_ms is not None and prediction.ttft_ms * buffer > objectives.ttft_ms:
        return False
    if objectives.tpot_ms is not None and prediction.tpot_ms * buffer > objectives.tpot_ms:
        return False
    return True


def is_idle(endpoint: Endpoint) -> bool:
    """Nothing in flight from this EPP, nothing running or waiting in the last scrape."""
    m = endpoint.metrics
    return endpoint.in_flight <= 0 and m.running_requests_size <= 0 and m.waiting_queue_size <= 0


def check_predictor(plugins: dict, name: str) -> None:
    """Raises ValueError (the loader names the plugin) unless `plugins[name]` produces LatencyPrediction."""
    producer = plugins.get(name)
    if producer is None or PREDICTED_LATENCY not in getattr(producer, "produces", ()):
        known = sorted(n for n, p in plugins.items() if PREDICTED_LATENCY in getattr(p, "produces", ()))
        what = "no plugin is named" if producer is None else "the plugin named"
        tail = "" if producer is None else f" does not produce {PREDICTED_LATENCY}"
        raise ValueError(
            f"{what} {name!r}{tail}, which predictorName names; set it to the name of a {PREDICTOR_TYPE} "
            f"plugin (defined: {', '.join(known) or 'none'})"
        )
