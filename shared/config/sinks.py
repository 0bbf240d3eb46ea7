"""`sinks.<s>`: one model per sink type (the keys it takes, typed and bounded), and the SinkConfig a sender
is built from. A sink's rules (filter, consent, transform) are parsed by shared/transforms.py."""

from __future__ import annotations

import os
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from shared.config.fields import ENV_NAME, EnvName, Omittable, Section, config_problem, matching, shown, validated
from shared.errors import ConfigError
from shared.transforms import RULE_KEYS, SinkRules


@dataclass(frozen=True, config=ConfigDict(arbitrary_types_allowed=True))
class SinkConfig:
    """What a sender is built from: the common keys, and `options`, the type's own keys as written."""

    name: str
    type: str
    options: dict[str, Any]
    batch_max: int = 200
    timeout_s: float = 10.0
    # On time means acknowledged by the sink within this many ms of ingest (the SLA).
    sla_ms: float = 1000.0
    # A 5xx/timeout that follows one payload: after this many failed attempts its request is bisected and
    # the event that keeps failing while the others get through is dead-lettered.
    max_attempts_per_event: int = 10
    # What this sink takes and sees (filter, consent, transform), applied by the router (shared/transforms.py).
    rules: SinkRules = field(default_factory=SinkRules)
    # The sender fetches on this long while a batch is short of batch_max (an archive: fewer, larger objects).
    linger_s: float = 0.0


class SinkSpec(Section):
    """The keys every sink takes, whatever its type."""

    also_accepts: ClassVar[frozenset[str]] = RULE_KEYS
    type: str
    batch_max: Annotated[int, Field(ge=1, le=10_000)] = 200
    timeout_s: Annotated[float, Field(ge=0.1, le=300)] = 10.0
    sla_ms: Annotated[float, Field(ge=1, le=86_400_000)] = 1000.0
    max_attempts_per_event: Annotated[int, Field(ge=1, le=1000)] = 10
    linger_s: Annotated[float, Field(ge=0, le=600)] = 0.0
    # Kept in `options`: the sender reads it there (true: the auditor's canaries stop at the sender).
    drop_canaries: bool = False

    def options(self) -> dict[str, Any]:
        """The type's own keys as written (nothing added for a key left out), and drop_canaries."""
        own = {k for k in self.model_fields_set if k not in SinkSpec.model_fields or k == "drop_canaries"}
        return self.model_dump(include=own, exclude_unset=True)


def _one_or_two(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _one_or_two_names(names: list[str]) -> list[str]:
    if not 1 <= len(names) <= 2:
        raise config_problem("one variable name, or a list of two during a rotation")
    return names


NonEmpty = Annotated[str, matching(r"(?s).+", "required (an empty string)")]


class BearerAuth(Section):
    type: Literal["bearer"]
    token_env: EnvName


class BasicAuth(Section):
    type: Literal["basic"]
    username: Omittable[Annotated[str, matching(r"[^:]*", "must be a string without ':'")]] = None
    username_env: Omittable[EnvName] = None
    password_env: EnvName

    @model_validator(mode="after")
    def _one_username(self) -> BasicAuth:
        if (self.username is None) == (self.username_env is None):
            raise config_problem("basic auth needs username or username_env (one of them)")
        return self


class WebhookSink(SinkSpec):
    """Issue 19: the config names environment variables, never the secrets."""

    type: Literal["webhook"]
    url: Annotated[str, matching(r"(?s)https?://.*", "must start with http:// or https://")]
    headers: Omittable[dict[str, str]] = None
    # One name, or two during a rotation (both sign).
    signing_secret_env: Omittable[
        Annotated[list[EnvName], BeforeValidator(_one_or_two), AfterValidator(_one_or_two_names)]
    ] = None
    headers_env: Omittable[dict[Annotated[str, matching(r"[A-Za-z0-9-]+", "not an HTTP header name")], EnvName]] = None
    auth: Omittable[Annotated[BearerAuth | BasicAuth, Field(discriminator="type")]] = None


class KafkaSink(SinkSpec):
    type: Literal["kafka"]
    topic: NonEmpty
    bootstrap: Omittable[str] = None
    # Left out: true when the sink's cluster is the pipeline's (services/sender/kafka_sink.py).
    transactional: Omittable[bool] = None


class RedisStreamSink(SinkSpec):
    type: Literal["redis_stream"]
    stream: NonEmpty
    url: Omittable[str] = None
    maxlen: Omittable[Annotated[int, Field(ge=1, le=1 << 40)]] = None
    dedupe_window_s: Omittable[Annotated[float, Field(ge=1, le=365 * 86_400)]] = None


class FileSink(SinkSpec):
    type: Literal["file"]
    path: NonEmpty
    rotate_bytes: Annotated[int, Field(ge=1024, le=1 << 40)] = 64 * 1024 * 1024

    @field_validator("path")
    @classmethod
    def _resolved(cls, value: str, info: ValidationInfo) -> str:
        return str(resolve_path(value, (info.context or {}).get("base_dir")))

    def options(self) -> dict[str, Any]:
        return {**super().options(), "rotate_bytes": self.rotate_bytes}


class PostgresSink(SinkSpec):
    type: Literal["postgres"]
    dsn_env: Annotated[str, matching(ENV_NAME, "must be the NAME of an environment variable (the DSN is a secret)")]
    table: Annotated[
        str,
        matching(
            r"(?:[a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}",
            "must be [schema.]name in lower case letters, digits and _",
        ),
    ]


class S3ArchiveSink(SinkSpec):
    """Takes every tenant's events (README "Archive and replay"); tenants do not list it."""

    type: Literal["s3_archive"]
    bucket: NonEmpty
    endpoint: Omittable[str] = None
    region: Omittable[str] = None
    prefix: Omittable[str] = None
    access_key_env: Omittable[EnvName] = None
    secret_key_env: Omittable[EnvName] = None


SINK_MODELS: dict[str, type[SinkSpec]] = {
    "webhook": WebhookSink,
    "kafka": KafkaSink,
    "redis_stream": RedisStreamSink,
    "file": FileSink,
    "postgres": PostgresSink,
    "s3_archive": S3ArchiveSink,
}
SINK_TYPES = tuple(SINK_MODELS)
ARCHIVE_SINK_TYPES = ("s3_archive",)


def parse_sink(name: str, raw: dict[str, Any], tenant_names: set[str], base_dir: Path | None) -> SinkConfig:
    where = f"sinks.{name}"
    kind = raw.get("type")
    model = SINK_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ConfigError(
            f"{where}.type", f"must be one of {', '.join(SINK_TYPES)}, got {shown(kind, 'literal_error')}"
        )
    spec = {k: v for k, v in raw.items() if k not in RULE_KEYS}
    sink = validated(model, spec, where, {"base_dir": base_dir})
    rules = SinkRules.parse({k: v for k, v in raw.items() if k in RULE_KEYS}, where, tenant_names)
    return SinkConfig(
        name,
        sink.type,
        sink.options(),
        sink.batch_max,
        sink.timeout_s,
        sink.sla_ms,
        sink.max_attempts_per_event,
        rules,
        sink.linger_s,
    )


def resolve_path(value: str, base_dir: Path | None) -> Path:
    """Environment variables expanded; a relative path is taken from the working directory once a file is
    loaded (the services start in the checkout), and kept relative when parsing a bare mapping."""
    path = Path(os.path.expandvars(value))
    return path if path.is_absolute() or base_dir is None else (Path.cwd() / path)
