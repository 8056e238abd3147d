"""What the pool's InferenceModels and InferenceObjectives say about one request: its priority and the model
the model server is asked for.

Two APIs feed it, both optional:

* **InferenceObjective** (`inference.networking.x-k8s.io/v1alpha2`): the request header
  `x-gateway-inference-objective: <name>` selects an objective; its `spec.priority` (an integer, negative =
  sheddable) becomes the request's priority.
* **InferenceModel** (the v0.x API, `inference.networking.x-k8s.io/v1alpha2`): keyed by the `model` the client
  sends. `criticality` gives a priority (`CRITICALITY_PRIORITY`), and `targetModels` rewrite the model name,
  picked at random in proportion to their weights (a LoRA roll-out, a version split).

Precedence, per request:

1. priority: the objective named by the header, when it exists; else the request model's InferenceModel
   `criticality` (unset = Standard); else, when the pool has InferenceModels at all, the model is not one of
   them and the request is **Sheddable** (what the reference EPP v0.5 did with unlisted models); else 0.
   The last rule is the one improvement on v0.5: a pool that uses no InferenceModel (the v1 API world) never
   sheds requests just because their model is unlisted.
2. target model: the InferenceModel's weighted pick when it has `targetModels` (as the reference applies
   InferenceModelRewrite rules over the `x-gateway-model-name-rewrite` header); else what the parser set (the
   header, or the client's model).

The object is owned by whoever feeds it (the static `--objectives-file`, the Kubernetes watchers); it is
replaced wholesale through `set_objectives`/`set_models` on the event loop and read by the Director on the
request path (two dict lookups and, for split models, one random number).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from epp.request import LLMRequest

# InferenceModel criticality -> priority. Sheddable is negative, so the saturation detector may shed it;
# Critical ranks above the default 0 of requests without an objective.
CRITICALITY_PRIORITY = {"Critical": 1, "Standard": 0, "Sheddable": -1}
# The priority of a request whose model no InferenceModel lists, in a pool that has InferenceModels.
UNLISTED_MODEL_PRIORITY = CRITICALITY_PRIORITY["Sheddable"]


class RequestPolicy(Protocol):
    """What the Director asks before admission: set `request.priority` and, where a rule says so,
    `request.target_model`. Synchronous and cheap: it runs for every request."""

    def apply(self, request: LLMRequest, rng: random.Random) -> None: ...


@dataclass(frozen=True, slots=True)
class TargetModel:
    name: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class ModelRule:
    """One InferenceModel: the client-facing `model_name`, its priority and its weighted targets."""

    model_name: str
    priority: int = 0
    targets: tuple[TargetModel, ...] = ()
    source: str = ""  # where it came from (namespace/name), for messages
    cumulative: tuple[int, ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if any(t.weight < 0 for t in self.targets):
            raise ValueError(f"{self.source or self.model_name}: target model weights must not be negative")
        total, out = 0, []
        for t in self.targets:
            total += t.weight
            out.append(total)
        object.__setattr__(self, "cumulative", tuple(out))

    def pick_target(self, rng: random.Random) -> str | None:
        """A target in proportion to its weight (all weights 0: uniformly); None without targets."""
        if not self.targets:
            return None
        if len(self.targets) == 1:
            return self.targets[0].name
        cumulative = self.cumulative
        if cumulative[-1] <= 0:
            return rng.choice(self.targets).name
        return self.targets[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])].name


class ModelPolicy:
    """Objectives and InferenceModels of one pool, applied to requests (see the module docstring)."""

    def __init__(self, objectives: Mapping[str, int] | None = None, models: Iterable[ModelRule] = ()) -> None:
        self._static_objectives = dict(objectives or {})
        self._objectives: dict[str, int] = dict(self._static_objectives)
        self._models: dict[str, ModelRule] = {}
        self.set_models(models)

    @property
    def objectives(self) -> Mapping[str, int]:
        return self._objectives

    @property
    def models(self) -> Mapping[str, ModelRule]:
        return self._models

    def set_objectives(self, objectives: Mapping[str, int]) -> None:
        """Replace the watched objectives. Static ones (`--objectives-file`) stay, unless a watched objective
        of the same name overrides them."""
        self._objectives = {**self._static_objectives, **objectives}

    def set_models(self, models: Iterable[ModelRule]) -> None:
        """Replace the InferenceModels. Two rules for one model name: the first one given wins (callers pass
        them oldest first, as the reference keeps the oldest)."""
        out: dict[str, ModelRule] = {}
        for rule in models:
            out.setdefault(rule.model_name, rule)
        self._models = out

    def priority_of(self, model: str, objective: str | None) -> int:
        if objective is not None:
            prio = self._objectives.get(objective)
            if prio is not None:
                return prio
        rule = self._models.get(model)
        if rule is not None:
            return rule.priority
        # A request without a model (e.g. a passthrough parser's) is not "unlisted": nothing was looked up.
        return UNLISTED_MODEL_PRIORITY if self._models and model else 0

    def apply(self, request: LLMRequest, rng: random.Random) -> None:
        request.priority = self.priority_of(request.model, request.objective)
        if self._models:
            rule = self._models.get(request.model)
            if rule is not None and rule.targets:
                request.target_model = rule.pick_target(rng)  # type: ignore[assignment]
