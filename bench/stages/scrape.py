"""The service's own view of a run, from its /metrics: flush sizes and durations, geofence
evaluations."""

from __future__ import annotations

from typing import Any

import aiohttp


async def scrape(url: str) -> dict[str, float]:
    """Sample name (with labels) -> value, for the sums, counts and totals we read."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        if name.endswith(("_sum", "_count")) or (
            name.startswith(
                ("ingest_batches_total", "ingest_ack_latency_seconds_bucket", "ingest_geofence_")
            )
            and "_created" not in name
        ):
            out[name] = float(value)
    return out


def flush_summary(m: dict[str, float]) -> dict[str, Any]:
    def mean(base: str) -> float | None:
        n = m.get(base + "_count", 0.0)
        return m.get(base + "_sum", 0.0) / n if n else None

    flush_s, rows = mean("ingest_flush_duration_seconds"), mean("ingest_flush_rows")
    ack = mean("ingest_ack_latency_seconds")
    p99 = histogram_quantile(m, "ingest_ack_latency_seconds", 0.99)
    return {
        "mean_ack_wait_ms": round(ack * 1000, 2) if ack is not None else None,
        # The bucket bound holding the 99th percentile of the service's own ack wait.
        "ack_wait_p99_le_ms": round(p99 * 1000, 1) if p99 is not None else None,
        "flushes": int(m.get("ingest_flush_duration_seconds_count", 0)),
        "mean_flush_ms": round(flush_s * 1000, 2) if flush_s is not None else None,
        "mean_rows_per_flush": round(rows) if rows is not None else None,
        "batches": {
            k.split('"')[1]: int(v)
            for k, v in m.items()
            if k.startswith("ingest_batches_total") and v
        },
    }


def histogram_quantile(m: dict[str, float], base: str, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of a Prometheus histogram."""
    buckets = sorted(
        (float(k.split('le="')[1].split('"')[0]), v)
        for k, v in m.items()
        if k.startswith(base + "_bucket{")
    )
    if not buckets or buckets[-1][1] == 0:
        return None
    want = q * buckets[-1][1]
    return next(le for le, count in buckets if count >= want)


def geofence_summary(m: dict[str, float]) -> dict[str, Any]:
    """What the geofence evaluator did (ingest/geofence_events.py), from its counters."""
    n = m.get("ingest_geofence_evaluation_seconds_count", 0.0)
    spent = m.get("ingest_geofence_evaluation_seconds_sum", 0.0)
    return {
        "evaluations": int(n),
        "mean_evaluation_ms": round(spent / n * 1000, 2) if n else None,
        "evaluation_s": round(spent, 3),
        "pings_evaluated": int(m.get("ingest_geofence_pings_evaluated_total", 0)),
        # Read back from PostgreSQL: flushes whose own evaluation had not run (a backlog).
        "gap_pings": int(m.get("ingest_geofence_gap_pings_total", 0)),
        "dropped_flushes": int(m.get("ingest_geofence_dropped_flushes_total", 0)),
        "failures": int(m.get("ingest_geofence_failures_total", 0)),
        "events": {
            k.split('"')[1]: int(v) for k, v in m.items()
            if k.startswith("ingest_geofence_events_total{")
        },
    }  # fmt: skip
