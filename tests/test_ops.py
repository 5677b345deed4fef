"""Operations: /metrics after real traffic (exact deltas), /healthz and /readyz, the alert
rules and the dashboard (promtool), and the operations guide kept in step with the code."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import msgspec
import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from devtools.procs import free_port
from ingest import metrics, store
from ingest.settings import Settings
from ingest.typedefs import BUFFER, LIFECYCLE, SETTINGS

from .conftest import PG_URL, ROOT, auth, batch, in_one_flush, now_ms, token

PING = "/api/v1/tracking/ping"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "ingest-dashboard.json"
DOCS = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Delta:
    """Differences between two scrapes: metrics are process-global, so compare, never read."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)


def route_count(route: str, status: int) -> tuple[str, dict[str, str]]:
    return "ingest_http_request_duration_seconds_count", {"route": route, "status": str(status)}


async def wait_for(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


# -- /metrics after real traffic ---------------------------------------------------------------


async def test_ingest_counters_move_by_exactly_the_traffic(client):
    before = await scrape(client)
    start = now_ms(-600)
    a = batch(5, trip="m_a", start_ms=start)
    resp = await client.post(PING, json=a, headers=auth())
    assert await resp.json() == {
        "batchId": a["batchId"],
        "accepted": 5,
        "duplicates": 0,
        "rejected": [],
    }
    replay = await client.post(PING, json=a, headers=auth())  # same batchId
    assert (await replay.json())["duplicates"] == 5
    resend = dict(a, batchId="resend-1")  # same pings, new batchId
    assert (await (await client.post(PING, json=resend, headers=auth())).json())["duplicates"] == 5
    d = batch(4, trip="m_d")
    d["locations"][1]["latitude"] = 91
    d["locations"][2]["timestamp"] = now_ms(86_400)  # a day ahead of the server clock
    d["locations"][3]["speed"] = -1
    body = await (await client.post(PING, json=d, headers=auth())).json()
    assert body["accepted"] == 1 and [r["index"] for r in body["rejected"]] == [1, 2, 3]
    e = batch(2, trip="m_e")
    e["locations"][0]["latitude"] = 91
    e["locations"][1]["longitude"] = 200
    assert (await client.post(PING, json=e, headers=auth())).status == 422
    bad = await client.post(
        PING, data=b"{not json", headers={**auth(), "Content-Type": "application/json"}
    )
    assert bad.status == 400
    assert (await client.post(PING, json=batch(1))).status == 401
    # Older pings of m_a: stored, but the latest location does not move back.
    older = batch(2, trip="m_a", start_ms=start - 100_000)
    assert (await (await client.post(PING, json=older, headers=auth())).json())["accepted"] == 2
    latest = await client.get(
        "/api/v1/tracking/trips/m_a/latest", headers=auth("dispatcher", "disp_1")
    )
    assert latest.status == 200

    async def published() -> bool:
        return Delta(before, await scrape(client))("ingest_live_published_total") >= 3

    await wait_for(published)
    await asyncio.sleep(0.1)  # nothing more is coming
    after = await scrape(client)
    delta = Delta(before, after)

    assert delta("ingest_pings_received_total") == 5 + 5 + 5 + 4 + 2 + 2
    assert delta("ingest_pings_stored_total") == 5 + 1 + 2
    assert delta("ingest_pings_duplicate_total") == 5 + 5
    assert delta("ingest_pings_rejected_total", reason="latitude") == 2
    assert delta("ingest_pings_rejected_total", reason="longitude") == 1
    assert delta("ingest_pings_rejected_total", reason="timestamp") == 1
    assert delta("ingest_pings_rejected_total", reason="speed") == 1
    assert delta("ingest_pings_rejected_total", reason="heading") == 0
    assert delta("ingest_batches_total", outcome="committed") == 5
    assert delta("ingest_batches_total", outcome="rejected") == 1
    assert delta("ingest_batches_total", outcome="overloaded") == 0
    ping_route = "/api/v1/tracking/ping"
    for status, n in ((200, 5), (422, 1), (400, 1), (401, 1), (503, 0)):
        name, labels = route_count(ping_route, status)
        assert delta(name, **labels) == n, status
    name, labels = route_count("/api/v1/tracking/trips/{tripId}/latest", 200)
    assert delta(name, **labels) == 1
    assert delta("ingest_ack_latency_seconds_count") == 5
    assert delta("ingest_flush_duration_seconds_count") == 5  # one flush per awaited request
    assert delta("ingest_flush_rows_count") == 5
    assert delta("ingest_flush_rows_sum") == 5 + 5 + 5 + 1 + 2  # replays ride the flush too
    assert delta("ingest_live_published_total") == 3  # one message per trip per flush stored
    assert delta("ingest_latest_updated_total") == 2
    assert delta("ingest_latest_skipped_older_total") == 1
    assert delta("ingest_live_publish_dropped_total") == 0
    assert delta("ingest_db_errors_total", operation="flush") == 0
    assert delta("ingest_redis_errors_total", operation="publish") == 0
    assert value(after, "ingest_buffer_rows") == 0
    assert value(after, "ingest_buffer_limit_rows") == client.server.app[SETTINGS].buffer_max_rows
    assert value(after, "ingest_ready") == 1
    assert value(after, "ingest_database_up") == 1
    assert value(after, "ingest_redis_up") == 1
    assert value(after, "ingest_info", role="all", ack_mode="durable") == 1
    # Low cardinality: no trip, driver or batch id ever becomes a label value.
    for (_, labels), _v in after.items():
        for _k, v in labels:
            assert not re.search(r"m_a|m_d|m_e|drv_|disp_|resend", v), labels


async def test_a_flush_refused_by_postgres_is_committed_request_by_request_and_counted(
    make_client, monkeypatch
):
    client = await make_client()
    stored = batch(3, trip="p_1")
    assert (await (await client.post(PING, json=stored, headers=auth())).json())["accepted"] == 3
    real, calls = store.commit, []

    async def refused_once(conn, flush, trips_per_day):
        calls.append(len(flush.rows))
        if len(calls) == 1:  # PostgreSQL refuses the flush as a whole
            raise asyncpg.DataError("refused")
        return await real(conn, flush, trips_per_day)

    monkeypatch.setattr(store, "commit", refused_once)
    before = await scrape(client)
    replay, fresh = await in_one_flush(
        client,
        client.post(PING, json=stored, headers=auth()),
        client.post(PING, json=batch(3, trip="p_2"), headers=auth()),
    )
    assert (await replay.json())["duplicates"] == 3 and (await fresh.json())["accepted"] == 3
    delta = Delta(before, await scrape(client))
    assert calls == [6, 3, 3]  # the flush, then each request alone
    assert delta("ingest_db_errors_total", operation="flush_refused") == 1
    assert delta("ingest_pings_received_total") == 6
    assert delta("ingest_pings_duplicate_total") == 3
    assert delta("ingest_pings_stored_total") == 3
    assert delta("ingest_flush_rows_count") == 2 and delta("ingest_flush_rows_sum") == 6
    assert delta("ingest_batches_total", outcome="committed") == 2


async def test_rate_limited_requests_are_counted(make_client):
    client = await make_client(rate_limit_per_s=0.01, rate_limit_burst=2)
    before = await scrape(client)
    statuses = [
        (await client.post(PING, json=batch(1, trip=f"r_{i}"), headers=auth())).status
        for i in range(4)
    ]
    assert statuses == [200, 200, 429, 429]
    delta = Delta(before, await scrape(client))
    assert delta("ingest_rate_limited_total") == 2
    name, labels = route_count("/api/v1/tracking/ping", 429)
    assert delta(name, **labels) == 2
    assert delta("ingest_pings_received_total") == 2  # a refused request is not read


async def test_buffer_full_batches_and_buffered_acks_are_counted(make_client, database):
    client = await make_client(ack_mode="buffered", buffer_max_rows=10, flush_max_rows=10)
    before = await scrape(client)
    locker = await asyncpg.connect(database)
    try:
        async with locker.transaction():
            await locker.execute('LOCK TABLE "TripLocation" IN ACCESS EXCLUSIVE MODE')
            first = await client.post(PING, json=batch(8, trip="f_1"), headers=auth())
            assert first.status == 202 and (await first.json())["queued"] == 8
            full = await client.post(PING, json=batch(5, trip="f_2"), headers=auth())
            assert full.status == 503 and full.headers["Retry-After"]
            during = await scrape(client)
            assert value(during, "ingest_buffer_rows") == 8
            assert value(during, "ingest_buffer_limit_rows") == 10
            assert value(during, "ingest_ready") == 0  # above the high-water mark
    finally:
        await locker.close()

    async def stored() -> bool:
        return Delta(before, await scrape(client))("ingest_pings_stored_total") == 8

    await wait_for(stored)
    delta = Delta(before, await scrape(client))
    assert delta("ingest_batches_total", outcome="queued") == 1
    assert delta("ingest_batches_total", outcome="overloaded") == 1
    assert delta("ingest_pings_received_total") == 13
    name, labels = route_count("/api/v1/tracking/ping", 503)
    assert delta(name, **labels) == 1
    assert delta("ingest_ack_latency_seconds_count") == 0  # buffered acks wait for no commit


async def test_websocket_and_fanout_metrics(client):
    tok = token("dispatcher", "disp_1", "org_1")
    before = await scrape(client)
    sockets = [await client.ws_connect(f"/api/v1/live?access_token={tok}") for _ in range(2)]
    for ws in sockets:
        await ws.send_json({"type": "subscribe", "trips": ["w_1"]})
        assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
    mid = Delta(before, await scrape(client))
    assert mid("ingest_ws_connections") == 2
    assert mid("ingest_ws_subscriptions") == 1  # one channel, however many sockets
    resp = await client.post(PING, json=batch(3, trip="w_1"), headers=auth())
    assert resp.status == 200
    for ws in sockets:
        msg = await ws.receive_json(timeout=5)
        assert msg["type"] == "locations" and len(msg["locations"]) == 3

    async def published() -> bool:  # counted once the publish call returns, maybe after delivery
        return Delta(before, await scrape(client))("ingest_live_published_total") >= 1

    await wait_for(published)
    delta = Delta(before, await scrape(client))
    assert delta("ingest_ws_messages_sent_total") == 2
    assert delta("ingest_ws_messages_dropped_total") == 0
    assert delta("ingest_live_publish_to_send_seconds_count") == 1  # per message, not per socket
    assert delta("ingest_live_published_total") == 1
    for ws in sockets:
        await ws.close()

    async def closed() -> bool:
        d = Delta(before, await scrape(client))
        return d("ingest_ws_connections") == 0 and d("ingest_ws_subscriptions") == 0

    await wait_for(closed)


async def test_redis_unreachable_shows_on_metrics_but_ingest_stays_ready(make_client):
    client = await make_client(role="ingest", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    before = await scrape(client)  # a first probe: may already count the error
    await asyncio.sleep(1.05)  # probe answers are reused for a second
    after = await scrape(client)
    assert value(after, "ingest_redis_up") == 0
    assert value(after, "ingest_database_up") == 1
    assert Delta(before, after)("ingest_redis_errors_total", operation="probe") == 1
    resp = await client.post(PING, json=batch(2), headers=auth())
    assert resp.status == 200  # pings are stored without Redis
    ready = await client.get("/readyz")
    assert ready.status == 200 and "redis_pubsub" not in (await ready.json())["checks"]


def test_metric_names_units_and_labels_follow_prometheus_conventions():
    found = list(_metric_objects())
    assert len(found) >= 30
    # Each with a small, fixed set of values (event: enter | exit).
    allowed_labels = {"reason", "outcome", "route", "status", "operation", "event"}
    for m in found:
        family = m.describe()[0]
        kind = family.type
        name = family.name + ("_info" if kind == "info" else "")
        assert re.fullmatch(r"ingest_[a-z0-9_]+", name), name
        assert set(m._labelnames) <= allowed_labels, (name, m._labelnames)
        if kind == "histogram":
            assert name.endswith(("_seconds", "_rows")), name
        if kind == "gauge":
            assert not name.endswith("_total"), name
        if "seconds" in name or "time" in name:
            assert name.endswith(("_seconds", "_timestamp_seconds")), name


def test_every_signal_the_issue_asks_for_is_defined():
    names = _sample_names()
    wanted = [
        "ingest_pings_received_total", "ingest_pings_stored_total",
        "ingest_pings_duplicate_total", "ingest_pings_rejected_total", "ingest_batches_total",
        "ingest_http_request_duration_seconds_bucket", "ingest_ack_latency_seconds_bucket",
        "ingest_flush_duration_seconds_bucket", "ingest_flush_rows_bucket", "ingest_buffer_rows",
        "ingest_buffer_limit_rows", "ingest_db_errors_total", "ingest_redis_errors_total",
        "ingest_latest_skipped_older_total", "ingest_live_published_total",
        "ingest_ws_connections", "ingest_ws_subscriptions", "ingest_ws_messages_sent_total",
        "ingest_ws_messages_dropped_total", "ingest_ws_slow_consumer_closed_total",
        "ingest_live_publish_to_send_seconds_bucket", "ingest_partitions",
        "ingest_oldest_partition_age_seconds", "ingest_partition_months_ahead",
    ]  # fmt: skip
    assert not [n for n in wanted if n not in names]


# -- /healthz and /readyz ------------------------------------------------------------------------


async def test_healthz_answers_while_the_loop_runs(client):
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}


async def test_a_pod_is_not_ready_until_its_migrations_are_applied(make_client, db):
    """New pods do not wait for the migration Job: a pod whose code uses what the Job has not
    added yet (a column, say) must stay out of the Service until the Job has run, and then
    be ready without a restart."""
    from ingest.migrate import migration_files

    last = migration_files()[-1].name
    row = await db.fetchrow('SELECT * FROM "_ingest_migrations" WHERE "name" = $1', last)
    await db.execute('DELETE FROM "_ingest_migrations" WHERE "name" = $1', last)
    try:
        client = await make_client()
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["checks"]["schema"] is False
    finally:
        await db.execute('INSERT INTO "_ingest_migrations" VALUES ($1, $2, $3)', *row.values())

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await wait_for(ready)


async def test_readyz_is_false_while_the_database_is_unreachable(client, database):
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {
        "ready": True,
        "checks": {
            "draining": True,
            "database": True,
            "schema": True,
            "buffer": True,
            "flusher": True,
            "redis_pubsub": True,
        },
    }
    name = database.rsplit("/", 1)[1]
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )

        async def unready() -> bool:
            return (await client.get("/readyz")).status == 503

        await wait_for(unready)
        body = await (await client.get("/readyz")).json()
        assert body["ready"] is False and body["checks"]["database"] is False
        assert (await client.get("/healthz")).status == 200  # alive, just not ready
        samples = await scrape(client)
        assert value(samples, "ingest_database_up") == 0 and value(samples, "ingest_ready") == 0
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()

    async def ready_again() -> bool:
        return (await client.get("/readyz")).status == 200

    await wait_for(ready_again)
    samples = await scrape(client)
    assert value(samples, "ingest_database_up") == 1 and value(samples, "ingest_ready") == 1


