"""`Settings`: where this process runs (broker, Redis, ports, directories), one environment variable a field,
read in `from_env` only."""

from __future__ import annotations

import os
import re
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import ConfigError

SECRET_FIELDS = ("read_token", "admin_token", "sentry_dsn")
URL_FIELDS = ("redis_url", "trace_redis_url")  # may carry a password


class Settings(BaseModel):
    """Where this process runs. Each field has one environment variable, read in `from_env` only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config_path: str = "config/hifi.yaml"  # HIFI_CONFIG
    broker: str = "127.0.0.1:9092"  # HIFI_BROKER: host:port[,host:port]
    redis_url: str = "redis://127.0.0.1:6379/0"  # HIFI_REDIS_URL
    # The `hifi trace` index (the auditor writes it, `hifi trace` reads it); default: `trace_index_url`.
    trace_redis_url: str | None = None  # HIFI_TRACE_REDIS_URL
    data_dir: str = "var"  # HIFI_DATA_DIR: RocksDB tables and file sinks
    web_host: str = "127.0.0.1"  # HIFI_WEB_HOST
    # How other workers reach this one (table lookups are forwarded to the owner); default: web_host,
    # or the hostname when listening on every interface. In Kubernetes: the pod IP.
    advertised_host: str | None = None  # HIFI_ADVERTISED_HOST
    web_port: int | None = None  # HIFI_WEB_PORT: default per service
    partitions: int = 4  # HIFI_PARTITIONS
    replication: int = 1  # HIFI_REPLICATION
    min_insync: int = 1  # HIFI_MIN_INSYNC
    sentry_dsn: str | None = None  # SENTRY_DSN
    environment: str = "dev"  # HIFI_ENV
    log_level: str = "info"  # HIFI_LOG_LEVEL
    namespace: str = ""  # HIFI_NAMESPACE: prefix of topics and consumer groups
    shutdown_grace_s: float = 20.0  # HIFI_SHUTDOWN_GRACE_S: SIGTERM drains for at most this long
    table_checkpoint_s: float = 10.0  # HIFI_TABLE_CHECKPOINT_S: how often RocksDB tables save their changelog offset
    # 1: every worker of a RocksDB stage keeps warm copies of the partitions it does not own (a takeover replays
    # only the changelog's tail); it reads every changelog partition and keeps the whole window on its volume.
    standby_replicas: int = Field(1, ge=0, le=1)  # HIFI_STANDBY_REPLICAS
    # After a planned stop, a worker brings its standbys up to the changelog's end for at most this long before it
    # joins its group (its peer keeps the partitions moving meanwhile); 0: join at once.
    standby_warm_up_s: float = Field(60.0, ge=0)  # HIFI_STANDBY_WARM_UP_S
    read_token: str | None = None  # HIFI_READ_TOKEN: bearer token for /stats and table views
    admin_token: str | None = None  # HIFI_ADMIN_TOKEN: bearer token for admin actions (also reads)
    redact_fields: str = ""  # HIFI_REDACT_FIELDS: payload fields masked in views, comma-separated
    # This worker's stable name (the StatefulSet pod name, or `hifi up`'s label): its static group membership.
    worker_id: str | None = None  # HIFI_WORKER_ID
    # How long the group waits for a silent member: a static one's partitions stay with it that long.
    session_timeout_s: float = 10.0  # HIFI_SESSION_TIMEOUT_S: within the broker's group.min/max.session.timeout.ms
    # After a SIGTERM's drain, a static member leaves its group ("yes": its partitions move at once), or keeps
    # them for its restart ("no": nothing to restore elsewhere, but they wait for it). "auto": leave, unless the
    # stage has RocksDB state and HIFI_STANDBY_REPLICAS=0 (without warm standbys a takeover restores the window)
    # or no other member is in the group. An unfinished drain never leaves.
    leave_group_on_stop: Literal["auto", "yes", "no"] = "auto"  # HIFI_LEAVE_GROUP_ON_STOP
    # Net container allocations between young collections (shared/gc_policy.py: why not CPython's 700); 0: CPython's
    gc_young_threshold: int = Field(50_000, ge=0)  # HIFI_GC_YOUNG_THRESHOLD

    ENV: ClassVar[dict[str, str]] = {
        "config_path": "HIFI_CONFIG",
        "broker": "HIFI_BROKER",
        "redis_url": "HIFI_REDIS_URL",
        "trace_redis_url": "HIFI_TRACE_REDIS_URL",
        "data_dir": "HIFI_DATA_DIR",
        "web_host": "HIFI_WEB_HOST",
        "advertised_host": "HIFI_ADVERTISED_HOST",
        "web_port": "HIFI_WEB_PORT",
        "partitions": "HIFI_PARTITIONS",
        "replication": "HIFI_REPLICATION",
        "min_insync": "HIFI_MIN_INSYNC",
        "sentry_dsn": "SENTRY_DSN",
        "environment": "HIFI_ENV",
        "log_level": "HIFI_LOG_LEVEL",
        "namespace": "HIFI_NAMESPACE",
        "shutdown_grace_s": "HIFI_SHUTDOWN_GRACE_S",
        "table_checkpoint_s": "HIFI_TABLE_CHECKPOINT_S",
        "standby_replicas": "HIFI_STANDBY_REPLICAS",
        "standby_warm_up_s": "HIFI_STANDBY_WARM_UP_S",
        "read_token": "HIFI_READ_TOKEN",
        "admin_token": "HIFI_ADMIN_TOKEN",
        "redact_fields": "HIFI_REDACT_FIELDS",
        "worker_id": "HIFI_WORKER_ID",
        "session_timeout_s": "HIFI_SESSION_TIMEOUT_S",
        "leave_group_on_stop": "HIFI_LEAVE_GROUP_ON_STOP",
        "gc_young_threshold": "HIFI_GC_YOUNG_THRESHOLD",
    }

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Unset or empty variables keep the default; a value of the wrong kind is named by its variable."""
        env = dict(os.environ if env is None else env)
        values = {name: env[var] for name, var in cls.ENV.items() if env.get(var, "") != ""}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            var = cls.ENV[str(error["loc"][0])]
            problem = error["msg"].replace("Input should be ", "must be ", 1)
            raise ConfigError(var, f"{problem}, got {error['input']!r}") from None

    def __repr_args__(self) -> Any:
        """Logged at start-up (repr and str): never print tokens, the Sentry DSN or a password in a Redis URL."""
        for name, value in super().__repr_args__():
            if name in SECRET_FIELDS and value:
                value = "[redacted]"
            elif name in URL_FIELDS and value:
                value = re.sub(r"//[^@/]*@", "//[redacted]@", value)
            yield name, value

    @property
    def trace_index_url(self) -> str:
        """Where the trace index lives: HIFI_TRACE_REDIS_URL, else the pipeline's Redis server in the next db
        (its own keyspace, but the same memory: production should give it its own server, see README)."""
        if self.trace_redis_url:
            return self.trace_redis_url
        parts = urlsplit(self.redis_url)
        if parts.scheme not in ("redis", "rediss"):
            return self.redis_url
        db = int(parts.path.strip("/") or 0)
        return urlunsplit(parts._replace(path=f"/{db + 1 if db < 15 else db - 1}"))

    def as_env(self) -> dict[str, str]:
        return {var: str(getattr(self, name)) for name, var in self.ENV.items() if getattr(self, name) is not None}
