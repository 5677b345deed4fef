"""The Markdown report (results.md) of one run's results."""

from __future__ import annotations

from typing import Any


def _f(v: Any, fmt: str = "{:,}") -> str:
    if v is None:
        return "-"
    return fmt.format(v)


def _closed_loop_line(when: str, c: dict[str, Any]) -> str:
    """One sentence on a closed-loop stretch of the overload stage."""
    parts = [f"{when}, closed loop b20 c256: {c['stored_pps']:,} stored pings/s"]
    if c.get("of_before") is not None:
        parts.append(f"{c['of_before']:.0%} of before")
    parts.append(f"answers {c['statuses']}, p50 {c['latency_ms']['p50']} ms")
    parts.append(f"machine busy {c.get('machine_busy_cores', '-')} cores")
    if inside := c.get("service_metrics"):
        parts.append(
            f"{inside['flushes']} flushes of {inside['mean_rows_per_flush']} rows, {inside['mean_flush_ms']} ms each"
        )
    if "table_rows" in c:
        parts.append(f"table at {c['table_rows']:,} rows after it")
    return "; ".join(parts) + "."


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    L = [f"# ingest benchmark ({res['plan']})", "",
         f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']},"
         f" {m['postgres_client']}; PostgreSQL, Redis, load generators and contenders all on this host, loopback."
         f" Load average {' '.join(m['loadavg_start'])} at start, {' '.join(res.get('loadavg_end', []))} at the end;"
         f" 'other busy cores' is CPU used during a window by processes not under test (the machine was shared).",
         f"Run took {res['elapsed_s']} s.", ""]  # fmt: skip
    L += ["## Targets", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
    for t in res["targets"]:
        L.append(
            f"| {t['target']} | {t['wanted']} | {_f(t['measured'], '{}')} | {'yes' if t['met'] else 'NO'} |"
        )
    if rows := res.get("ingest"):
        L += ["", "## Ingest (closed loop, wrk)", "",
              "Stored pings/s counted in PostgreSQL over the measurement window; CPU is seconds per 100k stored pings.", "",
              "| cell | contender | stored pings/s | acked pings/s | p50 ms | p99 ms | CPU s/100k | PG CPU s/100k | peak RSS MiB | x naive | of pipeline | of decode | of COPY | wrk CPU | other busy cores |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
        for r in rows:
            lat = r["latency_ms"] or {}
            L.append(
                f"| b{r['batch']} c{r['conns']} {r['ack']} | {r['label']} | {_f(r['stored_pps'])} | {_f(r['acked_pps'])}"
                f" | {_f(lat.get('p50'), '{}')} | {_f(lat.get('p99'), '{}')} | {_f(r['server_cpu_per_100k'], '{}')}"
                f" | {_f(r['pg_cpu_per_100k'], '{}')} | {r['peak_rss_mib']} | {_f(r.get('x_naive'), '{}x')}"
                f" | {_f(r.get('of_pipeline'), '{:.0%}')} | {_f(r.get('of_decode'), '{:.0%}')} | {_f(r.get('of_copy'), '{:.0%}')}"
                f" | {_f(r['loadgen_cpu_util'], '{:.0%}')} | {r['other_busy_cores']} |"
            )
        flushing = [r for r in rows if r.get("flushes")]
        if flushing:
            L += ["", "Group commit as seen from inside (the service's /metrics, the pipeline's /stats; whole run incl. warm-up):", "",
                  "| cell | contender | flushes | rows per flush | flush ms | ack wait ms |", "|---|---|--:|--:|--:|--:|"]  # fmt: skip
            for r in flushing:
                f = r["flushes"]
                L.append(f"| b{r['batch']} c{r['conns']} {r['ack']} | {r['label']} | {f['flushes']} | {_f(f['mean_rows_per_flush'])}"
                         f" | {_f(f['mean_flush_ms'], '{}')} | {_f(f.get('mean_ack_wait_ms'), '{}')} |")  # fmt: skip
    if lt := res.get("light"):
        lat = lt["latency_ms"]
        L += ["", f"## Ack latency at a light load (open loop, durable, batch {lt['batch']})", "",
              f"{lt['rate_pings_s']:,} pings/s ({lt['rate_req_s']} req/s) for {lt['duration_s']} s: p50 {lat['p50']} ms,"
              f" p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms; answers {lt['totals']};"
              f" service CPU {lt['service_cpu_util']:.0%} of a core."]  # fmt: skip
        if inside := lt.get("service_metrics"):
            L += ["", f"Inside the service: {inside['flushes']} flushes of {inside['mean_rows_per_flush']} rows on average,"
                  f" {inside['mean_flush_ms']} ms each; ack wait {inside['mean_ack_wait_ms']} ms on average."]  # fmt: skip
    if hr := res.get("half_rate"):
        lat = hr["latency_ms"]
        L += ["", "## Ack latency at half the sustainable rate (open loop, durable, batch 20)", "",
              f"{hr['rate_pings_s']:,} pings/s ({hr['rate_req_s']} req/s) for {hr['duration_s']} s: p50 {lat['p50']} ms,"
              f" p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms (from each request's scheduled send time);"
              f" answers {hr['totals']}; generator CPU {hr['loadgen_cpu_s']} s; service CPU {hr['service_cpu_util']:.0%} of a core;"
              f" machine busy {hr['machine_busy_cores']} of {res['machine']['cores']} cores."]  # fmt: skip
        if inside := hr.get("service_metrics"):
            L += ["", f"Inside the service: {inside['flushes']} flushes of {inside['mean_rows_per_flush']} rows on average,"
                  f" {inside['mean_flush_ms']} ms each; its own ack wait (buffer to commit) {inside['mean_ack_wait_ms']} ms on"
                  f" average, p99 <= {inside['ack_wait_p99_le_ms']} ms (histogram bucket)."]  # fmt: skip
    if fan := res.get("fanout"):
        L += ["", "## Fan-out (WebSocket subscribers in 2 other processes)", "",
              "Server CPU time per subscriber per message; the service's is net of a baseline that posts the same pings with nobody subscribed.", "",
              "| server | pattern | subscribers | us/sub/msg | x floor | p50 ms | p99 ms | max ms | deliveries/s | received by all | machine busy cores |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
        names = {
            "service": "ingest (this service)",
            "frame": "floor: pre-built frame",
            "send_str": "aiohttp send_str (encode once)",
            "encode": "per-subscriber encode",
        }
        for r in fan:
            lat = r["latency_ms"]
            L.append(
                f"| {names.get(r['mode'], r['mode'])} | {r['pattern']} ({r['trips']} trips) | {r['subscribers']:,} | {_f(r['us_per_delivery'], '{}')}"
                f" | {_f(r.get('x_floor'), '{}x')} | {_f(lat['p50'], '{}')} | {_f(lat['p99'], '{}')} | {_f(lat['max'], '{}')}"
                f" | {_f(r['deliveries_per_s'])} | {r['received_by_all']:.0%} | {r['machine_busy_cores']} |"
            )
    if ov := res.get("overload"):
        t, lat = ov["totals"], ov["latency_ms"]
        L += ["", "## Overload (open loop, 3x the sustainable rate, durable, batch 20)", "",
              f"Offered {ov['rate_pings_s']:,} pings/s ({ov['rate_req_s']:,} req/s) for {ov['duration_s']:.0f} s, at most"
              f" {ov['max_inflight']} requests in flight (beyond that the generator sheds). Answers: {t}."
              f" 2xx latency p50 {lat['p50']} ms, p99 {lat['p99']} ms. Service CPU {ov['server_cpu_util']:.0%} of a core"
              f" (machine busy {ov['machine_busy_cores']} of {res['machine']['cores']} cores);"
              f" acknowledged (stored) meanwhile {_f(round(t.get('200', 0) * ov['batch'] / ov['duration_s']))} pings/s,"
              f" {_f(t.get('200', 0) * ov['batch'] / ov['duration_s'] / ov['rate_pings_s'] * 3, '{:.0%}')} of the sustainable rate;"
              f" generator CPU {ov['loadgen_cpu_s']} s. Peak RSS {ov['peak_rss_mib']} MiB; last {ov['tail_window_s']:.0f} s"
              f" {ov['tail_rss_min_mib']}-{ov['tail_rss_max_mib']} MiB."]  # fmt: skip
        if inside := ov.get("service_metrics"):
            L += ["", f"Inside the service during the overload: batches by outcome {inside['batches']};"
                  f" {inside['flushes']} flushes of {inside['mean_rows_per_flush']} rows, {inside['mean_flush_ms']} ms each;"
                  f" ack wait (buffer to commit) {inside['mean_ack_wait_ms']} ms on average. The rest of a client's"
                  " latency was spent before the handler ran."]  # fmt: skip
        for name in ("before", "recovery"):
            if (c := ov.get(name)) is not None:
                L += ["", _closed_loop_line("Before" if name == "before" else "After", c)]
        if pipe := ov.get("pipeline"):
            L += ["", f"Reference: the bare pipeline under the same offered load (no backpressure: it queues"
                  f" what it cannot store yet; answers {pipe['totals']}, peak RSS {pipe['peak_rss_mib']} MiB)."]  # fmt: skip
            L += ["", _closed_loop_line("Pipeline before", pipe["before"])]
            L += ["", _closed_loop_line("Pipeline after", pipe["recovery"])]
            if ov.get("recovery_vs_pipeline") is not None:
                L += [
                    "",
                    f"The service's after ÷ before is {ov['recovery_vs_pipeline']:.0%} of the pipeline's.",
                ]
    if nb := res.get("nearby"):
        L += _nearby(nb)
    for key in ("geofences", "geofences_sites"):
        if gf := res.get(key):
            L += _geofences(gf)
    if st := res.get("storage"):
        L += _storage(st)
    if pr := res.get("profile"):
        L += ["", "## Profile of the service (py-spy, headline load)", ""]
        if "error" in pr:
            L.append(f"py-spy failed: {pr['error']}")
        else:
            note = f" {pr['note']}" if pr.get("note") else ""
            L += [f"{pr['samples']} samples (py-spy --native, 100 Hz) over {pr['duration_s']} s at b{pr['batch']} c{pr['conns']};"
                  f" raw stacks in `{pr['raw']}`.{note}"]  # fmt: skip
            L += _per_ping(pr)
            L += ["", "| by package (leaf frame) | % |", "|---|--:|"]
            L += [f"| {k} | {v} |" for k, v in pr["by_package_pct"]]
            L += ["", "| function (inclusive) | % |", "|---|--:|"]
            L += [f"| `{k}` | {v} |" for k, v in pr["inclusive_pct"]]
            L += ["", "| function (self) | % |", "|---|--:|"]
            L += [f"| `{k}` | {v} |" for k, v in pr["self_pct"]]
    return "\n".join(L) + "\n"


def _per_ping(pr: dict[str, Any]) -> list[str]:
    """The service's CPU per stored ping against the bare pipeline's, bucket by bucket."""
    rows, pipe = pr.get("per_ping_us"), pr.get("pipeline", {})
    if not rows:
        return [f"No per-ping breakdown: pipeline profile {pipe.get('error', 'missing')}."]
    L = ["", f"CPU per stored ping by bucket of work (each bucket's share of the samples x the process's"
         f" CPU per stored ping over the sampled window): the service stored {pr['stored_pps']:,} pings/s"
         f" while sampled, the pipeline {pipe['stored_pps']:,} ({pipe['samples']} samples, raw stacks in"
         f" `{pipe['raw']}`). A sample counts in the first bucket, in this order, that one of its frames"
         " matches (bench/stages/profiles.py), so the live step's JSON encoding counts as the live step.",
         "", "| bucket | service µs/ping | pipeline µs/ping | service extra |", "|---|--:|--:|--:|"]  # fmt: skip
    L += [f"| {b} | {s} | {p} | {d:+} |" for b, s, p, d in rows]
    return L


def _nearby(nb: dict[str, Any]) -> list[str]:
    L = ["", f"## Nearby (one org of {nb['org_trucks']:,} trucks)", "",
         f"{nb['geo_set_size']:,} trucks in the org's GEO set ({nb['trucks_per_km2']} per km² over"
         f" {nb['side_km']} x {nb['side_km']} km; {nb['noise']} trucks in other orgs), posted through"
         f" the ingest endpoint in {nb['fill_s']} s. Closed loop from random points of the city, limit"
         f" {nb['limit']}. *http*: wrk → the service (dispatcher token); *script*: the service's Redis"
         " step (NearbySearch) called in the bench process; *geosearch*: bare GEOSEARCH … ASC COUNT"
         " WITHDIST from the same client library (redis-py). Redis µs per call from INFO commandstats"
         " (Redis is shared: a hint).", "",
         "| case | radius | concurrency | req/s | p50 ms | p99 ms | max ms | trips per answer | service CPU µs/req | Redis µs/call (script; GEOSEARCH) | service / Redis / client cores | other busy cores |",
         "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for r in nb["cases"]:
        u = r.get("redis_usec_per_call", {})
        L.append(
            f"| {r['kind']} | {r['radius_m'] / 1000:g} km | {r['concurrency']} | {r['rps']:,.0f}"
            f" | {_f(r['p50_ms'], '{}')} | {_f(r['p99_ms'], '{}')} | {_f(r['max_ms'], '{}')}"
            f" | {_f(r['trips_per_answer'], '{}')} | {_f(r.get('service_cpu_us_per_request'), '{}')}"
            f" | {_f(u.get('evalsha'), '{}')}; {_f(u.get('geosearch'), '{}')}"
            f" | {r['service_cpu_util']:.2f} / {r['redis_cpu_util']:.2f} / {r['client_cpu_util']:.2f}"
            f" | {r['other_busy_cores']} |"
        )  # fmt: skip
    during = [r for r in nb["cases"] if "ingest_stored_pps" in r]
    for r in during:
        L += ["", f"{r['kind']}, concurrency {r['concurrency']}: wrk posted pings at batch 20 over"
              f" {r['ingest_conns']} connections for 1,024 more trucks of the org meanwhile,"
              f" {r['ingest_stored_pps']:,} stored pings/s"
              f" (ack p99 {r['ingest_p99_ms']} ms, answers {r['ingest_statuses']})."]  # fmt: skip
    return L


def _storage(st: dict[str, Any]) -> list[str]:
    L = ["", "## Storage: bytes per stored ping and COPY rows/s, before and after migration 005", "",
         f"{st['rows']:,} rows of one month COPYed in chunks of {st['chunk']:,} into a database of"
         " its own per schema (before: migrations up to 004, with the \"batchId\" index; after:"
         " all; trip key: all, with an int8 \"tripKey\" and the unique guard on (\"tripKey\","
         " \"timestamp\")), 1,000 trips, a batch id per 20 pings; sizes after VACUUM ANALYZE;"
         " \"packed\" is after REINDEX (a month no ping arrives in any more).", "",
         "| ids | schema | heap B | unique index B | batchId index B | total B | packed total B | COPY rows/s |",
         "|---|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for r in st["results"]:
        for name in ("before", "after"):
            v = r[name]
            b, p = v["bytes_per_row"], v["packed_bytes_per_row"]
            L.append(f"| {r['ids']} | {name} 005 | {b['heap']} | {b.get('unique', '-')}"
                     f" | {b.get('batchId', '-')} | {b['total']} | {p['total']} | {v['copy_rows_s']:,} |")  # fmt: skip
        L.append(f"| {r['ids']} | after ÷ before | | | | | | {r['copy_ratio']:.2f}x |")
        if k := r.get("trip_key"):
            b, p = k["bytes_per_row"], k["packed_bytes_per_row"]
            L.append(f"| {r['ids']} | trip key (not built) | {b['heap']} | {b.get('unique', '-')} | -"
                     f" | {b['total']} | {p['total']} | {k['copy_rows_s']:,} |")  # fmt: skip
            L.append(
                f"| {r['ids']} | trip key ÷ after | | | | | | {r['trip_key_copy_ratio']:.2f}x |"
            )
    return L


def _geofences(gf: dict[str, Any]) -> list[str]:
    ex = gf.get("expected", {})
    small, large = gf.get("radii_m", (100, 2000))
    L = ["", f"## Geofences on ingest (b{gf['batch']} c{gf['conns']} durable, 0 vs {gf['fences']} fences, {gf.get('layout', 'city')})", "",
         f"Fences of {small:g}-{large:g} m. {gf['drivers']:,} trucks each driving a straight line across the city, {gf['step_m']:g} m per ping;"
         f" by the service's own index {_f(ex.get('share_inside'), '{:.0%}')} of their pings lie inside"
         f" some fence ({ex.get('fences_per_ping')} fences per ping) and"
         f" {ex.get('events_per_1k_pings')} crossings are expected per 1,000 pings. A fresh process per"
         " round; evaluation counters from its /metrics, events counted in \"GeofenceEvent\".", "",
         "| round | fences | stored pings/s | CPU s/100k | PG CPU s/100k | events | pings evaluated | read back (gap) | dropped flushes | evaluation ms/flush | drain s | other busy cores |",
         "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for i, r in enumerate(gf["rounds"], 1):
        g = r["geofences"]
        L.append(
            f"| {i} | {r['fences']} | {r['stored_pps']:,} | {_f(r['server_cpu_per_100k'], '{}')}"
            f" | {_f(r['pg_cpu_per_100k'], '{}')} | {r['events']:,} | {g['pings_evaluated']:,}"
            f" | {g['gap_pings']:,} | {g['dropped_flushes']} | {_f(g['mean_evaluation_ms'], '{}')}"
            f" | {g['drain_s']} | {r['other_busy_cores']} |"
        )  # fmt: skip
    by = gf["by_fences"]
    means = "; ".join(
        f"{n} fences: {_f(v['stored_pps'], '{:,.0f}')} pings/s, {_f(v['server_cpu_per_100k'], '{}')}"
        f" + PG {_f(v['pg_cpu_per_100k'], '{}')} CPU s/100k"
        for n, v in by.items()
    )
    L += ["", f"Means: {means}. Stored pings/s with {gf['fences']} fences ÷ with none:"
          f" {_f(gf['ratio_pps'], '{:.0%}')} (each 1000 round ÷ the 0 round before it:"
          f" {', '.join(f'{x:.0%}' for x in gf['pair_ratios'])})."]  # fmt: skip
    if iv := gf.get("interval"):
        verdict = (
            "measurably slower"
            if iv["measurably_slower"]
            else f"not measurably slower at this resolution (±{iv['half_width']:.1%})"
        )
        L += ["", f"Each 1000 round ÷ the mean of the 0 rounds either side of it:"
              f" {', '.join(f'{x:.1%}' for x in gf['bracketed_ratios'])}; geometric mean"
              f" {iv['ratio']:.1%}, 95% interval {iv['low']:.1%} to {iv['high']:.1%}"
              f" ({iv['n']} rounds): {verdict}."]  # fmt: skip
    return L
