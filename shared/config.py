"""Two kinds of configuration, read only at the edge.

`HifiConfig` is the YAML file an operator writes: tenants, API keys, sinks, subscriptions.
`Settings` is where this process runs: broker, Redis, ports, directories (environment variables).
Both are frozen and validated at start; a bad field fails fast and is named.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from shared.errors import ConfigError
from shared.event import Limits
from shared.schemas import SCHEMAS_KEYS, TenantSchemas, parse_tenant_schemas
from shared.transforms import CONSENT_KEYS, FILTER_KEYS, OPS, RULE_KEYS, SinkRules

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SINK_TYPES = ("webhook", "kafka", "redis_stream", "file", "postgres", "s3_archive")
# An archive sink takes every tenant's events (README "Archive and replay"); tenants do not list it.
ARCHIVE_SINK_TYPES = ("s3_archive",)
DEDUPE_BACKENDS = ("rocksdb", "redis")


def hash_api_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class SinkConfig:
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


@dataclass(frozen=True)
class RateLimit:
    events_per_s: float
    burst: int


@dataclass(frozen=True)
class TenantConfig:
    name: str
    api_key_hashes: tuple[str, ...]
    sinks: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    # HMAC request signing: the secret is read from this environment variable, never from the file.
    signing_secret_env: str | None = None
    rate_limit: RateLimit | None = None
    # Overrides the sinks' SLA for this tenant's events (None: each sink's own).
    sla_ms: float | None = None
    # The key of sinks' `hash` transforms for this tenant's events is read from this environment variable.
    pii_secret_env: str | None = None
    # Data contract (issue 18): JSON Schemas per event type, enforce or warn; None: no validation.
    schemas: TenantSchemas | None = None


@dataclass(frozen=True)
class DedupeConfig:
    backend: str = "rocksdb"
    window_s: float = 86_400.0
    # Redis unreachable: `pause` (retry, lose and duplicate nothing) or `pass-through` (keep events
    # flowing without dedupe or ledger checks, accepting duplicates until Redis is back).
    on_redis_down: str = "pause"


@dataclass(frozen=True)
class AuditConfig:
    """How the auditor reconciles counts, measures the SLI and pages (see README, Operating Hifi)."""

    bucket_s: int = 10  # event-time buckets of the loss ledger
    settle_s: float = 30.0  # a bucket is reconciled this long after it ends
    slo_target: float = 0.999  # share of events delivered within SLA
    burn_alert: float = 14.4  # page when both the 5 min and 1 h burn rates exceed this
    canary_interval_s: float = 5.0  # a canary per tenant (reaching each of its sinks); 0 disables
    stuck_after_s: float = 60.0  # a partition with lag whose committed offset has not moved this long
    dlq_check_s: float = 10.0  # how often DLQ sizes are read; any growth pages once per episode
    outage_alert_after_s: float = 30.0  # Redis or the broker failing this long pages
    trace_ttl_s: float = 3600.0  # how long `hifi trace` finds an event (its Redis index); 0: no index


@dataclass(frozen=True)
class EnrichConfig:
    geoip_db: str | None = None


# --- Every key the config file accepts, per section: the parser's `_only` checks use these, and
# `config_keys()` (and so the README's reference, tests/test_readme.py) reads them, so they cannot drift. ---
ROOT_KEYS = frozenset({"tenants", "sinks", "dedupe", "enrich", "limits", "audit"})
TENANT_KEYS = frozenset(
    {"api_keys", "sinks", "metadata", "signing_secret_env", "rate_limit", "sla_ms", "pii_secret_env", "schemas"}
)
RATE_LIMIT_KEYS = frozenset({"events_per_s", "burst"})
# Keys every sink takes, whatever its type (the rules' filter, consent and transform included).
SINK_COMMON_KEYS = (
    frozenset({"type", "batch_max", "timeout_s", "sla_ms", "max_attempts_per_event", "linger_s", "drop_canaries"})
    | RULE_KEYS
)
# --- Webhook signing and auth (issue 19): the config names environment variables, never the secrets ---
WEBHOOK_SECRET_OPTIONS = ("signing_secret_env", "headers_env", "auth")
WEBHOOK_AUTH = {"bearer": {"token_env"}, "basic": {"username", "username_env", "password_env"}}
# Per sink type: the options it requires, and those it may take.
SINK_REQUIRED_OPTIONS: dict[str, frozenset[str]] = {
    "webhook": frozenset({"url"}),
    "kafka": frozenset({"topic"}),
    "redis_stream": frozenset({"stream"}),
    "file": frozenset({"path"}),
    "postgres": frozenset({"dsn_env", "table"}),
    "s3_archive": frozenset({"bucket"}),
}
SINK_OPTIONAL_OPTIONS: dict[str, frozenset[str]] = {
    "webhook": frozenset({"headers", *WEBHOOK_SECRET_OPTIONS}),
    "kafka": frozenset({"bootstrap", "transactional"}),
    "redis_stream": frozenset({"url", "maxlen", "dedupe_window_s"}),
    "file": frozenset({"rotate_bytes"}),
    "postgres": frozenset(),
    "s3_archive": frozenset({"endpoint", "region", "prefix", "access_key_env", "secret_key_env"}),
}
DEDUPE_KEYS = frozenset({"backend", "window_s", "on_redis_down"})
ENRICH_KEYS = frozenset({"geoip_db"})
LIMITS_KEYS = frozenset(f.name for f in fields(Limits))
AUDIT_KEYS = frozenset(f.name for f in fields(AuditConfig))


def config_keys() -> dict[str, set[str]]:
    """Every key the config file accepts: section path -> keys (`<t>`/`<s>` stand for a tenant's or sink's
    name; `sinks.<s>` of type X is `sinks.<s>[type=X]`; `transform[]` holds the step names)."""
    keys: dict[str, set[str]] = {
        "(root)": set(ROOT_KEYS),
        "tenants.<t>": set(TENANT_KEYS),
        "tenants.<t>.rate_limit": set(RATE_LIMIT_KEYS),
        "tenants.<t>.schemas": set(SCHEMAS_KEYS),
        "sinks.<s>": set(SINK_COMMON_KEYS),
        "sinks.<s>.filter": set(FILTER_KEYS),
        "sinks.<s>.consent": set(CONSENT_KEYS),
        "sinks.<s>.transform[]": set(OPS),
        "dedupe": set(DEDUPE_KEYS),
        "enrich": set(ENRICH_KEYS),
        "limits": set(LIMITS_KEYS),
        "audit": set(AUDIT_KEYS),
    }
    for kind in SINK_TYPES:
        keys[f"sinks.<s>[type={kind}]"] = set(SINK_REQUIRED_OPTIONS[kind] | SINK_OPTIONAL_OPTIONS[kind])
    for kind, auth_keys in WEBHOOK_AUTH.items():
        keys[f"sinks.<s>[type=webhook].auth[type={kind}]"] = {"type"} | auth_keys
    return keys


@dataclass(frozen=True)
class HifiConfig:
    tenants: dict[str, TenantConfig]
    sinks: dict[str, SinkConfig]
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    enrich: EnrichConfig = field(default_factory=EnrichConfig)
    limits: Limits = field(default_factory=Limits)
    audit: AuditConfig = field(default_factory=AuditConfig)

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
        root = _map(data, "(root)")
        _only(root, "(root)", ROOT_KEYS)
        sinks = {}
        tenant_names = set(_map(root.get("tenants"), "tenants", required=True))
        for name, raw in _map(root.get("sinks"), "sinks", required=True).items():
            where = f"sinks.{name}"
            _name(name, where)
            spec = dict(_map(raw, where, required=True))
            kind = spec.pop("type", None)
            if kind not in SINK_TYPES:
                raise ConfigError(f"{where}.type", f"must be one of {', '.join(SINK_TYPES)}, got {kind!r}")
            batch_max = _int(spec.pop("batch_max", 200), f"{where}.batch_max", 1, 10_000)
            timeout_s = _num(spec.pop("timeout_s", 10.0), f"{where}.timeout_s", 0.1, 300)
            sla_ms = _num(spec.pop("sla_ms", 1000.0), f"{where}.sla_ms", 1, 86_400_000)
            max_attempts = _int(spec.pop("max_attempts_per_event", 10), f"{where}.max_attempts_per_event", 1, 1000)
            rules = SinkRules.parse(spec, where, tenant_names)
            linger_s = _num(spec.pop("linger_s", 0.0), f"{where}.linger_s", 0, 600)
            options = _sink_options(kind, spec, where, base_dir)
            sinks[name] = SinkConfig(name, kind, options, batch_max, timeout_s, sla_ms, max_attempts, rules, linger_s)
        tenants = {}
        for name, raw in _map(root.get("tenants"), "tenants", required=True).items():
            where = f"tenants.{name}"
            _name(name, where)
            spec = _map(raw, where, required=True)
            _only(spec, where, TENANT_KEYS)
            keys = spec.get("api_keys")
            if not isinstance(keys, list) or not keys:
                raise ConfigError(f"{where}.api_keys", "must be a non-empty list of 'sha256:<hex>' hashes")
            for i, key in enumerate(keys):
                if not isinstance(key, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", key):
                    raise ConfigError(f"{where}.api_keys[{i}]", "must be 'sha256:<64 hex>' (see `hifi hash-key`)")
            subs = spec.get("sinks", [])
            if not isinstance(subs, list):
                raise ConfigError(f"{where}.sinks", "must be a list of sink names")
            for i, sink in enumerate(subs):
                if sink not in sinks:
                    raise ConfigError(f"{where}.sinks[{i}]", f"unknown sink {sink!r}")
            metadata = _map(spec.get("metadata", {}), f"{where}.metadata")
            secret_env = spec.get("signing_secret_env")
            if secret_env is not None and (
                not isinstance(secret_env, str) or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", secret_env)
            ):
                raise ConfigError(f"{where}.signing_secret_env", "must be the NAME of an environment variable")
            limit = None
            if "rate_limit" in spec:
                raw_limit = _map(spec["rate_limit"], f"{where}.rate_limit", required=True)
                _only(raw_limit, f"{where}.rate_limit", RATE_LIMIT_KEYS)
                rate = _num(raw_limit.get("events_per_s"), f"{where}.rate_limit.events_per_s", 0.001, 1e7)
                burst = _int(raw_limit.get("burst", max(1, int(rate))), f"{where}.rate_limit.burst", 1, 10**8)
                limit = RateLimit(rate, burst)
            tenant_sla = _num(spec["sla_ms"], f"{where}.sla_ms", 1, 86_400_000) if "sla_ms" in spec else None
            pii_env = spec.get("pii_secret_env")
            if pii_env is not None and (not isinstance(pii_env, str) or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", pii_env)):
                raise ConfigError(f"{where}.pii_secret_env", "must be the NAME of an environment variable")
            if pii_env is None and any(sinks[s].rules.transform.hashes for s in subs):
                hashing = next(s for s in subs if sinks[s].rules.transform.hashes)
                raise ConfigError(f"{where}.pii_secret_env", f"required: sink {hashing!r} hashes fields")
            schemas = parse_tenant_schemas(spec["schemas"], f"{where}.schemas", base_dir) if "schemas" in spec else None
            tenants[name] = TenantConfig(
                name, tuple(keys), tuple(subs), dict(metadata), secret_env, limit, tenant_sla, pii_env, schemas
            )
        seen: dict[str, str] = {}
        for tenant in tenants.values():
            for key in tenant.api_key_hashes:
                if key in seen and seen[key] != tenant.name:
                    raise ConfigError(f"tenants.{tenant.name}.api_keys", f"key also belongs to {seen[key]}")
                seen[key] = tenant.name
        dedupe_raw = _map(root.get("dedupe", {}), "dedupe")
        _only(dedupe_raw, "dedupe", DEDUPE_KEYS)
        on_down = dedupe_raw.get("on_redis_down", "pause")
        if on_down not in ("pause", "pass-through"):
            raise ConfigError("dedupe.on_redis_down", f"must be pause or pass-through, got {on_down!r}")
        backend = dedupe_raw.get("backend", "rocksdb")
        if backend not in DEDUPE_BACKENDS:
            raise ConfigError("dedupe.backend", f"must be one of {', '.join(DEDUPE_BACKENDS)}, got {backend!r}")
        dedupe = DedupeConfig(
            backend, _num(dedupe_raw.get("window_s", 86_400), "dedupe.window_s", 1, 30 * 86_400), on_down
        )
        enrich_raw = _map(root.get("enrich", {}), "enrich")
        _only(enrich_raw, "enrich", ENRICH_KEYS)
        geoip = enrich_raw.get("geoip_db")
        if geoip is not None:
            geoip = str(_path(geoip, base_dir))
            if not Path(geoip).is_file():
                raise ConfigError("enrich.geoip_db", f"no such file: {geoip}")
        limits_raw = _map(root.get("limits", {}), "limits")
        _only(limits_raw, "limits", LIMITS_KEYS)
        limits = Limits(**{k: _int(v, f"limits.{k}", 1, 1 << 30) for k, v in limits_raw.items()})
        audit_raw = _map(root.get("audit", {}), "audit")
        _only(audit_raw, "audit", AUDIT_KEYS)
        audit_bounds: dict[str, tuple[float, float]] = {
            "bucket_s": (1, 3600),
            "settle_s": (1, 86_400),
            "slo_target": (0.5, 0.999999),
            "burn_alert": (0.1, 10_000),
            "canary_interval_s": (0, 3600),
            "stuck_after_s": (1, 86_400),
            "dlq_check_s": (0.5, 3600),
            "outage_alert_after_s": (0, 86_400),
            "trace_ttl_s": (0, 30 * 86_400),
        }
        audit_values: dict[str, Any] = {k: _num(v, f"audit.{k}", *audit_bounds[k]) for k, v in audit_raw.items()}
        if "bucket_s" in audit_values:
            audit_values["bucket_s"] = _int(audit_raw["bucket_s"], "audit.bucket_s", 1, 3600)
        return cls(tenants, sinks, dedupe, EnrichConfig(geoip), limits, AuditConfig(**audit_values))


def _sink_options(kind: str, spec: dict[str, Any], where: str, base_dir: Path | None) -> dict[str, Any]:
    required = SINK_REQUIRED_OPTIONS[kind]
    # The common keys were popped by the caller, all but drop_canaries (the sender reads it from the options).
    _only(spec, where, required | SINK_OPTIONAL_OPTIONS[kind] | {"drop_canaries"})
    for name in sorted(required):
        if not isinstance(spec.get(name), str) or not spec[name]:
            raise ConfigError(f"{where}.{name}", f"required for a {kind} sink")
    if kind == "webhook" and not re.match(r"^https?://", spec["url"]):
        raise ConfigError(f"{where}.url", "must start with http:// or https://")
    if kind == "file":
        spec["path"] = str(_path(spec["path"], base_dir))
        spec["rotate_bytes"] = _int(spec.get("rotate_bytes", 64 * 1024 * 1024), f"{where}.rotate_bytes", 1024, 1 << 40)
    if kind == "redis_stream" and "maxlen" in spec:
        spec["maxlen"] = _int(spec["maxlen"], f"{where}.maxlen", 1, 1 << 40)
    if kind == "redis_stream" and "dedupe_window_s" in spec:
        spec["dedupe_window_s"] = _num(spec["dedupe_window_s"], f"{where}.dedupe_window_s", 1, 365 * 86_400)
    if kind == "kafka" and not isinstance(spec.get("transactional", True), bool):
        raise ConfigError(f"{where}.transactional", "must be true or false")
    if kind == "postgres":
        _postgres_options(spec, where)
    if kind == "webhook":
        _webhook_secret_options(spec, where)
    if kind == "s3_archive":
        for name in ("access_key_env", "secret_key_env"):
            if name in spec and not re.fullmatch(r"[A-Z_][A-Z0-9_]*", str(spec[name])):
                raise ConfigError(f"{where}.{name}", "must be the NAME of an environment variable")
    return spec


def _env_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not ENV_NAME_RE.match(value):
        raise ConfigError(where, "must be the NAME of an environment variable (the secret stays out of the file)")
    return value


def _webhook_secret_options(spec: dict[str, Any], where: str) -> None:
    """`signing_secret_env`: one name, or two during a rotation (both sign); `headers_env`: header -> name;
    `auth`: {type: bearer, token_env} or {type: basic, username | username_env, password_env}."""
    if "signing_secret_env" in spec:
        names = spec["signing_secret_env"]
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not 1 <= len(names) <= 2:
            raise ConfigError(f"{where}.signing_secret_env", "one variable name, or a list of two during a rotation")
        spec["signing_secret_env"] = [_env_name(n, f"{where}.signing_secret_env[{i}]") for i, n in enumerate(names)]
    if "headers_env" in spec:
        headers = _map(spec["headers_env"], f"{where}.headers_env")
        for header, name in headers.items():
            if not isinstance(header, str) or not re.fullmatch(r"[A-Za-z0-9-]+", header):
                raise ConfigError(f"{where}.headers_env", f"{header!r} is not an HTTP header name")
            _env_name(name, f"{where}.headers_env.{header}")
    if "auth" in spec:
        auth = _map(spec["auth"], f"{where}.auth", required=True)
        kind = auth.get("type")
        if kind not in WEBHOOK_AUTH:
            raise ConfigError(f"{where}.auth.type", f"must be one of {', '.join(WEBHOOK_AUTH)}")
        _only(auth, f"{where}.auth", {"type"} | WEBHOOK_AUTH[kind])
        if kind == "bearer":
            _env_name(auth.get("token_env"), f"{where}.auth.token_env")
        else:
            _env_name(auth.get("password_env"), f"{where}.auth.password_env")
            if ("username" in auth) == ("username_env" in auth):
                raise ConfigError(f"{where}.auth", "basic auth needs username or username_env (one of them)")
            if "username_env" in auth:
                _env_name(auth["username_env"], f"{where}.auth.username_env")
            elif not isinstance(auth["username"], str) or ":" in auth["username"]:
                raise ConfigError(f"{where}.auth.username", "must be a string without ':'")


# --- PostgreSQL sink (issue 19) ---
ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
PG_TABLE_RE = re.compile(r"^(?:[a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$")


def _postgres_options(spec: dict[str, Any], where: str) -> None:
    """`dsn_env` names the environment variable holding the DSN (a secret); `table` is `[schema.]name`."""
    if not ENV_NAME_RE.match(spec["dsn_env"]):
        raise ConfigError(f"{where}.dsn_env", "must be the NAME of an environment variable (the DSN is a secret)")
    if not PG_TABLE_RE.match(spec["table"]):
        raise ConfigError(f"{where}.table", "must be [schema.]name in lower case letters, digits and _")


def _path(value: str, base_dir: Path | None) -> Path:
    path = Path(os.path.expandvars(value))
    return path if path.is_absolute() or base_dir is None else (Path.cwd() / path)


def _map(value: Any, where: str, required: bool = False) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(where, "must be a mapping" + (" (required)" if value is None else ""))
    return value


def _only(spec: dict[str, Any], where: str, allowed: set[str]) -> None:
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(where, "names are lowercase letters, digits, '-' and '_' (max 63)")


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(where, f"must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _num(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(where, f"must be a number from {lo} to {hi}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Settings:
    """Where this process runs. Each field has one environment variable, read in `from_env` only."""

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
    read_token: str | None = None  # HIFI_READ_TOKEN: bearer token for /stats and table views
    admin_token: str | None = None  # HIFI_ADMIN_TOKEN: bearer token for admin actions (also reads)
    redact_fields: str = ""  # HIFI_REDACT_FIELDS: payload fields masked in views, comma-separated
    # This worker's stable name (the StatefulSet pod name, or `hifi up`'s label): its static group membership.
    worker_id: str | None = None  # HIFI_WORKER_ID
    # How long the group waits for a silent member: a static one's partitions stay with it that long.
    session_timeout_s: float = 10.0  # HIFI_SESSION_TIMEOUT_S: within the broker's group.min/max.session.timeout.ms
    # After a SIGTERM's drain, a static member leaves its group ("yes": its partitions move at once), or keeps
    # them for its restart ("no": nothing to restore elsewhere, but they wait for it). "auto": stateless
    # stages leave, stages with RocksDB state stay (a takeover would restore their store from the changelog).
    leave_group_on_stop: str = "auto"  # HIFI_LEAVE_GROUP_ON_STOP: auto, yes or no

    ENV = {
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
        "read_token": "HIFI_READ_TOKEN",
        "admin_token": "HIFI_ADMIN_TOKEN",
        "redact_fields": "HIFI_REDACT_FIELDS",
        "worker_id": "HIFI_WORKER_ID",
        "session_timeout_s": "HIFI_SESSION_TIMEOUT_S",
        "leave_group_on_stop": "HIFI_LEAVE_GROUP_ON_STOP",
    }

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = cls.ENV[f.name]
            if var not in env or env[var] == "":
                continue
            raw = env[var]
            if f.name in ("web_port", "partitions", "replication", "min_insync"):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ConfigError(var, f"must be an integer, got {raw!r}") from None
            elif f.name in ("shutdown_grace_s", "table_checkpoint_s", "session_timeout_s"):
                try:
                    values[f.name] = float(raw)
                except ValueError:
                    raise ConfigError(var, f"must be a number of seconds, got {raw!r}") from None
            elif f.name == "leave_group_on_stop" and raw not in ("auto", "yes", "no"):
                raise ConfigError(var, f"must be auto, yes or no, got {raw!r}")
            else:
                values[f.name] = raw
        return cls(**values)

    def __repr__(self) -> str:
        """Logged at start-up: never print tokens, the Sentry DSN or a password in a Redis URL."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("read_token", "admin_token", "sentry_dsn") and value:
                value = "[redacted]"
            elif f.name in ("redis_url", "trace_redis_url") and value:
                value = re.sub(r"//[^@/]*@", "//[redacted]@", value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

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
        return {self.ENV[f.name]: str(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}
