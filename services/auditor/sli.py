"""The delivery SLIs, from receipts: lag percentiles, the on-time ratio and its error-budget burn rates per
tenant and sink, as Prometheus metrics, burn alerts (multi-window, SRE workbook) and the summary's `sinks`."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram
from prometheus_client import CollectorRegistry, Gauge, Histogram

from shared.alerts import Alerter
from shared.audit import Receipt
from shared.config import AuditConfig, HifiConfig
from shared.metrics import LAG_BUCKETS_S


class SlidingHdr:
    """Lag percentiles over the last `span_s`: a ring of `slots` HDR histograms, merged on read."""

    def __init__(self, span_s: float, slots: int = 12) -> None:
        self.slot_s = span_s / slots
        self.slots: deque[tuple[int, HdrHistogram]] = deque(maxlen=slots)

    def record(self, lag_ms: float, now: float | None = None) -> None:
        self.record_counts({max(1, min(int(lag_ms), 3_600_000)): 1}, now)

    def record_counts(self, counts: dict[int, int], now: float | None = None) -> None:
        """A receipt's lags at once: {lag in whole ms, clamped to 1..3,600,000: how many}."""
        slot = int((now if now is not None else time.time()) // self.slot_s)
        if not self.slots or self.slots[-1][0] != slot:
            self.slots.append((slot, HdrHistogram(1, 3_600_000, 2)))
        histogram = self.slots[-1][1]
        for lag_ms, count in counts.items():
            histogram.record_value(lag_ms, count)

    def percentiles(self, now: float | None = None) -> dict[str, float]:
        oldest = int((now if now is not None else time.time()) // self.slot_s) - (self.slots.maxlen or 1) + 1
        merged = HdrHistogram(1, 3_600_000, 2)
        for slot, histogram in self.slots:
            if slot >= oldest:
                merged.add(histogram)
        count = merged.get_total_count()
        if count == 0:
            return {"count": 0}
        return {
            "count": count,
            "p50_ms": merged.get_value_at_percentile(50),
            "p95_ms": merged.get_value_at_percentile(95),
            "p99_ms": merged.get_value_at_percentile(99),
            "max_ms": merged.get_max_value(),
        }


class OnTimeWindow:
    """On-time and total counts in 10 s slots for the last hour: the SLI and its burn rates."""

    SLOT_S = 10

    def __init__(self) -> None:
        self.slots: deque[list[int]] = deque(maxlen=360)  # [slot, on_time, total]

    def add(self, on_time: int, total: int, now: float | None = None) -> None:
        slot = int((now if now is not None else time.time()) // self.SLOT_S)
        if not self.slots or self.slots[-1][0] != slot:
            self.slots.append([slot, 0, 0])
        self.slots[-1][1] += on_time
        self.slots[-1][2] += total

    def ratio(self, window_s: float, now: float | None = None) -> tuple[float | None, int]:
        oldest = int((now if now is not None else time.time()) // self.SLOT_S) - int(window_s // self.SLOT_S) + 1
        on_time = total = 0
        for slot, good, count in self.slots:
            if slot >= oldest:
                on_time += good
                total += count
        return (on_time / total if total else None), total


def burn_rate(ratio: float | None, target: float) -> float:
    """How fast the error budget burns: 1.0 spends exactly the budget over the SLO period."""
    return 0.0 if ratio is None else (1.0 - ratio) / (1.0 - target)


@dataclass
class SinkSLI:
    lag_1m: SlidingHdr = field(default_factory=lambda: SlidingHdr(60, 12))
    lag_1h: SlidingHdr = field(default_factory=lambda: SlidingHdr(3600, 12))
    on_time: OnTimeWindow = field(default_factory=OnTimeWindow)
    delivered: int = 0
    late: int = 0
    lost: int = 0
    canaries: int = 0


class DeliverySLIs:
    """Lag and the on-time SLI per (tenant, sink), fed by receipts; a lost event counts as not on time."""

    def __init__(self, config: HifiConfig, alerter: Alerter, registry: CollectorRegistry) -> None:
        self.config = config
        self.audit: AuditConfig = config.audit
        self.alerter = alerter
        self.sli: dict[tuple[str, str], SinkSLI] = {}
        self.receipts = 0
        r = registry
        self.on_time_gauge = Gauge(
            "hifi_on_time_ratio", "Share of events delivered within SLA", ["tenant", "sink", "window"], registry=r
        )
        self.burn_gauge = Gauge(
            "hifi_slo_burn_rate", "Error-budget burn rate of the on-time SLO", ["tenant", "sink", "window"], registry=r
        )
        self.lag_histogram = Histogram(
            "hifi_delivery_lag_seconds",
            "Sink acknowledgement minus ingest, from receipts",
            ["tenant", "sink"],
            buckets=LAG_BUCKETS_S,
            registry=r,
        )

    def on_receipt(self, receipt: Receipt) -> None:
        sink = receipt.sink
        acked = receipt.delivered_ts
        now = time.time()
        # Grouped per tenant first: the windows, SLI counters and Prometheus child are touched once per
        # tenant and distinct lag, not once per event (per event this was most of the auditor's own time).
        per_tenant: dict[str, tuple[dict[int, int], list[float], list[int]]] = {}
        for row in receipt.events:
            tenant, lag, canary = row.tenant, max(0.0, acked - row.ingest_ts), row.canary
            group = per_tenant.get(tenant)
            if group is None:
                group = per_tenant[tenant] = ({}, [], [0])
            whole_ms = max(1, min(int(lag), 3_600_000))
            group[0][whole_ms] = group[0].get(whole_ms, 0) + 1
            group[1].append(lag)
            group[2][0] += bool(canary)
        for tenant, (counts, lags, (canaries,)) in per_tenant.items():
            sli = self.sli.setdefault((tenant, sink), SinkSLI())
            sli.lag_1m.record_counts(counts, now)
            sli.lag_1h.record_counts(counts, now)
            sli.delivered += len(lags)
            sli.canaries += canaries
            histogram = self.lag_histogram.labels(tenant, sink)
            sla_ms = self.config.sla_ms(tenant, sink)
            on_time = 0
            for lag in lags:
                histogram.observe(lag / 1000)
                on_time += lag <= sla_ms
            sli.late += len(lags) - on_time
            sli.on_time.add(on_time, len(lags), now)
            self.receipts += len(lags)

    def lost(self, tenant: str, sink: str, count: int) -> None:
        """Events the loss ledger confirmed lost: they were not delivered on time."""
        sli = self.sli.setdefault((tenant, sink), SinkSLI())
        sli.lost += count
        sli.on_time.add(0, count)

    def update(self, now: float) -> None:
        """The gauges and burn alerts, once per settle pass."""
        for (tenant, sink), sli in self.sli.items():
            for window, seconds in (("5m", 300), ("1h", 3600)):
                ratio, _ = sli.on_time.ratio(seconds, now)
                if ratio is not None:
                    self.on_time_gauge.labels(tenant, sink, window).set(ratio)
                self.burn_gauge.labels(tenant, sink, window).set(burn_rate(ratio, self.audit.slo_target))
            self._check_burn(tenant, sink, sli, now)

    def _check_burn(self, tenant: str, sink: str, sli: SinkSLI, now: float) -> None:
        """Multi-window burn alert: both the 5 min and the 1 h rate above the threshold (SRE workbook)."""
        short, short_n = sli.on_time.ratio(300, now)
        long, _ = sli.on_time.ratio(3600, now)
        fast = burn_rate(short, self.audit.slo_target)
        slow = burn_rate(long, self.audit.slo_target)
        key = f"{tenant}/{sink}"
        if short_n >= 10 and fast > self.audit.burn_alert and slow > self.audit.burn_alert:
            self.alerter.fire(
                "slo_burn",
                f"on-time SLO of {key} burning {fast:.0f}x (5 min) and {slow:.0f}x (1 h) its budget; "
                f"on time: {short:.2%} over 5 min",
                key=key,
                burn_5m=round(fast, 2),
                burn_1h=round(slow, 2),
            )
        elif fast < self.audit.burn_alert / 2:
            self.alerter.resolve("slo_burn", key=key)

    def summary(self, now: float) -> dict[str, Any]:
        """Per sink and tenant: the SLA, lag percentiles, on-time ratios, burn rates and counts."""
        sinks: dict[str, Any] = {}
        for (tenant, sink), sli in sorted(self.sli.items()):
            short, short_n = sli.on_time.ratio(300, now)
            long, long_n = sli.on_time.ratio(3600, now)
            sinks.setdefault(sink, {})[tenant] = {
                "sla_ms": self.config.sla_ms(tenant, sink),
                "lag_1m": sli.lag_1m.percentiles(now),
                "lag_1h": sli.lag_1h.percentiles(now),
                "on_time_5m": short,
                "on_time_1h": long,
                "events_5m": short_n,
                "events_1h": long_n,
                "burn_5m": round(burn_rate(short, self.audit.slo_target), 3),
                "burn_1h": round(burn_rate(long, self.audit.slo_target), 3),
                "delivered": sli.delivered,
                "late": sli.late,
                "lost": sli.lost,
                "canaries": sli.canaries,
            }
        return sinks
