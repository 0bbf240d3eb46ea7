"""`HifiConfig`: the YAML file an operator writes (tenants, API keys, sinks, subscriptions), one model per
section. Sinks are in sinks.py; `config_keys()` lists every key the models accept (the README's reference)."""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from shared.config.fields import EnvName, Name, Omittable, Section, config_problem, matching, validated
from shared.config.sinks import (
    ARCHIVE_SINK_TYPES,
    SINK_MODELS,
    BasicAuth,
    BearerAuth,
    SinkConfig,
    SinkSpec,
    parse_sink,
    resolve_path,
)
from shared.errors import ConfigError
from shared.event import Limits
from shared.schemas import SCHEMAS_KEYS, TenantSchemas, parse_tenant_schemas
from shared.transforms import CONSENT_KEYS, FILTER_KEYS, OPS, check_json_safe

DEDUPE_BACKENDS = ("rocksdb", "redis")


def hash_api_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _none_is_empty(value: Any) -> Any:
    """An optional section written as `dedupe:` with nothing under it is the defaults."""
    return {} if value is None else value


class RateLimit(Section):
    events_per_s: Annotated[float, Field(ge=0.001, le=1e7)]
    burst: Annotated[int, Field(ge=1, le=10**8)]

    @model_validator(mode="before")
    @classmethod
    def _burst_defaults_to_a_second(cls, data: Any) -> Any:
        rate = data.get("events_per_s") if isinstance(data, dict) else None
        if isinstance(data, dict) and "burst" not in data and isinstance(rate, int | float) and rate >= 0.001:
            return {**data, "burst": max(1, int(rate))}
        return data


class DedupeConfig(Section):
    backend: Literal["rocksdb", "redis"] = "rocksdb"
    window_s: Annotated[float, Field(ge=1, le=30 * 86_400)] = 86_400.0
    # Redis unreachable: `pause` (retry, lose and duplicate nothing) or `pass-through` (keep events
    # flowing without dedupe or ledger checks, accepting duplicates until Redis is back).
    on_redis_down: Literal["pause", "pass-through"] = "pause"


class EnrichConfig(Section):
    geoip_db: str | None = None  # a MaxMind-format .mmdb

    @field_validator("geoip_db")
    @classmethod
    def _a_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = resolve_path(value, (info.context or {}).get("base_dir"))
        if not path.is_file():
            raise config_problem(f"no such file: {path}")
        return str(path)


class AuditConfig(Section):
    """How the auditor reconciles counts, measures the SLI and pages (see README, Operating Hifi)."""

    bucket_s: Annotated[int, Field(ge=1, le=3600)] = 10  # event-time buckets of the loss ledger
    settle_s: Annotated[float, Field(ge=1, le=86_400)] = 30.0  # a bucket is reconciled this long after it ends
    slo_target: Annotated[float, Field(ge=0.5, le=0.999999)] = 0.999  # share of events delivered within SLA
    burn_alert: Annotated[float, Field(ge=0.1, le=10_000)] = 14.4  # page when 5 min and 1 h burn rates exceed it
    # A canary per tenant (reaching each of its sinks); 0 disables.
    canary_interval_s: Annotated[float, Field(ge=0, le=3600)] = 5.0
    # A partition with lag whose committed offset has not moved this long.
    stuck_after_s: Annotated[float, Field(ge=1, le=86_400)] = 60.0
    dlq_check_s: Annotated[float, Field(ge=0.5, le=3600)] = 10.0  # how often DLQ sizes are read; growth pages once
    outage_alert_after_s: Annotated[float, Field(ge=0, le=86_400)] = 30.0  # Redis or the broker failing this long
    # How long `hifi trace` finds an event (its Redis index); 0: no index.
    trace_ttl_s: Annotated[float, Field(ge=0, le=30 * 86_400)] = 3600.0


# `limits` takes exactly the fields of the collector's Limits, each a positive integer.
LimitsSection: type[Section] = create_model(  # type: ignore[call-overload]
    "LimitsSection",
    __base__=Section,
    **{f.name: (Annotated[int, Field(ge=1, le=1 << 30)], f.default) for f in fields(Limits)},
)

API_KEY = Annotated[str, matching(r"sha256:[0-9a-f]{64}", "must be 'sha256:<64 hex>' (see `hifi hash-key`)")]


class TenantSpec(Section):
    """`tenants.<t>` as written."""

    api_keys: Annotated[list[API_KEY], Field(min_length=1)]
    sinks: list[str] = []
    metadata: Annotated[dict[str, Any], BeforeValidator(_none_is_empty)] = {}
    # HMAC request signing: the secret is read from this environment variable, never from the file.
    signing_secret_env: Omittable[EnvName] = None
    rate_limit: Omittable[RateLimit] = None
    # Overrides the sinks' SLA for this tenant's events (left out: each sink's own).
    sla_ms: Omittable[Annotated[float, Field(ge=1, le=86_400_000)]] = None
    # The key of sinks' `hash` transforms for this tenant's events is read from this environment variable.
    pii_secret_env: Omittable[EnvName] = None
    # Data contract (issue 18): JSON Schemas per event type, parsed by shared/schemas.py.
    schemas: Omittable[Any] = None


