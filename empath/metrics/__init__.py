"""Metrics: what the daemon counts, and the HTTP endpoint that exports it.

Code that counts calls ``metrics.inc`` / ``metrics.observe`` with a name from
``empath.metrics.spec`` and its label values in the spec's order; that is the whole
interface. Each process counts into its own store; the supervisor sums them
(``service``) and serves ``/metrics``, ``/healthz`` and ``/readyz`` (``http``).
"""

from __future__ import annotations

from empath.metrics.spec import METRICS, MetricSpec
from empath.metrics.store import Store

__all__ = ["LOCAL", "METRICS", "MetricSpec", "Store", "inc", "observe"]

# This process's counts.
LOCAL = Store()
inc = LOCAL.inc
observe = LOCAL.observe
