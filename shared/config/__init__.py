"""Two kinds of configuration, read only at the edge, each a frozen pydantic model validated at start (a
bad field fails fast and is named by its path, `sinks.hook.batch_max`, or by its environment variable).

`HifiConfig` (pipeline.py, sinks.py) is the YAML file an operator writes: tenants, API keys, sinks,
subscriptions. `Settings` (settings.py) is where this process runs: broker, Redis, ports, directories.
"""

from shared.config.pipeline import (
    DEDUPE_BACKENDS,
    AuditConfig,
    DedupeConfig,
    EnrichConfig,
    HifiConfig,
    RateLimit,
    TenantConfig,
    config_keys,
    hash_api_key,
)
from shared.config.settings import Settings
from shared.config.sinks import ARCHIVE_SINK_TYPES, SINK_TYPES, SinkConfig

__all__ = [
    "ARCHIVE_SINK_TYPES",
    "DEDUPE_BACKENDS",
    "SINK_TYPES",
    "AuditConfig",
    "DedupeConfig",
    "EnrichConfig",
    "HifiConfig",
    "RateLimit",
    "Settings",
    "SinkConfig",
    "TenantConfig",
    "config_keys",
    "hash_api_key",
]
