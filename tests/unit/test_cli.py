"""The `epp` command line: configuration checks and the errors a user gets for a wrong invocation."""

import pytest

from epp.cli import build_parser, main


def test_validate_config_prints_the_effective_default_profile(capsys):
    assert main(["--validate-config"]) == 0
    out = capsys.readouterr().out
    assert "configuration from built-in default profile: OK" in out
    assert "scorer  prefix-cache-scorer (prefix-cache-scorer) weight 3" in out
    assert "data producer: approx-prefix-cache-producer" in out
    assert "picker  max-score-picker" in out


def test_validate_config_names_the_problem_in_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
                   "plugins:\n- type: no-such-scorer\n")
    assert main(["--validate-config", "--config-file", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "no-such-scorer" in err


def test_config_file_and_text_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--config-file", "a.yaml", "--config-text", "x"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    ([], "no pool given"),
    (["--pool-name", "my-pool"], "Kubernetes integration"),
    (["--endpoint-selector", "app=vllm"], "Kubernetes integration"),
    (["--endpoints", "10.0.0.1"], "must be host:port"),
])
def test_a_missing_or_wrong_pool_is_refused_with_what_to_do(argv, needle, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config either
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert needle in str(exc.value)


@pytest.mark.parametrize("flag,value,expected", [
    ("--secure-serving", "false", False), ("--secure-serving", "true", True),
    ("--refresh-metrics-interval", "200ms", 0.2), ("--refresh-metrics-interval", "1s", 1.0),
])
def test_go_style_flag_values(flag, value, expected):
    args = build_parser().parse_args([f"{flag}={value}"])
    assert getattr(args, flag.lstrip("-").replace("-", "_")) == expected


def test_defaults_match_the_reference_epp():
    args = build_parser().parse_args([])
    assert (args.grpc_port, args.grpc_health_port, args.metrics_port, args.secure_serving) == (9002, 9003, 9090, True)


def test_startup_objects_are_frozen_out_of_the_garbage_collectors_full_passes():
    import gc

    from epp.cli import freeze_startup_objects

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    built_at_startup = [Cycle() for _ in range(100)]
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= 100
        assert not any(gc.is_tracked(o) and o in gc.get_objects(generation=2) for o in built_at_startup[:3])
    finally:
        gc.unfreeze()
