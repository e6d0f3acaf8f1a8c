"""Prometheus metrics at /metrics (behind the token gate): request and scoring latency histograms of this
instance, and figures read from the database at each scrape, so they equal its rows whatever instance
or restart wrote them: scorings and alerts per operating point, and each operating point's observed
sensitivity and alert rate beside the promised ones (with a flag when a promise lies outside what was
observed)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Integer, func, select

from triage.db.models import Score
from triage.service import UNRECORDED, TriageService

MONITORING_BOOTSTRAP = 200  # resamples behind the flags at a scrape (the page and the JSON use 1,000)


class DatabaseFigures(Collector):
    """Counters and gauges computed from the database when scraped."""

    def __init__(self, service: TriageService) -> None:
        self.service = service

    def collect(self) -> Iterator[object]:
        scorings = CounterMetricFamily("triage_scorings", "Scores written, per operating point (database rows).", labels=["operating_point"])
        alerts = CounterMetricFamily("triage_alerts", "Scores that alerted, per operating point (database rows).", labels=["operating_point"])
        with self.service.sessions() as session:
            counts = session.execute(select(Score.operating_point, func.count(), func.sum(Score.alert.cast(Integer))).group_by(Score.operating_point)).all()
        for point, n, n_alert in counts:
            scorings.add_metric([point or UNRECORDED], n)
            alerts.add_metric([point or UNRECORDED], n_alert or 0)
        yield scorings
        yield alerts
        yield from self._promises()

    def _promises(self) -> Iterator[GaugeMetricFamily]:
        names = {"observed_sensitivity": "Observed sensitivity of the alert on lesions with a known outcome.",
                 "promised_sensitivity": "The sensitivity the bundle promised (out of fold).",
                 "observed_alert_rate": "Share of scored lesions alerted.", "promised_alert_rate": "The alert rate the bundle expected (out of fold).",
                 "promise_flag": "1 when a promise lies outside the observed 95% interval."}
        gauges = {name: GaugeMetricFamily(f"triage_{name}", text, labels=["operating_point"]) for name, text in names.items()}
        serving = [b for b in self.service.monitoring(n_boot=MONITORING_BOOTSTRAP).bundles if b.serving]
        for point in (p for bundle in serving for p in bundle.operating_points):
            values = {"observed_sensitivity": point.sensitivity.value, "promised_sensitivity": point.promised_sensitivity,
                      "observed_alert_rate": point.alert_rate.value, "promised_alert_rate": point.promised_alert_rate, "promise_flag": float(bool(point.flags))}
            for name, value in values.items():
                if value is not None:
                    gauges[name].add_metric([point.operating_point], value)
        yield from gauges.values()


class Metrics:
    """The registry of one app: its latency histograms and the database collector."""

    def __init__(self, service: TriageService) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram("triage_request_seconds", "Answer time per route.", ["method", "route", "status"], registry=self.registry)
        self.scoring = Histogram("triage_scoring_seconds", "Time to score an upload (models and the patient's scoring).", registry=self.registry)
        self.registry.register(DatabaseFigures(service))
        service.on_scored = self.scoring.observe

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answer's time, by the route's template (not its path: ids stay out of labels)."""
        self.requests.labels(method, route, str(status)).observe(seconds)
