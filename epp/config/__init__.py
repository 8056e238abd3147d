"""EndpointPickerConfig loading: `load_config` / `load_config_file` / `load_profile` return an `EppConfig`
with every plugin instance created, defaulted, validated and wired. Errors are `ConfigError`s that name
the source, the key and what is allowed."""

from epp.config.loader import (
    BUILTIN_DEFAULTS,
    DefaultTypes,
    EppConfig,
    implemented_points,
    load_config,
    load_config_file,
    load_profile,
    profile_names,
)
from epp.scheduling.registry import ConfigError

__all__ = [
    "BUILTIN_DEFAULTS",
    "ConfigError",
    "DefaultTypes",
    "EppConfig",
    "implemented_points",
    "load_config",
    "load_config_file",
    "load_profile",
    "profile_names",
]
