"""charts/model-server: vLLM on GPUs or epp-model-server on CPU, with prefix caching and KV events on, the
labels the InferencePool selects, and arguments the servers accept (the CPU server's own parser; vLLM's
flag names as model-server/README.md maps them)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from epp_model_server.config import parse_args
from epp_model_server.kv_publisher import KVEventsConfig
from tests.unit.charts.schemas import ROOT, describe, object_errors

POD_ENV = {"POD_IP": "10.1.2.3", "POD_NAME": "sim-model-server-7d9f-abcde", "POD_NAMESPACE": "llm"}


def render(helm, *sets, release="sim", **kw):
    r = helm.template("model-server", *sets, release=release, **kw)
    assert not r.error, r.error
    return r


def container(r) -> dict:
    (c,) = r.one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def expand(args: list[str]) -> list[str]:
    """What the kubelet passes: $(VAR) references to the container's env replaced."""
    return [re.sub(r"\$\((\w+)\)", lambda m: POD_ENV[m.group(1)], a) for a in args]


def kv_config(args: list[str]) -> dict:
    return json.loads(args[args.index("--kv-events-config") + 1])


@pytest.mark.parametrize("engine", ["sim", "torch", "vllm"])
def test_each_engine_renders_valid_objects_that_lint(helm, engine):
    r = render(helm, f"engine={engine}")
    assert {o["kind"] for o in r.objects} == {"Deployment"}
    errors = object_errors(r.objects)
    assert {describe(r.objects[i]): e for i, e in errors.items() if e} == {}
    lint = helm.run("lint", "--strict", str(ROOT / "charts" / "model-server"), "--set", f"engine={engine}")
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize("engine", ["sim", "torch"])
def test_the_cpu_server_accepts_its_arguments(helm, engine):
    c = container(render(helm, f"engine={engine}", "model=org/tiny-1b"))
    assert c["command"] == ["epp-model-server"]
    cfg = parse_args(expand(c["args"]))
    assert cfg.engine == engine
    assert (cfg.host, cfg.port, cfg.model) == ("0.0.0.0", 8000, "org/tiny-1b")
    assert cfg.enable_prefix_caching is True and cfg.block_size == 16
    assert cfg.pod_name == POD_ENV["POD_NAME"]
    assert cfg.hash_seed == "0"
    # The publisher config is one the server's own loader takes.
    events = KVEventsConfig.from_json(cfg.kv_events_config)
    assert events.endpoint == "tcp://*:5557"


def test_kv_events_follow_the_contract_and_the_precise_profile(helm):
    args = expand(container(render(helm, "model=org/tiny-1b")).get("args"))
    cfg = kv_config(args)
    precise = yaml.safe_load((ROOT / "epp" / "profiles" / "precise.yaml").read_text())
    discovery = next(p for p in precise["plugins"] if p["type"] == "precise-prefix-cache-producer")[
        "parameters"
    ]["kvEventsConfig"]
    port, replay = (
        discovery["podDiscoveryConfig"]["socketPort"],
        discovery["podDiscoveryConfig"]["replaySocketPort"],
    )
    assert cfg == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port}",
        "replay_endpoint": f"tcp://*:{replay}",
        "topic": "kv@10.1.2.3:8000@org/tiny-1b",
    }
    assert cfg["topic"].startswith(discovery["topicFilter"])
    ports = {p["name"]: p["containerPort"] for p in container(render(helm, "model=org/tiny-1b"))["ports"]}
    assert ports == {"http": 8000, "kv-events": port, "kv-replay": replay}


def test_the_served_name_is_the_one_in_the_topic(helm):
    c = container(
        render(helm, "engine=vllm", "model=/models/llama", set_json=('servedModelNames=["llama","l3"]',))
    )
    args = expand(c["args"])
    assert args[args.index("--served-model-name") + 1 : args.index("--served-model-name") + 3] == [
        "llama",
        "l3",
    ]
    assert kv_config(args)["topic"] == "kv@10.1.2.3:8000@llama"


def test_vllm_runs_on_a_gpu_with_prefix_caching_and_kv_events(helm):
    c = container(render(helm, "engine=vllm"))
    assert c["command"] == ["vllm", "serve"]
    args = expand(c["args"])
    assert args[0] == "meta-llama/Llama-3.1-8B-Instruct"
    assert "--enable-prefix-caching" in args
    assert kv_config(args)["enable_kv_cache_events"] is True
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e for e in c["env"]}
    assert env["PYTHONHASHSEED"]["value"] == "0"  # block hashes agree across pods
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/dev/shm" in mounts
    # No epp-model-server-only flags reach vLLM.
    assert not {"--engine", "--pod-name", "--hash-seed"} & set(args)


def test_vllm_can_read_a_hugging_face_token(helm):
    c = container(render(helm, "engine=vllm", "huggingFace.tokenSecretName=hf"))
    token = next(e for e in c["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}


@pytest.mark.parametrize("engine", ["sim", "vllm"])
def test_switches_turn_caching_events_and_lora_on_and_off(helm, engine):
    off = expand(
        container(render(helm, f"engine={engine}", "kvEvents.enabled=false", "enablePrefixCaching=false"))[
            "args"
        ]
    )
    assert "--kv-events-config" not in off and "--no-enable-prefix-caching" in off
    lora = expand(
        container(
            render(
                helm,
                f"engine={engine}",
                "lora.maxLoras=2",
                set_json=('lora.modules=["food-review=/adapters/food"]',),
            )
        )["args"]
    )
    assert lora[lora.index("--max-loras") + 1] == "2"
    assert lora[lora.index("--lora-modules") + 1] == "food-review=/adapters/food"


def test_cpu_pods_run_unprivileged_on_a_read_only_root(helm):
    r = render(helm)
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container(r)["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_inferencepool_chart_selects_these_pods(helm):
    ms = render(helm, release="sim")
    pod_labels = ms.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["inference.networking.k8s.io/engine-type"] == "vllm"
    app = pod_labels["app"]
    assert f"matchLabels.app={app}" in ms.notes
    pool = helm.template("inferencepool", f"inferencePool.modelServers.matchLabels.app={app}").one(
        "InferencePool"
    )
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    served_ports = {p["containerPort"] for p in container(ms)["ports"]}
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= served_ports


def test_the_notes_say_how_to_reach_a_pod(helm):
    notes = render(helm).notes
    assert "charts/inferencepool" in notes
    assert "curl -s http://127.0.0.1:8000/v1/completions" in notes
