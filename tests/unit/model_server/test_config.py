import pytest

from epp_model_server.cli import main
from epp_model_server.config import SIM_DEFAULT_NUM_GPU_BLOCKS, TORCH_DEFAULT_NUM_GPU_BLOCKS, parse_args
from epp_model_server.server import cache_config_labels


def test_defaults_follow_vllm_where_the_meaning_is_the_same():
    cfg = parse_args([])
    assert (cfg.host, cfg.port, cfg.block_size, cfg.enable_prefix_caching) == ("0.0.0.0", 8000, 16, True)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_loras) == (256, 8192, 1)
    assert cfg.served_names == [cfg.model]


def test_served_names_lora_modules_and_prefix_caching_switch():
    cfg = parse_args(["--served-model-name", "a", "b", "--lora-modules", "x=/x", '{"name":"y","path":"/y"}',
                      "--lora-modules", "z=/z", "--no-enable-prefix-caching"])
    assert cfg.served_names == ["a", "b"]
    assert cfg.lora_modules == ("x=/x", '{"name":"y","path":"/y"}', "z=/z") and cfg.lora_enabled
    assert cfg.enable_prefix_caching is False


def test_num_gpu_blocks_defaults_per_engine_and_accepts_vllms_override_spelling():
    assert parse_args([]).gpu_blocks == SIM_DEFAULT_NUM_GPU_BLOCKS
    assert parse_args(["--engine", "torch"]).gpu_blocks == TORCH_DEFAULT_NUM_GPU_BLOCKS
    assert parse_args(["--num-gpu-blocks-override", "77"]).gpu_blocks == 77


def test_hash_seed_comes_from_pythonhashseed_unless_given(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    assert parse_args([]).hash_seed == "42"
    assert parse_args(["--hash-seed", "7"]).hash_seed == "7"
    monkeypatch.delenv("PYTHONHASHSEED")
    assert parse_args([]).hash_seed == "0"


def test_pod_name_is_the_flag_then_pod_name_env_then_the_host(monkeypatch):
    monkeypatch.delenv("POD_NAME", raising=False)
    assert parse_args(["--host", "127.0.0.5"]).resolved_pod_name() == "127.0.0.5"
    monkeypatch.setenv("POD_NAME", "vllm-0")
    assert parse_args(["--host", "127.0.0.5"]).resolved_pod_name() == "vllm-0"
    assert parse_args(["--pod-name", "p"]).resolved_pod_name() == "p"


def test_cache_config_info_labels_carry_the_block_geometry():
    labels = cache_config_labels(parse_args(["--block-size", "32", "--num-gpu-blocks", "100"]))
    assert (labels["block_size"], labels["num_gpu_blocks"], labels["enable_prefix_caching"]) == ("32", "100", "True")


@pytest.mark.parametrize("argv", [["--block-size", "0"], ["--port", "70000"], ["--time-scale", "0"],
                                  ["--engine", "gpu"]])
def test_invalid_flags_exit_with_usage_error(argv):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


def test_a_bad_lora_module_stops_the_server_with_a_message(capsys):
    assert main(["--host", "127.0.0.1", "--port", "0", "--lora-modules", "no-path-here"]) == 2
    assert "expected name=path" in capsys.readouterr().err
