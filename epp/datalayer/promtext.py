"""A selective reader of the Prometheus text exposition format, and PromQL-like instant selectors.

A model server's `/metrics` page is tens of kilobytes (vLLM serves ~15 histogram families of 20–30 buckets
each), scraped every 50 ms from every endpoint, while the EPP needs half a dozen gauges from it. So nothing
here splits the page into lines: `FamilyReader` finds the wanted sample names with `bytes.find` (C speed)
and parses only the lines that start with them.

It relies on one rule of the format: all lines of a metric family form a single group, introduced by its
`# HELP` / `# TYPE` comments. After the first line of a wanted name the search for more lines of it stops at
the next `# TYPE` comment. Pages without `# TYPE` comments are searched to the end.

Sample lines: `name[{label="value",...}] value [timestamp]`, with `\\\\`, `\\"` and `\\n` escapes in label
values, `+Inf`/`-Inf`/`NaN` values, an optional timestamp and an optional OpenMetrics exemplar
(`# {...} v`), which is ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

__all__ = ["FamilyReader", "Matcher", "PromTextError", "Sample", "Selector", "parse_selector"]


class PromTextError(ValueError):
    """A line of a wanted family is not valid Prometheus text format."""


class Sample(NamedTuple):
    labels: Mapping[str, str]  # read-only; shared between samples with the same label block
    value: float
    timestamp: float | None  # as written (milliseconds in Prometheus text, seconds in OpenMetrics)


_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_VALUE_BODY = r'[^"\\\n]*(?:\\.[^"\\\n]*)*'  # a quoted label value's inside, `\x` escapes allowed
_PAIR = r"[ \t]*[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*\"" + _VALUE_BODY + r"\"[ \t]*"
_BLOCK_RE = re.compile(r"(?:" + _PAIR + r",)*(?:" + _PAIR + r")?[ \t]*")
_PAIRS_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*\"(" + _VALUE_BODY + r")\"")
# A whole line after the sample name, for lines the fast path declines (exemplars).
_REST_RE = re.compile(
    r"(?:[ \t]*\{(?P<labels>" + _BLOCK_RE.pattern + r")\}[ \t]*|[ \t]+)"
    r"(?P<value>[^ \t#]+)(?:[ \t]+(?P<ts>[^ \t#]+))?[ \t]*(?:#.*)?\Z"
)
_ESCAPE_RE = re.compile(r"\\(.)")
_NO_LABELS: Mapping[str, str] = MappingProxyType({})
_LABEL_CACHE_SIZE = 4096
_LINE_CACHE_SIZE = 4096


def _unescape(value: str) -> str:
    return _ESCAPE_RE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _parse_float(text: str, what: str, line: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PromTextError(f"bad {what} {text!r} in sample line {line!r}") from None


def parse_labels(block: str, line: str = "") -> dict[str, str]:
    """Parse the inside of a label block (`a="x",b="y"`). Raises PromTextError when it is malformed."""
    if _BLOCK_RE.fullmatch(block) is None:
        raise PromTextError(f"malformed label block {{{block}}} in sample line {line or block!r}")
    return {k: (_unescape(v) if "\\" in v else v) for k, v in _PAIRS_RE.findall(block)}


def parse_sample(line: str, name: str, cache: dict[str, Mapping[str, str]] | None = None) -> Sample:
    """Parse one sample line that starts with `name`. `cache` maps label blocks already seen to their
    parsed labels: model servers repeat the same label sets scrape after scrape, so each is parsed once."""
    if "# {" in line:  # an OpenMetrics exemplar: its braces would confuse the fast path
        return _parse_sample_slow(line, name)
    n = len(name)
    rest = line[n:]
    brace = rest.find("{")
    if brace >= 0 and not rest[:brace].strip(" \t"):
        head, closing, tail = rest.rpartition("}")
        if not closing:
            raise PromTextError(f"missing '}}' in sample line {line!r}")
        block = head[brace + 1 :]
        labels = cache.get(block) if cache is not None else None
        if labels is None:
            labels = MappingProxyType(parse_labels(block, line))
            if cache is not None:
                if len(cache) >= _LABEL_CACHE_SIZE:
                    cache.clear()
                cache[block] = labels
    else:
        if rest[:1] not in (" ", "\t"):
            raise PromTextError(f"malformed sample line {line!r}")
        tail = rest
        labels = _NO_LABELS
    if "#" in tail:
        tail = tail[: tail.index("#")]
    parts = tail.split()
    if len(parts) == 1:
        return Sample(labels, _parse_float(parts[0], "value", line), None)
    if len(parts) == 2:
        return Sample(
            labels, _parse_float(parts[0], "value", line), _parse_float(parts[1], "timestamp", line)
        )
    raise PromTextError(f"expected a value and an optional timestamp in sample line {line!r}")


def _parse_sample_slow(line: str, name: str) -> Sample:
    m = _REST_RE.match(line, len(name))
    if m is None:
        raise PromTextError(f"malformed sample line {line!r}")
    block = m.group("labels")
    labels = MappingProxyType(parse_labels(block, line)) if block else _NO_LABELS
    ts = m.group("ts")
    return Sample(
        labels,
        _parse_float(m.group("value"), "value", line),
        None if ts is None else _parse_float(ts, "timestamp", line),
    )


class FamilyReader:
    """Reads the samples of a fixed set of sample names (`vllm:num_requests_waiting`, `foo_bucket`, ...)
    out of an exposition. Build it once (at config time), call `read` per scrape.

    It keeps a bounded cache of parsed label blocks, so it is meant for one event loop, not for threads.
    """

    __slots__ = ("names", "_needles", "_label_cache", "_line_cache")

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(sorted(set(names)))
        for n in self.names:
            if not _NAME_RE.match(n):
                raise ValueError(f"{n!r} is not a valid Prometheus metric name")
        self._needles = tuple((n, n.encode(), b"\n" + n.encode()) for n in self.names)
        self._label_cache: dict[str, Mapping[str, str]] = {}
        # Whole sample lines already parsed: a page changes little between scrapes 50 ms apart, so most
        # lines come back byte for byte and cost one dict lookup instead of a parse.
        self._line_cache: dict[bytes, Sample] = {}

    def read(self, text: bytes) -> dict[str, list[Sample]]:
        """Samples of each wanted name present in `text`, in page order; absent names have no key.
        Raises PromTextError when a line of a wanted name is malformed."""
        out: dict[str, list[Sample]] = {}
        size = len(text)
        cache = self._label_cache
        lines = self._line_cache
        find = text.find
        for name, raw, needle in self._needles:
            starts = _line_starts(text, raw, needle, size)
            if starts:
                samples = []
                for start in starts:
                    end = find(b"\n", start)
                    raw_line = text[start:end] if end >= 0 else text[start:]
                    sample = lines.get(raw_line)
                    if sample is None:
                        line = raw_line.rstrip(b"\r").decode("utf-8", "replace")
                        sample = parse_sample(line, name, cache)
                        if len(lines) >= _LINE_CACHE_SIZE:
                            lines.clear()
                        lines[raw_line] = sample
                    samples.append(sample)
                out[name] = samples
        return out


_FOLLOWERS = frozenset(b"{ \t")


def _line_starts(text: bytes, raw: bytes, needle: bytes, size: int) -> list[int]:
    """Offsets of the lines whose sample name is exactly `raw` (not merely prefixed by it)."""
    n = len(raw)
    starts: list[int] = []
    limit = size
    pos = 0
    if text.startswith(raw) and n < size and text[n] in _FOLLOWERS:
        starts.append(0)
        pos = n
        limit = _group_end(text, pos, size)
    while True:
        p = text.find(needle, pos, limit)
        if p < 0:
            return starts
        line = p + 1
        after = line + n
        if after < size and text[after] in _FOLLOWERS:
            if not starts:
                limit = _group_end(text, after, size)
            starts.append(line)
        pos = after


def _group_end(text: bytes, pos: int, size: int) -> int:
    """Where the family whose line was found before `pos` ends: at the next family's `# TYPE` comment."""
    end = text.find(b"\n# TYPE ", pos)
    return size if end < 0 else end


