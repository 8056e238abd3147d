"""Small fake plugins for the loader's tests, registered under `test-config-*` type names.

Each implements exactly the extension points its name says, so the tests can check how the loader slots
instances without depending on the real plugins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from epp.config import DefaultTypes
from epp.datastore.endpoint import Endpoint, Metrics
from epp.scheduling.registry import NoParams, PluginHandle, register
from epp.scheduling.types import ProfileResult, SchedulingResult


class _Fake:
    Params: ClassVar[type] = NoParams

    def __init__(self, name: str, params: Any, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self.handle = handle

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def _filter(self, state, request, endpoints):
    return endpoints


def _score(self, state, request, endpoints):
    return {ep: 1.0 for ep in endpoints}


def _pick(self, state, scores):
    return ProfileResult(tuple(scores)[:1])


@register
class FakeFilter(_Fake):
    type: ClassVar[str] = "test-config-filter"
    filter = _filter


@dataclass(frozen=True)
class ScorerParams:
    scale: float = 1.0


@register
class FakeScorer(_Fake):
    type: ClassVar[str] = "test-config-scorer"
    Params = ScorerParams
    score = _score


@register
class FakeFilterScorer(_Fake):
    type: ClassVar[str] = "test-config-filter-scorer"
    filter = _filter
    score = _score


@dataclass(frozen=True)
class PickerParams:
    max_num_of_endpoints: int = 1


@register
class FakePicker(_Fake):
    type: ClassVar[str] = "test-config-picker"
    Params = PickerParams
    pick = _pick


@register
class FakeOtherPicker(_Fake):
    type: ClassVar[str] = "test-config-other-picker"
    pick = _pick


class _Handler(_Fake):
    def pick_profiles(self, state, request, profiles, results):
        return [] if results else list(profiles.values())

    def process_results(self, state, request, results) -> SchedulingResult:
        return SchedulingResult(dict(results), next(iter(results)))


@register
class FakeSingleHandler(_Handler):
    type: ClassVar[str] = "test-config-single-handler"
    max_profiles: ClassVar[int] = 1


@register
class FakeMultiHandler(_Handler):
    type: ClassVar[str] = "test-config-multi-handler"


@register
class FakeParser(_Fake):
    type: ClassVar[str] = "test-config-parser"

    def parse_request(self, body: bytes, headers: Mapping[str, str], request_id: str):
        raise NotImplementedError

    def parse_response_chunk(self, response, chunk: bytes, streaming: bool) -> None:
        return None


@dataclass(frozen=True)
class DetectorParams:
    queue_depth_threshold: int = 5


@register
class FakeDetector(_Fake):
    """A saturation detector that is also a Filter, like the reference's utilization-detector."""

    type: ClassVar[str] = "test-config-detector"
    Params = DetectorParams
    filter = _filter

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        return 0.0


@register
class FakeSource(_Fake):
    type: ClassVar[str] = "test-config-source"
    interval_s = 0.05
    timeout_s = 1.0
    insecure_skip_verify = True

    def url(self, endpoint: Endpoint) -> str:
        return f"http://{endpoint.hostport}/metrics"

    def set_interval(self, seconds: float) -> None:
        self.interval_s = seconds


@register
class FakeExtractor(_Fake):
    type: ClassVar[str] = "test-config-extractor"

    def extract(self, text: bytes, endpoint: Endpoint, now: float) -> Metrics:
        return Metrics(update_time=now)


@dataclass(frozen=True)
class PrefixParams:
    block_size: int = 16
    lru_capacity: int = 100
    boost: float = 0.0  # the scorer's own; the producer does not take it


@dataclass(frozen=True)
class ProducerParams:
    block_size: int = 16
    lru_capacity: int = 100


@register
class FakePrefixScorer(_Fake):
    """Needs a prefix producer, as prefix-cache-scorer needs approx-prefix-cache-producer."""

    type: ClassVar[str] = "test-config-prefix-scorer"
    requires: ClassVar[tuple[str, ...]] = ("test-config-prefix-producer",)
    Params = PrefixParams
    score = _score


