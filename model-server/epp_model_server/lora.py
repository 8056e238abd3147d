"""LoRA adapters: `--lora-modules` parsing, the adapter registry, and the resident set.

`--lora-modules` takes vLLM's two forms, any number of times: `name=path`, or a JSON object
`{"name": ..., "path": ..., "base_model_name": ...}`. Adapters get integer ids 1, 2, ... in the order
given (vLLM's `lora_int_id`), which the KV events carry as `lora_id`.

At most `--max-loras` adapters are resident ("on the GPU") at a time, and a batch can only hold requests
of resident adapters: a request whose adapter is not resident waits until a slot frees (no running
request uses the least recently used resident adapter), and loading it costs `--lora-load-ms`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


class LoRAConfigError(ValueError):
    """A bad --lora-modules entry or adapter request; the message names it and the expected forms."""


@dataclass(frozen=True, slots=True)
class LoRAAdapter:
    name: str
    path: str
    id: int
    base_model_name: str | None = None


def parse_lora_module(spec: str) -> tuple[str, str, str | None]:
    """(name, path, base_model_name) from `name=path` or `{"name":..,"path":..,"base_model_name":..}`."""
    text = spec.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise LoRAConfigError(f"--lora-modules {spec!r}: invalid JSON ({exc})") from exc
        name, path = data.get("name"), data.get("path")
        base = data.get("base_model_name")
        unknown = set(data) - {"name", "path", "base_model_name"}
        if unknown:
            raise LoRAConfigError(f"--lora-modules {spec!r}: unknown key(s) {sorted(unknown)}; "
                                  "allowed: name, path, base_model_name")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise LoRAConfigError(f"--lora-modules {spec!r}: 'name' and 'path' must be non-empty strings")
        if base is not None and not isinstance(base, str):
            raise LoRAConfigError(f"--lora-modules {spec!r}: 'base_model_name' must be a string")
        return name, path, base
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise LoRAConfigError(
            f"--lora-modules {spec!r}: expected name=path or a JSON object with 'name' and 'path'"
        )
    return name, path, None


class LoRARegistry:
    """Known adapters by name (from --lora-modules, plus runtime loads)."""

    def __init__(self, specs: Iterable[str] = (), *, reserved_names: Iterable[str] = ()) -> None:
        self._by_name: dict[str, LoRAAdapter] = {}
        self._next_id = 1
        self._reserved = set(reserved_names)
        for spec in specs:
            self.add(*parse_lora_module(spec))

    def add(self, name: str, path: str, base_model_name: str | None = None) -> LoRAAdapter:
        if name in self._reserved:
            raise LoRAConfigError(f"LoRA adapter name {name!r} clashes with a served model name")
        if name in self._by_name:
            raise LoRAConfigError(f"LoRA adapter {name!r} is already loaded")
        adapter = LoRAAdapter(name=name, path=path, id=self._next_id, base_model_name=base_model_name)
        self._next_id += 1
        self._by_name[name] = adapter
        return adapter

    def remove(self, name: str) -> LoRAAdapter:
        adapter = self._by_name.pop(name, None)
        if adapter is None:
            raise LoRAConfigError(f"LoRA adapter {name!r} is not loaded")
        return adapter

    def get(self, name: str) -> LoRAAdapter | None:
        return self._by_name.get(name)

    def __iter__(self):
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)


class ResidentLoRAs:
    """The adapters currently loaded, at most `max_loras`, in least-recently-used order."""

    def __init__(self, max_loras: int) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras}")
        self.max_loras = max_loras
        self._resident: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self._resident

    def names(self) -> list[str]:
        return list(self._resident)

    def can_load(self, name: str, busy: set[str]) -> bool:
        """Whether `name` is resident or a slot is free or held by an adapter not in `busy`."""
        if name in self._resident or len(self._resident) < self.max_loras:
            return True
        return any(n not in busy for n in self._resident)

    def acquire(self, name: str, busy: set[str]) -> bool:
        """Makes `name` resident (evicting the LRU adapter not in `busy`); True when it had to be loaded."""
        if name in self._resident:
            self._resident.move_to_end(name)
            return False
        if len(self._resident) >= self.max_loras:
            victim = next((n for n in self._resident if n not in busy), None)
            if victim is None:
                raise RuntimeError(f"no LoRA slot free for {name!r}: all {self.max_loras} in use")
            del self._resident[victim]
        self._resident[name] = None
        return True

    def discard(self, name: str) -> None:
        self._resident.pop(name, None)
