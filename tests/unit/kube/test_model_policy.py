"""The priority and target model a request gets from InferenceObjectives and InferenceModels."""

import random
from collections import Counter

import pytest

from epp.datastore.models import ModelPolicy, ModelRule, TargetModel
from epp.request import LLMRequest


def request(model="llama", objective=None, target=None):
    return LLMRequest(request_id="r", api="completions", model=model, target_model=target or model, body={},
                      headers={}, size_bytes=0, prompt="x", objective=objective)


def applied(policy, **kw):
    req = request(**kw)
    policy.apply(req, random.Random(1))
    return req.priority, req.target_model


OBJECTIVES = {"batch": -1, "interactive": 10}
MODELS = [ModelRule("llama", priority=1), ModelRule("chat", priority=-1, targets=(TargetModel("chat-v2"),))]


@pytest.mark.parametrize("objectives,models,kw,expected", [
    # objectives only (the v1 API world): unknown or absent objective = 0, the model is never looked at
    (OBJECTIVES, [], {"objective": "batch"}, (-1, "llama")),
    (OBJECTIVES, [], {"objective": "nope"}, (0, "llama")),
    (OBJECTIVES, [], {}, (0, "llama")),
    # InferenceModels: criticality when no known objective is named, the objective wins when it is known
    ({}, MODELS, {}, (1, "llama")),
    (OBJECTIVES, MODELS, {"objective": "batch"}, (-1, "llama")),
    (OBJECTIVES, MODELS, {"objective": "nope"}, (1, "llama")),
    # a model no InferenceModel lists, in a pool that has some, is sheddable (the reference v0.5 rule)
    ({}, MODELS, {"model": "unlisted"}, (-1, "unlisted")),
    (OBJECTIVES, MODELS, {"model": "unlisted", "objective": "interactive"}, (10, "unlisted")),
    # a request without a model (passthrough parser) is not unlisted
    ({}, MODELS, {"model": ""}, (0, "")),
    # targetModels rewrite the model, over the x-gateway-model-name-rewrite header as the reference does
    ({}, MODELS, {"model": "chat"}, (-1, "chat-v2")),
    ({}, MODELS, {"model": "chat", "target": "from-header"}, (-1, "chat-v2")),
    ({}, MODELS, {"model": "llama", "target": "from-header"}, (1, "from-header")),
])
def test_priority_and_target_model(objectives, models, kw, expected):
    assert applied(ModelPolicy(objectives, models), **kw) == expected


def test_target_models_are_picked_in_proportion_to_their_weights():
    rule = ModelRule("m", targets=(TargetModel("a", 80), TargetModel("b", 15), TargetModel("c", 5)))
    rng = random.Random(7)
    counts = Counter(rule.pick_target(rng) for _ in range(20_000))
    assert abs(counts["a"] / 20_000 - 0.80) < 0.02
    assert abs(counts["b"] / 20_000 - 0.15) < 0.02
    assert abs(counts["c"] / 20_000 - 0.05) < 0.01


def test_a_zero_weight_target_is_never_picked_and_all_zero_weights_are_uniform():
    rng = random.Random(3)
    assert {ModelRule("m", targets=(TargetModel("a", 0), TargetModel("b", 1))).pick_target(rng)
            for _ in range(500)} == {"b"}
    picks = Counter(ModelRule("m", targets=(TargetModel("a", 0), TargetModel("b", 0))).pick_target(rng)
                    for _ in range(2000))
    assert set(picks) == {"a", "b"} and abs(picks["a"] - 1000) < 150


def test_watched_objectives_override_static_ones_of_the_same_name_and_keep_the_others():
    policy = ModelPolicy({"batch": -1, "gold": 5})
    policy.set_objectives({"batch": -5, "silver": 2})
    assert dict(policy.objectives) == {"batch": -5, "gold": 5, "silver": 2}
    policy.set_objectives({})
    assert dict(policy.objectives) == {"batch": -1, "gold": 5}


def test_the_first_rule_for_a_model_name_wins():
    policy = ModelPolicy(models=[ModelRule("m", priority=1, source="old"), ModelRule("m", priority=-1, source="new")])
    assert policy.models["m"].source == "old"
