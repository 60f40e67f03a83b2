"""Live search metrics for the Ray dashboard and Prometheus: training speed, best value, trials finished.

Ray exports metrics made with `ray.util.metrics` in Prometheus text on every node's metrics export port
(`ray start --metrics-export-port=PORT`, or `ray.init(_metrics_export_port=PORT)`), where the dashboard's
Grafana panels and any Prometheus server can read them:

    ray_tfsearch_train_images_per_second{category=...}   gauge, set by the training trial at each milestone
    ray_tfsearch_best_selection_value{category=...}      gauge, the driver's best selection value so far
    ray_tfsearch_trials_finished_total{category=...}     counter, training trials the driver saw complete

Each node exports only the series of its own processes: the training speed appears on the node that ran the
trial, the other two on the driver's node. The metric objects are made on first use in each process, and every
call is a no-op when Ray is not initialised (plain `tfsearch train`, unit tests), so callers need no guard.

Ray 2.60's metrics agent drops a gauge series about two export intervals (20 s by default) after its process
last set it, so a value set once (the best so far, the speed at the last milestone) would vanish from the port
between results. Each process therefore sets its gauges again every `REFRESH_S` seconds from a daemon thread.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

TAG_KEYS = ("category",)
IMAGES_PER_SECOND = "tfsearch_train_images_per_second"
BEST_VALUE = "tfsearch_best_selection_value"
TRIALS_FINISHED = "tfsearch_trials_finished"

# what each metric is: its Ray class and its description
_KINDS = {
    IMAGES_PER_SECOND: ("Gauge", "training speed at the last milestone (images/s)"),
    BEST_VALUE: ("Gauge", "best selection value reported so far"),
    TRIALS_FINISHED: ("Counter", "training trials finished"),
}
REFRESH_S = 5.0
# this process's metric objects, by name; Ray registers each name once per process
_metrics: dict[str, Any] = {}
# the last value of each gauge series of this process, by (metric name, category), set again every REFRESH_S
_gauges: dict[tuple[str, str], float] = {}
_lock = threading.Lock()
_refresher: threading.Thread | None = None


def _ray_running() -> bool:
    # Ray cannot be initialised in a process that never imported it: no import cost for the no-op case
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _metric(name: str) -> Any:
    if name not in _metrics:
        from ray.util import metrics  # the first gauge, inside a Ray process: tfsearch train runs without Ray

        kind, description = _KINDS[name]
        _metrics[name] = getattr(metrics, kind)(name, description=description, tag_keys=TAG_KEYS)
    return _metrics[name]


def _set_gauge(name: str, category: str, value: float) -> None:
    global _refresher
    if not _ray_running():
        return
    with _lock:
        _gauges[(name, category)] = float(value)
        _metric(name).set(float(value), tags={"category": category})
        if _refresher is None:
            _refresher = threading.Thread(target=_keep_gauges, name="tfsearch-gauges", daemon=True)
            _refresher.start()


def refresh() -> None:
    """Set every gauge series of this process again to its last value, so the metrics agent keeps it."""
    if not _ray_running():
        return
    with _lock:
        for (name, category), value in _gauges.items():
            _metric(name).set(value, tags={"category": category})


def _keep_gauges() -> None:
    while True:
        time.sleep(REFRESH_S)
        refresh()


def record_milestone(category: str, images_per_second: float) -> None:
    """Training speed of a trial at its latest milestone (called in the training trial, on its node)."""
    _set_gauge(IMAGES_PER_SECOND, category, images_per_second)


def record_best(category: str, value: float) -> None:
    """The best selection value the driver has seen for a category."""
    _set_gauge(BEST_VALUE, category, value)


def record_trial_finished(category: str) -> None:
    """One more training trial of a category finished (driver)."""
    if _ray_running():
        _metric(TRIALS_FINISHED).inc(1.0, tags={"category": category})
