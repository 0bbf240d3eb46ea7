"""Sentry for every service: tagged with service, release and environment, with no PII."""

from __future__ import annotations

import re
from typing import Any

import sentry_sdk

SECRET_KEYS = re.compile(r"(api[_-]?key|authorization|token|secret|password|payload)", re.I)
RELEASE = "hifi@0.1.0"


URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")


def mask_secrets(text: str) -> str:
    """Credentials inside URLs (redis://:password@host) become [redacted]@."""
    return URL_CREDENTIALS.sub("[redacted]@", text)


def scrub(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """Drop request bodies, mask any field that looks like a secret or a payload, and URL credentials."""
    if isinstance(event.get("message"), str):
        event["message"] = mask_secrets(event["message"])
    logentry = event.get("logentry")
    if isinstance(logentry, dict):
        for key in ("message", "formatted"):
            if isinstance(logentry.get(key), str):
                logentry[key] = mask_secrets(logentry[key])
    for exc in (event.get("exception") or {}).get("values", []):
        if isinstance(exc.get("value"), str):
            exc["value"] = mask_secrets(exc["value"])
    request = event.get("request")
    if isinstance(request, dict):
        request.pop("data", None)
        request.pop("cookies", None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            for name in list(headers):
                if SECRET_KEYS.search(name):
                    headers[name] = "[redacted]"
    _mask(event.get("extra"))
    for crumb in (event.get("breadcrumbs") or {}).get("values", []):
        _mask(crumb.get("data"))
    return event


def _mask(data: Any) -> None:
    if isinstance(data, dict):
        for key in list(data):
            if SECRET_KEYS.search(str(key)):
                data[key] = "[redacted]"
            else:
                _mask(data[key])


def init_sentry(dsn: str | None, service: str, environment: str) -> None:
    if not dsn:
        return
    sentry_sdk.init(
        dsn=dsn,
        release=RELEASE,
        environment=environment,
        send_default_pii=False,
        include_local_variables=False,  # a handler's locals hold the event it was handling, PII included
        before_send=scrub,
        traces_sample_rate=0.0,
    )
    sentry_sdk.set_tag("service", service)
    # The Kafka client logs every failed reconnect at ERROR; while a broker is down that would page
    # hundreds of times. The `broker_unreachable` alert pages once per outage instead.
    from sentry_sdk.integrations.logging import ignore_logger

    ignore_logger("aiokafka*")
