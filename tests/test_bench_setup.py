"""The bench's own set-up against the real service: a stage that cannot set up measures
nothing (the geofence stage failed for a stop when the pod began answering 503 to more than
two fence validations of one org at a time). And how the geofence stage compares its rounds."""

from __future__ import annotations

import random

from aiohttp.test_utils import TestClient

from bench.load.city import fence_geometries
from bench.stages.geofences_bench import FENCE_SEED, _compare, _create, _interval

from .conftest import ClientFactory, auth, token


async def test_the_geofence_stage_creates_its_fences(make_client: ClientFactory) -> None:
    # The bench's settings for fence changes (bench/context.py), the pod's own validation limit.
    client: TestClient = await make_client(
        geofence_changes_per_s=1_000_000, geofence_changes_burst=1_000_000
    )
    geometries = fence_geometries(random.Random(FENCE_SEED), 200)
    url = str(client.make_url("")).rstrip("/")
    dispatcher = token(role="dispatcher", sub="disp_1", org="org_1")
    await _create(url, dispatcher, geometries)
    r = await client.get("/api/v1/geofences", headers=auth("dispatcher", "disp_1"))
    assert r.status == 200
    names = sorted(f["name"] for f in (await r.json())["geofences"])
    assert names == sorted(name for name, _, _ in geometries)


def _rounds(*pps: tuple[int, int]) -> list[dict[str, object]]:
    return [
        {"fences": f, "stored_pps": p, "server_cpu_per_100k": 1.0, "pg_cpu_per_100k": 0.5}
        for f, p in pps
    ]


def test_each_fenced_round_is_compared_with_the_unfenced_rounds_either_side() -> None:
    """A machine speeding up over the rounds (100, 120, 140k) is not taken for the fences'
    cost or gain: each 1000 round ÷ the mean of its neighbours, the last one ÷ the one before."""
    rows = _rounds((0, 100), (1000, 110), (0, 120), (1000, 130), (0, 140), (1000, 126))
    out = _compare(rows)
    assert out["pair_ratios"] == [1.1, 1.083, 0.9]
    assert out["bracketed_ratios"] == [1.0, 1.0, 0.9]


def test_the_interval_says_whether_the_fences_slow_ingest_measurably() -> None:
    steady = _interval([0.90, 0.91, 0.89, 0.90, 0.92, 0.88])
    assert steady is not None and steady["measurably_slower"]
    assert steady["low"] < 0.90 < steady["high"] < 1.0
    noisy = _interval([0.80, 1.05, 0.92, 1.10, 0.85, 0.98])
    assert noisy is not None and not noisy["measurably_slower"]
    assert noisy["half_width"] > 0.05
    assert _interval([0.9]) is None  # one round: no spread to judge by
