"""Ids sent as one joined text and split by PostgreSQL (ingest/sql_arrays.py) arrive exactly
as the list they came from, whatever they hold, on the real PostgreSQL."""

from __future__ import annotations

import asyncpg
import pytest

from ingest import auth
from ingest.sql_arrays import SEP, ids, numbers, split

from .conftest import batch, bearer, in_one_flush, token

ODD = [
    "trip_1", "NULL", "a,b", "{x}", '"q"', "back\\slash", " spaced ", "ünï©ødé", "🚚",
    "x" * 64, "'; DROP TABLE x; --",
]  # fmt: skip


async def test_ids_arrive_as_the_list_they_came_from(db):
    values = ODD
    got = await db.fetchval(f"SELECT {split('$1')}", ids(values))
    assert got == values
    assert await db.fetchval(f"SELECT {split('$1')}", ids([])) == []
    pairs = await db.fetch(
        f"SELECT * FROM unnest({split('$1')}, {split('$2')}::int8[]) WITH ORDINALITY",
        ids(values), numbers(range(-3, len(values) - 3)),
    )  # fmt: skip
    assert [(r[0], r[1], r[2]) for r in pairs] == [(v, i - 3, i + 1) for i, v in enumerate(values)]


@pytest.mark.parametrize("values", [[""], ["a", ""], ["a" + SEP + "b"], ["ok", SEP]])
def test_an_id_that_would_shift_the_others_is_refused(values):
    """An empty id would vanish from the array, one holding the separator would become two:
    either would pair every later id with another row's (another org's) values."""
    with pytest.raises(asyncpg.DataError, match="empty or holds a control character"):
        ids(values)


async def test_an_id_the_validation_would_let_through_fails_its_request_alone(
    client, db, monkeypatch
):
    """Should a token's org ever pass auth holding the separator, the flush refuses that
    request alone (as PostgreSQL refusing one of its values), and another org's request of the
    same flush is stored: a ValueError there was taken for an outage, retried for ever, and
    held every org's requests on the pod."""
    monkeypatch.setattr(auth, "_principal", lambda c: auth.Principal(c["sub"], c["role"], c["org"]))
    bad, good = await in_one_flush(
        client,
        client.post("/api/v1/tracking/ping", json=batch(3), headers=bearer(token(org="a" + SEP))),
        client.post("/api/v1/tracking/ping", json=batch(3), headers=bearer(token(org="org_2"))),
    )
    assert bad.status == 500 and (await bad.json())["error"] == "storage_error"
    assert good.status == 200 and (await good.json())["accepted"] == 3
    assert await db.fetchval('SELECT array_agg(DISTINCT "orgId") FROM "TripLocation"') == ["org_2"]