class TenantConfig(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    api_key_hashes: tuple[str, ...]
    sinks: tuple[str, ...]
    metadata: dict[str, Any] = {}
    signing_secret_env: str | None = None
    rate_limit: RateLimit | None = None
    sla_ms: float | None = None
    pii_secret_env: str | None = None
    schemas: TenantSchemas | None = None  # None: no validation


class ConfigFile(Section):
    """The file's top level. Tenants and sinks are checked one by one after it (each refers to the other)."""

    tenants: dict[Name, dict[str, Any]]
    sinks: dict[Name, dict[str, Any]]
    dedupe: Annotated[DedupeConfig, BeforeValidator(_none_is_empty)] = DedupeConfig()
    enrich: Annotated[EnrichConfig, BeforeValidator(_none_is_empty)] = EnrichConfig()
    limits: Annotated[LimitsSection, BeforeValidator(_none_is_empty)] = LimitsSection()  # type: ignore[valid-type]
    audit: Annotated[AuditConfig, BeforeValidator(_none_is_empty)] = AuditConfig()


class HifiConfig(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    tenants: dict[str, TenantConfig]
    sinks: dict[str, SinkConfig]
    dedupe: DedupeConfig = DedupeConfig()
    enrich: EnrichConfig = EnrichConfig()
    limits: Limits = Limits()
    audit: AuditConfig = AuditConfig()

    def sla_ms(self, tenant: str, sink: str) -> float:
        found = self.tenants.get(tenant)
        if found is not None and found.sla_ms is not None:
            return found.sla_ms
        return self.sinks[sink].sla_ms if sink in self.sinks else 1000.0

    def subscribers(self, tenant: str) -> tuple[str, ...]:
        """The sinks a tenant's events go to: its own list, then every archive sink."""
        found = self.tenants.get(tenant)
        if found is None:
            return ()
        return found.sinks + tuple(s for s in self.archive_sinks() if s not in found.sinks)

    def archive_sinks(self) -> tuple[str, ...]:
        return tuple(name for name, sink in self.sinks.items() if sink.type in ARCHIVE_SINK_TYPES)

    @classmethod
    def load(cls, path: str | Path) -> HifiConfig:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError("(file)", f"cannot read {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("(file)", f"not valid YAML: {exc}") from None
        return cls.parse(data, base_dir=Path(path).resolve().parent)

    @classmethod
    def parse(cls, data: Any, base_dir: Path | None = None) -> HifiConfig:
        root = validated(ConfigFile, data, context={"base_dir": base_dir})
        sinks = {name: parse_sink(name, raw, set(root.tenants), base_dir) for name, raw in root.sinks.items()}
        tenants = {name: _tenant(name, raw, sinks, base_dir) for name, raw in root.tenants.items()}
        seen: dict[str, str] = {}
        for tenant in tenants.values():
            for key in tenant.api_key_hashes:
                if key in seen and seen[key] != tenant.name:
                    raise ConfigError(f"tenants.{tenant.name}.api_keys", f"key also belongs to {seen[key]}")
                seen[key] = tenant.name
        limits = Limits(**root.limits.model_dump())
        return cls(
            tenants=tenants, sinks=sinks, dedupe=root.dedupe, enrich=root.enrich, limits=limits, audit=root.audit
        )


def _tenant(name: str, raw: dict[str, Any], sinks: dict[str, SinkConfig], base_dir: Path | None) -> TenantConfig:
    where = f"tenants.{name}"
    spec = validated(TenantSpec, raw, where)
    for i, sink in enumerate(spec.sinks):
        if sink not in sinks:
            raise ConfigError(f"{where}.sinks[{i}]", f"unknown sink {sink!r}")
    hashing = next((s for s in spec.sinks if sinks[s].rules.transform.hashes), None)
    if spec.pii_secret_env is None and hashing is not None:
        raise ConfigError(f"{where}.pii_secret_env", f"required: sink {hashing!r} hashes fields")
    schemas = None if spec.schemas is None else parse_tenant_schemas(spec.schemas, f"{where}.schemas", base_dir)
    check_json_safe(spec.metadata, f"{where}.metadata")  # the enricher copies it into every event of the tenant
    return TenantConfig(
        name=name,
        api_key_hashes=tuple(spec.api_keys),
        sinks=tuple(spec.sinks),
        metadata=spec.metadata,
        signing_secret_env=spec.signing_secret_env,
        rate_limit=spec.rate_limit,
        sla_ms=spec.sla_ms,
        pii_secret_env=spec.pii_secret_env,
        schemas=schemas,
    )


def config_keys() -> dict[str, set[str]]:
    """Every key the config file accepts: section path -> keys (`<t>`/`<s>` stand for a tenant's or sink's
    name; `sinks.<s>` of type X is `sinks.<s>[type=X]`; `transform[]` holds the step names)."""
    keys: dict[str, set[str]] = {
        "(root)": set(ConfigFile.keys()),
        "tenants.<t>": set(TenantSpec.keys()),
        "tenants.<t>.rate_limit": set(RateLimit.keys()),
        "tenants.<t>.schemas": set(SCHEMAS_KEYS),
        "sinks.<s>": set(SinkSpec.keys()),
        "sinks.<s>.filter": set(FILTER_KEYS),
        "sinks.<s>.consent": set(CONSENT_KEYS),
        "sinks.<s>.transform[]": set(OPS),
        "dedupe": set(DedupeConfig.keys()),
        "enrich": set(EnrichConfig.keys()),
        "limits": set(LimitsSection.keys()),
        "audit": set(AuditConfig.keys()),
    }
    for kind, model in SINK_MODELS.items():
        keys[f"sinks.<s>[type={kind}]"] = set(model.keys() - SinkSpec.keys())
    for auth in (BearerAuth, BasicAuth):
        (kind,) = get_args(auth.model_fields["type"].annotation)
        keys[f"sinks.<s>[type=webhook].auth[type={kind}]"] = set(auth.keys())
    return keys
