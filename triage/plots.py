"""The monitoring page's figure: for each operating point of the serving bundle, the observed
sensitivity and alert rate with their 95% intervals beside what the bundle promised."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from triage.schemas import MonitoringOut  # noqa: E402


def monitoring_png(monitoring: MonitoringOut) -> bytes:
    """A PNG with two panels (sensitivity; alert rate); an operating point without figures is left out."""
    points = [p for bundle in monitoring.bundles if bundle.serving for p in bundle.operating_points]
    figure, axes = plt.subplots(1, 2, figsize=(10, 0.6 * max(len(points), 2) + 1.6), sharey=True)
    for axis, (observed, promised, title) in zip(axes, (("sensitivity", "promised_sensitivity", "sensitivity on known outcomes"),
                                                           ("alert_rate", "promised_alert_rate", "alert rate"))):
        for row, point in enumerate(points):
            interval = getattr(point, observed)
            if interval.value is not None:
                low, high = interval.low if interval.low is not None else interval.value, interval.high if interval.high is not None else interval.value
                axis.errorbar(interval.value, row, xerr=[[interval.value - low], [high - interval.value]], fmt="o", color="#243447", capsize=4)
            if getattr(point, promised) is not None:
                axis.plot(getattr(point, promised), row, marker="D", color="#c62828" if point.flags else "#2e7d32", linestyle="none")
        axis.set_title(f"{title}: observed (dot, 95% CI), promised (diamond)", fontsize=9)
        axis.set_xlim(0, 1)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(points)), [p.operating_point for p in points])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
