"""Ids sent as one joined text and split by PostgreSQL (ingest/sql_arrays.py) arrive exactly
as the list they came from, whatever they hold, on the real PostgreSQL."""

from __future__ import annotations

import pytest

from ingest.sql_arrays import SEP, ids, numbers, split

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
    with pytest.raises(ValueError, match="empty or holds a control character"):
        ids(values)
