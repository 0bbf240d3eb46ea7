"""The sender's lag samples, delivered counts and live state, for metrics and the table browser."""

from __future__ import annotations

from typing import Any

from shared import pipeline
from shared.stage import Record

HOPS = tuple(s.name for s in pipeline.HOPS)  # the stamps an event gathers between collector and sender


class DeliveryStats:
    """SinkDelivery's lag and counters (a mixin over its `metrics`, `lag`, `stage_lag` and breaker)."""

    def _record_lag(self, records: list[Record], acked: float) -> None:
        # Per batch, not per event: label lookups and HDR records showed in the sender's profile.
        per_tenant: dict[str, int] = {}
        end_to_end = self.metrics.end_to_end_lag.labels(self.name)
        lags: list[int] = []
        stage_lags: dict[str, list[int]] = {stage: [] for stage in self.stage_lag}
        for record in records:
            event = record.event
            per_tenant[event.tenant] = per_tenant.get(event.tenant, 0) + 1
            if event.ingest_ts:
                lag = acked - event.ingest_ts
                lags.append(int(lag))
                end_to_end.observe(lag / 1000)
            stamps = event.stages
            previous = stamps.get(pipeline.COLLECTOR.name)
            for stage in HOPS:
                at = stamps.get(stage)
                if previous is not None and at is not None:
                    stage_lags[stage].append(int(at - previous))
                previous = at if at is not None else previous
            if previous is not None:
                stage_lags[pipeline.SENDER.name].append(int(acked - previous))
        self.lag.record_many(lags)
        for stage, values in stage_lags.items():
            self.stage_lag[stage].record_many(values)
        for tenant, count in per_tenant.items():
            self.metrics.delivered.labels(self.name, tenant).inc(count)

    def state_rows(self) -> list[dict[str, Any]]:
        """The sink's live state, for the table browser."""
        return [
            {
                "sink": self.name,
                "circuit": self.breaker.state,
                "consecutive_failures": self.breaker.failures,
                "circuit_opened": self.breaker.opened_count,
                "throttle_interval_s": round(self.throttle.interval_s, 3),
                "batches_in_retry": len(self.attempts),
                "events_suspect": len(self.suspect),
            }
        ]

    def stats(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "sink": self.name,
            "type": self.sink.config.type,
            "delivered": m.total(m.delivered),
            "skipped_already_delivered": self.skipped,
            "dead_lettered": m.total(m.dead_lettered),
            "retries": m.total(m.retries),
            "circuit": self.breaker.state,
            "circuit_opened": self.breaker.opened_count,
            "throttle_interval_s": round(self.throttle.interval_s, 3),
            "lag": self.lag.percentiles(),
            "stage_lag_p95_ms": {s: w.percentiles().get("p95_ms") for s, w in self.stage_lag.items()},
        }