# --------------------------------------------------------------------------------------------------------
# Selectors


@dataclass(frozen=True, slots=True)
class Matcher:
    label: str
    op: str  # "=", "!=", "=~", "!~"
    value: str
    regex: re.Pattern[str] | None = None

    def __call__(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.label, "")  # PromQL: an absent label reads as ""
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.regex is not None
        hit = self.regex.fullmatch(actual) is not None
        return hit if self.op == "=~" else not hit


@dataclass(frozen=True, slots=True)
class Selector:
    """An instant-vector selector `name{label="value", ...}` (operators `=`, `!=`, `=~`, `!~`)."""

    name: str
    matchers: tuple[Matcher, ...] = ()
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.name

    def matching(self, samples: Sequence[Sample]) -> list[Sample]:
        ms = self.matchers
        if not ms:
            return list(samples)
        return [s for s in samples if all(m(s.labels) for m in ms)]

    def select(self, samples: Sequence[Sample] | None) -> Sample | None:
        """The matching series with the newest timestamp; without timestamps, the first one."""
        if not samples:
            return None
        best: Sample | None = None
        for s in self.matching(samples) if self.matchers else samples:
            if best is None or (
                s.timestamp is not None and (best.timestamp is None or s.timestamp > best.timestamp)
            ):
                best = s
        return best

    def select_max_value(self, samples: Sequence[Sample] | None) -> Sample | None:
        """The matching series with the largest value (NaN values never win)."""
        best: Sample | None = None
        for s in self.matching(samples or ()):
            if math.isnan(s.value):
                continue
            if best is None or s.value > best.value:
                best = s
        return best


