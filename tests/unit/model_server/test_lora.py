import pytest

from epp_model_server.lora import LoRAConfigError, LoRARegistry, ResidentLoRAs, parse_lora_module


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sql=/adapters/sql", ("sql", "/adapters/sql", None)),
        ("a=b=c", ("a", "b=c", None)),
        ('{"name": "sql", "path": "/adapters/sql"}', ("sql", "/adapters/sql", None)),
        ('{"name": "sql", "path": "/p", "base_model_name": "base"}', ("sql", "/p", "base")),
    ],
)
def test_both_vllm_lora_module_forms_parse(spec, expected):
    assert parse_lora_module(spec) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("just-a-name", "expected name=path"),
        ("=path", "expected name=path"),
        ('{"name": "x"}', "'name' and 'path'"),
        ('{"name": "x", "path": "/p", "rank": 8}', "unknown key"),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_lora_modules_say_what_is_expected(spec, match):
    with pytest.raises(LoRAConfigError, match=match):
        parse_lora_module(spec)


def test_adapters_get_ids_in_order_and_names_must_be_unique():
    reg = LoRARegistry(["a=/a", '{"name": "b", "path": "/b"}'], reserved_names=["base"])
    assert [(x.name, x.id) for x in reg] == [("a", 1), ("b", 2)]
    assert reg.add("c", "/c").id == 3
    with pytest.raises(LoRAConfigError, match="already loaded"):
        reg.add("a", "/other")
    with pytest.raises(LoRAConfigError, match="clashes"):
        reg.add("base", "/x")
    reg.remove("a")
    assert reg.get("a") is None and len(reg) == 2


def test_resident_set_evicts_the_least_recently_used_idle_adapter():
    res = ResidentLoRAs(max_loras=2)
    assert res.acquire("a", busy=set()) is True
    assert res.acquire("b", busy=set()) is True
    assert res.acquire("a", busy=set()) is False  # already resident; now most recent
    assert res.acquire("c", busy=set()) is True
    assert res.names() == ["a", "c"]


def test_an_adapter_in_use_is_never_evicted():
    res = ResidentLoRAs(max_loras=1)
    res.acquire("a", busy=set())
    assert not res.can_load("b", busy={"a"})
    assert res.can_load("b", busy=set())
    with pytest.raises(RuntimeError):
        res.acquire("b", busy={"a"})
