"""Prometheus metrics: one registry per daemon, fed by the receiver, workers and polls.

Counters and histograms are updated as things happen; gauges that describe the store
(outbox depth, oldest pending delivery) are read from it when ``/metrics`` is scraped,
so several instances sharing one database all report the same truth.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Every metric syncd exports, on its own registry."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.webhooks = Counter(
            "syncd_webhooks_received_total",
            "Webhook requests by message type and outcome",
            ["message_type", "outcome"],
            registry=registry,
        )
        self.ingest_seconds = Histogram(
            "syncd_webhook_ingest_seconds",
            "Time from request start to acknowledgement",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.deliveries = Counter(
            "syncd_erp_deliveries_total",
            "ERP deliveries by entity type and outcome (delivered, retry, dead)",
            ["entity_type", "outcome"],
            registry=registry,
        )
        self.erp_seconds = Histogram(
            "syncd_erp_request_seconds",
            "ERP call latency",
            ["entity_type"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "syncd_erp_retries_total", "ERP deliveries scheduled for a retry", registry=registry
        )
        self.dead_letters = Counter(
            "syncd_erp_dead_letters_total", "ERP deliveries dead-lettered", registry=registry
        )
        self.outbox_depth = Gauge(
            "syncd_outbox_depth", "Outbox rows by state", ["state"], registry=registry
        )
        self.oldest_pending = Gauge(
            "syncd_outbox_oldest_pending_seconds",
            "Age of the oldest pending delivery (0 when none)",
            registry=registry,
        )
        self.poll_runs = Counter(
            "syncd_poll_runs_total",
            "Poll and reconciliation passes by job, kind and outcome",
            ["job", "kind", "outcome"],
            registry=registry,
        )
        self.poll_records = Counter(
            "syncd_poll_records_total", "Records read by polls", ["job"], registry=registry
        )
        self.poll_last_success = Gauge(
            "syncd_poll_last_success_timestamp_seconds",
            "Unix time of the last successful pass per job",
            ["job"],
            registry=registry,
        )
        self.corrections = Counter(
            "syncd_reconcile_corrections_total",
            "State found by polls that callbacks had not delivered, by entity type",
            ["entity_type"],
            registry=registry,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return bytes(generate_latest(self.registry))
