"""The selective Prometheus text reader and the instant selectors."""

from __future__ import annotations

import math
import time

import pytest

from epp.datalayer.promtext import FamilyReader, PromTextError, Sample, parse_sample, parse_selector

from .expositions import VLLM_HISTOGRAMS, vllm_exposition

# ---------------------------------------------------------------------------------------------------------
# Single sample lines


@pytest.mark.parametrize(
    ("line", "name", "labels", "value", "timestamp"),
    [
        ("up 1", "up", {}, 1.0, None),
        ("up\t1", "up", {}, 1.0, None),
        ("up 1 1700000000000", "up", {}, 1.0, 1700000000000.0),
        ('g{a="x"} 2.5', "g", {"a": "x"}, 2.5, None),
        ('g{a="x",} 2.5', "g", {"a": "x"}, 2.5, None),
        ('g{ a = "x" , b="y" } 2.5 -12', "g", {"a": "x", "b": "y"}, 2.5, -12.0),
        ("g{} 3", "g", {}, 3.0, None),
        ('g {a="x"} 3', "g", {"a": "x"}, 3.0, None),
        ('g{a="x"}3', "g", {"a": "x"}, 3.0, None),
        ("g 1.5e-3", "g", {}, 0.0015, None),
        ("g -2E+4", "g", {}, -20000.0, None),
        ("g +Inf", "g", {}, math.inf, None),
        ("g -Inf", "g", {}, -math.inf, None),
        ('h_bucket{le="+Inf"} 7', "h_bucket", {"le": "+Inf"}, 7.0, None),
        ("g 4 # a trailing comment", "g", {}, 4.0, None),
        ('g{a="x"} 4 1700000000.5 # {trace_id="abc"} 0.5 1700000000.1', "g", {"a": "x"}, 4.0, 1700000000.5),
        # Escapes in label values: backslash, double quote, newline.
        (r'g{path="C:\\dir\\file"} 1', "g", {"path": "C:\\dir\\file"}, 1.0, None),
        (r'g{msg="say \"hi\""} 1', "g", {"msg": 'say "hi"'}, 1.0, None),
        (r'g{msg="two\nlines"} 1', "g", {"msg": "two\nlines"}, 1.0, None),
        # Braces, commas, equals and '#' inside a quoted value are data.
        ('g{a="{x},y=z # not a comment"} 9', "g", {"a": "{x},y=z # not a comment"}, 9.0, None),
        ('g{a=""} 0', "g", {"a": ""}, 0.0, None),
        (
            'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b"} 1.7e+09',
            "vllm:lora_requests_info",
            {"max_lora": "4", "running_lora_adapters": "a,b"},
            1.7e9,
            None,
        ),
    ],
)
def test_a_sample_line_gives_its_labels_value_and_timestamp(line, name, labels, value, timestamp):
    sample = parse_sample(line, name)
    assert dict(sample.labels) == labels
    assert sample.value == value
    assert sample.timestamp == timestamp


def test_nan_values_are_read_as_nan():
    assert math.isnan(parse_sample("g NaN", "g").value)
    assert math.isnan(parse_sample('g{a="1"} NaN 17', "g").value)


@pytest.mark.parametrize(
    "line",
    [
        "g",  # no value
        "g{} ",  # no value after labels
        "g notanumber",
        "g 1 2 3",  # too many fields
        "g 1 later",  # bad timestamp
        'g{a="x" 1',  # unclosed label block
        "g{a=x} 1",  # unquoted label value
        'g{a="x"b="y"} 1',  # missing comma
        'g{1a="x"} 1',  # bad label name
        'g{a="x} 1',  # unterminated value
        "gx 1",  # not this sample name at all
    ],
)
def test_a_malformed_line_is_an_error_that_quotes_the_line(line):
    with pytest.raises(PromTextError) as info:
        parse_sample(line, "g")
    assert repr(line)[1:-1][:10] in str(info.value)


def test_label_sets_parsed_once_are_reused_from_the_cache():
    cache: dict = {}
    a = parse_sample('g{model="m",engine="0"} 1', "g", cache)
    b = parse_sample('g{model="m",engine="0"} 2', "g", cache)
    assert a.labels is b.labels
    assert (a.value, b.value) == (1.0, 2.0)
    assert len(cache) == 1


def test_sample_labels_are_read_only():
    sample = parse_sample('g{a="x"} 1', "g")
    with pytest.raises(TypeError):
        sample.labels["a"] = "y"  # type: ignore[index]


# ---------------------------------------------------------------------------------------------------------
# Picking families out of a page