_SEL_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SEL_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SEL_BARE_RE = re.compile(r"[^\s,{}\"'=!~]+")
_SEL_SPACE_RE = re.compile(r"\s*")
_SEL_OP_RE = re.compile(r"=~|!~|!=|=")
_SEL_QUOTED = {'"': re.compile(r'"((?:[^"\\]|\\.)*)"'), "'": re.compile(r"'((?:[^'\\]|\\.)*)'")}


def parse_selector(text: str) -> Selector:
    """Parse `name`, `name{}` or `name{label="value", other=value, ...}`. Quotes (double or single) around
    values are optional for values without spaces, commas or braces. Raises ValueError saying what is wrong
    and where."""
    if not isinstance(text, str):
        raise ValueError(f"expected a selector string such as 'vllm:num_requests_waiting', got {text!r}")
    s = text.strip()

    def fail(pos: int, what: str) -> ValueError:
        return ValueError(
            f"invalid metric selector {text!r}: {what} at position {pos} (expected a form like "
            f'name{{label="value"}})'
        )

    m = _SEL_NAME_RE.match(s)
    if m is None:
        raise fail(0, "expected a metric name")
    name = m.group()
    pos = m.end()
    matchers: list[Matcher] = []
    ws = _SEL_SPACE_RE
    pos = ws.match(s, pos).end()
    if pos < len(s):
        if s[pos] != "{":
            raise fail(pos, f"unexpected {s[pos]!r} after the metric name")
        pos += 1
        while True:
            pos = ws.match(s, pos).end()
            if pos >= len(s):
                raise fail(pos, "missing '}'")
            if s[pos] == "}":
                pos += 1
                break
            lm = _SEL_LABEL_RE.match(s, pos)
            if lm is None:
                raise fail(pos, "expected a label name")
            label = lm.group()
            pos = ws.match(s, lm.end()).end()
            om = _SEL_OP_RE.match(s, pos)
            if om is None:
                raise fail(pos, f"expected one of = != =~ !~ after label {label!r}")
            op = om.group()
            pos = ws.match(s, om.end()).end()
            if pos < len(s) and s[pos] in _SEL_QUOTED:
                qm = _SEL_QUOTED[s[pos]].match(s, pos)
                if qm is None:
                    raise fail(pos, f"unterminated quoted value for label {label!r}")
                value = _unescape(qm.group(1))
                pos = qm.end()
            else:
                bm = _SEL_BARE_RE.match(s, pos)
                if bm is None:
                    raise fail(pos, f"expected a value for label {label!r}")
                value = bm.group()
                pos = bm.end()
            regex = None
            if op in ("=~", "!~"):
                try:
                    regex = re.compile(value)
                except re.error as exc:
                    raise fail(pos, f"bad regular expression {value!r} for label {label!r} ({exc})") from None
            matchers.append(Matcher(label, op, value, regex))
            pos = ws.match(s, pos).end()
            if pos >= len(s):
                raise fail(pos, "missing '}'")
            if s[pos] == ",":
                pos += 1
            elif s[pos] == "}":
                continue
            else:
                raise fail(pos, "expected ',' or '}' after a label matcher")
        pos = ws.match(s, pos).end()
        if pos != len(s):
            raise fail(pos, f"unexpected {s[pos:]!r} after '}}'")
    return Selector(name, tuple(matchers), s)
