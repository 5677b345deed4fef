"""The bench's own set-up against the real service: a stage that cannot set up measures
nothing (the geofence stage failed for a stop when the pod began answering 503 to more than
two fence validations of one org at a time)."""

from __future__ import annotations

import random

from aiohttp.test_utils import TestClient

from bench.load.city import fence_geometries
from bench.stages.geofences_bench import FENCE_SEED, _create

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