PAGE = b"""# HELP wanted A gauge we want.
# TYPE wanted gauge
wanted{shard="0"} 1
wanted{shard="1"} 2 1700000000000
# HELP wanted_total A counter whose name starts with the wanted one.
# TYPE wanted_total counter
wanted_total 99
# HELP other Not asked for.
# TYPE other gauge
other{note="wanted 5"} 3
# HELP hist A histogram.
# TYPE hist histogram
hist_bucket{le="0.1"} 1
hist_bucket{le="+Inf"} 4
hist_count 4
hist_sum 0.7
"""


def test_reader_returns_only_the_asked_names_in_page_order():
    found = FamilyReader(["wanted", "hist_count", "absent"]).read(PAGE)
    assert set(found) == {"wanted", "hist_count"}
    assert [dict(s.labels) for s in found["wanted"]] == [{"shard": "0"}, {"shard": "1"}]
    assert [s.value for s in found["wanted"]] == [1.0, 2.0]
    assert found["wanted"][1].timestamp == 1700000000000.0
    assert found["hist_count"] == [Sample({}, 4.0, None)]


def test_a_name_that_only_prefixes_another_name_does_not_match_it():
    found = FamilyReader(["wanted_tot", "hist"]).read(PAGE)
    assert found == {}


def test_help_and_type_comments_and_other_families_are_skipped():
    # "wanted 5" appears inside another family's label value and in comments: neither is a sample line.
    found = FamilyReader(["wanted"]).read(PAGE)
    assert len(found["wanted"]) == 2


def test_the_first_line_of_the_page_and_a_last_line_without_newline_are_read():
    found = FamilyReader(["a", "b"]).read(b'a 1\nb{x="y"} 2')
    assert found["a"][0].value == 1.0
    assert found["b"][0].value == 2.0


def test_crlf_line_endings_are_accepted():
    found = FamilyReader(["a", "b"]).read(b"# TYPE a gauge\r\na 1\r\n# TYPE b gauge\r\nb 2 123\r\n")
    assert (found["a"][0].value, found["b"][0].value, found["b"][0].timestamp) == (1.0, 2.0, 123.0)


def test_a_page_without_type_comments_is_searched_to_the_end():
    found = FamilyReader(["g"]).read(b'g{i="1"} 1\nh 0\ng{i="2"} 2\n')
    assert [s.value for s in found["g"]] == [1.0, 2.0]


def test_a_malformed_line_of_a_wanted_family_is_an_error():
    with pytest.raises(PromTextError, match="wanted"):
        FamilyReader(["wanted"]).read(b"# TYPE wanted gauge\nwanted{a=1} 2\n")


def test_malformed_lines_of_other_families_are_ignored():
    found = FamilyReader(["ok"]).read(b"broken{{{ x y z\nok 1\n")
    assert found["ok"][0].value == 1.0


def test_an_invalid_metric_name_is_refused_when_the_reader_is_built():
    with pytest.raises(ValueError, match="not a valid Prometheus metric name"):
        FamilyReader(["has space"])


def test_a_realistic_vllm_page_yields_the_gauges_and_histogram_lines_asked_for():
    page = vllm_exposition(waiting=7, running=3, kv=0.125, lora_series=[(1.0, "a", "", 2), (2.0, "b", "", 2)])
    assert 35_000 < len(page) < 50_000
    ttft = VLLM_HISTOGRAMS[0][0]
    found = FamilyReader(
        [
            "vllm:num_requests_waiting",
            "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc",
            "vllm:lora_requests_info",
            f"{ttft}_bucket",
            f"{ttft}_count",
        ]
    ).read(page)
    assert found["vllm:num_requests_waiting"][0].value == 7.0
    assert found["vllm:num_requests_running"][0].value == 3.0
    assert found["vllm:kv_cache_usage_perc"][0].value == 0.125
    assert [s.labels["running_lora_adapters"] for s in found["vllm:lora_requests_info"]] == ["a", "b"]
    buckets = found[f"{ttft}_bucket"]
    assert len(buckets) == len(VLLM_HISTOGRAMS[0][2]) + 1
    assert buckets[-1].labels["le"] == "+Inf"
    assert found[f"{ttft}_count"][0].value == buckets[-1].value


def test_reading_a_vllm_page_costs_far_less_than_tokenising_every_line():
    """Not a benchmark (see the report for figures); a guard against regressing to a whole-page parse.
    The selective read must beat a plain split of the page into lines and fields, which does far less
    than a real full parse."""
    page = vllm_exposition()
    reader = FamilyReader(
        [
            "vllm:num_requests_waiting",
            "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc",
            "vllm:lora_requests_info",
            "vllm:cache_config_info",
        ]
    )
    reader.read(page)

    def best(fn, n=50):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times.append(time.perf_counter() - t0)
        return min(times) / n

    selective = best(lambda: reader.read(page))
    tokenise = best(lambda: [line.split() for line in page.decode().splitlines() if not line.startswith("#")])
    assert selective < tokenise


