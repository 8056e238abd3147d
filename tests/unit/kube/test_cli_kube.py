"""`epp` flags of the Kubernetes mode: what they build, and the refusals a wrong invocation gets."""

import pytest

from epp.cli import build_parser, kube_options, main, make_pool
from epp.kube.client import locate_config
from epp.kube.objects import PoolSpec


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    return str(path)


def options(*argv):
    return kube_options(build_parser().parse_args(list(argv)))


def test_pool_name_builds_watch_options_and_an_empty_named_pool(kubeconfig):
    args = build_parser().parse_args(["--pool-name", "llama", "--pool-namespace", "ns", "--kubeconfig", kubeconfig])
    kube = kube_options(args)
    assert (kube.watch.pool_name, kube.watch.namespace, kube.watch.pool_group) == \
        ("llama", "ns", "inference.networking.k8s.io")
    assert kube.watch.standalone is None and kube.watch.watch_objectives
    assert kube.leader_election is None
    pool = make_pool(args, kube)
    assert (pool.name, pool.namespace, pool.endpoints, pool.synced) == ("llama", "ns", (), False)


def test_leader_election_uses_the_reference_lease_name_and_the_given_periods(kubeconfig):
    kube = options("--pool-name", "llama", "--pool-namespace", "ns", "--kubeconfig", kubeconfig,
                   "--ha-enable-leader-election", "--leader-election-retry-period", "500ms")
    le = kube.leader_election
    assert le.lease_name == "epp-ns-llama.gateway-api-inference-extension.sigs.k8s.io"
    assert (le.lease_duration_s, le.renew_deadline_s, le.retry_period_s) == (15.0, 10.0, 0.5)
    assert le.identity and le.identity != options("--pool-name", "llama", "--kubeconfig", kubeconfig,
                                                   "--ha-enable-leader-election").leader_election.identity


def test_endpoint_selector_is_standalone_mode_without_crd_watches(kubeconfig):
    kube = options("--endpoint-selector", "app=vllm,tier=gpu", "--endpoint-target-ports", "8000,8001",
                   "--kubeconfig", kubeconfig)
    assert kube.watch.standalone == PoolSpec.of({"app": "vllm", "tier": "gpu"}, [8000, 8001])
    assert not kube.watch.watch_objectives


@pytest.mark.parametrize("env,expected", [
    ({"KUBECONFIG": "{kc}"}, "{kc}"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, None),  # in a pod: the service account
    ({"KUBECONFIG": "{kc}", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}, "{kc}"),  # $KUBECONFIG first
])
def test_where_the_cluster_configuration_comes_from(kubeconfig, monkeypatch, env, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value.replace("{kc}", kubeconfig))
    assert options("--pool-name", "p").watch.pool_name == "p"  # accepted without --kubeconfig
    assert locate_config(None) == (expected.replace("{kc}", kubeconfig) if expected else None)


def test_home_kubeconfig_is_the_last_resort(kubeconfig, tmp_path):
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("apiVersion: v1\nkind: Config\n")
    assert locate_config(None) == str(tmp_path / ".kube" / "config")


@pytest.mark.parametrize("argv,needle", [
    (["--pool-name", "p", "--endpoints", "10.0.0.1:8000"], "cannot be combined"),
    (["--pool-name", "p"], "found no cluster configuration"),
    (["--pool-name", "p", "--kubeconfig", "/no/such/file"], "kubeconfig /no/such/file does not exist"),
    (["--pool-name", "p", "--pool-group", "example.com", "--kubeconfig", "{kc}"], "--pool-group 'example.com'"),
    (["--endpoint-selector", "app", "--kubeconfig", "{kc}"], "must be key=value"),
    (["--endpoint-selector", "app=x", "--endpoint-target-ports", "x", "--kubeconfig", "{kc}"],
     "--endpoint-target-ports"),
    (["--pool-name", "p", "--ha-enable-leader-election", "--leader-election-renew-deadline", "20s",
      "--kubeconfig", "{kc}"], "lease duration > renew deadline > retry period"),
])
def test_wrong_kubernetes_invocations_are_refused_with_what_to_do(kubeconfig, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main([a.replace("{kc}", kubeconfig) for a in argv])
    assert needle in str(exc.value)


def test_no_configuration_message_names_the_places_looked_at(kubeconfig):
    with pytest.raises(SystemExit) as exc:
        main(["--pool-name", "p"])
    message = str(exc.value)
    for place in ("KUBERNETES_SERVICE_HOST", "--kubeconfig", "$KUBECONFIG", "~/.kube/config", "--endpoints"):
        assert place in message
