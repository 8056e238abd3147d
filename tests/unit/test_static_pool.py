"""`--endpoints`: a static pool without Kubernetes."""

import pytest

from epp.datastore.endpoint import Endpoint
from epp.datastore.pool import Pool
from epp.datastore.static import parse_endpoints


def test_entries_with_labels():
    eps = parse_endpoints("10.0.0.1:8000, 10.0.0.2:8001;llm-d.ai/role=decode;zone=a")
    assert [(e.name, e.address, e.port) for e in eps] == [("10.0.0.1:8000", "10.0.0.1", 8000),
                                                          ("10.0.0.2:8001", "10.0.0.2", 8001)]
    assert eps[1].labels == {"llm-d.ai/role": "decode", "zone": "a"}


def test_ipv6_entries_keep_brackets_in_hostport():
    (ep,) = parse_endpoints("[fd00::1]:8000")
    assert ep.address == "fd00::1" and ep.hostport == "[fd00::1]:8000"


@pytest.mark.parametrize("spec,needle", [
    ("", "empty"),
    ("10.0.0.1", "host:port"),
    ("10.0.0.1:0", "host:port"),
    ("10.0.0.1:99999", "host:port"),
    ("10.0.0.1:80;role", "key=value"),
    ("10.0.0.1:80,10.0.0.1:80", "twice"),
])
def test_bad_entries_name_the_problem(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse_endpoints(spec)


def test_pool_replace_keeps_known_endpoints_and_notifies_changes():
    pool = Pool()
    seen = []
    pool.add_listener(lambda added, removed: seen.append(([e.name for e in added], [e.name for e in removed])))
    a, b = Endpoint("a", "10.0.0.1", 80), Endpoint("b", "10.0.0.2", 80)
    pool.replace([a, b])
    a.in_flight = 3
    pool.replace([Endpoint("a", "10.0.0.1", 80), Endpoint("c", "10.0.0.3", 80)])
    assert pool.get("a") is a and a.in_flight == 3
    assert [e.name for e in pool.endpoints] == ["a", "c"]
    assert seen == [(["a", "b"], []), (["c"], ["b"])]