# ---------------------------------------------------------------------------------------------------------
# Selectors


@pytest.mark.parametrize(
    ("text", "name", "matchers"),
    [
        ("vllm:num_requests_waiting", "vllm:num_requests_waiting", []),
        ("  spaced_name  ", "spaced_name", []),
        ("m{}", "m", []),
        ('m{request_type="waiting"}', "m", [("request_type", "=", "waiting")]),
        ("m{request_type=waiting}", "m", [("request_type", "=", "waiting")]),
        ("m{request_type='waiting'}", "m", [("request_type", "=", "waiting")]),
        ('m{ a = "x y" , b != z , }', "m", [("a", "=", "x y"), ("b", "!=", "z")]),
        ('m{a=~"v.*",b!~"x|y"}', "m", [("a", "=~", "v.*"), ("b", "!~", "x|y")]),
        (r'm{a="quote \" inside"}', "m", [("a", "=", 'quote " inside')]),
        ('m{a=""}', "m", [("a", "=", "")]),
        (
            "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}",
            "nv_trt_llm_kv_cache_block_metrics",
            [("kv_cache_block_type", "=", "tokens_per")],
        ),
    ],
)
def test_valid_selectors_parse_to_a_name_and_matchers(text, name, matchers):
    sel = parse_selector(text)
    assert sel.name == name
    assert [(m.label, m.op, m.value) for m in sel.matchers] == matchers


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "expected a metric name"),
        ("9lives", "expected a metric name"),
        ('{a="b"}', "expected a metric name"),
        ("m{", "missing '}'"),
        ('m{a="b"', "missing '}'"),
        ("m{a}", "expected one of = != =~ !~"),
        ("m{a=}", "expected a value"),
        ("m{a==b}", "expected a value"),
        ('m{a="b}', "unterminated quoted value"),
        ('m{a="b" c="d"}', "expected ',' or '}'"),
        ('m{="b"}', "expected a label name"),
        ('m{a=~"("}', "bad regular expression"),
        ('m{a="b"} extra', "unexpected"),
        ("m extra", "unexpected"),
        ("m[5m]", "unexpected"),
    ],
)
def test_invalid_selectors_are_refused_with_what_is_wrong(text, complaint):
    with pytest.raises(ValueError, match="invalid metric selector") as info:
        parse_selector(text)
    assert complaint in str(info.value)


def test_a_selector_must_be_a_string():
    with pytest.raises(ValueError, match="expected a selector string"):
        parse_selector(5)  # type: ignore[arg-type]


SERIES = [
    Sample({"type": "waiting", "pod": "a"}, 1.0, None),
    Sample({"type": "scheduled", "pod": "a"}, 2.0, None),
    Sample({"type": "waiting", "pod": "b"}, 3.0, None),
    Sample({"pod": "c"}, 4.0, None),
]


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("m", [1.0, 2.0, 3.0, 4.0]),
        ('m{type="waiting"}', [1.0, 3.0]),
        ('m{type!="waiting"}', [2.0, 4.0]),
        ('m{type=~"wait.*"}', [1.0, 3.0]),
        ('m{type=~"wait"}', []),  # regexes match the whole value
        ('m{type!~"wait.*|sched.*"}', [4.0]),
        ('m{type=""}', [4.0]),  # an absent label reads as ""
        ('m{type="waiting",pod="b"}', [3.0]),
    ],
)
def test_matchers_filter_series_by_their_labels(text, values):
    assert [s.value for s in parse_selector(text).matching(SERIES)] == values


def test_select_takes_the_newest_timestamp_else_the_first_match():
    sel = parse_selector("m")
    assert sel.select(SERIES).value == 1.0
    stamped = [Sample({}, 1.0, 100.0), Sample({}, 2.0, 300.0), Sample({}, 3.0, 200.0), Sample({}, 4.0, None)]
    assert sel.select(stamped).value == 2.0
    assert sel.select([]) is None
    assert sel.select(None) is None
    assert parse_selector('m{type="nope"}').select(SERIES) is None


def test_select_max_value_takes_the_largest_value_and_skips_nan():
    sel = parse_selector('m{type="waiting"}')
    assert sel.select_max_value(SERIES).value == 3.0
    assert (
        parse_selector("m").select_max_value([Sample({}, math.nan, None), Sample({}, -1.0, None)]).value
        == -1.0
    )
    assert sel.select_max_value(None) is None