async def test_readyz_is_false_above_the_buffer_high_water_mark(make_client, database):
    client = await make_client(
        ack_mode="buffered", buffer_max_rows=10, flush_max_rows=10, buffer_high_water=0.5
    )
    locker = await asyncpg.connect(database)
    try:
        async with locker.transaction():
            await locker.execute('LOCK TABLE "TripLocation" IN ACCESS EXCLUSIVE MODE')
            assert (await client.post(PING, json=batch(4), headers=auth())).status == 202
            assert (await client.get("/readyz")).status == 200  # 4 < 10 * 0.5
            assert (
                await client.post(PING, json=batch(2, trip="t_2"), headers=auth())
            ).status == 202
            resp = await client.get("/readyz")
            assert resp.status == 503
            checks = (await resp.json())["checks"]
            assert checks["buffer"] is False and checks["database"] is True
    finally:
        await locker.close()

    async def drained() -> bool:
        return client.server.app[BUFFER].depth == 0 and (await client.get("/readyz")).status == 200

    await wait_for(drained)


async def test_readyz_is_false_while_draining(client):
    client.server.app[LIFECYCLE].draining = True
    try:
        resp = await client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["checks"]["draining"] is False
    finally:
        client.server.app[LIFECYCLE].draining = False
    assert (await client.get("/readyz")).status == 200


