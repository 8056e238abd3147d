"""What a user reads when the Kubernetes API refuses or fails, and how the watchers back off."""

import random

import orjson
import pytest

from epp.kube.client import api_error_from
from epp.kube.objects import MODELS, PODS, POOL_V1, POOL_V1ALPHA2
from epp.kube.reflector import Backoff


def status_body(code, reason, message):
    return orjson.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
                         "message": message})


@pytest.mark.parametrize("status,body,resource,needles", [
    (404, b"404 page not found\n", POOL_V1,
     ["InferencePool CRD (inferencepools.inference.networking.k8s.io/v1) is not installed",
      "--pool-group inference.networking.x-k8s.io", "--endpoint-selector"]),
    (404, b"404 page not found\n", POOL_V1ALPHA2, ["--pool-group inference.networking.k8s.io"]),
    (404, b"404 page not found\n", MODELS, ["InferenceModel CRD", "kubectl apply"]),
    (403, status_body(403, "Forbidden", 'pods is forbidden: User "system:serviceaccount:ns:epp" cannot list'),
     PODS, ["RBAC forbids list pods/v1 in namespace 'ns'", "cannot list", "get/list/watch on pods"]),
    (401, status_body(401, "Unauthorized", "Unauthorized"), PODS, ["refused our credentials"]),
    (500, status_body(500, "InternalError", "etcd is down"), PODS, ["HTTP 500 InternalError: etcd is down"]),
])
def test_api_errors_say_what_is_wrong_and_what_to_do(status, body, resource, needles):
    message = api_error_from(status, body, "list", resource, "ns").explain()
    for needle in needles:
        assert needle in message


def test_a_404_status_for_an_object_is_not_a_missing_crd():
    err = api_error_from(404, status_body(404, "NotFound", 'x "y" not found'), "get", POOL_V1, "ns")
    assert not err.crd_missing and "CRD" not in err.explain()


def test_backoff_doubles_with_jitter_up_to_its_cap_and_resets():
    b = Backoff(0.2, 1.0, random.Random(1))
    delays = [b.next() for _ in range(6)]
    for delay, nominal in zip(delays, [0.2, 0.4, 0.8, 1.0, 1.0, 1.0], strict=True):
        assert nominal / 2 <= delay <= nominal
    b.reset()
    assert b.next() <= 0.2
