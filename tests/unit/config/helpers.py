"""Loading configs written against the fake plugins of `fakes.py`."""

from __future__ import annotations

import textwrap

import pytest

from epp.config import ConfigError, EppConfig, load_config
from epp.scheduling.registry import PluginHandle

from .fakes import FAKE_DEFAULTS

SOURCE = "cfg/test.yaml"
HEADER = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
HEADER_LINES = 2


def body(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def load(text: str, handle: PluginHandle | None = None, *, header: bool = True) -> EppConfig:
    """Loads `text` (dedented; after the standard apiVersion/kind lines unless header=False)."""
    return load_config(
        (HEADER if header else "") + body(text),
        SOURCE,
        handle if handle is not None else PluginHandle(),
        defaults=FAKE_DEFAULTS,
        builtin_plugins=False,
    )


def load_error(text: str, *, header: bool = True) -> str:
    """The message of the ConfigError that loading `text` raises; checks it names the source."""
    with pytest.raises(ConfigError) as info:
        load(text, header=header)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: "), message
    return message
