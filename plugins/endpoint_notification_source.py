"""`endpoint-notification-source`: llm-d's data source that tells extractors when endpoints come and go."""

from __future__ import annotations

from typing import Any, ClassVar

from epp.scheduling.registry import NoParams, PluginHandle, register


@register
class EndpointNotificationSource:
    """The data-layer source llm-d wires in front of plugins that follow the pool's endpoints (the precise
    prefix cache's subscriber):

        dataLayer:
          sources:
          - pluginRef: endpoint-notification-source
            extractors:
            - pluginRef: precise-prefix-cache-producer

    Here every plugin already follows the pool directly (Pool listeners, called on every addition and
    removal), so this source scrapes nothing and forwards nothing: it exists so that llm-d configs load
    unchanged, and it checks that each extractor wired to it does follow endpoints (has
    `endpoints_changed(added, removed)`), so that a wrong wiring is an error rather than a silent no-op.
    """

    type: ClassVar[str] = "endpoint-notification-source"
    Params = NoParams

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        self.name = name
        self.extractors: list[Any] = []

    def attach_extractor(self, extractor: Any) -> None:
        """Called by the config loader for each extractor under this source. Raises ValueError when the
        extractor cannot follow endpoints."""
        if not callable(getattr(extractor, "endpoints_changed", None)):
            kind = getattr(type(extractor), "type", type(extractor).__name__)
            raise ValueError(
                f"plugin {getattr(extractor, 'name', extractor)!r} (type {kind!r}) does not follow endpoints, "
                f"so it cannot be an extractor of {self.type!r}; wire it to a metrics source, or list a plugin "
                "such as precise-prefix-cache-producer here"
            )
        self.extractors.append(extractor)