async def test_ops_endpoints_need_no_token(client):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer garbage"}):
            resp = await client.get(path, headers=headers)
            assert resp.status == 200, (path, await resp.text())
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


# -- alert rules and dashboard -----------------------------------------------------------------


def _metric_objects() -> Iterator[MetricWrapperBase]:
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            yield obj


def _sample_names() -> set[str]:
    """Every series name the metrics of ingest/metrics.py can expose."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    return {
        m.describe()[0].name + s for m in _metric_objects() for s in suffixes[m.describe()[0].type]
    }


def _referenced(text: str) -> set[str]:
    return set(re.findall(r"\bingest_[a-z0-9_]*[a-z0-9]\b", text))


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(re.sub(r"label_values\((\w+), \w+\)", r"\1", var["definition"]))
    return exprs


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.fail("promtool not found: .ci/install-ops-tools (run by make install) installs it")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool_check_and_unit_tests():
    check = _promtool("check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr
    tests = _promtool("test", "rules", str(ALERT_TESTS))
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path):
    """Each panel's query, as a recording rule, through promtool's PromQL parser."""
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for i, expr in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    check = _promtool("check", "rules", str(path))
    assert check.returncode == 0, check.stdout + check.stderr


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(graphs) >= 20
    for p in graphs:
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24


def test_alerts_and_dashboard_use_only_defined_metrics():
    defined = _sample_names()
    alerts = _referenced(ALERTS.read_text())
    dashboard = set().union(*(_referenced(e) for e in _dashboard_exprs()))
    assert len(alerts) >= 10 and len(dashboard) >= 25
    assert alerts - defined == set()
    assert dashboard - defined == set()


def test_alert_rules_structure_without_promtool():
    """The same file read as data (when PyYAML is at hand): names, severities, summaries."""
    import yaml  # installed by .ci/install-deploy-tools

    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
        assert r["labels"]["severity"] in ("critical", "warning", "info")
        assert r["annotations"]["summary"]
    names = {r["alert"] for r in rules}
    assert {
        "IngestStalled", "IngestBufferNearFull", "IngestFlushErrors", "IngestRedisDown",
        "IngestPartitionMissingNextMonth",
    } <= names  # fmt: skip


# -- the operations guide ------------------------------------------------------------------------


def _default(field: msgspec.structs.FieldInfo) -> str:
    v = field.default
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, float):
        return f"`{v:g}`"
    return f"`{v}`"


def test_operations_guide_lists_every_setting_with_its_default():
    docs = DOCS.read_text()
    rows = {}
    for line in docs.splitlines():
        m = re.match(r"\| `([A-Z_]+)` \| (.+?) \| (.+) \|$", line)
        if m:
            rows[m[1]] = m[2]
    fields = msgspec.structs.fields(Settings)
    expected = {f.encode_name: _default(f) for f in fields}
    missing = [f"| `{k}` | {v} | ... |" for k, v in expected.items() if rows.get(k) != v]
    assert not missing, "docs/operations.md needs these rows:\n" + "\n".join(missing)
    assert set(rows) == set(expected), set(rows) - set(expected)


def test_operations_guide_lists_every_metric_and_alert():
    docs = DOCS.read_text()
    for m in _metric_objects():
        family = m.describe()[0]
        shown = family.name + ("_total" if family.type == "counter" else "")
        shown += "_info" if family.type == "info" else ""
        assert f"`{shown}`" in docs, shown
    for alert in re.findall(r"- alert: (\w+)", ALERTS.read_text()):
        assert f"`{alert}`" in docs, alert