class _Hooks:
    def pre_request(self, request, result) -> None: ...

    def response_headers(self, request, response, endpoint) -> None: ...

    def response_body(self, request, response, endpoint, chunk) -> None: ...

    def response_complete(self, request, response, endpoint) -> None: ...


@register
class FakePrefixProducer(_Fake, _Hooks):
    type: ClassVar[str] = "test-config-prefix-producer"
    Params = ProducerParams
    produces: ClassVar[frozenset[str]] = frozenset({"prefix-match"})

    def prepare(self, request, endpoints) -> None: ...


@register
class FakeHooks(_Fake, _Hooks):
    type: ClassVar[str] = "test-config-hooks"


@register
class FakeCompleteOnly(_Fake):
    type: ClassVar[str] = "test-config-complete-only"

    def response_complete(self, request, response, endpoint) -> None: ...


@dataclass(frozen=True)
class KeyedProducerParams:
    produces: list[str] = field(default_factory=list)
    consumes: list[str] = field(default_factory=list)


@register
class FakeKeyedProducer(_Fake):
    """A data producer whose produced and consumed keys are its parameters."""

    type: ClassVar[str] = "test-config-keyed-producer"
    Params = KeyedProducerParams

    def __init__(self, name: str, params: KeyedProducerParams, handle: PluginHandle) -> None:
        super().__init__(name, params, handle)
        self.produces = frozenset(params.produces)
        self.consumes = frozenset(params.consumes)

    def prepare(self, request, endpoints) -> None: ...


@dataclass(frozen=True)
class BinderParams:
    target: str = ""


@register
class FakeBinder(_Fake):
    """Finds another plugin by name at bind time (as a scorer finds its producer)."""

    type: ClassVar[str] = "test-config-binder"
    Params = BinderParams
    score = _score

    def __init__(self, name: str, params: BinderParams, handle: PluginHandle) -> None:
        super().__init__(name, params, handle)
        self.target: Any = None
        self.plugins_at_bind: list[str] = []

    def bind(self, handle: PluginHandle) -> None:
        self.plugins_at_bind = list(handle.plugins)
        self.target = handle.plugin(self.params.target)


@register
class FakeInert(_Fake):
    """Implements no extension point."""

    type: ClassVar[str] = "test-config-inert"


@dataclass(frozen=True)
class StrictParams:
    limit: int = 1


@register
class FakeRefusingPlugin(_Fake):
    """Refuses some parameter values in its constructor (a ValueError, not a ConfigError)."""

    type: ClassVar[str] = "test-config-refusing"
    Params = StrictParams
    filter = _filter

    def __init__(self, name: str, params: StrictParams, handle: PluginHandle) -> None:
        if params.limit > 10:
            raise ValueError(f"limit {params.limit} is above 10")
        super().__init__(name, params, handle)


@register
class FakeChainStart(_Fake):
    type: ClassVar[str] = "test-config-chain-start"
    requires: ClassVar[tuple[str, ...]] = ("test-config-chain-middle",)
    filter = _filter


@register
class FakeChainMiddle(_Fake):
    type: ClassVar[str] = "test-config-chain-middle"
    requires: ClassVar[tuple[str, ...]] = ("test-config-chain-end",)


@register
class FakeChainEnd(_Fake):
    type: ClassVar[str] = "test-config-chain-end"


@register
class FakeNeedsUnknown(_Fake):
    type: ClassVar[str] = "test-config-needs-unknown"
    requires: ClassVar[tuple[str, ...]] = ("test-config-never-registered",)


FAKE_DEFAULTS = DefaultTypes(
    profile_handler="test-config-single-handler",
    picker="test-config-picker",
    parser="test-config-parser",
    saturation_detector="test-config-detector",
    metrics_source="test-config-source",
    metrics_extractor="test-config-extractor",
)


@register
class FakeNeedyParser(FakeParser):
    """A parser that requires another plugin (to check requirements of plugins added by default)."""

    type: ClassVar[str] = "test-config-needy-parser"
    requires: ClassVar[tuple[str, ...]] = ("test-config-chain-end",)
